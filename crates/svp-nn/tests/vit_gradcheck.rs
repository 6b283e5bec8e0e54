//! Vision-transformer layers: backward against central finite differences,
//! and the attention against a direct reference.

use svp_nn::vit::{BlockCache, BlockOutput, BlockScratch, BlockSpec, PatchEmbed, TokenReadout, TransformerBlock};
use svp_rng::{Purpose, Stream, StreamKey};

fn random(len: usize, salt: u64) -> Vec<f32> {
    let mut s = Stream::new(StreamKey::new(salt, Purpose::WeightInit, 78, 0, 0));
    (0..len).map(|_| s.gaussian() as f32).collect()
}

fn weighted(out: &[f32], probe: &[f32]) -> f64 {
    out.iter().zip(probe).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Every entry: analytic against the central difference at step `eps`.
fn check(what: &str, analytic: &[f32], eps: f32, mut loss_at: impl FnMut(usize, f32) -> f64) {
    for (i, &a) in analytic.iter().enumerate() {
        let n = (loss_at(i, eps) - loss_at(i, -eps)) / (2.0 * eps as f64);
        let err = (a as f64 - n).abs() / (a.abs() as f64 + n.abs()).max(5e-2);
        assert!(err < 2e-2, "{what}[{i}]: analytic {a} vs numeric {n}");
    }
}

/// Which gradient reaches the block, and which tokens it computes.
#[derive(Clone, Copy, PartialEq)]
enum Case {
    /// A loss over every output token.
    AllTokens,
    /// A loss over the class tokens alone (SVP+'s local loss, the
    /// classifier): the block's class-token backward.
    ClassTokenLoss,
    /// The same loss on a block that computes the class tokens alone.
    ClassTokenBlock,
}

#[test]
fn transformer_block_gradients() {
    check_block_gradients(Case::AllTokens);
}

#[test]
fn transformer_block_gradients_from_the_class_token() {
    check_block_gradients(Case::ClassTokenLoss);
}

#[test]
fn class_token_block_gradients() {
    check_block_gradients(Case::ClassTokenBlock);
}

fn check_block_gradients(case_kind: Case) {
    for (case, spec) in
        [BlockSpec { tokens: 5, dim: 8, heads: 2, mlp: 12 }, BlockSpec { tokens: 3, dim: 6, heads: 1, mlp: 4 }]
            .into_iter()
            .enumerate()
    {
        let mut block = TransformerBlock::new(spec);
        if case_kind == Case::ClassTokenBlock {
            block.output = BlockOutput::ClassToken;
        }
        let rows = 3;
        let mut params = vec![0.0; block.param_len()];
        block.init_params(4, 1, &mut params);
        // LayerNorm gains and biases away from 1 and 0.
        let noise = random(params.len(), 90 + case as u64);
        for (p, n) in params.iter_mut().zip(&noise) {
            *p += 0.1 * n;
        }
        let len = rows * block.sample_len();
        let x = random(len, 91 + case as u64);
        let mut probe = random(len, 92 + case as u64);
        if case_kind != Case::AllTokens {
            for sample in probe.chunks_exact_mut(block.sample_len()) {
                sample[spec.dim..].fill(0.0);
            }
        }
        let mut cache = BlockCache::try_new(&spec, rows).unwrap();
        let mut scratch = BlockScratch::try_new(&spec, rows).unwrap();
        let mut out = vec![0.0; len];
        block.forward(&params, &x, rows, &mut cache, &mut scratch, &mut out);
        let mut dout = probe.clone();
        let (mut grad, mut dx) = (vec![0.0; params.len()], vec![0.0; len]);
        block.backward(&params, rows, &cache, &mut scratch, &mut dout, &mut grad, Some(&mut dx));
        let loss = |p: &[f32], x: &[f32]| {
            let mut c = BlockCache::try_new(&spec, rows).unwrap();
            let mut s = BlockScratch::try_new(&spec, rows).unwrap();
            let mut o = vec![0.0; len];
            block.forward(p, x, rows, &mut c, &mut s, &mut o);
            weighted(&o, &probe)
        };
        check(&format!("block {case} params"), &grad, 1e-2, |i, e| {
            let mut p = params.clone();
            p[i] += e;
            loss(&p, &x)
        });
        check(&format!("block {case} input"), &dx, 1e-2, |i, e| {
            let mut xx = x.clone();
            xx[i] += e;
            loss(&params, &xx)
        });
        // Without dx the parameter gradient is the same.
        let mut again = vec![0.0; params.len()];
        let mut c = BlockCache::try_new(&spec, rows).unwrap();
        let mut o = vec![0.0; len];
        block.forward(&params, &x, rows, &mut c, &mut scratch, &mut o);
        let mut dout = probe.clone();
        block.backward(&params, rows, &c, &mut scratch, &mut dout, &mut again, None);
        assert_eq!(again, grad);
    }
}

/// The whole block written out naively in f64, straight from its
/// definition (pre-norm: `x1 = x + MHA(LN1(x))`, `out = x1 + MLP(LN2(x1))`,
/// each head `softmax(Q K^T / sqrt(d_h)) V` over its `d_h`-wide slice of
/// `q`, `k`, `v`, GELU exact), with the parameter layout the block documents.
fn reference_block(spec: BlockSpec, params: &[f32], x: &[f32], rows: usize) -> Vec<f64> {
    let BlockSpec { tokens: t, dim: d, heads, mlp: m } = spec;
    let dh = d / heads;
    let p: Vec<f64> = params.iter().map(|&v| v as f64).collect();
    let mut at = 0;
    let mut take = |n: usize| {
        at += n;
        p[at - n..at].to_vec()
    };
    let (ln1_g, ln1_b, wqkv, bqkv) = (take(d), take(d), take(3 * d * d), take(3 * d));
    let (wo, bo, ln2_g, ln2_b) = (take(d * d), take(d), take(d), take(d));
    let (w1, b1, w2, b2) = (take(m * d), take(m), take(d * m), take(d));
    assert_eq!(at, params.len());
    let layer_norm = |v: &[f64], g: &[f64], b: &[f64]| -> Vec<f64> {
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / v.len() as f64;
        let r = 1.0 / (var + 1e-5).sqrt();
        v.iter().zip(g.iter().zip(b)).map(|(a, (g, b))| (a - mean) * r * g + b).collect()
    };
    // y = W v + b, W stored row-major as (outputs x inputs).
    let affine = |w: &[f64], b: &[f64], v: &[f64]| -> Vec<f64> {
        b.iter().enumerate().map(|(o, bo)| bo + (0..v.len()).map(|i| w[o * v.len() + i] * v[i]).sum::<f64>()).collect()
    };
    let gelu = |z: f64| 0.5 * z * (1.0 + libm::erf(z / std::f64::consts::SQRT_2));
    let mut out = Vec::with_capacity(rows * t * d);
    for s in 0..rows {
        let tok =
            |i: usize| -> Vec<f64> { x[(s * t + i) * d..(s * t + i + 1) * d].iter().map(|&v| v as f64).collect() };
        let qkv: Vec<Vec<f64>> = (0..t).map(|i| affine(&wqkv, &bqkv, &layer_norm(&tok(i), &ln1_g, &ln1_b))).collect();
        let mut attn = vec![vec![0.0; d]; t];
        for h in 0..heads {
            let (q, k, v) = (h * dh, d + h * dh, 2 * d + h * dh);
            for i in 0..t {
                let scores: Vec<f64> = (0..t)
                    .map(|j| (0..dh).map(|c| qkv[i][q + c] * qkv[j][k + c]).sum::<f64>() / (dh as f64).sqrt())
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for j in 0..t {
                    let weight = (scores[j] - max).exp() / z;
                    for c in 0..dh {
                        attn[i][h * dh + c] += weight * qkv[j][v + c];
                    }
                }
            }
        }
        for (i, a) in attn.iter().enumerate() {
            let x1: Vec<f64> = tok(i).iter().zip(affine(&wo, &bo, a)).map(|(x, o)| x + o).collect();
            let hidden: Vec<f64> = affine(&w1, &b1, &layer_norm(&x1, &ln2_g, &ln2_b)).into_iter().map(gelu).collect();
            out.extend(x1.iter().zip(affine(&w2, &b2, &hidden)).map(|(x, o)| x + o));
        }
    }
    out
}

/// The block's forward against [`reference_block`], element by element, on
/// random weights large enough that attention is far from uniform: a wrong
/// 1/sqrt(d_h), head split, softmax axis or parameter layout is off by far
/// more than the f32 rounding allowed here.
#[test]
fn block_forward_matches_a_naive_reference() {
    for (case, spec) in [
        BlockSpec { tokens: 5, dim: 8, heads: 2, mlp: 12 },
        BlockSpec { tokens: 4, dim: 12, heads: 3, mlp: 7 },
        BlockSpec { tokens: 17, dim: 16, heads: 4, mlp: 32 },
        BlockSpec { tokens: 3, dim: 6, heads: 1, mlp: 4 },
    ]
    .into_iter()
    .enumerate()
    {
        let rows = 3;
        let mut block = TransformerBlock::new(spec);
        let params: Vec<f32> = random(block.param_len(), 40 + case as u64).iter().map(|v| 0.5 * v).collect();
        let x = random(rows * block.sample_len(), 50 + case as u64);
        let want = reference_block(spec, &params, &x, rows);
        for output in [BlockOutput::AllTokens, BlockOutput::ClassToken] {
            block.output = output;
            let mut cache = BlockCache::try_new(&spec, rows).unwrap();
            let mut scratch = BlockScratch::try_new(&spec, rows).unwrap();
            let mut out = vec![f32::NAN; x.len()];
            block.forward(&params, &x, rows, &mut cache, &mut scratch, &mut out);
            let mut worst = 0.0f64;
            for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                let class_token = i % block.sample_len() < spec.dim;
                if output == BlockOutput::ClassToken && !class_token {
                    // Not computed: left as it was.
                    assert!(got.is_nan(), "case {case}, output {i}: {got} written by a class-token block");
                    continue;
                }
                let err = (got as f64 - want).abs() / (1.0 + want.abs());
                worst = worst.max(err);
                assert!(err < 2e-5, "case {case} {output:?}, output {i}: block {got} vs reference {want}");
            }
            eprintln!("case {case} ({spec:?}, {output:?}): worst relative error {worst:.2e}");
        }
    }
}

