//! `svp eval`, `svp predict`, `svp export`, `svp info`: everything that reads a model file.

use crate::cli::{EvalArgs, ExportArgs, InfoArgs, PredictArgs};
use crate::error::CliError;
use crate::train_cmd::data_source;
use serde_json::json;
use std::io::Write;
use std::path::Path;
use std::time::Instant;
use svp_data::{Batcher, Dataset};
use svp_model::{DType, InferenceModel, InferenceWorkspace, ModelFile};
use svp_train::argmax;

fn mismatch(msg: String) -> CliError {
    CliError::ModelMismatch(msg)
}

fn check_images(model: &InferenceModel, data: &Dataset) -> Result<(), CliError> {
    let (h, w) = model.meta().image_shape;
    if data.image_shape != (h as usize, w as usize) {
        let (dh, dw) = data.image_shape;
        return Err(mismatch(format!("the model takes {h}x{w} images, the data has {dh}x{dw}")));
    }
    Ok(())
}

fn check_exit(model: &InferenceModel, exit: Option<usize>) -> Result<(), CliError> {
    if let Some(k) = exit {
        if model.meta().heads.is_none() {
            return Err(mismatch(
                "early exits need a model trained with SVP (this one has no projection heads)".into(),
            ));
        }
        if k == 0 || k > model.hidden_layers() {
            return Err(mismatch(format!(
                "--exit-layer {k}: the model has hidden layers 1..={}",
                model.hidden_layers()
            )));
        }
    }
    Ok(())
}

/// Accuracy and wall time of one exit (`None` = the head) over a data set.
fn accuracy(model: &InferenceModel, data: &Dataset, exit: Option<usize>, ws: &mut InferenceWorkspace) -> (f64, f64) {
    let batch = 256;
    let mut batcher = Batcher::new(data.len(), batch, model.meta().norm.table());
    batcher.start_epoch(0, 0, false);
    let mut x = vec![0.0; batch * data.features()];
    let mut y = vec![0u32; batch];
    let start = Instant::now();
    let mut correct = 0;
    for b in 0..batcher.batches() {
        let rows = batcher.gather(data, b, &mut x, &mut y);
        let logits = model.predict(&x, rows, exit, ws);
        let width = logits.len() / rows;
        for (row, &label) in logits.chunks_exact(width).zip(&y[..rows]) {
            correct += usize::from(argmax(row) == label as usize);
        }
    }
    (correct as f64 / data.len().max(1) as f64, start.elapsed().as_secs_f64())
}

/// Runs `svp eval` on a GPU: the model widened to f32 and run forward
/// there, batch by batch.
fn run_on_device(args: &EvalArgs, gpu: svp_cuda::DeviceInfo) -> Result<(), CliError> {
    if args.exits {
        return Err(svp_train::ConfigError::Invalid("--exits runs on the CPU: drop --device or --exits".into()).into());
    }
    let file = ModelFile::load(&args.model)?;
    let data = data_source(args.data.as_deref()).load_with(Some(file.meta.classes()))?;
    let (h, w) = file.meta.image_shape;
    if data.test.image_shape != (h as usize, w as usize) {
        let (dh, dw) = data.test.image_shape;
        return Err(mismatch(format!("the model takes {h}x{w} images, the data has {dh}x{dw}")));
    }
    let (network, norm) = (file.to_network(), file.meta.norm);
    let start = std::time::Instant::now();
    let report = svp_train::device::evaluate_on(args.device.into(), &network, &data.test, norm, 256)?;
    let seconds = start.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            json!({
                "test_acc": report.accuracy,
                "samples": data.test.len(),
                "seconds": seconds,
                "dtype": file.meta.weight_dtype().name(),
                "device": args.device.to_string(),
            })
        );
    } else {
        println!(
            "{}: test accuracy {:.2}% on {} samples from {} in {:.3} s on {gpu}",
            args.model.display(),
            100.0 * report.accuracy,
            data.test.len(),
            data.origin,
            seconds,
        );
    }
    Ok(())
}

