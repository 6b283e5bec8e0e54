//! Convolution, batch normalization and pooling over NCHW batches, each an explicit
//! forward/backward pair over caller-owned buffers.
//!
//! A batch is `rows` samples, each `channels x height x width` values in
//! row-major order, so a convolutional batch is the same `rows x features`
//! buffer the dense layers use. Convolution is im2col + GEMM, or for 3x3
//! stride-1 convolutions with enough input channels Winograd's F(4x4, 3x3)
//! in all three products (`crate::winograd`), with fewer a direct
//! convolution (`crate::direct`); the column buffer holds one
//! group of samples at a time (unfolded tap by tap in parallel) and the
//! backward recomputes it from the input, so nothing per-sample is kept
//! between forward and backward.

use crate::depthwise::relu6;
use crate::direct::{self, Direct3x3};
use crate::winograd::{FilterUse, Winograd, transform_filters};
use rayon::prelude::*;
use svp_tensor::{for_each_row_mut, gemm, view, view_mut};

/// Shape of one sample: channels, height, width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chw {
    /// Channels.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
}

impl Chw {
    /// Values per sample.
    pub fn len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Whether a sample is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A 2-D convolution with square kernels, `stride` and zero `padding`.
/// Parameters: `[W (c_out x c_in*k*k, row-major) | b (c_out)]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2d {
    /// Input shape.
    pub input: Chw,
    /// Output channels.
    pub c_out: usize,
    /// Kernel size.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl Conv2d {
    /// Output shape.
    pub fn output(&self) -> Chw {
        let o = |n: usize| (n + 2 * self.padding - self.k) / self.stride + 1;
        Chw { c: self.c_out, h: o(self.input.h), w: o(self.input.w) }
    }

    /// Number of parameters.
    pub fn param_len(&self) -> usize {
        self.c_out * self.patch() + self.c_out
    }

    fn patch(&self) -> usize {
        self.input.c * self.k * self.k
    }

    /// Values per output channel plane.
    fn hw(&self) -> usize {
        let o = self.output();
        o.h * o.w
    }

    /// Samples unfolded side by side for one GEMM: enough that a GEMM has
    /// about 2048 columns even when planes are small (a 7x7
    /// plane alone makes a GEMM too narrow to run well), within 2 MiB of scratch.
    pub fn group_size(&self) -> usize {
        let hw = self.hw().max(1);
        let per_sample = (self.patch() + self.c_out) * hw;
        (GROUP_COLUMNS / hw).min(GROUP_FLOATS / per_sample).max(1)
    }

    /// Floats of the scratch buffers `forward` and `backward` take: the
    /// columns of one group of samples and its GEMM output, or what the
    /// Winograd or direct path needs where it is larger.
    pub fn col_len(&self) -> usize {
        let im2col = (self.patch() + self.c_out) * self.hw() * self.group_size();
        let winograd = self.winograd().map_or(0, |wg| wg.filter_len() + wg.scratch_len());
        im2col.max(winograd).max(self.direct().map_or(0, |d| d.scratch_len()))
    }

    /// The Winograd F(4x4, 3x3) form of this convolution, where it applies
    /// and pays: 3x3, stride 1, padding 1, and enough input channels that
    /// its 36 GEMMs are not too shallow to run well (below that im2col's one
    /// GEMM of depth `9 c_in` wins).
    pub fn winograd(&self) -> Option<Winograd> {
        let applies = self.is_same_3x3() && self.input.c >= WINOGRAD_MIN_CHANNELS;
        applies.then_some(Winograd { c_in: self.input.c, c_out: self.c_out, h: self.input.h, w: self.input.w })
    }

    /// The direct form of this convolution ([`Direct3x3`]), where it applies
    /// and pays: 3x3, stride 1, padding 1, and too few input channels for
    /// [`Conv2d::winograd`] (a grey image's one): im2col's GEMM of depth
    /// `9 c_in` there spends its time unfolding, not multiplying.
    pub fn direct(&self) -> Option<Direct3x3> {
        let applies = self.is_same_3x3() && self.input.c < WINOGRAD_MIN_CHANNELS;
        applies.then_some(Direct3x3 { c_in: self.input.c, c_out: self.c_out, h: self.input.h, w: self.input.w })
    }

    /// 3x3, stride 1, padding 1: the output plane the input's size.
    fn is_same_3x3(&self) -> bool {
        self.k == 3 && self.stride == 1 && self.padding == 1
    }

    /// Patch row `row`'s tap, `(channel, ky, kx, oy range, ox range)`, if it
    /// reads the input somewhere: the ranges hold the output positions whose
    /// input index `o * stride + tap - padding` lies inside the input rather
    /// than over the zero padding.
    fn tap(&self, row: usize) -> Option<Tap> {
        let (i, o) = (self.input, self.output());
        let (k, s, p) = (self.k, self.stride, self.padding);
        let valid = |tap: usize, n: usize, outs: usize| {
            let first = p.saturating_sub(tap).div_ceil(s);
            let last = (n + p).checked_sub(tap + 1).map(|m| m / s + 1).unwrap_or(0).min(outs);
            (first, last.max(first))
        };
        let (c, ky, kx) = (row / (k * k), row / k % k, row % k);
        let (oy, ox) = (valid(ky, i.h, o.h), valid(kx, i.w, o.w));
        (oy.0 < oy.1 && ox.0 < ox.1).then_some(Tap { c, ky, kx, oy, ox })
    }

