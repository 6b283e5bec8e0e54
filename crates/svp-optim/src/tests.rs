//! Every rule against an f64 reference, bf16 moments, fused row updates.

use super::*;
use crate::rule::{CHUNK, from_bf16, to_bf16_stochastic};

/// Reference Adam/AdamW in f64, written from the PyTorch docs.
fn adam_reference(decoupled: bool, steps: usize) -> Vec<f64> {
    let (lr, b1, b2, eps, wd) = (0.01f64, 0.9f64, 0.999f64, 1e-8f64, 0.1f64);
    let mut p = vec![1.0f64, -2.0, 0.5];
    let mut m = [0.0; 3];
    let mut v = [0.0; 3];
    for t in 1..=steps {
        for i in 0..3 {
            let mut g = grad_at(p[i], i);
            if decoupled {
                p[i] *= 1.0 - lr * wd;
            } else {
                g += wd * p[i];
            }
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let mhat = m[i] / (1.0 - b1.powi(t as i32));
            let vhat = v[i] / (1.0 - b2.powi(t as i32));
            p[i] -= lr * mhat / (vhat.sqrt() + eps);
        }
    }
    p
}

/// Gradient of a fixed quadratic per coordinate.
fn grad_at(p: f64, i: usize) -> f64 {
    (i as f64 + 1.0) * (p - 0.25 * i as f64)
}

/// `steps` updates of `opt` on the quadratic. Its learning rate is
/// doubled and each step scaled by 0.5, as a schedule scales it: the
/// result must be the rate's own.
fn run(opt: Optimizer, steps: usize) -> Vec<f32> {
    let opt = match opt {
        Optimizer::Sgd { lr, momentum, weight_decay } => Optimizer::Sgd { lr: 2.0 * lr, momentum, weight_decay },
        Optimizer::Adam { lr, beta1, beta2, eps, weight_decay, state } => {
            Optimizer::Adam { lr: 2.0 * lr, beta1, beta2, eps, weight_decay, state }
        }
        Optimizer::AdamW { lr, beta1, beta2, eps, weight_decay, state } => {
            Optimizer::AdamW { lr: 2.0 * lr, beta1, beta2, eps, weight_decay, state }
        }
    };
    let mut p = vec![1.0f32, -2.0, 0.5];
    let mut state = opt.new_state(3);
    for _ in 0..steps {
        let g: Vec<f32> = p.iter().enumerate().map(|(i, &x)| grad_at(x as f64, i) as f32).collect();
        opt.update(0.5, &mut p, &g, &mut state);
    }
    p
}

#[test]
fn adam_and_adamw_match_reference() {
    let state = MomentDtype::F32;
    let adam = Optimizer::Adam { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, state };
    let adamw = Optimizer::AdamW { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, state };
    for (opt, decoupled) in [(adam, false), (adamw, true)] {
        let got = run(opt, 50);
        let want = adam_reference(decoupled, 50);
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-4, "{opt:?}: {g} vs {w}");
        }
    }
}

#[test]
fn sgd_momentum_matches_reference() {
    let (lr, mu, wd) = (0.05f64, 0.9f64, 0.01f64);
    let mut p = vec![1.0f64, -2.0, 0.5];
    let mut buf = [0.0f64; 3];
    for t in 0..30 {
        for i in 0..3 {
            let g = grad_at(p[i], i) + wd * p[i];
            buf[i] = if t == 0 { g } else { mu * buf[i] + g };
            p[i] -= lr * buf[i];
        }
    }
    let got = run(Optimizer::Sgd { lr: 0.05, momentum: 0.9, weight_decay: 0.01 }, 30);
    for (g, w) in got.iter().zip(&p) {
        assert!((*g as f64 - w).abs() < 1e-4, "{g} vs {w}");
    }
    // Without momentum, with weight decay.
    let mut q = vec![1.0f64, -2.0, 0.5];
    for _ in 0..30 {
        for (i, q) in q.iter_mut().enumerate() {
            *q -= 0.05 * (grad_at(*q, i) + 0.2 * *q);
        }
    }
    let got = run(Optimizer::Sgd { lr: 0.05, momentum: 0.0, weight_decay: 0.2 }, 30);
    for (g, w) in got.iter().zip(&q) {
        assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
    }
    let plain = run(Optimizer::Sgd { lr: 0.1, momentum: 0.0, weight_decay: 0.0 }, 100);
    for (i, x) in plain.iter().enumerate() {
        assert!((x - 0.25 * i as f32).abs() < 1e-3, "plain SGD converges to the minimum: {plain:?}");
    }
}

