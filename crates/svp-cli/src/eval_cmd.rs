//! `svp eval`.

use crate::cli::EvalArgs;
use crate::error::CliError;
use crate::train_cmd::data_source;
use serde_json::json;
use std::time::Instant;
use svp_model::ModelFile;
use svp_train::{InferenceWorkspace, evaluate};

/// Runs `svp eval`.
pub fn run(args: EvalArgs) -> Result<(), CliError> {
    let file = ModelFile::load(&args.model)?;
    let data = data_source(args.data.as_deref()).load()?;
    if data.test.image_shape != file.image_shape {
        return Err(svp_train::ConfigError::DataMismatch(format!(
            "the model takes {:?} images, the data has {:?}",
            file.image_shape, data.test.image_shape
        ))
        .into());
    }
    let model = file.to_mlp();
    if data.classes > model.classes() {
        return Err(svp_train::ConfigError::DataMismatch(format!(
            "the model has {} classes, the data has {}",
            model.classes(),
            data.classes
        ))
        .into());
    }
    let exits = if args.exits { file.heads.as_ref() } else { None };
    let start = Instant::now();
    let report = evaluate(&model, &data.test, file.norm, 256, exits, &mut InferenceWorkspace::default());
    let seconds = start.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            json!({
                "test_acc": report.accuracy,
                "test_loss": report.loss,
                "samples": data.test.len(),
                "seconds": seconds,
                "exit_test_acc": report.exit_accuracy,
            })
        );
    } else {
        println!(
            "{}: test accuracy {:.2}% (loss {:.4}) on {} samples from {} in {:.2} s",
            args.model.display(),
            100.0 * report.accuracy,
            report.loss,
            data.test.len(),
            data.origin,
            seconds
        );
        for (l, a) in report.exit_accuracy.iter().enumerate() {
            println!("  exit at layer {}: {:.2}%", l + 1, 100.0 * a);
        }
        if args.exits && file.heads.is_none() {
            println!("  (no early exits: the model was not trained with SVP)");
        }
    }
    Ok(())
}
