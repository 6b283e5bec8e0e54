//! Vision-transformer layers over token batches: patch embedding (with class
//! token and learned positions), the pre-norm transformer block (multi-head
//! self-attention and a GELU MLP, each with a residual connection) and the
//! token readout (LayerNorm of the class token or of the token mean).
//!
//! A batch is `rows` samples of `tokens x dim` values each, row-major, so the
//! whole batch is one `(rows * tokens) x dim` matrix for the GEMMs.

use crate::conv::Chw;
use crate::layer_norm;
use crate::{Activation, Passes};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use svp_alloc::{OutOfMemory, try_zeros};
use svp_rng::{Purpose, Stream, StreamKey};
use svp_tensor::{
    ArrayView2, ArrayViewMut2, ShapeBuilder, Strided, StridedMut, gemm, gemm_bias, reduce, s, small_gemm, view,
    view_mut,
};

/// Standard deviation of the class token and position embeddings at
/// initialization (ViT's truncated-normal 0.02, untruncated here).
const TOKEN_INIT_STD: f64 = 0.02;

fn uniform_init(stream: &mut Stream, values: &mut [f32], fan_in: usize) {
    let bound = 1.0 / (fan_in as f64).sqrt();
    for v in values {
        *v = ((2.0 * stream.uniform() - 1.0) * bound) as f32;
    }
}

/// Splits an image into `patch x patch` squares, embeds each linearly, puts a
/// learned class token first and adds a learned position embedding.
/// Parameters: `[W (dim x c*p*p) | b (dim) | cls (dim) | pos (tokens x dim)]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchEmbed {
    /// Image channels.
    pub channels: usize,
    /// Image height.
    pub h: usize,
    /// Image width.
    pub w: usize,
    /// Side of a patch (divides `h` and `w`).
    pub patch: usize,
    /// Token width.
    pub dim: usize,
}

impl PatchEmbed {
    /// Input shape of one sample.
    pub fn input(&self) -> Chw {
        Chw { c: self.channels, h: self.h, w: self.w }
    }

    /// Patches per image.
    pub fn patches(&self) -> usize {
        (self.h / self.patch) * (self.w / self.patch)
    }

    /// Tokens per sample: the class token and one per patch.
    pub fn tokens(&self) -> usize {
        self.patches() + 1
    }

    fn patch_len(&self) -> usize {
        self.channels * self.patch * self.patch
    }

    /// Number of parameters.
    pub fn param_len(&self) -> usize {
        self.dim * self.patch_len() + 2 * self.dim + self.tokens() * self.dim
    }

    /// Floats of the scratch buffer for batches of `rows`: the unfolded patches.
    pub fn scratch_len(&self, rows: usize) -> usize {
        rows * self.patches() * self.patch_len()
    }

    /// W and b uniform in `±1/sqrt(fan_in)`, class token and positions
    /// `N(0, 0.02^2)`, from the stream `(seed, WeightInit, layer)`.
    pub fn init_params(&self, seed: u64, layer: u64, params: &mut [f32]) {
        let mut stream = Stream::new(StreamKey::new(seed, Purpose::WeightInit, layer, 0, 0));
        let wb = self.dim * self.patch_len() + self.dim;
        uniform_init(&mut stream, &mut params[..wb], self.patch_len());
        for v in &mut params[wb..self.param_len()] {
            *v = (stream.gaussian() * TOKEN_INIT_STD) as f32;
        }
    }

    /// Patch `n` of each sample as a row of `scratch` (`(rows * patches) x c*p*p`).
    fn unfold(&self, x: &[f32], rows: usize, scratch: &mut [f32]) {
        let (p, pl, per_row) = (self.patch, self.patch_len(), self.w / self.patch);
        let il = self.input().len();
        let n = self.patches();
        scratch[..rows * n * pl].par_chunks_mut(n * pl).zip(x[..rows * il].par_chunks(il)).for_each(|(dst, img)| {
            for (k, patch) in dst.chunks_exact_mut(pl).enumerate() {
                let (py, px) = (k / per_row, k % per_row);
                for c in 0..self.channels {
                    for dy in 0..p {
                        let src = (c * self.h + py * p + dy) * self.w + px * p;
                        patch[(c * p + dy) * p..][..p].copy_from_slice(&img[src..src + p]);
                    }
                }
            }
        });
    }

    /// Tokens of `rows` images of `x` into `out` (`rows x tokens*dim`).
    pub fn forward(&self, params: &[f32], x: &[f32], rows: usize, scratch: &mut [f32], out: &mut [f32]) {
        let (d, pl, n, t) = (self.dim, self.patch_len(), self.patches(), self.tokens());
        self.unfold(x, rows, scratch);
        let (w, rest) = params.split_at(d * pl);
        let (b, rest) = rest.split_at(d);
        let (cls, pos) = rest.split_at(d);
        for r in 0..rows {
            let sample = &mut out[r * t * d..][..t * d];
            let (first, patches) = sample.split_at_mut(d);
            for ((o, &c), &p) in first.iter_mut().zip(cls).zip(&pos[..d]) {
                *o = c + p;
            }
            for (row, pos_row) in patches.chunks_exact_mut(d).zip(pos[d..].chunks_exact(d)) {
                for ((o, &bv), &p) in row.iter_mut().zip(b).zip(pos_row) {
                    *o = bv + p;
                }
            }
            let x_r = view(&scratch[r * n * pl..], n, pl);
            gemm(1.0, x_r, view(w, d, pl).t(), 1.0, view_mut(patches, n, d));
        }
    }

    /// Parameter gradient into `grad` (overwriting) from `dout`; the patch
    /// embedding is a network's first layer, so there is no input gradient.
    /// `scratch` is refilled from `x`.
    pub fn backward(&self, x: &[f32], rows: usize, scratch: &mut [f32], dout: &[f32], grad: &mut [f32]) {
        let (d, pl, n, t) = (self.dim, self.patch_len(), self.patches(), self.tokens());
        self.unfold(x, rows, scratch);
        let (gw, rest) = grad[..self.param_len()].split_at_mut(d * pl);
        let (gb, rest) = rest.split_at_mut(d);
        let (gcls, gpos) = rest.split_at_mut(d);
        gw.fill(0.0);
        gb.fill(0.0);
        gcls.fill(0.0);
        gpos.fill(0.0);
        for r in 0..rows {
            let sample = &dout[r * t * d..][..t * d];
            for (g, row) in gpos.chunks_exact_mut(d).zip(sample.chunks_exact(d)) {
                g.iter_mut().zip(row).for_each(|(g, &v)| *g += v);
            }
            gcls.iter_mut().zip(&sample[..d]).for_each(|(g, &v)| *g += v);
            for row in sample[d..].chunks_exact(d) {
                gb.iter_mut().zip(row).for_each(|(g, &v)| *g += v);
            }
            let dy = view(&sample[d..], n, d);
            gemm(1.0, dy.t(), view(&scratch[r * n * pl..], n, pl), 1.0, view_mut(gw, d, pl));
        }
    }
}

