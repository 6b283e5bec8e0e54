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

/// Scratch for [`FeatureAlignment::loss_and_grad`], sized once.
#[derive(Debug, Default)]
pub struct FaWorkspace {
    normed: Vec<f32>,
    normed_prev: Vec<f32>,
    norms: Vec<f32>,
    sim: Vec<f32>,
    sim_prev: Vec<f32>,
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
        Ok(Self {
            normed: svp_alloc::try_zeros(max_rows * max_dim, what)?,
            normed_prev: svp_alloc::try_zeros(max_rows * max_dim, what)?,
            norms: svp_alloc::try_zeros(max_rows, what)?,
            sim: svp_alloc::try_zeros(max_rows * max_rows, what)?,
            sim_prev: svp_alloc::try_zeros(max_rows * max_rows, what)?,
            dnormed: svp_alloc::try_zeros(max_rows * max_dim, what)?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.normed.len()
            + self.normed_prev.len()
            + self.norms.len()
            + self.sim.len()
            + self.sim_prev.len()
            + self.dnormed.len())
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

    /// The loss, and `dv += weight * d loss / d v` (row-major, `v`'s shape).
    pub fn loss_and_grad(
        &self,
        v: ArrayView2<f32>,
        v_prev: ArrayView2<f32>,
        ws: &mut FaWorkspace,
        weight: f32,
        dv: &mut [f32],
    ) -> f32 {
        let (b, d) = v.dim();
        let d_prev = v_prev.ncols();
        assert_eq!(v_prev.nrows(), b, "feature alignment: batch sizes differ");
        self.normalize(v, &mut ws.normed[..b * d], &mut ws.norms[..b]);
        // The previous layer's norms are not needed; its similarity buffer is
        // free until the GEMM below overwrites it.
        self.normalize(v_prev, &mut ws.normed_prev[..b * d_prev], &mut ws.sim_prev[..b]);
        let n = view(&ws.normed, b, d);
        let n_prev = view(&ws.normed_prev, b, d_prev);
        gemm(1.0, n, n.t(), 0.0, view_mut(&mut ws.sim, b, b));
        gemm(1.0, n_prev, n_prev.t(), 0.0, view_mut(&mut ws.sim_prev, b, b));
        // sim <- D = S(v) - S(v_prev)
        let mut sq = 0.0f64;
        for (s, &p) in ws.sim[..b * b].iter_mut().zip(&ws.sim_prev[..b * b]) {
            *s -= p;
            sq += (*s as f64) * (*s as f64);
        }
        let inv_b2 = 1.0 / (b * b) as f32;
        let loss = (sq * inv_b2 as f64) as f32;
        if weight == 0.0 {
            return loss;
        }
        // dL/dN = 4/B^2 D N  (D symmetric)
        gemm(4.0 * inv_b2, view(&ws.sim, b, b), n, 0.0, view_mut(&mut ws.dnormed, b, d));
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
