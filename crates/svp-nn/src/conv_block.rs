//! The convolutional block of a VGG-style network:
//! `out = [maxpool2x2](relu(batchnorm(conv3x3(x))))`.

use crate::conv::{BatchNorm2d, BnActivation, Chw, Conv2d, Pool2d, PoolKind};
use crate::{Mode, Passes};
use serde::{Deserialize, Serialize};
use svp_alloc::{OutOfMemory, try_zeros};
use svp_rng::{Purpose, Stream, StreamKey};

/// Shape and kind of a convolutional block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvBlockSpec {
    /// Input channels.
    pub in_channels: usize,
    /// Input height.
    pub in_h: usize,
    /// Input width.
    pub in_w: usize,
    /// Output channels.
    pub out_channels: usize,
    /// 2x2 max pooling (stride 2) after the activation.
    pub pool: bool,
    /// Side of the adaptive average pooling that reads the block's output out
    /// for a projection head (see [`ConvBlock::readout`]).
    pub readout: usize,
}

impl ConvBlockSpec {
    /// Input shape of one sample.
    pub fn input(&self) -> Chw {
        Chw { c: self.in_channels, h: self.in_h, w: self.in_w }
    }
}

/// What a block's backward needs from its forward, for up to a given batch:
/// kept per block between the two passes (backprop holds one per block).
#[derive(Debug, Default)]
pub struct ConvBlockCache {
    /// BatchNorm's normalized input.
    xhat: Vec<f32>,
    /// The activation before pooling (blocks without pooling keep none).
    act: Vec<f32>,
    /// BatchNorm's `1/std` and mean per channel.
    bn_stats: Vec<f32>,
}

/// Buffers a block uses only while one of its passes runs, for up to a given
/// batch: nothing in them outlives the call, so one serves every block of a
/// network, under any training rule.
#[derive(Debug, Default)]
pub struct ConvBlockScratch {
    /// The gradient before pooling, turned in place into the conv output's
    /// (blocks with pooling), or the conv output's (blocks without).
    d_act: Vec<f32>,
    d_conv: Vec<f32>,
    /// One group of samples' im2col columns (or Winograd tiles) and their gradient.
    col: Vec<f32>,
    dcol: Vec<f32>,
}

/// The largest sizes, per sample or in all, that a set of blocks needs.
#[derive(Default)]
struct BlockSizes {
    plane: usize,
    pooled: usize,
    unpooled: usize,
    col: usize,
    channels: usize,
}

impl BlockSizes {
    fn of<'a>(blocks: impl IntoIterator<Item = &'a ConvBlock>) -> Self {
        let mut s = Self::default();
        for b in blocks {
            let len = b.conv.output().len();
            s.plane = s.plane.max(len);
            if b.pool.is_some() {
                s.pooled = s.pooled.max(len);
            } else {
                s.unpooled = s.unpooled.max(len);
            }
            s.col = s.col.max(b.conv.col_len());
            s.channels = s.channels.max(b.conv.c_out);
        }
        s
    }
}

impl ConvBlockCache {
    /// A cache for `block` and batches of up to `max_rows` samples.
    pub fn try_new(block: &ConvBlock, max_rows: usize) -> Result<Self, OutOfMemory> {
        Self::try_new_for([block], max_rows)
    }

    /// One cache that serves each of `blocks` (one at a time), for batches of
    /// up to `max_rows` samples.
    pub fn try_new_for<'a>(
        blocks: impl IntoIterator<Item = &'a ConvBlock>,
        max_rows: usize,
    ) -> Result<Self, OutOfMemory> {
        let s = BlockSizes::of(blocks);
        Ok(Self {
            xhat: try_zeros(max_rows * s.plane, "a conv block's normalized values")?,
            act: try_zeros(max_rows * s.pooled, "a conv block's activations before pooling")?,
            bn_stats: try_zeros(2 * s.channels, "a conv block's BatchNorm statistics")?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.xhat.len() + self.act.len() + self.bn_stats.len())
    }
}

impl ConvBlockScratch {
    /// Training scratch for `block` and batches of up to `max_rows` samples.
    pub fn try_new(block: &ConvBlock, max_rows: usize) -> Result<Self, OutOfMemory> {
        Self::try_new_for([block], max_rows, Passes::Both)
    }