/// Shape of a pre-norm transformer block:
/// `x1 = x + Attn(LN1(x))`, `out = x1 + W2 GELU(W1 LN2(x1))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSpec {
    /// Tokens per sample.
    pub tokens: usize,
    /// Token width.
    pub dim: usize,
    /// Attention heads (divides `dim`).
    pub heads: usize,
    /// Hidden width of the MLP.
    pub mlp: usize,
}

/// A transformer block. Parameters:
/// `[ln1 gamma, beta (dim each) | Wqkv (3dim x dim) | bqkv (3dim) | Wo (dim x dim) | bo (dim) |
///   ln2 gamma, beta | W1 (mlp x dim) | b1 (mlp) | W2 (dim x mlp) | b2 (dim)]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TransformerBlock {
    /// Shape.
    pub spec: BlockSpec,
    /// Which output tokens it computes.
    pub output: BlockOutput,
    /// The LayerNorms' variance epsilon.
    pub norm_eps: f32,
}

/// Which of a transformer block's output tokens are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockOutput {
    /// Every token: a block another block reads.
    AllTokens,
    /// Each sample's class token alone: the last block, when a class-token
    /// readout is all that reads it. The attention's query side, `Wo` and
    /// the MLP half run on the class tokens (keys and values still on all):
    /// about a quarter of the forward. The other tokens' output rows are
    /// left as they were, and the backward takes their gradient as zero.
    ClassToken,
}

impl TransformerBlock {
    /// A block of `spec` computing every output token, its LayerNorms at
    /// PyTorch's default epsilon ([`layer_norm::LAYER_NORM_EPS`]).
    pub fn new(spec: BlockSpec) -> Self {
        Self { spec, output: BlockOutput::AllTokens, norm_eps: layer_norm::LAYER_NORM_EPS }
    }
}

/// Parameter slices of a block, by role.
struct BlockParams<T> {
    ln1_g: T,
    ln1_b: T,
    wqkv: T,
    bqkv: T,
    wo: T,
    bo: T,
    ln2_g: T,
    ln2_b: T,
    w1: T,
    b1: T,
    w2: T,
    b2: T,
}

macro_rules! split_block {
    ($p:expr, $d:expr, $m:expr, $split:ident) => {{
        let (d, m) = ($d, $m);
        let (ln1_g, r) = $p.$split(d);
        let (ln1_b, r) = r.$split(d);
        let (wqkv, r) = r.$split(3 * d * d);
        let (bqkv, r) = r.$split(3 * d);
        let (wo, r) = r.$split(d * d);
        let (bo, r) = r.$split(d);
        let (ln2_g, r) = r.$split(d);
        let (ln2_b, r) = r.$split(d);
        let (w1, r) = r.$split(m * d);
        let (b1, r) = r.$split(m);
        let (w2, r) = r.$split(d * m);
        let (b2, _) = r.$split(d);
        BlockParams { ln1_g, ln1_b, wqkv, bqkv, wo, bo, ln2_g, ln2_b, w1, b1, w2, b2 }
    }};
}

/// What a block's backward needs from its forward, for batches of up to a
/// given size: kept per block between the two passes (backprop holds one
/// per block).
#[derive(Debug, Default)]
pub struct BlockCache {
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    ln1: Vec<f32>,
    qkv: Vec<f32>,
    probs: Vec<f32>,
    attn: Vec<f32>,
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
    ln2: Vec<f32>,
    pre: Vec<f32>,
    act: Vec<f32>,
}

/// Buffers a block uses only while one of its passes runs: nothing in them
/// outlives the call, so one serves every block of a network.
#[derive(Debug, Default)]
pub struct BlockScratch {
    /// Shaped like the cache's attention probabilities: their gradient.
    d_probs: Vec<f32>,
    /// One token-width and one MLP-width buffer, and one for qkv.
    d_tok: Vec<f32>,
    d_mlp: Vec<f32>,
    d_qkv: Vec<f32>,
    /// The LayerNorm backward's per-chunk column sums.
    norm_scratch: Vec<f32>,
}

