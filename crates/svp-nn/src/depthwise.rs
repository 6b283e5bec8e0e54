//! Depthwise convolution and ReLU6, the spatial half of a MobileNet block
//! (the other half, the pointwise 1x1 convolution, is a [`Conv2d`] with
//! `k = 1`).
//!
//! Each channel is convolved with its own `k x k` filter: `k*k` multiply-adds
//! per output value, too few for a GEMM to pay, so the loops are direct.
//! Forward splits the batch by sample, backward by channel (a channel's
//! filter gradient sums over every sample), and inside each piece the order
//! of additions is fixed: the same bits for any number of threads.
//!
//! [`Conv2d`]: crate::conv::Conv2d

use crate::conv::Chw;
use rayon::prelude::*;

/// The largest kernel side: a channel's filter gradient is summed in a
/// fixed-size array, not an allocation per step.
pub const MAX_K: usize = 7;

/// A depthwise 2-D convolution: `channels` filters of `k x k`, `stride`, zero
/// `padding`. Parameters: `[W (channels x k*k, row-major) | b (channels)]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepthwiseConv2d {
    /// Input shape (output channels are the same).
    pub input: Chw,
    /// Kernel size.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl DepthwiseConv2d {
    /// Output shape.
    pub fn output(&self) -> Chw {
        let o = |n: usize| (n + 2 * self.padding - self.k) / self.stride + 1;
        Chw { c: self.input.c, h: o(self.input.h), w: o(self.input.w) }
    }

    /// Whether this is a convolution the loops can run: a kernel of 1 to
    /// [`MAX_K`] that fits the padded input, and a stride of at least 1.
    pub fn is_valid(&self) -> bool {
        (1..=MAX_K).contains(&self.k)
            && self.stride >= 1
            && self.input.h + 2 * self.padding >= self.k
            && self.input.w + 2 * self.padding >= self.k
    }

    /// Number of parameters.
    pub fn param_len(&self) -> usize {
        self.input.c * (self.k * self.k + 1)
    }

    /// The output columns `ox` whose input column `ox * stride + tap - padding`
    /// lies inside `0..n`, as a range (the same formula serves rows).
    fn valid(&self, tap: usize, n: usize, outs: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        let first = p.saturating_sub(tap).div_ceil(s);
        let last = (n + p).checked_sub(tap + 1).map_or(0, |m| m / s + 1).min(outs);
        (first, last.max(first))
    }

    /// Where each filter tap applies in a channel plane, worked out once per
    /// call instead of once per plane.
    fn taps(&self) -> Taps {
        let (i, o) = (self.input, self.output());
        let (s, p) = (self.stride, self.padding);
        let mut spans = [TapSpan::default(); MAX_K * MAX_K];
        for (t, span) in spans[..self.k * self.k].iter_mut().enumerate() {
            let (ky, kx) = (t / self.k, t % self.k);
            let (oy0, oy1) = self.valid(ky, i.h, o.h);
            let (ox0, ox1) = self.valid(kx, i.w, o.w);
            if oy1 > oy0 && ox1 > ox0 {
                *span = TapSpan {
                    rows: oy1 - oy0,
                    cols: ox1 - ox0,
                    out_start: oy0 * o.w + ox0,
                    in_start: (oy0 * s + ky - p) * i.w + ox0 * s + kx - p,
                };
            }
        }
        Taps { spans, kk: self.k * self.k, out_w: o.w, in_row_step: s * i.w, stride: s }
    }

    /// `out = depthwise_conv(x) + b` for `rows` samples.
    pub fn forward(&self, params: &[f32], x: &[f32], rows: usize, out: &mut [f32]) {
        debug_assert!(self.is_valid(), "{self:?}");
        let (il, ol, kk) = (self.input.len(), self.output().len(), self.k * self.k);
        let (ip, op) = (self.input.h * self.input.w, ol / self.input.c.max(1));
        let (w, b) = params[..self.param_len()].split_at(self.input.c * kk);
        let taps = self.taps();
        out[..rows * ol].par_chunks_mut(ol.max(1)).zip(x[..rows * il].par_chunks(il.max(1))).for_each(|(y, x)| {
            for (c, (y, x)) in y.chunks_exact_mut(op).zip(x.chunks_exact(ip)).enumerate() {
                forward_plane(&taps, &w[c * kk..][..kk], b[c], x, y);
            }
        });
    }

    /// Parameter gradient into `grad` (overwriting) and, if given, the input
    /// gradient into `dx` (overwriting), from `dout`.
    pub fn backward(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        dout: &[f32],
        grad: &mut [f32],
        dx: Option<&mut [f32]>,
    ) {
        debug_assert!(self.is_valid(), "{self:?}");
        let (i, o) = (self.input, self.output());
        let (il, ol, kk) = (i.len(), o.len(), self.k * self.k);
        let (ip, op) = (i.h * i.w, o.h * o.w);
        let (w, _) = params[..self.param_len()].split_at(i.c * kk);
        let (gw, gb) = grad[..self.param_len()].split_at_mut(i.c * kk);
        let taps = self.taps();
        // Channel c's filter and bias gradients: each sample's sums in f32
        // lanes, added over samples in sample order in f64 (a 28x28 plane
        // times a batch is ~10^5 terms).
        gw.par_chunks_mut(kk).zip(gb.par_iter_mut()).enumerate().for_each(|(c, (gw, gb))| {
            let mut acc = [0f64; MAX_K * MAX_K + 1];
            let mut sums = [0f32; MAX_K * MAX_K + 1];
            for s in 0..rows {
                let d = &dout[s * ol + c * op..][..op];
                let xs = &x[s * il + c * ip..][..ip];
                filter_gradient_plane(&taps, d, xs, &mut sums);
                for (a, &v) in acc[..kk].iter_mut().zip(&sums) {
                    *a += v as f64;
                }
                acc[MAX_K * MAX_K] += sums[MAX_K * MAX_K] as f64;
            }
            for (g, a) in gw.iter_mut().zip(&acc) {
                *g = *a as f32;
            }
            *gb = acc[MAX_K * MAX_K] as f32;
        });
        if let Some(dx) = dx {
            dx[..rows * il].par_chunks_mut(ip.max(1)).enumerate().for_each(|(plane, dx)| {
                let (s, c) = (plane / i.c, plane % i.c);
                input_gradient_plane(&taps, &w[c * kk..][..kk], &dout[s * ol + c * op..][..op], dx);
            });
        }
    }
}

