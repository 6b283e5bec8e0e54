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
//!
//! ```
//! use svp_optim::Optimizer;
//!
//! let adam = Optimizer::adam(1e-3);
//! let (mut weights, gradient) = (vec![1.0f32; 4], vec![0.5f32; 4]);
//! let mut state = adam.try_new_state(weights.len()).unwrap();
//! adam.update(1.0, &mut weights, &gradient, &mut state);
//! assert!(weights.iter().all(|&w| (w - 0.999).abs() < 1e-6)); // Adam's first step: lr * sign
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

#[cfg(feature = "clock")]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(feature = "clock")]
use std::time::Duration;

/// Wall time spent in [`Optimizer::update`] since the last [`reset_update_clock`], in ns.
#[cfg(feature = "clock")]
pub(crate) static UPDATE_NANOS: AtomicU64 = AtomicU64::new(0);

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

mod optimizer;
mod rule;
mod state;
#[cfg(test)]
mod tests;
mod update;

pub use optimizer::{MomentDtype, Optimizer};
pub use rule::AdamStep;
pub use state::{LayerState, Moments};
pub use update::{LayerUpdate, WeightRows};
