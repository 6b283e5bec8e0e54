//! A product handed over row by row instead of stored: what lets an
//! optimizer update a layer's weights from their gradient while each strip
//! of it (a tile's rows, each whole up to 1,024 columns) is still in L1/L2,
//! so the gradient never goes to memory.
//!
//! The tiles are the same as [`super::gemm`]'s, computed by the same kernel
//! from the same packed panels, so every value is bit-identical to what
//! `gemm(1.0, a, b, 0.0, c)` would have stored.

use super::kernel::{Blend, Kernel};
use super::{KC, PARALLEL_MIN_MACS, Workspace, block_cols, pack, row_slices, with_kernel, with_workspace};
use crate::cpu::{self, Isa};
use ndarray::{ArrayView2, Axis, s};

/// Deepest inner dimension [`gemm_to_sink`] takes: one packed block, so each
/// tile is final after a single pass of the kernel. (A weight gradient's inner
/// dimension is the batch.)
pub const SINK_MAX_DEPTH: usize = KC;

/// Receives the rows of a product's tiles in place of an output matrix.
pub trait ProductSink: Send {
    /// Elements `(row, col0..col0 + values.len())` of the product (a run of
    /// one row, at most one packed block of columns wide). Each element
    /// arrives exactly once; runs come in no promised order.
    fn take(&mut self, row: usize, col0: usize, values: &[f32]);

    /// The sinks for rows `..at` and for rows `at..` of this one (the second
    /// numbers its rows from 0), so that parts of the product can be handed
    /// over on different threads.
    fn split_rows(self, at: usize) -> (Self, Self)
    where
        Self: Sized;
}

/// Where a layer's backward sends its parameters' gradient when the
/// parameters are updated as the gradient is computed (an optimizer step):
/// a weight matrix's gradient straight from the GEMM's tiles, through
/// [`GradientSink::weight_rows`], or any part of it from a stored buffer,
/// through [`GradientSink::apply`]. Each parameter goes through one of the two,
/// once.
pub trait GradientSink {
    /// What takes a weight matrix's gradient from [`gemm_to_sink`].
    type Rows<'a>: ProductSink
    where
        Self: 'a;

    /// A sink for the gradient of `weights`: the layer's parameters from
    /// `offset` on, row-major with `cols` columns. `None` when this sink can
    /// take a stored gradient only.
    fn weight_rows<'a>(&'a mut self, offset: usize, weights: &'a mut [f32], cols: usize) -> Option<Self::Rows<'a>>;

    /// Takes the stored gradient `grad` of `params`, the layer's parameters
    /// from `offset` on.
    fn apply(&mut self, offset: usize, params: &mut [f32], grad: &[f32]);
}

/// Hands the product `a · b` (shapes `(m, k) · (k, n)`) to `sink`, split by
/// rows over the rayon pool when it is large, as [`super::gemm`] would.
///
/// # Panics
/// If the inner dimensions differ or exceed [`SINK_MAX_DEPTH`].
pub fn gemm_to_sink<S: ProductSink>(a: ArrayView2<f32>, b: ArrayView2<f32>, sink: S) {
    let (m, k) = a.dim();
    let n = b.ncols();
    let tile_rows = cpu::selected().gemm_tile().0;
    let chunks = if m * n * k < PARALLEL_MIN_MACS { 1 } else { rayon::current_num_threads().min(m / tile_rows).max(1) };
    let start = super::clock_start();
    gemm_to_sink_with_chunks(a, b, sink, chunks);
    super::clock_stop(start);
}

/// [`gemm_to_sink`] with an explicit number of row pieces (1 = on this thread).
///
/// # Panics
/// As [`gemm_to_sink`].
pub fn gemm_to_sink_with_chunks<S: ProductSink>(a: ArrayView2<f32>, b: ArrayView2<f32>, sink: S, chunks: usize) {
    gemm_to_sink_on(cpu::selected(), a, b, sink, chunks);
}

