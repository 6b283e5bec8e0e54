//! MobileNetV2's inverted residual block: shapes, the parameter layout, the
//! inference forward against the layers composed by hand, and the backward
//! against central finite differences of the training forward (BatchNorm on
//! batch statistics), with and without the expansion, at stride 1 and 2.

use svp_nn::Mode;
use svp_nn::conv::{BatchNorm2d, BnActivation, Chw, Conv2d};
use svp_nn::depthwise::{DepthwiseConv2d, relu6};
use svp_nn::mobile_block::{MobileBlock, MobileBlockCache, MobileBlockScratch, MobileBlockSpec};
use svp_rng::{Purpose, Stream, StreamKey};

fn random(len: usize, salt: u64) -> Vec<f32> {
    let mut s = Stream::new(StreamKey::new(salt, Purpose::WeightInit, 79, 0, 0));
    (0..len).map(|_| s.gaussian() as f32).collect()
}

const TRAIN: Mode = Mode::Train { seed: 1, step: 0 };

/// Like conv_gradcheck's: entries where two step sizes disagree (a ReLU6
/// kink or a BatchNorm statistic crossed within the step) are skipped, at
/// most 5 % of them. The f32 forward through three BatchNorms leaves about
/// 1e-3 of noise in these differences, hence the absolute floor of 0.1.
fn check_kinked(what: &str, analytic: &[f32], numeric: &mut dyn FnMut(usize, f32) -> f64) {
    let eps = 3e-3;
    let mut skipped = 0;
    let floor = analytic.iter().fold(0.1f64, |m, a| m.max(0.05 * a.abs() as f64));
    for (i, &a) in analytic.iter().enumerate() {
        let (n, half) = (numeric(i, eps), numeric(i, eps / 2.0));
        if (n - half).abs() > 1e-2 * (n.abs() + half.abs()) + 0.03 * floor {
            skipped += 1;
            continue;
        }
        let err = (a as f64 - n).abs() / (a.abs() as f64 + n.abs()).max(floor);
        assert!(err < 2e-2, "{what}[{i}]: analytic {a} vs numeric {n}");
    }
    assert!(skipped * 20 <= analytic.len(), "{what}: {skipped} of {} entries not smooth", analytic.len());
}

/// Initialized parameters with every trained value moved (gains and shifts
/// far from 1 and 0, so their gradients are tested and some activations
/// pass 6, where ReLU6's upper kink is) and running statistics not at 0 / 1.
fn params_of(block: &MobileBlock) -> Vec<f32> {
    let mut params = vec![f32::NAN; block.param_len()];
    block.init_params(5, &mut params);
    assert!(params.iter().all(|v| v.is_finite()));
    let jitter = random(params.len(), 2);
    let t = block.trainable_len();
    params[..t].iter_mut().zip(&jitter).for_each(|(p, j)| *p += 0.8 * j);
    // Running means near 0, variances in [0.5, 1.5].
    for (i, (p, j)) in params[t..].iter_mut().zip(&jitter[t..]).enumerate() {
        *p = if is_variance(block, i) { 1.0 + 0.5 * j.tanh() } else { 0.3 * j };
    }
    params
}

/// Whether entry `i` of the running statistics is a variance: each
/// BatchNorm stores its means, then its variances.
fn is_variance(block: &MobileBlock, mut i: usize) -> bool {
    let s = block.spec();
    let hidden = s.input.c * s.expansion;
    let expand = (s.expansion != 1).then_some(hidden);
    for c in expand.into_iter().chain([hidden, s.out_channels]) {
        if i < 2 * c {
            return i >= c;
        }
        i -= 2 * c;
    }
    unreachable!("past the running statistics")
}

fn gradients(spec: MobileBlockSpec, residual: bool, out: Chw) {
    gradients_with(spec, residual, out, |_| {}, check_kinked);
}

fn gradients_smooth(spec: MobileBlockSpec, adjust: impl Fn(&mut [f32])) {
    let block = MobileBlock::new(spec, 3);
    gradients_with(spec, block.residual(), block.output(), adjust, check_smooth);
}

/// Central differences with a step of 3e-2, within 5 % (on the scale of
/// the largest entry, below which entries are compared absolutely).
fn check_smooth(what: &str, analytic: &[f32], numeric: &mut dyn FnMut(usize, f32) -> f64) {
    let floor = analytic.iter().fold(1e-3f64, |m, a| m.max(0.05 * a.abs() as f64));
    for (i, &a) in analytic.iter().enumerate() {
        let n = numeric(i, 3e-2);
        let err = (a as f64 - n).abs() / (a.abs() as f64 + n.abs()).max(floor);
        assert!(err < 5e-2, "{what}[{i}]: analytic {a} vs numeric {n}");
    }
}

