//! Products too small to pay for packing, over matrices laid out in slices.
//!
//! A ViT's per-head attention products (17 x 32 x 17 in the Fashion-MNIST
//! config, thousands per step) took about 1.5 µs each through [`gemm`](crate::gemm::gemm):
//! packing, views and set-up around one or two kernel tiles. Here the rows of
//! `c` are computed a block of `R` rows at a time, each row `W` columns wide
//! (whole registers of 16), straight from the operands: `A`'s values are read
//! in place (its rows or its columns must be contiguous), and `B`'s rows too
//! when they are contiguous and whole registers wide; otherwise `B` is first
//! copied into a small buffer, rows padded to `W`.
//!
//! Each element is the same chain of fused multiply-adds over `k`, in order,
//! from zero, then `alpha * sum (+ beta * c)`: what [`gemm`](crate::gemm::gemm) computes when
//! `k` fits one of its blocks, so the bits do not depend on which ran (tested
//! against it over shapes and layouts, on every kernel this CPU runs).

use crate::cpu::{self, Isa};
use crate::gemm::{KC, gemm_with_chunks_on, transpose_lines};
use ndarray::{ArrayView2, ArrayViewMut2, ShapeBuilder};
use std::cell::RefCell;

/// Largest `m`, `n` and `k` this path computes; bigger products go to [`gemm`](crate::gemm::gemm).
pub const SMALL_MAX_SIDE: usize = 64;
const _: () = assert!(SMALL_MAX_SIDE <= KC, "one block of the inner dimension, as gemm sums it");

/// Columns of one register-held piece of a row.
const LANES: usize = 16;

/// A matrix in a slice: element `(i, j)` at `i * row_stride + j * col_stride`.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a> {
    /// The values (at least up to the last element).
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub col_stride: usize,
}

impl<'a> Strided<'a> {
    /// A `rows x cols` row-major block whose rows are `row_stride` apart
    /// (columns `offset..` of a wider matrix when `data` starts there).
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self { data, rows, cols, row_stride, col_stride: 1 }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    fn view(self) -> ArrayView2<'a, f32> {
        let shape = (self.rows, self.cols).strides((self.row_stride, self.col_stride));
        ArrayView2::from_shape(shape, self.data).expect("a strided matrix inside its slice")
    }

    /// `len` values from element `(i, j)` along a row (col_stride 1) or a
    /// column (row_stride 1).
    #[inline(always)]
    fn run(&self, i: usize, j: usize, len: usize) -> &'a [f32] {
        let start = i * self.row_stride + j * self.col_stride;
        &self.data[start..start + len]
    }
}

/// The output of [`small_gemm`]: rows contiguous, `row_stride` apart.
#[derive(Debug)]
pub struct StridedMut<'a> {
    /// The values.
    pub data: &'a mut [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between rows.
    pub row_stride: usize,
}

impl<'a> StridedMut<'a> {
    /// A `rows x cols` row-major block whose rows are `row_stride` apart.
    pub fn rows(data: &'a mut [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self { data, rows, cols, row_stride }
    }

    fn view(&mut self) -> ArrayViewMut2<'_, f32> {
        let shape = (self.rows, self.cols).strides((self.row_stride, 1));
        ArrayViewMut2::from_shape(shape, &mut *self.data).expect("a strided matrix inside its slice")
    }
}

/// `c = alpha * a b + beta * c` on the calling thread, with the same bits as
/// [`gemm`](crate::gemm::gemm) (which computes it when the product is larger than
/// [`SMALL_MAX_SIDE`] on a side, or `A` has neither its rows nor its
/// columns contiguous).
///
/// # Panics
/// If the shapes do not agree or a matrix reaches past its slice.
pub fn small_gemm(alpha: f32, a: Strided, b: Strided, beta: f32, c: StridedMut) {
    small_gemm_on(cpu::selected(), alpha, a, b, beta, c);
}