impl BlockCache {
    /// A cache for blocks of `spec`'s shape and batches of up to `max_rows` samples.
    pub fn try_new(spec: &BlockSpec, max_rows: usize) -> Result<Self, OutOfMemory> {
        let n = max_rows * spec.tokens;
        let (d, m) = (spec.dim, spec.mlp);
        let z = |len: usize| try_zeros(len, "a transformer block's cache");
        Ok(Self {
            xhat1: z(n * d)?,
            rstd1: z(n)?,
            ln1: z(n * d)?,
            qkv: z(n * 3 * d)?,
            probs: z(max_rows * spec.heads * spec.tokens * spec.tokens)?,
            attn: z(n * d)?,
            xhat2: z(n * d)?,
            rstd2: z(n)?,
            ln2: z(n * d)?,
            pre: z(n * m)?,
            act: z(n * m)?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let parts = [
            &self.xhat1,
            &self.rstd1,
            &self.ln1,
            &self.qkv,
            &self.probs,
            &self.attn,
            &self.xhat2,
            &self.rstd2,
            &self.ln2,
            &self.pre,
            &self.act,
        ];
        4 * parts.iter().map(|v| v.len()).sum::<usize>()
    }
}

impl BlockScratch {
    /// Training scratch for blocks of `spec`'s shape and batches of up to `max_rows` samples.
    pub fn try_new(spec: &BlockSpec, max_rows: usize) -> Result<Self, OutOfMemory> {
        Self::try_new_for(spec, max_rows, Passes::Both)
    }

    /// Scratch for blocks of `spec`'s shape in `passes`, for batches of up
    /// to `max_rows` samples (the forward needs one token-width buffer).
    pub fn try_new_for(spec: &BlockSpec, max_rows: usize, passes: Passes) -> Result<Self, OutOfMemory> {
        let n = max_rows * spec.tokens;
        let (d, m) = (spec.dim, spec.mlp);
        let z = |len: usize| try_zeros(len, "a transformer block's scratch");
        if passes == Passes::Forward {
            return Ok(Self { d_tok: z(n * d)?, ..Self::default() });
        }
        Ok(Self {
            d_probs: z(max_rows * spec.heads * spec.tokens * spec.tokens)?,
            d_tok: z(n * d)?,
            d_mlp: z(n * m)?,
            d_qkv: z(n * 3 * d)?,
            norm_scratch: z(layer_norm::backward_scratch_len(n, d))?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let parts = [&self.d_probs, &self.d_tok, &self.d_mlp, &self.d_qkv, &self.norm_scratch];
        4 * parts.iter().map(|v| v.len()).sum::<usize>()
    }
}

/// `out = a · w^T + b`, `b` added to every row.
fn linear(a: &[f32], n: usize, k: usize, w: &[f32], b: &[f32], out: &mut [f32]) {
    let m = b.len();
    gemm_bias(view(a, n, k), view(w, m, k).t(), b, view_mut(&mut out[..n * m], n, m));
}

/// Weight and bias gradients of [`linear`] (overwriting), and, if asked, the
/// input gradient `dy · w` into `dx` (overwriting).
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    a: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    dy: &[f32],
    gw: &mut [f32],
    gb: &mut [f32],
    dx: Option<&mut [f32]>,
) {
    let m = gb.len();
    reduce::column_sums(&dy[..n * m], gb);
    let dy = view(dy, n, m);
    gemm(1.0, dy.t(), view(a, n, k), 0.0, view_mut(gw, m, k));
    if let Some(dx) = dx {
        gemm(1.0, dy, view(w, m, k), 0.0, view_mut(dx, n, k));
    }
}

impl TransformerBlock {
    /// Number of parameters.
    pub fn param_len(&self) -> usize {
        let (d, m) = (self.spec.dim, self.spec.mlp);
        4 * d + 3 * d * d + 3 * d + d * d + d + m * d + m + d * m + d
    }

    /// Values per sample.
    pub fn sample_len(&self) -> usize {
        self.spec.tokens * self.spec.dim
    }

    /// LayerNorm gains 1 and biases 0; linear maps uniform in `±1/sqrt(fan_in)`
    /// (PyTorch's default), from the stream `(seed, WeightInit, layer)`.
    pub fn init_params(&self, seed: u64, layer: u64, params: &mut [f32]) {
        let (d, m) = (self.spec.dim, self.spec.mlp);
        let mut stream = Stream::new(StreamKey::new(seed, Purpose::WeightInit, layer, 0, 0));
        let p = split_block!(params, d, m, split_at_mut);
        p.ln1_g.fill(1.0);
        p.ln1_b.fill(0.0);
        p.ln2_g.fill(1.0);
        p.ln2_b.fill(0.0);
        for (w, b, fan_in) in [(p.wqkv, p.bqkv, d), (p.wo, p.bo, d), (p.w1, p.b1, d), (p.w2, p.b2, m)] {
            uniform_init(&mut stream, w, fan_in);
            uniform_init(&mut stream, b, fan_in);
        }
    }

    /// Forward over `rows` samples of `x` into `out` (every token, or the
    /// class tokens alone, as [`TransformerBlock::output`] says), filling `cache`.
    pub fn forward(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        cache: &mut BlockCache,
        scratch: &mut BlockScratch,
        out: &mut [f32],
    ) {
        match self.output {
            BlockOutput::AllTokens => self.forward_all_tokens(params, x, rows, cache, scratch, out),
            BlockOutput::ClassToken => self.forward_class_tokens(params, x, rows, cache, scratch, out),
        }
    }

    /// [`TransformerBlock::forward`] of the class tokens alone. Fills the
    /// cache where [`TransformerBlock::backward_from_class_tokens`] reads it:
    /// LN1, keys and values at every token; queries, the attention, LN2 and
    /// the MLP at the class tokens; each head's first probability row.
    fn forward_class_tokens(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        cache: &mut BlockCache,
        scratch: &mut BlockScratch,
        out: &mut [f32],
    ) {
        let BlockSpec { tokens: t, dim: d, mlp: m, .. } = self.spec;
        let n = rows * t;
        let p = split_block!(params, d, m, split_at);
        let c = cache;
        let id = Activation::Identity;
        // Every token's keys and values: the class tokens attend to all of them.
        c.xhat1[..n * d].copy_from_slice(&x[..n * d]);
        let (xhat, rstd, ln) = (&mut c.xhat1[..n * d], &mut c.rstd1[..n], &mut c.ln1[..n * d]);
        layer_norm::forward_with_eps(self.norm_eps, xhat, None, p.ln1_g, p.ln1_b, id, rstd, ln);
        let ((wq, wkv), (bq, bkv)) = (p.wqkv.split_at(d * d), p.bqkv.split_at(d));
        let qkv = view_mut(&mut c.qkv[..n * 3 * d], n, 3 * d);
        gemm_bias(view(&c.ln1, n, d), view(wkv, 2 * d, d).t(), bkv, qkv.slice_move(s![.., d..]));
        let q = class_rows_mut(&mut c.qkv, rows, t, 3 * d).slice_move(s![.., ..d]);
        gemm_bias(class_rows(&c.ln1, rows, t, d), view(wq, d, d).t(), bq, q);
        self.class_token_attention(rows, &c.qkv, &mut c.probs, &mut c.attn);
        // x1 = x + attn Wo^T + bo at the class tokens, in `out`.
        gemm_bias(class_rows(&c.attn, rows, t, d), view(p.wo, d, d).t(), p.bo, class_rows_mut(out, rows, t, d));
        for r in 0..rows {
            let (o, x0) = (&mut out[r * t * d..][..d], &x[r * t * d..][..d]);
            o.iter_mut().zip(x0).for_each(|(o, &v)| *o += v);
            // LN2 and the GELU, row by row at the class tokens.
            let xhat = &mut c.xhat2[r * t * d..][..d];
            xhat.copy_from_slice(o);
            let (rstd, ln) = (&mut c.rstd2[r * t..][..1], &mut c.ln2[r * t * d..][..d]);
            layer_norm::forward_with_eps(self.norm_eps, xhat, None, p.ln2_g, p.ln2_b, id, rstd, ln);
        }
        gemm_bias(class_rows(&c.ln2, rows, t, d), view(p.w1, m, d).t(), p.b1, class_rows_mut(&mut c.pre, rows, t, m));
        for r in 0..rows {
            Activation::Gelu.forward(&c.pre[r * t * m..][..m], &mut c.act[r * t * m..][..m]);
        }
        // out = x1 + act W2^T + b2 at the class tokens, through d_tok (`rows` packed rows).
        let mlp_out = &mut scratch.d_tok[..rows * d];
        gemm_bias(class_rows(&c.act, rows, t, m), view(p.w2, d, m).t(), p.b2, view_mut(mlp_out, rows, d));
        for (r, y) in mlp_out.chunks_exact(d).enumerate() {
            out[r * t * d..][..d].iter_mut().zip(y).for_each(|(o, &v)| *o += v);
        }
    }

    /// [`TransformerBlock::forward`] of every token.
    fn forward_all_tokens(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        cache: &mut BlockCache,
        scratch: &mut BlockScratch,
        out: &mut [f32],
    ) {
        let BlockSpec { tokens: t, dim: d, mlp: m, .. } = self.spec;
        let n = rows * t;
        let p = split_block!(params, d, m, split_at);
        let c = cache;
        // Attention half.
        c.xhat1[..n * d].copy_from_slice(&x[..n * d]);
        let (xhat, rstd, ln) = (&mut c.xhat1[..n * d], &mut c.rstd1[..n], &mut c.ln1[..n * d]);
        layer_norm::forward_with_eps(self.norm_eps, xhat, None, p.ln1_g, p.ln1_b, Activation::Identity, rstd, ln);
        linear(&c.ln1, n, d, p.wqkv, p.bqkv, &mut c.qkv);
        self.attention(rows, &c.qkv, &mut c.probs, &mut c.attn);
        // out = x + attn Wo^T + bo (the residual stream x1, kept in `out`).
        linear(&c.attn, n, d, p.wo, p.bo, out);
        out[..n * d].iter_mut().zip(&x[..n * d]).for_each(|(o, &v)| *o += v);
        // MLP half.
        c.xhat2[..n * d].copy_from_slice(&out[..n * d]);
        let (xhat, rstd, ln) = (&mut c.xhat2[..n * d], &mut c.rstd2[..n], &mut c.ln2[..n * d]);
        layer_norm::forward_with_eps(self.norm_eps, xhat, None, p.ln2_g, p.ln2_b, Activation::Identity, rstd, ln);
        linear(&c.ln2, n, d, p.w1, p.b1, &mut c.pre);
        Activation::Gelu.forward(&c.pre[..n * m], &mut c.act[..n * m]);
        // out = x1 + act W2^T + b2, through d_tok as scratch.
        linear(&c.act, n, m, p.w2, p.b2, &mut scratch.d_tok);
        out[..n * d].iter_mut().zip(&scratch.d_tok[..n * d]).for_each(|(o, &v)| *o += v);
    }

    /// Softmax attention per sample and head: `probs` (`rows x heads x t x t`)
    /// and the heads' outputs side by side in `attn` (`rows*t x dim`).
    ///
    /// Each head's products are GEMMs over strided views of `qkv` (a head's
    /// queries, keys and values are `dh`-wide column blocks of it).
    fn attention(&self, rows: usize, qkv: &[f32], probs: &mut [f32], attn: &mut [f32]) {
        let BlockSpec { tokens: t, dim: d, heads, .. } = self.spec;
        let dh = d / heads;
        let scale = 1.0 / (dh as f32).sqrt();
        let per_sample = (qkv[..rows * t * 3 * d].par_chunks(t * 3 * d))
            .zip(probs[..rows * heads * t * t].par_chunks_mut(heads * t * t))
            .zip(attn[..rows * t * d].par_chunks_mut(t * d));
        per_sample.for_each(|((qkv, probs), attn)| {
            for (h, p) in probs.chunks_exact_mut(t * t).enumerate() {
                let head = |offset| columns(qkv, offset, t, dh, 3 * d);
                let (q, k, v) = (head(h * dh), head(d + h * dh), head(2 * d + h * dh));
                // S = Q K^T / sqrt(dh), then each row's softmax.
                small_gemm(scale, q, k.t(), 0.0, StridedMut::rows(p, t, t, t));
                p.chunks_exact_mut(t).for_each(softmax_in_place);
                small_gemm(1.0, Strided::rows(p, t, t, t), v, 0.0, columns_mut(attn, h * dh, t, dh, d));
            }
        });
    }

    /// [`TransformerBlock::attention`] of the class tokens' queries alone:
    /// each head's first row of `probs`, and the heads' outputs at the class
    /// tokens' rows of `attn`.
    fn class_token_attention(&self, rows: usize, qkv: &[f32], probs: &mut [f32], attn: &mut [f32]) {
        let BlockSpec { tokens: t, dim: d, heads, .. } = self.spec;
        let dh = d / heads;
        let scale = 1.0 / (dh as f32).sqrt();
        let per_sample = (qkv[..rows * t * 3 * d].par_chunks(t * 3 * d))
            .zip(probs[..rows * heads * t * t].par_chunks_mut(heads * t * t))
            .zip(attn[..rows * t * d].par_chunks_mut(t * d));
        per_sample.for_each(|((qkv, probs), attn)| {
            for h in 0..heads {
                let token = |j: usize, offset: usize| &qkv[j * 3 * d + offset + h * dh..][..dh];
                let (q0, p0) = (token(0, 0), &mut probs[h * t * t..][..t]);
                for (j, s) in p0.iter_mut().enumerate() {
                    *s = scale * reduce::dot(q0, token(j, d));
                }
                softmax_in_place(p0);
                let out = &mut attn[h * dh..][..dh];
                out.fill(0.0);
                for (j, &pj) in p0.iter().enumerate() {
                    out.iter_mut().zip(token(j, 2 * d)).for_each(|(o, &v)| *o += pj * v);
                }
            }
        });
    }

    /// Backward of [`TransformerBlock::attention`]: from `d_attn`, the
    /// gradient wrt `qkv` into `d_qkv` (overwriting); `d_probs` is scratch
    /// shaped like `probs`.
    fn attention_backward(
        &self,
        rows: usize,
        qkv: &[f32],
        probs: &[f32],
        d_attn: &[f32],
        d_probs: &mut [f32],
        d_qkv: &mut [f32],
    ) {
        let BlockSpec { tokens: t, dim: d, heads, .. } = self.spec;
        let dh = d / heads;
        let scale = 1.0 / (dh as f32).sqrt();
        let per_sample = (qkv[..rows * t * 3 * d].par_chunks(t * 3 * d))
            .zip(probs[..rows * heads * t * t].par_chunks(heads * t * t))
            .zip(d_attn[..rows * t * d].par_chunks(t * d))
            .zip(d_probs[..rows * heads * t * t].par_chunks_mut(heads * t * t))
            .zip(d_qkv[..rows * t * 3 * d].par_chunks_mut(t * 3 * d));
        per_sample.for_each(|((((qkv, probs), d_attn), d_probs), d_qkv)| {
            for (h, (p, ds)) in probs.chunks_exact(t * t).zip(d_probs.chunks_exact_mut(t * t)).enumerate() {
                let (qo, ko, vo) = (h * dh, d + h * dh, 2 * d + h * dh);
                let head = |offset| columns(qkv, offset, t, dh, 3 * d);
                let (q, k, v) = (head(qo), head(ko), head(vo));
                let g = columns(d_attn, h * dh, t, dh, d);
                // dP = G V^T; dV = P^T G.
                small_gemm(1.0, g, v.t(), 0.0, StridedMut::rows(ds, t, t, t));
                small_gemm(1.0, Strided::rows(p, t, t, t).t(), g, 0.0, columns_mut(d_qkv, vo, t, dh, 3 * d));
                // dS = P (dP - sum_j P dP) / sqrt(dh), in place of dP.
                for (row, ds_row) in p.chunks_exact(t).zip(ds.chunks_exact_mut(t)) {
                    let weighted: f32 = row.iter().zip(ds_row.iter()).map(|(&pj, &dp)| pj * dp).sum();
                    for (dp, &pj) in ds_row.iter_mut().zip(row.iter()) {
                        *dp = pj * (*dp - weighted) * scale;
                    }
                }
                // dQ = dS K; dK = dS^T Q.
                let ds = Strided::rows(ds, t, t, t);
                small_gemm(1.0, ds, k, 0.0, columns_mut(d_qkv, qo, t, dh, 3 * d));
                small_gemm(1.0, ds.t(), q, 0.0, columns_mut(d_qkv, ko, t, dh, 3 * d));
            }
        });
    }

    /// [`TransformerBlock::attention_backward`] when `d_attn` (`rows x dim`,
    /// packed) is the heads' output gradient at the class tokens and zero
    /// elsewhere. Only the class token's probabilities then matter: with `g`
    /// its output gradient and `p` its probabilities in a head, `dV_j = p_j g`,
    /// `dS_j = p_j (g.v_j - sum_k p_k g.v_k) / sqrt(dh)`, `dK_j = dS_j q_0`,
    /// `dQ_0 = sum_j dS_j k_j`, and the other queries' gradient is zero.
    /// Overwrites all of `d_qkv`; `d_probs` is scratch (`t` floats per head).
    fn attention_backward_from_class_tokens(
        &self,
        rows: usize,
        qkv: &[f32],
        probs: &[f32],
        d_attn: &[f32],
        d_probs: &mut [f32],
        d_qkv: &mut [f32],
    ) {
        let BlockSpec { tokens: t, dim: d, heads, .. } = self.spec;
        let dh = d / heads;
        let scale = 1.0 / (dh as f32).sqrt();
        let per_sample = (qkv[..rows * t * 3 * d].par_chunks(t * 3 * d))
            .zip(probs[..rows * heads * t * t].par_chunks(heads * t * t))
            .zip(d_attn[..rows * d].par_chunks(d))
            .zip(d_probs[..rows * heads * t * t].par_chunks_mut(heads * t * t))
            .zip(d_qkv[..rows * t * 3 * d].par_chunks_mut(t * 3 * d));
        per_sample.for_each(|((((qkv, probs), g), d_probs), d_qkv)| {
            for h in 0..heads {
                let p0 = &probs[h * t * t..][..t];
                let g = &g[h * dh..][..dh];
                let ds = &mut d_probs[h * t * t..][..t];
                let token = |j: usize, offset: usize| &qkv[j * 3 * d + offset + h * dh..][..dh];
                for (j, ds) in ds.iter_mut().enumerate() {
                    *ds = reduce::dot(g, token(j, 2 * d));
                }
                let weighted = reduce::dot(p0, ds);
                for (ds, &pj) in ds.iter_mut().zip(p0) {
                    *ds = pj * (*ds - weighted) * scale;
                }
                let q0 = token(0, 0);
                for (j, (&dsj, &pj)) in ds.iter().zip(p0).enumerate() {
                    let row = &mut d_qkv[j * 3 * d..][..3 * d];
                    row[h * dh..][..dh].fill(0.0);
                    row[d + h * dh..][..dh].iter_mut().zip(q0).for_each(|(o, &q)| *o = dsj * q);
                    row[2 * d + h * dh..][..dh].iter_mut().zip(g).for_each(|(o, &gv)| *o = pj * gv);
                }
                // The class token's query gradient, summed in place (its row's query slot is zero now).
                let dq0 = &mut d_qkv[h * dh..][..dh];
                for (j, &dsj) in ds.iter().enumerate() {
                    dq0.iter_mut().zip(token(j, d)).for_each(|(a, &kv)| *a += dsj * kv);
                }
            }
        });
    }

    /// Backward from `dout` (gradient wrt this block's output; overwritten as
    /// scratch) after the matching forward: the parameter gradient into `grad`
    /// (overwriting) and, if given, the gradient wrt `x` into `dx`.
    ///
    /// When `dout` is zero outside each sample's class token, as it is for
    /// the block a class-token readout follows (SVP+'s local loss, the
    /// classifier), everything up to the keys and values runs on the class
    /// tokens alone: about a quarter of the work. A block computing the
    /// class tokens alone ([`BlockOutput::ClassToken`]) always runs so.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &[f32],
        rows: usize,
        cache: &BlockCache,
        scratch: &mut BlockScratch,
        dout: &mut [f32],
        grad: &mut [f32],
        dx: Option<&mut [f32]>,
    ) {
        let BlockSpec { tokens: t, dim: d, .. } = self.spec;
        let class_token = self.output == BlockOutput::ClassToken;
        if rows > 0 && (class_token || zero_past_class_token(&dout[..rows * t * d], t * d, d)) {
            self.backward_from_class_tokens(params, rows, cache, scratch, dout, grad, dx);
        } else {
            self.backward_all_tokens(params, rows, cache, scratch, dout, grad, dx);
        }
    }

    /// [`TransformerBlock::backward`] for a `dout` zero outside the class
    /// tokens (read there alone). The gradient then reaches the other
    /// tokens only through the keys and values, so the MLP half, `Wo`, the
    /// attention's query side and `Wq` take the class-token rows alone
    /// (strided views, or packed `rows`-row buffers); the keys', values' and
    /// LN1's products take all.
    #[allow(clippy::too_many_arguments)]
    fn backward_from_class_tokens(
        &self,
        params: &[f32],
        rows: usize,
        cache: &BlockCache,
        scratch: &mut BlockScratch,
        dout: &mut [f32],
        grad: &mut [f32],
        dx: Option<&mut [f32]>,
    ) {
        let BlockSpec { tokens: t, dim: d, mlp: m, .. } = self.spec;
        let n = rows * t;
        let p = split_block!(params, d, m, split_at);
        let g = split_block!(&mut grad[..self.param_len()], d, m, split_at_mut);
        let (c, s) = (cache, scratch);
        let dout = &mut dout[..n * d];
        let id = Activation::Identity;
        // MLP half, at the class tokens: d_mlp and d_tok hold `rows` packed rows.
        let dy = class_rows(dout, rows, t, d);
        gemm(1.0, dy.t(), class_rows(&c.act, rows, t, m), 0.0, view_mut(g.w2, d, m));
        column_sums_of(dy, g.b2);
        let d_mlp = &mut s.d_mlp[..rows * m];
        gemm(1.0, dy, view(p.w2, d, m), 0.0, view_mut(d_mlp, rows, m));
        for (r, d_row) in d_mlp.chunks_exact_mut(m).enumerate() {
            Activation::Gelu.backward(&c.pre[r * t * m..][..m], d_row);
        }
        let d_mlp = view(d_mlp, rows, m);
        gemm(1.0, d_mlp.t(), class_rows(&c.ln2, rows, t, d), 0.0, view_mut(g.w1, m, d));
        column_sums_of(d_mlp, g.b1);
        let d_tok = &mut s.d_tok[..rows * d];
        gemm(1.0, d_mlp, view(p.w1, m, d), 0.0, view_mut(d_tok, rows, d));
        // LN2's saved rows, packed into d_qkv (free until the attention's backward).
        let (xhat, rest) = s.d_qkv.split_at_mut(rows * d);
        let rstd = &mut rest[..rows];
        for (r, (x_row, rs)) in xhat.chunks_exact_mut(d).zip(rstd.iter_mut()).enumerate() {
            x_row.copy_from_slice(&c.xhat2[r * t * d..][..d]);
            *rs = c.rstd2[r * t];
        }
        layer_norm::backward(xhat, rstd, p.ln2_g, p.ln2_b, id, d_tok, g.ln2_g, g.ln2_b, None, &mut s.norm_scratch);
        // dx1 = dout + the LN2 path: both zero away from the class tokens.
        for (r, d_row) in d_tok.chunks_exact(d).enumerate() {
            dout[r * t * d..][..d].iter_mut().zip(d_row).for_each(|(a, &b)| *a += b);
        }
        // Attention half: dx1 reaches the heads' outputs at the class tokens alone.
        let dy = class_rows(dout, rows, t, d);
        gemm(1.0, dy.t(), class_rows(&c.attn, rows, t, d), 0.0, view_mut(g.wo, d, d));
        column_sums_of(dy, g.bo);
        let d_attn = &mut s.d_tok[..rows * d];
        gemm(1.0, dy, view(p.wo, d, d), 0.0, view_mut(d_attn, rows, d));
        self.attention_backward_from_class_tokens(rows, &c.qkv, &c.probs, d_attn, &mut s.d_probs, &mut s.d_qkv);
        // Wqkv: the queries' gradient lives at the class tokens, the keys' and values' everywhere.
        let d_qkv = &s.d_qkv[..n * 3 * d];
        reduce::column_sums(d_qkv, g.bqkv);
        let (gq, gkv) = g.wqkv.split_at_mut(d * d);
        let (wq, wkv) = p.wqkv.split_at(d * d);
        let dq = class_rows(d_qkv, rows, t, 3 * d).slice_move(s![.., ..d]);
        let dkv = view(d_qkv, n, 3 * d).slice_move(s![.., d..]);
        gemm(1.0, dq.t(), class_rows(&c.ln1, rows, t, d), 0.0, view_mut(gq, d, d));
        gemm(1.0, dkv.t(), view(&c.ln1, n, d), 0.0, view_mut(gkv, 2 * d, d));
        let d_tok = &mut s.d_tok[..n * d];
        gemm(1.0, dkv, view(wkv, 2 * d, d), 0.0, view_mut(d_tok, n, d));
        gemm(1.0, dq, view(wq, d, d), 1.0, class_rows_mut(d_tok, rows, t, d));
        let (xhat, rstd) = (&c.xhat1[..n * d], &c.rstd1[..n]);
        layer_norm::backward(xhat, rstd, p.ln1_g, p.ln1_b, id, d_tok, g.ln1_g, g.ln1_b, None, &mut s.norm_scratch);
        if let Some(dx) = dx {
            // dx = dx1 + the LN1 path, dx1 read at the class tokens alone.
            dx[..n * d].copy_from_slice(&s.d_tok[..n * d]);
            for r in 0..rows {
                dx[r * t * d..][..d].iter_mut().zip(&dout[r * t * d..][..d]).for_each(|(o, &a)| *o += a);
            }
        }
    }

    /// [`TransformerBlock::backward`] for any `dout`.
    #[allow(clippy::too_many_arguments)]
    fn backward_all_tokens(
        &self,
        params: &[f32],
        rows: usize,
        cache: &BlockCache,
        scratch: &mut BlockScratch,
        dout: &mut [f32],
        grad: &mut [f32],
        dx: Option<&mut [f32]>,
    ) {
        let BlockSpec { tokens: t, dim: d, mlp: m, .. } = self.spec;
        let n = rows * t;
        let p = split_block!(params, d, m, split_at);
        let g = split_block!(&mut grad[..self.param_len()], d, m, split_at_mut);
        let (c, s) = (cache, scratch);
        let dout = &mut dout[..n * d];
        // MLP half: dout is the gradient wrt out = x1 + mlp(x1).
        linear_backward(&c.act, n, m, p.w2, dout, g.w2, g.b2, Some(&mut s.d_mlp));
        Activation::Gelu.backward(&c.pre[..n * m], &mut s.d_mlp[..n * m]);
        linear_backward(&c.ln2, n, d, p.w1, &s.d_mlp, g.w1, g.b1, Some(&mut s.d_tok));
        let (xhat, rstd, d_tok) = (&c.xhat2[..n * d], &c.rstd2[..n], &mut s.d_tok[..n * d]);
        let id = Activation::Identity;
        layer_norm::backward(xhat, rstd, p.ln2_g, p.ln2_b, id, d_tok, g.ln2_g, g.ln2_b, None, &mut s.norm_scratch);
        // dx1 = dout + the LN2 path, kept in dout.
        dout.iter_mut().zip(&s.d_tok[..n * d]).for_each(|(a, &b)| *a += b);
        // Attention half: dout is now the gradient wrt x1 = x + attn(x).
        linear_backward(&c.attn, n, d, p.wo, dout, g.wo, g.bo, Some(&mut s.d_tok));
        self.attention_backward(rows, &c.qkv, &c.probs, &s.d_tok, &mut s.d_probs, &mut s.d_qkv);
        linear_backward(&c.ln1, n, d, p.wqkv, &s.d_qkv, g.wqkv, g.bqkv, Some(&mut s.d_tok));
        let (xhat, rstd, d_tok) = (&c.xhat1[..n * d], &c.rstd1[..n], &mut s.d_tok[..n * d]);
        layer_norm::backward(xhat, rstd, p.ln1_g, p.ln1_b, id, d_tok, g.ln1_g, g.ln1_b, None, &mut s.norm_scratch);
        if let Some(dx) = dx {
            dx[..n * d].iter_mut().zip(dout.iter().zip(&s.d_tok[..n * d])).for_each(|(o, (&a, &b))| *o = a + b);
        }
    }
}

/// Which token summarizes a sample for a classifier or a projection head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenReadout {
    /// The class token (token 0).
    Cls,
    /// The mean over all tokens.
    Mean,
}

impl TokenReadout {
    /// `out` (`rows x dim`) from token batches `x` (`rows x tokens*dim`).
    pub fn forward(self, x: &[f32], rows: usize, tokens: usize, dim: usize, out: &mut [f32]) {
        for (o, sample) in out[..rows * dim].chunks_exact_mut(dim).zip(x.chunks_exact(tokens * dim)) {
            match self {
                TokenReadout::Cls => o.copy_from_slice(&sample[..dim]),
                TokenReadout::Mean => {
                    o.fill(0.0);
                    for tok in sample.chunks_exact(dim) {
                        o.iter_mut().zip(tok).for_each(|(a, &b)| *a += b);
                    }
                    let inv = 1.0 / tokens as f32;
                    o.iter_mut().for_each(|a| *a *= inv);
                }
            }
        }
    }

