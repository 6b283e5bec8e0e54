//! Winograd's F(2x2, 3x3) for 3x3 convolutions with stride 1 and padding 1,
//! the CNN's every conv after the first: 16 multiplications per 2x2 output
//! tile and channel pair instead of im2col's 36.
//!
//! Each 4x4 input tile `d` becomes `V = Bᵀ d B`, each 3x3 filter `g`
//! becomes `U = G g Gᵀ`, and a tile of output is `Aᵀ (Σ_c U ⊙ V) A`. The sum
//! over input channels of the 16 elementwise products is 16 GEMMs, one per
//! position `ξ` in the 4x4 tile: `M_ξ (c_out x tiles) = U_ξ (c_out x c_in)
//! V_ξ (c_in x tiles)`. Lavin and Gray, "Fast Algorithms for Convolutional
//! Neural Networks", CVPR 2016.
//!
//! The input gradient of such a convolution is the same convolution of the
//! output gradient with the filters turned 180 degrees and their channel
//! axes swapped, so [`Winograd::adjoint`] runs it through the same code.
//! The filters' gradient is the algorithm transposed
//! ([`Winograd::weight_gradient`]): `Gᵀ [Σ_tiles (A dY Aᵀ) ⊙ (Bᵀ d B)] G`.
//!
//! Every transform is a fixed sequence of additions and halvings on each
//! value, so the bits are the same on every instruction set and thread count.

use rayon::prelude::*;
use svp_tensor::{ShapeBuilder, for_each_row_mut, gemm_with_chunks, view, view_mut};

/// Positions in a transformed 4x4 tile: one GEMM each.
const XI: usize = 16;

/// Tile columns a group of samples aims for: each of the 16 GEMMs gets this
/// many columns.
const GROUP_TILES: usize = 1024;
/// Most floats of a group's transformed input and product (2 MiB, as im2col's
/// group): a tile's column holds 16 values per channel in and out but stands
/// for four output values, so a group covers about as many outputs as
/// im2col's does.
const GROUP_FLOATS: usize = 1 << 19;

/// A 3x3, stride-1, padding-1 convolution from `c_in` planes of `h x w` to
/// `c_out` planes of the same size, computed with F(2x2, 3x3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Winograd {
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Plane height, in and out.
    pub h: usize,
    /// Plane width, in and out.
    pub w: usize,
}

impl Winograd {
    /// The convolution that carries an output gradient back to the input:
    /// channels swapped (the filters are turned by [`transform_filters`]).
    pub fn adjoint(&self) -> Winograd {
        Winograd { c_in: self.c_out, c_out: self.c_in, ..*self }
    }

    /// Tile rows and columns: 2x2 outputs each, the last row or column half
    /// outside the plane when its side is odd.
    fn tiles(&self) -> (usize, usize) {
        (self.h.div_ceil(2), self.w.div_ceil(2))
    }

    fn tiles_per_sample(&self) -> usize {
        let (th, tw) = self.tiles();
        th * tw
    }

    /// Samples transformed together for one round of 16 GEMMs.
    pub fn group_size(&self) -> usize {
        let t = self.tiles_per_sample().max(1);
        let per_sample = XI * (self.c_in + self.c_out) * t;
        (GROUP_TILES / t).min(GROUP_FLOATS / per_sample.max(1)).max(1)
    }

    /// Floats of the transformed filters ([`transform_filters`]).
    pub fn filter_len(&self) -> usize {
        XI * self.c_out * self.c_in
    }

    /// Floats of the scratch [`Winograd::forward`] takes: one group's
    /// transformed input and products.
    pub fn scratch_len(&self) -> usize {
        XI * (self.c_in + self.c_out) * self.tiles_per_sample() * self.group_size()
    }