#[test]
fn patch_embedding_gradients_and_layout() {
    let pe = PatchEmbed { channels: 1, h: 4, w: 6, patch: 2, dim: 3 };
    assert_eq!((pe.patches(), pe.tokens()), (6, 7));
    let rows = 2;
    let mut params = vec![0.0; pe.param_len()];
    pe.init_params(3, 1, &mut params);
    let x = random(rows * 24, 7);
    let out_len = rows * pe.tokens() * pe.dim;
    let probe = random(out_len, 8);
    let mut scratch = vec![0.0; pe.scratch_len(rows)];
    let mut out = vec![0.0; out_len];
    pe.forward(&params, &x, rows, &mut scratch, &mut out);
    // Token 0 is the class token plus position 0, for every sample.
    let cls = &params[pe.dim * 4 + pe.dim..][..pe.dim];
    let pos0 = &params[pe.dim * 4 + 2 * pe.dim..][..pe.dim];
    for r in 0..rows {
        for k in 0..pe.dim {
            assert_eq!(out[r * pe.tokens() * pe.dim + k], cls[k] + pos0[k]);
        }
    }
    // Patch 4 (row 1, column 1) of sample 1 reads pixels (2..4, 2..4).
    let w = &params[..pe.dim * 4];
    let b = &params[pe.dim * 4..][..pe.dim];
    let pos = &params[pe.dim * 4 + 2 * pe.dim..];
    let img = &x[24..48];
    let pixels = [img[2 * 6 + 2], img[2 * 6 + 3], img[3 * 6 + 2], img[3 * 6 + 3]];
    for k in 0..pe.dim {
        let want = b[k] + pos[5 * pe.dim + k] + (0..4).map(|j| w[k * 4 + j] * pixels[j]).sum::<f32>();
        let got = out[pe.tokens() * pe.dim + 5 * pe.dim + k];
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
    let mut grad = vec![0.0; pe.param_len()];
    pe.backward(&x, rows, &mut scratch, &probe, &mut grad);
    check("patch embedding", &grad, 1e-2, |i, e| {
        let mut p = params.clone();
        p[i] += e;
        let mut s = vec![0.0; pe.scratch_len(rows)];
        let mut o = vec![0.0; out_len];
        pe.forward(&p, &x, rows, &mut s, &mut o);
        weighted(&o, &probe)
    });
}

#[test]
fn token_readouts_and_their_adjoints() {
    let (rows, tokens, dim) = (2, 3, 4);
    let x = random(rows * tokens * dim, 11);
    let g = random(rows * dim, 12);
    for readout in [TokenReadout::Cls, TokenReadout::Mean] {
        let mut out = vec![0.0; rows * dim];
        readout.forward(&x, rows, tokens, dim, &mut out);
        let mut dx = vec![0.0; x.len()];
        readout.backward(&g, rows, tokens, dim, &mut dx);
        // Adjoint: <readout(x), g> = <x, readout^T(g)> for a linear map.
        let lhs = weighted(&out, &g);
        let rhs = weighted(&x, &dx);
        assert!((lhs - rhs).abs() < 1e-5, "{readout:?}: {lhs} vs {rhs}");
    }
}

#[test]
fn token_head_gradients() {
    use svp_nn::DenseCache;
    use svp_nn::vit::TokenHead;
    let (rows, tokens, dim) = (3, 4, 5);
    for readout in [TokenReadout::Cls, TokenReadout::Mean] {
        let head = TokenHead { tokens, dim, readout, norm_eps: svp_nn::layer_norm::LAYER_NORM_EPS };
        let mut params = random(head.param_len(), 20);
        params[..dim].iter_mut().for_each(|g| *g += 1.0);
        let x = random(rows * tokens * dim, 21);
        let probe = random(rows * dim, 22);
        let mut cache = DenseCache::new(rows, dim);
        let mut out = vec![0.0; rows * dim];
        head.forward(&params, &x, rows, &mut cache, &mut out);
        let mut dout = probe.clone();
        let (mut grad, mut dx) = (vec![0.0; params.len()], vec![0.0; x.len()]);
        head.backward(&params, rows, &mut cache, &mut dout, &mut grad, Some(&mut dx));
        let loss = |p: &[f32], x: &[f32]| {
            let mut c = DenseCache::new(rows, dim);
            let mut o = vec![0.0; rows * dim];
            head.forward(p, x, rows, &mut c, &mut o);
            weighted(&o, &probe)
        };
        check(&format!("{readout:?} head params"), &grad, 1e-2, |i, e| {
            let mut p = params.clone();
            p[i] += e;
            loss(&p, &x)
        });
        check(&format!("{readout:?} head input"), &dx, 1e-2, |i, e| {
            let mut xx = x.clone();
            xx[i] += e;
            loss(&params, &xx)
        });
    }
}
