//! Vision-transformer layers: backward against central finite differences,
//! and the attention against a direct reference.

use svp_nn::vit::{BlockCache, BlockSpec, PatchEmbed, TokenReadout, TransformerBlock};
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

#[test]
fn transformer_block_gradients() {
    for (case, spec) in
        [BlockSpec { tokens: 5, dim: 8, heads: 2, mlp: 12 }, BlockSpec { tokens: 3, dim: 6, heads: 1, mlp: 4 }]
            .into_iter()
            .enumerate()
    {
        let block = TransformerBlock { spec };
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
        let probe = random(len, 92 + case as u64);
        let mut cache = BlockCache::try_new(&spec, rows).unwrap();
        let mut out = vec![0.0; len];
        block.forward(&params, &x, rows, &mut cache, &mut out);
        let mut dout = probe.clone();
        let (mut grad, mut dx) = (vec![0.0; params.len()], vec![0.0; len]);
        block.backward(&params, rows, &mut cache, &mut dout, &mut grad, Some(&mut dx));
        let loss = |p: &[f32], x: &[f32]| {
            let mut c = BlockCache::try_new(&spec, rows).unwrap();
            let mut o = vec![0.0; len];
            block.forward(p, x, rows, &mut c, &mut o);
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
        block.forward(&params, &x, rows, &mut c, &mut o);
        let mut dout = probe.clone();
        block.backward(&params, rows, &mut c, &mut dout, &mut again, None);
        assert_eq!(again, grad);
    }
}

#[test]
fn attention_rows_are_convex_combinations_of_values() {
    // With Wqkv = 0 and bqkv putting a constant into v, every attention output
    // equals that constant, so out = x + Wo c + bo + mlp(...): check via a
    // zero MLP that out - x is the same for every token.
    let spec = BlockSpec { tokens: 4, dim: 4, heads: 2, mlp: 3 };
    let block = TransformerBlock { spec };
    let mut params = vec![0.0; block.param_len()];
    block.init_params(1, 1, &mut params);
    let d = 4;
    // Layout offsets: ln1 (2d), Wqkv (3d*d), bqkv (3d), Wo (d*d), bo (d), ln2 (2d), W1, b1, W2, b2.
    let wqkv = 2 * d;
    params[wqkv..wqkv + 3 * d * d].fill(0.0);
    let bqkv = wqkv + 3 * d * d;
    for (i, b) in params[bqkv..bqkv + 3 * d].iter_mut().enumerate() {
        *b = i as f32;
    }
    let w2 = block.param_len() - d - d * 3;
    params[w2..].fill(0.0); // W2 and b2: the MLP adds nothing
    let x = random(2 * spec.tokens * d, 5);
    let mut cache = BlockCache::try_new(&spec, 2).unwrap();
    let mut out = vec![0.0; x.len()];
    block.forward(&params, &x, 2, &mut cache, &mut out);
    let delta: Vec<f32> = out.iter().zip(&x).map(|(o, x)| o - x).collect();
    for tok in delta.chunks_exact(d) {
        for (a, b) in tok.iter().zip(&delta[..d]) {
            assert!((a - b).abs() < 1e-5, "{tok:?} vs {:?}", &delta[..d]);
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
        let head = TokenHead { tokens, dim, readout };
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
