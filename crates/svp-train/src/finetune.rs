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
/// conv network or a ViT): its architecture and class count, and the seed
/// and projection options of its SVP heads, so that SVP aligns each layer to
/// the same `R_l` it was trained against (fresh projections ask trained
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
    config
}
