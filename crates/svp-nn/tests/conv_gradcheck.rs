//! Convolution and pooling: forward against a direct reference, backward
//! against central finite differences, over several shapes.

use svp_nn::conv::{BnActivation, Chw, Conv2d, Pool2d, PoolKind};
use svp_rng::{Purpose, Stream, StreamKey};

fn random(len: usize, salt: u64) -> Vec<f32> {
    let mut s = Stream::new(StreamKey::new(salt, Purpose::WeightInit, 77, 0, 0));
    (0..len).map(|_| s.gaussian() as f32).collect()
}

fn weighted(out: &[f32], probe: &[f32]) -> f64 {
    out.iter().zip(probe).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// [`check`] for losses with ReLU kinks: `numeric(i, eps)` at two step sizes;
/// where they disagree the loss is not smooth within the step (a pre-activation
/// crossed zero) and the entry is skipped. At most 5 % may be skipped.
/// Differences of f32 losses carry rounding noise of about 1e-6 / eps in the
/// estimate (measured: 1.0e-3 and 1.3e-3 off on two entries at eps = 1e-3,
/// 2.9e-3 at 2.5e-4), so the step is 2e-3, the largest that leaves few
/// kinks (at 4e-3, 13 of a block's 63 parameters were skipped), and
/// gradients far below 1 (a conv bias under BatchNorm: exactly 0) are
/// compared against an absolute floor of 0.05.
fn check_kinked(what: &str, analytic: &[f32], mut numeric: impl FnMut(usize, f32) -> f64) {
    let eps = 2e-3;
    let mut skipped = 0;
    for (i, &a) in analytic.iter().enumerate() {
        let (n, half) = (numeric(i, eps), numeric(i, eps / 2.0));
        if (n - half).abs() > 1e-2 * (n.abs() + half.abs()) + 1e-3 {
            skipped += 1;
            continue;
        }
        let err = (a as f64 - n).abs() / (a.abs() as f64 + n.abs()).max(5e-2);
        assert!(err < 2e-2, "{what}[{i}]: analytic {a} vs numeric {n}");
    }
    assert!(skipped * 20 <= analytic.len(), "{what}: {skipped} of {} entries not smooth", analytic.len());
}

fn check(what: &str, analytic: &[f32], mut numeric: impl FnMut(usize) -> f64) {
    for (i, &a) in analytic.iter().enumerate() {
        let n = numeric(i);
        let err = (a as f64 - n).abs() / (a.abs() as f64 + n.abs()).max(1e-2);
        assert!(err < 2e-2, "{what}[{i}]: analytic {a} vs numeric {n}");
    }
}

/// Direct convolution, for reference.
fn conv_reference(c: &Conv2d, p: &[f32], x: &[f32]) -> Vec<f32> {
    let (i, o) = (c.input, c.output());
    let patch = i.c * c.k * c.k;
    let mut out = vec![0.0; o.len()];
    for co in 0..o.c {
        for oy in 0..o.h {
            for ox in 0..o.w {
                let mut acc = p[c.c_out * patch + co] as f64;
                for ci in 0..i.c {
                    for ky in 0..c.k {
                        for kx in 0..c.k {
                            let y = (oy * c.stride + ky) as isize - c.padding as isize;
                            let xx = (ox * c.stride + kx) as isize - c.padding as isize;
                            if y >= 0 && xx >= 0 && (y as usize) < i.h && (xx as usize) < i.w {
                                let wv = p[co * patch + (ci * c.k + ky) * c.k + kx];
                                acc += wv as f64 * x[(ci * i.h + y as usize) * i.w + xx as usize] as f64;
                            }
                        }
                    }
                }
                out[(co * o.h + oy) * o.w + ox] = acc as f32;
            }
        }
    }
    out
}

#[test]
fn conv2d_forward_and_backward() {
    let cases = [
        Conv2d { input: Chw { c: 2, h: 5, w: 6 }, c_out: 3, k: 3, stride: 1, padding: 1 },
        Conv2d { input: Chw { c: 1, h: 7, w: 7 }, c_out: 2, k: 3, stride: 2, padding: 0 },
        Conv2d { input: Chw { c: 3, h: 4, w: 4 }, c_out: 2, k: 1, stride: 1, padding: 0 },
        // A real first layer: large enough for the GEMMs' parallel split.
        Conv2d { input: Chw { c: 1, h: 28, w: 28 }, c_out: 3, k: 3, stride: 1, padding: 1 },
        // Enough input channels for Winograd's F(4x4, 3x3), sides not a multiple of 4 (partial tiles).
        Conv2d { input: Chw { c: 8, h: 7, w: 5 }, c_out: 3, k: 3, stride: 1, padding: 1 },
    ];
    assert!(cases[4].winograd().is_some() && cases[0].winograd().is_none());
    for (n, conv) in cases.iter().enumerate() {
        let rows = 2;
        let (il, ol) = (conv.input.len(), conv.output().len());
        let params = random(conv.param_len(), 10 + n as u64);
        let x = random(rows * il, 20 + n as u64);
        let probe = random(rows * ol, 30 + n as u64);
        // NaN wherever the layer must write (its outputs, its scratch's
        // padding entries): a value it leaves behind shows.
        let mut col = vec![f32::NAN; conv.col_len()];
        let mut dcol = vec![f32::NAN; conv.col_len()];
        let mut out = vec![f32::NAN; rows * ol];
        conv.forward(&params, &x, rows, &mut out, &mut col);
        for r in 0..rows {
            let want = conv_reference(conv, &params, &x[r * il..(r + 1) * il]);
            for (a, b) in out[r * ol..(r + 1) * ol].iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "case {n}: forward {a} vs {b}");
            }
        }
        let mut grad = vec![f32::NAN; conv.param_len()];
        let mut dx = vec![f32::NAN; rows * il];
        conv.backward(&params, &x, rows, &probe, &mut grad, Some(&mut dx), &mut col, &mut dcol);
        let loss = |p: &[f32], x: &[f32]| {
            let (mut c, mut o) = (vec![f32::NAN; conv.col_len()], vec![f32::NAN; rows * ol]);
            conv.forward(p, x, rows, &mut o, &mut c);
            weighted(&o, &probe)
        };
        // The convolution is affine in its parameters and in its input, so
        // central differences are exact at any step; a long one keeps f32
        // rounding (Winograd's F(4x4) rounds more than im2col) far below
        // the check's tolerance.
        let eps = 0.5;
        check(&format!("conv case {n} params"), &grad, |i| {
            let (mut u, mut d) = (params.clone(), params.clone());
            u[i] += eps;
            d[i] -= eps;
            (loss(&u, &x) - loss(&d, &x)) / (2.0 * eps as f64)
        });
        check(&format!("conv case {n} input"), &dx, |i| {
            let (mut u, mut d) = (x.clone(), x.clone());
            u[i] += eps;
            d[i] -= eps;
            (loss(&params, &u) - loss(&params, &d)) / (2.0 * eps as f64)
        });
    }
}

