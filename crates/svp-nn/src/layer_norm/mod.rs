//! LayerNorm over the features of each row, fused with its neighbours.
//!
//! The forward adds the bias of the linear map before it and applies the
//! activation after it: three passes over a row (bias and sum, squared
//! deviations, then normalization, affine map and activation). The backward
//! applies the activation's derivative and accumulates the parameter
//! gradients, the row's two means and, in a second pass, the preceding
//! bias's gradient. A row is a few KiB, so its passes stay in L1; the batch
//! is swept once. On AVX-512 CPUs, ReLU and identity rows of whole 16-float
//! lanes take intrinsics versions of the same passes (`layer_norm/avx512.rs`), twice as
//! fast and bit for bit the same.
//!
//! The batch is split into chunks of rows whose size depends on the width
//! alone (run on the pool when the batch is large). Column sums are
//! accumulated per chunk and the chunks are added in order, so the bits never
//! depend on the thread count. Row sums use `reduce`'s fixed lane layout.

#[cfg(target_arch = "x86_64")]
mod avx512;

use crate::Activation;
use crate::activation::{gelu, gelu_grad, relu, relu_grad};
use rayon::prelude::*;
use svp_tensor::PARALLEL_MIN_ELEMS;
use svp_tensor::reduce::{self, LANES, LaneSum};

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
/// `out = act(gamma * xhat + beta)`, with `1/std = 1/sqrt(var + 1e-5)`
/// ([`LAYER_NORM_EPS`]).
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
    forward_with_eps(LAYER_NORM_EPS, z, bias, gamma, beta, act, rstd, out);
}

/// [`forward`] with the variance epsilon `eps` (timm's ViTs use `1e-6`).
///
/// # Panics
/// If the buffers' lengths disagree.
#[allow(clippy::too_many_arguments)]
pub fn forward_with_eps(
    eps: f32,
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
    let chunk = rows_per_chunk(d);
    let task =
        |((z, r), out): ((&mut [f32], &mut [f32]), &mut [f32])| forward_rows(eps, z, bias, gamma, beta, act, r, out);
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

    type Chunk<'a> = (((&'a mut [f32], &'a [f32]), &'a [f32]), &'a mut [f32]);
    let task = |(((dy, xhat), rstd), partial): Chunk| backward_rows(xhat, rstd, gamma, beta, act, dy, partial);
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

svp_tensor::multiversion! {
    /// [`forward`] over a chunk of rows.
    fn forward_rows(
        eps: f32,
        z: &mut [f32],
        bias: Option<&[f32]>,
        gamma: &[f32],
        beta: &[f32],
        act: Activation,
        rstd: &mut [f32],
        out: &mut [f32],
    ) {
        let d = gamma.len();
        #[cfg(target_arch = "x86_64")]
        let simd_rows = avx512_rows(d, act);
        for ((z, r), out) in z.chunks_exact_mut(d).zip(rstd.iter_mut()).zip(out.chunks_exact_mut(d)) {
            #[cfg(target_arch = "x86_64")]
            if let Some(relu) = simd_rows {
                // SAFETY: `avx512_rows` answers only when the process runs the
                // AVX-512 kernels, which it does only on a CPU with AVX-512F.
                *r = unsafe { avx512::forward_row(eps, z, bias, gamma, beta, relu, out) };
                continue;
            }
            *r = match act {
                Activation::Relu => forward_row(eps, z, bias, gamma, beta, relu, out),
                Activation::Gelu => forward_row(eps, z, bias, gamma, beta, gelu, out),
                Activation::Identity => forward_row(eps, z, bias, gamma, beta, |v| v, out),
            };
        }
    }
}

svp_tensor::multiversion! {
    /// [`backward`] over a chunk of rows, into the chunk's `partial` sums
    /// (`dbeta`'s, `dgamma`'s and, when 3 widths long, the bias's).
    fn backward_rows(
        xhat: &[f32],
        rstd: &[f32],
        gamma: &[f32],
        beta: &[f32],
        act: Activation,
        dy: &mut [f32],
        partial: &mut [f32],
    ) {
        let d = gamma.len();
        partial.fill(0.0);
        let (sum_dy, rest) = partial.split_at_mut(d);
        let (sum_dy_xhat, sum_dz) = rest.split_at_mut(d);
        #[cfg(target_arch = "x86_64")]
        let simd_rows = avx512_rows(d, act);
        for ((dy, x), &r) in dy.chunks_exact_mut(d).zip(xhat.chunks_exact(d)).zip(rstd) {
            let sums = (&mut *sum_dy, &mut *sum_dy_xhat, &mut *sum_dz);
            #[cfg(target_arch = "x86_64")]
            if let Some(relu) = simd_rows {
                // SAFETY: as in `forward_rows`.
                unsafe { avx512::backward_row(dy, x, r, gamma, beta, relu, sums) };
                continue;
            }
            match act {
                Activation::Relu => backward_row(dy, x, r, gamma, beta, relu_grad, sums),
                Activation::Gelu => backward_row(dy, x, r, gamma, beta, gelu_grad, sums),
                Activation::Identity => backward_row(dy, x, r, gamma, beta, |g, _| g, sums),
            }
        }
    }
}

