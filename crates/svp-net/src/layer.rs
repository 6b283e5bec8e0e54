//! One layer of a network, whatever its kind: forward, inference, backward and
//! update, and how a projection head reads its output.

use svp_alloc::OutOfMemory;
use svp_nn::mobile_block::{MobileBlock, MobileBlockCache};
use svp_nn::vit::{BlockCache, PatchEmbed, TokenHead, TokenReadout, TransformerBlock};
use svp_nn::{ConvBlock, ConvBlockCache, Dense, DenseCache, Mode};
use svp_tensor::{GradientSink, view, view_mut};

/// One layer of a [`Network`](crate::Network).
#[derive(Clone, Copy, Debug)]
pub enum Layer<'a> {
    /// A conv block.
    Conv(&'a ConvBlock),
    /// A MobileNetV2 inverted residual block.
    Mobile(&'a MobileBlock),
    /// A ViT's patch embedding (always a network's first layer).
    Patch(&'a PatchEmbed),
    /// A transformer block.
    Block(&'a TransformerBlock),
    /// A ViT's readout token, layer-normalized.
    Readout(&'a TokenHead),
    /// A dense block or the head.
    Dense(&'a Dense),
}

/// What layers' backward passes need from their forward passes: one part per
/// kind of layer, each sized for the largest of the layers it serves.
#[derive(Debug, Default)]
pub struct LayerCache {
    dense: DenseCache,
    conv: ConvBlockCache,
    mobile: MobileBlockCache,
    block: BlockCache,
    patches: Vec<f32>,
}

impl LayerCache {
    /// A cache that serves any one of `layers` at a time, for batches of up to `rows`.
    pub fn try_for<'a>(layers: impl IntoIterator<Item = Layer<'a>>, rows: usize) -> Result<Self, OutOfMemory> {
        let (mut convs, mut mobiles, mut block, mut patches, mut readout_width, mut dense) =
            (Vec::new(), Vec::new(), None, 0, 0, Vec::new());
        for layer in layers {
            match layer {
                Layer::Conv(c) => convs.push(c),
                Layer::Mobile(m) => mobiles.push(m),
                Layer::Patch(p) => patches = patches.max(p.scratch_len(rows)),
                Layer::Block(b) => block = Some(b.spec),
                Layer::Readout(r) => readout_width = readout_width.max(r.dim),
                Layer::Dense(d) => dense.push(d.spec()),
            }
        }
        let (norm_width, plain_width) = DenseCache::widths(dense);
        Ok(Self {
            dense: DenseCache::try_sized(rows, norm_width.max(readout_width), plain_width)?,
            conv: ConvBlockCache::try_new_for(convs, rows)?,
            mobile: MobileBlockCache::try_new_for(mobiles, rows)?,
            block: block.map_or(Ok(BlockCache::default()), |spec| BlockCache::try_new(&spec, rows))?,
            patches: svp_alloc::try_zeros(patches, "unfolded patches")?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.dense.bytes() + self.conv.bytes() + self.mobile.bytes() + self.block.bytes() + 4 * self.patches.len()
    }
}

impl Layer<'_> {
    /// Forward over `rows` samples of `x` into `out`, filling `cache` (conv
    /// blocks in training also update their running statistics in `params`).
    pub fn forward(
        &self,
        params: &mut [f32],
        x: &[f32],
        rows: usize,
        cache: &mut LayerCache,
        out: &mut [f32],
        mode: Mode,
    ) {
        match self {
            Layer::Conv(c) => c.forward(params, x, rows, &mut cache.conv, out, mode),
            Layer::Mobile(m) => m.forward(params, x, rows, &mut cache.mobile, out, mode),
            Layer::Patch(p) => p.forward(params, x, rows, &mut cache.patches, out),
            Layer::Block(b) => b.forward(params, x, rows, &mut cache.block, out),
            Layer::Readout(r) => r.forward(params, x, rows, &mut cache.dense, out),
            Layer::Dense(d) => d.forward(params, view(x, rows, d.spec().in_dim), &mut cache.dense, out, mode),
        }
    }

    /// Inference forward (no dropout, BatchNorm with running statistics).
    pub fn infer(&self, params: &[f32], x: &[f32], rows: usize, cache: &mut LayerCache, out: &mut [f32]) {
        match self {
            Layer::Conv(c) => c.infer(params, x, rows, &mut cache.conv, out),
            Layer::Mobile(m) => m.infer(params, x, rows, &mut cache.mobile, out),
            Layer::Patch(p) => p.forward(params, x, rows, &mut cache.patches, out),
            Layer::Block(b) => b.forward(params, x, rows, &mut cache.block, out),
            Layer::Readout(r) => r.forward(params, x, rows, &mut cache.dense, out),
            Layer::Dense(d) => d.forward(params, view(x, rows, d.spec().in_dim), &mut cache.dense, out, Mode::Infer),
        }
    }

    /// Backward of [`Layer::forward`] from `dout` (overwritten as scratch):
    /// the trained parameters' gradient into `grad`, and the input gradient
    /// into `dx` if given (a patch embedding has none: it reads the images).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        cache: &mut LayerCache,
        dout: &mut [f32],
        grad: &mut [f32],
        dx: Option<&mut [f32]>,
        mode: Mode,
    ) {
        match self {
            Layer::Conv(c) => c.backward(params, x, rows, &mut cache.conv, dout, grad, dx),
            Layer::Mobile(m) => m.backward(params, x, rows, &mut cache.mobile, dout, grad, dx),
            Layer::Patch(p) => {
                assert!(dx.is_none(), "a patch embedding reads the input images: no input gradient");
                p.backward(x, rows, &mut cache.patches, dout, grad);
            }
            Layer::Block(b) => b.backward(params, rows, &mut cache.block, dout, grad, dx),
            Layer::Readout(r) => r.backward(params, rows, &mut cache.dense, dout, grad, dx),
            Layer::Dense(d) => {
                let d_in = d.spec().in_dim;
                let dx = dx.map(|dx| view_mut(dx, rows, d_in));
                d.backward(params, view(x, rows, d_in), &mut cache.dense, dout, grad, dx, mode)
            }
        }
    }

    /// [`Layer::backward`] followed by the update of the layer's first
    /// `trainable` parameters through `update`: a dense block hands its weight
    /// gradient from the GEMM straight to `update` ([`Dense::backward_update`];
    /// `grad` needs room for the rest only), other layers store their whole
    /// gradient in `grad` first ([`Network::max_stored_gradient_len`](crate::Network::max_stored_gradient_len) sizes it).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_update<U: GradientSink>(
        &self,
        params: &mut [f32],
        trainable: usize,
        x: &[f32],
        rows: usize,
        cache: &mut LayerCache,
        dout: &mut [f32],
        grad: &mut [f32],
        dx: Option<&mut [f32]>,
        mode: Mode,
        update: &mut U,
    ) {
        match self {
            Layer::Dense(d) => {
                assert_eq!(trainable, d.param_len(), "a dense block's parameters are all trainable");
                let d_in = d.spec().in_dim;
                let dx = dx.map(|dx| view_mut(dx, rows, d_in));
                d.backward_update(params, view(x, rows, d_in), &mut cache.dense, dout, grad, dx, mode, update);
            }
            _ => {
                let grad = &mut grad[..trainable];
                self.backward(params, x, rows, cache, dout, grad, dx, mode);
                update.apply(0, &mut params[..trainable], grad);
            }
        }
    }

    /// How a projection head reads this layer's output, if not as it is.
    pub fn readout(&self) -> Readout {
        match self {
            Layer::Conv(c) => Readout::Pool(c.readout()),
            Layer::Mobile(m) => Readout::Pool(m.readout()),
            Layer::Block(b) => Readout::Token { tokens: b.spec.tokens, dim: b.spec.dim },
            _ => Readout::Whole,
        }
    }
}

/// How a projection head (SVP's local loss, an early exit) reads a layer's output.
#[derive(Clone, Copy, Debug)]
pub enum Readout {
    /// The output itself.
    Whole,
    /// A conv block's adaptive average pooling.
    Pool(svp_nn::conv::Pool2d),
    /// A transformer block's readout token (the network's [`TokenReadout`]).
    Token {
        /// Tokens per sample.
        tokens: usize,
        /// Token width.
        dim: usize,
    },
}

impl Readout {
    /// Values per sample read from a layer output of `out_len`.
    pub fn len(&self, out_len: usize) -> usize {
        match self {
            Readout::Whole => out_len,
            Readout::Pool(p) => p.output().len(),
            Readout::Token { dim, .. } => *dim,
        }
    }

    /// What a head reads from `h` (`rows` samples of `out_len`): `h` itself,
    /// or the pooled or token readout written into `buf`.
    pub fn read<'a>(
        &self,
        h: &'a [f32],
        rows: usize,
        out_len: usize,
        token: TokenReadout,
        buf: &'a mut [f32],
    ) -> &'a [f32] {
        match self {
            Readout::Whole => &h[..rows * out_len],
            Readout::Pool(p) => {
                p.forward(h, rows, buf);
                &buf[..rows * p.output().len()]
            }
            Readout::Token { tokens, dim } => {
                token.forward(h, rows, *tokens, *dim, buf);
                &buf[..rows * dim]
            }
        }
    }

    /// The gradient wrt `h` (into `dh`, overwriting) from the gradient wrt the readout.
    pub fn backward(
        &self,
        h: &[f32],
        rows: usize,
        out_len: usize,
        token: TokenReadout,
        d_read: &[f32],
        dh: &mut [f32],
    ) {
        match self {
            Readout::Whole => dh[..rows * out_len].copy_from_slice(&d_read[..rows * out_len]),
            Readout::Pool(p) => p.backward(h, rows, d_read, dh),
            Readout::Token { tokens, dim } => token.backward(d_read, rows, *tokens, *dim, dh),
        }
    }
}