/// Where one filter tap applies in a channel plane: a `rows x cols` block of
/// outputs starting at `out_start`, each reading the input at `in_start`
/// plus its offset (rows apart by [`Taps::in_row_step`], columns by the
/// stride). Empty when the tap only ever reads padding.
#[derive(Clone, Copy, Debug, Default)]
struct TapSpan {
    rows: usize,
    cols: usize,
    out_start: usize,
    in_start: usize,
}

/// Every tap's span, in filter order, and the plane's strides.
#[derive(Clone, Copy, Debug)]
struct Taps {
    spans: [TapSpan; MAX_K * MAX_K],
    kk: usize,
    out_w: usize,
    in_row_step: usize,
    stride: usize,
}

/// f32 lanes a dot product is split over: independent sums the compiler can
/// keep in vector registers, added up in a fixed order at the end, so the
/// bits do not depend on the instruction set.
const LANES: usize = 8;

/// The lanes' sum, in a fixed order.
#[inline(always)]
fn sum_lanes(l: &[f32; LANES]) -> f32 {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

svp_tensor::multiversion! {
    /// One channel plane: `y = b + sum over taps of w[t] * x[tap's pixels]`,
    /// taps added in filter order (the order the reference adds them in).
    fn forward_plane(taps: &Taps, w: &[f32], b: f32, x: &[f32], y: &mut [f32]) {
        y.fill(b);
        for (span, &wt) in taps.spans[..taps.kk].iter().zip(w) {
            for r in 0..span.rows {
                let y = &mut y[span.out_start + r * taps.out_w..][..span.cols];
                let x = &x[span.in_start + r * taps.in_row_step..];
                if taps.stride == 1 {
                    for (y, &x) in y.iter_mut().zip(&x[..span.cols]) {
                        *y += wt * x;
                    }
                } else {
                    for (y, &x) in y.iter_mut().zip(x.iter().step_by(taps.stride)) {
                        *y += wt * x;
                    }
                }
            }
        }
    }
}

svp_tensor::multiversion! {
    /// One channel plane's input gradient (overwriting `dx`): each tap
    /// scatters `w[t] * dout` back onto the pixels it read, in filter order.
    fn input_gradient_plane(taps: &Taps, w: &[f32], dout: &[f32], dx: &mut [f32]) {
        dx.fill(0.0);
        for (span, &wt) in taps.spans[..taps.kk].iter().zip(w) {
            for r in 0..span.rows {
                let d = &dout[span.out_start + r * taps.out_w..][..span.cols];
                let dx = &mut dx[span.in_start + r * taps.in_row_step..];
                if taps.stride == 1 {
                    for (dx, &d) in dx[..span.cols].iter_mut().zip(d) {
                        *dx += wt * d;
                    }
                } else {
                    for (dx, &d) in dx.iter_mut().step_by(taps.stride).zip(d) {
                        *dx += wt * d;
                    }
                }
            }
        }
    }
}

svp_tensor::multiversion! {
    /// One sample's share of a channel's gradients: `sums[t]` the dot product
    /// of `dout` with tap t's input pixels, `sums[MAX_K * MAX_K]` the sum of
    /// `dout` (the bias's). Each sum runs in [`LANES`] lanes, column `j` of a
    /// row into lane `j % LANES`.
    fn filter_gradient_plane(taps: &Taps, dout: &[f32], x: &[f32], sums: &mut [f32; MAX_K * MAX_K + 1]) {
        for (span, sum) in taps.spans[..taps.kk].iter().zip(sums.iter_mut()) {
            let mut lanes = [0f32; LANES];
            for r in 0..span.rows {
                let d = &dout[span.out_start + r * taps.out_w..][..span.cols];
                let x = &x[span.in_start + r * taps.in_row_step..];
                if taps.stride == 1 {
                    let (d, x) = (d.chunks_exact(LANES), x[..span.cols].chunks_exact(LANES));
                    let (dr, xr) = (d.remainder(), x.remainder());
                    for (d, x) in d.zip(x) {
                        for j in 0..LANES {
                            lanes[j] += d[j] * x[j];
                        }
                    }
                    for (j, (&d, &x)) in dr.iter().zip(xr).enumerate() {
                        lanes[j] += d * x;
                    }
                } else {
                    for (j, (&d, &x)) in d.iter().zip(x.iter().step_by(taps.stride)).enumerate() {
                        lanes[j % LANES] += d * x;
                    }
                }
            }
            *sum = sum_lanes(&lanes);
        }
        let mut lanes = [0f32; LANES];
        let chunks = dout.chunks_exact(LANES);
        let rest = chunks.remainder();
        for d in chunks {
            for j in 0..LANES {
                lanes[j] += d[j];
            }
        }
        for (j, &d) in rest.iter().enumerate() {
            lanes[j] += d;
        }
        sums[MAX_K * MAX_K] = sum_lanes(&lanes);
    }
}

/// `min(max(v, 0), 6)`, MobileNet's activation (bounded for low precision).
#[inline(always)]
#[allow(clippy::manual_clamp)] // clamp keeps NaN; ReLU6 must map it to 0 as ReLU does
pub fn relu6(v: f32) -> f32 {
    // Not `clamp`: NaN becomes 0, as in ReLU.
    v.max(0.0).min(6.0)
}

// Its gradient is BatchNorm's fused mask (`BnActivation::Relu6`), the one
// place a ReLU6 runs.
