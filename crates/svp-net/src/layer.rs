//! One layer of a network, whatever its kind: forward, inference, backward and
//! update, and how a projection head reads its output.

use svp_alloc::OutOfMemory;
use svp_nn::mobile_block::{MobileBlock, MobileBlockCache, MobileBlockScratch};
use svp_nn::vit::{BlockCache, BlockScratch, PatchEmbed, TokenHead, TokenReadout, TransformerBlock};
use svp_nn::{ConvBlock, ConvBlockCache, ConvBlockScratch, Dense, DenseCache, Mode, Passes};
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
/// kind of layer, each sized for the largest of the layers it serves. A
/// training rule that keeps every layer's forward for its backward (backprop)
/// holds one per layer; SVP holds one per layer of a unit.
#[derive(Debug, Default)]
pub struct LayerCache {
    dense: DenseCache,
    conv: ConvBlockCache,
    mobile: MobileBlockCache,
    block: BlockCache,
    patches: Vec<f32>,
}

/// The buffers layers use only while one of their passes runs (gradients
/// inside a block, im2col columns): nothing in them outlives a call, so one
/// serves every layer of a network under any training rule.
#[derive(Debug, Default)]
pub struct LayerScratch {
    conv: ConvBlockScratch,
    mobile: MobileBlockScratch,
    block: BlockScratch,
}

/// The layers of each kind among `layers`.
#[derive(Default)]
struct ByKind<'a> {
    convs: Vec<&'a ConvBlock>,
    mobiles: Vec<&'a MobileBlock>,
    block: Option<svp_nn::vit::BlockSpec>,
    patches: usize,
    readout_width: usize,
    dense: Vec<&'a svp_nn::DenseSpec>,
}

impl<'a> ByKind<'a> {
    fn of(layers: impl IntoIterator<Item = Layer<'a>>, rows: usize) -> Self {
        let mut k = Self::default();
        for layer in layers {
            match layer {
                Layer::Conv(c) => k.convs.push(c),
                Layer::Mobile(m) => k.mobiles.push(m),
                Layer::Patch(p) => k.patches = k.patches.max(p.scratch_len(rows)),
                // A network's transformer blocks share one shape.
                Layer::Block(b) => k.block = Some(b.spec),
                Layer::Readout(r) => k.readout_width = k.readout_width.max(r.dim),
                Layer::Dense(d) => k.dense.push(d.spec()),
            }
        }
        k
    }
}

impl LayerCache {
    /// A cache that serves any one of `layers` at a time, for batches of up to `rows`.
    pub fn try_for<'a>(layers: impl IntoIterator<Item = Layer<'a>>, rows: usize) -> Result<Self, OutOfMemory> {
        let k = ByKind::of(layers, rows);
        let (norm_width, plain_width) = DenseCache::widths(k.dense);
        Ok(Self {
            dense: DenseCache::try_sized(rows, norm_width.max(k.readout_width), plain_width)?,
            conv: ConvBlockCache::try_new_for(k.convs, rows)?,
            mobile: MobileBlockCache::try_new_for(k.mobiles, rows)?,
            block: k.block.map_or(Ok(BlockCache::default()), |spec| BlockCache::try_new(&spec, rows))?,
            patches: svp_alloc::try_zeros(k.patches, "unfolded patches")?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.dense.bytes() + self.conv.bytes() + self.mobile.bytes() + self.block.bytes() + 4 * self.patches.len()
    }
}

impl LayerScratch {
    /// Training scratch that serves any of `layers`, for batches of up to `rows`.
    pub fn try_for<'a>(layers: impl IntoIterator<Item = Layer<'a>>, rows: usize) -> Result<Self, OutOfMemory> {
        Self::try_for_passes(layers, rows, Passes::Both)
    }

    /// Scratch for inference ([`Layer::infer`] only) through any of
    /// `layers`: the forward's buffers without the backward's.
    pub fn try_for_inference<'a>(
        layers: impl IntoIterator<Item = Layer<'a>>,
        rows: usize,
    ) -> Result<Self, OutOfMemory> {
        Self::try_for_passes(layers, rows, Passes::Forward)
    }

    fn try_for_passes<'a>(
        layers: impl IntoIterator<Item = Layer<'a>>,
        rows: usize,
        passes: Passes,
    ) -> Result<Self, OutOfMemory> {
        let k = ByKind::of(layers, rows);
        let block = |spec| BlockScratch::try_new_for(&spec, rows, passes);
        Ok(Self {
            conv: ConvBlockScratch::try_new_for(k.convs, rows, passes)?,
            mobile: MobileBlockScratch::try_new_for(k.mobiles, rows, passes)?,
            block: k.block.map_or(Ok(BlockScratch::default()), block)?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.conv.bytes() + self.mobile.bytes() + self.block.bytes()
    }
}

impl Layer<'_> {
    /// Forward over `rows` samples of `x` into `out`, filling `cache` (conv
    /// blocks in training also update their running statistics in `params`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        params: &mut [f32],
        x: &[f32],
        rows: usize,
        cache: &mut LayerCache,
        scratch: &mut LayerScratch,
        out: &mut [f32],
        mode: Mode,
    ) {
        match self {
            Layer::Conv(c) => c.forward(params, x, rows, &mut cache.conv, &mut scratch.conv, out, mode),
            Layer::Mobile(m) => m.forward(params, x, rows, &mut cache.mobile, &mut scratch.mobile, out, mode),
            Layer::Patch(p) => p.forward(params, x, rows, &mut cache.patches, out),
            Layer::Block(b) => b.forward(params, x, rows, &mut cache.block, &mut scratch.block, out),
            Layer::Readout(r) => r.forward(params, x, rows, &mut cache.dense, out),
            Layer::Dense(d) => d.forward(params, view(x, rows, d.spec().in_dim), &mut cache.dense, out, mode),
        }
    }

    /// Inference forward (no dropout, BatchNorm with running statistics).
    pub fn infer(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        cache: &mut LayerCache,
        scratch: &mut LayerScratch,
        out: &mut [f32],
    ) {
        match self {
            Layer::Conv(c) => c.infer(params, x, rows, &mut cache.conv, &mut scratch.conv, out),
            Layer::Mobile(m) => m.infer(params, x, rows, &mut cache.mobile, &mut scratch.mobile, out),
            Layer::Patch(p) => p.forward(params, x, rows, &mut cache.patches, out),
            Layer::Block(b) => b.forward(params, x, rows, &mut cache.block, &mut scratch.block, out),
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
        scratch: &mut LayerScratch,
        dout: &mut [f32],
        grad: &mut [f32],
        dx: Option<&mut [f32]>,
        mode: Mode,
    ) {
        match self {
            Layer::Conv(c) => c.backward(params, x, rows, &cache.conv, &mut scratch.conv, dout, grad, dx),
            Layer::Mobile(m) => m.backward(params, x, rows, &cache.mobile, &mut scratch.mobile, dout, grad, dx),
            Layer::Patch(p) => {
                assert!(dx.is_none(), "a patch embedding reads the input images: no input gradient");
                p.backward(x, rows, &mut cache.patches, dout, grad);
            }
            Layer::Block(b) => b.backward(params, rows, &cache.block, &mut scratch.block, dout, grad, dx),
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
        scratch: &mut LayerScratch,
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
                self.backward(params, x, rows, cache, scratch, dout, grad, dx, mode);
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
