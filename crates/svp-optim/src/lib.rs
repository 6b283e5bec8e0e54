//! Optimizers, each one fused pass over a layer's contiguous parameters.
//!
//! A layer's parameters, gradient and optimizer state are parallel slices of
//! equal length; [`Optimizer::update`] reads each element once. State is kept
//! per layer by the caller ([`LayerState`]), so a trainer can update layer `l`
//! the moment its gradient exists and then reuse the gradient buffer.
//!
//! Adam's moments can be stored in bfloat16 ([`MomentDtype::Bf16`]): half
//! the optimizer's memory and a quarter less traffic per weight (the README
//! has what that does to the step's time). They are rounded stochastically,
//! which keeps them unbiased:
//! with `beta2 = 0.999` a step changes `v` by 0.1 %, below bf16's resolution
//! (0.4 %), so rounding to nearest would freeze it.
//!
//! Optimizer moments that decay towards zero are flushed to zero below
//! `f32::MIN_POSITIVE`: subnormal floats are 10-100x slower on x86, and a
//! momentum of a dead unit would otherwise decay through them for hundreds of
//! steps.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
#[cfg(feature = "clock")]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(feature = "clock")]
use std::time::Duration;
use svp_tensor::GradientSink;

/// Wall time spent in [`Optimizer::update`] since the last [`reset_update_clock`], in ns.
#[cfg(feature = "clock")]
static UPDATE_NANOS: AtomicU64 = AtomicU64::new(0);

/// Wall time spent updating from stored gradients since the last reset, so
/// a benchmark can split a step's time (two `Instant::now` per layer
/// update). Only with the `clock` feature, which the benches turn on.
#[cfg(feature = "clock")]
pub fn update_clock() -> Duration {
    Duration::from_nanos(UPDATE_NANOS.load(Ordering::Relaxed))
}

/// Zeroes [`update_clock`].
#[cfg(feature = "clock")]
pub fn reset_update_clock() {
    UPDATE_NANOS.store(0, Ordering::Relaxed);
}

/// Which update rule, with its hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Optimizer {
    /// SGD with (heavy-ball) momentum and L2 weight decay, as `torch.optim.SGD`.
    Sgd {
        /// Learning rate.
        lr: f32,
        /// Momentum coefficient (0 = plain SGD).
        #[serde(default)]
        momentum: f32,
        /// L2 penalty added to the gradient.
        #[serde(default)]
        weight_decay: f32,
    },
    /// Adam with optional L2 weight decay added to the gradient, as `torch.optim.Adam`.
    Adam {
        /// Learning rate.
        lr: f32,
        /// First-moment decay.
        #[serde(default = "default_beta1")]
        beta1: f32,
        /// Second-moment decay.
        #[serde(default = "default_beta2")]
        beta2: f32,
        /// Denominator guard.
        #[serde(default = "default_eps")]
        eps: f32,
        /// L2 penalty added to the gradient.
        #[serde(default)]
        weight_decay: f32,
        /// How the moments are stored.
        #[serde(default)]
        state: MomentDtype,
    },
    /// Adam with decoupled weight decay, as `torch.optim.AdamW`.
    AdamW {
        /// Learning rate.
        lr: f32,
        /// First-moment decay.
        #[serde(default = "default_beta1")]
        beta1: f32,
        /// Second-moment decay.
        #[serde(default = "default_beta2")]
        beta2: f32,
        /// Denominator guard.
        #[serde(default = "default_eps")]
        eps: f32,
        /// Decoupled decay (`p -= lr * wd * p`).
        #[serde(default = "default_adamw_decay")]
        weight_decay: f32,
        /// How the moments are stored.
        #[serde(default)]
        state: MomentDtype,
    },
}

fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.999
}
fn default_eps() -> f32 {
    1e-8
}
fn default_adamw_decay() -> f32 {
    0.01
}

/// How an optimizer stores its moments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MomentDtype {
    /// 32-bit floats.
    #[default]
    F32,
    /// bfloat16 (the high half of an f32), rounded stochastically.
    Bf16,
}