    /// `out = conv(x) (+ bias)` for `rows` samples of `c_in x h x w`
    /// (sample-major in and out), from filters transformed for this
    /// convolution by [`transform_filters`]. `out` is overwritten.
    pub fn forward(
        &self,
        u: &[f32],
        bias: Option<&[f32]>,
        x: &[f32],
        rows: usize,
        out: &mut [f32],
        scratch: &mut [f32],
    ) {
        let (il, ol) = (self.c_in * self.h * self.w, self.c_out * self.h * self.w);
        let (t, group) = (self.tiles_per_sample(), self.group_size());
        let (v, m) = scratch[..self.scratch_len()].split_at_mut(XI * self.c_in * t * group);
        for g0 in (0..rows).step_by(group) {
            let n = group.min(rows - g0);
            let cols = n * t;
            let v = &mut v[..XI * self.c_in * cols];
            let m = &mut m[..XI * self.c_out * cols];
            self.transform_input(&x[g0 * il..(g0 + n) * il], n, v);
            let v = &v[..];
            m.par_chunks_mut(self.c_out * cols).enumerate().for_each(|(xi, m_xi)| {
                let v_xi = position(v, xi, self.c_in, cols);
                let u_xi = view(&u[xi * self.c_out * self.c_in..], self.c_out, self.c_in);
                gemm_with_chunks(1.0, u_xi, v_xi, 0.0, view_mut(m_xi, self.c_out, cols), 1);
            });
            self.transform_output(m, n, bias, &mut out[g0 * ol..(g0 + n) * ol]);
        }
    }

    /// The gradient of the filters, `dW` (`c_out x c_in x 3 x 3`,
    /// overwritten), for `rows` samples of input `x` and output gradient
    /// `dout` (sample-major): the forward's algorithm transposed,
    /// `dW = Gᵀ [Σ_tiles (A dY Aᵀ) ⊙ (Bᵀ d B)] G`, its sum over tiles 16
    /// GEMMs of depth `tiles` per group of samples, accumulated in `acc`
    /// ([`Winograd::filter_len`] floats). `scratch` holds
    /// [`Winograd::scratch_len`] floats.
    pub fn weight_gradient(
        &self,
        x: &[f32],
        dout: &[f32],
        rows: usize,
        dw: &mut [f32],
        acc: &mut [f32],
        scratch: &mut [f32],
    ) {
        let (il, ol) = (self.c_in * self.h * self.w, self.c_out * self.h * self.w);
        let (t, group) = (self.tiles_per_sample(), self.group_size());
        let (c_in, c_out) = (self.c_in, self.c_out);
        let (v, e) = scratch[..self.scratch_len()].split_at_mut(XI * c_in * t * group);
        let acc = &mut acc[..self.filter_len()];
        for g0 in (0..rows).step_by(group) {
            let n = group.min(rows - g0);
            let cols = n * t;
            let v = &mut v[..XI * c_in * cols];
            let e = &mut e[..XI * c_out * cols];
            self.transform_input(&x[g0 * il..(g0 + n) * il], n, v);
            self.transform_output_gradient(&dout[g0 * ol..(g0 + n) * ol], n, e);
            let (v, e) = (&v[..], &e[..]);
            let beta = if g0 == 0 { 0.0 } else { 1.0 };
            // Σ over this group's tiles of E_ξ V_ξᵀ, into (c_out x c_in) block ξ of `acc`.
            acc.par_chunks_mut(c_out * c_in).enumerate().for_each(|(xi, acc_xi)| {
                let (e_xi, v_xi) = (position(e, xi, c_out, cols), position(v, xi, c_in, cols));
                gemm_with_chunks(1.0, e_xi, v_xi.t(), beta, view_mut(acc_xi, c_out, c_in), 1);
            });
        }
        for (f, dw_f) in dw[..c_out * c_in * 9].chunks_exact_mut(9).enumerate() {
            let mut m = [0.0f32; XI];
            for (xi, mv) in m.iter_mut().enumerate() {
                *mv = acc[xi * c_out * c_in + f];
            }
            dw_f.copy_from_slice(&filter_gradient(&m));
        }
    }

    /// `A dY Aᵀ` for every 2x2 tile of the output gradient of `n` samples
    /// (zero past an odd plane edge) into `e`, laid out as
    /// [`Winograd::transform_input`] lays out its tiles:
    /// `[channel][ξ][sample, tile row, tile column]`.
    fn transform_output_gradient(&self, dout: &[f32], n: usize, e: &mut [f32]) {
        let cols = n * self.tiles_per_sample();
        for_each_row_mut(e, XI * cols, |k, block| output_gradient_channel(*self, dout, n, k, block));
    }

