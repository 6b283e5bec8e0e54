//! MobileNetV2's inverted residual block, on svp's conv layers:
//! `expand` (1x1 conv + BatchNorm + ReLU6, left out when the expansion is 1),
//! `depthwise` (3x3, stride 1 or 2, + BatchNorm + ReLU6), `project` (1x1
//! conv + BatchNorm, linear), and the input added back when the shapes allow
//! (stride 1, as many channels out as in).
//!
//! A first version: BatchNorm's fused ReLU is not used, so each ReLU6 reads
//! a stored pre-activation; buffers are the caller's ([`MobileBlockCache`]).

use crate::conv::{BatchNorm2d, Chw, Conv2d};
use crate::depthwise::{DepthwiseConv2d, relu6, relu6_grad};
use rayon::prelude::*;
use svp_alloc::{OutOfMemory, try_zeros};

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
}

/// An inverted residual block: its layers and where their parameters and
/// running statistics lie in the block's slices.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MobileBlock {
    /// Its shape.
    pub spec: MobileBlockSpec,
    expand: Option<(Conv2d, BatchNorm2d)>,
    depthwise: (DepthwiseConv2d, BatchNorm2d),
    project: (Conv2d, BatchNorm2d),
}

/// Parameter ranges, in order: expand conv, its BatchNorm, depthwise, its
/// BatchNorm, project conv, its BatchNorm.
fn offsets(lens: [usize; 6]) -> [std::ops::Range<usize>; 6] {
    let mut at = 0;
    lens.map(|n| {
        at += n;
        at - n..at
    })
}

impl MobileBlock {
    /// The block of `spec` (BatchNorm momentum 0.1, as PyTorch's).
    pub fn new(spec: MobileBlockSpec) -> Self {
        let bn = |shape| BatchNorm2d { shape, momentum: 0.1, relu: false };
        let hidden = Chw { c: spec.input.c * spec.expansion, ..spec.input };
        let expand = (spec.expansion != 1)
            .then(|| (Conv2d { input: spec.input, c_out: hidden.c, k: 1, stride: 1, padding: 0 }, bn(hidden)));
        let dw = DepthwiseConv2d { input: hidden, k: 3, stride: spec.stride, padding: 1 };
        let dw_out = dw.output();
        let project = Conv2d { input: dw_out, c_out: spec.out_channels, k: 1, stride: 1, padding: 0 };
        Self { spec, expand, depthwise: (dw, bn(dw_out)), project: (project, bn(project.output())) }
    }

    /// Output shape.
    pub fn output(&self) -> Chw {
        self.project.0.output()
    }

    /// Whether the input is added to the output.
    pub fn residual(&self) -> bool {
        self.spec.stride == 1 && self.spec.input.c == self.spec.out_channels
    }

    fn param_ranges(&self) -> [std::ops::Range<usize>; 6] {
        let (e, eb) = self.expand.map_or((0, 0), |(c, b)| (c.param_len(), b.param_len()));
        offsets([
            e,
            eb,
            self.depthwise.0.param_len(),
            self.depthwise.1.param_len(),
            self.project.0.param_len(),
            self.project.1.param_len(),
        ])
    }

    /// Number of parameters.
    pub fn param_len(&self) -> usize {
        self.param_ranges()[5].end
    }

    /// Floats of running statistics (two per BatchNorm channel).
    pub fn running_len(&self) -> usize {
        self.running_ranges()[2].end
    }

    fn running_ranges(&self) -> [std::ops::Range<usize>; 3] {
        let e = self.expand.map_or(0, |(_, b)| b.param_len());
        let [a, b, c, ..] = offsets([e, self.depthwise.1.param_len(), self.project.1.param_len(), 0, 0, 0]);
        [a, b, c]
    }

    /// Initial parameters (He-normal convolutions from `init`'s values,
    /// BatchNorm gamma 1 and beta 0) and running statistics.
    pub fn init(&self, gaussian: &mut impl FnMut() -> f32, params: &mut [f32], running: &mut [f32]) {
        let r = self.param_ranges();
        let mut he = |p: &mut [f32], fan_in: usize, weights: usize| {
            let scale = (2.0 / fan_in as f32).sqrt();
            p[..weights].iter_mut().for_each(|w| *w = gaussian() * scale);
            p[weights..].fill(0.0);
        };
        if let Some((c, _)) = self.expand {
            he(&mut params[r[0].clone()], c.input.c, c.c_out * c.input.c);
        }
        let dw = self.depthwise.0;
        he(&mut params[r[2].clone()], 9, dw.input.c * 9);
        let p = self.project.0;
        he(&mut params[r[4].clone()], p.input.c, p.c_out * p.input.c);
        for (i, bn) in [(1, self.expand.map(|(_, b)| b)), (3, Some(self.depthwise.1)), (5, Some(self.project.1))] {
            if let Some(bn) = bn {
                let (gamma, beta) = params[r[i].clone()].split_at_mut(bn.shape.c);
                gamma.fill(1.0);
                beta.fill(0.0);
            }
        }
        let rr = self.running_ranges();
        if let Some((_, bn)) = self.expand {
            bn.init_running(&mut running[rr[0].clone()]);
        }
        self.depthwise.1.init_running(&mut running[rr[1].clone()]);
        self.project.1.init_running(&mut running[rr[2].clone()]);
    }
}