/// An optimizer's per-parameter moments for one layer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Moments {
    /// Plain SGD keeps none.
    #[default]
    None,
    /// SGD's momentum buffer.
    Momentum(Vec<f32>),
    /// Adam's first and second moments.
    F32 {
        /// First moment.
        m: Vec<f32>,
        /// Second moment.
        v: Vec<f32>,
    },
    /// Adam's moments as bfloat16 bits.
    Bf16 {
        /// First moment.
        m: Vec<u16>,
        /// Second moment.
        v: Vec<u16>,
    },
}

impl Moments {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Moments::None => 0,
            Moments::Momentum(m) => 4 * m.len(),
            Moments::F32 { m, v } => 4 * (m.len() + v.len()),
            Moments::Bf16 { m, v } => 2 * (m.len() + v.len()),
        }
    }

    /// Whether `other` has the same kind and lengths (a checkpoint's state
    /// fits this layer and optimizer).
    pub fn same_shape(&self, other: &Moments) -> bool {
        match (self, other) {
            (Moments::None, Moments::None) => true,
            (Moments::Momentum(a), Moments::Momentum(b)) => a.len() == b.len(),
            (Moments::F32 { m: a, v: b }, Moments::F32 { m: c, v: d }) => a.len() == c.len() && b.len() == d.len(),
            (Moments::Bf16 { m: a, v: b }, Moments::Bf16 { m: c, v: d }) => a.len() == c.len() && b.len() == d.len(),
            _ => false,
        }
    }
}

/// Optimizer state of one layer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerState {
    /// Updates applied so far (Adam's bias correction; stochastic rounding's stream).
    pub steps: u64,
    /// Per-parameter moments.
    pub moments: Moments,
}

impl LayerState {
    /// Bytes of state held.
    pub fn bytes(&self) -> usize {
        self.moments.bytes()
    }
}

/// Elements per parallel task: below this the pass is memory-bound on one core
/// and scheduling costs more than it saves.
const CHUNK: usize = 1 << 14;

#[inline]
fn flush(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE { 0.0 } else { x }
}

impl Optimizer {
    /// Adam with PyTorch's defaults (betas 0.9 and 0.999, eps 1e-8, no
    /// weight decay) and f32 moments.
    pub fn adam(lr: f32) -> Self {
        Optimizer::Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, state: MomentDtype::F32 }
    }

    /// The same optimizer with its moments stored as `dtype` (Adam, AdamW;
    /// SGD's momentum stays f32).
    pub fn with_moments(mut self, dtype: MomentDtype) -> Self {
        if let Optimizer::Adam { state, .. } | Optimizer::AdamW { state, .. } = &mut self {
            *state = dtype;
        }
        self
    }

    /// The configured base learning rate.
    pub fn lr(&self) -> f32 {
        match *self {
            Optimizer::Sgd { lr, .. } | Optimizer::Adam { lr, .. } | Optimizer::AdamW { lr, .. } => lr,
        }
    }

    /// Fresh state for a layer of `len` parameters.
    ///
    /// # Panics
    /// If the memory is not there (see [`Optimizer::try_new_state`]).
    pub fn new_state(&self, len: usize) -> LayerState {
        self.try_new_state(len).expect("memory for optimizer state")
    }

    /// [`Optimizer::new_state`], failing cleanly when the memory is not there.
    pub fn try_new_state(&self, len: usize) -> Result<LayerState, svp_alloc::OutOfMemory> {
        let what = "optimizer state";
        let zeros = |n| svp_alloc::try_zeros(n, what);
        let moments = match *self {
            Optimizer::Sgd { momentum: 0.0, .. } => Moments::None,
            Optimizer::Sgd { .. } => Moments::Momentum(zeros(len)?),
            Optimizer::Adam { state: MomentDtype::F32, .. } | Optimizer::AdamW { state: MomentDtype::F32, .. } => {
                Moments::F32 { m: zeros(len)?, v: zeros(len)? }
            }
            Optimizer::Adam { state: MomentDtype::Bf16, .. } | Optimizer::AdamW { state: MomentDtype::Bf16, .. } => {
                // bf16 zero is all-zero bits.
                let bits = |n| svp_alloc::try_zeroed::<u16>(n, what);
                Moments::Bf16 { m: bits(len)?, v: bits(len)? }
            }
        };
        Ok(LayerState { steps: 0, moments })
    }

    /// One update of `params` from `grad`, with the learning rate multiplied by
    /// `lr_scale` (a schedule's factor).
    ///
    /// # Panics
    /// If the slices and state differ in length (the trainer sizes them together).
    pub fn update(&self, lr_scale: f32, params: &mut [f32], grad: &[f32], state: &mut LayerState) {
        assert_eq!(params.len(), grad.len(), "optimizer: gradient length");
        self.begin_update(lr_scale, state).apply(0, params, grad);
    }

    /// Starts one update of a layer whose parameters the caller hands over in
    /// parts: each part through its `apply` with its gradient, or a
    /// weight matrix through its `weight_rows` as a GEMM produces its
    /// gradient (the [`GradientSink`] impl). Every parameter must be handed over exactly once; the
    /// result is then bit-identical to [`Optimizer::update`] of the whole layer.
    pub fn begin_update<'a>(&self, lr_scale: f32, state: &'a mut LayerState) -> LayerUpdate<'a> {
        let rule = self.begin(lr_scale, state);
        let noise_seed = (state.steps as u32).wrapping_mul(0x9e37_79b9);
        LayerUpdate { rule, moments: &mut state.moments, noise_seed, takes_tiles: true }
    }

    /// Starts one update of a layer: counts the step in `state` and fixes the
    /// step's scalars; [`StepRule::apply`] then updates the layer chunk by chunk.
    fn begin(&self, lr_scale: f32, state: &mut LayerState) -> StepRule {
        state.steps += 1;
        match *self {
            Optimizer::Sgd { lr, momentum: 0.0, weight_decay } => StepRule::Sgd { lr: lr * lr_scale, weight_decay },
            Optimizer::Sgd { lr, momentum, weight_decay } => {
                StepRule::Momentum { lr: lr * lr_scale, momentum, weight_decay, first: state.steps == 1 }
            }
            Optimizer::Adam { lr, beta1, beta2, eps, weight_decay, .. } => {
                StepRule::adam(lr * lr_scale, beta1, beta2, eps, weight_decay, 0.0, state.steps)
            }
            Optimizer::AdamW { lr, beta1, beta2, eps, weight_decay, .. } => {
                StepRule::adam(lr * lr_scale, beta1, beta2, eps, 0.0, weight_decay, state.steps)
            }
        }
    }
}

