//! Softmax cross-entropy and the SVP feature-alignment loss.

use serde::{Deserialize, Serialize};
use svp_tensor::{ArrayView2, gemm, reduce, view, view_mut};

/// Mean softmax cross-entropy of `logits` (rows x classes) against `labels`.
///
/// Writes `d loss / d logits` into `grad` (overwriting; row-major, same shape)
/// and returns `(mean loss, number of rows whose argmax equals the label)`.
///
/// # Panics
/// If a label is not below the number of classes (the data loader checks this).
pub fn softmax_cross_entropy(logits: ArrayView2<f32>, labels: &[u32], grad: &mut [f32]) -> (f32, usize) {
    let (rows, classes) = logits.dim();
    assert_eq!(labels.len(), rows, "cross-entropy: one label per row");
    let inv_rows = 1.0 / rows as f32;
    let mut total = 0.0f64;
    let mut correct = 0;
    for ((row, g), &y) in logits.rows().into_iter().zip(grad.chunks_exact_mut(classes)).zip(labels) {
        let y = y as usize;
        assert!(y < classes, "label {y} out of range for {classes} classes");
        let (mut best, mut arg) = (f32::NEG_INFINITY, 0);
        for (j, &v) in row.iter().enumerate() {
            if v > best {
                best = v;
                arg = j;
            }
        }
        correct += usize::from(arg == y);
        let mut z = 0.0f32;
        for (gj, &v) in g.iter_mut().zip(row.iter()) {
            *gj = (v - best).exp();
            z += *gj;
        }
        total += (z.ln() - (row[y] - best)) as f64;
        let inv_z = inv_rows / z;
        g.iter_mut().for_each(|gj| *gj *= inv_z);
        g[y] -= inv_rows;
    }
    ((total / rows as f64) as f32, correct)
}

/// Guard on the row norm in the cosine similarity (PredSim's choice).
pub const FA_EPS: f32 = 1e-8;

/// The feature-alignment loss `|| S(v) - S(v_prev) ||_F^2 / B^2`, where `S` is
/// the batch's matrix of pairwise cosine similarities (rows optionally
/// mean-centred first). `v_prev` is a constant (stop-gradient).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureAlignment {
    /// Subtract each row's mean before the cosine (PredSim's variant).
    pub mean_center: bool,
}

/// Scratch for [`FeatureAlignment::loss_and_grad`], sized once, and the
/// alignment target: the previous layer's similarity matrix, which a trainer
/// computes once and passes on ([`FeatureAlignment::set_target`],
/// [`FaWorkspace::promote`]) instead of recomputing it from `v_prev`.
#[derive(Debug, Default)]
pub struct FaWorkspace {
    normed: Vec<f32>,
    norms: Vec<f32>,
    /// `S(v)` of the last [`FeatureAlignment::align`].
    sim: Vec<f32>,
    /// `S(v_prev)` and the batch size it is for; [`FeatureAlignment::align`]
    /// turns it into `D = S(v) - S(v_prev)` in place (it is used once).
    target: Vec<f32>,
    target_rows: Option<usize>,
    /// The batch size of the `S(v)` in `sim`, until promoted.
    aligned_rows: Option<usize>,
    dnormed: Vec<f32>,
}

impl FaWorkspace {
    /// Scratch for up to `max_rows` rows of widths up to `max_dim`.
    ///
    /// # Panics
    /// If the memory is not there (see [`FaWorkspace::try_new`]).
    pub fn new(max_rows: usize, max_dim: usize) -> Self {
        Self::try_new(max_rows, max_dim).expect("memory for the alignment loss")
    }