/// [`small_gemm`] on the kernel `isa`, whatever [`cpu::selected`] says.
///
/// # Panics
/// As [`small_gemm`], or if this CPU does not run `isa`.
pub fn small_gemm_on(isa: Isa, alpha: f32, a: Strided, b: Strided, beta: f32, mut c: StridedMut) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "small_gemm: inner dimensions differ");
    assert_eq!((c.rows, c.cols), (m, n), "small_gemm: output shape differs");
    let lhs = if a.col_stride == 1 {
        Some(Lhs::Rows(a))
    } else if a.row_stride == 1 {
        Some(Lhs::Columns(a))
    } else {
        None
    };
    let fits = m.max(n).max(k) <= SMALL_MAX_SIDE && m * n * k > 0 && alpha != 0.0;
    let Some(lhs) = lhs.filter(|_| fits) else {
        gemm_with_chunks_on(isa, alpha, a.view(), b.view(), beta, c.view(), 1);
        return;
    };
    let width = n.div_ceil(LANES) * LANES;
    if b.col_stride == 1 && n == width {
        run_on(isa, &Task { alpha, beta, k, width, lhs, rhs: b }, &mut c);
    } else {
        PADDED.with_borrow_mut(|padded| {
            let rhs = pad_rows(isa, b, width, padded);
            run_on(isa, &Task { alpha, beta, k, width, lhs, rhs }, &mut c);
        });
    }
}

thread_local! {
    /// `B` with its rows padded to whole registers, when it needs copying.
    static PADDED: RefCell<[f32; SMALL_MAX_SIDE * SMALL_MAX_SIDE]> =
        const { RefCell::new([0.0; SMALL_MAX_SIDE * SMALL_MAX_SIDE]) };
}

/// Runs `task` on the code compiled for `isa`.
///
/// # Panics
/// If this CPU does not run `isa`.
fn run_on(isa: Isa, task: &Task, c: &mut StridedMut) {
    assert!(isa.is_supported(), "small_gemm: the {isa} kernel does not run on this CPU");
    match isa {
        // SAFETY: asserted just above that this CPU runs `isa`: for AVX-512,
        // `Isa::is_supported` checks AVX-512F, AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { on_avx512(task, c) },
        // SAFETY: as above, AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { on_avx2(task, c) },
        _ => task.run(c),
    }
}