    /// Calls `f(plane offset, input offset, len, stride)` for every run of
    /// patch row `tap` that reads input values: plane entries `offset + i`
    /// read input `x + i * stride` for `i < len`.
    fn for_each_run(&self, tap: Tap, mut f: impl FnMut(usize, usize, usize, usize)) {
        let (i, ow, s, p) = (self.input, self.output().w, self.stride, self.padding);
        let Tap { c, ky, kx, oy: (oy0, oy1), ox: (ox0, ox1) } = tap;
        for oy in oy0..oy1 {
            let y = oy * s + ky - p;
            let xx = ox0 * s + kx - p;
            f(oy * ow + ox0, (c * i.h + y) * i.w + xx, ox1 - ox0, s);
        }
    }

    /// Stride 1 and an output as wide as the input ("same" padding): then a
    /// tap's runs over consecutive output rows sit at one constant offset from
    /// the input, so each tap is one contiguous copy plus a few padding
    /// entries, instead of one short copy per output row.
    fn same_width(&self) -> bool {
        self.stride == 1 && self.output().w == self.input.w
    }

    /// Unfolds `n` samples (`x`, one after the other) into the columns of
    /// `col` (`patch` rows of `n * hw`, sample `s` in columns `s * hw..`),
    /// padding entries zero. Rows are taps and each is written by one task.
    fn unfold(&self, x: &[f32], n: usize, col: &mut [f32]) {
        let (il, hw, ld) = (self.input.len(), self.hw(), n * self.hw());
        let unfold_row = |row: usize, dst: &mut [f32]| {
            let Some(tap) = self.tap(row) else {
                dst.fill(0.0);
                return;
            };
            let span = self.same_width().then(|| self.tap_span(tap));
            for (xs, dst) in x[..n * il].chunks_exact(il).zip(dst.chunks_exact_mut(hw)) {
                if let Some((off, xi, len)) = span {
                    // Only the padding around the copy is zeroed: zeroing the
                    // whole row first wrote the columns twice.
                    dst[..off].fill(0.0);
                    dst[off..off + len].copy_from_slice(&xs[xi..xi + len]);
                    dst[off + len..].fill(0.0);
                    // The copy wrapped across row ends; those entries are padding.
                    zero_gaps(dst, off, len, self.output().w, tap.ox);
                } else {
                    dst.fill(0.0);
                    self.for_each_run(tap, |off, xi, len, stride| {
                        for (j, c) in dst[off..off + len].iter_mut().enumerate() {
                            *c = xs[xi + j * stride];
                        }
                    });
                }
            }
        };
        for_each_row_mut(&mut col[..self.patch() * ld], ld, unfold_row);
    }

    /// The adjoint of [`Conv2d::unfold`]: `n` samples' input gradients
    /// (overwriting `dx`) from the gradient of their columns. Each sample is
    /// one task, and adds its taps in patch-row order.
    fn fold(&self, col: &[f32], n: usize, dx: &mut [f32]) {
        let (il, hw, ld) = (self.input.len(), self.hw(), n * self.hw());
        let fold_sample = |s: usize, dxs: &mut [f32]| {
            dxs.fill(0.0);
            for row in 0..self.patch() {
                let Some(tap) = self.tap(row) else { continue };
                let src = &col[row * ld + s * hw..][..hw];
                self.for_each_run(tap, |off, xi, len, stride| {
                    let src = &src[off..off + len];
                    if stride == 1 {
                        // A slice against a slice: vectorized (the strided
                        // loop below is scalar).
                        dxs[xi..xi + len].iter_mut().zip(src).for_each(|(d, &c)| *d += c);
                    } else {
                        for (j, &c) in src.iter().enumerate() {
                            dxs[xi + j * stride] += c;
                        }
                    }
                });
            }
        };
        for_each_row_mut(&mut dx[..n * il], il, fold_sample);
    }

    /// For a same-width convolution, the span of `tap` over all its output
    /// rows: `(plane offset, input offset, len)`; within it only columns
    /// `tap.ox` of each output row read the input, the rest (where the span
    /// wraps from one row to the next) are padding.
    fn tap_span(&self, tap: Tap) -> (usize, usize, usize) {
        let (i, ow, p) = (self.input, self.output().w, self.padding);
        let Tap { c, ky, kx, oy: (oy0, oy1), ox: (ox0, ox1) } = tap;
        let start = oy0 * ow + ox0;
        let end = (oy1 - 1) * ow + ox1;
        (start, (c * i.h + oy0 + ky - p) * i.w + ox0 + kx - p, end - start)
    }

    /// `out = conv(x) + b` for `rows` samples; `col` holds [`Conv2d::col_len`] floats.
    pub fn forward(&self, params: &[f32], x: &[f32], rows: usize, out: &mut [f32], col: &mut [f32]) {
        if let Some(direct) = self.direct() {
            let (w, b) = params.split_at(self.c_out * self.patch());
            direct.forward(w, Some(b), x, rows, out);
        } else if let Some(wg) = self.winograd() {
            let (w, b) = params.split_at(self.c_out * self.patch());
            let (u, scratch) = col[..self.col_len()].split_at_mut(wg.filter_len());
            transform_filters(w, self.c_out, self.input.c, FilterUse::Forward, u);
            wg.forward(u, Some(b), x, rows, out, scratch);
        } else {
            self.forward_im2col(params, x, rows, out, col);
        }
    }

