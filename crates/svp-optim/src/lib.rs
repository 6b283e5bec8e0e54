//! Optimizers, each one fused pass over a layer's contiguous parameters.
//!
//! A layer's parameters, gradient and optimizer state are parallel slices of
//! equal length; [`Optimizer::update`] reads each element once. State is kept
//! per layer by the caller ([`LayerState`]), so a trainer can update layer `l`
//! the moment its gradient exists and then reuse the gradient buffer.
//!
//! Optimizer moments that decay towards zero are flushed to zero below
//! `f32::MIN_POSITIVE`: subnormal floats are 10-100x slower on x86, and a
//! momentum of a dead unit would otherwise decay through them for hundreds of
//! steps.

#![warn(missing_docs)]

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Wall time spent in [`Optimizer::update`] since the last [`reset_update_clock`], in ns.
static UPDATE_NANOS: AtomicU64 = AtomicU64::new(0);

/// Wall time spent in [`Optimizer::update`] since the last reset, so a
/// benchmark can split a step's time without an instrumented build (two
/// `Instant::now` per layer update).
pub fn update_clock() -> Duration {
    Duration::from_nanos(UPDATE_NANOS.load(Ordering::Relaxed))
}

/// Zeroes [`update_clock`].
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

/// Optimizer state of one layer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerState {
    /// Updates applied so far (Adam's bias correction).
    pub steps: u64,
    /// First moment (momentum buffer for SGD); empty when unused.
    pub m: Vec<f32>,
    /// Second moment; empty when unused.
    pub v: Vec<f32>,
}

impl LayerState {
    /// Bytes of state held.
    pub fn bytes(&self) -> usize {
        4 * (self.m.len() + self.v.len())
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
        Ok(match *self {
            Optimizer::Sgd { momentum, .. } => {
                LayerState { steps: 0, m: if momentum != 0.0 { zeros(len)? } else { Vec::new() }, v: Vec::new() }
            }
            Optimizer::Adam { .. } | Optimizer::AdamW { .. } => LayerState { steps: 0, m: zeros(len)?, v: zeros(len)? },
        })
    }

    /// One update of `params` from `grad`, with the learning rate multiplied by
    /// `lr_scale` (a schedule's factor).
    ///
    /// # Panics
    /// If the slices and state differ in length (the trainer sizes them together).
    pub fn update(&self, lr_scale: f32, params: &mut [f32], grad: &[f32], state: &mut LayerState) {
        let start = Instant::now();
        assert_eq!(params.len(), grad.len(), "optimizer: gradient length");
        let rule = self.begin(lr_scale, state);
        let (m, v) = (&mut state.m[..], &mut state.v[..]);
        let chunks = params.par_chunks_mut(CHUNK).zip(grad.par_chunks(CHUNK));
        // A rule without moments gets empty moment slices (a zip with the
        // empty state would stop at once).
        match (m.is_empty(), v.is_empty()) {
            (true, _) => chunks.for_each(|(p, g)| rule.apply(p, g, &mut [], &mut [])),
            (false, true) => chunks.zip(m.par_chunks_mut(CHUNK)).for_each(|((p, g), m)| rule.apply(p, g, m, &mut [])),
            (false, false) => chunks
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| rule.apply(p, g, m, v)),
        }
        UPDATE_NANOS.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
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
            Optimizer::Adam { lr, beta1, beta2, eps, weight_decay } => {
                StepRule::adam(lr * lr_scale, beta1, beta2, eps, weight_decay, 0.0, state.steps)
            }
            Optimizer::AdamW { lr, beta1, beta2, eps, weight_decay } => {
                StepRule::adam(lr * lr_scale, beta1, beta2, eps, 0.0, weight_decay, state.steps)
            }
        }
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
    Adam {
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
    },
}

impl StepRule {
    fn adam(lr: f32, beta1: f32, beta2: f32, eps: f32, l2: f32, decoupled: f32, t: u64) -> Self {
        let t = t as i32;
        // A product with the reciprocal instead of PyTorch's division by
        // sqrt(bias correction): within an ulp of it, and a division fewer
        // per element.
        let inv_bc2_sqrt = 1.0 / (1.0 - beta2.powi(t)).sqrt();
        let step = lr / (1.0 - beta1.powi(t));
        StepRule::Adam { beta1, beta2, eps, l2, decay: 1.0 - lr * decoupled, step, inv_bc2_sqrt }
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
            StepRule::Adam { beta1, beta2, eps, l2, decay, step, inv_bc2_sqrt } => {
                assert!(m.len() == n && v.len() == n, "optimizer: state length");
                for (((p, &g), m), v) in params.iter_mut().zip(grad).zip(m).zip(v) {
                    let g = g + l2 * *p;
                    *m = flush(beta1 * *m + (1.0 - beta1) * g);
                    *v = flush(beta2 * *v + (1.0 - beta2) * g * g);
                    let denom = v.sqrt() * inv_bc2_sqrt + eps;
                    *p = *p * decay - step * *m / denom;
                }
            }
        }
    }
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

    fn run(opt: Optimizer, steps: usize) -> Vec<f32> {
        let mut p = vec![1.0f32, -2.0, 0.5];
        let mut state = opt.new_state(3);
        for _ in 0..steps {
            let g: Vec<f32> = p.iter().enumerate().map(|(i, &x)| grad_at(x as f64, i) as f32).collect();
            opt.update(1.0, &mut p, &g, &mut state);
        }
        p
    }

    #[test]
    fn adam_and_adamw_match_reference() {
        let adam = Optimizer::Adam { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let adamw = Optimizer::AdamW { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
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
            assert!(state.m[0] == 0.0 || state.m[0].abs() >= f32::MIN_POSITIVE);
        }
        assert_eq!(state.m[0], 0.0);
    }
}
