//! The dense block: `out = dropout(act(norm(x W^T + b)))`.

use crate::{Activation, layer_norm};
use serde::{Deserialize, Serialize};
use svp_rng::{Purpose, Stream, StreamKey, drop_threshold};
use svp_tensor::{
    ArrayView2, ArrayViewMut2, GradientSink, SINK_MAX_DEPTH, for_each_row_mut, gemm, gemm_bias, gemm_to_sink, reduce,
    view, view_mut,
};

/// Normalization inside a dense block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// No normalization.
    None,
    /// LayerNorm over the features of each row, with learned gain and bias.
    LayerNorm,
}

/// Shape and kind of a dense block.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenseSpec {
    /// Input width.
    pub in_dim: usize,
    /// Output width.
    pub out_dim: usize,
    /// Normalization after the linear map.
    pub norm: Norm,
    /// Activation after the normalization.
    pub activation: Activation,
    /// Dropout probability on the block's output (training only).
    pub dropout: f32,
}

impl DenseSpec {
    /// A plain linear layer (the classifier head).
    pub fn linear(in_dim: usize, out_dim: usize) -> Self {
        Self { in_dim, out_dim, norm: Norm::None, activation: Activation::Identity, dropout: 0.0 }
    }
}

/// Whether a forward pass trains (dropout on, masks keyed by step) or infers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Training step `step` of the model with seed `seed`.
    Train {
        /// Model seed.
        seed: u64,
        /// Global step counter.
        step: u64,
    },
    /// Inference: no dropout.
    Infer,
}

/// What a block's backward needs from its forward, sized for the widest block
/// and the largest batch so one cache serves every layer.
#[derive(Debug, Default)]
pub struct DenseCache {
    /// The activation's input, for blocks without a norm (with one, it is
    /// recomputed from `xhat`).
    pre_act: Vec<f32>,
    xhat: Vec<f32>,
    rstd: Vec<f32>,
    /// The LayerNorm backward's per-chunk column sums.
    norm_scratch: Vec<f32>,
}

impl DenseCache {
    /// A cache for up to `max_rows` rows of width up to `max_width`.
    ///
    /// # Panics
    /// If the memory is not there (see [`DenseCache::try_new`]).
    pub fn new(max_rows: usize, max_width: usize) -> Self {
        Self::try_new(max_rows, max_width).expect("memory for a layer cache")
    }

    /// [`DenseCache::new`], failing cleanly when the memory is not there.
    pub fn try_new(max_rows: usize, max_width: usize) -> Result<Self, svp_alloc::OutOfMemory> {
        Self::try_sized(max_rows, max_width, max_width)
    }

    /// A cache for up to `max_rows` rows of blocks with LayerNorm (and token
    /// heads) up to `norm_width` wide and blocks without a norm up to
    /// `plain_width` wide: only the latter keep their pre-activations.
    pub fn try_sized(max_rows: usize, norm_width: usize, plain_width: usize) -> Result<Self, svp_alloc::OutOfMemory> {
        Ok(Self {
            pre_act: svp_alloc::try_zeros(max_rows * plain_width, "a layer's pre-activations")?,
            xhat: svp_alloc::try_zeros(max_rows * norm_width, "a layer's normalized inputs")?,
            rstd: svp_alloc::try_zeros(if norm_width > 0 { max_rows } else { 0 }, "a layer's LayerNorm statistics")?,
            norm_scratch: svp_alloc::try_zeros(
                layer_norm::backward_scratch_len(max_rows, norm_width),
                "a layer's LayerNorm gradient sums",
            )?,
        })
    }

    /// The `(norm_width, plain_width)` of [`DenseCache::try_sized`] that serve `blocks`.
    pub fn widths<'a>(blocks: impl IntoIterator<Item = &'a DenseSpec>) -> (usize, usize) {
        blocks.into_iter().fold((0, 0), |(norm, plain), s| match s.norm {
            Norm::LayerNorm => (norm.max(s.out_dim), plain),
            Norm::None => (norm, plain.max(s.out_dim)),
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.pre_act.len() + self.xhat.len() + self.rstd.len() + self.norm_scratch.len())
    }

    /// The LayerNorm buffers for `rows x width` and the backward's scratch
    /// (other layers that normalize rows keep their statistics here too).
    pub(crate) fn norm_buffers(&mut self, rows: usize, width: usize) -> (&mut [f32], &mut [f32], &mut [f32]) {
        (&mut self.xhat[..rows * width], &mut self.rstd[..rows], &mut self.norm_scratch)
    }
}

/// A dense block; its parameters live in a slice the caller owns, laid out
/// `[W (out x in, row-major) | b (out) | gamma (out) | beta (out)]`
/// (gamma and beta only with LayerNorm).
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    spec: DenseSpec,
    layer: u64,
}