    /// [`Conv2d::forward`] through im2col and one GEMM whatever the shape
    /// (`forward` takes [`Conv2d::winograd`] or [`Conv2d::direct`] where
    /// they apply): for
    /// benchmarks and tests that compare the two.
    pub fn forward_im2col(&self, params: &[f32], x: &[f32], rows: usize, out: &mut [f32], col: &mut [f32]) {
        let (il, ol, hw, patch) = (self.input.len(), self.output().len(), self.hw(), self.patch());
        let group = self.group_size();
        let (w, b) = params.split_at(self.c_out * patch);
        let (cols, y) = col[..self.col_len()].split_at_mut(patch * hw * group);
        for g0 in (0..rows).step_by(group) {
            let n = group.min(rows - g0);
            let ld = n * hw;
            self.unfold(&x[g0 * il..], n, cols);
            let y = &mut y[..self.c_out * ld];
            gemm(1.0, view(w, self.c_out, patch), view(cols, patch, ld), 0.0, view_mut(y, self.c_out, ld));
            // Channel-major GEMM output back to sample-major, plus the bias.
            let y = &y[..];
            let to_sample = |s: usize, sample: &mut [f32]| {
                for (ch, plane) in sample.chunks_exact_mut(hw).enumerate() {
                    for (o, &v) in plane.iter_mut().zip(&y[ch * ld + s * hw..][..hw]) {
                        *o = v + b[ch];
                    }
                }
            };
            for_each_row_mut(&mut out[g0 * ol..(g0 + n) * ol], ol, to_sample);
        }
    }

    /// Parameter gradient into `grad` (overwriting) and, if given, the input
    /// gradient into `dx` (overwriting), from `dout`. `col` and `dcol` hold
    /// [`Conv2d::col_len`] floats each.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        dout: &[f32],
        grad: &mut [f32],
        mut dx: Option<&mut [f32]>,
        col: &mut [f32],
        dcol: &mut [f32],
    ) {
        let (il, ol, hw, patch) = (self.input.len(), self.output().len(), self.hw(), self.patch());
        let group = self.group_size();
        let (w, _) = params.split_at(self.c_out * patch);
        let (gw, gb) = grad[..self.param_len()].split_at_mut(self.c_out * patch);
        gw.fill(0.0);
        gb.fill(0.0);
        if let Some(direct) = self.direct() {
            direct.weight_gradient(x, dout, rows, gw, gb, &mut col[..self.col_len()]);
            if let Some(dx) = dx {
                direct.input_gradient(w, dout, rows, dx, &mut dcol[..self.col_len()]);
            }
            return;
        }
        if let Some(wg) = self.winograd() {
            // Winograd's transposed algorithm for the filters' gradient, and
            // its adjoint convolution for the input's: no im2col columns.
            // One task per channel, its planes summed in sample order.
            let dout = &dout[..rows * ol];
            gb.par_iter_mut().enumerate().for_each(|(ch, g)| {
                for sample in dout.chunks_exact(ol) {
                    *g += svp_tensor::reduce::sum(&sample[ch * hw..][..hw]);
                }
            });
            let (acc, scratch) = col[..self.col_len()].split_at_mut(wg.filter_len());
            wg.weight_gradient(x, dout, rows, gw, acc, scratch);
            if let Some(dx) = dx {
                let (u, scratch) = dcol[..self.col_len()].split_at_mut(wg.filter_len());
                transform_filters(w, self.c_out, self.input.c, FilterUse::Adjoint, u);
                wg.adjoint().forward(u, None, dout, rows, dx, scratch);
            }
            return;
        }
        let (cols, dy) = col[..self.col_len()].split_at_mut(patch * hw * group);
        for g0 in (0..rows).step_by(group) {
            let n = group.min(rows - g0);
            let ld = n * hw;
            // The group's output gradient, channel-major like the GEMM's output.
            let dy = &mut dy[..self.c_out * ld];
            let dout = &dout[g0 * ol..(g0 + n) * ol];
            for_each_row_mut(dy, ld, |ch, row| {
                for (dst, sample) in row.chunks_exact_mut(hw).zip(dout.chunks_exact(ol)) {
                    dst.copy_from_slice(&sample[ch * hw..][..hw]);
                }
            });
            for (g, row) in gb.iter_mut().zip(dy.chunks_exact(ld)) {
                *g += svp_tensor::reduce::sum(row);
            }
            self.unfold(&x[g0 * il..], n, cols);
            let dy = view(dy, self.c_out, ld);
            gemm(1.0, dy, view(cols, patch, ld).t(), 1.0, view_mut(gw, self.c_out, patch));
            if let Some(dx) = dx.as_deref_mut() {
                let dcols = &mut dcol[..patch * ld];
                gemm(1.0, view(w, self.c_out, patch).t(), dy, 0.0, view_mut(dcols, patch, ld));
                self.fold(dcols, n, &mut dx[g0 * il..]);
            }
        }
    }
}

/// One kernel tap of a convolution that reads the input (see [`Conv2d::tap`]).
#[derive(Clone, Copy, Debug)]
struct Tap {
    c: usize,
    ky: usize,
    kx: usize,
    oy: (usize, usize),
    ox: (usize, usize),
}

/// Zeroes the entries of `plane[off..off + len]` outside columns `ox0..ox1`
/// of their row (rows of `width`).
fn zero_gaps(plane: &mut [f32], off: usize, len: usize, width: usize, (ox0, ox1): (usize, usize)) {
    if ox0 == 0 && ox1 == width {
        return;
    }
    let (first_row, last_row) = (off / width, (off + len - 1) / width);
    for r in first_row..last_row {
        // From the end of row r's run to the start of row r+1's.
        plane[r * width + ox1..(r + 1) * width + ox0].fill(0.0);
    }
}

/// Fewest input channels for which [`Conv2d::winograd`] is taken; below,
/// [`Conv2d::direct`], which must take every count below.
const WINOGRAD_MIN_CHANNELS: usize = 8;
const _: () = assert!(direct::MAX_CHANNELS >= WINOGRAD_MIN_CHANNELS - 1);