/// Whether rows of `width` under `act` take the AVX-512 passes (only when
/// the process runs the AVX-512 kernels: `svp_tensor::cpu::selected`), and
/// if so whether the activation is ReLU (else the identity).
#[cfg(target_arch = "x86_64")]
fn avx512_rows(width: usize, act: Activation) -> Option<bool> {
    if svp_tensor::cpu::selected() != svp_tensor::cpu::Isa::Avx512 {
        return None;
    }
    let whole_lanes = width.is_multiple_of(LANES);
    match act {
        Activation::Relu if whole_lanes => Some(true),
        Activation::Identity if whole_lanes => Some(false),
        _ => None,
    }
}

/// One row of [`forward`] in three passes: bias and sum, squared
/// deviations, then normalization, affine map and activation together (the
/// sums in `reduce`'s lane layout, so the bits of `reduce::sum` and
/// `reduce::sum_sq_dev`). Returns `1/std`.
fn forward_row(
    eps: f32,
    z: &mut [f32],
    bias: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    act: impl Fn(f32) -> f32,
    out: &mut [f32],
) -> f32 {
    let inv_d = 1.0 / z.len() as f32;
    let mut sum = LaneSum::new();
    let (chunks, tail) = z.as_chunks_mut::<LANES>();
    if let Some(bias) = bias {
        let (bias_chunks, bias_tail) = bias.as_chunks::<LANES>();
        for (c, b) in chunks.iter_mut().zip(bias_chunks) {
            let v: [f32; LANES] = std::array::from_fn(|i| c[i] + b[i]);
            *c = v;
            sum.add(&v);
        }
        tail.iter_mut().zip(bias_tail).for_each(|(v, &b)| *v += b);
    } else {
        chunks.iter().for_each(|c| sum.add(c));
    }
    let mean = sum.finish(tail.iter().copied()) * inv_d;
    let var = reduce::sum_sq_dev(z, mean) * inv_d;
    let r = 1.0 / (var + eps).sqrt();
    for (((v, o), &g), &b) in z.iter_mut().zip(out.iter_mut()).zip(gamma).zip(beta) {
        *v = (*v - mean) * r;
        *o = act(g * *v + b);
    }
    r
}

