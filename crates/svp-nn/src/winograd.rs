//! Winograd's F(4x4, 3x3) for 3x3 convolutions with stride 1 and padding 1,
//! the CNN's every conv after the first: 36 multiplications per 4x4 output
//! tile and channel pair instead of im2col's 144.
//!
//! Each 6x6 input tile `d` becomes `V = Bᵀ d B`, each 3x3 filter `g`
//! becomes `U = G g Gᵀ`, and a tile of output is `Aᵀ (Σ_c U ⊙ V) A`. The sum
//! over input channels of the 36 elementwise products is 36 GEMMs, one per
//! position `ξ` in the 6x6 tile: `M_ξ (c_out x tiles) = U_ξ (c_out x c_in)
//! V_ξ (c_in x tiles)`. Lavin and Gray, "Fast Algorithms for Convolutional
//! Neural Networks", CVPR 2016, with their interpolation points 0, ±1, ±2.
//!
//! The input gradient of such a convolution is the same convolution of the
//! output gradient with the filters turned 180 degrees and their channel
//! axes swapped, so [`Winograd::adjoint`] runs it through the same code.
//! The filters' gradient is the algorithm transposed
//! ([`Winograd::weight_gradient`]): `Gᵀ [Σ_tiles (A dY Aᵀ) ⊙ (Bᵀ d B)] G`.
//!
//! Every transform is a fixed sequence of additions and multiplications by
//! constants on each value, never fused, so the bits are the same on every
//! instruction set and thread count.

use rayon::prelude::*;
use std::ops::{Add, Mul, Sub};
use svp_tensor::{ShapeBuilder, for_each_row_mut, gemm_with_chunks, view, view_mut};

/// Outputs along each side of a tile.
const TILE: usize = 4;
/// Inputs along each side of a tile: the tile and the filter's reach.
const ALPHA: usize = TILE + 2;
/// Positions in a transformed 6x6 tile: one GEMM each.
const XI: usize = ALPHA * ALPHA;

/// Tile columns a group of samples aims for: each of the 36 GEMMs gets this
/// many columns.
const GROUP_TILES: usize = 1024;
/// Most floats of a group's transformed input and output gradient in the
/// weight gradient (2 MiB, as im2col's group). Its sums over tiles run group
/// by group, so this size is part of the result's bits.
const GROUP_FLOATS: usize = 1 << 19;
/// Threads whose share of a forward group grows the group: the forward
/// (and the input gradient), whose bits do not depend on the grouping, takes
/// [`GROUP_FLOATS`] a thread, for up to this many threads. (The CNN's SVP+
/// step on the AVX-512 host, alternating runs: at 2 threads, 4 MiB groups
/// took 123.0-125.2 ms against 129.4-131.8 ms with 2 MiB; at 1 thread, they
/// took 242-275 ms against 242-282 ms, median 274 against 249.)
const FORWARD_GROUP_THREADS: usize = 2;