    /// The gradient wrt the tokens (overwriting `dx`) from the gradient wrt the readout.
    pub fn backward(self, dout: &[f32], rows: usize, tokens: usize, dim: usize, dx: &mut [f32]) {
        for (dx, g) in dx[..rows * tokens * dim].chunks_exact_mut(tokens * dim).zip(dout.chunks_exact(dim)) {
            match self {
                TokenReadout::Cls => {
                    dx.fill(0.0);
                    dx[..dim].copy_from_slice(g);
                }
                TokenReadout::Mean => {
                    let inv = 1.0 / tokens as f32;
                    for tok in dx.chunks_exact_mut(dim) {
                        tok.iter_mut().zip(g).for_each(|(a, &b)| *a = b * inv);
                    }
                }
            }
        }
    }
}

/// The classifier side of a ViT: the readout token of each sample, then a
/// LayerNorm (`rows x dim` out). Parameters: `[gamma (dim) | beta (dim)]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenHead {
    /// Tokens per sample.
    pub tokens: usize,
    /// Token width.
    pub dim: usize,
    /// Which token summarizes a sample.
    pub readout: TokenReadout,
    /// The LayerNorm's variance epsilon.
    pub norm_eps: f32,
}

impl TokenHead {
    /// Number of parameters.
    pub fn param_len(&self) -> usize {
        2 * self.dim
    }