/// At the CNN's own shapes (32 -> 64 channels at 14x14, batch 20: several
/// groups, the last short), `Conv2d::forward` through Winograd agrees with
/// the im2col path it replaced.
#[test]
fn winograd_forward_agrees_with_im2col() {
    let conv = Conv2d { input: Chw { c: 32, h: 14, w: 14 }, c_out: 64, k: 3, stride: 1, padding: 1 };
    assert!(conv.winograd().is_some());
    let rows = 20;
    let params = random(conv.param_len(), 40);
    let x = random(rows * conv.input.len(), 41);
    let mut col = vec![f32::NAN; conv.col_len()];
    let (mut fast, mut plain) =
        (vec![f32::NAN; rows * conv.output().len()], vec![f32::NAN; rows * conv.output().len()]);
    conv.forward(&params, &x, rows, &mut fast, &mut col);
    conv.forward_im2col(&params, &x, rows, &mut plain, &mut col);
    let scale = plain.iter().fold(1.0f32, |m, b| m.max(b.abs()));
    let worst = fast.iter().zip(&plain).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max) / scale;
    // Both round in f32, F(4x4)'s transforms in proportion to the largest
    // value of a tile's sums (measured: 5e-6 of the largest output); a
    // wrong transform is off by the values' own size.
    assert!(worst < 5e-5, "Winograd and im2col differ by {worst} of the largest output");
}

