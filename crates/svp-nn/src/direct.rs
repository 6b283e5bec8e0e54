//! Direct 3x3 convolution (stride 1, padding 1) for layers with few input
//! channels, the first conv of a network on grey images above all: im2col
//! would unfold one input channel into 9 rows for a GEMM of depth 9, which
//! spends its time unfolding and splitting work rather than multiplying,
//! and its weight gradient is a GEMM of 9 x `c_out` outputs that does not
//! split across threads.
//!
//! Each filter tap is one pass over the whole plane taken as a flat array:
//! `out[p] += w[i][j] x[p + (i - 1) w + (j - 1)]` over the range of `p` that
//! stays inside the plane, which the compiler vectorizes with no remainder
//! per row. Only the first and last columns read across a row's end (the
//! left taps of column 0 read the row above's last value, the right taps of
//! the last column the next row's first), so those two columns are computed
//! again, exactly, afterwards. The weight gradient's passes take the output
//! gradient with that column zeroed instead, and sum each tap's products in
//! 16 fixed lanes, whatever the instruction set, and the lanes in a fixed
//! order at the end; one task per output channel. So the bits are the same
//! on every instruction set and thread count.

use rayon::prelude::*;
use svp_tensor::for_each_row_mut;

/// Lanes each filter tap's gradient is summed in.
const LANES: usize = 16;

/// Most input channels [`Direct3x3`] takes (the weight gradient keeps its
/// sums for `9 c_in` taps on the stack).
pub const MAX_CHANNELS: usize = 8;

/// A 3x3, stride-1, padding-1 convolution from `c_in` planes of `h x w` to
/// `c_out` planes of the same size, computed directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Direct3x3 {
    /// Input channels, at most [`MAX_CHANNELS`].
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Plane height, in and out.
    pub h: usize,
    /// Plane width, in and out.
    pub w: usize,
}

impl Direct3x3 {
    fn plane(&self) -> usize {
        self.h * self.w
    }

    /// Floats of the scratch [`Direct3x3::weight_gradient`] and
    /// [`Direct3x3::input_gradient`] take: two planes per output channel
    /// (the output gradient with its first or last column zeroed), or the
    /// filters turned for the adjoint convolution.
    pub fn scratch_len(&self) -> usize {
        (2 * self.c_out * self.plane()).max(self.c_in * self.c_out * 9)
    }

    /// `out = conv(x) (+ bias)` for `rows` samples (sample-major in and
    /// out) with filters `weights` (`c_out x c_in x 3 x 3`). `out` is
    /// overwritten.
    pub fn forward(&self, weights: &[f32], bias: Option<&[f32]>, x: &[f32], rows: usize, out: &mut [f32]) {
        let (il, ol) = (self.c_in * self.plane(), self.c_out * self.plane());
        let (weights, x) = (&weights[..self.c_out * self.c_in * 9], &x[..rows * il]);
        for_each_row_mut(&mut out[..rows * ol], ol, |s, sample| {
            forward_sample(*self, weights, bias, &x[s * il..][..il], sample)
        });
    }

    /// The gradient of the filters, `dw` (`c_out x c_in x 3 x 3`), and of
    /// the bias, `db` (`c_out`), both overwritten, for `rows` samples of
    /// input `x` and output gradient `dout`. `scratch` holds
    /// [`Direct3x3::scratch_len`] floats.
    pub fn weight_gradient(
        &self,
        x: &[f32],
        dout: &[f32],
        rows: usize,
        dw: &mut [f32],
        db: &mut [f32],
        scratch: &mut [f32],
    ) {
        assert!(self.c_in <= MAX_CHANNELS, "direct 3x3 convolution: {} input channels", self.c_in);
        let (x, dout) = (&x[..rows * self.c_in * self.plane()], &dout[..rows * self.c_out * self.plane()]);
        let dw = &mut dw[..self.c_out * self.c_in * 9];
        let scratch = &mut scratch[..2 * self.c_out * self.plane()];
        (dw.par_chunks_mut(self.c_in * 9).zip(db[..self.c_out].par_iter_mut()))
            .zip(scratch.par_chunks_mut(2 * self.plane()))
            .enumerate()
            .for_each(|(k, ((dw_k, db_k), edges))| filter_gradient(*self, x, dout, rows, k, dw_k, db_k, edges));
    }

