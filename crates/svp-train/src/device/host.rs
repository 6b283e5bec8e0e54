//! The reference backend: the CPU engine's functions over host vectors.

use super::{AdamScalars, Backend, CudaError};
use std::cell::RefCell;
use svp_nn::{Activation, layer_norm, softmax_cross_entropy};
use svp_tensor::{gemm, reduce, view, view_mut};

/// [`Backend`] on the host, through the CPU engine's own kernels: what
/// every device backend is checked against, and what checks
/// [`super::DeviceTrainer`] on machines without a GPU.
#[derive(Debug, Default)]
pub struct HostBackend {
    /// The LayerNorm backward's per-chunk sums (grown on first use).
    norm_scratch: RefCell<Vec<f32>>,
    /// Labels as the cross-entropy takes them (grown on first use).
    labels: RefCell<Vec<u32>>,
}

impl HostBackend {
    /// A host backend.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Checks that a buffer of `len` holds `rows x cols`, as the GPU's do.
fn check(what: &str, len: usize, rows: usize, cols: usize) -> Result<usize, CudaError> {
    match rows.checked_mul(cols) {
        Some(n) if n <= len => Ok(n),
        Some(n) => Err(CudaError::Shape(format!("{what}: {rows} x {cols} needs {n} elements, the buffer has {len}"))),
        None => Err(CudaError::Shape(format!("{what}: {rows} x {cols} is too large for one buffer"))),
    }
}

fn activation(relu: bool) -> Activation {
    if relu { Activation::Relu } else { Activation::Identity }
}

const FA_EPS: f32 = svp_nn::loss::FA_EPS;

impl Backend for HostBackend {
    type Buffer = Vec<f32>;

    fn zeros(&self, len: usize) -> Result<Vec<f32>, CudaError> {
        Ok(vec![0.0; len])
    }

    fn write(&self, dst: &mut Vec<f32>, values: &[f32]) -> Result<(), CudaError> {
        let n = check("write", dst.len(), 1, values.len())?;
        dst[..n].copy_from_slice(values);
        Ok(())
    }

    fn read(&self, src: &Vec<f32>, out: &mut [f32]) -> Result<(), CudaError> {
        let n = check("read", src.len(), 1, out.len())?;
        out.copy_from_slice(&src[..n]);
        Ok(())
    }

    fn copy(&self, src: &Vec<f32>, dst: &mut Vec<f32>, n: usize) -> Result<(), CudaError> {
        check("copy source", src.len(), 1, n)?;
        check("copy destination", dst.len(), 1, n)?;
        dst[..n].copy_from_slice(&src[..n]);
        Ok(())
    }

    fn gemm(
        &self,
        transpose_a: bool,
        transpose_b: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &Vec<f32>,
        b: &Vec<f32>,
        beta: f32,
        c: &mut Vec<f32>,
    ) -> Result<(), CudaError> {
        check("gemm A", a.len(), m, k)?;
        check("gemm B", b.len(), k, n)?;
        check("gemm C", c.len(), m, n)?;
        let a = if transpose_a { view(a, k, m).reversed_axes() } else { view(a, m, k) };
        let b = if transpose_b { view(b, n, k).reversed_axes() } else { view(b, k, n) };
        gemm(alpha, a, b, beta, view_mut(c, m, n));
        Ok(())
    }

    fn linear(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        bias: &Vec<f32>,
        out: &mut Vec<f32>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
        relu: bool,
    ) -> Result<(), CudaError> {
        check("linear x", x.len(), rows, in_dim)?;
        check("linear w", w.len(), out_dim, in_dim)?;
        check("linear bias", bias.len(), 1, out_dim)?;
        let n = check("linear out", out.len(), rows, out_dim)?;
        if n == 0 {
            return Ok(());
        }
        // As the CPU's dense block: the bias first, the product added to it.
        for row in out[..n].chunks_exact_mut(out_dim) {
            row.copy_from_slice(&bias[..out_dim]);
        }
        let w = view(w, out_dim, in_dim);
        gemm(1.0, view(x, rows, in_dim), w.t(), 1.0, view_mut(out, rows, out_dim));
        if relu {
            out[..n].iter_mut().for_each(|v| *v = v.max(0.0));
        }
        Ok(())
    }

