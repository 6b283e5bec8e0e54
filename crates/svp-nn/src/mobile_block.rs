//! MobileNetV2's inverted residual block, on svp's conv layers:
//! `expand` (1x1 conv + BatchNorm + ReLU6, left out when the expansion is 1),
//! `depthwise` (3x3, stride 1 or 2, + BatchNorm + ReLU6), `project` (1x1
//! conv + BatchNorm, linear), and the input added back when the shapes allow
//! (stride 1, as many channels out as in).
//!
//! Its API is a [`ConvBlock`](crate::ConvBlock)'s: one parameter slice with
//! the running statistics last, training and inference forwards, a backward
//! with an optional input gradient, and the readout a projection head reads.
//! Each ReLU6 is fused into the BatchNorm before it (its mask recomputed
//! from BatchNorm's normalized values), and each BatchNorm normalizes its
//! conv's output in place, so a stage keeps two activation-sized buffers
//! (normalized values and activation) rather than four.

use crate::conv::{BatchNorm2d, BnActivation, Chw, Conv2d, Pool2d};
use crate::depthwise::DepthwiseConv2d;
use crate::{Mode, Passes};
use rayon::prelude::*;
use std::ops::Range;
use svp_alloc::{OutOfMemory, try_zeros};
use svp_rng::{Purpose, Stream, StreamKey};

/// Shape of an inverted residual block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MobileBlockSpec {
    /// Input shape.
    pub input: Chw,
    /// Output channels.
    pub out_channels: usize,
    /// Hidden channels per input channel (MobileNetV2: 6; 1 means no expand).
    pub expansion: usize,
    /// The depthwise convolution's stride: 1 or 2.
    pub stride: usize,
    /// Side of the adaptive average pooling that reads the block's output
    /// for a projection head (see [`MobileBlock::readout`]).
    pub readout: usize,
}

/// An inverted residual block. Its parameters live in a slice the caller
/// owns: the trained ones first (expand conv, its BatchNorm's gain and
/// shift, depthwise conv, its BatchNorm, project conv, its BatchNorm; each
/// conv `[W | b]`), then the three BatchNorms' running mean and variance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MobileBlock {
    spec: MobileBlockSpec,
    layer: u64,
    expand: Option<(Conv2d, BatchNorm2d)>,
    depthwise: (DepthwiseConv2d, BatchNorm2d),
    project: (Conv2d, BatchNorm2d),
}

/// Consecutive ranges of the given lengths.
fn ranges<const N: usize>(start: usize, lens: [usize; N]) -> [Range<usize>; N] {
    let mut at = start;
    lens.map(|n| {
        at += n;
        at - n..at
    })
}

impl MobileBlock {
    /// Block `layer` (its index keys its weight initialization).
    pub fn new(spec: MobileBlockSpec, layer: u64) -> Self {
        let bn = |shape, activation| BatchNorm2d { shape, momentum: 0.1, activation };
        let hidden = Chw { c: spec.input.c * spec.expansion, ..spec.input };
        let expand = (spec.expansion != 1).then(|| {
            let conv = Conv2d { input: spec.input, c_out: hidden.c, k: 1, stride: 1, padding: 0 };
            (conv, bn(hidden, BnActivation::Relu6))
        });
        let dw = DepthwiseConv2d { input: hidden, k: 3, stride: spec.stride, padding: 1 };
        let dw_out = dw.output();
        let project = Conv2d { input: dw_out, c_out: spec.out_channels, k: 1, stride: 1, padding: 0 };
        let project = (project, bn(project.output(), BnActivation::Identity));
        Self { spec, layer, expand, depthwise: (dw, bn(dw_out, BnActivation::Relu6)), project }
    }

    /// Shape and kind.
    pub fn spec(&self) -> &MobileBlockSpec {
        &self.spec
    }

    /// Output shape.
    pub fn output(&self) -> Chw {
        self.project.0.output()
    }

    /// Whether the input is added to the output.
    pub fn residual(&self) -> bool {
        self.spec.stride == 1 && self.spec.input.c == self.spec.out_channels
    }

    /// The adaptive average pooling that summarizes the block's output for a
    /// projection head (no larger than the output itself).
    pub fn readout(&self) -> Pool2d {
        let o = self.output();
        Pool2d::adaptive(o, self.spec.readout.min(o.h), self.spec.readout.min(o.w))
    }

    /// The three BatchNorms (the expand's absent at expansion 1).
    fn norms(&self) -> [Option<BatchNorm2d>; 3] {
        [self.expand.map(|(_, b)| b), Some(self.depthwise.1), Some(self.project.1)]
    }

