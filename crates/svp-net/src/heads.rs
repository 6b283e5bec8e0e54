//! SVP's projection heads: what regenerates every layer's `R_l` from a seed.

use serde::{Deserialize, Serialize};
use svp_nn::Projection;

/// The SVP projection heads of a model: enough to regenerate every `R_l`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProjectionHeads {
    /// Model seed.
    pub seed: u64,
    /// Projection width `d'`.
    pub dim: usize,
    /// Entry standard deviation; `None` = `1/sqrt(d_l)` per layer.
    pub sigma: Option<f32>,
    /// Dropout on the entries during training.
    pub dropout: f32,
    /// Label-concatenation variant (`Some(classes)`).
    pub label_classes: Option<usize>,
}

/// How SVP grouped a model's layers into units (SVP+): where its local
/// losses sit, and so which `R_l` its layers were trained against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitLayout {
    /// Consecutive layers of a kind trained together (`svp.layers_per_unit`).
    pub layers_per_unit: u32,
    /// Whether the classifier head joined the last unit (`svp.head_joins_last_unit`).
    pub head_joins_last_unit: bool,
}

impl UnitLayout {
    /// Plain SVP: every layer its own unit, the head alone.
    pub const PLAIN: UnitLayout = UnitLayout { layers_per_unit: 1, head_joins_last_unit: false };
}

impl ProjectionHeads {
    /// Projection of layer `layer` (0 = input) of width `width`.
    pub fn for_layer(&self, layer: usize, width: usize, with_labels: bool) -> Projection {
        Projection {
            seed: self.seed,
            layer: layer as u64,
            in_dim: width,
            out_dim: self.dim,
            sigma: self.sigma.unwrap_or(1.0 / (width as f32).sqrt()),
            dropout: self.dropout,
            label_classes: if with_labels { self.label_classes } else { None },
        }
    }
}