/// A 3x3, stride-1, padding-1 convolution from `c_in` planes of `h x w` to
/// `c_out` planes of the same size, computed with F(4x4, 3x3).
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

    /// Tile rows and columns: 4x4 outputs each, the last row or column partly
    /// outside the plane when its side is not a multiple of 4.
    fn tiles(&self) -> (usize, usize) {
        (self.h.div_ceil(TILE), self.w.div_ceil(TILE))
    }

    fn tiles_per_sample(&self) -> usize {
        let (th, tw) = self.tiles();
        th * tw
    }

    /// Samples transformed together for one round of 36 GEMMs in
    /// [`Winograd::weight_gradient`].
    pub fn group_size(&self) -> usize {
        self.group_within(GROUP_FLOATS)
    }

    /// Samples transformed together for one round of 36 GEMMs in
    /// [`Winograd::forward`], on the current rayon pool.
    fn forward_group_size(&self) -> usize {
        let threads = rayon::current_num_threads().clamp(1, FORWARD_GROUP_THREADS);
        self.group_within(GROUP_FLOATS * threads)
    }

    /// Floats of one sample's transformed tiles and products.
    fn sample_floats(&self) -> usize {
        XI * (self.c_in + self.c_out) * self.tiles_per_sample()
    }

    /// Samples whose transformed tiles fit `floats` (at least one).
    fn group_within(&self, floats: usize) -> usize {
        let t = self.tiles_per_sample().max(1);
        (GROUP_TILES / t).min(floats / self.sample_floats().max(1)).max(1)
    }

    /// Floats of the transformed filters ([`transform_filters`]).
    pub fn filter_len(&self) -> usize {
        XI * self.c_out * self.c_in
    }

    /// Floats of the scratch [`Winograd::forward`] and
    /// [`Winograd::weight_gradient`] take: one group's transformed input and
    /// products (or output gradient), the forward's group sized for the
    /// current rayon pool. (A forward on a larger pool than the scratch was
    /// sized on takes the groups the scratch holds.)
    pub fn scratch_len(&self) -> usize {
        self.sample_floats() * self.forward_group_size().max(self.group_size())
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
        let t = self.tiles_per_sample();
        let group = self.forward_group_size().min(scratch.len() / self.sample_floats().max(1)).max(1);
        let (v, m) = scratch[..self.sample_floats() * group].split_at_mut(XI * self.c_in * t * group);
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
    /// `dW = Gᵀ [Σ_tiles (A dY Aᵀ) ⊙ (Bᵀ d B)] G`, its sum over tiles 36
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
        let (v, e) = scratch[..self.sample_floats() * group].split_at_mut(XI * c_in * t * group);
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
        let acc = &acc[..];
        dw[..c_out * c_in * 9].par_chunks_mut(c_in * 9).enumerate().for_each(|(k, dw_k)| {
            for (c, dw_f) in dw_k.chunks_exact_mut(9).enumerate() {
                let mut m = [0.0f32; XI];
                for (xi, mv) in m.iter_mut().enumerate() {
                    *mv = acc[xi * c_out * c_in + k * c_in + c];
                }
                dw_f.copy_from_slice(&filter_gradient(&m));
            }
        });
    }

    /// `A dY Aᵀ` for every 4x4 tile of the output gradient of `n` samples
    /// (zero past the plane's edge) into `e`, laid out as
    /// [`Winograd::transform_input`] lays out its tiles:
    /// `[channel][ξ][sample, tile row, tile column]`.
    fn transform_output_gradient(&self, dout: &[f32], n: usize, e: &mut [f32]) {
        let cols = n * self.tiles_per_sample();
        for_each_row_mut(e, XI * cols, |k, block| output_gradient_channel(*self, dout, n, k, block));
    }

    /// `V = Bᵀ d B` for every 6x6 input tile of `n` samples into `v`, laid
    /// out `[channel][ξ][sample, tile row, tile column]`: each channel is one
    /// task and writes one contiguous block.
    fn transform_input(&self, x: &[f32], n: usize, v: &mut [f32]) {
        let cols = n * self.tiles_per_sample();
        for_each_row_mut(v, XI * cols, |c, block| input_channel(*self, x, n, c, block));
    }

    /// `Y = Aᵀ M A` for every tile of `n` samples from the products `m`
    /// (`[ξ][c_out][sample, tile]`), plus the bias, into `out` (sample-major,
    /// overwritten); a tile's outputs past the plane's edge are dropped.
    fn transform_output(&self, m: &[f32], n: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        let plane = self.h * self.w;
        for_each_row_mut(out, self.c_out * plane, |s, sample| output_sample(*self, m, n, s, bias, sample));
    }
}

/// Position `ξ` of every tile of a transformed block laid out
/// `[channel][ξ][tile]` (`channels` rows of `cols` tiles): row `c` is at
/// `(c * 36 + ξ) * cols`.
fn position(block: &[f32], xi: usize, channels: usize, cols: usize) -> svp_tensor::ArrayView2<'_, f32> {
    let values = &block[xi * cols..(channels - 1) * XI * cols + (xi + 1) * cols];
    svp_tensor::ArrayView2::from_shape((channels, cols).strides((XI * cols, 1)), values)
        .expect("strided view inside a transformed block")
}

/// `[e(0), e(1), ...]` for the listed indices, written out: the strips'
/// loops over a tile's rows and columns, which the compiler would otherwise
/// vectorize across those six rows, with gathers, rather than across the
/// strip's lanes.
macro_rules! unrolled {
    ([$($i:literal),*], |$j:ident| $e:expr) => {
        [$({
            let $j = $i;
            $e
        }),*]
    };
}

/// What the data transforms compute on: a strip's lanes, whatever their
/// number.
trait Value: Copy + Add<Output = Self> + Sub<Output = Self> + Mul<f32, Output = Self> {}

/// One position of `S` tiles, a tile a lane. Each operation is a loop over
/// the lanes, which the compiler turns into vector instructions; written
/// as plain loops over stack arrays instead, the transforms were vectorized
/// across positions with gathers and scatters, and ran at half the speed.
#[derive(Clone, Copy)]
struct Lanes<const S: usize>([f32; S]);

impl<const S: usize> Lanes<S> {
    const ZERO: Self = Lanes([0.0; S]);
}