/// Columns a convolution's GEMM aims for when it unfolds several samples at once.
const GROUP_COLUMNS: usize = 2048;
/// Most floats of a group's columns and output (2 MiB): small planes with
/// many channels would otherwise make the scratch buffers the largest thing a
/// conv step holds.
const GROUP_FLOATS: usize = 1 << 19;

/// How a pooling window combines its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    /// Largest value (the gradient goes to the first maximum).
    Max,
    /// Mean value.
    Avg,
}

/// Pooling over windows. `Pool2d::adaptive` gives PyTorch's adaptive average
/// pooling (window `i` spans `floor(i*H/out) .. ceil((i+1)*H/out)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2d {
    /// Input shape.
    pub input: Chw,
    /// Output height and width.
    pub out_hw: (usize, usize),
    /// Kind.
    pub kind: PoolKind,
    /// `Some((k, stride))` for fixed windows; `None` for adaptive windows.
    pub window: Option<(usize, usize)>,
}

impl Pool2d {
    /// Fixed `k x k` windows every `stride`.
    pub fn fixed(input: Chw, kind: PoolKind, k: usize, stride: usize) -> Self {
        let o = |n: usize| (n - k) / stride + 1;
        Self { input, out_hw: (o(input.h), o(input.w)), kind, window: Some((k, stride)) }
    }

    /// Adaptive average pooling to `out_h x out_w`.
    pub fn adaptive(input: Chw, out_h: usize, out_w: usize) -> Self {
        Self { input, out_hw: (out_h, out_w), kind: PoolKind::Avg, window: None }
    }

    /// Output shape.
    pub fn output(&self) -> Chw {
        Chw { c: self.input.c, h: self.out_hw.0, w: self.out_hw.1 }
    }

    /// 2x2 max pooling with stride 2, the conv blocks' pooling, which has
    /// its own passes (the windows neither overlap nor need a search).
    fn is_max_2x2(&self) -> bool {
        self.kind == PoolKind::Max && self.window == Some((2, 2))
    }

    /// Input range of output index `i` along an axis of length `n` with `out` outputs.
    fn span(&self, i: usize, n: usize, out: usize) -> (usize, usize) {
        match self.window {
            Some((k, s)) => (i * s, i * s + k),
            None => (i * n / out, ((i + 1) * n).div_ceil(out)),
        }
    }

    /// Visits every output cell with its input window: `f(channel plane offset, out index, y-range, x-range)`.
    fn cells(&self, mut f: impl FnMut(usize, usize, (usize, usize), (usize, usize))) {
        let (i, (oh, ow)) = (self.input, self.out_hw);
        for c in 0..i.c {
            for oy in 0..oh {
                let ys = self.span(oy, i.h, oh);
                for ox in 0..ow {
                    let xs = self.span(ox, i.w, ow);
                    f(c * i.h * i.w, (c * oh + oy) * ow + ox, ys, xs);
                }
            }
        }
    }

    /// Forward for `rows` samples.
    pub fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let (il, ol, w) = (self.input.len(), self.output().len(), self.input.w);
        let samples = x[..rows * il].par_chunks(il).zip(out[..rows * ol].par_chunks_mut(ol));
        if self.is_max_2x2() {
            let shape = (self.input.c, self.input.h, w);
            return samples.for_each(|(xs, ys)| max_pool_2x2_sample(xs, ys, shape));
        }
        samples.for_each(|(xs, ys)| {
            self.cells(|base, o, (y0, y1), (x0, x1)| {
                let window = (y0..y1).map(|y| &xs[base + y * w + x0..base + y * w + x1]);
                ys[o] = match self.kind {
                    PoolKind::Max => window.fold(f32::NEG_INFINITY, |m, row| row.iter().fold(m, |m, &v| m.max(v))),
                    PoolKind::Avg => {
                        window.map(|row| row.iter().sum::<f32>()).sum::<f32>() / ((y1 - y0) * (x1 - x0)) as f32
                    }
                };
            });
        });
    }

    /// Input gradient (overwriting `dx`) from `dout`; `x` is the forward's input.
    pub fn backward(&self, x: &[f32], rows: usize, dout: &[f32], dx: &mut [f32]) {
        let (il, ol, w) = (self.input.len(), self.output().len(), self.input.w);
        if self.is_max_2x2() {
            let shape = (self.input.c, self.input.h, w);
            let samples = x[..rows * il].par_chunks(il).zip(dout[..rows * ol].par_chunks(ol));
            let samples = samples.zip(dx[..rows * il].par_chunks_mut(il));
            return samples.for_each(|((xs, ds), dxs)| max_pool_2x2_backward_sample(xs, ds, dxs, shape));
        }
        dx[..rows * il].fill(0.0);
        let samples =
            x[..rows * il].par_chunks(il).zip(dout[..rows * ol].par_chunks(ol)).zip(dx[..rows * il].par_chunks_mut(il));
        samples.for_each(|((xs, ds), dxs)| {
            self.cells(|base, o, (y0, y1), (x0, x1)| match self.kind {
                PoolKind::Max => {
                    let mut best = (f32::NEG_INFINITY, base + y0 * w + x0);
                    for y in y0..y1 {
                        for xx in x0..x1 {
                            let i = base + y * w + xx;
                            if xs[i] > best.0 {
                                best = (xs[i], i);
                            }
                        }
                    }
                    dxs[best.1] += ds[o];
                }
                PoolKind::Avg => {
                    let g = ds[o] / ((y1 - y0) * (x1 - x0)) as f32;
                    for y in y0..y1 {
                        for xx in x0..x1 {
                            dxs[base + y * w + xx] += g;
                        }
                    }
                }
            });
        });
    }
}

