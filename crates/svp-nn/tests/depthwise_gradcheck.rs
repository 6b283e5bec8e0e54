//! Depthwise convolution and ReLU6: forward against a direct reference,
//! backward against central finite differences, over several shapes; the
//! same bits on 1 and 2 threads.

use svp_nn::conv::Chw;
use svp_nn::depthwise::{DepthwiseConv2d, relu6};
use svp_rng::{Purpose, Stream, StreamKey};

fn random(len: usize, salt: u64) -> Vec<f32> {
    let mut s = Stream::new(StreamKey::new(salt, Purpose::WeightInit, 78, 0, 0));
    (0..len).map(|_| s.gaussian() as f32).collect()
}

/// Direct depthwise convolution in f64, for reference.
fn reference(c: &DepthwiseConv2d, p: &[f32], x: &[f32]) -> Vec<f32> {
    let (i, o, kk) = (c.input, c.output(), c.k * c.k);
    let mut out = vec![0.0; o.len()];
    for ch in 0..i.c {
        for oy in 0..o.h {
            for ox in 0..o.w {
                let mut acc = p[i.c * kk + ch] as f64;
                for ky in 0..c.k {
                    for kx in 0..c.k {
                        let y = (oy * c.stride + ky) as isize - c.padding as isize;
                        let xx = (ox * c.stride + kx) as isize - c.padding as isize;
                        if y >= 0 && xx >= 0 && (y as usize) < i.h && (xx as usize) < i.w {
                            let w = p[ch * kk + ky * c.k + kx] as f64;
                            acc += w * x[(ch * i.h + y as usize) * i.w + xx as usize] as f64;
                        }
                    }
                }
                out[(ch * o.h + oy) * o.w + ox] = acc as f32;
            }
        }
    }
    out
}

fn cases() -> Vec<DepthwiseConv2d> {
    vec![
        DepthwiseConv2d { input: Chw { c: 3, h: 5, w: 6 }, k: 3, stride: 1, padding: 1 },
        DepthwiseConv2d { input: Chw { c: 2, h: 7, w: 7 }, k: 3, stride: 2, padding: 1 },
        DepthwiseConv2d { input: Chw { c: 4, h: 6, w: 5 }, k: 3, stride: 2, padding: 0 },
        DepthwiseConv2d { input: Chw { c: 1, h: 4, w: 4 }, k: 1, stride: 1, padding: 0 },
        DepthwiseConv2d { input: Chw { c: 2, h: 9, w: 8 }, k: 5, stride: 1, padding: 2 },
        DepthwiseConv2d { input: Chw { c: 2, h: 3, w: 3 }, k: 7, stride: 1, padding: 3 },
        DepthwiseConv2d { input: Chw { c: 3, h: 8, w: 8 }, k: 3, stride: 2, padding: 1 },
        // Rows longer than the kernels' 8 lanes, with and without a remainder.
        DepthwiseConv2d { input: Chw { c: 2, h: 5, w: 21 }, k: 3, stride: 1, padding: 1 },
        DepthwiseConv2d { input: Chw { c: 2, h: 4, w: 16 }, k: 3, stride: 1, padding: 1 },
        DepthwiseConv2d { input: Chw { c: 2, h: 6, w: 37 }, k: 3, stride: 2, padding: 1 },
    ]
}

#[test]
fn forward_matches_the_direct_reference() {
    for (n, c) in cases().into_iter().enumerate() {
        assert!(c.is_valid());
        let rows = 3;
        let (il, ol) = (c.input.len(), c.output().len());
        let p = random(c.param_len(), n as u64);
        let x = random(rows * il, 100 + n as u64);
        let mut out = vec![f32::NAN; rows * ol];
        c.forward(&p, &x, rows, &mut out);
        for s in 0..rows {
            let want = reference(&c, &p, &x[s * il..][..il]);
            for (j, (g, w)) in out[s * ol..][..ol].iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{c:?} sample {s} [{j}]: {g} vs {w}");
            }
        }
    }
}

#[test]
fn backward_matches_finite_differences() {
    for (n, c) in cases().into_iter().enumerate() {
        let rows = 2;
        let (il, ol) = (c.input.len(), c.output().len());
        let p = random(c.param_len(), 10 + n as u64);
        let x = random(rows * il, 200 + n as u64);
        let probe = random(rows * ol, 300 + n as u64);
        // loss = sum(probe * out), so dout = probe; the loss is linear in
        // each of p and x, and the differences are exact up to rounding.
        let loss = |p: &[f32], x: &[f32]| {
            let mut out = vec![0.0; rows * ol];
            c.forward(p, x, rows, &mut out);
            out.iter().zip(&probe).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()
        };
        let mut grad = vec![f32::NAN; c.param_len()];
        let mut dx = vec![f32::NAN; rows * il];
        c.backward(&p, &x, rows, &probe, &mut grad, Some(&mut dx));
        let eps = 0.1;
        let check = |what: &str, analytic: &[f32], numeric: &dyn Fn(usize) -> f64| {
            for (i, &a) in analytic.iter().enumerate() {
                let num = numeric(i);
                assert!((a as f64 - num).abs() <= 2e-4 * (1.0 + num.abs()), "{c:?} {what}[{i}]: {a} vs {num}");
            }
        };
        check("param", &grad, &|i| {
            let (mut hi, mut lo) = (p.clone(), p.clone());
            hi[i] += eps;
            lo[i] -= eps;
            (loss(&hi, &x) - loss(&lo, &x)) / (2.0 * eps as f64)
        });
        check("input", &dx, &|i| {
            let (mut hi, mut lo) = (x.clone(), x.clone());
            hi[i] += eps;
            lo[i] -= eps;
            (loss(&p, &hi) - loss(&p, &lo)) / (2.0 * eps as f64)
        });
    }
}

#[test]
fn the_same_bits_on_one_and_two_threads() {
    let c = DepthwiseConv2d { input: Chw { c: 32, h: 14, w: 14 }, k: 3, stride: 1, padding: 1 };
    let rows = 64;
    let (il, ol) = (c.input.len(), c.output().len());
    let p = random(c.param_len(), 1);
    let x = random(rows * il, 2);
    let dout = random(rows * ol, 3);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut out = vec![0.0; rows * ol];
            let mut grad = vec![0.0; c.param_len()];
            let mut dx = vec![0.0; rows * il];
            c.forward(&p, &x, rows, &mut out);
            c.backward(&p, &x, rows, &dout, &mut grad, Some(&mut dx));
            [out, grad, dx].map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>())
        })
    };
    assert_eq!(run(1), run(2));
}

#[test]
fn relu6_clips_to_zero_and_six() {
    let v = [-1.0, 0.0, 0.5, 5.9, 6.0, 7.5, f32::NAN];
    let want = [0.0, 0.0, 0.5, 5.9, 6.0, 6.0, 0.0];
    assert_eq!(v.map(relu6), want);
}
