//! Reductions with a fixed accumulator layout.
//!
//! A plain `iter().sum()` is a serial dependency chain the compiler may not
//! reorder. Splitting the sum over [`LANES`] independent accumulators lets it
//! vectorize, and because the split depends only on the slice length the
//! result is the same on every run and thread count.

/// Number of independent partial sums (one AVX-512 register of f32).
pub const LANES: usize = 16;

#[inline]
fn fold_lanes(acc: [f32; LANES]) -> f32 {
    // Pairwise, fixed order.
    let mut width = LANES;
    let mut acc = acc;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0]
}

/// Sum of `x`.
#[inline]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let mut total = fold_lanes(acc);
    for &t in tail {
        total += t;
    }
    total
}

/// Dot product of two equal-length slices.
///
/// # Panics
/// If the lengths differ.
#[inline]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len(), "dot: lengths differ");
    let mut acc = [0.0f32; LANES];
    let xs = x.chunks_exact(LANES);
    let ys = y.chunks_exact(LANES);
    let (xt, yt) = (xs.remainder(), ys.remainder());
    for (a, b) in xs.zip(ys) {
        for i in 0..LANES {
            acc[i] += a[i] * b[i];
        }
    }
    let mut total = fold_lanes(acc);
    for (a, b) in xt.iter().zip(yt) {
        total += a * b;
    }
    total
}

/// Sum of squared deviations from `mean`.
#[inline]
pub fn sum_sq_dev(x: &[f32], mean: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let d = c[i] - mean;
            acc[i] += d * d;
        }
    }
    let mut total = fold_lanes(acc);
    for &t in tail {
        let d = t - mean;
        total += d * d;
    }
    total
}

/// `out[j] += sum_i rows[i][j]`: column sums of a row-major `(rows, cols)` buffer.
///
/// # Panics
/// If `data.len()` is not a multiple of `out.len()`.
pub fn add_column_sums(data: &[f32], out: &mut [f32]) {
    let cols = out.len();
    if cols == 0 {
        return;
    }
    assert_eq!(data.len() % cols, 0, "add_column_sums: ragged buffer");
    for row in data.chunks_exact(cols) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 101.0).collect()
    }

    #[test]
    fn sums_match_f64_reference() {
        for n in [0, 1, 15, 16, 17, 100, 1024, 1031] {
            let x = values(n);
            let y: Vec<f32> = x.iter().rev().copied().collect();
            let s64: f64 = x.iter().map(|&v| v as f64).sum();
            let d64: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
            let m = (s64 / n.max(1) as f64) as f32;
            let q64: f64 = x.iter().map(|&v| (v as f64 - m as f64).powi(2)).sum();
            assert!((sum(&x) as f64 - s64).abs() < 1e-3, "sum n={n}");
            assert!((dot(&x, &y) as f64 - d64).abs() < 1e-2, "dot n={n}");
            assert!((sum_sq_dev(&x, m) as f64 - q64).abs() < 1e-2 * (1.0 + q64 * 1e-4), "ssd n={n}");
        }
    }

    #[test]
    fn column_sums() {
        let data: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let mut out = vec![1.0; 4];
        add_column_sums(&data, &mut out);
        assert_eq!(out, vec![13.0, 16.0, 19.0, 22.0]);
    }
}