    /// `V = Bᵀ d B` for every 4x4 input tile of `n` samples into `v`, laid
    /// out `[channel][ξ][sample, tile row, tile column]`: each channel is one
    /// task and writes one contiguous block.
    fn transform_input(&self, x: &[f32], n: usize, v: &mut [f32]) {
        let cols = n * self.tiles_per_sample();
        for_each_row_mut(v, XI * cols, |c, block| input_channel(*self, x, n, c, block));
    }

    /// `Y = Aᵀ M A` for every tile of `n` samples from the products `m`
    /// (`[ξ][c_out][sample, tile]`), plus the bias, into `out` (sample-major,
    /// overwritten); a tile's outputs past an odd plane edge are dropped.
    fn transform_output(&self, m: &[f32], n: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        let plane = self.h * self.w;
        for_each_row_mut(out, self.c_out * plane, |s, sample| output_sample(*self, m, n, s, bias, sample));
    }
}

/// Position `ξ` of every tile of a transformed block laid out
/// `[channel][ξ][tile]` (`channels` rows of `cols` tiles): row `c` is at
/// `(c * 16 + ξ) * cols`.
fn position(block: &[f32], xi: usize, channels: usize, cols: usize) -> svp_tensor::ArrayView2<'_, f32> {
    let values = &block[xi * cols..(channels - 1) * XI * cols + (xi + 1) * cols];
    svp_tensor::ArrayView2::from_shape((channels, cols).strides((XI * cols, 1)), values)
        .expect("strided view inside a transformed block")
}

/// Tiles transformed together along a tile row, in stack arrays the
/// compiler keeps in registers and L1 and vectorizes: 8, or 4 where a tile
/// row has no more (7-wide planes), so that half of each strip is not
/// padding. The strip's width changes no arithmetic, only how many tiles
/// share the vector lanes.
const STRIP: usize = 8;
const NARROW_STRIP: usize = 4;

svp_tensor::multiversion! {
    /// [`Winograd::transform_input`] for channel `c` of the `n` samples `x`
    /// into its block of `v`.
    fn input_channel(wg: Winograd, x: &[f32], n: usize, c: usize, block: &mut [f32]) {
        if wg.tiles().1 <= NARROW_STRIP {
            input_channel_in::<NARROW_STRIP, { 2 * NARROW_STRIP + 2 }>(wg, x, n, c, block)
        } else {
            input_channel_in::<STRIP, { 2 * STRIP + 2 }>(wg, x, n, c, block)
        }
    }
}

/// [`input_channel`] in strips of `S` tiles, each reading `SPAN = 2S + 2`
/// input columns (stable Rust cannot compute one from the other).
#[inline(always)]
fn input_channel_in<const S: usize, const SPAN: usize>(wg: Winograd, x: &[f32], n: usize, c: usize, block: &mut [f32]) {
    debug_assert_eq!(SPAN, 2 * S + 2);
    let (h, w) = (wg.h, wg.w);
    let (th, tw) = wg.tiles();
    let (plane, t) = (h * w, th * tw);
    let cols = n * t;
    let mut strip = [[0.0f32; S]; XI];
    for s in 0..n {
        let xs = &x[(s * wg.c_in + c) * plane..][..plane];
        for ty in 0..th {
            // Input rows 2ty-1 ..= 2ty+2; None over the padding. (Loops
            // rather than `array::from_fn`, whose closure calls stay out
            // of line, compiled for the baseline instruction set.)
            let mut rows: [Option<&[f32]>; 4] = [None; 4];
            for (i, row) in rows.iter_mut().enumerate() {
                *row = (2 * ty + i).checked_sub(1).filter(|&y| y < h).map(|y| &xs[y * w..][..w]);
            }
            for k0 in (0..tw).step_by(S) {
                let tiles = S.min(tw - k0);
                input_strip::<S, SPAN>(&rows, 2 * k0, tiles, &mut strip);
                store_strip(&strip, tiles, s * t + ty * tw + k0, cols, block);
            }
        }
    }
}

