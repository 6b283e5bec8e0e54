//! General matrix multiply with a deterministic column split.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, Axis};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Wall time spent inside [`gemm`] since the last [`reset_gemm_clock`], in ns.
static GEMM_NANOS: AtomicU64 = AtomicU64::new(0);
static GEMM_CALLS: AtomicU64 = AtomicU64::new(0);

/// Wall time spent in [`gemm`] calls, and their number, since the last reset.
///
/// The clock runs in every build (two `Instant::now` per call, tens of
/// nanoseconds against microseconds of GEMM), so a benchmark can measure a
/// training step's non-GEMM overhead in the same run as the step itself.
pub fn gemm_clock() -> (Duration, u64) {
    (Duration::from_nanos(GEMM_NANOS.load(Ordering::Relaxed)), GEMM_CALLS.load(Ordering::Relaxed))
}

/// Zeroes [`gemm_clock`].
pub fn reset_gemm_clock() {
    GEMM_NANOS.store(0, Ordering::Relaxed);
    GEMM_CALLS.store(0, Ordering::Relaxed);
}

/// Below this many multiply-adds a GEMM runs as one call: splitting tiny
/// products (for example the `d' = 10` projections) costs more than it gains.
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// Narrowest column block worth a task of its own (one AVX-512 kernel width).
const MIN_CHUNK_COLS: usize = 16;

/// `c = alpha * a · b + beta * c`, shapes `(m, k) · (k, n) -> (m, n)`.
///
/// Any strides are accepted (pass `w.t()` for a transposed operand). Large
/// products are split by output columns over the current rayon pool.
///
/// # Panics
/// If the shapes do not agree; shapes are fixed by the layer that calls this.
pub fn gemm(alpha: f32, a: ArrayView2<f32>, b: ArrayView2<f32>, beta: f32, c: ArrayViewMut2<f32>) {
    let (m, k) = a.dim();
    let n = b.ncols();
    let chunks =
        if m * n * k < PARALLEL_MIN_MACS { 1 } else { rayon::current_num_threads().min(n / MIN_CHUNK_COLS).max(1) };
    let start = Instant::now();
    gemm_with_chunks(alpha, a, b, beta, c, chunks);
    GEMM_NANOS.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    GEMM_CALLS.fetch_add(1, Ordering::Relaxed);
}

/// [`gemm`] with an explicit number of column chunks (1 = a single call).
///
/// Exposed so tests can prove the split never changes a bit of the result.
pub fn gemm_with_chunks(
    alpha: f32,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    beta: f32,
    c: ArrayViewMut2<f32>,
    chunks: usize,
) {
    assert_eq!(a.ncols(), b.nrows(), "gemm: inner dimensions differ");
    assert_eq!(c.dim(), (a.nrows(), b.ncols()), "gemm: output shape differs");
    split_columns(alpha, a, b, beta, c, chunks.max(1));
}

fn split_columns(
    alpha: f32,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    beta: f32,
    mut c: ArrayViewMut2<f32>,
    chunks: usize,
) {
    let n = b.ncols();
    if chunks <= 1 || n < 2 {
        general_mat_mul(alpha, &a, &b, beta, &mut c);
        return;
    }
    // Split into `left_chunks` and the rest, proportionally, and recurse.
    let left_chunks = chunks / 2;
    let split = n * left_chunks / chunks;
    let (b_left, b_right) = b.split_at(Axis(1), split);
    let (c_left, c_right) = c.split_at(Axis(1), split);
    rayon::join(
        || split_columns(alpha, a, b_left, beta, c_left, left_chunks),
        || split_columns(alpha, a, b_right, beta, c_right, chunks - left_chunks),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn filled(rows: usize, cols: usize, salt: u32) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            let x = (i as u32).wrapping_mul(2_654_435_761) ^ (j as u32).wrapping_mul(40_503) ^ salt;
            ((x % 2001) as f32 - 1000.0) / 997.0
        })
    }

    fn naive(a: &Array2<f32>, b: &Array2<f32>) -> Array2<f64> {
        Array2::from_shape_fn((a.nrows(), b.ncols()), |(i, j)| {
            (0..a.ncols()).map(|p| a[(i, p)] as f64 * b[(p, j)] as f64).sum()
        })
    }

    #[test]
    fn matches_naive_reference_over_many_shapes() {
        let shapes = [
            (1, 1, 1),
            (3, 5, 7),
            (17, 33, 9),
            (128, 784, 64),
            (64, 10, 130),
            (128, 1024, 10),
            (10, 128, 1024),
            (31, 257, 65),
        ];
        for &(m, k, n) in &shapes {
            let a = filled(m, k, 1);
            let b = filled(k, n, 2);
            let want = naive(&a, &b);
            for chunks in [1, 2, 3, 5] {
                let mut c = Array2::<f32>::zeros((m, n));
                gemm_with_chunks(1.0, a.view(), b.view(), 0.0, c.view_mut(), chunks);
                for ((i, j), &got) in c.indexed_iter() {
                    let tol = 1e-4 * (k as f64).sqrt() * 4.0;
                    assert!(
                        (got as f64 - want[(i, j)]).abs() <= tol,
                        "shape {m}x{k}x{n} chunks {chunks} at ({i},{j}): {got} vs {}",
                        want[(i, j)]
                    );
                }
            }
        }
    }

    #[test]
    fn transposed_operands_alpha_and_beta() {
        let a_t = filled(40, 24, 3); // a = a_t^T is 24 x 40
        let b = filled(40, 36, 4);
        let c0 = filled(24, 36, 5);
        let want = naive(&a_t.t().to_owned(), &b);
        let mut c = c0.clone();
        gemm(0.5, a_t.t(), b.view(), 2.0, c.view_mut());
        for ((i, j), &got) in c.indexed_iter() {
            let expect = 0.5 * want[(i, j)] + 2.0 * c0[(i, j)] as f64;
            assert!((got as f64 - expect).abs() < 1e-4, "({i},{j}): {got} vs {expect}");
        }
    }

    #[test]
    fn column_split_is_bit_identical() {
        let a = filled(128, 1024, 6);
        let b = filled(1024, 1000, 7);
        let mut reference = Array2::<f32>::zeros((128, 1000));
        gemm_with_chunks(1.0, a.view(), b.view(), 0.0, reference.view_mut(), 1);
        for chunks in [2, 3, 4, 7, 16] {
            let mut c = Array2::<f32>::zeros((128, 1000));
            gemm_with_chunks(1.0, a.view(), b.view(), 0.0, c.view_mut(), chunks);
            let same = c.iter().zip(reference.iter()).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{chunks} chunks changed the result");
        }
    }
}