/// What a block's backward needs from its training forward, and the
/// backward's scratch, for batches of up to `max_rows` samples.
#[derive(Debug)]
pub struct MobileBlockCache {
    max_rows: usize,
    /// Per stage (expand, depthwise, project): the conv output, BatchNorm's
    /// normalized values, its output (the ReLU6 input) and its statistics.
    conv: [Vec<f32>; 3],
    xhat: [Vec<f32>; 3],
    pre: [Vec<f32>; 3],
    stats: [Vec<f32>; 3],
    /// The ReLU6 outputs of expand and depthwise (the next stage's input).
    act: [Vec<f32>; 2],
    /// Backward scratch, each the size of the largest stage.
    d_a: Vec<f32>,
    d_b: Vec<f32>,
    col: Vec<f32>,
    dcol: Vec<f32>,
}

impl MobileBlockCache {
    /// A cache for `block` and up to `max_rows` samples, or the allocation
    /// that did not fit (before any of it is written).
    pub fn try_new(block: &MobileBlock, max_rows: usize) -> Result<Self, OutOfMemory> {
        let hidden = block.depthwise.0.input.len();
        let sizes = [hidden, block.depthwise.0.output().len(), block.output().len()];
        let widest = sizes.iter().copied().max().unwrap_or(0).max(block.spec.input.len());
        let channels = [block.depthwise.0.input.c, block.depthwise.0.input.c, block.spec.out_channels];
        let col = block.expand.map_or(0, |(c, _)| c.col_len()).max(block.project.0.col_len());
        let per_stage = |what| -> Result<[Vec<f32>; 3], OutOfMemory> {
            Ok([
                try_zeros(sizes[0] * max_rows, what)?,
                try_zeros(sizes[1] * max_rows, what)?,
                try_zeros(sizes[2] * max_rows, what)?,
            ])
        };
        Ok(Self {
            max_rows,
            conv: per_stage("a mobile block's convolution outputs")?,
            xhat: per_stage("a mobile block's normalized values")?,
            pre: per_stage("a mobile block's activations")?,
            stats: [
                try_zeros(2 * channels[0], "a mobile block's BatchNorm statistics")?,
                try_zeros(2 * channels[1], "a mobile block's BatchNorm statistics")?,
                try_zeros(2 * channels[2], "a mobile block's BatchNorm statistics")?,
            ],
            act: [
                try_zeros(hidden * max_rows, "a mobile block's activations")?,
                try_zeros(sizes[1] * max_rows, "a mobile block's activations")?,
            ],
            d_a: try_zeros(widest * max_rows, "a mobile block's backward scratch")?,
            d_b: try_zeros(widest * max_rows, "a mobile block's backward scratch")?,
            col: try_zeros(col, "a mobile block's im2col columns")?,
            dcol: try_zeros(col, "a mobile block's im2col columns")?,
        })
    }
}