    /// Trained parameter ranges: expand conv, its BatchNorm, depthwise, its
    /// BatchNorm, project conv, its BatchNorm.
    fn trained(&self) -> [Range<usize>; 6] {
        let (e, eb) = self.expand.map_or((0, 0), |(c, b)| (c.param_len(), b.param_len()));
        let (dw, dwb) = (self.depthwise.0.param_len(), self.depthwise.1.param_len());
        ranges(0, [e, eb, dw, dwb, self.project.0.param_len(), self.project.1.param_len()])
    }

    /// Running statistics' ranges, one per BatchNorm, after the trained ones.
    fn running(&self) -> [Range<usize>; 3] {
        ranges(self.trainable_len(), self.norms().map(|b| b.map_or(0, |b| b.param_len())))
    }

    /// Number of trained parameters (the running statistics follow them).
    pub fn trainable_len(&self) -> usize {
        self.trained()[5].end
    }

    /// Number of f32 parameters, running statistics included.
    pub fn param_len(&self) -> usize {
        self.running()[2].end
    }

    /// PyTorch's default initialization (each conv's W and b uniform in
    /// `±1/sqrt(fan_in)`; a depthwise filter's fan-in is its 9 taps),
    /// BatchNorm gain 1, shift 0, running mean 0, variance 1. Drawn from the
    /// stream `(seed, WeightInit, layer)`.
    pub fn init_params(&self, seed: u64, params: &mut [f32]) {
        let mut stream = Stream::new(StreamKey::new(seed, Purpose::WeightInit, self.layer, 0, 0));
        let t = self.trained();
        let fan_ins = [self.spec.input.c, 9, self.project.0.input.c];
        for (range, fan_in) in [t[0].clone(), t[2].clone(), t[4].clone()].into_iter().zip(fan_ins) {
            let bound = 1.0 / (fan_in as f64).sqrt();
            for v in &mut params[range] {
                *v = ((2.0 * stream.uniform() - 1.0) * bound) as f32;
            }
        }
        for ((bn, gamma_beta), running) in self.norms().into_iter().zip([&t[1], &t[3], &t[5]]).zip(self.running()) {
            if let Some(bn) = bn {
                let (gamma, beta) = params[gamma_beta.clone()].split_at_mut(bn.shape.c);
                gamma.fill(1.0);
                beta.fill(0.0);
                bn.init_running(&mut params[running]);
            }
        }
    }
}

/// What a block's backward needs from its training forward, for batches
/// of up to `max_rows` samples: kept per block between the two passes
/// (backprop holds one per block).
#[derive(Debug, Default)]
pub struct MobileBlockCache {
    max_rows: usize,
    /// Per stage (expand, depthwise, project): the conv output, normalized
    /// in place into BatchNorm's `xhat`, and BatchNorm's statistics.
    xhat: [Vec<f32>; 3],
    stats: [Vec<f32>; 3],
    /// The ReLU6 outputs of expand and depthwise (the next stage's input),
    /// written by their BatchNorm with ReLU6 fused in.
    act: [Vec<f32>; 2],
}

/// Buffers a block uses only while one of its passes runs: nothing in them
/// outlives the call, so one serves every block of a network.
#[derive(Debug, Default)]
pub struct MobileBlockScratch {
    /// `d_a` the project stage's output gradient, then the expand stage's;
    /// `d_b` the depthwise stage's (BatchNorm's backward runs in place in each).
    d_a: Vec<f32>,
    d_b: Vec<f32>,
    /// One group of samples' im2col columns and their gradient (1x1 convs).
    col: Vec<f32>,
    dcol: Vec<f32>,
}

/// The largest sizes that a set of blocks needs, per stage (expand,
/// depthwise, project): values per sample and channels.
struct StageSizes {
    values: [usize; 3],
    channels: [usize; 3],
    col: usize,
}

impl StageSizes {
    fn of<'a>(blocks: impl IntoIterator<Item = &'a MobileBlock>) -> Self {
        // The expand stage's only over blocks that have one.
        let (mut values, mut channels, mut col) = ([0usize; 3], [0usize; 3], 0);
        for b in blocks {
            let hidden = b.depthwise.0.input;
            let expanded = if b.expand.is_some() { hidden } else { Chw { c: 0, h: 0, w: 0 } };
            let these = [expanded.len(), b.depthwise.0.output().len(), b.output().len()];
            let chans = [expanded.c, hidden.c, b.spec.out_channels];
            for i in 0..3 {
                values[i] = values[i].max(these[i]);
                channels[i] = channels[i].max(chans[i]);
            }
            col = col.max(b.expand.map_or(0, |(c, _)| c.col_len())).max(b.project.0.col_len());
        }
        Self { values, channels, col }
    }
}

impl MobileBlockCache {
    /// A cache for `block` and up to `max_rows` samples, or the allocation
    /// that did not fit (before any of it is written).
    pub fn try_new(block: &MobileBlock, max_rows: usize) -> Result<Self, OutOfMemory> {
        Self::try_new_for([block], max_rows)
    }

