//! The optimizer state a layer keeps between steps (what a checkpoint saves).

use serde::{Deserialize, Serialize};

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