impl<const S: usize> Add for Lanes<S> {
    type Output = Self;
    #[inline(always)]
    fn add(mut self, other: Self) -> Self {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
        self
    }
}

impl<const S: usize> Sub for Lanes<S> {
    type Output = Self;
    #[inline(always)]
    fn sub(mut self, other: Self) -> Self {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a -= b;
        }
        self
    }
}

impl<const S: usize> Mul<f32> for Lanes<S> {
    type Output = Self;
    #[inline(always)]
    fn mul(mut self, factor: f32) -> Self {
        for a in &mut self.0 {
            *a *= factor;
        }
        self
    }
}

impl<const S: usize> Value for Lanes<S> {}

/// The 1-D transforms of F(4x4, 3x3), the data's on strips of lanes and the
/// filters' on single values. Each 2-D transform applies one down a tile's
/// columns, then along its rows.
///
/// `Bᵀ z`, the input's: `Bᵀ = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0],
/// [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0],
/// [0, 4, 0, -5, 0, 1]]`.
#[inline(always)]
fn input_1d<T: Value>(z: [T; ALPHA]) -> [T; ALPHA] {
    let (p4, q4) = (z[4] - z[2] * 4.0, z[3] - z[1] * 4.0);
    let (p1, q2) = (z[4] - z[2], (z[3] - z[1]) * 2.0);
    [z[0] * 4.0 - z[2] * 5.0 + z[4], p4 + q4, p4 - q4, p1 + q2, p1 - q2, z[1] * 4.0 - z[3] * 5.0 + z[5]]
}

/// `Aᵀ m`, the output's: `Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0],
/// [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]`.
#[inline(always)]
fn output_1d<T: Value>(m: [T; ALPHA]) -> [T; TILE] {
    let (a, b) = (m[1] + m[2], m[1] - m[2]);
    let (c, d) = (m[3] + m[4], m[3] - m[4]);
    [m[0] + a + c, b + d * 2.0, a + c * 4.0, b + d * 8.0 + m[5]]
}

/// `A q`, the output gradient's: `Aᵀ` transposed.
#[inline(always)]
fn output_gradient_1d<T: Value>(q: [T; TILE]) -> [T; ALPHA] {
    let (e, o) = (q[0] + q[2], q[1] + q[3]);
    let (e4, o2) = (q[0] + q[2] * 4.0, q[1] * 2.0 + q[3] * 8.0);
    [q[0], e + o, e - o, e4 + o2, e4 - o2, q[3]]
}

/// `G z`, the filter's: `G = [[¼, 0, 0], [-⅙, -⅙, -⅙], [-⅙, ⅙, -⅙],
/// [1/24, 1/12, ⅙], [1/24, -1/12, ⅙], [0, 0, 1]]`.
#[inline(always)]
fn filter_1d(z: [f32; 3]) -> [f32; ALPHA] {
    let s = z[0] + z[2];
    let (a, b) = (z[0] / 4.0 + z[2], z[1] / 2.0);
    [z[0] / 4.0, -(s + z[1]) / 6.0, -(s - z[1]) / 6.0, (a + b) / 6.0, (a - b) / 6.0, z[2]]
}

/// `Gᵀ c`: the gradient of a filter column from the gradient of its transform.
#[inline(always)]
fn filter_gradient_1d(c: [f32; ALPHA]) -> [f32; 3] {
    let (p, m) = (c[1] + c[2], c[1] - c[2]);
    let (p2, m2) = (c[3] + c[4], c[3] - c[4]);
    [c[0] / 4.0 + (p2 / 4.0 - p) / 6.0, (m2 / 2.0 - m) / 6.0, (p2 - p) / 6.0 + c[5]]
}

/// How the tiles are grouped into strips, the unit every transform works
/// on: `S` tiles, one a vector lane, from `S / W` tile rows of `W` tiles.
/// A plane 7 or 8 tiles wide (28-wide) takes strips of 8 along a tile row;
/// one 4 tiles wide (14-wide) takes 8 from 2 rows; one 2 tiles wide
/// (7-wide) takes 4 from 2 rows, so that few lanes are padding. (Strips of
/// 16, 4 rows of 4, were a third slower on AVX-512, it seems because a
/// strip's arrays no longer fit the registers.) The strip changes no
/// arithmetic, only which tiles share the vector lanes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Strip {
    /// 8 tiles of one row.
    Row8,
    /// 4 tiles of one row.
    Row4,
    /// 2 rows of 4 tiles.
    Rows2x4,
    /// 2 rows of 2 tiles.
    Rows2x2,
}