    /// The gradient of the input, `dx` (overwritten), for `rows` samples of
    /// output gradient `dout`: the same convolution with the filters turned
    /// 180 degrees and their channel axes swapped, which are written into
    /// `scratch` ([`Direct3x3::scratch_len`] floats).
    pub fn input_gradient(&self, weights: &[f32], dout: &[f32], rows: usize, dx: &mut [f32], scratch: &mut [f32]) {
        let turned = &mut scratch[..self.c_in * self.c_out * 9];
        for c in 0..self.c_in {
            for k in 0..self.c_out {
                let f = &weights[(k * self.c_in + c) * 9..][..9];
                for (t, g) in turned[(c * self.c_out + k) * 9..][..9].iter_mut().enumerate() {
                    *g = f[8 - t];
                }
            }
        }
        let adjoint = Direct3x3 { c_in: self.c_out, c_out: self.c_in, ..*self };
        adjoint.forward(turned, None, dout, rows, dx);
    }

    /// The range of flat output positions whose tap `(i, j)` reads inside
    /// the plane, and that tap's offset from output to input position.
    fn tap_range(&self, i: usize, j: usize) -> (std::ops::Range<usize>, isize) {
        let offset = (i as isize - 1) * self.w as isize + j as isize - 1;
        let plane = self.plane() as isize;
        let lo = (-offset).clamp(0, plane);
        let hi = (plane - offset).clamp(lo, plane);
        (lo as usize..hi as usize, offset)
    }
}

svp_tensor::multiversion! {
    /// [`Direct3x3::forward`] for one sample `xs` into its output `sample`.
    fn forward_sample(conv: Direct3x3, weights: &[f32], bias: Option<&[f32]>, xs: &[f32], sample: &mut [f32]) {
        let (h, w, plane) = (conv.h, conv.w, conv.plane());
        for (k, out_k) in sample.chunks_exact_mut(plane).enumerate() {
            let b = bias.map_or(0.0, |b| b[k]);
            out_k.fill(b);
            let filters = &weights[k * conv.c_in * 9..][..conv.c_in * 9];
            for (xc, f) in xs.chunks_exact(plane).zip(filters.chunks_exact(9)) {
                for (tap, &t) in f.iter().enumerate() {
                    let (range, offset) = conv.tap_range(tap / 3, tap % 3);
                    if range.is_empty() {
                        continue;
                    }
                    let src = &xc[range.start.wrapping_add_signed(offset)..][..range.len()];
                    for (o, &v) in out_k[range].iter_mut().zip(src) {
                        *o += t * v;
                    }
                }
            }
            // The edge columns, whose side taps read across a row's end
            // above, again term by term in the same order.
            for y in 0..h {
                for x in [0, w - 1] {
                    let mut sum = b;
                    for (xc, f) in xs.chunks_exact(plane).zip(filters.chunks_exact(9)) {
                        for (tap, &t) in f.iter().enumerate() {
                            let (yy, xx) = ((y + tap / 3).checked_sub(1), (x + tap % 3).checked_sub(1));
                            if let (Some(yy), Some(xx)) = (yy.filter(|&r| r < h), xx.filter(|&q| q < w)) {
                                sum += t * xc[yy * w + xx];
                            }
                        }
                    }
                    out_k[y * w + x] = sum;
                }
            }
        }
    }
}