/// A dense block's parameters, split by role.
struct Parts<T> {
    w: T,
    b: T,
    gamma: T,
    beta: T,
}

impl Dense {
    /// Block `layer` (its index keys its dropout streams).
    pub fn new(spec: DenseSpec, layer: u64) -> Self {
        Self { spec, layer }
    }

    /// Shape and kind.
    pub fn spec(&self) -> &DenseSpec {
        &self.spec
    }

    /// Number of f32 parameters.
    pub fn param_len(&self) -> usize {
        let (i, o) = (self.spec.in_dim, self.spec.out_dim);
        o * i + o + if self.spec.norm == Norm::LayerNorm { 2 * o } else { 0 }
    }

    fn parts<'a>(&self, p: &'a [f32]) -> Parts<&'a [f32]> {
        let (i, o) = (self.spec.in_dim, self.spec.out_dim);
        let (w, rest) = p.split_at(o * i);
        let (b, rest) = rest.split_at(o);
        let (gamma, beta) = if self.spec.norm == Norm::LayerNorm { rest.split_at(o) } else { (&[][..], &[][..]) };
        Parts { w, b, gamma, beta }
    }

    fn parts_mut<'a>(&self, p: &'a mut [f32]) -> Parts<&'a mut [f32]> {
        let (i, o) = (self.spec.in_dim, self.spec.out_dim);
        let (w, rest) = p.split_at_mut(o * i);
        let (b, rest) = rest.split_at_mut(o);
        let (gamma, beta) =
            if self.spec.norm == Norm::LayerNorm { rest.split_at_mut(o) } else { (&mut [][..], &mut [][..]) };
        Parts { w, b, gamma, beta }
    }

    /// PyTorch's default initialization: W and b uniform in `±1/sqrt(in_dim)`,
    /// LayerNorm gain 1 and bias 0. Drawn from the stream `(seed, WeightInit, layer)`.
    pub fn init_params(&self, seed: u64, params: &mut [f32]) {
        let bound = 1.0 / (self.spec.in_dim as f64).sqrt();
        let mut stream = Stream::new(StreamKey::new(seed, Purpose::WeightInit, self.layer, 0, 0));
        let parts = self.parts_mut(params);
        for v in parts.w.iter_mut().chain(parts.b.iter_mut()) {
            *v = ((2.0 * stream.uniform() - 1.0) * bound) as f32;
        }
        parts.gamma.fill(1.0);
        parts.beta.fill(0.0);
    }

    fn dropout_stream(&self, seed: u64, step: u64, row: usize) -> Stream {
        Stream::new(StreamKey::new(seed, Purpose::ActivationDropout, self.layer, row as u64, step))
    }

    fn apply_dropout(&self, mode: Mode, buf: &mut [f32]) {
        let p = self.spec.dropout;
        if let (Mode::Train { seed, step }, true) = (mode, p > 0.0) {
            let threshold = drop_threshold(p);
            let scale = 1.0 / (1.0 - p);
            for_each_row_mut(buf, self.spec.out_dim, |row, values| {
                self.dropout_stream(seed, step, row).apply_dropout(values, threshold, scale);
            });
        }
    }

    /// Forward over `x` (rows x in_dim) into `out` (rows x out_dim, row-major),
    /// filling `cache` for [`Dense::backward`].
    pub fn forward(&self, params: &[f32], x: ArrayView2<f32>, cache: &mut DenseCache, out: &mut [f32], mode: Mode) {
        let (rows, o) = (x.nrows(), self.spec.out_dim);
        assert_eq!(x.ncols(), self.spec.in_dim, "dense forward: input width");
        let p = self.parts(params);
        let w = view(p.w, o, self.spec.in_dim);
        let n = rows * o;
        let out = &mut out[..n];
        if self.spec.norm == Norm::LayerNorm {
            // z = x W^T, then one pass: + b, normalize (xhat in place), affine, act.
            let z = &mut cache.xhat[..n];
            gemm(1.0, x, w.t(), 0.0, view_mut(z, rows, o));
            let act = self.spec.activation;
            layer_norm::forward(z, Some(p.b), p.gamma, p.beta, act, &mut cache.rstd[..rows], out);
        } else {
            let z = &mut cache.pre_act[..n];
            gemm_bias(x, w.t(), p.b, view_mut(z, rows, o));
            self.spec.activation.forward(z, out);
        }
        self.apply_dropout(mode, out);
    }

    /// Backward from `dout` (gradient of the loss wrt this block's output; it is
    /// overwritten as scratch). Writes this block's parameter gradient into `grad`
    /// (overwriting) and, if given, the gradient wrt `x` into `dx`.
    /// `x`, `cache` and `mode` must be those of the matching forward.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &[f32],
        x: ArrayView2<f32>,
        cache: &mut DenseCache,
        dout: &mut [f32],
        grad: &mut [f32],
        dx: Option<ArrayViewMut2<f32>>,
        mode: Mode,
    ) {
        let (o, i) = (self.spec.out_dim, self.spec.in_dim);
        let (w_grad, rest_grad) = grad[..self.param_len()].split_at_mut(o * i);
        let dz = self.backward_to_linear(params, x.nrows(), cache, dout, rest_grad, mode);
        gemm(1.0, dz.t(), x, 0.0, view_mut(w_grad, o, i));
        if let Some(dx) = dx {
            gemm(1.0, dz, view(&params[..o * i], o, i), 0.0, dx);
        }
    }

    /// [`Dense::backward`] that also updates the parameters, through `update`,
    /// instead of returning their gradient. The weight gradient goes from the
    /// GEMM's tiles straight to `update` and is never stored, when `update`
    /// takes it so and the batch is at most [`SINK_MAX_DEPTH`] rows; `grad`
    /// then needs room for the other parameters' gradient only
    /// ([`Dense::fused_gradient_len`]). Otherwise the weight gradient is
    /// stored after it, and `grad` must hold [`Dense::param_len`] values.
    /// `dx` is computed from the weights before the update.
    ///
    /// # Panics
    /// If `grad` is too short for the path taken.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_update<U: GradientSink>(
        &self,
        params: &mut [f32],
        x: ArrayView2<f32>,
        cache: &mut DenseCache,
        dout: &mut [f32],
        grad: &mut [f32],
        dx: Option<ArrayViewMut2<f32>>,
        mode: Mode,
        update: &mut U,
    ) {
        let (rows, o, i) = (x.nrows(), self.spec.out_dim, self.spec.in_dim);
        let (len, rest_len) = (self.param_len(), self.fused_gradient_len());
        let (rest_grad, w_grad) = grad.split_at_mut(rest_len);
        let dz = self.backward_to_linear(params, rows, cache, dout, rest_grad, mode);
        if let Some(dx) = dx {
            gemm(1.0, dz, view(&params[..o * i], o, i), 0.0, dx);
        }
        let (w, rest) = params[..len].split_at_mut(o * i);
        let weights_done = rows <= SINK_MAX_DEPTH
            && match update.weight_rows(0, w, i) {
                Some(sink) => {
                    gemm_to_sink(dz.t(), x, sink);
                    true
                }
                None => false,
            };
        if !weights_done {
            assert!(w_grad.len() >= o * i, "dense backward: no room to store the weight gradient");
            let w_grad = &mut w_grad[..o * i];
            gemm(1.0, dz.t(), x, 0.0, view_mut(w_grad, o, i));
            update.apply(0, w, w_grad);
        }
        update.apply(o * i, rest, rest_grad);
    }

    /// The gradient values [`Dense::backward_update`] stores when the weights'
    /// go straight to the update: the bias's and the norm's.
    pub fn fused_gradient_len(&self) -> usize {
        self.param_len() - self.spec.in_dim * self.spec.out_dim
    }

    /// The backward up to the linear map: dropout, activation and norm
    /// backward, turning `dout` into the gradient wrt `x W^T` (returned, a view
    /// of `dout`) and writing the bias's and the norm's gradients into
    /// `rest_grad` (laid out as the parameters after `W`).
    fn backward_to_linear<'d>(
        &self,
        params: &[f32],
        rows: usize,
        cache: &mut DenseCache,
        dout: &'d mut [f32],
        rest_grad: &mut [f32],
        mode: Mode,
    ) -> ArrayView2<'d, f32> {
        let o = self.spec.out_dim;
        let n = rows * o;
        let dy = &mut dout[..n];
        self.apply_dropout(mode, dy);
        let p = self.parts(params);
        let (g_b, g_norm) = rest_grad[..self.fused_gradient_len()].split_at_mut(o);
        if self.spec.norm == Norm::LayerNorm {
            // dy -> dz, with dgamma, dbeta and db, in one pass.
            let (g_gamma, g_beta) = g_norm.split_at_mut(o);
            let (xhat, rstd, scratch) = cache.norm_buffers(rows, o);
            let act = self.spec.activation;
            layer_norm::backward(xhat, rstd, p.gamma, p.beta, act, dy, g_gamma, g_beta, Some(g_b), scratch);
        } else {
            self.spec.activation.backward(&cache.pre_act[..n], dy);
            reduce::column_sums(dy, g_b);
        }
        view(dy, rows, o)
    }
}
