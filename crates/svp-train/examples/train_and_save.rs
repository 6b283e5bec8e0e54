//! Train an MLP with SVP from Rust and save it as a model file.
//!
//!     cargo run --release -p svp-train --example train_and_save -- mlp.svpm

use svp_data::DataSplit;
use svp_model::{DType, ModelFile, ModelInfo, Provenance};
use svp_optim::Optimizer;
use svp_train::config::{ModelConfig, SvpConfig, TrainConfig};
use svp_train::{Config, Method, fit};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "mlp.svpm".into());
    // The Fashion-MNIST subset compiled into svp: 6,000 training images.
    let data = DataSplit::embedded();
    let config = Config {
        model: ModelConfig::mlp(vec![256, 256]),
        svp: SvpConfig::default(),
        train: TrainConfig { method: Method::Svp, epochs: 2, ..TrainConfig::default() },
        optimizer: Optimizer::adam(1e-3),
        schedule: Default::default(),
    };
    config.validate_for_data(&data)?;
    // `()` observes nothing; an observer gets every step, epoch and checkpoint.
    let outcome = fit(&config, &data, &mut ());
    let last = outcome.epochs.last().expect("two epochs ran");
    println!("test accuracy after {} epochs: {:.2}%", last.epoch, 100.0 * last.test_acc);
    let info = ModelInfo {
        heads: outcome.heads,
        units: outcome.units,
        norm: outcome.norm,
        image_shape: data.train.image_shape,
        class_names: data.class_names(),
        provenance: Provenance { method: "svp".into(), epochs: last.epoch, test_acc: last.test_acc, data: data.origin },
    };
    ModelFile::save_network(out.as_ref(), &outcome.model, &config.model, info, DType::F32)?;
    println!("saved {out}");
    Ok(())
}
