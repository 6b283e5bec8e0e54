//! The update rules' arithmetic: SGD and Adam steps over slices, compiled
//! once per instruction set, and bf16 moments with stochastic rounding.

/// Elements per parallel task: below this the pass is memory-bound on one core
/// and scheduling costs more than it saves.
pub(crate) const CHUNK: usize = 1 << 14;

#[inline]
fn flush(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE { 0.0 } else { x }
}

/// One layer's update at one step, its scalars fixed by [`Optimizer::begin`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum StepRule {
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

/// Adam's (or AdamW's) scalars at one step: what an update of one weight
/// reads besides the weight, its gradient and its moments. Public so that a
/// device backend runs the same arithmetic ([`AdamStep::element`]'s).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// First-moment decay rate.
    pub beta1: f32,
    /// Second-moment decay rate.
    pub beta2: f32,
    /// Denominator guard.
    pub eps: f32,
    /// L2 coefficient added to the gradient (Adam).
    pub l2: f32,
    /// Decoupled decay factor applied to the weights (AdamW): `1 - lr * wd`.
    pub decay: f32,
    /// `lr / (1 - beta1^t)`.
    pub step: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    pub inv_bc2_sqrt: f32,
}

impl AdamStep {
    /// One weight: updates `p` from its gradient `g` and moments `m`, `v`,
    /// and returns the new moments (as computed, before any rounding of
    /// their storage).
    #[inline(always)]
    pub fn element(&self, p: &mut f32, g: f32, m: f32, v: f32) -> (f32, f32) {
        let g = g + self.l2 * *p;
        let m = flush(self.beta1 * m + (1.0 - self.beta1) * g);
        let v = flush(self.beta2 * v + (1.0 - self.beta2) * g * g);
        let denom = v.sqrt() * self.inv_bc2_sqrt + self.eps;
        *p = *p * self.decay - self.step * m / denom;
        (m, v)
    }
}

impl StepRule {
    pub(crate) fn adam(lr: f32, beta1: f32, beta2: f32, eps: f32, l2: f32, decoupled: f32, t: u64) -> Self {
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
    pub(crate) fn apply_rule(rule: StepRule, params: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
        rule.apply(params, grad, m, v)
    }
}

svp_tensor::multiversion! {
    /// [`AdamStep::apply_bf16`], vectorized at the CPU's width.
    pub(crate) fn apply_adam_bf16(
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
pub(crate) fn from_bf16(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// `x` rounded to bfloat16, up with probability equal to the fraction of an
/// ulp it lies above the value below (so the rounding is unbiased), given
/// 16 uniform random bits in `noise`. Infinities and NaNs are truncated
/// (adding noise could carry a NaN's payload into the sign).
#[inline(always)]
pub(crate) fn to_bf16_stochastic(x: f32, noise: u32) -> u16 {
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