svp_tensor::multiversion! {
    /// [`Direct3x3::weight_gradient`] for output channel `k`: its filters'
    /// gradient `dw_k` (`c_in x 3 x 3`) and its bias' `db_k`; `edges` holds
    /// two planes.
    #[allow(clippy::too_many_arguments)]
    fn filter_gradient(
        conv: Direct3x3,
        x: &[f32],
        dout: &[f32],
        rows: usize,
        k: usize,
        dw_k: &mut [f32],
        db_k: &mut f32,
        edges: &mut [f32],
    ) {
        let (w, plane) = (conv.w, conv.plane());
        let mut taps = [[0.0f32; LANES]; 9 * MAX_CHANNELS];
        let mut bias = [0.0f32; LANES];
        let (no_first, no_last) = edges.split_at_mut(plane);
        for s in 0..rows {
            let dy = &dout[(s * conv.c_out + k) * plane..][..plane];
            sum_lanes(&mut bias, dy, dy, |d, _| d);
            // A left tap (j = 0) of column 0 and a right tap (j = 2) of the
            // last column read across a row's end: their output gradient is
            // zeroed for those taps, so the products there are exact zeros.
            no_first.copy_from_slice(dy);
            no_last.copy_from_slice(dy);
            for row in 0..conv.h {
                no_first[row * w] = 0.0;
                no_last[row * w + w - 1] = 0.0;
            }
            for c in 0..conv.c_in {
                let xc = &x[(s * conv.c_in + c) * plane..][..plane];
                for (tap, lanes) in taps[c * 9..][..9].iter_mut().enumerate() {
                    let (range, offset) = conv.tap_range(tap / 3, tap % 3);
                    if range.is_empty() {
                        continue;
                    }
                    let src = &xc[range.start.wrapping_add_signed(offset)..][..range.len()];
                    let dy = match tap % 3 {
                        0 => &no_first[range],
                        1 => &dy[range],
                        _ => &no_last[range],
                    };
                    sum_lanes(lanes, dy, src, |d, v| d * v);
                }
            }
        }
        for (g, lanes) in dw_k.iter_mut().zip(&taps) {
            *g = lanes.iter().sum();
        }
        *db_k = bias.iter().sum();
    }
}