/// One layer's update at one step, begun by [`Optimizer::begin_update`]: the
/// step is counted and its scalars fixed.
#[derive(Debug)]
pub struct LayerUpdate<'a> {
    rule: StepRule,
    moments: &'a mut Moments,
    /// The step's seed for bf16 moments' rounding noise.
    noise_seed: u32,
    /// Whether `weight_rows` may hand out a sink.
    takes_tiles: bool,
}

impl LayerUpdate<'_> {
    /// The same update taking stored gradients only (`weight_rows` is then
    /// always `None`): the same bits, another path through memory, for
    /// measuring what the fused one saves.
    pub fn stored_gradients_only(mut self) -> Self {
        self.takes_tiles = false;
        self
    }
}

/// A layer's parameters go through [`GradientSink::apply`] with their stored
/// gradient, or a weight matrix's through [`GradientSink::weight_rows`] as
/// [`svp_tensor::gemm_to_sink`] computes it, so that gradient is never
/// stored (`weight_rows` is `None` only after
/// [`LayerUpdate::stored_gradients_only`]). Either way gives the same bits.
///
/// # Panics
/// Both methods panic if the parameters lie outside the layer's state, and
/// `apply` if the gradient's length differs, `weight_rows` if the weights
/// are not whole rows.
impl GradientSink for LayerUpdate<'_> {
    type Rows<'a>
        = WeightRows<'a>
    where
        Self: 'a;

    fn apply(&mut self, offset: usize, params: &mut [f32], grad: &[f32]) {
        #[cfg(feature = "clock")]
        let start = std::time::Instant::now();
        assert_eq!(params.len(), grad.len(), "optimizer: gradient length");
        let range = offset..offset + params.len();
        let rule = self.rule;
        let chunks = params.par_chunks_mut(CHUNK).zip(grad.par_chunks(CHUNK));
        // A rule without moments gets empty moment slices (a zip with the
        // empty state would stop at once).
        match &mut *self.moments {
            Moments::None => chunks.for_each(|(p, g)| apply_rule(rule, p, g, &mut [], &mut [])),
            Moments::Momentum(m) => {
                chunks.zip(m[range].par_chunks_mut(CHUNK)).for_each(|((p, g), m)| apply_rule(rule, p, g, m, &mut []))
            }
            Moments::F32 { m, v } => chunks
                .zip(m[range.clone()].par_chunks_mut(CHUNK))
                .zip(v[range].par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| apply_rule(rule, p, g, m, v)),
            Moments::Bf16 { m, v } => {
                let StepRule::Adam(adam) = rule else { unreachable!("only Adam's state is kept in bf16") };
                let noise_seed = self.noise_seed;
                chunks
                    .zip(m[range.clone()].par_chunks_mut(CHUNK))
                    .zip(v[range].par_chunks_mut(CHUNK))
                    .enumerate()
                    .for_each(|(c, (((p, g), m), v))| {
                        apply_adam_bf16(adam, p, g, m, v, noise_seed, (offset + c * CHUNK) as u32)
                    })
            }
        }
        #[cfg(feature = "clock")]
        UPDATE_NANOS.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// (Its time counts on the GEMM clock, not on [`update_clock`].)
    fn weight_rows<'b>(&'b mut self, offset: usize, weights: &'b mut [f32], cols: usize) -> Option<WeightRows<'b>> {
        assert!(
            cols > 0 && weights.len().is_multiple_of(cols),
            "optimizer: weights of {} are not rows of {cols}",
            weights.len()
        );
        if !self.takes_tiles {
            return None;
        }
        let range = offset..offset + weights.len();
        let moments = match &mut *self.moments {
            Moments::None => RowMoments::None,
            Moments::Momentum(m) => RowMoments::Momentum(&mut m[range]),
            Moments::F32 { m, v } => RowMoments::F32 { m: &mut m[range.clone()], v: &mut v[range] },
            Moments::Bf16 { m, v } => {
                RowMoments::Bf16 { m: &mut m[range.clone()], v: &mut v[range], noise_seed: self.noise_seed }
            }
        };
        Some(WeightRows { rule: self.rule, params: weights, moments, offset, cols })
    }
}