#[test]
fn moments_flush_instead_of_going_subnormal() {
    let opt = Optimizer::Sgd { lr: 0.1, momentum: 0.5, weight_decay: 0.0 };
    let mut p = vec![0.0f32];
    let mut state = opt.new_state(1);
    opt.update(1.0, &mut p, &[1e-30], &mut state);
    for _ in 0..200 {
        opt.update(1.0, &mut p, &[0.0], &mut state);
        let m = momentum(&state);
        assert!(m == 0.0 || m.abs() >= f32::MIN_POSITIVE);
    }
    assert_eq!(momentum(&state), 0.0);
}

fn momentum(state: &LayerState) -> f32 {
    let Moments::Momentum(m) = &state.moments else { panic!("SGD with momentum keeps a momentum buffer") };
    m[0]
}

fn adam(lr: f32, state: MomentDtype) -> Optimizer {
    Optimizer::adam(lr).with_moments(state)
}

#[test]
fn with_moments_switches_adams_storage_only() {
    let bf16 = Optimizer::adam(1e-3).with_moments(MomentDtype::Bf16);
    let want = MomentDtype::Bf16;
    assert_eq!(bf16, Optimizer::Adam { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, state: want });
    assert!(matches!(bf16.new_state(4).moments, Moments::Bf16 { .. }));
    let sgd = Optimizer::Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.0 };
    assert_eq!(sgd.with_moments(MomentDtype::Bf16), sgd);
}

/// Over all 2^16 noise values, the rounded values average to `x` exactly.
#[test]
fn stochastic_rounding_is_unbiased() {
    for x in [1.0f32 + 1.0 / 3.0, -0.123_456_7, 3.0e-20, 65_504.25, 1.0] {
        let sum: f64 = (0..1u32 << 16).map(|r| from_bf16(to_bf16_stochastic(x, r)) as f64).sum();
        assert_eq!(sum / 65_536.0, x as f64, "{x}");
    }
    assert!(from_bf16(to_bf16_stochastic(f32::NAN, 0xffff)).is_nan());
    assert_eq!(from_bf16(to_bf16_stochastic(f32::INFINITY, 0xffff)), f32::INFINITY);
    assert_eq!(from_bf16(to_bf16_stochastic(-2.5, 0xffff)), -2.5);
}

#[test]
fn adam_with_bf16_moments_follows_the_reference() {
    let got = run(adam(0.01, MomentDtype::Bf16), 50);
    let want = run(adam(0.01, MomentDtype::F32), 50);
    // Within 1 % of the distance travelled (from 1, -2, 0.5).
    for ((g, w), start) in got.iter().zip(&want).zip([1.0f32, -2.0, 0.5]) {
        assert!((g - w).abs() <= 1e-4 + 0.01 * (w - start).abs(), "{got:?} vs {want:?}");
    }
    let state = adam(0.01, MomentDtype::Bf16).new_state(1000);
    assert_eq!(state.bytes(), 4000, "two bytes per moment");
}

/// The reason for stochastic rounding: with beta2 = 0.999 one step moves
/// `v` by 0.1 %, under bf16's resolution. Rounded to nearest, `v` would
/// stay where a large first gradient put it; rounded stochastically it
/// decays with the f32 one, on average over the layer.
#[test]
fn second_moment_decays_in_bf16() {
    let n = 4096;
    let (f32_opt, bf16_opt) = (adam(1e-6, MomentDtype::F32), adam(1e-6, MomentDtype::Bf16));
    let (mut a, mut b) = (f32_opt.new_state(n), bf16_opt.new_state(n));
    let (mut pa, mut pb) = (vec![0.0f32; n], vec![0.0f32; n]);
    for t in 0..3000 {
        let g = vec![if t == 0 { 1.0 } else { 0.01 }; n];
        f32_opt.update(1.0, &mut pa, &g, &mut a);
        bf16_opt.update(1.0, &mut pb, &g, &mut b);
    }
    let second = |s: &LayerState| match &s.moments {
        Moments::F32 { v, .. } => v.iter().map(|&x| x as f64).sum::<f64>() / n as f64,
        Moments::Bf16 { v, .. } => v.iter().map(|&x| from_bf16(x) as f64).sum::<f64>() / n as f64,
        _ => unreachable!(),
    };
    let (want, got) = (second(&a), second(&b));
    // v fell from 1e-3 to ~1.5e-4; frozen, it would be 1e-3.
    assert!(want < 2e-4 && (got - want).abs() < 0.01 * want, "bf16 mean v {got}, f32 {want}");
}