impl Strip {
    fn for_plane(wg: &Winograd) -> Strip {
        match wg.tiles().1 {
            2 => Strip::Rows2x2,
            4 => Strip::Rows2x4,
            1 | 3 => Strip::Row4,
            _ => Strip::Row8,
        }
    }
}

/// Calls `$f::<S, W, ...>($args)` for the strip `$strip` picks: `S` lanes,
/// `W` tiles a row, and the sizes derived from them that stable Rust cannot
/// compute from const parameters (`$derive`: `in` for the input's `W + 1`
/// groups of four columns, `out` for `4 W` columns).
macro_rules! with_strip {
    ($strip:expr, in, $f:ident($($args:expr),*)) => {
        match $strip {
            Strip::Row8 => $f::<8, 8, 9, 36>($($args),*),
            Strip::Row4 => $f::<4, 4, 5, 20>($($args),*),
            Strip::Rows2x4 => $f::<8, 4, 5, 20>($($args),*),
            Strip::Rows2x2 => $f::<4, 2, 3, 12>($($args),*),
        }
    };
    ($strip:expr, out, $f:ident($($args:expr),*)) => {
        match $strip {
            Strip::Row8 => $f::<8, 8, 32>($($args),*),
            Strip::Row4 => $f::<4, 4, 16>($($args),*),
            Strip::Rows2x4 => $f::<8, 4, 16>($($args),*),
            Strip::Rows2x2 => $f::<4, 2, 8>($($args),*),
        }
    };
}

/// The strips of one sample's plane: `(first tile row, first tile column,
/// tiles)` for each, in the order of the tiles' columns.
#[inline(always)]
fn strips<const S: usize, const W: usize>(wg: &Winograd) -> impl Iterator<Item = (usize, usize, usize)> {
    let (th, tw) = wg.tiles();
    let rows = S / W;
    (0..th).step_by(rows).flat_map(move |ty0| {
        (0..tw).step_by(W).map(move |k0| (ty0, k0, if rows == 1 { W.min(tw - k0) } else { rows.min(th - ty0) * W }))
    })
}

svp_tensor::multiversion! {
    /// [`Winograd::transform_input`] for channel `c` of the `n` samples `x`
    /// into its block of `v`.
    fn input_channel(wg: Winograd, x: &[f32], n: usize, c: usize, block: &mut [f32]) {
        with_strip!(Strip::for_plane(&wg), in, input_channel_in(wg, x, n, c, block))
    }
}

/// [`input_channel`] in strips of `S` tiles, `W` a tile row, each row of a
/// strip reading `SPAN = 4N` input columns, `N = W + 1`.
#[inline(always)]
fn input_channel_in<const S: usize, const W: usize, const N: usize, const SPAN: usize>(
    wg: Winograd,
    x: &[f32],
    n: usize,
    c: usize,
    block: &mut [f32],
) {
    debug_assert!(S.is_multiple_of(W) && N == W + 1 && SPAN == TILE * N);
    let (h, w) = (wg.h, wg.w);
    let plane = h * w;
    let (t, cols) = (wg.tiles_per_sample(), n * wg.tiles_per_sample());
    let tile_columns = wg.tiles().1;
    for s in 0..n {
        for (ty0, k0, tiles) in strips::<S, W>(&wg) {
            // lo[i][φ]: input row i of each tile, columns 4k + φ - 1 (φ = 0..4);
            // hi[i][φ]: columns 4k + φ + 3 (φ = 0, 1), the next group's first two.
            let mut lo = [[Lanes::<S>::ZERO; TILE]; ALPHA];
            let mut hi = [[Lanes::<S>::ZERO; 2]; ALPHA];
            for r in 0..(tiles.div_ceil(W)) {
                let lanes = r * W..(r + 1) * W;
                for i in 0..ALPHA {
                    // Input row 4ty + i - 1; None over the padding.
                    let y = (TILE * (ty0 + r) + i).checked_sub(1).filter(|&y| y < h);
                    let row = y.map(|y| (s * wg.c_in + c) * plane + y * w);
                    let mut phases = [[0.0f32; N]; TILE];
                    load_phases::<N, SPAN>(x, row, w, (TILE * k0) as isize - 1, &mut phases);
                    for (lo_phi, phase) in lo[i].iter_mut().zip(&phases) {
                        lo_phi.0[lanes.clone()].copy_from_slice(&phase[..W]);
                    }
                    for (hi_phi, phase) in hi[i].iter_mut().zip(&phases) {
                        hi_phi.0[lanes.clone()].copy_from_slice(&phase[1..]);
                    }
                }
            }
            let strip = input_strip(&lo, &hi);
            store_strip(&strip, tiles, s * t + ty0 * tile_columns + k0, cols, block);
        }
    }
}