    /// Scratch that serves each of `blocks` in `passes`, for batches of up
    /// to `max_rows` samples (the forward needs the columns only).
    pub fn try_new_for<'a>(
        blocks: impl IntoIterator<Item = &'a ConvBlock>,
        max_rows: usize,
        passes: Passes,
    ) -> Result<Self, OutOfMemory> {
        let s = BlockSizes::of(blocks);
        if passes == Passes::Forward {
            return Ok(Self { col: try_zeros(s.col, "im2col columns")?, ..Self::default() });
        }
        Ok(Self {
            // With pooling, the gradient wrt the activation before pooling,
            // which BatchNorm's backward turns in place into the conv
            // output's; without, BatchNorm's backward reads the block's
            // output gradient (the caller's) and writes `d_conv`.
            d_act: try_zeros(max_rows * s.pooled, "a conv block's backward scratch")?,
            d_conv: try_zeros(max_rows * s.unpooled, "a conv block's backward scratch")?,
            col: try_zeros(s.col, "im2col columns")?,
            dcol: try_zeros(s.col, "im2col column gradients")?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.d_act.len() + self.d_conv.len() + self.col.len() + self.dcol.len())
    }
}

/// A conv block; its parameters live in a slice the caller owns, laid out
/// `[W (c_out x c_in*3*3) | b (c_out) | gamma (c_out) | beta (c_out) |
/// running mean (c_out) | running var (c_out)]`. Only the first
/// [`ConvBlock::trainable_len`] values are trained; the running statistics
/// follow the batches and serve inference.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvBlock {
    spec: ConvBlockSpec,
    layer: u64,
    conv: Conv2d,
    bn: BatchNorm2d,
    pool: Option<Pool2d>,
}

impl ConvBlock {
    /// Block `layer` (its index keys its weight initialization).
    pub fn new(spec: ConvBlockSpec, layer: u64) -> Self {
        let conv = Conv2d { input: spec.input(), c_out: spec.out_channels, k: 3, stride: 1, padding: 1 };
        let bn = BatchNorm2d { shape: conv.output(), momentum: 0.1, activation: BnActivation::Relu };
        let pool = spec.pool.then(|| Pool2d::fixed(conv.output(), PoolKind::Max, 2, 2));
        Self { spec, layer, conv, bn, pool }
    }

    /// Shape and kind.
    pub fn spec(&self) -> &ConvBlockSpec {
        &self.spec
    }

    /// Shape of one output sample.
    pub fn output(&self) -> Chw {
        self.pool.map_or(self.conv.output(), |p| p.output())
    }

    /// The adaptive average pooling that summarizes the block's output for a
    /// projection head: `channels x readout x readout` values per sample
    /// (no larger than the output itself).
    pub fn readout(&self) -> Pool2d {
        let o = self.output();
        Pool2d::adaptive(o, self.spec.readout.min(o.h), self.spec.readout.min(o.w))
    }

    /// Number of f32 parameters, running statistics included.
    pub fn param_len(&self) -> usize {
        self.trainable_len() + 2 * self.spec.out_channels
    }

    /// Number of trained parameters (the running statistics follow them).
    pub fn trainable_len(&self) -> usize {
        self.conv.param_len() + self.bn.param_len()
    }

    /// PyTorch's default initialization (Kaiming-uniform with `a = sqrt(5)`,
    /// i.e. W and b uniform in `±1/sqrt(fan_in)`), BatchNorm gain 1, bias 0,
    /// running mean 0, variance 1. Drawn from the stream `(seed, WeightInit, layer)`.
    pub fn init_params(&self, seed: u64, params: &mut [f32]) {
        let conv_len = self.conv.param_len();
        let bound = 1.0 / ((self.spec.in_channels * 9) as f64).sqrt();
        let mut stream = Stream::new(StreamKey::new(seed, Purpose::WeightInit, self.layer, 0, 0));
        for v in &mut params[..conv_len] {
            *v = ((2.0 * stream.uniform() - 1.0) * bound) as f32;
        }
        let c = self.spec.out_channels;
        let (bn, running) = params[conv_len..self.param_len()].split_at_mut(2 * c);
        bn[..c].fill(1.0);
        bn[c..].fill(0.0);
        self.bn.init_running(running);
    }