/// The rounding noise depends on an element's place in the layer, not on
/// how the update is split across threads.
#[test]
fn bf16_bits_do_not_depend_on_the_thread_count() {
    let n = 3 * CHUNK + 123;
    let run = || {
        let opt = adam(1e-3, MomentDtype::Bf16);
        let mut state = opt.new_state(n);
        let mut p: Vec<f32> = (0..n).map(|i| (i % 101) as f32 * 1e-2).collect();
        for t in 0..5 {
            let g: Vec<f32> = (0..n).map(|i| ((i * (t + 3)) % 37) as f32 * 1e-3 - 0.018).collect();
            opt.update(1.0, &mut p, &g, &mut state);
        }
        (p.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), state)
    };
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(run);
    let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap().install(run);
    assert!(one == two);
}

/// `steps` updates of a layer of a `rows x cols` weight matrix and
/// `extra` more parameters, once from stored gradients and once with the
/// matrix's gradient handed from its GEMM (`weight_rows`, the product
/// split into `chunks`) and the rest stored: (parameters, state) of each.
fn stored_and_fused(
    opt: Optimizer,
    (rows, cols, extra): (usize, usize, usize),
    chunks: usize,
    steps: usize,
) -> ((Vec<f32>, LayerState), (Vec<f32>, LayerState)) {
    use svp_tensor::{Array2, GradientSink, gemm, gemm_to_sink_with_chunks, view_mut};
    let batch = 32;
    let w_len = rows * cols;
    let n = w_len + extra;
    let start: Vec<f32> = (0..n).map(|i| wave(i, 1)).collect();
    let (mut p_stored, mut p_fused) = (start.clone(), start);
    let (mut s_stored, mut s_fused) = (opt.new_state(n), opt.new_state(n));
    for step in 0..steps {
        let dz = Array2::from_shape_fn((batch, rows), |(b, r)| wave(b * rows + r, step + 2));
        let x = Array2::from_shape_fn((batch, cols), |(b, c)| wave(b * cols + c, step + 7));
        let mut grad: Vec<f32> = (0..n).map(|i| wave(i, step + 11)).collect();
        gemm(1.0, dz.t(), x.view(), 0.0, view_mut(&mut grad[..w_len], rows, cols));
        opt.update(1.0, &mut p_stored, &grad, &mut s_stored);

        let mut update = opt.begin_update(1.0, &mut s_fused);
        let (w, rest) = p_fused.split_at_mut(w_len);
        let sink = update.weight_rows(0, w, cols).expect("takes a product");
        gemm_to_sink_with_chunks(dz.t(), x.view(), sink, chunks);
        update.apply(w_len, rest, &grad[w_len..]);
    }
    ((p_stored, s_stored), (p_fused, s_fused))
}

/// A fixed pseudo-random value in about ±1.
fn wave(i: usize, salt: usize) -> f32 {
    (((i * 7919 + salt * 104_729) % 2003) as f32 - 1001.0) * 1e-3
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// A weight matrix updated from a GEMM's tiles (`weight_rows`)
/// and the rest of the layer from a stored gradient give the bits of one
/// update from the whole stored gradient, for every rule and both kinds
/// of moments, on one thread and split over several.
#[test]
fn weights_updated_from_a_product_match_a_stored_gradient() {
    let rules = [
        Optimizer::Sgd { lr: 0.05, momentum: 0.0, weight_decay: 0.01 },
        Optimizer::Sgd { lr: 0.05, momentum: 0.9, weight_decay: 0.01 },
        Optimizer::Adam { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, state: MomentDtype::F32 },
        Optimizer::AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1, state: MomentDtype::F32 },
    ];
    for opt in rules {
        for chunks in [1, 3] {
            let ((p_stored, s_stored), (p_fused, s_fused)) = stored_and_fused(opt, (70, 45, 13), chunks, 4);
            assert!(
                same_bits(&p_stored, &p_fused) && s_stored == s_fused,
                "{opt:?}, {chunks} chunks: fused update differs"
            );
        }
    }
}