fn gradients_with<C>(spec: MobileBlockSpec, residual: bool, out: Chw, adjust: impl Fn(&mut [f32]), check: C)
where
    C: Fn(&str, &[f32], &mut dyn FnMut(usize, f32) -> f64),
{
    let block = MobileBlock::new(spec, 3);
    assert_eq!(block.residual(), residual);
    assert_eq!(block.output(), out);
    let rows = 3;
    let (il, ol) = (spec.input.len(), out.len());
    let mut params = params_of(&block);
    adjust(&mut params);
    let t = block.trainable_len();
    let x: Vec<f32> = random(rows * il, 3).iter().map(|v| 1.5 * v).collect();
    let probe = random(rows * ol, 4);

    let mut cache = MobileBlockCache::try_new(&block, rows).unwrap();
    let mut scratch = MobileBlockScratch::try_new(&block, rows).unwrap();
    let forward = |p: &[f32], x: &[f32], cache: &mut MobileBlockCache, scratch: &mut MobileBlockScratch| {
        let mut p = p.to_vec();
        let mut y = vec![0.0; rows * ol];
        block.forward(&mut p, x, rows, cache, scratch, &mut y, TRAIN);
        y
    };
    let y = forward(&params, &x, &mut cache, &mut scratch);
    assert!(y.iter().all(|v| v.is_finite()));
    let mut grad = vec![f32::NAN; t];
    let mut dx = vec![f32::NAN; rows * il];
    block.backward(&params, &x, rows, &cache, &mut scratch, &probe, &mut grad, Some(&mut dx));
    // Without dx, the same parameter gradient.
    let mut again = vec![f32::NAN; t];
    forward(&params, &x, &mut cache, &mut scratch);
    block.backward(&params, &x, rows, &cache, &mut scratch, &probe, &mut again, None);
    assert_eq!(grad, again);

    let mut loss = |p: &[f32], x: &[f32]| {
        forward(p, x, &mut cache, &mut scratch).iter().zip(&probe).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()
    };
    check(&format!("{spec:?} params"), &grad, &mut |i, eps| {
        let (mut u, mut d) = (params.clone(), params.clone());
        u[i] += eps;
        d[i] -= eps;
        (loss(&u, &x) - loss(&d, &x)) / (2.0 * eps as f64)
    });
    check(&format!("{spec:?} input"), &dx, &mut |i, eps| {
        let (mut u, mut d) = (x.clone(), x.clone());
        u[i] += eps;
        d[i] -= eps;
        (loss(&params, &u) - loss(&params, &d)) / (2.0 * eps as f64)
    });
}

#[test]
fn expanded_block_with_the_residual() {
    let input = Chw { c: 2, h: 5, w: 5 };
    gradients(MobileBlockSpec { input, out_channels: 2, expansion: 3, stride: 1, readout: 2 }, true, input);
}

#[test]
fn block_without_expansion_at_stride_two() {
    let spec =
        MobileBlockSpec { input: Chw { c: 3, h: 6, w: 6 }, out_channels: 4, expansion: 1, stride: 2, readout: 2 };
    gradients(spec, false, Chw { c: 4, h: 3, w: 3 });
}

#[test]
fn expanded_block_changing_channels() {
    let spec =
        MobileBlockSpec { input: Chw { c: 2, h: 4, w: 4 }, out_channels: 3, expansion: 2, stride: 1, readout: 2 };
    gradients(spec, false, Chw { c: 3, h: 4, w: 4 });
}