svp_tensor::multiversion! {
    /// One sample's 2x2 stride-2 max pooling over `(channels, h, w)` planes
    /// (an odd last row or column is dropped, as in the general pass).
    fn max_pool_2x2_sample(xs: &[f32], ys: &mut [f32], shape: (usize, usize, usize)) {
        let (c, h, w) = shape;
        let (oh, ow) = (h / 2, w / 2);
        for (plane, out) in xs[..c * h * w].chunks_exact(h * w).zip(ys.chunks_exact_mut(oh * ow)) {
            for (oy, out_row) in out.chunks_exact_mut(ow).enumerate() {
                let (top, bottom) = (&plane[2 * oy * w..][..w], &plane[(2 * oy + 1) * w..][..w]);
                for (ox, o) in out_row.iter_mut().enumerate() {
                    // The same comparisons, in the same order, as the general pass.
                    let m = f32::NEG_INFINITY.max(top[2 * ox]).max(top[2 * ox + 1]);
                    *o = m.max(bottom[2 * ox]).max(bottom[2 * ox + 1]);
                }
            }
        }
    }
}

svp_tensor::multiversion! {
    /// The backward of [`max_pool_2x2_sample`] (overwriting `dxs`): each
    /// output's gradient to the first maximum of its window, in row order.
    fn max_pool_2x2_backward_sample(xs: &[f32], ds: &[f32], dxs: &mut [f32], shape: (usize, usize, usize)) {
        let (c, h, w) = shape;
        let (oh, ow) = (h / 2, w / 2);
        let planes = xs[..c * h * w].chunks_exact(h * w).zip(dxs[..c * h * w].chunks_exact_mut(h * w));
        for ((plane, d_plane), d_out) in planes.zip(ds.chunks_exact(oh * ow)) {
            // An odd last row or column is in no window.
            d_plane[2 * oh * w..].fill(0.0);
            for (oy, d_row) in d_out.chunks_exact(ow).enumerate() {
                let (top, bottom) = (&plane[2 * oy * w..][..w], &plane[(2 * oy + 1) * w..][..w]);
                let (d_top, d_bottom) = d_plane[2 * oy * w..][..2 * w].split_at_mut(w);
                d_top[2 * ow..].fill(0.0);
                d_bottom[2 * ow..].fill(0.0);
                // Branch-free, so it vectorizes: the window's first maximum
                // in row order (strictly greater replaces), and every one of
                // its four entries written (0 + d, as the accumulating pass
                // did, so a -0 gradient lands as +0).
                for (ox, &d) in d_row.iter().enumerate() {
                    let v = [top[2 * ox], top[2 * ox + 1], bottom[2 * ox], bottom[2 * ox + 1]];
                    let (mut best, mut at) = (f32::NEG_INFINITY, 0);
                    for (k, &vk) in v.iter().enumerate() {
                        let better = vk > best;
                        best = if better { vk } else { best };
                        at = if better { k } else { at };
                    }
                    let g = |k: usize| if at == k { 0.0 + d } else { 0.0 };
                    d_top[2 * ox] = g(0);
                    d_top[2 * ox + 1] = g(1);
                    d_bottom[2 * ox] = g(2);
                    d_bottom[2 * ox + 1] = g(3);
                }
            }
        }
    }
}

/// BatchNorm over the channels of NCHW batches: batch statistics in training
/// (and an exponential running average of them), running statistics in
/// inference; the activation after it (none, ReLU or ReLU6) fused into the
/// same passes.
/// Parameters: `[gamma (c) | beta (c)]`; running statistics:
/// `[mean (c) | var (c)]`, owned by the caller beside the parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNorm2d {
    /// Sample shape (unchanged by the layer).
    pub shape: Chw,
    /// Weight of the newest batch in the running statistics (PyTorch: 0.1).
    pub momentum: f32,
    /// The activation after it: the output is `act(gamma * xhat + beta)`,
    /// and the backward recomputes the activation's mask from `xhat`.
    pub activation: BnActivation,
}

/// The activation fused into a [`BatchNorm2d`]'s passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BnActivation {
    /// None: the output is BatchNorm's.
    Identity,
    /// `max(y, 0)`.
    Relu,
    /// `min(max(y, 0), 6)` (MobileNet's).
    Relu6,
}

impl BnActivation {
    /// The activation of BatchNorm's output `y`.
    #[inline(always)]
    fn apply(self, y: f32) -> f32 {
        match self {
            Self::Identity => y,
            Self::Relu => y.max(0.0),
            Self::Relu6 => relu6(y),
        }
    }

    /// `d` where the activation let BatchNorm's output `gamma * h + beta`
    /// through, else +0.0 (a mask of the bits, not a branch: the entries
    /// go both ways about equally).
    #[inline(always)]
    fn mask(self, d: f32, h: f32, gamma: f32, beta: f32) -> f32 {
        let keep = match self {
            Self::Identity => return d,
            Self::Relu => gamma * h + beta > 0.0,
            Self::Relu6 => {
                let y = gamma * h + beta;
                y > 0.0 && y < 6.0
            }
        };
        f32::from_bits(d.to_bits() & u32::from(keep).wrapping_neg())
    }
}

/// BatchNorm's variance epsilon (PyTorch's default).
pub const BATCH_NORM_EPS: f32 = 1e-5;

/// Lanes of the f64 sums over a channel: independent accumulators, so the
/// sums vectorize instead of waiting on one chain of additions; their order
/// is fixed, so the bits do not depend on the thread count or the CPU.
const SUM_LANES: usize = 8;