/// Stores a strip of `tiles` transformed tiles (position ξ of tile k in
/// `strip[ξ][k]`) at tile column `col` of a block laid out `[ξ][cols]`.
/// A whole strip's store is one vector move where a short one is a
/// `memmove` call. Its values past `tiles` land on tiles of the same ξ row
/// that come later in the caller's loop and are overwritten then; only a
/// row's last strip would spill into the next row, and takes the short copy.
#[inline(always)]
fn store_strip<const S: usize>(strip: &[[f32; S]; XI], tiles: usize, col: usize, cols: usize, block: &mut [f32]) {
    if col + S <= cols {
        for (xi, values) in strip.iter().enumerate() {
            let dst: &mut [f32; S] = (&mut block[xi * cols + col..][..S]).try_into().unwrap();
            *dst = *values;
        }
    } else {
        for (xi, values) in strip.iter().enumerate() {
            block[xi * cols + col..][..tiles].copy_from_slice(&values[..tiles]);
        }
    }
}

/// `Bᵀ d B` for `tiles` (at most `S`) consecutive tiles of one tile
/// row: `rows` are its four input rows (None: padding), `x0` the first
/// tile's first output column. `out[ξ][k]` is position ξ of tile k.
#[inline(always)]
fn input_strip<const S: usize, const SPAN: usize>(
    rows: &[Option<&[f32]>; 4],
    x0: usize,
    tiles: usize,
    out: &mut [[f32; S]; XI],
) {
    // Columns x0-1 ..= x0+2*tiles of each row, zero outside the plane.
    let mut d = [[0.0f32; SPAN]; 4];
    for (row, dr) in rows.iter().zip(d.iter_mut()) {
        if let Some(row) = row {
            let first = x0.saturating_sub(1);
            let last = (x0 + 2 * tiles + 1).min(row.len());
            let at = first + 1 - x0;
            dr[at..at + last - first].copy_from_slice(&row[first..last]);
        }
    }
    // Bᵀ down the columns, then along the rows (tile k at columns 2k ..= 2k+3).
    for (i, rows_i) in out.chunks_exact_mut(4).enumerate() {
        let mut vi = [0.0f32; SPAN];
        for (q, v) in vi.iter_mut().enumerate() {
            *v = match i {
                0 => d[0][q] - d[2][q],
                1 => d[1][q] + d[2][q],
                2 => d[2][q] - d[1][q],
                _ => d[1][q] - d[3][q],
            };
        }
        for k in 0..S {
            let a = [vi[2 * k], vi[2 * k + 1], vi[2 * k + 2], vi[2 * k + 3]];
            rows_i[0][k] = a[0] - a[2];
            rows_i[1][k] = a[1] + a[2];
            rows_i[2][k] = a[2] - a[1];
            rows_i[3][k] = a[1] - a[3];
        }
    }
}

svp_tensor::multiversion! {
    /// [`Winograd::transform_output`] for sample `s` into its row of the output.
    fn output_sample(wg: Winograd, m: &[f32], n: usize, s: usize, bias: Option<&[f32]>, sample: &mut [f32]) {
        if wg.tiles().1 <= NARROW_STRIP {
            output_sample_in::<NARROW_STRIP, { 2 * NARROW_STRIP }>(wg, m, n, s, bias, sample)
        } else {
            output_sample_in::<STRIP, { 2 * STRIP }>(wg, m, n, s, bias, sample)
        }
    }
}

/// [`output_sample`] in strips of `S` tiles, `W2 = 2S` output columns each.
#[inline(always)]
fn output_sample_in<const S: usize, const W2: usize>(
    wg: Winograd,
    m: &[f32],
    n: usize,
    s: usize,
    bias: Option<&[f32]>,
    sample: &mut [f32],
) {
    debug_assert_eq!(W2, 2 * S);
    let (h, w, c_out) = (wg.h, wg.w, wg.c_out);
    let (th, tw) = wg.tiles();
    let t = th * tw;
    let cols = n * t;
    let plane = h * w;
    let mut y = [[0.0f32; W2]; 2];
    for (k, ys) in sample.chunks_exact_mut(plane).enumerate() {
        let b = bias.map_or(0.0, |b| b[k]);
        for ty in 0..th {
            for k0 in (0..tw).step_by(S) {
                let tiles = S.min(tw - k0);
                let col = k * cols + s * t + ty * tw + k0;
                output_strip::<S, W2>(m, c_out * cols, col, tiles, b, &mut y);
                let (x0, len) = (2 * k0, (2 * tiles).min(w - 2 * k0));
                for (i, yi) in y.iter().enumerate().take(h - 2 * ty) {
                    ys[(2 * ty + i) * w + x0..][..len].copy_from_slice(&yi[..len]);
                }
            }
        }
    }
}