    /// One cache that serves each of `blocks` (one at a time), for batches of
    /// up to `max_rows` samples.
    pub fn try_new_for<'a>(
        blocks: impl IntoIterator<Item = &'a MobileBlock>,
        max_rows: usize,
    ) -> Result<Self, OutOfMemory> {
        let s = StageSizes::of(blocks);
        let floats = |stage: usize| s.values[stage] * max_rows;
        let per_stage = |what| -> Result<[Vec<f32>; 3], OutOfMemory> {
            Ok([try_zeros(floats(0), what)?, try_zeros(floats(1), what)?, try_zeros(floats(2), what)?])
        };
        let stats = "a mobile block's BatchNorm statistics";
        Ok(Self {
            max_rows,
            xhat: per_stage("a mobile block's normalized values")?,
            stats: [
                try_zeros(2 * s.channels[0], stats)?,
                try_zeros(2 * s.channels[1], stats)?,
                try_zeros(2 * s.channels[2], stats)?,
            ],
            act: [
                try_zeros(floats(0), "a mobile block's activations")?,
                try_zeros(floats(1), "a mobile block's activations")?,
            ],
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let stages: usize = [&self.xhat, &self.stats].iter().flat_map(|s| s.iter()).map(Vec::len).sum();
        4 * (stages + self.act[0].len() + self.act[1].len())
    }
}

impl MobileBlockScratch {
    /// Training scratch for `block` and up to `max_rows` samples.
    pub fn try_new(block: &MobileBlock, max_rows: usize) -> Result<Self, OutOfMemory> {
        Self::try_new_for([block], max_rows, Passes::Both)
    }

    /// Scratch that serves each of `blocks` in `passes`, for batches of up
    /// to `max_rows` samples (the forward needs the columns only).
    pub fn try_new_for<'a>(
        blocks: impl IntoIterator<Item = &'a MobileBlock>,
        max_rows: usize,
        passes: Passes,
    ) -> Result<Self, OutOfMemory> {
        let s = StageSizes::of(blocks);
        if passes == Passes::Forward {
            return Ok(Self { col: try_zeros(s.col, "a mobile block's im2col columns")?, ..Self::default() });
        }
        let floats = |stage: usize| s.values[stage] * max_rows;
        let scratch = "a mobile block's backward scratch";
        Ok(Self {
            d_a: try_zeros(floats(0).max(floats(2)), scratch)?,
            d_b: try_zeros(floats(1), scratch)?,
            col: try_zeros(s.col, "a mobile block's im2col columns")?,
            dcol: try_zeros(s.col, "a mobile block's im2col columns")?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.d_a.len() + self.d_b.len() + self.col.len() + self.dcol.len())
    }
}

/// How a stage's BatchNorm runs: on the batch's statistics (training,
/// updating the running ones) or on the running ones (inference).
enum Norming<'a> {
    Train(&'a mut [f32]),
    Infer(&'a [f32]),
}

impl MobileBlock {
    /// Forward over `rows` samples of `x` into `out`, filling `cache` for
    /// [`MobileBlock::backward`]. In training the BatchNorms use (and the
    /// running statistics in `params` follow) the batch statistics.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        params: &mut [f32],
        x: &[f32],
        rows: usize,
        cache: &mut MobileBlockCache,
        scratch: &mut MobileBlockScratch,
        out: &mut [f32],
        mode: Mode,
    ) {
        if mode == Mode::Infer {
            return self.infer(params, x, rows, cache, scratch, out);
        }
        let (trained, running) = params.split_at_mut(self.trainable_len());
        let [r0, r1, r2] = self.running().map(|r| r.start - self.trainable_len()..r.end - self.trainable_len());
        let (run01, run2) = running.split_at_mut(r2.start);
        let (run0, run1) = run01.split_at_mut(r1.start);
        debug_assert_eq!(r0.end, r1.start);
        let norming = [Norming::Train(run0), Norming::Train(run1), Norming::Train(run2)];
        self.run(trained, norming, x, rows, cache, scratch, out);
    }

    /// Inference forward (BatchNorm with the running statistics); `cache` is scratch too.
    pub fn infer(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        cache: &mut MobileBlockCache,
        scratch: &mut MobileBlockScratch,
        out: &mut [f32],
    ) {
        let running = self.running().map(|r| Norming::Infer(&params[r]));
        self.run(&params[..self.trainable_len()], running, x, rows, cache, scratch, out);
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        p: &[f32],
        norming: [Norming; 3],
        x: &[f32],
        rows: usize,
        cache: &mut MobileBlockCache,
        scratch: &mut MobileBlockScratch,
        out: &mut [f32],
    ) {
        assert!(rows <= cache.max_rows, "a batch of {rows} in a cache for {}", cache.max_rows);
        let r = self.trained();
        let c = cache;
        let [n0, n1, n2] = norming;
        // `z` holds the stage's conv output and, after a training forward,
        // BatchNorm's normalized values.
        let norm =
            |bn: BatchNorm2d, how: Norming, gb: &[f32], z: &mut [f32], y: &mut [f32], stats: &mut [f32]| match how {
                Norming::Train(running) => bn.forward_train(gb, running, z, rows, y, stats),
                Norming::Infer(running) => bn.forward_infer(gb, running, z, rows, y),
            };
        let [act_e, act_d] = &mut c.act;
        let hidden_in: &[f32] = match self.expand {
            Some((conv, bn)) => {
                conv.forward(&p[r[0].clone()], x, rows, &mut c.xhat[0], &mut scratch.col);
                norm(bn, n0, &p[r[1].clone()], &mut c.xhat[0], act_e, &mut c.stats[0]);
                act_e
            }
            None => x,
        };
        let (dw, bn) = self.depthwise;
        dw.forward(&p[r[2].clone()], hidden_in, rows, &mut c.xhat[1]);
        norm(bn, n1, &p[r[3].clone()], &mut c.xhat[1], act_d, &mut c.stats[1]);
        let (conv, bn) = self.project;
        conv.forward(&p[r[4].clone()], act_d, rows, &mut c.xhat[2], &mut scratch.col);
        let n = rows * bn.shape.len();
        norm(bn, n2, &p[r[5].clone()], &mut c.xhat[2], &mut out[..n], &mut c.stats[2]);
        if self.residual() {
            out[..n].par_iter_mut().zip(&x[..n]).for_each(|(o, &v)| *o += v);
        }
    }

    /// Backward from `dout` (gradient wrt this block's output) after a
    /// training forward of the same `x`: the gradient of the trained
    /// parameters into `grad` (overwriting; [`MobileBlock::trainable_len`]
    /// values) and, if given, the gradient wrt `x` into `dx`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        cache: &MobileBlockCache,
        scratch: &mut MobileBlockScratch,
        dout: &[f32],
        grad: &mut [f32],
        mut dx: Option<&mut [f32]>,
    ) {
        let r = self.trained();
        let (c, s) = (cache, scratch);
        // Project: BatchNorm, then the 1x1 conv back to the depthwise's activation.
        let (conv, bn) = self.project;
        let n_out = rows * bn.shape.len();
        let rstd = &c.stats[2][..bn.shape.c];
        bn.backward(&params[r[5].clone()], &c.xhat[2], rstd, rows, dout, &mut grad[r[5].clone()], &mut s.d_a[..n_out]);
        let n_dw = rows * self.depthwise.1.shape.len();
        let (g_conv, p_conv) = (&mut grad[r[4].clone()], &params[r[4].clone()]);
        let d_act = Some(&mut s.d_b[..n_dw]);
        conv.backward(p_conv, &c.act[1], rows, &s.d_a[..n_out], g_conv, d_act, &mut s.col, &mut s.dcol);
        // Depthwise: BatchNorm with its ReLU6 (in place), the convolution.
        let (dw, bn) = self.depthwise;
        let rstd = &c.stats[1][..bn.shape.c];
        bn.backward_in_place(
            &params[r[3].clone()],
            &c.xhat[1],
            rstd,
            rows,
            &mut s.d_b[..n_dw],
            &mut grad[r[3].clone()],
        );
        let n_in = rows * dw.input.len();
        match self.expand {
            Some((conv, bn)) => {
                let d_hidden = Some(&mut s.d_a[..n_in]);
                dw.backward(&params[r[2].clone()], &c.act[0], rows, &s.d_b[..n_dw], &mut grad[r[2].clone()], d_hidden);
                let rstd = &c.stats[0][..bn.shape.c];
                let (g_bn, p_bn) = (&mut grad[r[1].clone()], &params[r[1].clone()]);
                bn.backward_in_place(p_bn, &c.xhat[0], rstd, rows, &mut s.d_a[..n_in], g_bn);
                let (g, p) = (&mut grad[r[0].clone()], &params[r[0].clone()]);
                conv.backward(p, x, rows, &s.d_a[..n_in], g, dx.as_deref_mut(), &mut s.col, &mut s.dcol);
            }
            None => {
                dw.backward(&params[r[2].clone()], x, rows, &s.d_b[..n_dw], &mut grad[r[2].clone()], dx.as_deref_mut())
            }
        }
        if let Some(dx) = dx
            && self.residual()
        {
            dx[..n_out].par_iter_mut().zip(&dout[..n_out]).for_each(|(d, &g)| *d += g);
        }
    }
}