/// Weights updated row piece by row piece from a gradient a GEMM hands over
/// ([`GradientSink::weight_rows`] of a [`LayerUpdate`]).
#[derive(Debug)]
pub struct WeightRows<'a> {
    rule: StepRule,
    params: &'a mut [f32],
    /// The moments of `params`.
    moments: RowMoments<'a>,
    /// Where `params` start in the layer (bf16 rounding noise is keyed by the place).
    offset: usize,
    cols: usize,
}

/// The part of a layer's [`Moments`] that a [`WeightRows`] updates.
#[derive(Debug)]
enum RowMoments<'a> {
    None,
    Momentum(&'a mut [f32]),
    F32 { m: &'a mut [f32], v: &'a mut [f32] },
    Bf16 { m: &'a mut [u16], v: &'a mut [u16], noise_seed: u32 },
}

impl svp_tensor::ProductSink for WeightRows<'_> {
    #[inline]
    fn take(&mut self, row: usize, col0: usize, grad: &[f32]) {
        let at = row * self.cols + col0;
        let range = at..at + grad.len();
        let params = &mut self.params[range.clone()];
        let rule = self.rule;
        match &mut self.moments {
            RowMoments::None => apply_rule(rule, params, grad, &mut [], &mut []),
            RowMoments::Momentum(m) => apply_rule(rule, params, grad, &mut m[range], &mut []),
            RowMoments::F32 { m, v } => apply_rule(rule, params, grad, &mut m[range.clone()], &mut v[range]),
            RowMoments::Bf16 { m, v, noise_seed } => {
                let StepRule::Adam(adam) = rule else { unreachable!("only Adam's state is kept in bf16") };
                let (m, v) = (&mut m[range.clone()], &mut v[range]);
                apply_adam_bf16(adam, params, grad, m, v, *noise_seed, (self.offset + at) as u32);
            }
        }
    }

    fn split_rows(self, at: usize) -> (Self, Self) {
        let cut = at * self.cols;
        let (p_top, p_bottom) = self.params.split_at_mut(cut);
        let (top, bottom) = match self.moments {
            RowMoments::None => (RowMoments::None, RowMoments::None),
            RowMoments::Momentum(m) => {
                let (a, b) = m.split_at_mut(cut);
                (RowMoments::Momentum(a), RowMoments::Momentum(b))
            }
            RowMoments::F32 { m, v } => {
                let ((m0, m1), (v0, v1)) = (m.split_at_mut(cut), v.split_at_mut(cut));
                (RowMoments::F32 { m: m0, v: v0 }, RowMoments::F32 { m: m1, v: v1 })
            }
            RowMoments::Bf16 { m, v, noise_seed } => {
                let ((m0, m1), (v0, v1)) = (m.split_at_mut(cut), v.split_at_mut(cut));
                (RowMoments::Bf16 { m: m0, v: v0, noise_seed }, RowMoments::Bf16 { m: m1, v: v1, noise_seed })
            }
        };
        let (rule, cols, offset) = (self.rule, self.cols, self.offset);
        (
            WeightRows { rule, params: p_top, moments: top, offset, cols },
            WeightRows { rule, params: p_bottom, moments: bottom, offset: offset + cut, cols },
        )
    }
}

