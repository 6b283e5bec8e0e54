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

    /// Calls `f(out index, in index)` for every pair of output and input
    /// values that filter tap `(ky, kx)` of one channel plane connects.
    fn for_each_tap_pair(&self, ky: usize, kx: usize, mut f: impl FnMut(usize, usize)) {
        let (i, o) = (self.input, self.output());
        let (s, p) = (self.stride, self.padding);
        let (oy0, oy1) = self.valid(ky, i.h, o.h);
        let (ox0, ox1) = self.valid(kx, i.w, o.w);
        for oy in oy0..oy1 {
            let iy = oy * s + ky - p;
            for ox in ox0..ox1 {
                f(oy * o.w + ox, iy * i.w + ox * s + kx - p);
            }
        }
    }

    /// `out = depthwise_conv(x) + b` for `rows` samples.
    pub fn forward(&self, params: &[f32], x: &[f32], rows: usize, out: &mut [f32]) {
        debug_assert!(self.is_valid(), "{self:?}");
        let (il, ol, kk) = (self.input.len(), self.output().len(), self.k * self.k);
        let (ip, op) = (self.input.h * self.input.w, ol / self.input.c.max(1));
        let (w, b) = params[..self.param_len()].split_at(self.input.c * kk);
        out[..rows * ol].par_chunks_mut(ol.max(1)).zip(x[..rows * il].par_chunks(il.max(1))).for_each(|(y, x)| {
            for (c, (y, x)) in y.chunks_exact_mut(op).zip(x.chunks_exact(ip)).enumerate() {
                y.fill(b[c]);
                for t in 0..kk {
                    let wt = w[c * kk + t];
                    self.for_each_tap_pair(t / self.k, t % self.k, |o, i| y[o] += wt * x[i]);
                }
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
        // Channel c's filter and bias gradients: sums over samples, in
        // sample order, in f64 (a 28x28 plane times a batch is ~10^5 terms).
        gw.par_chunks_mut(kk).zip(gb.par_iter_mut()).enumerate().for_each(|(c, (gw, gb))| {
            let mut acc = [0f64; MAX_K * MAX_K + 1];
            for s in 0..rows {
                let d = &dout[s * ol + c * op..][..op];
                let xs = &x[s * il + c * ip..][..ip];
                acc[MAX_K * MAX_K] += d.iter().map(|&v| v as f64).sum::<f64>();
                for (t, a) in acc[..kk].iter_mut().enumerate() {
                    let mut sum = 0f32;
                    self.for_each_tap_pair(t / self.k, t % self.k, |o, i| sum += d[o] * xs[i]);
                    *a += sum as f64;
                }
            }
            for (g, a) in gw.iter_mut().zip(&acc) {
                *g = *a as f32;
            }
            *gb = acc[MAX_K * MAX_K] as f32;
        });
        if let Some(dx) = dx {
            dx[..rows * il].par_chunks_mut(ip.max(1)).enumerate().for_each(|(plane, dx)| {
                let (s, c) = (plane / i.c, plane % i.c);
                let d = &dout[s * ol + c * op..][..op];
                dx.fill(0.0);
                for t in 0..kk {
                    let wt = w[c * kk + t];
                    self.for_each_tap_pair(t / self.k, t % self.k, |o, i| dx[i] += wt * d[o]);
                }
            });
        }
    }
}

/// `min(max(v, 0), 6)`, MobileNet's activation (bounded for low precision).
#[inline(always)]
#[allow(clippy::manual_clamp)] // clamp keeps NaN; ReLU6 must map it to 0 as ReLU does
pub fn relu6(v: f32) -> f32 {
    // Not `clamp`: NaN becomes 0, as in ReLU.
    v.max(0.0).min(6.0)
}

/// ReLU6's gradient: `g` where `0 < v < 6` (of the activation's input or
/// output alike), else 0.
#[inline(always)]
pub fn relu6_grad(g: f32, v: f32) -> f32 {
    if v > 0.0 && v < 6.0 { g } else { 0.0 }
}