/// Runs `svp eval`.
pub fn run(args: EvalArgs) -> Result<(), CliError> {
    if let Some(gpu) = crate::train_cmd::probe_device(args.device)? {
        return run_on_device(&args, gpu);
    }
    let model = InferenceModel::load(&args.model)?;
    // A label beyond the model's classes is an error naming it.
    let data = data_source(args.data.as_deref()).load_with(Some(model.meta().classes()))?;
    check_images(&model, &data.test)?;
    let mut ws = InferenceWorkspace::default();
    let (acc, seconds) = accuracy(&model, &data.test, None, &mut ws);
    let exits: Vec<(f64, f64)> = if args.exits && model.meta().heads.is_some() {
        (1..=model.hidden_layers()).map(|k| accuracy(&model, &data.test, Some(k), &mut ws)).collect()
    } else {
        Vec::new()
    };
    if args.json {
        println!(
            "{}",
            json!({
                "test_acc": acc,
                "samples": data.test.len(),
                "seconds": seconds,
                "dtype": model.meta().weight_dtype().name(),
                "exit_test_acc": exits.iter().map(|e| e.0).collect::<Vec<_>>(),
                "exit_seconds": exits.iter().map(|e| e.1).collect::<Vec<_>>(),
            })
        );
    } else {
        println!(
            "{}: test accuracy {:.2}% on {} samples from {} in {:.3} s ({} weights)",
            args.model.display(),
            100.0 * acc,
            data.test.len(),
            data.origin,
            seconds,
            model.meta().weight_dtype().name()
        );
        for (k, (a, t)) in exits.iter().enumerate() {
            println!("  exit at layer {}: {:.2}% in {:.3} s", k + 1, 100.0 * a, t);
        }
        if args.exits && model.meta().heads.is_none() {
            println!("  (no early exits: the model was not trained with SVP)");
        }
    }
    Ok(())
}

/// Reads `--input`: an IDX image file (raw or .gz), or raw little-endian f32
/// values already normalized, `features` per sample.
fn read_input(path: &Path, features: usize, image_shape: (u32, u32)) -> Result<(Vec<f32>, usize, bool), CliError> {
    let bytes = std::fs::read(path).map_err(|source| svp_data::DataError::Io { path: path.to_owned(), source })?;
    let is_idx = bytes.starts_with(&[0x1f, 0x8b]) || bytes.starts_with(&[0, 0, 8]);
    if is_idx {
        let a = svp_data::idx::parse_idx(&bytes, path)?;
        let per: usize = a.dims.iter().skip(1).product();
        let (h, w) = image_shape;
        if a.dims.len() != 3 {
            // A labels file (one dimension) or some other array: say what it holds.
            let dims = a.dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(" x ");
            return Err(mismatch(format!(
                "{} is not an IDX file of images (count x rows x cols) but an array of {} dimension(s) ({dims}); \
                 the model takes {h}x{w} images",
                path.display(),
                a.dims.len()
            )));
        }
        if (a.dims[1] as u32, a.dims[2] as u32) != image_shape {
            return Err(mismatch(format!(
                "{} holds {}x{} images; the model takes {h}x{w}",
                path.display(),
                a.dims[1],
                a.dims[2]
            )));
        }
        let n = a.dims[0];
        Ok((a.data.iter().map(|&p| p as f32).collect(), n.min(a.data.len() / per.max(1)), true))
    } else {
        if bytes.len() % (4 * features) != 0 || bytes.is_empty() {
            return Err(mismatch(format!(
                "{} is neither an IDX file nor raw f32 samples of {features} values ({} bytes)",
                path.display(),
                bytes.len()
            )));
        }
        let values: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if values.iter().any(|v| !v.is_finite()) {
            return Err(mismatch(format!("{} contains non-finite values", path.display())));
        }
        let n = values.len() / features;
        Ok((values, n, false))
    }
}