/// `Aᵀ M A + bias` for `tiles` consecutive tiles of one tile row, position ξ
/// of tile k at `m[ξ * stride + col + k]`: the tile row's two output rows,
/// two columns a tile, into `y`.
#[inline(always)]
fn output_strip<const S: usize, const W2: usize>(
    m: &[f32],
    stride: usize,
    col: usize,
    tiles: usize,
    bias: f32,
    y: &mut [[f32; W2]; 2],
) {
    let mut p = [[0.0f32; S]; XI];
    // Whole-strip loads (vector moves) where they stay inside `m`: the
    // values past `tiles` only fill lanes whose results are dropped.
    if (XI - 1) * stride + col + S <= m.len() {
        for (xi, dst) in p.iter_mut().enumerate() {
            *dst = m[xi * stride + col..][..S].try_into().unwrap();
        }
    } else {
        for (xi, dst) in p.iter_mut().enumerate() {
            dst[..tiles].copy_from_slice(&m[xi * stride + col..][..tiles]);
        }
    }
    // Aᵀ down the columns, then along the rows.
    for (i, yi) in y.iter_mut().enumerate() {
        let mut r = [[0.0f32; S]; 4];
        for (j, rj) in r.iter_mut().enumerate() {
            for (k, v) in rj.iter_mut().enumerate() {
                *v =
                    if i == 0 { p[j][k] + p[4 + j][k] + p[8 + j][k] } else { p[4 + j][k] - p[8 + j][k] - p[12 + j][k] };
            }
        }
        for k in 0..S {
            yi[2 * k] = r[0][k] + r[1][k] + r[2][k] + bias;
            yi[2 * k + 1] = r[1][k] - r[2][k] - r[3][k] + bias;
        }
    }
}

svp_tensor::multiversion! {
    /// [`Winograd::transform_output_gradient`] for output channel `k` of
    /// the `n` samples' gradient `dout` into its block of `e`.
    fn output_gradient_channel(wg: Winograd, dout: &[f32], n: usize, k: usize, block: &mut [f32]) {
        if wg.tiles().1 <= NARROW_STRIP {
            output_gradient_channel_in::<NARROW_STRIP, { 2 * NARROW_STRIP }>(wg, dout, n, k, block)
        } else {
            output_gradient_channel_in::<STRIP, { 2 * STRIP }>(wg, dout, n, k, block)
        }
    }
}

/// [`output_gradient_channel`] in strips of `S` tiles, `W2 = 2S` gradient
/// columns each, stored whole as [`input_channel_in`] stores its strips.
#[inline(always)]
fn output_gradient_channel_in<const S: usize, const W2: usize>(
    wg: Winograd,
    dout: &[f32],
    n: usize,
    k: usize,
    block: &mut [f32],
) {
    debug_assert_eq!(W2, 2 * S);
    let (h, w) = (wg.h, wg.w);
    let (th, tw) = wg.tiles();
    let (plane, t) = (h * w, th * tw);
    let cols = n * t;
    let mut strip = [[0.0f32; S]; XI];
    for s in 0..n {
        let ys = &dout[(s * wg.c_out + k) * plane..][..plane];
        for ty in 0..th {
            let top = &ys[2 * ty * w..][..w];
            let bottom = (2 * ty + 1 < h).then(|| &ys[(2 * ty + 1) * w..][..w]);
            for k0 in (0..tw).step_by(S) {
                let tiles = S.min(tw - k0);
                let (x0, len) = (2 * k0, (2 * tiles).min(w - 2 * k0));
                // The strip's two gradient rows, zero past the plane.
                // Whole-strip loads (vector moves) where the strip lies
                // inside the row; a short copy is a `memmove` call.
                let load = |row: &[f32]| -> [f32; W2] {
                    match row.get(x0..x0 + W2) {
                        Some(whole) => whole.try_into().unwrap(),
                        None => {
                            let mut v = [0.0f32; W2];
                            v[..len].copy_from_slice(&row[x0..x0 + len]);
                            v
                        }
                    }
                };
                let a = load(top);
                let b = bottom.map_or([0.0f32; W2], load);
                // A = [[1, 0], [1, 1], [1, -1], [0, -1]]: down the columns,
                // then along the rows (tile kk at columns 2kk, 2kk+1).
                for (i, rows_i) in strip.chunks_exact_mut(4).enumerate() {
                    let mut r = [0.0f32; W2];
                    for (q, v) in r.iter_mut().enumerate() {
                        *v = match i {
                            0 => a[q],
                            1 => a[q] + b[q],
                            2 => a[q] - b[q],
                            _ => -b[q],
                        };
                    }
                    for kk in 0..S {
                        let (p, q) = (r[2 * kk], r[2 * kk + 1]);
                        rows_i[0][kk] = p;
                        rows_i[1][kk] = p + q;
                        rows_i[2][kk] = p - q;
                        rows_i[3][kk] = -q;
                    }
                }
                store_strip(&strip, tiles, s * t + ty * tw + k0, cols, block);
            }
        }
    }
}