    fn relu_backward(&self, grad: &mut Vec<f32>, output: &Vec<f32>, n: usize) -> Result<(), CudaError> {
        check("relu_backward grad", grad.len(), 1, n)?;
        check("relu_backward output", output.len(), 1, n)?;
        for (g, &o) in grad[..n].iter_mut().zip(output) {
            *g = if o > 0.0 { *g } else { 0.0 };
        }
        Ok(())
    }

    fn column_sums(&self, x: &Vec<f32>, rows: usize, cols: usize, sums: &mut Vec<f32>) -> Result<(), CudaError> {
        let n = check("column_sums x", x.len(), rows, cols)?;
        check("column_sums sums", sums.len(), 1, cols)?;
        reduce::column_sums(&x[..n], &mut sums[..cols]);
        Ok(())
    }

    fn layer_norm_forward(
        &self,
        z: &mut Vec<f32>,
        bias: &Vec<f32>,
        gamma: &Vec<f32>,
        beta: &Vec<f32>,
        rstd: &mut Vec<f32>,
        out: &mut Vec<f32>,
        rows: usize,
        d: usize,
        relu: bool,
    ) -> Result<(), CudaError> {
        let n = check("layer_norm_forward z", z.len(), rows, d)?;
        check("layer_norm_forward out", out.len(), rows, d)?;
        check("layer_norm_forward rstd", rstd.len(), rows, 1)?;
        for (what, p) in [("bias", bias), ("gamma", gamma), ("beta", beta)] {
            check(what, p.len(), 1, d)?;
        }
        let (bias, gamma, beta) = (&bias[..d], &gamma[..d], &beta[..d]);
        layer_norm::forward(&mut z[..n], Some(bias), gamma, beta, activation(relu), &mut rstd[..rows], &mut out[..n]);
        Ok(())
    }

    fn layer_norm_backward(
        &self,
        xhat: &Vec<f32>,
        rstd: &Vec<f32>,
        gamma: &Vec<f32>,
        beta: &Vec<f32>,
        dy: &mut Vec<f32>,
        dgamma: &mut Vec<f32>,
        dbeta: &mut Vec<f32>,
        dbias: &mut Vec<f32>,
        rows: usize,
        d: usize,
        relu: bool,
    ) -> Result<(), CudaError> {
        let n = check("layer_norm_backward xhat", xhat.len(), rows, d)?;
        check("layer_norm_backward dy", dy.len(), rows, d)?;
        check("layer_norm_backward rstd", rstd.len(), rows, 1)?;
        for (what, len) in [("gamma", gamma.len()), ("beta", beta.len()), ("dgamma", dgamma.len())] {
            check(what, len, 1, d)?;
        }
        check("dbeta", dbeta.len(), 1, d)?;
        check("dbias", dbias.len(), 1, d)?;
        let mut scratch = self.norm_scratch.borrow_mut();
        let need = layer_norm::backward_scratch_len(rows, d);
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        layer_norm::backward(
            &xhat[..n],
            &rstd[..rows],
            &gamma[..d],
            &beta[..d],
            activation(relu),
            &mut dy[..n],
            &mut dgamma[..d],
            &mut dbeta[..d],
            Some(&mut dbias[..d]),
            &mut scratch,
        );
        Ok(())
    }

    fn softmax_xent(
        &self,
        logits: &Vec<f32>,
        labels: &Vec<f32>,
        grad: &mut Vec<f32>,
        stats: &mut Vec<f32>,
        slot: usize,
        rows: usize,
        classes: usize,
    ) -> Result<(), CudaError> {
        let n = check("softmax_xent logits", logits.len(), rows, classes)?;
        check("softmax_xent grad", grad.len(), rows, classes)?;
        check("softmax_xent labels", labels.len(), rows, 1)?;
        check("softmax_xent stats", stats.len(), 1, slot + 2)?;
        let mut ints = self.labels.borrow_mut();
        ints.clear();
        ints.extend(labels[..rows].iter().map(|&y| y as u32));
        let (loss, correct) = softmax_cross_entropy(view(&logits[..n], rows, classes), &ints, &mut grad[..n]);
        stats[slot] = loss;
        stats[slot + 1] = correct as f32;
        Ok(())
    }

