//! Helpers shared by the integration tests.

#![warn(missing_docs)]

use svp_train::Config;
use svp_train::config::{ModelConfig, SvpConfig, TrainConfig};

/// A small but real run: 784-256-256-10 with LayerNorm + ReLU, Adam.
pub fn small_config(method: svp_train::Method, epochs: usize) -> Config {
    Config {
        model: ModelConfig::mlp(vec![256, 256]),
        svp: SvpConfig::default(),
        train: TrainConfig { method, epochs, batch_size: 64, seed: 7, shuffle: true, ..Default::default() },
        optimizer: svp_optim::Optimizer::adam(1e-3),
        schedule: svp_train::Schedule::Cosine { warmup_steps: 0, min_factor: 0.0 },
    }
}

/// The embedded Fashion-MNIST subset, cut to the first `n` training samples.
pub fn embedded_subset(n: usize) -> svp_data::DataSplit {
    let mut data = svp_data::DataSplit::embedded();
    let f = data.features();
    data.train.labels.truncate(n);
    data.train.images.truncate(n * f);
    data
}