/// `Gᵀ M G` for a 4x4 `M`: the gradient of a 3x3 filter from the gradient
/// of its transform `U = G g Gᵀ`.
#[inline(always)]
fn filter_gradient(m: &[f32; XI]) -> [f32; 9] {
    let gt = |c: [f32; 4]| [c[0] + 0.5 * (c[1] + c[2]), 0.5 * (c[1] - c[2]), 0.5 * (c[1] + c[2]) + c[3]];
    let mut t = [[0.0f32; 4]; 3];
    for j in 0..4 {
        let col = gt([m[j], m[4 + j], m[8 + j], m[12 + j]]);
        for i in 0..3 {
            t[i][j] = col[i];
        }
    }
    let mut out = [0.0f32; 9];
    for i in 0..3 {
        out[i * 3..i * 3 + 3].copy_from_slice(&gt(t[i]));
    }
    out
}

/// Which way [`transform_filters`] reads the filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterUse {
    /// As stored: the forward convolution.
    Forward,
    /// Turned 180 degrees with input and output channels swapped: the
    /// convolution that carries an output gradient to the input.
    Adjoint,
}

/// `U = G g Gᵀ` for every 3x3 filter of `weights` (`c_out x c_in x 3 x 3`,
/// row-major, as [`crate::conv::Conv2d`] stores them) into `u`, laid out
/// `[ξ][out][in]` for the convolution `usage` names.
pub fn transform_filters(weights: &[f32], c_out: usize, c_in: usize, usage: FilterUse, u: &mut [f32]) {
    let (rows, cols) = match usage {
        FilterUse::Forward => (c_out, c_in),
        FilterUse::Adjoint => (c_in, c_out),
    };
    for r in 0..rows {
        for c in 0..cols {
            let mut g = [[0.0f32; 3]; 3];
            match usage {
                FilterUse::Forward => {
                    for (i, row) in g.iter_mut().enumerate() {
                        row.copy_from_slice(&weights[(r * c_in + c) * 9 + i * 3..][..3]);
                    }
                }
                FilterUse::Adjoint => {
                    // Output channel c, input channel r, turned 180 degrees.
                    let f = &weights[(c * c_in + r) * 9..][..9];
                    for (i, row) in g.iter_mut().enumerate() {
                        for (j, e) in row.iter_mut().enumerate() {
                            *e = f[(2 - i) * 3 + (2 - j)];
                        }
                    }
                }
            }
            for (xi, &e) in filter_tile(&g).iter().enumerate() {
                u[(xi * rows + r) * cols + c] = e;
            }
        }
    }
}