    fn fa_normalize(
        &self,
        v: &Vec<f32>,
        normed: &mut Vec<f32>,
        norms: &mut Vec<f32>,
        rows: usize,
        d: usize,
        center: bool,
    ) -> Result<(), CudaError> {
        let n = check("fa_normalize v", v.len(), rows, d)?;
        check("fa_normalize normed", normed.len(), rows, d)?;
        check("fa_normalize norms", norms.len(), rows, 1)?;
        let d = d.max(1);
        for ((row, out), norm) in v[..n].chunks_exact(d).zip(normed.chunks_exact_mut(d)).zip(norms.iter_mut()) {
            out.copy_from_slice(row);
            if center {
                let mean = reduce::sum(out) / d as f32;
                out.iter_mut().for_each(|x| *x -= mean);
            }
            *norm = reduce::dot(out, out).sqrt();
            let inv = 1.0 / (*norm + FA_EPS);
            out.iter_mut().for_each(|x| *x *= inv);
        }
        Ok(())
    }

    fn fa_difference(
        &self,
        sim: &Vec<f32>,
        target: &mut Vec<f32>,
        stats: &mut Vec<f32>,
        slot: usize,
        b: usize,
    ) -> Result<(), CudaError> {
        let n = check("fa_difference sim", sim.len(), b, b)?;
        check("fa_difference target", target.len(), b, b)?;
        check("fa_difference stats", stats.len(), 1, slot + 1)?;
        let mut sq = 0.0f64;
        for (t, &s) in target[..n].iter_mut().zip(sim) {
            *t = s - *t;
            sq += *t as f64 * *t as f64;
        }
        stats[slot] = (sq * (1.0 / n.max(1) as f32) as f64) as f32;
        Ok(())
    }

    fn fa_gradient(
        &self,
        dnormed: &mut Vec<f32>,
        normed: &Vec<f32>,
        norms: &Vec<f32>,
        dv: &mut Vec<f32>,
        rows: usize,
        d: usize,
        center: bool,
        weight: f32,
    ) -> Result<(), CudaError> {
        let n = check("fa_gradient dnormed", dnormed.len(), rows, d)?;
        check("fa_gradient normed", normed.len(), rows, d)?;
        check("fa_gradient dv", dv.len(), rows, d)?;
        check("fa_gradient norms", norms.len(), rows, 1)?;
        let d = d.max(1);
        let rows_of =
            dnormed[..n].chunks_exact_mut(d).zip(normed.chunks_exact(d)).zip(norms).zip(dv.chunks_exact_mut(d));
        for (((dn, nr), &r), out) in rows_of {
            if r > 0.0 {
                let proj = reduce::dot(nr, dn) / r;
                let inv = 1.0 / (r + FA_EPS);
                dn.iter_mut().zip(nr).for_each(|(x, &nj)| *x = *x * inv - nj * proj);
            } else {
                dn.iter_mut().for_each(|x| *x /= FA_EPS);
            }
            if center {
                let mean = reduce::sum(dn) / d as f32;
                dn.iter_mut().for_each(|x| *x -= mean);
            }
            out.iter_mut().zip(dn.iter()).for_each(|(o, &x)| *o += weight * x);
        }
        Ok(())
    }

    fn sgd(
        &self,
        params: &mut Vec<f32>,
        grad: &Vec<f32>,
        n: usize,
        lr: f32,
        weight_decay: f32,
    ) -> Result<(), CudaError> {
        check("sgd params", params.len(), 1, n)?;
        check("sgd grad", grad.len(), 1, n)?;
        for (p, &g) in params[..n].iter_mut().zip(grad) {
            *p -= lr * (g + weight_decay * *p);
        }
        Ok(())
    }

    fn adam(
        &self,
        params: &mut Vec<f32>,
        grad: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        n: usize,
        s: AdamScalars,
    ) -> Result<(), CudaError> {
        for (what, len) in [("params", params.len()), ("grad", grad.len()), ("m", m.len()), ("v", v.len())] {
            check(what, len, 1, n)?;
        }
        let step = svp_optim::AdamStep {
            beta1: s.beta1,
            beta2: s.beta2,
            eps: s.eps,
            l2: s.l2,
            decay: s.decay,
            step: s.step,
            inv_bc2_sqrt: s.inv_bc2_sqrt,
        };
        for (((p, &g), m), v) in params[..n].iter_mut().zip(grad).zip(&mut m[..n]).zip(&mut v[..n]) {
            (*m, *v) = step.element(p, g, *m, *v);
        }
        Ok(())
    }
}