/// Stores a strip of `tiles` transformed tiles (position (i, j) of tile k
/// in `strip[i][j].0[k]`, ξ = 6i + j) at tile column `col` of a block laid
/// out `[ξ][cols]`. A whole strip's store is one vector move where a short
/// one is a `memmove` call. Its values past `tiles` land on tiles of the
/// same ξ row that come later in the caller's loop and are overwritten
/// then; only a row's last strip would spill into the next row, and takes
/// the short copy.
#[inline(always)]
fn store_strip<const S: usize>(
    strip: &[[Lanes<S>; ALPHA]; ALPHA],
    tiles: usize,
    col: usize,
    cols: usize,
    block: &mut [f32],
) {
    let positions = strip.iter().flatten().enumerate();
    if col + S <= cols {
        // `copy_from_slice` of a constant length is one vector move; an
        // array assignment here was vectorized across ξ into scatters.
        for (xi, values) in positions {
            block[xi * cols + col..][..S].copy_from_slice(&values.0);
        }
    } else {
        for (xi, values) in positions {
            block[xi * cols + col..][..tiles].copy_from_slice(&values.0[..tiles]);
        }
    }
}

/// `SPAN` values of the row of `w` values at `data[row..]` from column
/// `first` (which may be -1: the padding), zero past either edge, split by
/// column modulo 4: `out[φ][k]` is the value at `first + 4k + φ`.
///
/// The span is read as one window of constant length even where it runs
/// past the row, into its neighbours in `data`, and what lies outside the
/// row is then zeroed: a copy of the row's part alone has a variable
/// length, a `memmove` call, which took 6 % of a CNN step. Only a window
/// that would leave `data` takes that copy.
#[inline(always)]
fn load_phases<const N: usize, const SPAN: usize>(
    data: &[f32],
    row: Option<usize>,
    w: usize,
    first: isize,
    out: &mut [[f32; N]; TILE],
) {
    debug_assert_eq!(SPAN, TILE * N);
    let mut span = [0.0f32; SPAN];
    if let Some(row) = row {
        let window = row.checked_add_signed(first).and_then(|at| data.get(at..at + SPAN));
        match window {
            Some(window) => {
                for (q, (v, &d)) in span.iter_mut().zip(window).enumerate() {
                    let column = first + q as isize;
                    *v = if column >= 0 && column < w as isize { d } else { 0.0 };
                }
            }
            None => {
                let (skip, from) = if first < 0 { (first.unsigned_abs(), 0) } else { (0, first as usize) };
                let len = w.saturating_sub(from).min(SPAN - skip);
                span[skip..skip + len].copy_from_slice(&data[row + from..][..len]);
            }
        }
    }
    // An interleaved load of four.
    for k in 0..N {
        for (phi, o) in out.iter_mut().enumerate() {
            o[k] = span[TILE * k + phi];
        }
    }
}

/// `Bᵀ d B` for a strip of tiles, from their six input rows split by
/// column (`lo` and `hi`, see [`input_channel_in`]): `out[i][j]` is
/// position (i, j) of every tile.
#[inline(always)]
fn input_strip<const S: usize>(
    lo: &[[Lanes<S>; TILE]; ALPHA],
    hi: &[[Lanes<S>; 2]; ALPHA],
) -> [[Lanes<S>; ALPHA]; ALPHA] {
    // Bᵀ down the columns, a column at a time (by_column[j][i]) ...
    let by_column = [
        input_1d(unrolled!([0, 1, 2, 3, 4, 5], |i| lo[i][0])),
        input_1d(unrolled!([0, 1, 2, 3, 4, 5], |i| lo[i][1])),
        input_1d(unrolled!([0, 1, 2, 3, 4, 5], |i| lo[i][2])),
        input_1d(unrolled!([0, 1, 2, 3, 4, 5], |i| lo[i][3])),
        input_1d(unrolled!([0, 1, 2, 3, 4, 5], |i| hi[i][0])),
        input_1d(unrolled!([0, 1, 2, 3, 4, 5], |i| hi[i][1])),
    ];
    // ... then along the rows.
    unrolled!([0, 1, 2, 3, 4, 5], |i| input_1d(unrolled!([0, 1, 2, 3, 4, 5], |j| by_column[j][i])))
}

svp_tensor::multiversion! {
    /// [`Winograd::transform_output`] for sample `s` into its row of the output.
    fn output_sample(wg: Winograd, m: &[f32], n: usize, s: usize, bias: Option<&[f32]>, sample: &mut [f32]) {
        with_strip!(Strip::for_plane(&wg), out, output_sample_in(wg, m, n, s, bias, sample))
    }
}