    /// Gain 1, bias 0.
    pub fn init_params(&self, params: &mut [f32]) {
        params[..self.dim].fill(1.0);
        params[self.dim..2 * self.dim].fill(0.0);
    }

    /// `out = LN(readout(x))`; `cache` keeps what the backward needs.
    pub fn forward(&self, params: &[f32], x: &[f32], rows: usize, cache: &mut crate::DenseCache, out: &mut [f32]) {
        let n = rows * self.dim;
        let (xhat, rstd, _) = cache.norm_buffers(rows, self.dim);
        self.readout.forward(x, rows, self.tokens, self.dim, xhat);
        let (gamma, beta) = params.split_at(self.dim);
        layer_norm::forward_with_eps(
            self.norm_eps,
            xhat,
            None,
            gamma,
            &beta[..self.dim],
            Activation::Identity,
            rstd,
            &mut out[..n],
        );
    }

    /// Parameter gradient into `grad` and, if given, the token gradient into
    /// `dx`, from `dout` (overwritten as scratch).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &[f32],
        rows: usize,
        cache: &mut crate::DenseCache,
        dout: &mut [f32],
        grad: &mut [f32],
        dx: Option<&mut [f32]>,
    ) {
        let n = rows * self.dim;
        let (xhat, rstd, scratch) = cache.norm_buffers(rows, self.dim);
        let (dgamma, dbeta) = grad[..2 * self.dim].split_at_mut(self.dim);
        let (gamma, beta) = params[..2 * self.dim].split_at(self.dim);
        let id = Activation::Identity;
        layer_norm::backward(xhat, rstd, gamma, beta, id, &mut dout[..n], dgamma, dbeta, None, scratch);
        if let Some(dx) = dx {
            self.readout.backward(&dout[..n], rows, self.tokens, self.dim, dx);
        }
    }
}