/// Adds `values` into the lanes of `acc` (`[sum x, sum x^2]`), in f64.
#[inline(always)]
fn add_moments(values: &[f32], acc: &mut [[f64; SUM_LANES]; 2]) {
    let (whole, rest) = values.as_chunks::<SUM_LANES>();
    let (mut s, mut sq) = (acc[0], acc[1]);
    for c in whole {
        for i in 0..SUM_LANES {
            let v = c[i] as f64;
            s[i] += v;
            sq[i] += v * v;
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        s[i] += v as f64;
        sq[i] += v as f64 * v as f64;
    }
    *acc = [s, sq];
}

/// Adds `d'` and `d' * h` over a plane into the lanes of `acc`, where `d'`
/// is the gradient `d` through the activation's mask, in f64.
#[inline(always)]
fn add_gradient_sums(
    d: &[f32],
    h: &[f32],
    (gamma, beta, act): (f32, f32, BnActivation),
    acc: &mut [[f64; SUM_LANES]; 2],
) {
    let (mut s, mut sh) = (acc[0], acc[1]);
    let (dw, d_rest) = d.as_chunks::<SUM_LANES>();
    let (hw, h_rest) = h[..d.len()].as_chunks::<SUM_LANES>();
    for (dc, hc) in dw.iter().zip(hw) {
        for i in 0..SUM_LANES {
            let g = act.mask(dc[i], hc[i], gamma, beta);
            s[i] += g as f64;
            sh[i] += (g * hc[i]) as f64;
        }
    }
    for (i, (&dv, &hv)) in d_rest.iter().zip(h_rest).enumerate() {
        let g = act.mask(dv, hv, gamma, beta);
        s[i] += g as f64;
        sh[i] += (g * hv) as f64;
    }
    *acc = [s, sh];
}

fn lane_total(acc: &[f64; SUM_LANES]) -> f64 {
    acc.iter().sum()
}

/// Most channels one task sums. A block's channels are read sample by
/// sample, each sample's planes of the block one contiguous run: the CPU
/// streams it, where one channel at a time read a plane (3 KiB at 28x28)
/// every 100 KiB and the sums waited on memory (they took 2.5 times the
/// input gradient's pass, which moves more data). Each channel's additions
/// keep their order, so the block changes no bit.
const SUM_BLOCK: usize = 32;

/// Channels a task sums: the channels split over the current rayon pool,
/// at most [`SUM_BLOCK`].
fn sum_block(channels: usize) -> usize {
    channels.div_ceil(rayon::current_num_threads()).clamp(1, SUM_BLOCK)
}

svp_tensor::multiversion! {
    /// `(sum, sum of squares)` of channels `ch0..ch0 + sums.len()` (planes
    /// of `hw` values at `ch * hw` in each sample of `len`) over the samples
    /// of `x`, in f64, into `sums`.
    fn block_moments(x: &[f32], len: usize, ch0: usize, hw: usize, sums: &mut [(f64, f64)]) {
        let mut acc = [[[0.0f64; SUM_LANES]; 2]; SUM_BLOCK];
        let acc = &mut acc[..sums.len()];
        for sample in x.chunks_exact(len) {
            let planes = sample[ch0 * hw..][..acc.len() * hw].chunks_exact(hw);
            for (plane, acc) in planes.zip(acc.iter_mut()) {
                add_moments(plane, acc);
            }
        }
        for (sum, acc) in sums.iter_mut().zip(acc.iter()) {
            *sum = (lane_total(&acc[0]), lane_total(&acc[1]));
        }
    }
}

svp_tensor::multiversion! {
    /// One sample: `xhat = (x - mean) * rstd`, written over `x`, and `out =
    /// act(gamma * xhat + beta)` per channel plane of `hw`.
    fn normalize_sample(
        x_then_xhat: &mut [f32],
        out: &mut [f32],
        hw: usize,
        stats: (&[f32], &[f32]),
        affine: (&[f32], &[f32]),
        act: BnActivation,
    ) {
        let ((mean, rstd), (gamma, beta)) = (stats, affine);
        for (ch, (hs, os)) in x_then_xhat.chunks_exact_mut(hw).zip(out.chunks_exact_mut(hw)).enumerate() {
            let (m, r, g, b) = (mean[ch], rstd[ch], gamma[ch], beta[ch]);
            for (h, o) in hs.iter_mut().zip(os.iter_mut()) {
                *h = (*h - m) * r;
                *o = act.apply(g * *h + b);
            }
        }
    }
}

svp_tensor::multiversion! {
    /// `(sum d', sum d' * xhat)` of channels `ch0..ch0 + sums.len()` over
    /// the batch, `d'` the gradient `dout` through the activation's mask,
    /// in f64, into `sums`; read as [`block_moments`] reads.
    fn block_gradient_sums(
        dout: &[f32],
        xhat: &[f32],
        layout: (usize, usize, usize),
        affine: (&[f32], &[f32], BnActivation),
        sums: &mut [(f64, f64)],
    ) {
        let (len, ch0, hw) = layout;
        let (gamma, beta, act) = affine;
        let mut acc = [[[0.0f64; SUM_LANES]; 2]; SUM_BLOCK];
        let acc = &mut acc[..sums.len()];
        let block = ch0 * hw..(ch0 + acc.len()) * hw;
        for (ds, hs) in dout.chunks_exact(len).zip(xhat.chunks_exact(len)) {
            let planes = ds[block.clone()].chunks_exact(hw).zip(hs[block.clone()].chunks_exact(hw));
            for (ch, ((d, h), acc)) in planes.zip(acc.iter_mut()).enumerate() {
                add_gradient_sums(d, h, (gamma[ch0 + ch], beta[ch0 + ch], act), acc);
            }
        }
        for (sum, acc) in sums.iter_mut().zip(acc.iter()) {
            *sum = (lane_total(&acc[0]), lane_total(&acc[1]));
        }
    }
}

/// One channel's constants in BatchNorm's input gradient.
#[derive(Clone, Copy)]
struct ChannelGradient {
    /// `gamma * rstd / n`.
    k: f32,
    n: f32,
    gamma: f32,
    beta: f32,
    sum_d: f32,
    sum_dh: f32,
    act: BnActivation,
}

impl ChannelGradient {
    #[inline(always)]
    fn new(
        ch: usize,
        n: f32,
        (gamma, beta, rstd): (&[f32], &[f32], &[f32]),
        (dgamma, dbeta): (&[f32], &[f32]),
        act: BnActivation,
    ) -> Self {
        let k = gamma[ch] * rstd[ch] / n;
        Self { k, n, gamma: gamma[ch], beta: beta[ch], sum_d: dbeta[ch], sum_dh: dgamma[ch], act }
    }

    /// `k (n d' - sum d' - xhat sum d' xhat)` at one value, `d'` the
    /// output gradient `d` through the activation's mask.
    #[inline(always)]
    fn input_gradient(&self, d: f32, h: f32) -> f32 {
        let d = self.act.mask(d, h, self.gamma, self.beta);
        self.k * (self.n * d - self.sum_d - h * self.sum_dh)
    }
}

svp_tensor::multiversion! {
    /// One sample's input gradient `dx = gamma * rstd / n * (n d' - sum d' -
    /// xhat sum d' xhat)` per channel plane of `hw`.
    fn input_gradient_sample(
        hs: &[f32],
        ds: &[f32],
        dxs: &mut [f32],
        shape: (usize, f32),
        params: (&[f32], &[f32], &[f32]),
        sums: (&[f32], &[f32]),
        act: BnActivation,
    ) {
        let ((hw, n), (gamma, beta, rstd), (dgamma, dbeta)) = (shape, params, sums);
        let planes = hs.chunks_exact(hw).zip(ds.chunks_exact(hw)).zip(dxs.chunks_exact_mut(hw));
        for (ch, ((hs, ds), dxs)) in planes.enumerate() {
            let channel = ChannelGradient::new(ch, n, (gamma, beta, rstd), (dgamma, dbeta), act);
            for ((&h, &d), dx) in hs.iter().zip(ds).zip(dxs.iter_mut()) {
                *dx = channel.input_gradient(d, h);
            }
        }
    }
}

svp_tensor::multiversion! {
    /// [`input_gradient_sample`] with the gradient read from, and the input
    /// gradient written over, the same buffer (the same arithmetic).
    fn input_gradient_sample_in_place(
        hs: &[f32],
        d_then_dx: &mut [f32],
        shape: (usize, f32),
        params: (&[f32], &[f32], &[f32]),
        sums: (&[f32], &[f32]),
        act: BnActivation,
    ) {
        let ((hw, n), (gamma, beta, rstd), (dgamma, dbeta)) = (shape, params, sums);
        for (ch, (hs, ds)) in hs.chunks_exact(hw).zip(d_then_dx.chunks_exact_mut(hw)).enumerate() {
            let channel = ChannelGradient::new(ch, n, (gamma, beta, rstd), (dgamma, dbeta), act);
            for (&h, d) in hs.iter().zip(ds.iter_mut()) {
                *d = channel.input_gradient(*d, h);
            }
        }
    }
}

impl BatchNorm2d {
    /// Number of parameters.
    pub fn param_len(&self) -> usize {
        2 * self.shape.c
    }

    /// Fresh running statistics: mean 0, variance 1.
    pub fn init_running(&self, running: &mut [f32]) {
        let c = self.shape.c;
        running[..c].fill(0.0);
        running[c..2 * c].fill(1.0);
    }

    fn plane(&self) -> usize {
        self.shape.h * self.shape.w
    }

    /// Training forward: normalizes with the batch's statistics, writes
    /// `xhat` (the normalized input, kept for the backward) over the input
    /// `x_then_xhat` (a layer keeps no other copy of it), the output into
    /// `out`, in `stats` (`2 * channels` floats) `1/std` per channel then
    /// the batch mean, and updates `running`. Channels' statistics and
    /// samples' values are each computed by one task, so the result does not
    /// depend on the thread count.
    pub fn forward_train(
        &self,
        params: &[f32],
        running: &mut [f32],
        x_then_xhat: &mut [f32],
        rows: usize,
        out: &mut [f32],
        stats: &mut [f32],
    ) {
        let (c, hw, len) = (self.shape.c, self.plane(), self.shape.len());
        let x = &mut x_then_xhat[..rows * len];
        self.batch_statistics(running, x, rows, stats);
        let (gamma, beta) = params.split_at(c);
        let (rstd, mean) = stats[..2 * c].split_at(c);
        x.par_chunks_mut(len)
            .zip(out[..rows * len].par_chunks_mut(len))
            .for_each(|(hs, os)| normalize_sample(hs, os, hw, (mean, rstd), (gamma, beta), self.activation));
    }

    /// The batch's `1/std` and mean per channel into `stats`, and the
    /// running statistics moved toward them.
    fn batch_statistics(&self, running: &mut [f32], x: &[f32], rows: usize, stats: &mut [f32]) {
        let (c, hw, len) = (self.shape.c, self.plane(), self.shape.len());
        let n = (rows * hw) as f64;
        let (rstd, mean) = stats[..2 * c].split_at_mut(c);
        let (run_mean, run_var) = running[..2 * c].split_at_mut(c);
        let block = sum_block(c);
        let blocks = (rstd.par_chunks_mut(block).zip(mean.par_chunks_mut(block)))
            .zip(run_mean.par_chunks_mut(block).zip(run_var.par_chunks_mut(block)));
        blocks.enumerate().for_each(|(b, ((rstd, mean), (run_mean, run_var)))| {
            let mut moments = [(0.0, 0.0); SUM_BLOCK];
            let moments = &mut moments[..rstd.len()];
            block_moments(x, len, b * block, hw, moments);
            let channels = (rstd.iter_mut().zip(mean.iter_mut())).zip(run_mean.iter_mut().zip(run_var.iter_mut()));
            for (((r, m), (run_mean, run_var)), &(sum, sum_sq)) in channels.zip(moments.iter()) {
                // One pass, E[x^2] - E[x]^2 in f64: f32 values lose nothing to
                // the cancellation unless the mean is ~1e6 standard deviations.
                let mu = sum / n;
                let var = (sum_sq / n - mu * mu).max(0.0);
                *r = 1.0 / (var as f32 + BATCH_NORM_EPS).sqrt();
                *m = mu as f32;
                let k = self.momentum;
                *run_mean = (1.0 - k) * *run_mean + k * mu as f32;
                // The running variance is unbiased, as PyTorch keeps it.
                let unbiased = if n > 1.0 { var * n / (n - 1.0) } else { var };
                *run_var = (1.0 - k) * *run_var + k * unbiased as f32;
            }
        });
    }

    /// Inference forward with the running statistics.
    pub fn forward_infer(&self, params: &[f32], running: &[f32], x: &[f32], rows: usize, out: &mut [f32]) {
        let (c, hw, len) = (self.shape.c, self.plane(), self.shape.len());
        let (gamma, beta) = params.split_at(c);
        for ch in 0..c {
            let r = 1.0 / (running[c + ch] + BATCH_NORM_EPS).sqrt();
            for row in 0..rows {
                let at = row * len + ch * hw;
                for i in at..at + hw {
                    out[i] = self.activation.apply(gamma[ch] * (x[i] - running[ch]) * r + beta[ch]);
                }
            }
        }
    }

    /// Backward of [`BatchNorm2d::forward_train`]: parameter gradient into
    /// `grad` (overwriting) and the input gradient into `dx` (overwriting),
    /// from `dout`, the gradient wrt the output (after the activation,
    /// whose mask is recomputed bit for bit from `xhat`). `rstd` is the
    /// first half of the forward's `stats`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &[f32],
        xhat: &[f32],
        rstd: &[f32],
        rows: usize,
        dout: &[f32],
        grad: &mut [f32],
        dx: &mut [f32],
    ) {
        let (c, hw, len) = (self.shape.c, self.plane(), self.shape.len());
        let (xhat, dout) = (&xhat[..rows * len], &dout[..rows * len]);
        self.parameter_gradient(params, xhat, rows, dout, grad);
        let (n, (gamma, beta), sums) = ((rows * hw) as f32, params[..2 * c].split_at(c), grad[..2 * c].split_at(c));
        let samples = xhat.par_chunks(len).zip(dout.par_chunks(len)).zip(dx[..rows * len].par_chunks_mut(len));
        samples.for_each(|((hs, ds), dxs)| {
            input_gradient_sample(hs, ds, dxs, (hw, n), (gamma, beta, &rstd[..c]), sums, self.activation)
        });
    }

    /// [`BatchNorm2d::backward`] with the input gradient written over
    /// `dout`: one activation-sized buffer fewer. The same bits.
    pub fn backward_in_place(
        &self,
        params: &[f32],
        xhat: &[f32],
        rstd: &[f32],
        rows: usize,
        dout_then_dx: &mut [f32],
        grad: &mut [f32],
    ) {
        let (c, hw, len) = (self.shape.c, self.plane(), self.shape.len());
        let (xhat, d) = (&xhat[..rows * len], &mut dout_then_dx[..rows * len]);
        self.parameter_gradient(params, xhat, rows, d, grad);
        let (n, (gamma, beta), sums) = ((rows * hw) as f32, params[..2 * c].split_at(c), grad[..2 * c].split_at(c));
        xhat.par_chunks(len).zip(d.par_chunks_mut(len)).for_each(|(hs, ds)| {
            input_gradient_sample_in_place(hs, ds, (hw, n), (gamma, beta, &rstd[..c]), sums, self.activation)
        });
    }

    /// `[d gamma | d beta]` into `grad`: per channel, the sums of `d' *
    /// xhat` and of `d'` over the batch (`d'` is `dout` through the
    /// activation's mask).
    fn parameter_gradient(&self, params: &[f32], xhat: &[f32], rows: usize, dout: &[f32], grad: &mut [f32]) {
        let (c, hw, len) = (self.shape.c, self.plane(), self.shape.len());
        let (gamma, beta) = params[..2 * c].split_at(c);
        let (dgamma, dbeta) = grad[..2 * c].split_at_mut(c);
        let (xhat, dout) = (&xhat[..rows * len], &dout[..rows * len]);
        let block = sum_block(c);
        let blocks = dgamma.par_chunks_mut(block).zip(dbeta.par_chunks_mut(block));
        blocks.enumerate().for_each(|(b, (dgamma, dbeta))| {
            let mut sums = [(0.0, 0.0); SUM_BLOCK];
            let sums = &mut sums[..dgamma.len()];
            block_gradient_sums(dout, xhat, (len, b * block, hw), (gamma, beta, self.activation), sums);
            for ((dg, db), &(sum_d, sum_dh)) in dgamma.iter_mut().zip(dbeta.iter_mut()).zip(sums.iter()) {
                *dg = sum_dh as f32;
                *db = sum_d as f32;
            }
        });
    }
}