#[test]
fn pooling_forward_and_backward() {
    let input = Chw { c: 2, h: 6, w: 5 };
    let pools = [
        Pool2d::fixed(input, PoolKind::Max, 2, 2),
        Pool2d::fixed(input, PoolKind::Avg, 3, 1),
        Pool2d::adaptive(input, 4, 3),
        Pool2d::adaptive(input, 1, 1),
    ];
    let rows = 2;
    let x = random(rows * input.len(), 5);
    for (n, pool) in pools.iter().enumerate() {
        let ol = pool.output().len();
        let mut out = vec![0.0; rows * ol];
        pool.forward(&x, rows, &mut out);
        if n == 3 {
            // Global average pooling is the per-channel mean.
            let mean: f32 = x[..30].iter().sum::<f32>() / 30.0;
            assert!((out[0] - mean).abs() < 1e-5);
        }
        let probe = random(rows * ol, 40 + n as u64);
        let mut dx = vec![0.0; rows * input.len()];
        pool.backward(&x, rows, &probe, &mut dx);
        let loss = |x: &[f32]| {
            let mut o = vec![0.0; rows * ol];
            pool.forward(x, rows, &mut o);
            weighted(&o, &probe)
        };
        let eps = 1e-3;
        check(&format!("pool {n} input"), &dx, |i| {
            let (mut u, mut d) = (x.clone(), x.clone());
            u[i] += eps;
            d[i] -= eps;
            (loss(&u) - loss(&d)) / (2.0 * eps as f64)
        });
    }
    // Adaptive windows follow PyTorch: 6 rows into 4 -> [0,2), [1,3), [3,5), [4,6).
    let a = Pool2d::adaptive(Chw { c: 1, h: 6, w: 1 }, 4, 1);
    let col: Vec<f32> = (0..6).map(|v| v as f32).collect();
    let mut out = vec![0.0; 4];
    a.forward(&col, 1, &mut out);
    assert_eq!(out, vec![0.5, 1.5, 3.5, 4.5]);
}

#[test]
fn batch_norm_2d_training_inference_and_gradients() {
    batch_norm_case(BnActivation::Identity);
}

/// With the fused ReLU: the output clipped at zero, the gradient only where
/// it was positive.
#[test]
fn batch_norm_2d_with_relu() {
    batch_norm_case(BnActivation::Relu);
}

/// With the fused ReLU6: the output clipped to [0, 6], the gradient only
/// strictly inside.
#[test]
fn batch_norm_2d_with_relu6() {
    batch_norm_case(BnActivation::Relu6);
}