/// One layer's update at one step, its scalars fixed by [`Optimizer::begin`].
#[derive(Clone, Copy, Debug, PartialEq)]
enum StepRule {
    /// Plain SGD.
    Sgd {
        /// Learning rate (schedule applied).
        lr: f32,
        /// L2 coefficient added to the gradient.
        weight_decay: f32,
    },
    /// SGD with momentum.
    Momentum {
        /// Learning rate (schedule applied).
        lr: f32,
        /// Momentum factor.
        momentum: f32,
        /// L2 coefficient added to the gradient.
        weight_decay: f32,
        /// The layer's first step (PyTorch: the buffer starts as the gradient).
        first: bool,
    },
    /// Adam or AdamW.
    Adam(AdamStep),
}

/// Adam's (or AdamW's) scalars at one step.
#[derive(Clone, Copy, Debug, PartialEq)]
struct AdamStep {
    /// First-moment decay rate.
    beta1: f32,
    /// Second-moment decay rate.
    beta2: f32,
    /// Denominator guard.
    eps: f32,
    /// L2 coefficient added to the gradient (Adam).
    l2: f32,
    /// Decoupled decay factor applied to the weights (AdamW): `1 - lr * wd`.
    decay: f32,
    /// `lr / (1 - beta1^t)`.
    step: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    inv_bc2_sqrt: f32,
}

impl AdamStep {
    /// One weight: updates `p` from its gradient `g` and moments `m`, `v`,
    /// and returns the new moments (as computed, before any rounding of
    /// their storage).
    #[inline(always)]
    fn element(&self, p: &mut f32, g: f32, m: f32, v: f32) -> (f32, f32) {
        let g = g + self.l2 * *p;
        let m = flush(self.beta1 * m + (1.0 - self.beta1) * g);
        let v = flush(self.beta2 * v + (1.0 - self.beta2) * g * g);
        let denom = v.sqrt() * self.inv_bc2_sqrt + self.eps;
        *p = *p * self.decay - self.step * m / denom;
        (m, v)
    }
}

impl StepRule {
    fn adam(lr: f32, beta1: f32, beta2: f32, eps: f32, l2: f32, decoupled: f32, t: u64) -> Self {
        let t = t as i32;
        // A product with the reciprocal instead of PyTorch's division by
        // sqrt(bias correction): within an ulp of it, and a division fewer
        // per element.
        let inv_bc2_sqrt = 1.0 / (1.0 - beta2.powi(t)).sqrt();
        let step = lr / (1.0 - beta1.powi(t));
        StepRule::Adam(AdamStep { beta1, beta2, eps, l2, decay: 1.0 - lr * decoupled, step, inv_bc2_sqrt })
    }

