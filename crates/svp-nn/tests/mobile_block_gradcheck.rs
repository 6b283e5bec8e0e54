//! MobileNetV2's inverted residual block: shapes, the residual, and its
//! backward against central finite differences of the training forward
//! (BatchNorm on batch statistics), with and without the expansion, at
//! stride 1 and 2.

use svp_nn::conv::Chw;
use svp_nn::mobile_block::{MobileBlock, MobileBlockCache, MobileBlockSpec};
use svp_rng::{Purpose, Stream, StreamKey};

fn gaussians(salt: u64) -> impl FnMut() -> f32 {
    let mut s = Stream::new(StreamKey::new(salt, Purpose::WeightInit, 79, 0, 0));
    move || s.gaussian() as f32
}

fn random(len: usize, salt: u64) -> Vec<f32> {
    let mut g = gaussians(salt);
    (0..len).map(|_| g()).collect()
}

/// Like conv_gradcheck's: entries where two step sizes disagree (a ReLU6
/// kink or a BatchNorm statistic crossed within the step) are skipped, at
/// most 5 % of them. The f32 forward through three BatchNorms leaves about
/// 1e-3 of noise in these differences, hence the absolute floor of 0.1.
fn check_kinked(what: &str, analytic: &[f32], mut numeric: impl FnMut(usize, f32) -> f64) {
    let eps = 3e-3;
    let mut skipped = 0;
    for (i, &a) in analytic.iter().enumerate() {
        let (n, half) = (numeric(i, eps), numeric(i, eps / 2.0));
        if (n - half).abs() > 1e-2 * (n.abs() + half.abs()) + 2e-3 {
            skipped += 1;
            continue;
        }
        let err = (a as f64 - n).abs() / (a.abs() as f64 + n.abs()).max(0.1);
        assert!(err < 2e-2, "{what}[{i}]: analytic {a} vs numeric {n}");
    }
    assert!(skipped * 20 <= analytic.len(), "{what}: {skipped} of {} entries not smooth", analytic.len());
}

fn case(spec: MobileBlockSpec, residual: bool, out: Chw) {
    let block = MobileBlock::new(spec);
    assert_eq!(block.residual(), residual);
    assert_eq!(block.output(), out);
    let rows = 3;
    let (il, ol) = (spec.input.len(), out.len());
    let mut params = vec![f32::NAN; block.param_len()];
    let mut running = vec![f32::NAN; block.running_len()];
    block.init(&mut gaussians(1), &mut params, &mut running);
    assert!(params.iter().chain(&running).all(|v| v.is_finite()));
    // Gammas and betas far from 1 and 0: their gradients are tested, and
    // some activations pass 6, so both of ReLU6's kinks are.
    let jitter = random(params.len(), 2);
    params.iter_mut().zip(&jitter).for_each(|(p, j)| *p += 0.8 * j);
    let x: Vec<f32> = random(rows * il, 3).iter().map(|v| 1.5 * v).collect();
    let probe = random(rows * ol, 4);

    let mut cache = MobileBlockCache::try_new(&block, rows).unwrap();
    let forward = |p: &[f32], x: &[f32], cache: &mut MobileBlockCache| {
        let mut run = running.clone();
        let mut y = vec![0.0; rows * ol];
        block.forward_train(p, &mut run, x, rows, &mut y, cache);
        y
    };
    let y = forward(&params, &x, &mut cache);
    assert!(y.iter().all(|v| v.is_finite()));
    let mut grad = vec![f32::NAN; params.len()];
    let mut dx = vec![f32::NAN; rows * il];
    block.backward(&params, &x, rows, &probe, &mut grad, &mut dx, &mut cache);

    let mut scratch = MobileBlockCache::try_new(&block, rows).unwrap();
    let mut loss = |p: &[f32], x: &[f32]| {
        forward(p, x, &mut scratch).iter().zip(&probe).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()
    };
    check_kinked(&format!("{spec:?} params"), &grad, |i, eps| {
        let (mut u, mut d) = (params.clone(), params.clone());
        u[i] += eps;
        d[i] -= eps;
        (loss(&u, &x) - loss(&d, &x)) / (2.0 * eps as f64)
    });
    check_kinked(&format!("{spec:?} input"), &dx, |i, eps| {
        let (mut u, mut d) = (x.clone(), x.clone());
        u[i] += eps;
        d[i] -= eps;
        (loss(&params, &u) - loss(&params, &d)) / (2.0 * eps as f64)
    });
}

#[test]
fn expanded_block_with_the_residual() {
    let input = Chw { c: 2, h: 5, w: 5 };
    case(MobileBlockSpec { input, out_channels: 2, expansion: 3, stride: 1 }, true, input);
}

#[test]
fn block_without_expansion_at_stride_two() {
    let spec = MobileBlockSpec { input: Chw { c: 3, h: 6, w: 6 }, out_channels: 4, expansion: 1, stride: 2 };
    case(spec, false, Chw { c: 4, h: 3, w: 3 });
}

#[test]
fn expanded_block_changing_channels() {
    let spec = MobileBlockSpec { input: Chw { c: 2, h: 4, w: 4 }, out_channels: 3, expansion: 2, stride: 1 };
    case(spec, false, Chw { c: 3, h: 4, w: 4 });
}