fn batch_norm_case(activation: BnActivation) {
    use svp_nn::conv::BatchNorm2d;
    let bn = BatchNorm2d { shape: Chw { c: 3, h: 2, w: 3 }, momentum: 0.1, activation };
    let rows = 4;
    let len = bn.shape.len();
    let mut params = random(bn.param_len(), 50);
    // gamma away from zero; for ReLU6 large enough that some outputs pass 6.
    let lift = if activation == BnActivation::Relu6 { 4.0 } else { 1.5 };
    params[..3].iter_mut().for_each(|g| *g += lift);
    let x: Vec<f32> = random(rows * len, 51).iter().map(|v| 2.0 * v + 0.7).collect();
    let probe = random(rows * len, 52);
    let mut running = vec![0.0; 6];
    bn.init_running(&mut running);
    // The input buffer becomes xhat.
    let (mut out, mut xhat, mut rstd) = (vec![0.0; rows * len], x.clone(), vec![0.0; 6]);
    bn.forward_train(&params, &mut running, &mut xhat, rows, &mut out, &mut rstd);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    match activation {
        BnActivation::Identity => assert!(out.iter().any(|&v| v < 0.0)),
        BnActivation::Relu => assert!(out.iter().all(|&v| v >= 0.0) && out.contains(&0.0)),
        BnActivation::Relu6 => assert!(out.iter().all(|&v| (0.0..=6.0).contains(&v)) && out.contains(&6.0)),
    }
    // Each channel of xhat has mean 0 and (biased) variance 1 over the batch.
    for ch in 0..3 {
        let vals: Vec<f64> =
            (0..rows).flat_map(|r| (0..6).map(move |i| r * len + ch * 6 + i)).map(|i| xhat[i] as f64).collect();
        let mean = vals.iter().sum::<f64>() / 24.0;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 24.0;
        assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3, "channel {ch}: {mean} {var}");
    }
    // Running statistics moved a tenth of the way to the batch's.
    let batch_mean: f64 =
        (0..rows).flat_map(|r| (0..6).map(move |i| r * len + i)).map(|i| x[i] as f64).sum::<f64>() / 24.0;
    assert!((running[0] as f64 - 0.1 * batch_mean).abs() < 1e-5);
    // Inference with running stats equal to the batch stats reproduces training's output.
    let mut exact = running.clone();
    for ch in 0..3 {
        let vals: Vec<f64> =
            (0..rows).flat_map(|r| (0..6).map(move |i| r * len + ch * 6 + i)).map(|i| x[i] as f64).collect();
        let mean = vals.iter().sum::<f64>() / 24.0;
        exact[ch] = mean as f32;
        exact[3 + ch] = (vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 24.0) as f32;
    }
    let mut inf = vec![0.0; rows * len];
    bn.forward_infer(&params, &exact, &x, rows, &mut inf);
    for (a, b) in inf.iter().zip(&out) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    // Gradients against finite differences of the training forward.
    let (mut grad, mut dx) = (vec![0.0; 6], vec![0.0; rows * len]);
    bn.backward(&params, &xhat, &rstd, rows, &probe, &mut grad, &mut dx);
    // In place (the output gradient becomes the input gradient): the same bits.
    let (mut grad2, mut d2) = (vec![0.0; 6], probe.clone());
    bn.backward_in_place(&params, &xhat, &rstd, rows, &mut d2, &mut grad2);
    assert_eq!(bits(&d2), bits(&dx));
    assert_eq!(bits(&grad2), bits(&grad));
    let loss = |p: &[f32], x: &[f32]| {
        let mut run = vec![0.0; 6];
        bn.init_running(&mut run);
        let (mut o, mut h, mut r) = (vec![0.0; rows * len], x.to_vec(), vec![0.0; 6]);
        bn.forward_train(p, &mut run, &mut h, rows, &mut o, &mut r);
        weighted(&o, &probe)
    };
    let by_params = |i: usize, eps: f32| {
        let (mut u, mut d) = (params.clone(), params.clone());
        u[i] += eps;
        d[i] -= eps;
        (loss(&u, &x) - loss(&d, &x)) / (2.0 * eps as f64)
    };
    let by_input = |i: usize, eps: f32| {
        let (mut u, mut d) = (x.clone(), x.clone());
        u[i] += eps;
        d[i] -= eps;
        (loss(&params, &u) - loss(&params, &d)) / (2.0 * eps as f64)
    };
    if activation != BnActivation::Identity {
        // Moving one input moves the channel's statistics, and with them
        // every output of the channel: some cross the activation's kinks.
        check_kinked(&format!("batchnorm+{activation:?} params"), &grad, by_params);
        check_kinked(&format!("batchnorm+{activation:?} input"), &dx, by_input);
    } else {
        check("batchnorm params", &grad, |i| by_params(i, 1e-3));
        check("batchnorm input", &dx, |i| by_input(i, 1e-3));
    }
}