    /// Updates `params` from `grad` and the moments `m`, `v`: equal-length
    /// pieces of the layer's parameters, gradient and state, at the same
    /// offset (moments the rule keeps none of may be empty).
    ///
    /// # Panics
    /// If the pieces differ in length.
    #[inline(always)]
    fn apply(&self, params: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
        let n = params.len();
        assert_eq!(grad.len(), n, "optimizer: gradient length");
        match *self {
            StepRule::Sgd { lr, weight_decay } => {
                for (p, &g) in params.iter_mut().zip(grad) {
                    *p -= lr * (g + weight_decay * *p);
                }
            }
            StepRule::Momentum { lr, momentum, weight_decay, first } => {
                assert_eq!(m.len(), n, "optimizer: state length");
                for ((p, &g), m) in params.iter_mut().zip(grad).zip(m) {
                    let g = g + weight_decay * *p;
                    // PyTorch: the first step's buffer is the gradient itself.
                    *m = if first { g } else { flush(momentum * *m + g) };
                    *p -= lr * *m;
                }
            }
            StepRule::Adam(adam) => {
                assert!(m.len() == n && v.len() == n, "optimizer: state length");
                for (((p, &g), m), v) in params.iter_mut().zip(grad).zip(m).zip(v) {
                    (*m, *v) = adam.element(p, g, *m, *v);
                }
            }
        }
    }
}

svp_tensor::multiversion! {
    /// [`StepRule::apply`], vectorized at the CPU's width.
    fn apply_rule(rule: StepRule, params: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
        rule.apply(params, grad, m, v)
    }
}

svp_tensor::multiversion! {
    /// [`AdamStep::apply_bf16`], vectorized at the CPU's width.
    fn apply_adam_bf16(
        adam: AdamStep,
        params: &mut [f32],
        grad: &[f32],
        m: &mut [u16],
        v: &mut [u16],
        noise_seed: u32,
        offset: u32,
    ) {
        adam.apply_bf16(params, grad, m, v, noise_seed, offset)
    }
}

impl AdamStep {
    /// [`StepRule::apply`] for Adam with bf16 moments. `offset` is the
    /// pieces' position in the layer: each element's rounding noise is a
    /// hash of the step's `noise_seed` and the element's place in the layer,
    /// so the bits depend neither on the thread count nor on how the layer
    /// is handed over (a stored gradient in chunks, a GEMM's rows).
    ///
    /// # Panics
    /// If the pieces differ in length.
    #[inline(always)]
    fn apply_bf16(&self, params: &mut [f32], grad: &[f32], m: &mut [u16], v: &mut [u16], noise_seed: u32, offset: u32) {
        let n = params.len();
        assert!(grad.len() == n && m.len() == n && v.len() == n, "optimizer: state length");
        let elements = params.iter_mut().zip(grad).zip(m.iter_mut().zip(v.iter_mut()));
        for (j, ((p, &g), (m, v))) in elements.enumerate() {
            let noise = rounding_noise(noise_seed, offset.wrapping_add(j as u32));
            // This step uses the moments before rounding.
            let (m32, v32) = self.element(p, g, from_bf16(*m), from_bf16(*v));
            *m = to_bf16_stochastic(m32, noise >> 16);
            *v = to_bf16_stochastic(v32, noise & 0xffff);
        }
    }
}

/// A bfloat16's value.
#[inline(always)]
fn from_bf16(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// `x` rounded to bfloat16, up with probability equal to the fraction of an
/// ulp it lies above the value below (so the rounding is unbiased), given
/// 16 uniform random bits in `noise`. Infinities and NaNs are truncated
/// (adding noise could carry a NaN's payload into the sign).
#[inline(always)]
fn to_bf16_stochastic(x: f32, noise: u32) -> u16 {
    let bits = x.to_bits();
    let bits = if x.is_finite() { bits.wrapping_add(noise & 0xffff) } else { bits };
    (bits >> 16) as u16
}

/// 32 well-mixed bits from a seed and an index (Wellons' `lowbias32`
/// finalizer): [`AdamStep::apply_bf16`]'s rounding noise.
#[inline(always)]
fn rounding_noise(seed: u32, index: u32) -> u32 {
    let mut x = index ^ seed;
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            bf16,
            Optimizer::Adam { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, state: want }
        );
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
            Optimizer::Adam {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
                state: MomentDtype::F32,
            },
            Optimizer::AdamW {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
                weight_decay: 0.1,
                state: MomentDtype::F32,
            },
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
}
