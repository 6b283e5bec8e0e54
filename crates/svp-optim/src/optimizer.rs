//! The optimizers and their hyperparameters, as a run config's
//! `[optimizer]` table writes them, and the start of a layer's update.

use crate::rule::{AdamStep, StepRule};
use crate::{LayerState, LayerUpdate, Moments};
use serde::{Deserialize, Serialize};
use svp_tensor::GradientSink;

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
        LayerUpdate::new(rule, &mut state.moments, noise_seed)
    }

    /// Adam's (or AdamW's) scalars for a layer's `t`-th update (1-based) with
    /// the learning rate multiplied by `lr_scale`, as [`Optimizer::update`]
    /// would fix them; `None` for SGD. For backends that update weights
    /// elsewhere (a GPU) with the same arithmetic.
    pub fn adam_step(&self, lr_scale: f32, t: u64) -> Option<AdamStep> {
        let mut state = LayerState { steps: t.saturating_sub(1), moments: Moments::None };
        match self.begin(lr_scale, &mut state) {
            StepRule::Adam(step) => Some(step),
            StepRule::Sgd { .. } | StepRule::Momentum { .. } => None,
        }
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