/// Where `eps` matters (a gradient far below it), Adam follows the
/// reference: the denominator is `sqrt(v_hat) + eps`.
#[test]
fn adam_with_tiny_gradients_matches_the_reference() {
    let (lr, b1, b2, eps) = (0.01f64, 0.9f64, 0.999f64, 1e-8f64);
    let g = 3e-9f64;
    let (mut p, mut m, mut v) = (0.0f64, 0.0f64, 0.0f64);
    let opt = Optimizer::adam(lr as f32);
    let mut state = opt.new_state(1);
    let mut q = [0.0f32];
    for t in 1..=3 {
        m = b1 * m + (1.0 - b1) * g;
        v = b2 * v + (1.0 - b2) * g * g;
        p -= lr * (m / (1.0 - b1.powi(t))) / ((v / (1.0 - b2.powi(t))).sqrt() + eps);
        opt.update(1.0, &mut q, &[g as f32], &mut state);
        assert!((q[0] as f64 - p).abs() < 1e-4 * p.abs(), "step {t}: {} vs {p}", q[0]);
    }
}

/// What the config file's keys default to, and what a state holds.
#[test]
fn defaults_sizes_and_shapes() {
    let adam: Optimizer = serde_json::from_str(r#"{"kind": "adam", "lr": 0.001}"#).unwrap();
    assert_eq!(adam, Optimizer::adam(0.001));
    let adamw: Optimizer = serde_json::from_str(r#"{"kind": "adamw", "lr": 0.002}"#).unwrap();
    let want = Optimizer::AdamW {
        lr: 0.002,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        state: MomentDtype::F32,
    };
    assert_eq!(adamw, want);
    assert_eq!((adam.lr(), adamw.lr()), (0.001, 0.002));
    assert_eq!(Optimizer::Sgd { lr: 0.5, momentum: 0.0, weight_decay: 0.0 }.lr(), 0.5);
    let states = [
        Optimizer::Sgd { lr: 0.1, momentum: 0.0, weight_decay: 0.0 }.new_state(10),
        Optimizer::Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.0 }.new_state(10),
        Optimizer::adam(0.1).new_state(10),
        Optimizer::adam(0.1).with_moments(MomentDtype::Bf16).new_state(10),
    ];
    let bytes: Vec<usize> = states.iter().map(LayerState::bytes).collect();
    assert_eq!(bytes, [0, 40, 80, 40]);
    for (i, a) in states.iter().enumerate() {
        for (j, b) in states.iter().enumerate() {
            assert_eq!(a.moments.same_shape(&b.moments), i == j, "{i} vs {j}");
        }
    }
    let longer = Optimizer::adam(0.1).new_state(11);
    assert!(!states[2].moments.same_shape(&longer.moments));
    let longer = Optimizer::adam(0.1).with_moments(MomentDtype::Bf16).new_state(11);
    assert!(!states[3].moments.same_shape(&longer.moments));
    let longer = Optimizer::Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.0 }.new_state(11);
    assert!(!states[1].moments.same_shape(&longer.moments));
}

/// bf16 moments, updated from a GEMM's rows and the rest of a layer
/// longer than an update chunk, give the bits of one stored update, and
/// those bits are pinned: the rounding noise is part of what makes
/// training bit-exact on every machine, so a change to it must show.
#[test]
fn bf16_updates_are_the_same_bits_however_handed_over_and_pinned() {
    let opt = adam(1e-2, MomentDtype::Bf16);
    let ((p_stored, s_stored), (p_fused, s_fused)) = stored_and_fused(opt, (70, 45, CHUNK + 13), 3, 3);
    assert!(same_bits(&p_stored, &p_fused) && s_stored == s_fused);
    // The pin: the same update from gradients that need no GEMM (whose
    // bits differ between kernels with and without FMA), only IEEE-exact
    // element arithmetic.
    let n = 70 * 45 + CHUNK + 13;
    let mut p: Vec<f32> = (0..n).map(|i| wave(i, 1)).collect();
    let mut state = opt.new_state(n);
    for step in 0..3 {
        let grad: Vec<f32> = (0..n).map(|i| wave(i, step + 11)).collect();
        opt.update(1.0, &mut p, &grad, &mut state);
    }
    let Moments::Bf16 { m, v } = &state.moments else { unreachable!() };
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for word in p.iter().map(|x| x.to_bits()).chain(m.iter().chain(v).map(|&b| u32::from(b))) {
        h = (h ^ u64::from(word)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    assert_eq!(h, PINNED_BF16_HASH, "the bf16 update's bits changed");
}

/// FNV-1a over the weights and both moments after the pinned three steps.
const PINNED_BF16_HASH: u64 = 9_168_953_320_442_404_675;