/// `row = softmax(row)`, the maximum subtracted first.
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut z = 0.0;
    for s in row.iter_mut() {
        *s = (*s - max).exp();
        z += *s;
    }
    let inv = 1.0 / z;
    row.iter_mut().for_each(|s| *s *= inv);
}

/// Whether every sample (`sample` floats each, its class token the first
/// `dim`) is zero past its class token. Sign bits are ignored (`-0.0` is zero).
fn zero_past_class_token(dout: &[f32], sample: usize, dim: usize) -> bool {
    // OR of the shifted bits over short runs: vectorized, and it stops at the first nonzero run.
    dout.chunks_exact(sample)
        .all(|s| s[dim..].chunks(64).all(|run| run.iter().fold(0u32, |acc, v| acc | (v.to_bits() << 1)) == 0))
}

/// Row `r * tokens` of a `(rows * tokens) x width` buffer for each `r`:
/// every sample's class token, as a `rows x width` view.
fn class_rows(buf: &[f32], rows: usize, tokens: usize, width: usize) -> ArrayView2<'_, f32> {
    let len = if rows == 0 { 0 } else { ((rows - 1) * tokens + 1) * width };
    ArrayView2::from_shape((rows, width).strides((tokens * width, 1)), &buf[..len]).expect("class rows in the buffer")
}

