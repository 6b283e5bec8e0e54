//! Learning-rate schedules.

use serde::{Deserialize, Serialize};

/// Multiplier applied to the optimizer's learning rate at each step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Schedule {
    /// Always 1 (after warm-up).
    Constant {
        /// Linear warm-up from 0 over this many steps.
        #[serde(default)]
        warmup_steps: u64,
    },
    /// Cosine decay from 1 to `min_factor` over the run (after warm-up).
    Cosine {
        /// Linear warm-up from 0 over this many steps.
        #[serde(default)]
        warmup_steps: u64,
        /// Final multiplier.
        #[serde(default)]
        min_factor: f32,
    },
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::Constant { warmup_steps: 0 }
    }
}

impl Schedule {
    /// The multiplier at `step` (0-based) of `total` steps.
    pub fn factor(&self, step: u64, total: u64) -> f32 {
        let (warmup, tail) = match *self {
            Schedule::Constant { warmup_steps } => (warmup_steps, None),
            Schedule::Cosine { warmup_steps, min_factor } => (warmup_steps, Some(min_factor)),
        };
        if step < warmup {
            return (step + 1) as f32 / warmup as f32;
        }
        match tail {
            None => 1.0,
            Some(min) => {
                let span = total.saturating_sub(warmup).max(1) as f64;
                let t = ((step - warmup) as f64 / span).min(1.0);
                let c = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
                (min as f64 + (1.0 - min as f64) * c) as f32
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_and_cosine() {
        let s = Schedule::Cosine { warmup_steps: 10, min_factor: 0.1 };
        assert!((s.factor(0, 110) - 0.1).abs() < 1e-6);
        assert!((s.factor(9, 110) - 1.0).abs() < 1e-6);
        assert!((s.factor(10, 110) - 1.0).abs() < 1e-6);
        assert!((s.factor(60, 110) - 0.55).abs() < 1e-6);
        assert!((s.factor(110, 110) - 0.1).abs() < 1e-6);
        assert_eq!(Schedule::default().factor(5, 10), 1.0);
    }
}