/// [`gemm_to_sink_with_chunks`] on the kernel `isa`.
///
/// # Panics
/// As [`gemm_to_sink`], and if this CPU does not run `isa`.
pub(crate) fn gemm_to_sink_on<S: ProductSink>(
    isa: Isa,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    sink: S,
    chunks: usize,
) {
    assert_eq!(a.ncols(), b.nrows(), "gemm_to_sink: inner dimensions differ");
    assert!(a.ncols() <= SINK_MAX_DEPTH, "gemm_to_sink: inner dimension {} over {SINK_MAX_DEPTH}", a.ncols());
    assert!(isa.is_supported(), "gemm_to_sink: the {isa} kernel does not run on this CPU");
    with_kernel!(isa, |kernel| split_rows(kernel, a, b, sink, chunks.max(1)));
}

/// Whole tiles of rows on each side, as `split_product` splits a tall output.
fn split_rows<K: Kernel<MR, NR>, const MR: usize, const NR: usize, S: ProductSink>(
    kernel: K,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    sink: S,
    chunks: usize,
) {
    let m = a.nrows();
    let left_chunks = chunks / 2;
    let split = (m * left_chunks / chunks.max(1)) / MR * MR;
    if chunks > 1 && split > 0 {
        let (a_top, a_bottom) = a.split_at(Axis(0), split);
        let (top, bottom) = sink.split_rows(split);
        rayon::join(
            || split_rows(kernel, a_top, b, top, left_chunks),
            || split_rows(kernel, a_bottom, b, bottom, chunks - left_chunks),
        );
    } else {
        with_workspace(|ws| packed_to_sink(kernel, a, b, sink, ws));
    }
}

/// The loop nest of `packed_product` for a depth of one block: every tile is
/// complete after one kernel call and goes straight to the sink.
fn packed_to_sink<K: Kernel<MR, NR>, const MR: usize, const NR: usize, S: ProductSink>(
    kernel: K,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    mut sink: S,
    ws: &mut Workspace,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    if k == 0 {
        let zeros = [0.0f32; NR];
        for row in 0..m {
            for col0 in (0..n).step_by(NR) {
                sink.take(row, col0, &zeros[..NR.min(n - col0)]);
            }
        }
        return;
    }
    let strip_cols = strip_cols(NR, k, ws.b.len());
    // One panel of A and a strip fit A's packing buffer (`block_rows(MR) * KC`
    // floats) for every tile: `MR * (KC + 1024) <= 16 * MR * KC`.
    const { assert!(KC + SINK_BLOCK_COLS <= 16 * KC && block_cols(NR) <= SINK_BLOCK_COLS) };
    for jc in (0..n).step_by(strip_cols) {
        let nc = strip_cols.min(n - jc);
        pack::pack_b(kernel, b.slice(s![.., jc..jc + nc]), &mut ws.b);
        let b_panels = &ws.b[..nc.div_ceil(NR) * NR * k];
        // One panel of A at a time: the rest of A's packing buffer holds the strip.
        let (a_panel, strip_buf) = ws.a.split_at_mut(MR * KC);
        for row0 in (0..m).step_by(MR) {
            // A strip of MR rows, nc wide, computed straight from the
            // kernel's registers and handed over row by row: the sink then
            // walks whole rows of what it updates, which the hardware
            // prefetches well.
            let rows = MR.min(m - row0);
            pack::pack_a(kernel, a.slice(s![row0..row0 + rows, ..]), a_panel);
            let mut strip = row_slices::<MR>(strip_buf[..rows * nc].chunks_exact_mut(nc));
            for (t, b_panel) in b_panels.chunks_exact(NR * k).enumerate() {
                // alpha 1 and beta 0: the bits `gemm` stores.
                kernel.tile_into(k, &a_panel[..MR * k], b_panel, &mut strip, t * NR, 1.0, Blend::Beta(0.0));
            }
            for r in 0..rows {
                sink.take(row0 + r, jc, &strip_buf[r * nc..(r + 1) * nc]);
            }
        }
    }
}

/// Columns of `b` packed at once for a depth of `k` (at most
/// [`SINK_MAX_DEPTH`]) by a kernel `nr` columns wide, whose `B` buffer holds
/// `b_len` floats: [`SINK_BLOCK_COLS`], as far as the buffer holds them (all
/// of them up to a depth of [`WHOLE_ROWS_DEPTH`]; a weight gradient's depth
/// is the batch), and at least a `KC x NC` block's.
fn strip_cols(nr: usize, k: usize, b_len: usize) -> usize {
    SINK_BLOCK_COLS.min(b_len / k.max(1)) / nr * nr
}