/// The layout the docs give, read back by composing the layers by hand:
/// `[expand W|b, gain|shift, depthwise W|b, gain|shift, project W|b,
/// gain|shift | running mean|var x 3]`, inference on the running statistics.
#[test]
fn inference_is_the_layers_composed_in_the_documented_layout() {
    for (expansion, stride, out_c) in [(3, 1, 2), (1, 2, 4), (2, 1, 3)] {
        let input = Chw { c: 2, h: 6, w: 5 };
        let spec = MobileBlockSpec { input, out_channels: out_c, expansion, stride, readout: 2 };
        let block = MobileBlock::new(spec, 1);
        let params = params_of(&block);
        let rows = 2;
        let x = random(rows * input.len(), 9);
        let mut cache = MobileBlockCache::try_new(&block, rows).unwrap();
        let mut scratch = MobileBlockScratch::try_new(&block, rows).unwrap();
        let mut got = vec![0.0; rows * block.output().len()];
        block.infer(&params, &x, rows, &mut cache, &mut scratch, &mut got);
        // By hand.
        let hidden = Chw { c: input.c * expansion, ..input };
        let mut rest: &[f32] = &params;
        let mut take = |n: usize| take_front(&mut rest, n);
        let expand = (expansion != 1).then(|| {
            let conv = Conv2d { input, c_out: hidden.c, k: 1, stride: 1, padding: 0 };
            (conv, take(conv.param_len()), take(2 * hidden.c))
        });
        let dw = DepthwiseConv2d { input: hidden, k: 3, stride, padding: 1 };
        let (dw_p, dw_bn) = (take(dw.param_len()), take(2 * hidden.c));
        let project = Conv2d { input: dw.output(), c_out: out_c, k: 1, stride: 1, padding: 0 };
        let (pr_p, pr_bn) = (take(project.param_len()), take(2 * out_c));
        let run_e = expand.as_ref().map(|_| take(2 * hidden.c));
        let (run_d, run_p) = (take(2 * hidden.c), take(2 * out_c));
        assert!(rest.is_empty(), "{} values left over", rest.len());
        let bn = |shape| BatchNorm2d { shape, momentum: 0.1, activation: BnActivation::Identity };
        let mut col = vec![0.0; project.col_len().max(expand.as_ref().map_or(0, |e| e.0.col_len()))];
        let h: Vec<f32> = match &expand {
            Some((conv, p, gb)) => {
                let mut z = vec![0.0; rows * hidden.len()];
                conv.forward(p, &x, rows, &mut z, &mut col);
                let mut y = vec![0.0; z.len()];
                bn(hidden).forward_infer(gb, run_e.unwrap(), &z, rows, &mut y);
                y.into_iter().map(relu6).collect()
            }
            None => x.clone(),
        };
        let mut z = vec![0.0; rows * dw.output().len()];
        dw.forward(dw_p, &h, rows, &mut z);
        let mut y = vec![0.0; z.len()];
        bn(dw.output()).forward_infer(dw_bn, run_d, &z, rows, &mut y);
        let h: Vec<f32> = y.into_iter().map(relu6).collect();
        let mut z = vec![0.0; rows * project.output().len()];
        project.forward(pr_p, &h, rows, &mut z, &mut col);
        let mut want = vec![0.0; z.len()];
        bn(project.output()).forward_infer(pr_bn, run_p, &z, rows, &mut want);
        if block.residual() {
            want.iter_mut().zip(&x).for_each(|(w, v)| *w += v);
        }
        assert_eq!(got, want, "expansion {expansion}, stride {stride}");
        // Mode::Infer through forward is the same, and leaves the parameters alone.
        let mut p = params.clone();
        let mut via_forward = vec![0.0; got.len()];
        block.forward(&mut p, &x, rows, &mut cache, &mut scratch, &mut via_forward, Mode::Infer);
        assert_eq!((via_forward, p), (got, params));
    }
}

/// The first `n` values of `rest`, which moves past them.
fn take_front<'a>(rest: &mut &'a [f32], n: usize) -> &'a [f32] {
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    head
}

/// Training moves the running statistics a tenth of the way to the batch's,
/// and only those: the trained parameters are untouched.
#[test]
fn training_updates_only_the_running_statistics() {
    let spec =
        MobileBlockSpec { input: Chw { c: 2, h: 4, w: 4 }, out_channels: 2, expansion: 2, stride: 1, readout: 1 };
    let block = MobileBlock::new(spec, 1);
    let mut params = vec![0.0; block.param_len()];
    block.init_params(7, &mut params);
    let before = params.clone();
    let rows = 4;
    let x = random(rows * spec.input.len(), 11);
    let mut cache = MobileBlockCache::try_new(&block, rows).unwrap();
    let mut scratch = MobileBlockScratch::try_new(&block, rows).unwrap();
    let mut out = vec![0.0; rows * block.output().len()];
    block.forward(&mut params, &x, rows, &mut cache, &mut scratch, &mut out, TRAIN);
    let t = block.trainable_len();
    assert_eq!(params[..t], before[..t]);
    assert_ne!(params[t..], before[t..]);
    assert!(cache.bytes() > 0);
    // The readout pools the 4x4 output to 1x1.
    assert_eq!(block.readout().output(), Chw { c: 2, h: 1, w: 1 });
}

#[test]
fn expanded_block_at_stride_two() {
    let spec =
        MobileBlockSpec { input: Chw { c: 3, h: 8, w: 8 }, out_channels: 4, expansion: 2, stride: 2, readout: 2 };
    gradients(spec, false, Chw { c: 4, h: 4, w: 4 });
}

/// A network-sized block (4 x 14 x 14, as in tests/vision.rs) in the
/// smooth regime: gains 0.5 and shifts 3 keep every ReLU6 input inside
/// (0, 6), so no kink is crossed and the step can be large enough (3e-2)
/// to drown the f32 forward's rounding (at 1e-3 it moves the differences by
/// 5 %; at 3e-2 the largest entries agree with the backward to 0.2 %).
#[test]
fn network_sized_block_in_the_smooth_regime() {
    let spec =
        MobileBlockSpec { input: Chw { c: 4, h: 14, w: 14 }, out_channels: 4, expansion: 2, stride: 1, readout: 2 };
    gradients_smooth(spec, |p| {
        p[40..48].fill(0.5);
        p[48..56].fill(3.0);
        p[136..144].fill(0.5);
        p[144..152].fill(3.0);
    });
}