/// Mutable counterpart of [`class_rows`].
fn class_rows_mut(buf: &mut [f32], rows: usize, tokens: usize, width: usize) -> ArrayViewMut2<'_, f32> {
    let len = if rows == 0 { 0 } else { ((rows - 1) * tokens + 1) * width };
    ArrayViewMut2::from_shape((rows, width).strides((tokens * width, 1)), &mut buf[..len])
        .expect("class rows in the buffer")
}

/// `out[j] = sum_i a[i][j]` (overwriting), rows top to bottom.
fn column_sums_of(a: ArrayView2<f32>, out: &mut [f32]) {
    out.fill(0.0);
    for row in a.rows() {
        out.iter_mut().zip(row).for_each(|(o, &v)| *o += v);
    }
}

/// The `rows x cols` block of `buf` starting at column `offset` of rows
/// `stride` floats apart (one head's queries, keys or values).
fn columns(buf: &[f32], offset: usize, rows: usize, cols: usize, stride: usize) -> Strided<'_> {
    Strided::rows(&buf[offset..], rows, cols, stride)
}

/// Mutable counterpart of [`columns`].
fn columns_mut(buf: &mut [f32], offset: usize, rows: usize, cols: usize, stride: usize) -> StridedMut<'_> {
    StridedMut::rows(&mut buf[offset..], rows, cols, stride)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The class-token backward against the general one on the same
    /// class-token-only gradient, at shapes with several heads, samples and
    /// whole AVX-512 lanes per head: the same values up to rounding.
    #[test]
    fn class_token_backward_matches_the_general_one() {
        // The ViT config's 17 tokens; and one head 264 wide.
        for (spec, rows) in [
            (BlockSpec { tokens: 17, dim: 64, heads: 4, mlp: 96 }, 5),
            (BlockSpec { tokens: 3, dim: 264, heads: 1, mlp: 8 }, 2),
        ] {
            class_token_backward_matches_the_general_one_at(spec, rows);
        }
    }

    fn class_token_backward_matches_the_general_one_at(spec: BlockSpec, rows: usize) {
        let block = TransformerBlock::new(spec);
        let mut stream = Stream::new(StreamKey::new(7, Purpose::WeightInit, 3, 0, 0));
        let mut random = |len: usize| (0..len).map(|_| stream.gaussian() as f32).collect::<Vec<_>>();
        let mut params = vec![0.0; block.param_len()];
        block.init_params(5, 2, &mut params);
        let noise = random(params.len());
        params.iter_mut().zip(noise).for_each(|(p, n)| *p += 0.1 * n);
        let len = rows * block.sample_len();
        let x = random(len);
        let mut dout = random(len);
        for sample in dout.chunks_exact_mut(block.sample_len()) {
            sample[spec.dim..].fill(0.0);
        }
        let mut cache = BlockCache::try_new(&spec, rows).unwrap();
        let mut scratch = BlockScratch::try_new(&spec, rows).unwrap();
        let mut out = vec![0.0; len];
        block.forward(&params, &x, rows, &mut cache, &mut scratch, &mut out);
        let run = |general: bool, scratch: &mut BlockScratch| {
            let (mut d, mut grad, mut dx) = (dout.clone(), vec![0.0; params.len()], vec![0.0; len]);
            if general {
                block.backward_all_tokens(&params, rows, &cache, scratch, &mut d, &mut grad, Some(&mut dx));
            } else {
                block.backward(&params, rows, &cache, scratch, &mut d, &mut grad, Some(&mut dx));
            }
            (grad, dx)
        };
        let (grad, dx) = run(false, &mut scratch);
        let (grad_ref, dx_ref) = run(true, &mut scratch);
        for (what, got, want) in [("params", &grad, &grad_ref), ("input", &dx, &dx_ref)] {
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (i, (&a, &b)) in got.iter().zip(want.iter()).enumerate() {
                assert!((a - b).abs() <= 1e-5 * scale, "{what}[{i}]: class-token {a} vs general {b}");
            }
        }
        // The class-token path did run: the general one sums in another order.
        assert_ne!(grad, grad_ref);
        // A block computing the class tokens alone gives the same gradients
        // to rounding, and reads no gradient past a class token.
        let class_block = TransformerBlock { output: BlockOutput::ClassToken, ..TransformerBlock::new(spec) };
        let mut class_cache = BlockCache::try_new(&spec, rows).unwrap();
        class_block.forward(&params, &x, rows, &mut class_cache, &mut scratch, &mut out);
        let mut d = dout.clone();
        for sample in d.chunks_exact_mut(block.sample_len()) {
            sample[spec.dim..].fill(f32::NAN);
        }
        let (mut class_grad, mut class_dx) = (vec![0.0; params.len()], vec![0.0; len]);
        class_block.backward(&params, rows, &class_cache, &mut scratch, &mut d, &mut class_grad, Some(&mut class_dx));
        for (what, got, want) in [("params", &class_grad, &grad_ref), ("input", &class_dx, &dx_ref)] {
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (i, (&a, &b)) in got.iter().zip(want.iter()).enumerate() {
                assert!((a - b).abs() <= 1e-5 * scale, "class-token block {what}[{i}]: {a} vs general {b}");
            }
        }
        // Any gradient past a class token takes the general path.
        let mut d = dout.clone();
        d[spec.dim + 3] = 1e-30;
        assert!(!zero_past_class_token(&d, block.sample_len(), spec.dim));
        d[spec.dim + 3] = -0.0;
        assert!(zero_past_class_token(&d, block.sample_len(), spec.dim));
    }
}
