//! Every backward against central finite differences.
//!
//! Each check builds a scalar loss `L = sum(out * probe)` (probe fixed random),
//! takes the analytic gradient from the layer's backward and compares it with
//! `(L(p + eps) - L(p - eps)) / 2 eps`, the loss evaluated in f64.

use svp_nn::softmax_cross_entropy;
use svp_nn::{Activation, Dense, DenseCache, DenseSpec, FaWorkspace, FeatureAlignment, Mode, Norm, Projection};
use svp_rng::{Purpose, Stream, StreamKey};
use svp_tensor::{Array2, view, view_mut};

fn random(len: usize, salt: u64, scale: f32) -> Vec<f32> {
    let mut s = Stream::new(StreamKey::new(salt, Purpose::WeightInit, 99, 0, 0));
    (0..len).map(|_| s.gaussian() as f32 * scale).collect()
}

fn weighted_sum(out: &[f32], probe: &[f32]) -> f64 {
    out.iter().zip(probe).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Compares analytic and numeric derivatives at `indices`.
fn assert_close(what: &str, analytic: &[f32], indices: &[usize], mut numeric: impl FnMut(usize) -> f64) {
    let mut worst = 0.0f64;
    for &i in indices {
        let n = numeric(i);
        let a = analytic[i] as f64;
        let err = (a - n).abs() / (a.abs() + n.abs()).max(1e-2);
        worst = worst.max(err);
        // Measured worst: 2.6e-3 (LayerNorm + ReLU parameters); a gradient
        // 1 % off is an error of 5e-3 on this half-relative measure.
        assert!(err < 5e-3, "{what}[{i}]: analytic {a:.6e} vs numeric {n:.6e} (rel {err:.3e})");
    }
    eprintln!("{what}: worst relative error {worst:.2e} over {} entries", indices.len());
}

fn dense_case(norm: Norm, activation: Activation, dropout: f32, name: &str) {
    let (rows, din, dout) = (6, 9, 7);
    let spec = DenseSpec { in_dim: din, out_dim: dout, norm, activation, dropout };
    let layer = Dense::new(spec, 3);
    let mut params = vec![0.0; layer.param_len()];
    layer.init_params(11, &mut params);
    if norm == Norm::LayerNorm {
        // Move gamma/beta off their identity values so their gradients matter.
        let n = params.len();
        for (v, r) in params[n - 2 * dout..].iter_mut().zip(random(2 * dout, 5, 0.3)) {
            *v += r;
        }
    }
    let x = random(rows * din, 1, 1.0);
    let probe = random(rows * dout, 2, 1.0);
    let mode = Mode::Train { seed: 17, step: 4 };
    let loss = |p: &[f32], x: &[f32]| {
        let mut cache = DenseCache::new(rows, dout.max(din));
        let mut out = vec![0.0; rows * dout];
        layer.forward(p, view(x, rows, din), &mut cache, &mut out, mode);
        weighted_sum(&out, &probe)
    };
    let mut cache = DenseCache::new(rows, dout.max(din));
    let mut out = vec![0.0; rows * dout];
    layer.forward(&params, view(&x, rows, din), &mut cache, &mut out, mode);
    let mut dy = probe.clone();
    let mut grad = vec![0.0; layer.param_len()];
    let mut dx = Array2::<f32>::zeros((rows, din));
    layer.backward(&params, view(&x, rows, din), &mut cache, &mut dy, &mut grad, Some(dx.view_mut()), mode);

    let all: Vec<usize> = (0..params.len()).collect();
    assert_close(&format!("{name} params"), &grad, &all, |i| {
        derivative(|h| {
            let mut p = params.clone();
            p[i] += h;
            loss(&p, &x)
        })
    });
    let all_x: Vec<usize> = (0..x.len()).collect();
    assert_close(&format!("{name} input"), dx.as_slice().unwrap(), &all_x, |i| {
        derivative(|h| {
            let mut x = x.clone();
            x[i] += h;
            loss(&params, &x)
        })
    });
}

/// `f'(0)` by the five-point stencil `(8 (f(h) - f(-h)) - (f(2h) - f(-2h))) /
/// 12h`, whose truncation error is O(h^4): so a step of 4e-3 (with the layer
/// computed in f32, the loss's rounding over the step is what limits a
/// central difference; a larger step divides it down) still leaves the
/// curvature of LayerNorm and GELU out of the comparison.
fn derivative(f: impl Fn(f32) -> f64) -> f64 {
    let h = 4e-3f32;
    (8.0 * (f(h) - f(-h)) - (f(2.0 * h) - f(-2.0 * h))) / (12.0 * h as f64)
}

#[test]
fn dense_linear() {
    dense_case(Norm::None, Activation::Identity, 0.0, "linear");
}

#[test]
fn dense_layernorm_relu() {
    dense_case(Norm::LayerNorm, Activation::Relu, 0.0, "layernorm+relu");
}

#[test]
fn dense_layernorm_gelu() {
    dense_case(Norm::LayerNorm, Activation::Gelu, 0.0, "layernorm+gelu");
}

#[test]
fn dense_gelu_with_dropout() {
    dense_case(Norm::None, Activation::Gelu, 0.3, "gelu+dropout");
}

#[test]
fn dense_layernorm_relu_dropout() {
    dense_case(Norm::LayerNorm, Activation::Relu, 0.5, "layernorm+relu+dropout");
}

#[test]
fn dropout_masks_and_rescales() {
    let spec =
        DenseSpec { in_dim: 4, out_dim: 1000, norm: Norm::None, activation: Activation::Identity, dropout: 0.25 };
    let layer = Dense::new(spec, 1);
    let mut params = vec![0.0; layer.param_len()];
    // W = 0, b = 1: every output is 1 before dropout.
    let n = params.len();
    params[n - 1000..].fill(1.0);
    let x = vec![0.5; 8 * 4];
    let mut cache = DenseCache::new(8, 1000);
    let mut out = vec![0.0; 8 * 1000];
    layer.forward(&params, view(&x, 8, 4), &mut cache, &mut out, Mode::Train { seed: 1, step: 0 });
    let zeros = out.iter().filter(|&&v| v == 0.0).count();
    assert!(out.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    let frac = zeros as f64 / out.len() as f64;
    assert!((frac - 0.25).abs() < 0.02, "dropped fraction {frac}");
    let mut out_infer = vec![0.0; 8 * 1000];
    layer.forward(&params, view(&x, 8, 4), &mut cache, &mut out_infer, Mode::Infer);
    assert!(out_infer.iter().all(|&v| v == 1.0));
}

#[test]
fn cross_entropy() {
    let (rows, classes) = (5, 4);
    let logits = random(rows * classes, 3, 2.0);
    let labels = [0u32, 3, 1, 1, 2];
    let mut grad = vec![0.0; rows * classes];
    let (loss, _) = softmax_cross_entropy(view(&logits, rows, classes), &labels, &mut grad);
    // Reference loss in f64.
    let reference = |l: &[f32]| -> f64 {
        let mut total = 0.0;
        for (r, &y) in l.chunks(classes).zip(&labels) {
            let m = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = r.iter().map(|&v| (v as f64 - m).exp()).sum();
            total += z.ln() + m - r[y as usize] as f64;
        }
        total / rows as f64
    };
    assert!((loss as f64 - reference(&logits)).abs() < 1e-5);
    let all: Vec<usize> = (0..logits.len()).collect();
    assert_close("cross-entropy", &grad, &all, |i| {
        let eps = 1e-3;
        let (mut up, mut down) = (logits.clone(), logits.clone());
        up[i] += eps;
        down[i] -= eps;
        (reference(&up) - reference(&down)) / (2.0 * eps as f64)
    });
}

fn fa_case(mean_center: bool) {
    // 6 rows: 36 similarities, so the loss's 8-lane sum has a tail of 4 off the diagonal.
    let (rows, d, d_prev) = (6, 5, 3);
    let v = random(rows * d, 8, 1.0);
    let v_prev = random(rows * d_prev, 9, 1.0);
    let fa = FeatureAlignment { mean_center };
    let mut ws = FaWorkspace::new(rows, d);
    let loss_of = |v: &[f32]| -> f64 {
        // f64 reference of ||S(v) - S(v_prev)||^2 / B^2.
        let sims = |m: &[f32], cols: usize| -> Vec<f64> {
            let normed: Vec<Vec<f64>> = m
                .chunks(cols)
                .map(|r| {
                    let mean = if mean_center { r.iter().map(|&x| x as f64).sum::<f64>() / cols as f64 } else { 0.0 };
                    let c: Vec<f64> = r.iter().map(|&x| x as f64 - mean).collect();
                    let n = c.iter().map(|x| x * x).sum::<f64>().sqrt();
                    c.iter().map(|x| x / (n + 1e-8)).collect()
                })
                .collect();
            let mut s = vec![0.0; rows * rows];
            for i in 0..rows {
                for j in 0..rows {
                    s[i * rows + j] = normed[i].iter().zip(&normed[j]).map(|(a, b)| a * b).sum();
                }
            }
            s
        };
        let (a, b) = (sims(v, d), sims(&v_prev, d_prev));
        a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>() / (rows * rows) as f64
    };
    let mut dv = vec![0.0; rows * d];
    let loss = fa.loss_and_grad(view(&v, rows, d), view(&v_prev, rows, d_prev), &mut ws, 1.0, &mut dv);
    assert!((loss as f64 - loss_of(&v)).abs() < 1e-5, "loss {loss} vs {}", loss_of(&v));
    let all: Vec<usize> = (0..v.len()).collect();
    assert_close(&format!("feature alignment (centred: {mean_center})"), &dv, &all, |i| {
        let eps = 1e-3;
        let (mut up, mut down) = (v.clone(), v.clone());
        up[i] += eps;
        down[i] -= eps;
        (loss_of(&up) - loss_of(&down)) / (2.0 * eps as f64)
    });
    // The weight scales and accumulates.
    let mut dv2 = vec![1.0; rows * d];
    fa.loss_and_grad(view(&v, rows, d), view(&v_prev, rows, d_prev), &mut ws, 0.5, &mut dv2);
    for (a, b) in dv2.iter().zip(&dv) {
        assert!((a - (1.0 + 0.5 * b)).abs() < 1e-6);
    }
}

#[test]
fn feature_alignment() {
    fa_case(false);
}

#[test]
fn feature_alignment_mean_centred() {
    fa_case(true);
}

fn projection(label_classes: Option<usize>, dropout: f32) -> Projection {
    Projection { seed: 5, layer: 2, in_dim: 37, out_dim: 11, sigma: 0.2, dropout, label_classes }
}

#[test]
fn projection_backward_is_the_transpose_and_tiles_do_not_matter() {
    for (labels, dropout) in [(None, 0.0), (None, 0.2), (Some(4), 0.1)] {
        let p = projection(labels, dropout);
        let rows = 6;
        let h = random(rows * 37, 12, 1.0);
        let y = [0u32, 1, 2, 3, 0, 1];
        let dv = random(rows * 11, 13, 1.0);
        let mut whole = vec![0.0; p.cols() * 11];
        let mut reference_v = None;
        let mut reference_dh = None;
        // Tiles of 1, 3 and all 11 rows: the forward gives the same bits (each
        // output column comes from one tile); the backward sums over tiles, so
        // only its rounding may differ.
        for tile_rows in [1, 3, 11] {
            let mut tile = vec![0.0; tile_rows * p.cols()];
            let mut v = Array2::<f32>::zeros((rows, 11));
            p.forward(view(&h, rows, 37), Some(&y), Some(9), v.view_mut(), &mut tile);
            let mut dh = Array2::<f32>::zeros((rows, 37));
            p.backward(view(&dv, rows, 11), Some(9), dh.view_mut(), &mut tile);
            // Right after a forward, the tile (when it holds all of R) is
            // reused instead of regenerated: the same bits either way.
            p.forward(view(&h, rows, 37), Some(&y), Some(9), v.view_mut(), &mut tile);
            let mut dh_after = Array2::<f32>::from_elem((rows, 37), f32::NAN);
            p.backward_after_forward(view(&dv, rows, 11), Some(9), dh_after.view_mut(), &mut tile);
            assert!(dh.iter().zip(dh_after.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "tile rows {tile_rows}");
            match (&reference_v, &reference_dh) {
                (None, None) => {
                    reference_v = Some(v);
                    reference_dh = Some(dh);
                }
                (Some(rv), Some(rd)) => {
                    assert!(rv.iter().zip(v.iter()).all(|(a, b)| a.to_bits() == b.to_bits()));
                    assert!(rd.iter().zip(dh.iter()).all(|(a, b)| (a - b).abs() <= 1e-6 * (1.0 + a.abs())));
                }
                _ => unreachable!(),
            }
        }
        // Against an explicit matrix: v = [h, onehot] R^T and dh = dv R[:, :d].
        p.fill_rows(0, 11, Some(9), &mut whole);
        let v = reference_v.unwrap();
        let dh = reference_dh.unwrap();
        for i in 0..rows {
            for k in 0..11 {
                let mut want: f64 = (0..37).map(|j| h[i * 37 + j] as f64 * whole[k * p.cols() + j] as f64).sum();
                if labels.is_some() {
                    want += whole[k * p.cols() + 37 + y[i] as usize] as f64;
                }
                assert!((v[(i, k)] as f64 - want).abs() < 1e-4);
            }
            for j in 0..37 {
                let want: f64 = (0..11).map(|k| dv[i * 11 + k] as f64 * whole[k * p.cols() + j] as f64).sum();
                assert!((dh[(i, j)] as f64 - want).abs() < 1e-4);
            }
        }
        if dropout > 0.0 {
            let dropped = whole.iter().filter(|&&x| x == 0.0).count();
            assert!(dropped > 0, "dropout {dropout} dropped nothing");
        }
    }
}

#[test]
fn projection_is_a_pure_function_of_seed_and_layer() {
    let p = projection(None, 0.0);
    let mut a = vec![0.0; 11 * 37];
    let mut b = vec![0.0; 11 * 37];
    p.fill_rows(0, 11, None, &mut a);
    p.fill_rows(0, 11, Some(123), &mut b); // no dropout: the step does not matter
    assert_eq!(a, b);
    let other_layer = Projection { layer: 3, ..p.clone() };
    other_layer.fill_rows(0, 11, None, &mut b);
    assert_ne!(a, b);
    // Entries have the configured scale.
    let mut big = vec![0.0; 11 * 37];
    Projection { in_dim: 37, ..p.clone() }.fill_rows(0, 11, None, &mut big);
    let var: f64 = big.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / big.len() as f64;
    assert!((var.sqrt() - 0.2).abs() < 0.03, "std {}", var.sqrt());
    let _ = view_mut(&mut big, 11, 37);
}

/// Projection dropout keeps each entry of `R` whole, scaled by `1/(1-p)`, or
/// zeroes it, with a mask that changes with the step; without a step (or
/// without dropout) `R` is the same matrix.
#[test]
fn projection_dropout_zeroes_or_rescales_each_entry() {
    let p = 0.25;
    let proj = projection(None, p);
    let len = proj.out_dim * proj.cols();
    let (mut plain, mut step3, mut step4) = (vec![0.0; len], vec![0.0; len], vec![0.0; len]);
    proj.fill_rows(0, proj.out_dim, None, &mut plain);
    proj.fill_rows(0, proj.out_dim, Some(3), &mut step3);
    proj.fill_rows(0, proj.out_dim, Some(4), &mut step4);
    let mut none = vec![0.0; len];
    projection(None, 0.0).fill_rows(0, proj.out_dim, Some(3), &mut none);
    assert_eq!(plain, none, "no dropout: the step does not matter");
    let scale = 1.0 / (1.0 - p);
    let kept = step3.iter().zip(&plain).filter(|&(&d, &r)| d != 0.0 && d == r * scale).count();
    let dropped = step3.iter().filter(|&&d| d == 0.0).count();
    assert_eq!(kept + dropped, len, "every entry zero or R / (1 - p)");
    let frac = dropped as f64 / len as f64;
    assert!((frac - p as f64).abs() < 0.06, "dropped {frac:.3} of the entries for p = {p}");
    assert_ne!(step3, step4, "a new mask every step");
}
