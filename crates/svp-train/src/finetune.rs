//! Fine-tuning a model file: the training config that continues it.

use crate::config::TrainConfig;
use crate::{Config, Method, Schedule};
use svp_model::ModelMeta;
use svp_optim::{MomentDtype, Optimizer};

/// How long and how fast a model is fine-tuned.
#[derive(Clone, Copy, Debug)]
pub struct FineTuning {
    /// SVP or backpropagation.
    pub method: Method,
    /// Passes over the new data.
    pub epochs: usize,
    /// Samples per step.
    pub batch_size: usize,
    /// Adam's peak learning rate (cosine schedule).
    pub lr: f32,
    /// Storage of Adam's moments.
    pub moments: MomentDtype,
    /// Random shifts and flips of the new training images.
    pub augment: svp_data::Augment,
    /// The first layer trained; the layers below it stay as they are
    /// ([`TrainConfig::train_from_layer`]).
    pub train_from_layer: usize,
}

/// The training config that fine-tunes the network of `meta` (an MLP, a
/// conv network or a ViT): its architecture and class count, the seed and
/// projection options of its SVP heads and its units (SVP+), so that SVP
/// puts its local losses where training did and aligns each to the same
/// `R_l` it was trained against (fresh projections ask trained
/// layers for new features: measured on the device simulator's model, 30
/// epochs ended at 80.3 % instead of 83.6 %, 10 epochs at 44.8 % instead of
/// 76.2 %). A model without heads (trained by backprop, or imported) gets
/// fresh ones from seed 11.
///
/// The weights come from the file: pass them as
/// [`crate::FitOptions::initial_params`], and the file's input
/// normalization as [`crate::FitOptions::norm`].
pub fn config(meta: &ModelMeta, run: FineTuning) -> Config {
    let mut model = meta.model_config();
    model.input = meta.front.is_none().then(|| meta.layers[0].in_dim);
    model.classes = Some(meta.classes());
    let mut config = Config {
        model,
        svp: Default::default(),
        train: TrainConfig {
            method: run.method,
            epochs: run.epochs,
            batch_size: run.batch_size,
            seed: 11,
            shuffle: true,
            augment: run.augment,
            train_from_layer: run.train_from_layer,
        },
        optimizer: Optimizer::adam(run.lr).with_moments(run.moments),
        schedule: Schedule::Cosine { warmup_steps: 0, min_factor: 0.0 },
    };
    if let Some(heads) = &meta.heads {
        config.use_projection_heads(heads);
    }
    if let Some(units) = meta.units {
        config.use_unit_layout(units);
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use svp_model::{DType, ModelFile, ModelInfo, Provenance};
    use svp_net::{ModelConfig, Network, Normalization, ProjectionHeads, UnitLayout};

    /// An SVP+ model fine-tunes in its own units, with its own projections.
    #[test]
    fn fine_tuning_keeps_the_units_and_projections() {
        let net = Network::new(6, 3, &ModelConfig::mlp(vec![5, 4, 4]), 9);
        let units = UnitLayout { layers_per_unit: 2, head_joins_last_unit: true };
        let heads = ProjectionHeads { seed: 23, dim: 3, sigma: None, dropout: 0.0, label_classes: None };
        let info = ModelInfo {
            heads: Some(heads),
            units: Some(units),
            norm: Normalization { mean: 0.3, std: 0.4 },
            image_shape: (2, 3),
            class_names: vec![],
            provenance: Provenance { method: "svp".into(), epochs: 1, test_acc: 0.5, data: "test".into() },
        };
        let file = ModelFile::from_mlp(&net, info, DType::F32);
        let run = FineTuning {
            method: Method::Svp,
            epochs: 1,
            batch_size: 4,
            lr: 1e-3,
            moments: MomentDtype::F32,
            augment: Default::default(),
            train_from_layer: 1,
        };
        let config = config(&file.meta, run);
        assert_eq!(config.unit_layout(), units);
        assert_eq!(config.train.seed, 23);
        // A plain SVP model (no units stored) fine-tunes one layer a unit.
        let mut plain = file.meta.clone();
        plain.units = None;
        assert_eq!(super::config(&plain, run).unit_layout(), UnitLayout::PLAIN);
    }
}
