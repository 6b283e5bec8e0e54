//! LayerNorm over the features of each row, fused with its neighbours.
//!
//! The forward adds the bias of the linear map before it and applies the
//! activation after it in the same pass over a row; the backward applies the
//! activation's derivative, accumulates the parameter gradients and the
//! preceding bias's gradient, all in one pass over the batch. A row is a few
//! KiB, so the several sweeps over it stay in L1; the batch is swept once.
//!
//! The batch is split into chunks of rows whose size depends on the width
//! alone (run on the pool when the batch is large). Column sums are
//! accumulated per chunk and the chunks are added in order, so the bits never
//! depend on the thread count.

use crate::Activation;
use rayon::prelude::*;
use svp_tensor::{PARALLEL_MIN_ELEMS, reduce};

/// LayerNorm's variance epsilon (PyTorch's default).
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// Rows per task: a fixed function of the width, so that the backward's
/// partial sums are the same whatever the number of threads.
fn rows_per_chunk(width: usize) -> usize {
    (PARALLEL_MIN_ELEMS / 2 / width.max(1)).max(1)
}

/// Floats of scratch [`backward`] needs for up to `rows` rows of `width`
/// features. It grows with both, so the largest layer's size serves all.
pub fn backward_scratch_len(rows: usize, width: usize) -> usize {
    rows.div_ceil(rows_per_chunk(width)) * 3 * width
}

/// Normalizes each `gamma.len()`-wide row of `z` (plus `bias`, if given) in
/// place, leaving `xhat` there, writes `1/std` per row into `rstd`, and
/// `out = act(gamma * xhat + beta)`.
///
/// # Panics
/// If the buffers' lengths disagree.
pub fn forward(
    z: &mut [f32],
    bias: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    act: Activation,
    rstd: &mut [f32],
    out: &mut [f32],
) {
    let d = gamma.len();
    let rows = rstd.len();
    assert!(z.len() == rows * d && out.len() == rows * d, "layer norm forward: {rows} rows of {d}");
    assert_eq!(beta.len(), d, "layer norm forward: beta");
    assert!(bias.is_none_or(|b| b.len() == d), "layer norm forward: bias");
    let inv_d = 1.0 / d as f32;
    let chunk = rows_per_chunk(d);
    let row = |z: &mut [f32], r: &mut f32, out: &mut [f32]| {
        if let Some(bias) = bias {
            z.iter_mut().zip(bias).for_each(|(v, &b)| *v += b);
        }
        let mean = reduce::sum(z) * inv_d;
        let var = reduce::sum_sq_dev(z, mean) * inv_d;
        *r = 1.0 / (var + LAYER_NORM_EPS).sqrt();
        for (((v, o), &g), &b) in z.iter_mut().zip(out.iter_mut()).zip(gamma).zip(beta) {
            *v = (*v - mean) * *r;
            *o = g * *v + b;
        }
        act.forward_in_place(out);
    };
    let task = |((z, r), out): ((&mut [f32], &mut [f32]), &mut [f32])| {
        for ((z, r), out) in z.chunks_exact_mut(d).zip(r.iter_mut()).zip(out.chunks_exact_mut(d)) {
            row(z, r, out);
        }
    };
    if rows * d < PARALLEL_MIN_ELEMS {
        z.chunks_mut(chunk * d).zip(rstd.chunks_mut(chunk)).zip(out.chunks_mut(chunk * d)).for_each(task);
    } else {
        z.par_chunks_mut(chunk * d).zip(rstd.par_chunks_mut(chunk)).zip(out.par_chunks_mut(chunk * d)).for_each(task);
    }
}