/// [`output_sample`] in strips of `S` tiles, `W` a tile row of `W4 = 4W`
/// output columns.
#[inline(always)]
fn output_sample_in<const S: usize, const W: usize, const W4: usize>(
    wg: Winograd,
    m: &[f32],
    n: usize,
    s: usize,
    bias: Option<&[f32]>,
    sample: &mut [f32],
) {
    debug_assert!(S.is_multiple_of(W) && W4 == TILE * W);
    let (h, w, c_out) = (wg.h, wg.w, wg.c_out);
    let (t, cols) = (wg.tiles_per_sample(), n * wg.tiles_per_sample());
    let tile_columns = wg.tiles().1;
    let plane = h * w;
    for (k, ys) in sample.chunks_exact_mut(plane).enumerate() {
        let b = bias.map_or(0.0, |b| b[k]);
        for (ty0, k0, tiles) in strips::<S, W>(&wg) {
            let col = k * cols + s * t + ty0 * tile_columns + k0;
            let q = output_strip::<S>(m, c_out * cols, col, tiles, b);
            // Each tile's four columns side by side, a tile row at a time.
            let x0 = TILE * k0;
            for r in 0..(tiles.div_ceil(W)) {
                for (i, qi) in q.iter().enumerate().take(h.saturating_sub(TILE * (ty0 + r))) {
                    let mut y = [0.0f32; W4];
                    for kk in 0..W {
                        for (j, qj) in qi.iter().enumerate() {
                            y[TILE * kk + j] = qj.0[r * W + kk];
                        }
                    }
                    // As `load_phases` reads: a window of constant length
                    // whose values past the row are left as they were.
                    let (at, len) = ((TILE * (ty0 + r) + i) * w + x0, W4.min(w - x0));
                    match ys.get_mut(at..at + W4) {
                        Some(window) => {
                            for (j, (d, &v)) in window.iter_mut().zip(&y).enumerate() {
                                *d = if j < len { v } else { *d };
                            }
                        }
                        None => ys[at..at + len].copy_from_slice(&y[..len]),
                    }
                }
            }
        }
    }
}

/// `Aᵀ M A + bias` for a strip of `tiles` tiles, position ξ of tile k at
/// `m[ξ * stride + col + k]`: `out[i][j]` is output (i, j) of every tile.
#[inline(always)]
fn output_strip<const S: usize>(
    m: &[f32],
    stride: usize,
    col: usize,
    tiles: usize,
    bias: f32,
) -> [[Lanes<S>; TILE]; TILE] {
    let mut p = [Lanes::<S>::ZERO; XI];
    // Whole-strip loads (vector moves) where they stay inside `m`: the
    // values past `tiles` only fill lanes whose results are dropped.
    // (`copy_from_slice`, not an array assignment: see `store_strip`.)
    if (XI - 1) * stride + col + S <= m.len() {
        for (xi, dst) in p.iter_mut().enumerate() {
            dst.0.copy_from_slice(&m[xi * stride + col..][..S]);
        }
    } else {
        for (xi, dst) in p.iter_mut().enumerate() {
            dst.0[..tiles].copy_from_slice(&m[xi * stride + col..][..tiles]);
        }
    }
    // Aᵀ down the columns (by_column[j][i]) ...
    let by_column = unrolled!([0, 1, 2, 3, 4, 5], |j| output_1d(unrolled!([0, 1, 2, 3, 4, 5], |i| p[ALPHA * i + j])));
    // ... then along the rows.
    let bias = Lanes([bias; S]);
    unrolled!([0, 1, 2, 3], |i| {
        let q = output_1d(unrolled!([0, 1, 2, 3, 4, 5], |j| by_column[j][i]));
        unrolled!([0, 1, 2, 3], |j| q[j] + bias)
    })
}

svp_tensor::multiversion! {
    /// [`Winograd::transform_output_gradient`] for output channel `k` of
    /// the `n` samples' gradient `dout` into its block of `e`.
    fn output_gradient_channel(wg: Winograd, dout: &[f32], n: usize, k: usize, block: &mut [f32]) {
        with_strip!(Strip::for_plane(&wg), out, output_gradient_channel_in(wg, dout, n, k, block))
    }
}