/// One row of [`backward`] in two passes, accumulating the parameter sums:
/// `dy` (the gradient wrt the activation's output) becomes the gradient wrt
/// the activation's input (recomputed as `gamma * xhat + beta`, the forward's
/// expression), wrt `xhat`, then wrt `z`. The row's two means are summed in
/// `reduce`'s lane layout as the first pass goes (the bits of `reduce::sum`
/// and `reduce::dot` over the values it stores).
#[inline(always)]
fn backward_row(
    dy: &mut [f32],
    xhat: &[f32],
    r: f32,
    gamma: &[f32],
    beta: &[f32],
    act_grad: impl Fn(f32, f32) -> f32,
    (sum_dy, sum_dy_xhat, sum_dz): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let inv_d = 1.0 / dy.len() as f32;
    let (mut sum_dxhat, mut sum_dxhat_x) = (LaneSum::new(), LaneSum::new());
    let element = |dy: &mut f32, x: f32, g: f32, b: f32, s: &mut f32, sx: &mut f32| -> f32 {
        let grad = act_grad(*dy, g * x + b);
        *s += grad;
        *sx += grad * x;
        *dy = grad * g;
        *dy
    };
    let d = dy.len();
    let whole = d / LANES * LANES;
    let (dy_chunks, dy_tail) = dy.as_chunks_mut::<LANES>();
    let rows = xhat.as_chunks::<LANES>().0.iter().zip(gamma.as_chunks::<LANES>().0).zip(beta.as_chunks::<LANES>().0);
    let sums = sum_dy.as_chunks_mut::<LANES>().0.iter_mut().zip(sum_dy_xhat.as_chunks_mut::<LANES>().0);
    for ((dy, ((x, g), b)), (s, sx)) in dy_chunks.iter_mut().zip(rows).zip(sums) {
        let dxhat: [f32; LANES] = std::array::from_fn(|i| element(&mut dy[i], x[i], g[i], b[i], &mut s[i], &mut sx[i]));
        sum_dxhat.add(&dxhat);
        sum_dxhat_x.add(&std::array::from_fn(|i| dxhat[i] * x[i]));
    }
    let mut tail_dxhat = [0.0; LANES];
    for (i, dy) in dy_tail.iter_mut().enumerate() {
        let j = whole + i;
        tail_dxhat[i] = element(dy, xhat[j], gamma[j], beta[j], &mut sum_dy[j], &mut sum_dy_xhat[j]);
    }
    let tail = &tail_dxhat[..d - whole];
    let mean_dxhat = sum_dxhat.finish(tail.iter().copied()) * inv_d;
    let mean_dxhat_x = sum_dxhat_x.finish(tail.iter().zip(&xhat[whole..]).map(|(v, x)| v * x)) * inv_d;
    if sum_dz.is_empty() {
        for (v, &x) in dy.iter_mut().zip(xhat) {
            *v = r * (*v - mean_dxhat - x * mean_dxhat_x);
        }
    } else {
        for ((v, &x), s) in dy.iter_mut().zip(xhat).zip(sum_dz) {
            *v = r * (*v - mean_dxhat - x * mean_dxhat_x);
            *s += *v;
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

    /// The fused row passes give the bits of the plain one-step-per-pass
    /// formulation (the sums through `reduce`), for widths on both sides of a
    /// lane chunk and with ragged tails, so fusing them changed no model.
    #[test]
    fn fused_rows_match_the_plain_passes_bit_for_bit() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for d in [1, 7, 16, 17, 33, 1024, 1031] {
            for act in [Activation::Identity, Activation::Relu, Activation::Gelu] {
                for with_bias in [false, true] {
                    let (bias, gamma, beta) = (values(d, 22), values(d, 23), values(d, 24));
                    let bias = with_bias.then_some(&bias[..]);
                    let f = |v: f32| match act {
                        Activation::Relu => relu(v),
                        Activation::Gelu => gelu(v),
                        Activation::Identity => v,
                    };
                    let f_grad = |g: f32, v: f32| match act {
                        Activation::Relu => relu_grad(g, v),
                        Activation::Gelu => gelu_grad(g, v),
                        Activation::Identity => g,
                    };
                    let inv_d = 1.0 / d as f32;

                    // Plain forward: one pass per step.
                    let mut z_plain = values(d, 21);
                    if let Some(bias) = bias {
                        z_plain.iter_mut().zip(bias).for_each(|(v, &b)| *v += b);
                    }
                    let mean = reduce::sum(&z_plain) * inv_d;
                    let var = reduce::sum_sq_dev(&z_plain, mean) * inv_d;
                    let r_plain = 1.0 / (var + LAYER_NORM_EPS).sqrt();
                    z_plain.iter_mut().for_each(|v| *v = (*v - mean) * r_plain);
                    let out_plain: Vec<f32> =
                        z_plain.iter().zip(&gamma).zip(&beta).map(|((&x, &g), &b)| f(g * x + b)).collect();

                    let (mut z, mut out) = (values(d, 21), vec![0.0; d]);
                    let r = forward_row(LAYER_NORM_EPS, &mut z, bias, &gamma, &beta, f, &mut out);
                    assert_eq!(r.to_bits(), r_plain.to_bits(), "1/std, width {d} {act:?}");
                    assert_eq!(bits(&z), bits(&z_plain), "xhat, width {d} {act:?}");
                    assert_eq!(bits(&out), bits(&out_plain), "out, width {d} {act:?}");

                    // Plain backward, accumulating into sums that already hold values.
                    let dout = values(d, 25);
                    let sums0 = [values(d, 26), values(d, 27), values(d, 28)];
                    let [mut s_dy, mut s_dyx, mut s_dz] = sums0.clone();
                    let mut dy_plain: Vec<f32> = dout
                        .iter()
                        .zip(&z)
                        .zip(&gamma)
                        .zip(&beta)
                        .map(|(((&g, &x), &a), &b)| f_grad(g, a * x + b))
                        .collect();
                    for j in 0..d {
                        s_dy[j] += dy_plain[j];
                        s_dyx[j] += dy_plain[j] * z[j];
                    }
                    dy_plain.iter_mut().zip(&gamma).for_each(|(v, &g)| *v *= g);
                    let m1 = reduce::sum(&dy_plain) * inv_d;
                    let m2 = reduce::dot(&dy_plain, &z) * inv_d;
                    dy_plain.iter_mut().zip(&z).for_each(|(v, &x)| *v = r * (*v - m1 - x * m2));
                    s_dz.iter_mut().zip(&dy_plain).for_each(|(s, &v)| *s += v);

                    for with_dz in [false, true] {
                        let mut dy = dout.clone();
                        let [mut t_dy, mut t_dyx, mut t_dz] = sums0.clone();
                        let t_dz = if with_dz { &mut t_dz[..] } else { &mut [] };
                        backward_row(&mut dy, &z, r, &gamma, &beta, f_grad, (&mut t_dy, &mut t_dyx, t_dz));
                        assert_eq!(bits(&dy), bits(&dy_plain), "dz, width {d} {act:?}");
                        assert_eq!(bits(&t_dy), bits(&s_dy), "dbeta sums, width {d} {act:?}");
                        assert_eq!(bits(&t_dyx), bits(&s_dyx), "dgamma sums, width {d} {act:?}");
                        if with_dz {
                            assert_eq!(bits(t_dz), bits(&s_dz), "bias sums, width {d} {act:?}");
                        }
                    }
                }
            }
        }
    }

    /// The AVX-512 rows give the portable rows' bits, for every width they
    /// take, with and without bias and bias sums, and for rows holding a
    /// negative zero (ReLU's sign) and a NaN (ReLU's answer to it).
    /// (Runs where the process runs the AVX-512 kernels; says it skipped
    /// elsewhere.)
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_rows_match_the_portable_ones_bit_for_bit() {
        if svp_tensor::cpu::selected() != svp_tensor::cpu::Isa::Avx512 {
            eprintln!("skipped: the process does not run the AVX-512 kernels");
            assert_eq!(avx512_rows(1024, Activation::Relu), None);
            return;
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for d in [16, 32, 784, 1024] {
            for (act, relu) in [(Activation::Relu, true), (Activation::Identity, false)] {
                assert_eq!(avx512_rows(d, act), Some(relu));
                let f = |v: f32| if relu { super::relu(v) } else { v };
                let f_grad = |g: f32, v: f32| if relu { super::relu_grad(g, v) } else { g };
                for (special, with_bias) in [(None, false), (None, true), (Some(-0.0), true), (Some(f32::NAN), false)] {
                    let (bias, gamma, beta) = (values(d, 32), values(d, 33), values(d, 34));
                    let bias = with_bias.then_some(&bias[..]);
                    let mut z0 = values(d, 31);
                    if let Some(v) = special {
                        z0[d / 2] = v;
                    }
                    let (mut z, mut out) = (z0.clone(), vec![0.0; d]);
                    // timm's epsilon: the parameter reaches both versions.
                    let eps = 1e-6;
                    let r = forward_row(eps, &mut z, bias, &gamma, &beta, f, &mut out);
                    let (mut z_simd, mut out_simd) = (z0.clone(), vec![0.0; d]);
                    // SAFETY: the process runs the AVX-512 kernels (checked
                    // above), which it does only on a CPU with AVX-512F.
                    let r_simd =
                        unsafe { avx512::forward_row(eps, &mut z_simd, bias, &gamma, &beta, relu, &mut out_simd) };
                    let what = format!("width {d} {act:?} {special:?}");
                    assert_eq!(r.to_bits(), r_simd.to_bits(), "1/std, {what}");
                    assert_eq!(bits(&z), bits(&z_simd), "xhat, {what}");
                    assert_eq!(bits(&out), bits(&out_simd), "out, {what}");

                    for with_dz in [false, true] {
                        let sums0 = [values(d, 36), values(d, 37), values(d, 38)];
                        let [mut a, mut b, mut c] = sums0.clone();
                        let [mut a_simd, mut b_simd, mut c_simd] = sums0;
                        let (mut dy, mut dy_simd) = (values(d, 35), values(d, 35));
                        let c = if with_dz { &mut c[..] } else { &mut [] };
                        let c_simd = if with_dz { &mut c_simd[..] } else { &mut [] };
                        backward_row(&mut dy, &z, r, &gamma, &beta, f_grad, (&mut a, &mut b, &mut *c));
                        // SAFETY: as above.
                        unsafe {
                            avx512::backward_row(
                                &mut dy_simd,
                                &z,
                                r,
                                &gamma,
                                &beta,
                                relu,
                                (&mut a_simd, &mut b_simd, &mut *c_simd),
                            )
                        };
                        assert_eq!(bits(&dy), bits(&dy_simd), "dz, {what}");
                        assert_eq!(bits(&a), bits(&a_simd), "dbeta sums, {what}");
                        assert_eq!(bits(&b), bits(&b_simd), "dgamma sums, {what}");
                        assert_eq!(bits(c), bits(c_simd), "bias sums, {what}");
                    }
                }
            }
        }
        assert_eq!(avx512_rows(1024, Activation::Gelu), None);
        assert_eq!(avx512_rows(1000, Activation::Relu), None);
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