    /// Forward over `rows` samples of `x` into `out`, filling `cache` for
    /// [`ConvBlock::backward`]. In training BatchNorm uses (and the running
    /// statistics in `params` follow) the batch statistics.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        params: &mut [f32],
        x: &[f32],
        rows: usize,
        cache: &mut ConvBlockCache,
        scratch: &mut ConvBlockScratch,
        out: &mut [f32],
        mode: Mode,
    ) {
        if mode == Mode::Infer {
            return self.infer(params, x, rows, cache, scratch, out);
        }
        let (conv_p, rest) = params.split_at_mut(self.conv.param_len());
        let (bn_p, running) = rest.split_at_mut(self.bn.param_len());
        self.run(conv_p, x, rows, cache, scratch, out, |z_then_xhat, act, stats| {
            self.bn.forward_train(bn_p, running, z_then_xhat, rows, act, stats);
        });
    }

    /// Inference forward (BatchNorm with the running statistics); `cache` is scratch too.
    pub fn infer(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        cache: &mut ConvBlockCache,
        scratch: &mut ConvBlockScratch,
        out: &mut [f32],
    ) {
        let (conv_p, rest) = params.split_at(self.conv.param_len());
        let (bn_p, running) = rest.split_at(self.bn.param_len());
        self.run(conv_p, x, rows, cache, scratch, out, |z, act, _| self.bn.forward_infer(bn_p, running, z, rows, act));
    }

    /// The convolution into the cache's `xhat`, `normalize(conv output then
    /// xhat, activation, statistics)` (BatchNorm and ReLU), then pooling
    /// into `out`. The activation is `out` itself when no pooling follows,
    /// else the cache's (the pooling's backward reads it).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        conv_p: &[f32],
        x: &[f32],
        rows: usize,
        cache: &mut ConvBlockCache,
        scratch: &mut ConvBlockScratch,
        out: &mut [f32],
        normalize: impl FnOnce(&mut [f32], &mut [f32], &mut [f32]),
    ) {
        let plane = rows * self.conv.output().len();
        let c = cache;
        self.conv.forward(conv_p, x, rows, &mut c.xhat[..plane], &mut scratch.col);
        let act = if self.pool.is_some() { &mut c.act[..plane] } else { &mut out[..plane] };
        normalize(&mut c.xhat[..plane], act, &mut c.bn_stats);
        if let Some(pool) = &self.pool {
            pool.forward(&c.act[..plane], rows, out);
        }
    }

    /// Backward from `dout` (gradient wrt this block's output) after a training
    /// forward of the same `x`: the gradient of the trained parameters into
    /// `grad` (overwriting; [`ConvBlock::trainable_len`] values) and, if given,
    /// the gradient wrt `x` into `dx`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        cache: &ConvBlockCache,
        scratch: &mut ConvBlockScratch,
        dout: &[f32],
        grad: &mut [f32],
        dx: Option<&mut [f32]>,
    ) {
        let conv_len = self.conv.param_len();
        let plane = rows * self.conv.output().len();
        let (c, s) = (cache, scratch);
        let bn_p = &params[conv_len..conv_len + self.bn.param_len()];
        // BatchNorm's backward applies the ReLU's mask itself.
        let (g_conv, g_bn) = grad[..self.trainable_len()].split_at_mut(conv_len);
        let d_conv = match &self.pool {
            Some(pool) => {
                let d = &mut s.d_act[..plane];
                pool.backward(&c.act[..plane], rows, dout, d);
                self.bn.backward_in_place(bn_p, &c.xhat[..plane], &c.bn_stats, rows, d, g_bn);
                d
            }
            None => {
                let d = &mut s.d_conv[..plane];
                self.bn.backward(bn_p, &c.xhat[..plane], &c.bn_stats, rows, &dout[..plane], g_bn, d);
                d
            }
        };
        self.conv.backward(&params[..conv_len], x, rows, d_conv, g_conv, dx, &mut s.col, &mut s.dcol);
    }
}
