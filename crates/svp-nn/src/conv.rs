//! Convolution, batch normalization and pooling over NCHW batches, each an explicit
//! forward/backward pair over caller-owned buffers.
//!
//! A batch is `rows` samples, each `channels x height x width` values in
//! row-major order, so a convolutional batch is the same `rows x features`
//! buffer the dense layers use. Convolution is im2col + GEMM; the column
//! buffer holds one sample at a time and the backward recomputes it from the
//! input, so nothing per-sample is kept between forward and backward.

use svp_tensor::{gemm, view, view_mut};

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

    /// Floats of the per-sample column buffer.
    pub fn col_len(&self) -> usize {
        let o = self.output();
        self.patch() * o.h * o.w
    }

    /// Calls `f(column offset, input offset, len, stride)` for every run of the
    /// column matrix (patch x out_h*out_w) that reads input values: column
    /// entries `col + i` read input `x + i * stride` for `i < len`. Entries over
    /// the zero padding are in no run.
    fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize, usize)) {
        let (i, o) = (self.input, self.output());
        let (k, s, p) = (self.k, self.stride, self.padding);
        let hw = o.h * o.w;
        // Output positions along an axis whose input index o*s + tap - p lies in [0, n).
        let valid = |tap: usize, n: usize, outs: usize| {
            let first = p.saturating_sub(tap).div_ceil(s);
            let last = (n + p).checked_sub(tap + 1).map(|m| m / s + 1).unwrap_or(0).min(outs);
            (first, last.max(first))
        };
        for c in 0..i.c {
            for ky in 0..k {
                let (oy0, oy1) = valid(ky, i.h, o.h);
                for kx in 0..k {
                    let (ox0, ox1) = valid(kx, i.w, o.w);
                    if ox0 == ox1 {
                        continue;
                    }
                    let row = ((c * k + ky) * k + kx) * hw;
                    for oy in oy0..oy1 {
                        let y = oy * s + ky - p;
                        let xx = ox0 * s + kx - p;
                        f(row + oy * o.w + ox0, (c * i.h + y) * i.w + xx, ox1 - ox0, s);
                    }
                }
            }
        }
    }

    /// Unfolds one sample into `col`.
    fn im2col(&self, x: &[f32], col: &mut [f32]) {
        col[..self.col_len()].fill(0.0);
        self.for_each_run(|ci, xi, len, stride| {
            if stride == 1 {
                col[ci..ci + len].copy_from_slice(&x[xi..xi + len]);
            } else {
                for (j, c) in col[ci..ci + len].iter_mut().enumerate() {
                    *c = x[xi + j * stride];
                }
            }
        });
    }

    /// Adds the columns back into one sample's gradient (the adjoint of `im2col`).
    fn col2im_add(&self, col: &[f32], dx: &mut [f32]) {
        self.for_each_run(|ci, xi, len, stride| {
            for (j, &c) in col[ci..ci + len].iter().enumerate() {
                dx[xi + j * stride] += c;
            }
        });
    }

    /// `out = conv(x) + b` for `rows` samples; `col` holds [`Conv2d::col_len`] floats.
    pub fn forward(&self, params: &[f32], x: &[f32], rows: usize, out: &mut [f32], col: &mut [f32]) {
        let (il, o) = (self.input.len(), self.output());
        let (hw, patch) = (o.h * o.w, self.patch());
        let (w, b) = params.split_at(self.c_out * patch);
        for r in 0..rows {
            self.im2col(&x[r * il..(r + 1) * il], col);
            let y = &mut out[r * o.len()..(r + 1) * o.len()];
            for (ch, plane) in y.chunks_exact_mut(hw).enumerate() {
                plane.fill(b[ch]);
            }
            gemm(1.0, view(w, self.c_out, patch), view(col, patch, hw), 1.0, view_mut(y, self.c_out, hw));
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
        let (il, o) = (self.input.len(), self.output());
        let (hw, patch) = (o.h * o.w, self.patch());
        let (w, _) = params.split_at(self.c_out * patch);
        let (gw, gb) = grad[..self.param_len()].split_at_mut(self.c_out * patch);
        gw.fill(0.0);
        gb.fill(0.0);
        for r in 0..rows {
            let d = &dout[r * o.len()..(r + 1) * o.len()];
            for (g, plane) in gb.iter_mut().zip(d.chunks_exact(hw)) {
                *g += svp_tensor::reduce::sum(plane);
            }
            self.im2col(&x[r * il..(r + 1) * il], col);
            gemm(1.0, view(d, self.c_out, hw), view(col, patch, hw).t(), 1.0, view_mut(gw, self.c_out, patch));
            if let Some(dx) = dx.as_deref_mut() {
                gemm(1.0, view(w, self.c_out, patch).t(), view(d, self.c_out, hw), 0.0, view_mut(dcol, patch, hw));
                let dxs = &mut dx[r * il..(r + 1) * il];
                dxs.fill(0.0);
                self.col2im_add(dcol, dxs);
            }
        }
    }
}

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
        for r in 0..rows {
            let (xs, ys) = (&x[r * il..(r + 1) * il], &mut out[r * ol..(r + 1) * ol]);
            self.cells(|base, o, (y0, y1), (x0, x1)| {
                let window = (y0..y1).map(|y| &xs[base + y * w + x0..base + y * w + x1]);
                ys[o] = match self.kind {
                    PoolKind::Max => window.fold(f32::NEG_INFINITY, |m, row| row.iter().fold(m, |m, &v| m.max(v))),
                    PoolKind::Avg => {
                        window.map(|row| row.iter().sum::<f32>()).sum::<f32>() / ((y1 - y0) * (x1 - x0)) as f32
                    }
                };
            });
        }
    }

    /// Input gradient (overwriting `dx`) from `dout`; `x` is the forward's input.
    pub fn backward(&self, x: &[f32], rows: usize, dout: &[f32], dx: &mut [f32]) {
        let (il, ol, w) = (self.input.len(), self.output().len(), self.input.w);
        dx[..rows * il].fill(0.0);
        for r in 0..rows {
            let (xs, ds, dxs) = (&x[r * il..(r + 1) * il], &dout[r * ol..(r + 1) * ol], &mut dx[r * il..(r + 1) * il]);
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
        }
    }
}