/// [`output_gradient_channel`] in strips of `S` tiles, `W` a tile row of
/// `W4 = 4W` gradient columns, stored as [`input_channel_in`] stores its
/// strips.
#[inline(always)]
fn output_gradient_channel_in<const S: usize, const W: usize, const W4: usize>(
    wg: Winograd,
    dout: &[f32],
    n: usize,
    k: usize,
    block: &mut [f32],
) {
    debug_assert!(S.is_multiple_of(W) && W4 == TILE * W);
    let (h, w) = (wg.h, wg.w);
    let plane = h * w;
    let (t, cols) = (wg.tiles_per_sample(), n * wg.tiles_per_sample());
    let tile_columns = wg.tiles().1;
    for s in 0..n {
        for (ty0, k0, tiles) in strips::<S, W>(&wg) {
            // g[i][φ]: gradient row i of each tile, columns 4k + φ; zero
            // past the plane.
            let mut g = [[Lanes::<S>::ZERO; TILE]; TILE];
            for r in 0..(tiles.div_ceil(W)) {
                let lanes = r * W..(r + 1) * W;
                for (i, g_i) in g.iter_mut().enumerate() {
                    let y = TILE * (ty0 + r) + i;
                    let row = (y < h).then_some((s * wg.c_out + k) * plane + y * w);
                    let mut phases = [[0.0f32; W]; TILE];
                    load_phases::<W, W4>(dout, row, w, (TILE * k0) as isize, &mut phases);
                    for (g_phi, phase) in g_i.iter_mut().zip(&phases) {
                        g_phi.0[lanes.clone()].copy_from_slice(phase);
                    }
                }
            }
            // A down the columns, a column at a time (by_column[φ][i]) ...
            let by_column = unrolled!([0, 1, 2, 3], |phi| output_gradient_1d(unrolled!([0, 1, 2, 3], |r| g[r][phi])));
            // ... then along the rows.
            let strip =
                unrolled!([0, 1, 2, 3, 4, 5], |i| output_gradient_1d(unrolled!([0, 1, 2, 3], |phi| by_column[phi][i])));
            store_strip(&strip, tiles, s * t + ty0 * tile_columns + k0, cols, block);
        }
    }
}

