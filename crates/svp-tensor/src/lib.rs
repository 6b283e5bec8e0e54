//! Dense f32 kernels shared by every svp layer.
//!
//! Tensors are [`ndarray`] arrays in row-major layout. This crate adds what
//! ndarray does not give at the speed or with the guarantees svp needs:
//!
//! * [`gemm()`]: `C = alpha * A B + beta * C` with packed panels and a
//!   register-tiled kernel chosen at run time for the CPU ([`cpu`]: AVX-512
//!   or NEON intrinsics, plain Rust compiled for AVX2 and FMA, or a portable
//!   fallback), the output rows or columns split across the rayon pool.
//!   Every kernel gives the same bits. Every output element is summed in the same order whatever the split
//!   or the thread count, so results are bit-identical. The packing buffers are
//!   per thread and reused, so a GEMM allocates nothing after a thread's first.
//! * [`gemm_to_sink`]: the same product handed tile row by tile row to a
//!   [`ProductSink`] instead of stored, so an optimizer can update weights
//!   from their gradient while it is in cache and never write the gradient.
//! * [`reduce`]: sums and dot products with a fixed number of accumulator lanes,
//!   so they vectorize and still give the same bits on every run.
//!
//! ```
//! use svp_tensor::{gemm, view, view_mut};
//!
//! // C (2x2) = A (2x3) B (3x2)
//! let (a, b) = ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
//! let mut c = [0.0f32; 4];
//! gemm(1.0, view(&a, 2, 3), view(&b, 3, 2), 0.0, view_mut(&mut c, 2, 2));
//! assert_eq!(c, [4.0, 5.0, 10.0, 11.0]);
//! ```

#![warn(missing_docs)]

pub mod cpu;
pub mod gemm;
pub mod reduce;
pub mod small;

pub use gemm::{
    GradientSink, ProductSink, SINK_MAX_DEPTH, gemm, gemm_bias, gemm_bias_with_chunks_on, gemm_to_sink,
    gemm_to_sink_with_chunks, gemm_with_chunks, gemm_with_chunks_on, try_reserve_workspaces, workspace_bytes,
    workspace_bytes_reserved,
};
#[cfg(feature = "clock")]
pub use gemm::{gemm_clock, reset_gemm_clock};
pub use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis, ShapeBuilder, s};
pub use small::{SMALL_MAX_SIDE, Strided, StridedMut, small_gemm, small_gemm_on};

/// A `(rows, cols)` row-major view of the first `rows * cols` elements of `buf`.
///
/// # Panics
/// If `buf` is shorter than `rows * cols`.
#[inline]
pub fn view(buf: &[f32], rows: usize, cols: usize) -> ArrayView2<'_, f32> {
    ArrayView2::from_shape((rows, cols), &buf[..rows * cols]).expect("contiguous row-major shape")
}

/// Mutable counterpart of [`view`].
///
/// # Panics
/// If `buf` is shorter than `rows * cols`.
#[inline]
pub fn view_mut(buf: &mut [f32], rows: usize, cols: usize) -> ArrayViewMut2<'_, f32> {
    ArrayViewMut2::from_shape((rows, cols), &mut buf[..rows * cols]).expect("contiguous row-major shape")
}

/// Rows of a `(rows, cols)` buffer processed in parallel below this many elements
/// cost more in scheduling than they save.
pub const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// Applies `f(row_index, row)` to every `cols`-wide row of `buf`, in parallel when
/// the buffer is large. Each row is touched by one call only, so the result does
/// not depend on the thread count.
pub fn for_each_row_mut<F>(buf: &mut [f32], cols: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    use rayon::prelude::*;
    if cols == 0 {
        return;
    }
    if buf.len() < PARALLEL_MIN_ELEMS {
        buf.chunks_exact_mut(cols).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        let rows_per_task = (PARALLEL_MIN_ELEMS / 4 / cols).max(1);
        buf.par_chunks_mut(cols * rows_per_task).enumerate().for_each(|(t, block)| {
            for (j, r) in block.chunks_exact_mut(cols).enumerate() {
                f(t * rows_per_task + j, r);
            }
        });
    }
}