/// Runs `svp predict`: one line per sample, `index<TAB>class<TAB>name`.
pub fn predict(args: PredictArgs) -> Result<(), CliError> {
    let model = InferenceModel::load(&args.model)?;
    check_exit(&model, args.exit_layer)?;
    let meta = model.meta();
    let features = meta.image_shape.0 as usize * meta.image_shape.1 as usize;
    let (values, n, pixels) = match &args.input {
        Some(path) => read_input(path, features, meta.image_shape)?,
        None => {
            let data = data_source(args.data.as_deref()).load_with(Some(meta.classes()))?;
            check_images(&model, &data.test)?;
            (data.test.images.iter().map(|&p| p as f32).collect(), data.test.len(), true)
        }
    };
    let norm = meta.norm;
    let x: Vec<f32> =
        if pixels { values.iter().map(|&p| (p / 255.0 - norm.mean) / norm.std).collect() } else { values };
    let mut ws = InferenceWorkspace::default();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let batch = 256;
    for start in (0..n).step_by(batch) {
        let rows = batch.min(n - start);
        let logits = model.predict(&x[start * features..(start + rows) * features], rows, args.exit_layer, &mut ws);
        let width = logits.len() / rows;
        for (i, row) in logits.chunks_exact(width).enumerate() {
            let c = argmax(row);
            let _ = writeln!(out, "{}\t{c}\t{}", start + i, meta.class_names.get(c).map_or("", String::as_str));
        }
    }
    Ok(())
}

/// Runs `svp export`: the same model with its weights as another dtype.
pub fn export(args: ExportArgs) -> Result<(), CliError> {
    if args.format == crate::cli::ExportFormat::Safetensors {
        return crate::import_cmd::export_safetensors(&args);
    }
    let Some(name) = args.dtype.as_deref() else {
        return Err(svp_train::ConfigError::Invalid(
            "give --dtype f32, f16, bf16 or int8 (or --format safetensors for PyTorch)".into(),
        )
        .into());
    };
    let dtype = DType::parse(name)
        .ok_or_else(|| svp_train::ConfigError::Invalid(format!("--dtype {name}: use f32, f16, bf16 or int8")))?;
    crate::train_cmd::check_writable(&args.out)?;
    let file = ModelFile::load(&args.model)?;
    let converted = file.convert(dtype);
    converted.save(&args.out)?;
    let (before, after) = (file.to_bytes().len(), converted.to_bytes().len());
    eprintln!(
        "wrote {} ({} weights): {} bytes, {:.1} % of the {}-byte {} file",
        args.out.display(),
        dtype.name(),
        after,
        100.0 * after as f64 / before as f64,
        before,
        file.meta.weight_dtype().name()
    );
    Ok(())
}