#[test]
fn conv_block_forward_and_backward() {
    use svp_nn::{ConvBlock, ConvBlockCache, ConvBlockScratch, ConvBlockSpec, Mode};
    for (n, pool) in [false, true].into_iter().enumerate() {
        let spec = ConvBlockSpec { in_channels: 2, in_h: 4, in_w: 6, out_channels: 3, pool, readout: 2 };
        let block = ConvBlock::new(spec, 1);
        let rows = 8;
        let mut params = vec![0.0; block.param_len()];
        block.init_params(9, &mut params);
        // BatchNorm's gain and bias away from their initial 1 and 0, so the
        // ReLU cuts at different places per channel.
        let t = block.trainable_len();
        for (i, v) in params[t - 6..t].iter_mut().enumerate() {
            *v += 0.3 * (i as f32 - 2.5);
        }
        let x = random(rows * spec.input().len(), 60 + n as u64);
        let out_len = rows * block.output().len();
        let probe = random(out_len, 62 + n as u64);
        let mut cache = ConvBlockCache::try_new(&block, rows).unwrap();
        let mut scratch = ConvBlockScratch::try_new(&block, rows).unwrap();
        let mode = Mode::Train { seed: 1, step: 0 };
        let mut out = vec![0.0; out_len];
        let mut p = params.clone();
        block.forward(&mut p, &x, rows, &mut cache, &mut scratch, &mut out, mode);
        // The running statistics moved; the trained parameters did not.
        assert_eq!(p[..t], params[..t]);
        assert_ne!(p[t..], params[t..], "running statistics follow the batch");
        assert!(out.iter().all(|&v| v >= 0.0) && out.iter().any(|&v| v > 0.0));
        let (mut grad, mut dx) = (vec![0.0; t], vec![0.0; x.len()]);
        block.backward(&p, &x, rows, &cache, &mut scratch, &probe, &mut grad, Some(&mut dx));
        let loss = |params: &[f32], x: &[f32]| {
            let mut p = params.to_vec();
            let mut c = ConvBlockCache::try_new(&block, rows).unwrap();
            let mut s = ConvBlockScratch::try_new(&block, rows).unwrap();
            let mut o = vec![0.0; out_len];
            block.forward(&mut p, x, rows, &mut c, &mut s, &mut o, mode);
            weighted(&o, &probe)
        };
        check_kinked(&format!("conv block {n} params"), &grad, |i, eps| {
            let (mut u, mut d) = (params.clone(), params.clone());
            u[i] += eps;
            d[i] -= eps;
            (loss(&u, &x) - loss(&d, &x)) / (2.0 * eps as f64)
        });
        check_kinked(&format!("conv block {n} input"), &dx, |i, eps| {
            let (mut u, mut d) = (x.clone(), x.clone());
            u[i] += eps;
            d[i] -= eps;
            (loss(&params, &u) - loss(&params, &d)) / (2.0 * eps as f64)
        });
        // Inference uses the running statistics: after the one training step
        // they are not the batch's, so the output differs.
        let mut inf = vec![0.0; out_len];
        block.forward(&mut p, &x, rows, &mut cache, &mut scratch, &mut inf, Mode::Infer);
        assert_ne!(inf, out);
    }
}