/// How wide a strip [`gemm_to_sink`] hands over, where the buffers allow:
/// whole rows of the reference model's 1,024-wide layers, which the
/// optimizer then walks in one run each. One `NC` block at a time, AVX2's
/// 512 columns cut each row in two, and the update from the GEMM was then
/// slower than storing the gradient (docs/PERFORMANCE.md, "Weight gradients
/// handed straight to the optimizer"). AVX-512's `NC` is 1,024, the widest.
pub(super) const SINK_BLOCK_COLS: usize = 1024;

/// The deepest product (largest batch) whose strips of [`SINK_BLOCK_COLS`]
/// the `B` packing buffer holds with every kernel ([`super::buffer_lens`]).
pub(super) const WHOLE_ROWS_DEPTH: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::gemm_with_chunks_on;
    use ndarray::Array2;

    /// Stores what it is handed into a matrix, counting each element.
    struct Collect<'a> {
        out: &'a mut [f32],
        seen: &'a mut [u8],
        cols: usize,
    }

    impl ProductSink for Collect<'_> {
        fn take(&mut self, row: usize, col0: usize, values: &[f32]) {
            let at = row * self.cols + col0;
            self.out[at..at + values.len()].copy_from_slice(values);
            self.seen[at..at + values.len()].iter_mut().for_each(|s| *s += 1);
        }

        fn split_rows(self, at: usize) -> (Self, Self) {
            let (out_top, out_bottom) = self.out.split_at_mut(at * self.cols);
            let (seen_top, seen_bottom) = self.seen.split_at_mut(at * self.cols);
            (
                Collect { out: out_top, seen: seen_top, cols: self.cols },
                Collect { out: out_bottom, seen: seen_bottom, cols: self.cols },
            )
        }
    }

    fn filled(rows: usize, cols: usize, salt: u32) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            let x = (i as u32).wrapping_mul(2_654_435_761) ^ (j as u32).wrapping_mul(40_503) ^ salt;
            ((x % 2001) as f32 - 1000.0) / 997.0
        })
    }

    /// Every element once, and the bits `gemm` stores, for shapes across the
    /// tile and block edges, transposed operands (as a weight gradient's
    /// `dz^T`), narrow products, an empty depth and every split, with every
    /// kernel this CPU runs.
    #[test]
    fn hands_over_exactly_what_gemm_stores() {
        for isa in Isa::supported() {
            let (mr, nr) = isa.gemm_tile();
            let shapes = [
                (1, 1, 1),
                (3, 5, 7),
                (13, 128, 33),
                (mr + 1, 7, nr + 1),
                (1024, 128, 784),
                (10, 128, 1024),
                (16 * mr + 5, KC, 32 * nr + 40),
                (40, 0, 20),
                (200, 3, 2 * nr + 1),
                (70, 64, 5),
                // A shallow product wider than a strip: several blocks of columns.
                (2 * mr + 1, 2, 3 * SINK_BLOCK_COLS + nr + 5),
            ];
            for (m, k, n) in shapes {
                let a_t = filled(k, m, 1);
                let b = filled(k, n, 2);
                let mut want = Array2::<f32>::from_elem((m, n), f32::NAN);
                gemm_with_chunks_on(Isa::Portable, 1.0, a_t.t(), b.view(), 0.0, want.view_mut(), 1);
                for chunks in [1, 2, 3, 7] {
                    let mut got = vec![f32::NAN; m * n];
                    let mut seen = vec![0u8; m * n];
                    let sink = Collect { out: &mut got, seen: &mut seen, cols: n };
                    gemm_to_sink_on(isa, a_t.t(), b.view(), sink, chunks);
                    let what = format!("{isa}, {m}x{k}x{n}, {chunks} chunks");
                    assert!(seen.iter().all(|&s| s == 1), "{what}: an element not handed over once");
                    let same = got.iter().zip(want.iter()).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{what}: values differ from gemm's");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "inner dimension")]
    fn refuses_a_depth_over_one_block() {
        let a = Array2::<f32>::zeros((4, SINK_MAX_DEPTH + 1));
        let b = Array2::<f32>::zeros((SINK_MAX_DEPTH + 1, 4));
        let mut out = vec![0.0; 16];
        let mut seen = vec![0u8; 16];
        gemm_to_sink(a.view(), b.view(), Collect { out: &mut out, seen: &mut seen, cols: 4 });
    }
}