/// Runs `svp info`.
pub fn info(args: InfoArgs) -> Result<(), CliError> {
    use svp_optim::Moments;
    let bytes =
        std::fs::read(&args.model).map_err(|source| svp_model::ModelError::Io { path: args.model.clone(), source })?;
    if bytes.starts_with(&svp_train::checkpoint::CHECKPOINT_MAGIC) {
        let c = svp_train::Checkpoint::from_bytes(&bytes, &args.model)?;
        let s = &c.state;
        println!(
            "{}: svp checkpoint, {} bytes: epoch {}, next batch {}, step {}, {} parameters, trained on {} ({} samples)",
            args.model.display(),
            bytes.len(),
            s.epoch,
            s.next_batch,
            s.trainer.step,
            s.params.len(),
            c.data_origin,
            c.train_len
        );
        let moments = s.trainer.optimizer.iter().map(|l| &l.moments);
        let kind = match moments.clone().next() {
            None | Some(Moments::None) => "none (plain SGD)",
            Some(Moments::Momentum(_)) => "f32 momentum (SGD)",
            Some(Moments::F32 { .. }) => "f32 (Adam)",
            Some(Moments::Bf16 { .. }) => "bf16 (Adam)",
        };
        println!("  optimizer moments: {kind}, {} bytes", moments.map(Moments::bytes).sum::<usize>());
        for (epoch, loss, acc) in &s.history {
            println!("  epoch {epoch}: train loss {loss:.4}, test accuracy {:.2}%", 100.0 * acc);
        }
        return Ok(());
    }
    let file = ModelFile::from_bytes(&bytes, &args.model)?;
    let m = &file.meta;
    let widths: Vec<String> =
        std::iter::once(m.layers[0].in_dim).chain(m.layers.iter().map(|l| l.out_dim)).map(|w| w.to_string()).collect();
    let eps = m.vit_norm_eps.map(|e| format!(", LayerNorm eps {e:e}")).unwrap_or_default();
    let front = m.front.as_ref().map(|f| format!("{}{eps}", describe_front(f)));
    let architecture = match &front {
        Some(f) => format!("{f} -> {}", widths.join("-")),
        None => widths.join("-"),
    };
    let params: usize = m.tensors.iter().map(|t| t.shape.iter().map(|&d| d as usize).product::<usize>()).sum();
    if args.json {
        println!(
            "{}",
            json!({
                "file_bytes": bytes.len(),
                "format_version": file.version(),
                "architecture": architecture,
                "parameters": params,
                "weight_dtype": m.weight_dtype().name(),
                "image_shape": [m.image_shape.0, m.image_shape.1],
                "classes": m.class_names,
                "method": m.provenance.method,
                "epochs": m.provenance.epochs,
                "test_acc": m.provenance.test_acc,
                "data": m.provenance.data,
                "generator": m.generator,
                "projection_seed": m.heads.as_ref().map(|h| h.seed),
                "projection_dim": m.heads.as_ref().map(|h| h.dim),
                "layers_per_unit": m.units.map_or(1, |u| u.layers_per_unit),
            })
        );
        return Ok(());
    }
    let l0 = &m.layers[0];
    println!("{}: svp model file, format version {}, {} bytes", args.model.display(), file.version(), bytes.len());
    if m.layers.len() > 1 {
        println!(
            "  network      {architecture} ({:?} + {:?} hidden blocks, {params} parameters)",
            l0.norm, l0.activation
        );
    } else {
        println!("  network      {architecture} ({params} parameters)");
    }
    println!("  weights      {} (biases and LayerNorm f32)", m.weight_dtype().name());
    if let Some(t) = m.tensors.iter().find(|t| t.role == svp_model::Role::Params) {
        println!("  front        {} (conv or transformer parameters, flat per layer)", t.dtype.name());
    }
    println!(
        "  input        {}x{} images, normalized with mean {:.4} std {:.4}",
        m.image_shape.0, m.image_shape.1, m.norm.mean, m.norm.std
    );
    println!("  classes      {}", m.class_names.join(", "));
    if m.provenance.method == "imported" {
        println!("  trained      elsewhere: {}", m.provenance.data);
    } else {
        println!(
            "  trained      {} for {} epochs on {}; test accuracy {:.2}%",
            m.provenance.method,
            m.provenance.epochs,
            m.provenance.data,
            100.0 * m.provenance.test_acc
        );
    }
    match &m.heads {
        Some(h) => println!(
            "  projections  seed {}, d' = {}, sigma {}, regenerated by {} (never stored)",
            h.seed,
            h.dim,
            h.sigma.map_or("1/sqrt(width)".to_string(), |s| s.to_string()),
            m.generator
        ),
        None => println!("  projections  none (trained with backpropagation: no early exits)"),
    }
    if let Some(u) = m.units {
        let head = if u.head_joins_last_unit { ", the head in the last" } else { "" };
        println!("  units        SVP+: up to {} layers of a kind a unit{head}", u.layers_per_unit);
    }
    Ok(())
}

/// `conv(32-32-M-64)` or `vit(patch 7, dim 128, 6 blocks, 4 heads, mlp 256, cls)`.
pub(crate) fn describe_front(front: &svp_model::Front) -> String {
    match front {
        svp_model::Front::Conv { blocks, readout } => {
            let items: Vec<String> =
                blocks.iter().map(|&(c, pool)| if pool { format!("{c}-M") } else { c.to_string() }).collect();
            format!("conv({}, readout {readout}x{readout})", items.join("-"))
        }
        svp_model::Front::Mobile { conv, blocks, readout } => {
            let stem: Vec<String> =
                conv.iter().map(|&(c, pool)| if pool { format!("{c}-M") } else { c.to_string() }).collect();
            let mobile: Vec<String> = blocks.iter().map(|&(c, e, s)| format!("{c}x{e}/{s}")).collect();
            format!("conv({}) mobile({}, readout {readout}x{readout})", stem.join("-"), mobile.join("-"))
        }
        &svp_model::Front::Vit { patch, dim, depth, heads, mlp, mean_readout } => format!(
            "vit(patch {patch}, dim {dim}, {depth} blocks, {heads} heads, mlp {mlp}, {})",
            if mean_readout { "mean" } else { "cls" }
        ),
    }
}
