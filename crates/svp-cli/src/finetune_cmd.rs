//! `svp finetune`: continue training a model file on new data.

use crate::cli::{FinetuneArgs, MethodArg};
use crate::error::CliError;
use crate::train_cmd::{Outputs, check_writable, data_source, train};
use svp_model::ModelFile;
use svp_optim::MomentDtype;
use svp_train::finetune::{self, FineTuning};
use svp_train::{FitOptions, InferenceWorkspace, Method, evaluate};

/// Runs `svp finetune`.
pub fn run(args: FinetuneArgs) -> Result<(), CliError> {
    let gpu = crate::train_cmd::probe_device(args.device)?;
    if let Some(out) = &args.out {
        check_writable(out)?;
    }
    // Read whole: `--out` may be this very file.
    let file = ModelFile::load(&args.model)?;
    let meta = &file.meta;
    let classes = meta.classes();
    let mut data = data_source(args.data.as_deref()).load_with(Some(classes))?;
    let (h, w) = (meta.image_shape.0 as usize, meta.image_shape.1 as usize);
    if data.train.image_shape != (h, w) {
        let (dh, dw) = data.train.image_shape;
        return Err(CliError::ModelMismatch(format!("the model takes {h}x{w} images, the data has {dh}x{dw}")));
    }
    if let Some(n) = args.limit_train {
        let n = n.min(data.train.len());
        data.train.labels.truncate(n);
        data.train.images.truncate(n * h * w);
        data.origin = format!("{} (first {n} training samples)", data.origin);
    }
    let method = match args.method {
        Some(MethodArg::Svp) => Method::Svp,
        Some(MethodArg::Bp) => Method::Bp,
        None if meta.provenance.method == "svp" && meta.heads.is_some() => Method::Svp,
        None => Method::Bp,
    };
    let mut augment = svp_data::Augment::default();
    crate::train_cmd::apply_augment(&mut augment, args.augment_shift, args.augment_flip);
    let run = FineTuning {
        method,
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        moments: MomentDtype::F32,
        augment,
        train_from_layer: args.train_from_layer,
    };
    let config = finetune::config(meta, run);
    let layers = config.model.layer_count();
    if !(1..=layers).contains(&args.train_from_layer) {
        return Err(CliError::ModelMismatch(format!(
            "--train-from-layer {}: the model has layers 1 to {layers} (the head is layer {layers})",
            args.train_from_layer
        )));
    }
    let validation =
        crate::train_cmd::hold_out(&mut data, args.val_split, args.keep, args.out.as_deref(), config.train.seed)?;
    config.validate_for_data(&data)?;
    let network = file.to_network();
    let before = evaluate(&network, &data.test, meta.norm, 256, None, &mut InferenceWorkspace::default()).accuracy;
    eprintln!(
        "svp finetune: {} ({} weights) on {}: test accuracy before {:.2}%",
        args.model.display(),
        meta.weight_dtype().name(),
        data.origin,
        100.0 * before
    );
    eprintln!("{}", crate::train_cmd::describe(&config, &data));
    if let Some(gpu) = &gpu {
        eprintln!("on {gpu}");
    }
    let options = FitOptions {
        initial_params: Some(network.params().to_vec()),
        norm: Some(meta.norm),
        validation,
        ..Default::default()
    };
    let outputs = Outputs {
        out: args.out.clone(),
        class_names: meta.class_names.clone(),
        checkpoint: None,
        json: args.json,
        max_memory: args.max_memory,
        keep_best: args.keep == crate::cli::Keep::Best,
    };
    // Only the weights go on: the file's bytes and the f32 network are freed.
    drop(network);
    drop(file);
    let after = train(&config, &data, options, outputs, args.device.into())?;
    if let Some(after) = after {
        eprintln!(
            "fine-tuned {} for {} epoch(s) with {}: test accuracy {:.2}% -> {:.2}% ({:+.2} points)",
            args.model.display(),
            args.epochs,
            config.train.method,
            100.0 * before,
            100.0 * after,
            100.0 * (after - before)
        );
    }
    Ok(())
}