impl MobileBlock {
    /// Training forward of `rows` samples of `x` into `out`, with the
    /// batch's statistics (which also update `running`).
    pub fn forward_train(
        &self,
        params: &[f32],
        running: &mut [f32],
        x: &[f32],
        rows: usize,
        out: &mut [f32],
        cache: &mut MobileBlockCache,
    ) {
        assert!(rows <= cache.max_rows, "a batch of {rows} in a cache for {}", cache.max_rows);
        let (r, rr) = (self.param_ranges(), self.running_ranges());
        let c = cache;
        let [act_e, act_d] = &mut c.act;
        let hidden_in: &[f32] = match self.expand {
            Some((conv, bn)) => {
                conv.forward(&params[r[0].clone()], x, rows, &mut c.conv[0], &mut c.col);
                let run = &mut running[rr[0].clone()];
                bn.forward_train(
                    &params[r[1].clone()],
                    run,
                    &c.conv[0],
                    rows,
                    &mut c.pre[0],
                    &mut c.xhat[0],
                    &mut c.stats[0],
                );
                relu6_into(&c.pre[0], act_e, rows * bn.shape.len());
                act_e
            }
            None => x,
        };
        let (dw, bn) = self.depthwise;
        dw.forward(&params[r[2].clone()], hidden_in, rows, &mut c.conv[1]);
        let run = &mut running[rr[1].clone()];
        bn.forward_train(&params[r[3].clone()], run, &c.conv[1], rows, &mut c.pre[1], &mut c.xhat[1], &mut c.stats[1]);
        relu6_into(&c.pre[1], act_d, rows * bn.shape.len());
        let (conv, bn) = self.project;
        conv.forward(&params[r[4].clone()], act_d, rows, &mut c.conv[2], &mut c.col);
        let n = rows * bn.shape.len();
        let run = &mut running[rr[2].clone()];
        bn.forward_train(&params[r[5].clone()], run, &c.conv[2], rows, &mut out[..n], &mut c.xhat[2], &mut c.stats[2]);
        if self.residual() {
            out[..n].par_iter_mut().zip(&x[..n]).for_each(|(o, &v)| *o += v);
        }
    }

    /// Backward of [`MobileBlock::forward_train`] (which filled `cache`):
    /// the parameter gradient into `grad` (overwriting) and the input
    /// gradient into `dx` (overwriting), from `dout`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        dout: &[f32],
        grad: &mut [f32],
        dx: &mut [f32],
        cache: &mut MobileBlockCache,
    ) {
        let r = self.param_ranges();
        let c = cache;
        let stats_len = |bn: &BatchNorm2d| bn.shape.c;
        // Project: BatchNorm, then the 1x1 conv back to the depthwise's activation.
        let (conv, bn) = self.project;
        let n_out = rows * bn.shape.len();
        let rstd = &c.stats[2][..stats_len(&bn)];
        bn.backward(&params[r[5].clone()], &c.xhat[2], rstd, rows, dout, &mut grad[r[5].clone()], &mut c.d_a[..n_out]);
        let n_dw = rows * self.depthwise.1.shape.len();
        conv.backward(
            &params[r[4].clone()],
            &c.act[1],
            rows,
            &c.d_a[..n_out],
            &mut grad[r[4].clone()],
            Some(&mut c.d_b[..n_dw]),
            &mut c.col,
            &mut c.dcol,
        );
        // Depthwise: ReLU6, BatchNorm, the convolution.
        let (dw, bn) = self.depthwise;
        c.d_b[..n_dw].par_iter_mut().zip(&c.pre[1][..n_dw]).for_each(|(g, &v)| *g = relu6_grad(*g, v));
        let rstd = &c.stats[1][..stats_len(&bn)];
        bn.backward(
            &params[r[3].clone()],
            &c.xhat[1],
            rstd,
            rows,
            &c.d_b[..n_dw],
            &mut grad[r[3].clone()],
            &mut c.d_a[..n_dw],
        );
        let n_in = rows * dw.input.len();
        match self.expand {
            Some((conv, bn)) => {
                dw.backward(
                    &params[r[2].clone()],
                    &c.act[0],
                    rows,
                    &c.d_a[..n_dw],
                    &mut grad[r[2].clone()],
                    Some(&mut c.d_b[..n_in]),
                );
                c.d_b[..n_in].par_iter_mut().zip(&c.pre[0][..n_in]).for_each(|(g, &v)| *g = relu6_grad(*g, v));
                let rstd = &c.stats[0][..stats_len(&bn)];
                bn.backward(
                    &params[r[1].clone()],
                    &c.xhat[0],
                    rstd,
                    rows,
                    &c.d_b[..n_in],
                    &mut grad[r[1].clone()],
                    &mut c.d_a[..n_in],
                );
                conv.backward(
                    &params[r[0].clone()],
                    x,
                    rows,
                    &c.d_a[..n_in],
                    &mut grad[r[0].clone()],
                    Some(dx),
                    &mut c.col,
                    &mut c.dcol,
                );
            }
            None => dw.backward(&params[r[2].clone()], x, rows, &c.d_a[..n_dw], &mut grad[r[2].clone()], Some(dx)),
        }
        if self.residual() {
            dx[..n_out].par_iter_mut().zip(&dout[..n_out]).for_each(|(d, &g)| *d += g);
        }
    }
}

fn relu6_into(pre: &[f32], act: &mut [f32], n: usize) {
    act[..n].par_iter_mut().zip(&pre[..n]).for_each(|(a, &v)| *a = relu6(v));
}