/// `lanes[l] += term(a[q], b[q])` for every `q`, lane `l = q mod 16`.
#[inline(always)]
fn sum_lanes(lanes: &mut [f32; LANES], a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) {
    let (whole_a, rest_a) = a.as_chunks::<LANES>();
    let (whole_b, rest_b) = b[..a.len()].as_chunks::<LANES>();
    for (a, b) in whole_a.iter().zip(whole_b) {
        for ((l, &p), &q) in lanes.iter_mut().zip(a).zip(b) {
            *l += term(p, q);
        }
    }
    for ((l, &p), &q) in lanes.iter_mut().zip(rest_a).zip(rest_b) {
        *l += term(p, q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize, salt: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 - 1001.0) * 1e-3).collect()
    }

    /// `x[s][c][y + i - 1][x + j - 1]`, zero over the padding.
    fn at(x: &[f32], conv: &Direct3x3, s: usize, c: usize, y: isize, xx: isize) -> f64 {
        if y < 0 || xx < 0 || y >= conv.h as isize || xx >= conv.w as isize {
            return 0.0;
        }
        x[((s * conv.c_in + c) * conv.h + y as usize) * conv.w + xx as usize] as f64
    }

    const SHAPES: [(usize, usize, usize, usize, usize); 5] =
        [(1, 1, 1, 1, 1), (1, 3, 5, 7, 2), (2, 4, 6, 6, 3), (1, 32, 28, 28, 2), (7, 5, 3, 17, 4)];

    /// Against the direct sum in f64 over several shapes (one-pixel
    /// planes, odd sides, rows longer than the 16 lanes).
    #[test]
    fn forward_and_gradients_match_the_direct_sums() {
        for (n, &(c_in, c_out, h, w, rows)) in SHAPES.iter().enumerate() {
            let conv = Direct3x3 { c_in, c_out, h, w };
            let (wts, bias) = (wave(c_out * c_in * 9, n), wave(c_out, n + 10));
            let (x, dy) = (wave(rows * c_in * h * w, n + 20), wave(rows * c_out * h * w, n + 30));
            let mut out = vec![f32::NAN; rows * c_out * h * w];
            conv.forward(&wts, Some(&bias), &x, rows, &mut out);
            let (mut dw, mut db) = (vec![f32::NAN; wts.len()], vec![f32::NAN; c_out]);
            let mut scratch = vec![f32::NAN; conv.scratch_len()];
            conv.weight_gradient(&x, &dy, rows, &mut dw, &mut db, &mut scratch);
            let mut dx = vec![f32::NAN; x.len()];
            conv.input_gradient(&wts, &dy, rows, &mut dx, &mut scratch);

            let mut want_dw = vec![0.0f64; wts.len()];
            let mut want_db = vec![0.0f64; c_out];
            let mut want_dx = vec![0.0f64; x.len()];
            for s in 0..rows {
                for k in 0..c_out {
                    for y in 0..h {
                        for xx in 0..w {
                            let o = ((s * c_out + k) * h + y) * w + xx;
                            let mut want = bias[k] as f64;
                            want_db[k] += dy[o] as f64;
                            for c in 0..c_in {
                                for i in 0..3 {
                                    for j in 0..3 {
                                        let t = (k * c_in + c) * 9 + i * 3 + j;
                                        let (yy, xj) = (y as isize + i as isize - 1, xx as isize + j as isize - 1);
                                        let v = at(&x, &conv, s, c, yy, xj);
                                        want += wts[t] as f64 * v;
                                        want_dw[t] += dy[o] as f64 * v;
                                        if yy >= 0 && xj >= 0 && yy < h as isize && xj < w as isize {
                                            let xi = ((s * c_in + c) * h + yy as usize) * w + xj as usize;
                                            want_dx[xi] += wts[t] as f64 * dy[o] as f64;
                                        }
                                    }
                                }
                            }
                            let got = out[o] as f64;
                            assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{n}: out {o}: {got} vs {want}");
                        }
                    }
                }
            }
            let terms = (rows * h * w) as f64;
            for (t, (&g, &e)) in dw.iter().zip(&want_dw).enumerate() {
                assert!((g as f64 - e).abs() <= 1e-6 * terms.sqrt() * (1.0 + e.abs()), "{n}: dw {t}: {g} vs {e}");
            }
            for (k, (&g, &e)) in db.iter().zip(&want_db).enumerate() {
                assert!((g as f64 - e).abs() <= 1e-6 * terms.sqrt() * (1.0 + e.abs()), "{n}: db {k}: {g} vs {e}");
            }
            for (i, (&g, &e)) in dx.iter().zip(&want_dx).enumerate() {
                assert!((g as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()), "{n}: dx {i}: {g} vs {e}");
            }
        }
    }

    /// One thread or many, the same bits.
    #[test]
    fn threads_do_not_change_the_bits() {
        let conv = Direct3x3 { c_in: 2, c_out: 6, h: 13, w: 21 };
        let (wts, x, dy) = (wave(6 * 2 * 9, 1), wave(9 * 2 * 13 * 21, 2), wave(9 * 6 * 13 * 21, 3));
        let run = || {
            let mut out = vec![0.0; dy.len()];
            conv.forward(&wts, None, &x, 9, &mut out);
            let (mut dw, mut db) = (vec![0.0; wts.len()], vec![0.0; 6]);
            let mut scratch = vec![0.0; conv.scratch_len()];
            conv.weight_gradient(&x, &dy, 9, &mut dw, &mut db, &mut scratch);
            let mut dx = vec![0.0; x.len()];
            conv.input_gradient(&wts, &dy, 9, &mut dx, &mut scratch);
            [out, dw, db, dx].concat()
        };
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(run);
        let four = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap().install(run);
        assert!(one.iter().zip(&four).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}