/// `Gᵀ M G` for a 6x6 `M`: the gradient of a 3x3 filter from the gradient
/// of its transform `U = G g Gᵀ`.
#[inline(always)]
fn filter_gradient(m: &[f32; XI]) -> [f32; 9] {
    let mut t = [[0.0f32; ALPHA]; 3];
    for j in 0..ALPHA {
        let col = filter_gradient_1d([m[j], m[6 + j], m[12 + j], m[18 + j], m[24 + j], m[30 + j]]);
        for i in 0..3 {
            t[i][j] = col[i];
        }
    }
    let mut out = [0.0f32; 9];
    for i in 0..3 {
        out[i * 3..i * 3 + 3].copy_from_slice(&filter_gradient_1d(t[i]));
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
///
/// One task per row of the 6x6 transform: each writes its six positions'
/// blocks front to back. (One pass over the filters writing all 36
/// positions of each scattered its stores over the whole of `u` and ran on
/// one thread: 3 % of a CNN step.)
pub fn transform_filters(weights: &[f32], c_out: usize, c_in: usize, usage: FilterUse, u: &mut [f32]) {
    let (rows, cols) = match usage {
        FilterUse::Forward => (c_out, c_in),
        FilterUse::Adjoint => (c_in, c_out),
    };
    let u = &mut u[..XI * rows * cols];
    u.par_chunks_mut(ALPHA * rows * cols).enumerate().for_each(|(i, u_i)| {
        for r in 0..rows {
            for c in 0..cols {
                let mut g = [[0.0f32; 3]; 3];
                match usage {
                    FilterUse::Forward => {
                        for (a, row) in g.iter_mut().enumerate() {
                            row.copy_from_slice(&weights[(r * c_in + c) * 9 + a * 3..][..3]);
                        }
                    }
                    FilterUse::Adjoint => {
                        // Output channel c, input channel r, turned 180 degrees.
                        let f = &weights[(c * c_in + r) * 9..][..9];
                        for (a, row) in g.iter_mut().enumerate() {
                            for (b, e) in row.iter_mut().enumerate() {
                                *e = f[(2 - a) * 3 + (2 - b)];
                            }
                        }
                    }
                }
                for (j, &e) in filter_tile_row(&g, i).iter().enumerate() {
                    u_i[(j * rows + r) * cols + c] = e;
                }
            }
        }
    });
}

/// Row `i` of `G g Gᵀ`, the same values [`filter_tile`] computes.
#[inline(always)]
fn filter_tile_row(g: &[[f32; 3]; 3], i: usize) -> [f32; ALPHA] {
    let mut t = [0.0f32; 3];
    for (j, tj) in t.iter_mut().enumerate() {
        *tj = filter_1d([g[0][j], g[1][j], g[2][j]])[i];
    }
    filter_1d(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `G g Gᵀ`: a 3x3 filter's 6x6 transform, whole.
    fn filter_tile(g: &[[f32; 3]; 3]) -> [f32; XI] {
        let mut t = [[0.0f32; 3]; ALPHA];
        for j in 0..3 {
            let col = filter_1d([g[0][j], g[1][j], g[2][j]]);
            for i in 0..ALPHA {
                t[i][j] = col[i];
            }
        }
        let mut out = [0.0f32; XI];
        for i in 0..ALPHA {
            out[i * ALPHA..(i + 1) * ALPHA].copy_from_slice(&filter_1d(t[i]));
        }
        out
    }

    /// The transform one row at a time (how [`transform_filters`] runs it)
    /// gives the whole tile's bits.
    #[test]
    fn filter_rows_are_the_whole_transform() {
        for (n, f) in wave(9 * 20, 11).chunks_exact(9).enumerate() {
            let g = [[f[0], f[1], f[2]], [f[3], f[4], f[5]], [f[6], f[7], f[8]]];
            let whole = filter_tile(&g);
            for i in 0..ALPHA {
                let row = filter_tile_row(&g, i);
                assert!(
                    row.iter().zip(&whole[i * ALPHA..]).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "filter {n} row {i}"
                );
            }
        }
    }

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

    /// Over many shapes (sides not a multiple of 4, one-tile planes, every
    /// kind of strip, strips of several tile rows that end short, groups
    /// that end short), against the direct sum.
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
            (3, 2, 10, 14, 3),
            (5, 4, 14, 13, 2),
            // 20 samples a group (1,024 tiles), the second group short.
            (4, 3, 28, 28, 23),
        ] {
            let conv = Winograd { c_in, c_out, h, w };
            let wts = wave(c_out * c_in * 9, 1);
            let bias = wave(c_out, 2);
            let x = wave(rows * c_in * h * w, 3);
            let got = run(conv, FilterUse::Forward, &wts, Some(&bias), &x, rows);
            if (c_in, h, rows) == (4, 28, 23) {
                assert_eq!(conv.forward_group_size(), 20, "the case meant to end a group short");
            }
            let want = naive(&wts, &bias, &x, rows, c_in, c_out, h, w);
            // F(4x4, 3x3)'s transforms cancel values of the tile's whole
            // range, so its rounding follows the largest output, not each one
            // (about 3e-6 of it here); a misplaced tile or sign is off by
            // the values themselves.
            let scale = want.iter().fold(1.0f64, |m, e| m.max(e.abs()));
            for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                assert!((g as f64 - e).abs() <= 1e-5 * scale, "{c_in}->{c_out} {h}x{w} at {i}: {g} vs {e}");
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
        for &(c_in, c_out, h, w, rows) in &[
            (1, 1, 1, 1, 1),
            (3, 4, 5, 7, 2),
            (8, 5, 6, 6, 5),
            (2, 3, 9, 4, 40),
            (16, 8, 7, 7, 9),
            (4, 3, 28, 28, 2),
            (3, 2, 10, 14, 3),
        ] {
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
        // Forward groups follow the pool: 14 samples a group on one thread,
        // all 20 in one on four; and a scratch sized on one thread still
        // serves four.
        let wide = Winograd { c_in: 32, c_out: 32, h: 14, w: 14 };
        let (wide_wts, wide_x) = (wave(32 * 32 * 9, 11), wave(20 * 32 * 14 * 14, 12));
        let groups = [one.install(|| wide.forward_group_size()), four.install(|| wide.forward_group_size())];
        assert_eq!(groups, [14, 28], "the groups this test means to compare");
        let a = one.install(|| run(wide, FilterUse::Forward, &wide_wts, None, &wide_x, 20));
        let b = four.install(|| run(wide, FilterUse::Forward, &wide_wts, None, &wide_x, 20));
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()), "groups of 14 and of 20");
        let mut u = vec![0.0; wide.filter_len()];
        transform_filters(&wide_wts, 32, 32, FilterUse::Forward, &mut u);
        let mut scratch = vec![f32::NAN; one.install(|| wide.scratch_len())];
        let mut c = vec![f32::NAN; a.len()];
        four.install(|| wide.forward(&u, None, &wide_x, 20, &mut c, &mut scratch));
        assert!(a.iter().zip(&c).all(|(p, q)| p.to_bits() == q.to_bits()), "a one-thread scratch on four threads");
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