    /// [`FaWorkspace::new`], failing cleanly when the memory is not there.
    pub fn try_new(max_rows: usize, max_dim: usize) -> Result<Self, svp_alloc::OutOfMemory> {
        let what = "the feature-alignment loss";
        let zeros = |n| svp_alloc::try_zeros(n, what);
        Ok(Self {
            normed: zeros(max_rows * max_dim)?,
            norms: zeros(max_rows)?,
            sim: zeros(max_rows * max_rows)?,
            target: zeros(max_rows * max_rows)?,
            target_rows: None,
            aligned_rows: None,
            dnormed: zeros(max_rows * max_dim)?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * [&self.normed, &self.norms, &self.sim, &self.target, &self.dnormed].iter().map(|v| v.len()).sum::<usize>()
    }

    /// Makes the `v` of the last [`FeatureAlignment::align`] the next
    /// alignment target: layer `l`'s `v` is layer `l + 1`'s `v_prev`.
    ///
    /// # Panics
    /// If no alignment ran since the last target was set or promoted.
    pub fn promote(&mut self) {
        let rows = self.aligned_rows.take().expect("feature alignment: promote without an alignment");
        std::mem::swap(&mut self.sim, &mut self.target);
        self.target_rows = Some(rows);
    }
}

impl FeatureAlignment {
    /// Row-normalizes `v` into `out` (after optional centring) and writes each
    /// (centred) row's norm into `norms`.
    fn normalize(&self, v: ArrayView2<f32>, out: &mut [f32], norms: &mut [f32]) {
        let d = v.ncols();
        for ((row, o), r) in v.rows().into_iter().zip(out.chunks_exact_mut(d)).zip(norms.iter_mut()) {
            for (oj, &x) in o.iter_mut().zip(row.iter()) {
                *oj = x;
            }
            if self.mean_center {
                let mean = reduce::sum(o) / d as f32;
                o.iter_mut().for_each(|x| *x -= mean);
            }
            let norm = reduce::dot(o, o).sqrt();
            let inv = 1.0 / (norm + FA_EPS);
            o.iter_mut().for_each(|x| *x *= inv);
            *r = norm;
        }
    }

    /// `S(v)` into `sim` (b x b), leaving the normalized rows in `normed`.
    fn similarity(&self, v: ArrayView2<f32>, normed: &mut [f32], norms: &mut [f32], sim: &mut [f32]) {
        let (b, d) = v.dim();
        self.normalize(v, &mut normed[..b * d], &mut norms[..b]);
        let n = view(normed, b, d);
        gemm(1.0, n, n.t(), 0.0, view_mut(sim, b, b));
    }

    /// Sets the alignment target to `S(v_prev)`.
    pub fn set_target(&self, v_prev: ArrayView2<f32>, ws: &mut FaWorkspace) {
        self.similarity(v_prev, &mut ws.normed, &mut ws.norms, &mut ws.target);
        ws.target_rows = Some(v_prev.nrows());
    }

    /// The loss against `v_prev`, and `dv += weight * d loss / d v`
    /// (row-major, `v`'s shape): [`FeatureAlignment::set_target`], then
    /// [`FeatureAlignment::align`].
    pub fn loss_and_grad(
        &self,
        v: ArrayView2<f32>,
        v_prev: ArrayView2<f32>,
        ws: &mut FaWorkspace,
        weight: f32,
        dv: &mut [f32],
    ) -> f32 {
        self.set_target(v_prev, ws);
        self.align(v, ws, weight, dv)
    }

    /// The loss against the workspace's target, and `dv += weight * d loss / d v`.
    /// The target is used up; [`FaWorkspace::promote`] makes `S(v)` the next one.
    ///
    /// # Panics
    /// If no target is set, or it is for another batch size.
    pub fn align(&self, v: ArrayView2<f32>, ws: &mut FaWorkspace, weight: f32, dv: &mut [f32]) -> f32 {
        let (b, d) = v.dim();
        assert_eq!(ws.target_rows.take(), Some(b), "feature alignment: no target for a batch of {b}");
        self.similarity(v, &mut ws.normed, &mut ws.norms, &mut ws.sim);
        ws.aligned_rows = Some(b);
        // target <- D = S(v) - S(v_prev); the loss in f64 over independent
        // lanes (a single chain would serialize 16k additions).
        let mut sq = [0.0f64; 8];
        let (diff, sim) = (&mut ws.target[..b * b], &ws.sim[..b * b]);
        for (dd, s) in diff.chunks_exact_mut(8).zip(sim.chunks_exact(8)) {
            for i in 0..8 {
                dd[i] = s[i] - dd[i];
                sq[i] += dd[i] as f64 * dd[i] as f64;
            }
        }
        for i in b * b / 8 * 8..b * b {
            diff[i] = sim[i] - diff[i];
            sq[0] += diff[i] as f64 * diff[i] as f64;
        }
        let inv_b2 = 1.0 / (b * b) as f32;
        let loss = (sq.iter().sum::<f64>() * inv_b2 as f64) as f32;
        if weight == 0.0 {
            return loss;
        }
        let n = view(&ws.normed, b, d);
        // dL/dN = 4/B^2 D N  (D symmetric)
        gemm(4.0 * inv_b2, view(&ws.target, b, b), n, 0.0, view_mut(&mut ws.dnormed, b, d));
        for (((dn, nr), &r), out) in ws.dnormed[..b * d]
            .chunks_exact_mut(d)
            .zip(ws.normed.chunks_exact(d))
            .zip(&ws.norms[..b])
            .zip(dv.chunks_exact_mut(d))
        {
            // Through n = c / (|c| + eps): dc = dn/(r+eps) - n (n.dn)/r.
            if r > 0.0 {
                let proj = reduce::dot(nr, dn) / r;
                let inv = 1.0 / (r + FA_EPS);
                for (x, &nj) in dn.iter_mut().zip(nr) {
                    *x = *x * inv - nj * proj;
                }
            } else {
                dn.iter_mut().for_each(|x| *x /= FA_EPS);
            }
            if self.mean_center {
                let mean = reduce::sum(dn) / d as f32;
                dn.iter_mut().for_each(|x| *x -= mean);
            }
            for (o, &x) in out.iter_mut().zip(dn.iter()) {
                *o += weight * x;
            }
        }
        loss
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, salt: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + salt) * 7919 % 1013) as f32 - 506.0) / 300.0).collect()
    }

    /// A promoted `S(v)` is the same target, bit for bit, as one computed
    /// again from `v`: layer by layer, as a trainer chains them.
    #[test]
    fn promoted_target_equals_a_recomputed_one() {
        let (b, d) = (37, 10);
        let vs: Vec<Vec<f32>> = (0..4).map(|l| values(b * d, 100 * l)).collect();
        for mean_center in [false, true] {
            let fa = FeatureAlignment { mean_center };
            let mut chained = FaWorkspace::new(b, d);
            fa.set_target(view(&vs[0], b, d), &mut chained);
            for l in 1..vs.len() {
                let (mut g1, mut g2) = (vec![0.5; b * d], vec![0.5; b * d]);
                let loss = fa.align(view(&vs[l], b, d), &mut chained, 0.7, &mut g1);
                chained.promote();
                let mut fresh = FaWorkspace::new(b, d);
                let want = fa.loss_and_grad(view(&vs[l], b, d), view(&vs[l - 1], b, d), &mut fresh, 0.7, &mut g2);
                assert!(loss > 0.0 && loss.to_bits() == want.to_bits(), "layer {l}: {loss} vs {want}");
                assert!(g1.iter().zip(&g2).all(|(a, b)| a.to_bits() == b.to_bits()), "layer {l} gradient");
            }
        }
    }

    /// The second value is the number of rows whose largest logit is the
    /// label's, a tie going to the first of the tied classes.
    #[test]
    fn cross_entropy_counts_rows_whose_argmax_is_the_label() {
        let logits = [
            0.1, 0.9, 0.3, // argmax 1
            2.0, 2.0, 1.0, // tie: class 0
            -1.0, -3.0, -0.5, // argmax 2
            0.0, 0.0, 0.0, // all tied: class 0
        ];
        let mut grad = [0.0; 12];
        let count = |labels: &[u32], grad: &mut [f32]| softmax_cross_entropy(view(&logits, 4, 3), labels, grad).1;
        assert_eq!(count(&[1, 0, 2, 0], &mut grad), 4);
        assert_eq!(count(&[1, 1, 2, 1], &mut grad), 2, "ties go to the first class");
        assert_eq!(count(&[0, 2, 0, 2], &mut grad), 0);
        assert_eq!(count(&[2, 0, 1, 0], &mut grad), 2);
    }

    /// A row that is all zeros (a sample no unit of the layer responds to)
    /// has the cosine's derivative at zero, `1/eps` times the gradient wrt
    /// its normalized row `4/B^2 (D N)_i`, where that row of `N` is zero.
    #[test]
    fn a_zero_row_gets_the_gradient_through_the_epsilon() {
        let (b, d) = (6, 4);
        let mut v = values(b * d, 3);
        v[2 * d..3 * d].fill(0.0);
        let v_prev = values(b * 3, 11);
        let mut dv = vec![0.0; b * d];
        let fa = FeatureAlignment::default();
        fa.loss_and_grad(view(&v, b, d), view(&v_prev, b, 3), &mut FaWorkspace::new(b, d), 1.0, &mut dv);
        let normed = |m: &[f32], cols: usize| -> Vec<Vec<f64>> {
            m.chunks(cols)
                .map(|r| {
                    let n = r.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
                    r.iter().map(|&x| x as f64 / (n + FA_EPS as f64)).collect()
                })
                .collect()
        };
        let (n, n_prev) = (normed(&v, d), normed(&v_prev, 3));
        let dot = |a: &[f64], c: &[f64]| a.iter().zip(c).map(|(x, y)| x * y).sum::<f64>();
        for k in 0..d {
            let dn: f64 = (0..b).map(|j| (dot(&n[2], &n[j]) - dot(&n_prev[2], &n_prev[j])) * n[j][k]).sum::<f64>();
            let want = 4.0 / (b * b) as f64 * dn / FA_EPS as f64;
            let got = dv[2 * d + k] as f64;
            assert!((got - want).abs() <= 1e-4 * want.abs(), "column {k}: {got} vs {want}");
        }
    }

    /// What a trainer reports as its workspace: every buffer, in bytes.
    #[test]
    fn fa_workspace_counts_its_buffers() {
        let (b, d) = (37, 10);
        assert_eq!(FaWorkspace::new(b, d).bytes(), 4 * (2 * b * d + b + 2 * b * b));
    }

    /// A target is used once: a second alignment needs a promotion or a new target.
    #[test]
    #[should_panic(expected = "no target")]
    fn a_target_serves_one_alignment() {
        let v = values(8 * 3, 0);
        let (fa, mut ws) = (FeatureAlignment::default(), FaWorkspace::new(8, 3));
        fa.set_target(view(&v, 8, 3), &mut ws);
        fa.align(view(&v, 8, 3), &mut ws, 1.0, &mut [0.0; 24]);
        fa.align(view(&v, 8, 3), &mut ws, 1.0, &mut [0.0; 24]);
    }

    #[test]
    #[should_panic(expected = "no target")]
    fn aligning_without_a_target_is_a_bug() {
        let v = values(8 * 3, 0);
        let mut ws = FaWorkspace::new(8, 3);
        FeatureAlignment::default().align(view(&v, 8, 3), &mut ws, 1.0, &mut [0.0; 24]);
    }
}
