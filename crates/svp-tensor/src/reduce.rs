//! Reductions with a fixed accumulator layout.
//!
//! A plain `iter().sum()` is a serial dependency chain the compiler may not
//! reorder. Splitting the sum over [`LANES`] independent accumulators lets it
//! vectorize, and because the split depends only on the slice length the
//! result is the same on every run and thread count.

/// Number of independent partial sums (one AVX-512 register of f32).
pub const LANES: usize = 16;

/// A sum in this module's fixed layout, fed [`LANES`] values at a time: for
/// loops that compute what they sum in a pass they make anyway (LayerNorm's),
/// and get the bits [`sum`] would give over the same values.
#[derive(Clone, Copy, Debug)]
pub struct LaneSum {
    acc: [f32; LANES],
}

impl Default for LaneSum {
    fn default() -> Self {
        Self::new()
    }
}

impl LaneSum {
    /// An empty sum.
    #[inline(always)]
    pub const fn new() -> Self {
        Self { acc: [0.0; LANES] }
    }

    /// A sum whose lanes hold `lanes` (for vector code that keeps the lanes
    /// in a register and hands them over to be finished).
    #[inline(always)]
    pub const fn from_lanes(lanes: [f32; LANES]) -> Self {
        Self { acc: lanes }
    }

    /// Adds the next `LANES` values.
    #[inline(always)]
    pub fn add(&mut self, values: &[f32; LANES]) {
        for (a, &v) in self.acc.iter_mut().zip(values) {
            *a += v;
        }
    }

    /// The total, given the values after the last whole chunk (added one by
    /// one, in order, to the pairwise fold of the lanes).
    #[inline(always)]
    pub fn finish(self, tail: impl IntoIterator<Item = f32>) -> f32 {
        // Pairwise, fixed order.
        let mut acc = self.acc;
        let mut width = LANES;
        while width > 1 {
            width /= 2;
            for i in 0..width {
                acc[i] += acc[i + width];
            }
        }
        tail.into_iter().fold(acc[0], |total, t| total + t)
    }
}

/// Sum of `x`.
#[inline]
pub fn sum(x: &[f32]) -> f32 {
    let (chunks, tail) = x.as_chunks::<LANES>();
    let mut total = LaneSum::new();
    chunks.iter().for_each(|c| total.add(c));
    total.finish(tail.iter().copied())
}

/// Dot product of two equal-length slices.
///
/// # Panics
/// If the lengths differ.
#[inline]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len(), "dot: lengths differ");
    let ((xs, xt), (ys, yt)) = (x.as_chunks::<LANES>(), y.as_chunks::<LANES>());
    let mut total = LaneSum::new();
    for (a, b) in xs.iter().zip(ys) {
        total.add(&std::array::from_fn(|i| a[i] * b[i]));
    }
    total.finish(xt.iter().zip(yt).map(|(a, b)| a * b))
}

/// Sum of squared deviations from `mean`.
#[inline]
pub fn sum_sq_dev(x: &[f32], mean: f32) -> f32 {
    let square_dev = |v: f32| {
        let d = v - mean;
        d * d
    };
    let (chunks, tail) = x.as_chunks::<LANES>();
    let mut total = LaneSum::new();
    for c in chunks {
        total.add(&c.map(square_dev));
    }
    total.finish(tail.iter().map(|&v| square_dev(v)))
}

/// Columns per parallel task in the column reductions.
const COLUMN_BLOCK: usize = 128;

/// `out[j] = sum_i data[i][j]`: column sums of a row-major buffer with
/// `out.len()` columns. Column blocks run in parallel on large buffers; each
/// column is summed top to bottom by one task, so the bits never depend on the
/// thread count.
///
/// # Panics
/// If `data.len()` is not a multiple of `out.len()`.
pub fn column_sums(data: &[f32], out: &mut [f32]) {
    let cols = out.len();
    if cols == 0 {
        return;
    }
    assert_eq!(data.len() % cols, 0, "column_sums: ragged buffer");
    let block = |j0: usize, out: &mut [f32]| {
        out.fill(0.0);
        for row in data.chunks_exact(cols) {
            for (o, &v) in out.iter_mut().zip(&row[j0..]) {
                *o += v;
            }
        }
    };
    if data.len() < crate::PARALLEL_MIN_ELEMS {
        block(0, out);
    } else {
        use rayon::prelude::*;
        out.par_chunks_mut(COLUMN_BLOCK).enumerate().for_each(|(b, o)| block(b * COLUMN_BLOCK, o));
    }
}

/// Column sums of `a` and of `a * b` at once (LayerNorm's `dbeta`, `dgamma`):
/// `sum_a[j] = sum_i a[i][j]`, `sum_ab[j] = sum_i a[i][j] * b[i][j]`.
/// Same parallel split and determinism as [`column_sums`].
///
/// # Panics
/// If the buffers disagree in length or are not a multiple of the column count.
pub fn column_sums_with_product(a: &[f32], b: &[f32], sum_a: &mut [f32], sum_ab: &mut [f32]) {
    let cols = sum_a.len();
    if cols == 0 {
        return;
    }
    assert_eq!(a.len(), b.len(), "column_sums_with_product: lengths differ");
    assert_eq!(sum_ab.len(), cols, "column_sums_with_product: output lengths differ");
    assert_eq!(a.len() % cols, 0, "column_sums_with_product: ragged buffer");
    let block = |j0: usize, sa: &mut [f32], sab: &mut [f32]| {
        sa.fill(0.0);
        sab.fill(0.0);
        for (ra, rb) in a.chunks_exact(cols).zip(b.chunks_exact(cols)) {
            for (((s1, s2), &x), &y) in sa.iter_mut().zip(sab.iter_mut()).zip(&ra[j0..]).zip(&rb[j0..]) {
                *s1 += x;
                *s2 += x * y;
            }
        }
    };
    if a.len() < crate::PARALLEL_MIN_ELEMS {
        block(0, sum_a, sum_ab);
    } else {
        use rayon::prelude::*;
        sum_a
            .par_chunks_mut(COLUMN_BLOCK)
            .zip(sum_ab.par_chunks_mut(COLUMN_BLOCK))
            .enumerate()
            .for_each(|(i, (sa, sab))| block(i * COLUMN_BLOCK, sa, sab));
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
    fn column_reductions_small_and_parallel() {
        let data: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let mut out = vec![1.0; 4];
        column_sums(&data, &mut out);
        assert_eq!(out, vec![12.0, 15.0, 18.0, 21.0]);
        // Large enough for the parallel path, with a ragged last block.
        let (rows, cols) = (97, 700);
        let a = values(rows * cols);
        let b: Vec<f32> = a.iter().map(|v| v * 0.5 + 1.0).collect();
        let (mut sa, mut sab, mut plain) = (vec![0.0; cols], vec![0.0; cols], vec![0.0; cols]);
        column_sums_with_product(&a, &b, &mut sa, &mut sab);
        column_sums(&a, &mut plain);
        for j in 0..cols {
            let want_a: f32 = (0..rows).map(|i| a[i * cols + j]).sum();
            let want_ab: f32 = (0..rows).map(|i| a[i * cols + j] * b[i * cols + j]).sum();
            // Same order as the serial loop: bit-identical.
            assert_eq!(sa[j].to_bits(), want_a.to_bits());
            assert_eq!(plain[j].to_bits(), want_a.to_bits());
            assert_eq!(sab[j].to_bits(), want_ab.to_bits());
        }
    }
}