/// BatchNorm over the channels of NCHW batches: batch statistics in training
/// (and an exponential running average of them), running statistics in
/// inference. Parameters: `[gamma (c) | beta (c)]`; running statistics:
/// `[mean (c) | var (c)]`, owned by the caller beside the parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNorm2d {
    /// Sample shape (unchanged by the layer).
    pub shape: Chw,
    /// Weight of the newest batch in the running statistics (PyTorch: 0.1).
    pub momentum: f32,
}

/// BatchNorm's variance epsilon (PyTorch's default).
pub const BATCH_NORM_EPS: f32 = 1e-5;

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
    /// `xhat` (the normalized input, kept for the backward) and `1/std` per
    /// channel into `rstd`, and updates `running`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_train(
        &self,
        params: &[f32],
        running: &mut [f32],
        x: &[f32],
        rows: usize,
        out: &mut [f32],
        xhat: &mut [f32],
        rstd: &mut [f32],
    ) {
        let (c, hw, len) = (self.shape.c, self.plane(), self.shape.len());
        let n = (rows * hw) as f64;
        let (gamma, beta) = params.split_at(c);
        for ch in 0..c {
            let planes = (0..rows).map(|r| &x[r * len + ch * hw..][..hw]);
            let mean = planes.clone().map(|p| p.iter().map(|&v| v as f64).sum::<f64>()).sum::<f64>() / n;
            let var = planes.map(|p| p.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>()).sum::<f64>() / n;
            let r = 1.0 / (var as f32 + BATCH_NORM_EPS).sqrt();
            rstd[ch] = r;
            for row in 0..rows {
                let at = row * len + ch * hw;
                for i in at..at + hw {
                    xhat[i] = (x[i] - mean as f32) * r;
                    out[i] = gamma[ch] * xhat[i] + beta[ch];
                }
            }
            let m = self.momentum;
            running[ch] = (1.0 - m) * running[ch] + m * mean as f32;
            // The running variance is unbiased, as PyTorch keeps it.
            let unbiased = if n > 1.0 { var * n / (n - 1.0) } else { var };
            running[c + ch] = (1.0 - m) * running[c + ch] + m * unbiased as f32;
        }
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
                    out[i] = gamma[ch] * (x[i] - running[ch]) * r + beta[ch];
                }
            }
        }
    }

    /// Backward of [`BatchNorm2d::forward_train`]: parameter gradient into
    /// `grad` (overwriting) and the input gradient into `dx` (overwriting).
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
        let n = (rows * hw) as f32;
        let gamma = &params[..c];
        let (dgamma, dbeta) = grad[..2 * c].split_at_mut(c);
        for ch in 0..c {
            let (mut sum_dy, mut sum_dy_xhat) = (0.0f64, 0.0f64);
            for row in 0..rows {
                let at = row * len + ch * hw;
                for i in at..at + hw {
                    sum_dy += dout[i] as f64;
                    sum_dy_xhat += (dout[i] * xhat[i]) as f64;
                }
            }
            dgamma[ch] = sum_dy_xhat as f32;
            dbeta[ch] = sum_dy as f32;
            // dx = gamma * rstd / n * (n dy - sum(dy) - xhat sum(dy xhat))
            let k = gamma[ch] * rstd[ch] / n;
            for row in 0..rows {
                let at = row * len + ch * hw;
                for i in at..at + hw {
                    dx[i] = k * (n * dout[i] - sum_dy as f32 - xhat[i] * sum_dy_xhat as f32);
                }
            }
        }
    }
}