/// 2x2 stride-2 max pooling (the conv blocks', with passes of its own)
/// against a naive reference, on even and odd planes with ties: the same
/// maxima, and each gradient to the first maximum of its window in row
/// order; every entry of the outputs written (they start as NaN).
#[test]
fn max_pool_2x2_matches_a_naive_reference() {
    for (c, h, w) in [(3, 6, 4), (2, 7, 7), (1, 5, 8), (4, 2, 3)] {
        let input = Chw { c, h, w };
        let pool = Pool2d::fixed(input, PoolKind::Max, 2, 2);
        let rows = 3;
        // Coarse values, so that windows hold ties.
        let x: Vec<f32> = random(rows * input.len(), 77).iter().map(|v| (v * 4.0).round()).collect();
        let (oh, ow) = (h / 2, w / 2);
        assert_eq!(pool.output(), Chw { c, h: oh, w: ow });
        let mut out = vec![f32::NAN; rows * c * oh * ow];
        pool.forward(&x, rows, &mut out);
        let dout = random(out.len(), 78);
        let mut dx = vec![f32::NAN; x.len()];
        pool.backward(&x, rows, &dout, &mut dx);
        let mut want_dx = vec![0.0; x.len()];
        for r in 0..rows {
            for ch in 0..c {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let at = |y: usize, xx: usize| ((r * c + ch) * h + y) * w + xx;
                        let window = [
                            at(2 * oy, 2 * ox),
                            at(2 * oy, 2 * ox + 1),
                            at(2 * oy + 1, 2 * ox),
                            at(2 * oy + 1, 2 * ox + 1),
                        ];
                        let first_max = window.into_iter().fold(window[0], |b, i| if x[i] > x[b] { i } else { b });
                        let o = ((r * c + ch) * oh + oy) * ow + ox;
                        assert_eq!(out[o], x[first_max], "({c},{h},{w}) output {o}");
                        want_dx[first_max] += dout[o];
                    }
                }
            }
        }
        assert_eq!(dx, want_dx, "({c},{h},{w}) input gradient");
    }
}

/// BatchNorm's per-channel sums run in blocks of channels, one block a
/// task, sized by the pool: 40 and 70 channels split 32 + 8 (one thread),
/// 14 + 14 + 12 (three), 5 a block (eight). Every split gives the same bits,
/// forward and backward, and the batch statistics match f64 sums (a block
/// reading another block's channels would not).
#[test]
fn batch_norm_sums_in_blocks_of_channels() {
    use svp_nn::conv::BatchNorm2d;
    for c in [40, 70] {
        let bn = BatchNorm2d { shape: Chw { c, h: 5, w: 3 }, momentum: 0.1, activation: BnActivation::Relu };
        let (rows, len, plane) = (6, bn.shape.len(), 15);
        let params = random(bn.param_len(), 60).iter().map(|v| v + 1.0).collect::<Vec<_>>();
        let x: Vec<f32> = random(rows * len, 61).iter().enumerate().map(|(i, v)| v + (i / plane % c) as f32).collect();
        let probe = random(rows * len, 62);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool");
            pool.install(|| {
                let mut running = vec![0.0; 2 * c];
                bn.init_running(&mut running);
                let (mut out, mut xhat, mut stats) = (vec![0.0; rows * len], x.clone(), vec![0.0; 2 * c]);
                bn.forward_train(&params, &mut running, &mut xhat, rows, &mut out, &mut stats);
                let (mut grad, mut dx) = (vec![0.0; 2 * c], vec![0.0; rows * len]);
                bn.backward(&params, &xhat, &stats[..c], rows, &probe, &mut grad, &mut dx);
                [out, stats, running, grad, dx].map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
            })
        };
        let one = run(1);
        for threads in [3, 8] {
            assert!(run(threads) == one, "{c} channels: {threads} threads changed a bit");
        }
        // stats = [1/std | mean] per channel.
        let stats: Vec<f32> = one[1].iter().map(|&b| f32::from_bits(b)).collect();
        for ch in 0..c {
            let vals: Vec<f64> = (0..rows)
                .flat_map(|r| (0..plane).map(move |i| r * len + ch * plane + i))
                .map(|i| x[i] as f64)
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            assert!((stats[c + ch] as f64 - mean).abs() < 1e-5 * mean.abs().max(1.0), "{c} channels: mean of {ch}");
            let rstd = 1.0 / (var + 1e-5).sqrt();
            assert!((stats[ch] as f64 - rstd).abs() < 1e-4 * rstd, "{c} channels: 1/std of {ch}");
        }
    }
}