/// The backward of [`forward`]. `dy` holds the gradient wrt `out` and is
/// turned, in place, into the gradient wrt `z`. Writes (overwriting)
/// `dgamma`, `dbeta` and, if given, the gradient of the bias before the norm.
/// `scratch` holds at least [`backward_scratch_len`] floats.
///
/// # Panics
/// If the buffers' lengths disagree or `scratch` is too short.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    xhat: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    beta: &[f32],
    act: Activation,
    dy: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    mut dbias: Option<&mut [f32]>,
    scratch: &mut [f32],
) {
    let d = gamma.len();
    let rows = rstd.len();
    assert!(xhat.len() == rows * d && dy.len() == rows * d, "layer norm backward: {rows} rows of {d}");
    assert!(beta.len() == d && dgamma.len() == d && dbeta.len() == d, "layer norm backward: parameters");
    assert!(dbias.as_ref().is_none_or(|b| b.len() == d), "layer norm backward: bias");
    let chunk = rows_per_chunk(d);
    let sums = if dbias.is_some() { 3 } else { 2 };
    let partial_len = rows.div_ceil(chunk) * sums * d;
    assert!(scratch.len() >= partial_len, "layer norm backward: scratch of {} < {partial_len}", scratch.len());
    let partials = &mut scratch[..partial_len];
    let inv_d = 1.0 / d as f32;

    type Chunk<'a> = (((&'a mut [f32], &'a [f32]), &'a [f32]), &'a mut [f32]);
    let task = |(((dy, xhat), rstd), partial): Chunk| {
        partial.fill(0.0);
        let (sum_dy, rest) = partial.split_at_mut(d);
        let (sum_dy_xhat, sum_dz) = rest.split_at_mut(d);
        for ((dy, x), &r) in dy.chunks_exact_mut(d).zip(xhat.chunks_exact(d)).zip(rstd) {
            act.backward_affine(dy, x, gamma, beta);
            for (((s, sx), &grad), &x) in sum_dy.iter_mut().zip(sum_dy_xhat.iter_mut()).zip(dy.iter()).zip(x) {
                *s += grad;
                *sx += grad * x;
            }
            // dy becomes the gradient wrt xhat, then wrt z.
            dy.iter_mut().zip(gamma).for_each(|(v, &g)| *v *= g);
            let mean_dxhat = reduce::sum(dy) * inv_d;
            let mean_dxhat_x = reduce::dot(dy, x) * inv_d;
            for (v, &x) in dy.iter_mut().zip(x) {
                *v = r * (*v - mean_dxhat - x * mean_dxhat_x);
            }
            sum_dz.iter_mut().zip(dy.iter()).for_each(|(s, &v)| *s += v);
        }
    };
    // The same chunks either way, so the same partial sums: only the scheduling differs.
    if rows * d < PARALLEL_MIN_ELEMS {
        dy.chunks_mut(chunk * d)
            .zip(xhat.chunks(chunk * d))
            .zip(rstd.chunks(chunk))
            .zip(partials.chunks_mut(sums * d))
            .for_each(task);
    } else {
        dy.par_chunks_mut(chunk * d)
            .zip(xhat.par_chunks(chunk * d))
            .zip(rstd.par_chunks(chunk))
            .zip(partials.par_chunks_mut(sums * d))
            .for_each(task);
    }

    dbeta.fill(0.0);
    dgamma.fill(0.0);
    if let Some(b) = dbias.as_deref_mut() {
        b.fill(0.0);
    }
    let add = |total: &mut [f32], part: &[f32]| total.iter_mut().zip(part).for_each(|(t, &p)| *t += p);
    for partial in partials.chunks_exact(sums * d) {
        add(dbeta, &partial[..d]);
        add(dgamma, &partial[d..2 * d]);
        if let Some(b) = dbias.as_deref_mut() {
            add(b, &partial[2 * d..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, salt: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + salt) * 7919 % 1013) as f32 - 506.0) / 257.0).collect()
    }

    /// Forward and backward against a plain f64 reference, for widths and
    /// batch sizes on both sides of the parallel threshold and of a chunk.
    #[test]
    fn matches_an_f64_reference() {
        for (rows, d) in [(1, 7), (5, 64), (3, 1024), (37, 1024), (130, 300)] {
            for act in [Activation::Identity, Activation::Relu, Activation::Gelu] {
                for with_bias in [false, true] {
                    check(rows, d, act, with_bias);
                }
            }
        }
    }

    fn check(rows: usize, d: usize, act: Activation, with_bias: bool) {
        let z0 = values(rows * d, 1);
        let bias = values(d, 2);
        let gamma: Vec<f32> = values(d, 3).iter().map(|v| 1.0 + 0.3 * v).collect();
        let beta = values(d, 4);
        let dout = values(rows * d, 5);
        let bias = with_bias.then_some(&bias[..]);

        let (mut z, mut rstd, mut out) = (z0.clone(), vec![0.0; rows], vec![0.0; rows * d]);
        forward(&mut z, bias, &gamma, &beta, act, &mut rstd, &mut out);
        let mut dy = dout.clone();
        let (mut dg, mut db, mut dbias) = (vec![9.0; d], vec![9.0; d], vec![9.0; d]);
        let mut scratch = vec![f32::NAN; backward_scratch_len(rows, d)];
        let dbias_out = with_bias.then_some(&mut dbias[..]);
        backward(&z, &rstd, &gamma, &beta, act, &mut dy, &mut dg, &mut db, dbias_out, &mut scratch);

        // Reference: y = act(gamma * (z - mean) / std + beta), by rows in f64.
        let act64 = |v: f64| match act {
            Activation::Identity => (v, 1.0),
            Activation::Relu => (v.max(0.0), if v > 0.0 { 1.0 } else { 0.0 }),
            Activation::Gelu => {
                let cdf = 0.5 * (1.0 + libm::erf(v / 2f64.sqrt()));
                let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
                (v * cdf, cdf + v * pdf)
            }
        };
        let (mut want_dg, mut want_db, mut want_dbias) = (vec![0.0f64; d], vec![0.0f64; d], vec![0.0f64; d]);
        for i in 0..rows {
            let zr: Vec<f64> = (0..d).map(|j| z0[i * d + j] as f64 + bias.map_or(0.0, |b| b[j] as f64)).collect();
            let mean = zr.iter().sum::<f64>() / d as f64;
            let var = zr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            let r = 1.0 / (var + LAYER_NORM_EPS as f64).sqrt();
            let xh: Vec<f64> = zr.iter().map(|v| (v - mean) * r).collect();
            let mut dxh = vec![0.0; d];
            for j in 0..d {
                let (y, slope) = act64(gamma[j] as f64 * xh[j] + beta[j] as f64);
                let at = i * d + j;
                assert!((out[at] as f64 - y).abs() < 2e-5 * (1.0 + y.abs()), "out {rows}x{d} {act:?}");
                assert!((z[at] as f64 - xh[j]).abs() < 2e-5 * (1.0 + xh[j].abs()), "xhat {rows}x{d}");
                let g = dout[at] as f64 * slope;
                want_db[j] += g;
                want_dg[j] += g * xh[j];
                dxh[j] = g * gamma[j] as f64;
            }
            let m1 = dxh.iter().sum::<f64>() / d as f64;
            let m2 = dxh.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / d as f64;
            for j in 0..d {
                let dz = r * (dxh[j] - m1 - xh[j] * m2);
                want_dbias[j] += dz;
                let got = dy[i * d + j] as f64;
                assert!((got - dz).abs() < 1e-4 * (1.0 + dz.abs()), "dz {rows}x{d} {act:?}: {got} vs {dz}");
            }
        }
        let close = |got: &[f32], want: &[f64], what: &str| {
            for (g, w) in got.iter().zip(want) {
                assert!((*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()) * (rows as f64).sqrt(), "{what}: {g} vs {w}");
            }
        };
        close(&dg, &want_dg, "dgamma");
        close(&db, &want_db, "dbeta");
        if with_bias {
            close(&dbias, &want_dbias, "dbias");
        } else {
            assert!(dbias.iter().all(|&v| v == 9.0), "dbias written though not asked for");
        }
    }

    /// The same bits on one thread as on the pool.
    #[test]
    fn bits_do_not_depend_on_the_thread_count() {
        let (rows, d) = (128, 1024);
        let run = || {
            let mut z = values(rows * d, 11);
            let (gamma, beta, bias) = (values(d, 12), values(d, 13), values(d, 14));
            let (mut rstd, mut out) = (vec![0.0; rows], vec![0.0; rows * d]);
            forward(&mut z, Some(&bias), &gamma, &beta, Activation::Gelu, &mut rstd, &mut out);
            let mut dy = values(rows * d, 15);
            let (mut dg, mut db, mut dbias) = (vec![0.0; d], vec![0.0; d], vec![0.0; d]);
            let mut scratch = vec![0.0; backward_scratch_len(rows, d)];
            backward(
                &z,
                &rstd,
                &gamma,
                &beta,
                Activation::Gelu,
                &mut dy,
                &mut dg,
                &mut db,
                Some(&mut dbias),
                &mut scratch,
            );
            [out, dy, dg, db, dbias].concat().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(run);
        let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap().install(run);
        assert_eq!(one, two);
    }

    #[test]
    fn scratch_for_the_widest_serves_narrower_layers() {
        for rows in [1, 7, 128, 1000] {
            for d in 1..2000 {
                assert!(backward_scratch_len(rows, d) <= backward_scratch_len(rows, d + 1), "{rows} rows, width {d}");
            }
        }
    }
}