/// `G g Gᵀ` with `G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]`.
#[inline(always)]
fn filter_tile(g: &[[f32; 3]; 3]) -> [f32; XI] {
    let gm = |a: [f32; 3]| [a[0], 0.5 * (a[0] + a[1] + a[2]), 0.5 * (a[0] - a[1] + a[2]), a[2]];
    let mut t = [[0.0f32; 3]; 4];
    for j in 0..3 {
        let col = gm([g[0][j], g[1][j], g[2][j]]);
        for i in 0..4 {
            t[i][j] = col[i];
        }
    }
    let mut out = [0.0f32; XI];
    for i in 0..4 {
        out[i * 4..i * 4 + 4].copy_from_slice(&gm(t[i]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct 3x3, stride-1, padding-1 convolution in f64.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        wts: &[f32],
        bias: &[f32],
        x: &[f32],
        rows: usize,
        c_in: usize,
        c_out: usize,
        h: usize,
        w: usize,
    ) -> Vec<f64> {
        let mut out = vec![0.0f64; rows * c_out * h * w];
        for s in 0..rows {
            for k in 0..c_out {
                for y in 0..h {
                    for xx in 0..w {
                        let mut acc = bias.get(k).copied().unwrap_or(0.0) as f64;
                        for c in 0..c_in {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let (yy, xj) = (y as isize + i as isize - 1, xx as isize + j as isize - 1);
                                    if yy < 0 || xj < 0 || yy >= h as isize || xj >= w as isize {
                                        continue;
                                    }
                                    let xv = x[((s * c_in + c) * h + yy as usize) * w + xj as usize];
                                    acc += wts[((k * c_in + c) * 3 + i) * 3 + j] as f64 * xv as f64;
                                }
                            }
                        }
                        out[((s * c_out + k) * h + y) * w + xx] = acc;
                    }
                }
            }
        }
        out
    }

    fn wave(n: usize, salt: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 - 1001.0) * 1e-3).collect()
    }

    fn run(conv: Winograd, usage: FilterUse, wts: &[f32], bias: Option<&[f32]>, x: &[f32], rows: usize) -> Vec<f32> {
        let (w_out, w_in) = match usage {
            FilterUse::Forward => (conv.c_out, conv.c_in),
            FilterUse::Adjoint => (conv.c_in, conv.c_out),
        };
        let mut u = vec![0.0; conv.filter_len()];
        transform_filters(wts, w_out, w_in, usage, &mut u);
        let mut out = vec![f32::NAN; rows * conv.c_out * conv.h * conv.w];
        let mut scratch = vec![f32::NAN; conv.scratch_len()];
        conv.forward(&u, bias, x, rows, &mut out, &mut scratch);
        out
    }

    /// Over many shapes (odd and even sides, one-tile planes, groups that end
    /// short), against the direct sum, within f32 rounding of the inputs' scale.
    #[test]
    fn forward_matches_the_direct_convolution() {
        for &(c_in, c_out, h, w, rows) in &[
            (1, 1, 1, 1, 1),
            (1, 2, 2, 2, 3),
            (3, 4, 5, 7, 2),
            (8, 5, 6, 6, 5),
            (16, 8, 7, 7, 9),
            (4, 3, 28, 28, 2),
            (2, 3, 9, 4, 40),
        ] {
            let conv = Winograd { c_in, c_out, h, w };
            let wts = wave(c_out * c_in * 9, 1);
            let bias = wave(c_out, 2);
            let x = wave(rows * c_in * h * w, 3);
            let got = run(conv, FilterUse::Forward, &wts, Some(&bias), &x, rows);
            let want = naive(&wts, &bias, &x, rows, c_in, c_out, h, w);
            for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                assert!((g as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()), "{c_in}->{c_out} {h}x{w} at {i}: {g} vs {e}");
            }
        }
    }

    /// The adjoint is the input gradient: `<conv(x), dy> = <x, adjoint(dy)>`
    /// (no bias), checked against the direct convolution's transpose.
    #[test]
    fn adjoint_is_the_transpose_of_the_forward() {
        for &(c_in, c_out, h, w, rows) in &[(3, 4, 5, 7, 2), (8, 5, 6, 6, 3), (2, 6, 7, 7, 4)] {
            let conv = Winograd { c_in, c_out, h, w };
            let wts = wave(c_out * c_in * 9, 4);
            let dy = wave(rows * c_out * h * w, 5);
            let dx = run(conv.adjoint(), FilterUse::Adjoint, &wts, None, &dy, rows);
            // Direct transpose: dx[c, y, x] = Σ_k Σ_ij w[k, c, i, j] dy[k, y - i + 1, x - j + 1].
            for s in 0..rows {
                for c in 0..c_in {
                    for y in 0..h {
                        for xx in 0..w {
                            let mut acc = 0.0f64;
                            for k in 0..c_out {
                                for i in 0..3 {
                                    for j in 0..3 {
                                        let (oy, ox) = (y as isize - i as isize + 1, xx as isize - j as isize + 1);
                                        if oy < 0 || ox < 0 || oy >= h as isize || ox >= w as isize {
                                            continue;
                                        }
                                        acc += wts[((k * c_in + c) * 3 + i) * 3 + j] as f64
                                            * dy[((s * c_out + k) * h + oy as usize) * w + ox as usize] as f64;
                                    }
                                }
                            }
                            let g = dx[((s * c_in + c) * h + y) * w + xx] as f64;
                            assert!(
                                (g - acc).abs() <= 1e-5 * (1.0 + acc.abs()),
                                "{c_in}<-{c_out} {h}x{w}: {g} vs {acc}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The weight gradient against the direct sum over the output
    /// gradient and the input: `dW[k, c, i, j] = Σ dy[k, y, x] x[c, y+i-1, x+j-1]`.
    #[test]
    fn weight_gradient_matches_the_direct_sum() {
        for &(c_in, c_out, h, w, rows) in
            &[(1, 1, 1, 1, 1), (3, 4, 5, 7, 2), (8, 5, 6, 6, 5), (2, 3, 9, 4, 40), (16, 8, 7, 7, 9), (4, 3, 28, 28, 2)]
        {
            let conv = Winograd { c_in, c_out, h, w };
            let x = wave(rows * c_in * h * w, 8);
            let dy = wave(rows * c_out * h * w, 9);
            let mut dw = vec![f32::NAN; c_out * c_in * 9];
            let mut acc = vec![f32::NAN; conv.filter_len()];
            let mut scratch = vec![f32::NAN; conv.scratch_len()];
            conv.weight_gradient(&x, &dy, rows, &mut dw, &mut acc, &mut scratch);
            let scale = (rows * h * w) as f64;
            for k in 0..c_out {
                for c in 0..c_in {
                    for i in 0..3 {
                        for j in 0..3 {
                            let mut want = 0.0f64;
                            for s in 0..rows {
                                for y in 0..h {
                                    for xx in 0..w {
                                        let (yy, xj) = (y as isize + i as isize - 1, xx as isize + j as isize - 1);
                                        if yy < 0 || xj < 0 || yy >= h as isize || xj >= w as isize {
                                            continue;
                                        }
                                        want += dy[((s * c_out + k) * h + y) * w + xx] as f64
                                            * x[((s * c_in + c) * h + yy as usize) * w + xj as usize] as f64;
                                    }
                                }
                            }
                            let got = dw[((k * c_in + c) * 3 + i) * 3 + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-6 * scale.sqrt() * (1.0 + want.abs()),
                                "{c_in}->{c_out} {h}x{w} x{rows}, filter ({k}, {c}) tap ({i}, {j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// One thread or many, the same bits.
    #[test]
    fn threads_do_not_change_the_bits() {
        let conv = Winograd { c_in: 16, c_out: 8, h: 14, w: 14 };
        let wts = wave(8 * 16 * 9, 6);
        let x = wave(20 * 16 * 14 * 14, 7);
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let four = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let a = one.install(|| run(conv, FilterUse::Forward, &wts, None, &x, 20));
        let b = four.install(|| run(conv, FilterUse::Forward, &wts, None, &x, 20));
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        let dy = wave(20 * 8 * 14 * 14, 10);
        let dw = || {
            let mut dw = vec![0.0; 8 * 16 * 9];
            let (mut acc, mut scratch) = (vec![0.0; conv.filter_len()], vec![0.0; conv.scratch_len()]);
            conv.weight_gradient(&x, &dy, 20, &mut dw, &mut acc, &mut scratch);
            dw
        };
        let (a, b) = (one.install(dw), four.install(dw));
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()), "weight gradient");
    }
}