/// `b` copied into `out` with rows `width` apart, the padding zero.
fn pad_rows<'a>(isa: Isa, b: Strided, width: usize, out: &'a mut [f32]) -> Strided<'a> {
    let (k, n) = (b.rows, b.cols);
    let out = &mut out[..k * width];
    if b.row_stride == 1 {
        // A transposed row-major matrix (`Kᵀ`): `b`'s columns are its rows,
        // transposed the way the GEMM packs (empty lines give the padding).
        let mut columns: [&[f32]; SMALL_MAX_SIDE] = [&[]; SMALL_MAX_SIDE];
        for (j, column) in columns.iter_mut().enumerate().take(n) {
            *column = b.run(0, j, k);
        }
        match width {
            16 => transpose_lines::<16>(isa, columns[..16].try_into().expect("16 lines"), k, out),
            32 => transpose_lines::<32>(isa, columns[..32].try_into().expect("32 lines"), k, out),
            48 => transpose_lines::<48>(isa, columns[..48].try_into().expect("48 lines"), k, out),
            _ => transpose_lines::<SMALL_MAX_SIDE>(isa, &columns, k, out),
        }
    } else {
        for (p, dst) in out.chunks_exact_mut(width).enumerate() {
            let (values, pad) = dst.split_at_mut(n);
            for (j, d) in values.iter_mut().enumerate() {
                *d = b.data[p * b.row_stride + j * b.col_stride];
            }
            pad.fill(0.0);
        }
    }
    Strided::rows(out, k, width, width)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn on_avx512(task: &Task, c: &mut StridedMut) {
    task.run(c);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn on_avx2(task: &Task, c: &mut StridedMut) {
    task.run(c);
}

/// `A`, by the direction its values are contiguous in.
#[derive(Clone, Copy)]
enum Lhs<'a> {
    /// Rows contiguous (`col_stride == 1`).
    Rows(Strided<'a>),
    /// Columns contiguous (`row_stride == 1`, a transposed view, as `Pᵀ`).
    Columns(Strided<'a>),
}

/// One product's operands.
struct Task<'a> {
    alpha: f32,
    beta: f32,
    k: usize,
    /// `n` rounded up to whole registers: `rhs`'s rows hold at least this many.
    width: usize,
    lhs: Lhs<'a>,
    /// `B`, rows contiguous and at least `width` long.
    rhs: Strided<'a>,
}

impl Task<'_> {
    /// All rows of `c`, in blocks sized so the sums stay in registers
    /// (`R * V` registers of 16).
    #[inline(always)]
    fn run(&self, c: &mut StridedMut) {
        match self.width / LANES {
            1 => self.rows::<4, 1>(c),
            2 => self.rows::<4, 2>(c),
            3 => self.rows::<2, 3>(c),
            4 => self.rows::<2, 4>(c),
            width => unreachable!("{width} registers: wider than SMALL_MAX_SIDE"),
        }
    }

    #[inline(always)]
    fn rows<const R: usize, const V: usize>(&self, c: &mut StridedMut) {
        let whole = c.rows / R * R;
        for i0 in (0..whole).step_by(R) {
            let tile = self.tile::<R, V>(i0);
            self.store(c, i0, &tile);
        }
        for i in whole..c.rows {
            let tile = self.tile::<1, V>(i);
            self.store(c, i, &tile);
        }
    }

    /// `A`'s values at rows `i0..i0 + R`, step `p`.
    #[inline(always)]
    fn a_column<const R: usize>(&self, i0: usize, p: usize) -> [f32; R] {
        match self.lhs {
            Lhs::Rows(a) => {
                let mut column = [0.0; R];
                for (r, v) in column.iter_mut().enumerate() {
                    *v = a.data[(i0 + r) * a.row_stride + p];
                }
                column
            }
            Lhs::Columns(a) => a.run(i0, p, R).try_into().expect("R values"),
        }
    }

    /// Rows `i0..i0 + R` of `a b`, `V` registers of them: one fused
    /// multiply-add per element per step, in order, from zero.
    ///
    /// The sums are a local array touched only at constant offsets, so the
    /// compiler keeps them in registers (indexed by `n` in the same function,
    /// it stored them back to the stack every step).
    #[inline(always)]
    fn tile<const R: usize, const V: usize>(&self, i0: usize) -> [[[f32; LANES]; V]; R] {
        let mut acc = [[[0.0f32; LANES]; V]; R];
        for p in 0..self.k {
            let b_row = self.rhs.run(p, 0, V * LANES);
            let a = self.a_column::<R>(i0, p);
            for v in 0..V {
                let b: &[f32; LANES] = b_row[v * LANES..(v + 1) * LANES].try_into().expect("a register");
                for r in 0..R {
                    for (acc, &b) in acc[r][v].iter_mut().zip(b) {
                        *acc = a[r].mul_add(b, *acc);
                    }
                }
            }
        }
        acc
    }

    /// Blends rows `i0..` of `c` with `tile`.
    #[inline(always)]
    fn store<const R: usize, const V: usize>(&self, c: &mut StridedMut, i0: usize, tile: &[[[f32; LANES]; V]; R]) {
        let n = c.cols;
        for (r, tile_row) in tile.iter().enumerate() {
            let start = (i0 + r) * c.row_stride;
            let row = &mut c.data[start..start + n];
            for (c, &t) in row.iter_mut().zip(tile_row.as_flattened()) {
                *c = if self.beta == 0.0 { self.alpha * t } else { self.alpha * t + self.beta * *c };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(len: usize, salt: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                let x = i.wrapping_mul(2_654_435_761) ^ salt.wrapping_mul(40_503);
                ((x % 2001) as f32 - 1000.0) / 997.0
            })
            .collect()
    }

    /// A `rows x cols` matrix of `data` in one of the layouts attention
    /// uses: row-major columns of a wider matrix, or the transpose of one.
    fn layout(data: &[f32], rows: usize, cols: usize, transposed: bool, extra: usize) -> Strided<'_> {
        if transposed {
            Strided::rows(data, cols, rows, rows + extra).t()
        } else {
            Strided::rows(data, rows, cols, cols + extra)
        }
    }

    /// Every kernel, every layout attention uses, shapes across the
    /// register widths and row blocks: the same bits as the packed GEMM.
    #[test]
    fn same_bits_as_gemm_over_shapes_and_layouts() {
        let shapes =
            [(1, 1, 1), (17, 32, 17), (17, 17, 32), (5, 3, 16), (4, 64, 48), (9, 7, 64), (64, 64, 63), (3, 40, 33)];
        for isa in Isa::supported() {
            for (m, k, n) in shapes {
                for (a_t, b_t, extra) in [(false, false, 0), (false, true, 3), (true, false, 5), (true, true, 1)] {
                    let a_data = wave((m + extra) * (k + extra), 1);
                    let b_data = wave((k + extra) * (n + extra), 2);
                    let (a, b) = (layout(&a_data, m, k, a_t, extra), layout(&b_data, k, n, b_t, extra));
                    for (alpha, beta) in [(1.0, 0.0), (0.17, 0.0), (-0.5, 1.5)] {
                        let c0 = wave(m * (n + 2), 3);
                        let mut want = c0.clone();
                        let mut want_matrix = StridedMut::rows(&mut want, m, n, n + 2);
                        gemm_with_chunks_on(isa, alpha, a.view(), b.view(), beta, want_matrix.view(), 1);
                        let mut got = c0.clone();
                        small_gemm_on(isa, alpha, a, b, beta, StridedMut::rows(&mut got, m, n, n + 2));
                        let same = got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "{isa}: {m}x{k}x{n}, a^T {a_t}, b^T {b_t}, alpha {alpha}, beta {beta}");
                    }
                }
            }
        }
    }

    /// The result against f64 sums, so the test above cannot pass by both
    /// paths being wrong the same way.
    #[test]
    fn matches_the_naive_product() {
        let (m, k, n) = (17, 32, 17);
        let (a_data, b_data) = (wave(m * k, 4), wave(n * k, 5));
        let (a, b) = (Strided::rows(&a_data, m, k, k), Strided::rows(&b_data, n, k, k).t());
        let mut c = vec![f32::NAN; m * n];
        small_gemm(1.0, a, b, 0.0, StridedMut::rows(&mut c, m, n, n));
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|p| a_data[i * k + p] as f64 * b_data[j * k + p] as f64).sum();
                assert!((c[i * n + j] as f64 - want).abs() < 1e-5, "({i}, {j}): {} vs {want}", c[i * n + j]);
            }
        }
    }

    /// Products beyond the small path's reach, or with an `A` of no
    /// contiguous direction, still come out right (through `gemm`).
    #[test]
    fn larger_or_strided_products_fall_back_to_gemm() {
        for (m, k, n, a_stride) in [(70, 8, 5, 1), (5, 8, 5, 2)] {
            let a_data = wave(m * k * a_stride + 1, 6);
            let b_data = wave(k * n, 7);
            let a = Strided { data: &a_data, rows: m, cols: k, row_stride: k * a_stride, col_stride: a_stride };
            let b = Strided::rows(&b_data, k, n, n);
            let mut got = vec![0.0; m * n];
            small_gemm(1.0, a, b, 0.0, StridedMut::rows(&mut got, m, n, n));
            let mut want = vec![0.0; m * n];
            crate::gemm::gemm(1.0, a.view(), b.view(), 0.0, StridedMut::rows(&mut want, m, n, n).view());
            assert_eq!(got, want, "{m}x{k}x{n}, a stride {a_stride}");
        }
    }
}
