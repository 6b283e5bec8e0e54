//! The dense block: `out = dropout(act(norm(x W^T + b)))`.

use crate::Activation;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use svp_rng::{Purpose, Stream, StreamKey, drop_threshold};
use svp_tensor::{ArrayView2, ArrayViewMut2, for_each_row_mut, gemm, reduce, view, view_mut};

/// LayerNorm's variance epsilon (PyTorch's default).
pub const LAYER_NORM_EPS: f32 = 1e-5;

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
    pre_act: Vec<f32>,
    xhat: Vec<f32>,
    rstd: Vec<f32>,
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
        Ok(Self {
            pre_act: svp_alloc::try_zeros(max_rows * max_width, "a layer's pre-activations")?,
            xhat: svp_alloc::try_zeros(max_rows * max_width, "a layer's normalized inputs")?,
            rstd: svp_alloc::try_zeros(max_rows, "a layer's LayerNorm statistics")?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.pre_act.len() + self.xhat.len() + self.rstd.len())
    }

    /// The LayerNorm buffers for `rows x width` (other layers that normalize
    /// rows keep their statistics here too).
    pub(crate) fn xhat_rstd(&mut self, rows: usize, width: usize) -> (&mut [f32], &mut [f32]) {
        (&mut self.xhat[..rows * width], &mut self.rstd[..rows])
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
        // z = x W^T + b, into the buffer LayerNorm normalizes in place.
        let z = if self.spec.norm == Norm::LayerNorm { &mut cache.xhat[..n] } else { &mut cache.pre_act[..n] };
        for row in z.chunks_exact_mut(o) {
            row.copy_from_slice(p.b);
        }
        gemm(1.0, x, w.t(), 1.0, view_mut(z, rows, o));
        if self.spec.norm == Norm::LayerNorm {
            layer_norm_forward(&mut cache.xhat[..n], &mut cache.rstd[..rows], &mut cache.pre_act[..n], p.gamma, p.beta);
        }
        self.spec.activation.forward(&cache.pre_act[..n], &mut out[..n]);
        self.apply_dropout(mode, &mut out[..n]);
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
        cache: &DenseCache,
        dout: &mut [f32],
        grad: &mut [f32],
        dx: Option<ArrayViewMut2<f32>>,
        mode: Mode,
    ) {
        let (rows, o, i) = (x.nrows(), self.spec.out_dim, self.spec.in_dim);
        let n = rows * o;
        let dy = &mut dout[..n];
        self.apply_dropout(mode, dy);
        self.spec.activation.backward(&cache.pre_act[..n], dy);
        let p = self.parts(params);
        let g = self.parts_mut(&mut grad[..self.param_len()]);
        if self.spec.norm == Norm::LayerNorm {
            layer_norm_backward(&cache.xhat[..n], &cache.rstd[..rows], p.gamma, dy, g.gamma, g.beta);
        }
        let dz = view(dy, rows, o);
        gemm(1.0, dz.t(), x, 0.0, view_mut(g.w, o, i));
        reduce::column_sums(dy, g.b);
        if let Some(dx) = dx {
            gemm(1.0, view(dy, rows, o), view(p.w, o, i), 0.0, dx);
        }
    }
}

/// Rows per rayon task in the LayerNorm loops (a task below ~32k elements
/// costs more to schedule than it saves).
fn rows_per_task(d: usize) -> usize {
    (svp_tensor::PARALLEL_MIN_ELEMS / 4 / d.max(1)).max(1)
}

/// Normalizes each row of `z` in place (leaving `xhat`), writes `1/std` per row
/// into `rstd` and `y = gamma * xhat + beta`.
pub(crate) fn layer_norm_forward(z: &mut [f32], rstd: &mut [f32], y: &mut [f32], gamma: &[f32], beta: &[f32]) {
    let d = gamma.len();
    let inv_d = 1.0 / d as f32;
    z.par_chunks_mut(d).zip(rstd.par_iter_mut()).zip(y.par_chunks_mut(d)).with_min_len(rows_per_task(d)).for_each(
        |((row, r), y_row)| {
            let mean = reduce::sum(row) * inv_d;
            let var = reduce::sum_sq_dev(row, mean) * inv_d;
            *r = 1.0 / (var + LAYER_NORM_EPS).sqrt();
            for (((v, yv), &g), &b) in row.iter_mut().zip(y_row.iter_mut()).zip(gamma).zip(beta) {
                *v = (*v - mean) * *r;
                *yv = g * *v + b;
            }
        },
    );
}

/// LayerNorm backward: accumulates `dgamma`, `dbeta` (overwriting) and turns
/// `dy` (gradient wrt `y`) into the gradient wrt the normalized input, in place.
pub(crate) fn layer_norm_backward(
    xhat: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    dy: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let d = gamma.len();
    reduce::column_sums_with_product(dy, xhat, dbeta, dgamma);
    let inv_d = 1.0 / d as f32;
    dy.par_chunks_mut(d).zip(xhat.par_chunks(d)).zip(rstd.par_iter()).with_min_len(rows_per_task(d)).for_each(
        |((row, x_row), &r)| {
            row.iter_mut().zip(gamma).for_each(|(v, &g)| *v *= g);
            let mean_dxhat = reduce::sum(row) * inv_d;
            let mean_dxhat_x = reduce::dot(row, x_row) * inv_d;
            for (v, &x) in row.iter_mut().zip(x_row) {
                *v = r * (*v - mean_dxhat - x * mean_dxhat_x);
            }
        },
    );
}
