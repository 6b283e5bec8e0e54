//! `svp train`.

use crate::cli::{MethodArg, TrainArgs};
use crate::error::CliError;
use crate::mem::peak_rss_kib;
use crate::progress::ProgressLine;
use serde_json::json;
use std::path::{Path, PathBuf};
use svp_data::{DataSource, DataSplit};
use svp_model::{DType, ModelFile, ModelInfo, Provenance};
use svp_optim::Optimizer;
use svp_train::device::TrainOn;
use svp_train::{Checkpoint, CheckpointRef};
use svp_train::{Config, EpochModel, EpochReport, Method};
use svp_train::{FitError, FitObserver, FitOptions, FitStateRef, Progress, try_fit_on};

/// The config `svp train` uses without `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("../../../models/mlp-fmnist.toml");

/// Parses a run description; errors name the line.
pub fn parse_config(text: &str, path: &Path) -> Result<Config, CliError> {
    parse_toml(text, path)
}

/// Parses a TOML file into `T`; errors name the line.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T, CliError> {
    toml::from_str::<T>(text).map_err(|e| {
        // The line holding the span's first byte (a span at the start of a
        // line follows that many newlines).
        let line =
            e.span().map(|s| text.as_bytes()[..s.start.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1);
        let message = e.message().replace('\n', " ");
        CliError::ConfigParse {
            path: path.to_owned(),
            message: match line {
                Some(l) => format!("line {l}: {message}"),
                None => message,
            },
        }
    })
}

/// Resolves `--data`: `embedded`, a folder, or the default search.
pub fn data_source(arg: Option<&Path>) -> DataSource {
    match arg {
        Some(p) if p == Path::new("embedded") => DataSource::Embedded,
        other => DataSource::resolve(other),
    }
}

/// Reads and parses a config file (not yet validated).
pub fn read_config(path: &Path) -> Result<Config, CliError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| CliError::ConfigRead { path: path.to_path_buf(), source })?;
    parse_config(&text, path)
}

fn load_config(args: &TrainArgs) -> Result<Config, CliError> {
    let mut config = match &args.config {
        Some(path) => read_config(path)?,
        None => parse_config(DEFAULT_CONFIG, Path::new("<built-in models/mlp-fmnist.toml>"))?,
    };
    if let Some(m) = args.method {
        config.train.method = match m {
            MethodArg::Svp => Method::Svp,
            MethodArg::Bp => Method::Bp,
        };
    }
    if let Some(e) = args.epochs {
        config.train.epochs = e;
    }
    if let Some(s) = args.seed {
        config.train.seed = s;
    }
    if let Some(b) = args.batch_size {
        config.train.batch_size = b;
    }
    apply_augment(&mut config.train.augment, args.augment_shift, args.augment_flip);
    if let Some(lr) = args.lr {
        match &mut config.optimizer {
            Optimizer::Sgd { lr: l, .. } | Optimizer::Adam { lr: l, .. } | Optimizer::AdamW { lr: l, .. } => *l = lr,
        }
    }
    config.validate()?;
    Ok(config)
}

/// `--augment-shift` and `--augment-flip` over the config's `augment`.
pub fn apply_augment(augment: &mut svp_data::Augment, shift: Option<usize>, flip: bool) {
    if let Some(s) = shift {
        augment.shift = s;
    }
    augment.flip |= flip;
}

/// Holds out `--val-split` of the training set (checked first), and checks
/// `--keep best` has a validation set and a file to keep.
pub fn hold_out(
    data: &mut DataSplit,
    fraction: Option<f64>,
    keep: crate::cli::Keep,
    out: Option<&Path>,
    seed: u64,
) -> Result<Option<svp_data::Dataset>, CliError> {
    let invalid = |m: String| CliError::from(svp_train::ConfigError::Invalid(m));
    if keep == crate::cli::Keep::Best && (fraction.is_none() || out.is_none()) {
        return Err(invalid("--keep best needs --val-split (what is best) and --out (where to keep it)".into()));
    }
    let Some(f) = fraction else { return Ok(None) };
    if !(f > 0.0 && f < 1.0) {
        return Err(invalid(format!("--val-split {f}: give a fraction between 0 and 1")));
    }
    let val = svp_data::split_validation(&mut data.train, f, seed);
    if val.is_empty() {
        return Err(invalid(format!("--val-split {f} holds out no sample of {}", data.train.len())));
    }
    data.origin = format!("{} ({} held out for validation)", data.origin, val.len());
    Ok(Some(val))
}

/// Fails early, before any training, if `path` cannot be written.
pub fn check_writable(path: &Path) -> Result<(), CliError> {
    let fail = |reason: String| CliError::Output { path: path.to_owned(), reason };
    if path.is_dir() {
        return Err(fail("it is a folder".into()));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(fail(format!("folder {} does not exist", dir.display())));
    }
    let probe = dir.join(format!(".svp-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| fail(e.to_string()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

pub fn describe(config: &Config, data: &DataSplit) -> String {
    let (h, w) = data.train.image_shape;
    let mlp = config.model.conv.is_empty() && config.model.mobile.is_empty() && config.model.vit.is_none();
    let input = if mlp { data.features().to_string() } else { format!("{h}x{w}") };
    let convs = config.model.conv.iter().map(|item| match item {
        svp_train::config::ConvItem::Channels(c) => format!("c{c}"),
        svp_train::config::ConvItem::Pool(_) => "M".to_string(),
    });
    let mobile = config.model.mobile.iter().map(|m| format!("mb{}x{}/{}", m.channels, m.expansion, m.stride));
    let vit = config.model.vit.iter().map(|v| {
        format!(
            "vit(patch {}, dim {}, {} blocks, {} heads, mlp {}, {:?})",
            v.patch, v.dim, v.depth, v.heads, v.mlp, v.readout
        )
        .to_lowercase()
    });
    let widths: Vec<String> = std::iter::once(input)
        .chain(convs)
        .chain(mobile)
        .chain(vit)
        .chain(config.model.hidden.iter().map(|w| w.to_string()))
        .chain([data.classes.to_string()])
        .collect();
    format!(
        "svp train: method {}, network {}{}, {} train / {} test samples from {}, batch {}, {}, {}, {} threads, {} kernels",
        config.train.method,
        widths.join("-"),
        match config.train.train_from_layer {
            1 => String::new(),
            2 => " (layer 1 frozen)".to_string(),
            k => format!(" (layers 1-{} frozen)", k - 1),
        },
        data.train.len(),
        data.test.len(),
        data.origin,
        if config.train.batch_size > data.train.len() {
            format!("{} (all of the training set; {} asked)", data.train.len(), config.train.batch_size)
        } else {
            config.train.batch_size.to_string()
        },
        plural(config.train.epochs, "epoch"),
        describe_optimizer(&config.optimizer),
        rayon::current_num_threads(),
        svp_tensor::cpu::selected()
    )
}

fn describe_optimizer(optimizer: &Optimizer) -> String {
    let moments = |state: &svp_optim::MomentDtype| match state {
        svp_optim::MomentDtype::F32 => "",
        svp_optim::MomentDtype::Bf16 => " (bf16 moments)",
    };
    match optimizer {
        Optimizer::Sgd { lr, momentum, .. } if *momentum != 0.0 => format!("SGD lr {lr} momentum {momentum}"),
        Optimizer::Sgd { lr, .. } => format!("SGD lr {lr}"),
        Optimizer::Adam { lr, state, .. } => format!("Adam lr {lr}{}", moments(state)),
        Optimizer::AdamW { lr, state, .. } => format!("AdamW lr {lr}{}", moments(state)),
    }
}

fn epoch_json(r: &EpochReport) -> serde_json::Value {
    let mut v = json!({
        "epoch": r.epoch,
        "train_loss": r.train_loss,
        "test_acc": r.test_acc,
        "seconds": r.seconds,
        "samples_per_s": r.samples_per_s,
    });
    if let Some(l) = &r.layers {
        v["layer_ce"] = json!(l.ce);
        v["layer_fa"] = json!(l.fa);
        v["layer_train_acc"] = json!(l.train_acc);
        v["exit_test_acc"] = json!(l.exit_test_acc);
    }
    if let Some(acc) = r.val_acc {
        v["val_acc"] = json!(acc);
    }
    v
}

fn epoch_text(r: &EpochReport) -> String {
    let mut s = format!(
        "epoch {:>3}  train_loss {:.4}  test_acc {:.2}%  {:.1} s  {:.0} samples/s",
        r.epoch,
        r.train_loss,
        100.0 * r.test_acc,
        r.seconds,
        r.samples_per_s
    );
    if let Some(acc) = r.val_acc {
        s.push_str(&format!("  val_acc {:.2}%", 100.0 * acc));
    }
    if let Some(l) = &r.layers
        && !l.exit_test_acc.is_empty()
    {
        let exits: Vec<String> = l.exit_test_acc.iter().map(|a| format!("{:.1}", 100.0 * a)).collect();
        s.push_str(&format!("  exits {}", exits.join("/")));
    }
    s
}

/// Where `--out` goes and what its model files record besides the weights.
struct ModelTarget {
    path: PathBuf,
    config: svp_train::config::ModelConfig,
    image_shape: (usize, usize),
    class_names: Vec<String>,
    method: Method,
    data_origin: String,
}

impl ModelTarget {
    /// Writes the model an epoch left (atomically: the file holds the last
    /// epoch's model or the one before it, never a mix).
    fn save(&self, report: &EpochReport, model: EpochModel<'_>) -> Result<(), svp_model::ModelError> {
        let info = ModelInfo {
            heads: model.heads.cloned(),
            units: model.units,
            norm: model.norm,
            image_shape: self.image_shape,
            class_names: self.class_names.clone(),
            provenance: Provenance {
                method: self.method.to_string(),
                epochs: report.epoch,
                test_acc: report.test_acc,
                data: self.data_origin.clone(),
            },
        };
        // Streamed from the trainer's weights: no copy of them is made.
        ModelFile::save_network(&self.path, model.network, &self.config, info, DType::F32)
    }
}

/// Progress on stderr, one epoch line (text or JSON) on stdout, each epoch's
/// model to `--out`, checkpoints to a file.
struct Console {
    progress: ProgressLine,
    json: bool,
    out: Option<ModelTarget>,
    /// The last epoch whose model `out` holds.
    saved_epoch: Option<usize>,
    /// Keep only the epoch with the best validation accuracy, and that accuracy.
    keep_best: Option<f64>,
    /// Where checkpoints go, and what they record besides the state.
    checkpoint: Option<(PathBuf, String, String, u64)>,
}

/// What failed writing a file, without the path the caller names anyway.
fn write_failure(e: svp_model::ModelError) -> String {
    match e {
        svp_model::ModelError::Io { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

impl FitObserver for Console {
    fn on_step(&mut self, p: &Progress) {
        self.progress.update(p);
    }

    fn on_checkpoint(&mut self, state: &FitStateRef<'_>) -> Result<(), String> {
        let Some((path, config_json, origin, train_len)) = &self.checkpoint else {
            return Ok(());
        };
        let c = CheckpointRef { config_json, data_origin: origin, train_len: *train_len, state: *state };
        c.save(path).map_err(|e| {
            format!(
                "cannot write checkpoint {}: {}; the checkpoint before it is unchanged",
                path.display(),
                write_failure(e)
            )
        })
    }

    fn on_epoch(&mut self, r: &EpochReport, model: EpochModel<'_>) -> Result<(), String> {
        self.progress.clear();
        if self.json {
            println!("{}", epoch_json(r));
        } else {
            println!("{}", epoch_text(r));
        }
        if let (Some(best), Some(val)) = (self.keep_best, r.val_acc) {
            if self.saved_epoch.is_some() && val <= best {
                return Ok(()); // not better: the file keeps the best so far
            }
            self.keep_best = Some(val);
        }
        if let Some(out) = &self.out {
            out.save(r, model).map_err(|e| {
                let kept = match self.saved_epoch {
                    Some(k) => format!("it still holds the model after epoch {k}"),
                    None => "nothing was written".into(),
                };
                format!("cannot write model {}: {}; {kept}", out.path.display(), write_failure(e))
            })?;
            self.saved_epoch = Some(r.epoch);
        }
        Ok(())
    }
}

fn plural(n: usize, one: &str) -> String {
    if n == 1 { format!("1 {one}") } else { format!("{n} {one}s") }
}

/// Refuses to resume a run that has nothing left to do: its checkpoint
/// continues at epoch `next` (1-based), and the run asks for `epochs`.
fn check_epochs_left(next: usize, next_batch: usize, epochs: usize, asked: Option<usize>) -> Result<(), CliError> {
    if epochs >= next {
        return Ok(());
    }
    let done = if next_batch > 0 {
        format!("{} and part of epoch {next}", plural(next - 1, "epoch"))
    } else {
        plural(next - 1, "epoch")
    };
    let why = match asked {
        Some(e) => format!("--epochs {e} asks for no more than the {done} it has already trained"),
        None => format!("its run has already trained its {done}"),
    };
    Err(CliError::Resume(format!("nothing to resume: {why}; give --epochs {next} or more to train on")))
}

/// The GPU `device` names, if it names one: says what is missing (the
/// feature, the driver, the device) before anything is loaded.
pub fn probe_device(device: svp_cuda::Device) -> Result<Option<svp_cuda::DeviceInfo>, CliError> {
    let svp_cuda::Device::Cuda(ordinal) = device else { return Ok(None) };
    let mut found = svp_cuda::devices()?;
    let count = found.len();
    if ordinal >= count {
        return Err(svp_cuda::CudaError::NoDevice { ordinal, count }.into());
    }
    Ok(Some(found.swap_remove(ordinal)))
}

/// Runs `svp train`.
pub fn run(args: TrainArgs) -> Result<(), CliError> {
    let gpu = probe_device(args.device)?;
    let resume = match &args.resume {
        Some(path) => Some(Checkpoint::load(path)?),
        None => None,
    };
    let config = match &resume {
        Some(c) => {
            let mut config: Config = serde_json::from_str(&c.config_json).map_err(|e| CliError::ConfigParse {
                path: args.resume.clone().unwrap_or_default(),
                message: format!("checkpoint config: {e}"),
            })?;
            if let Some(e) = args.epochs {
                config.train.epochs = e;
            }
            config.validate()?;
            check_epochs_left(c.state.epoch, c.state.next_batch, config.train.epochs, args.epochs)?;
            config
        }
        None => load_config(&args)?,
    };
    for path in [&args.out, &args.checkpoint].into_iter().flatten() {
        check_writable(path)?;
    }
    let mut data = data_source(args.data.as_deref()).load_with(config.model.classes)?;
    if let Some(n) = args.limit_train {
        let n = n.min(data.train.len());
        let f = data.train.features();
        data.train.labels.truncate(n);
        data.train.images.truncate(n * f);
        data.origin = format!("{} (first {n} training samples)", data.origin);
    }
    let validation = hold_out(&mut data, args.val_split, args.keep, args.out.as_deref(), config.train.seed)?;
    config.validate_for_data(&data)?;
    if let Some(c) = &resume
        && (c.data_origin != data.origin || c.train_len != data.train.len() as u64)
    {
        return Err(svp_train::ConfigError::DataMismatch(format!(
            "the checkpoint was trained on {} ({} samples), not {} ({} samples)",
            c.data_origin,
            c.train_len,
            data.origin,
            data.train.len()
        ))
        .into());
    }
    eprintln!("{}", describe(&config, &data));
    if let Some(gpu) = &gpu {
        eprintln!("on {gpu}");
    }
    if let Some(c) = &resume {
        eprintln!("resuming at epoch {}, batch {} (step {})", c.state.epoch, c.state.next_batch, c.state.trainer.step);
    }

    let outputs = Outputs {
        out: args.out.clone(),
        class_names: data.class_names(),
        checkpoint: args.checkpoint.clone(),
        json: args.json,
        max_memory: args.max_memory,
        keep_best: args.keep == crate::cli::Keep::Best,
    };
    let options = FitOptions {
        checkpoint_every: args.checkpoint.as_ref().map(|_| args.checkpoint_every.unwrap_or(0)),
        resume: resume.map(|c| c.state),
        validation,
        ..Default::default()
    };
    train(&config, &data, options, outputs, args.device.into()).map(|_| ())
}

/// Where a run's results go.
pub struct Outputs {
    /// The model file, written after every epoch.
    pub out: Option<PathBuf>,
    /// The class names the model file records.
    pub class_names: Vec<String>,
    /// The checkpoint file.
    pub checkpoint: Option<PathBuf>,
    /// JSON lines instead of text.
    pub json: bool,
    /// `--max-memory`, MiB.
    pub max_memory: Option<usize>,
    /// Write the model only when an epoch improves the validation accuracy.
    pub keep_best: bool,
}

/// Trains `config` on `data` (validated against each other) with
/// `options`, reporting as `outputs` says; returns the last epoch's test
/// accuracy.
pub fn train(
    config: &Config,
    data: &DataSplit,
    options: FitOptions,
    outputs: Outputs,
    on: TrainOn,
) -> Result<Option<f64>, CliError> {
    let args = &outputs;
    let checkpoint = args.checkpoint.clone().map(|p| {
        let json = serde_json::to_string(&config).expect("config serializes");
        (p, json, data.origin.clone(), data.train.len() as u64)
    });
    let out = args.out.clone().map(|path| ModelTarget {
        path,
        config: config.model.clone(),
        image_shape: data.train.image_shape,
        class_names: args.class_names.clone(),
        method: config.train.method,
        data_origin: data.origin.clone(),
    });
    let mut console = Console {
        progress: ProgressLine::new(config.train.epochs),
        json: args.json,
        out,
        saved_epoch: None,
        keep_best: args.keep_best.then_some(f64::NEG_INFINITY),
        checkpoint,
    };
    // A run that cannot fit fails before its first step, with one line.
    let budget = crate::mem::limit_heap_to_available(args.max_memory.map(|mib| mib.saturating_mul(1 << 20)));
    let outcome = try_fit_on(on, config, data, &mut console, options);
    crate::ALLOC.set_budget(0);
    let outcome = outcome.map_err(|e| match e {
        FitError::Memory(error) => CliError::OutOfMemory { error, budget },
        FitError::Device(e) => CliError::Device(e),
    })?;
    console.progress.clear();
    if let Some(why) = &outcome.interrupted {
        return Err(CliError::Interrupted(why.clone()));
    }

    let saved = match (&console.out, console.saved_epoch) {
        (Some(out), Some(epoch)) => Some((out.path.clone(), epoch)),
        _ => None,
    };
    let last = outcome.epochs.last();
    let peak = peak_rss_kib();
    let heap_peak = crate::ALLOC.stats().peak;
    let m = outcome.memory;
    if args.json {
        println!(
            "{}",
            json!({
                "done": outcome.diverged.is_none(),
                "test_acc": last.map(|r| r.test_acc),
                "epochs": outcome.epochs.len(),
                "peak_rss_kib": peak,
                "heap_peak_bytes": heap_peak,
                "param_bytes": m.params,
                "optimizer_bytes": m.optimizer,
                "workspace_bytes": m.workspace,
                "model": saved.as_ref().map(|(p, _)| p.display().to_string()),
                "model_epoch": saved.as_ref().map(|(_, epoch)| epoch),
            })
        );
    } else {
        let accuracy = match last {
            Some(r) => format!("final test accuracy {:.2}%", 100.0 * r.test_acc),
            None => "no epoch finished".into(),
        };
        let model = match (&saved, &args.out) {
            (Some((p, epoch)), _) if outcome.diverged.is_none() => match console.keep_best {
                Some(val) => format!(
                    "the model after epoch {epoch}, best on validation ({:.2}%), saved to {}",
                    100.0 * val,
                    p.display()
                ),
                None => format!("model saved to {}", p.display()),
            },
            (_, None) => "the model was not saved (give --out FILE to save it)".into(),
            // A diverged run says what it kept in its error line.
            (_, Some(_)) => String::new(),
        };
        eprintln!(
            "{accuracy}; peak RSS {}, heap peak {:.1} MiB; parameters {:.1} MiB, optimizer state {:.1} MiB, \
             training workspace {:.1} MiB{}",
            peak.map_or("unknown".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            heap_peak as f64 / 1048576.0,
            m.params as f64 / 1048576.0,
            m.optimizer as f64 / 1048576.0,
            m.workspace as f64 / 1048576.0,
            if model.is_empty() { String::new() } else { format!("; {model}") },
        );
    }
    if let Some(error) = outcome.diverged {
        let saved = match (&saved, &args.out) {
            (Some((p, epoch)), _) => {
                format!("the model after epoch {epoch}, the last with finite weights, is in {}", p.display())
            }
            (None, Some(p)) => format!(
                "no epoch of this run finished with finite weights, so nothing was written to {} \
                 (a smaller --lr may help)",
                p.display()
            ),
            (None, None) => "no --out was given, so no weights were saved".into(),
        };
        return Err(CliError::Diverged { error, saved });
    }
    Ok(outcome.epochs.last().map(|r| r.test_acc))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every config shipped in `models/` parses and fits the embedded data.
    #[test]
    fn shipped_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let data = DataSplit::embedded();
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("models/ exists") {
            let path = entry.expect("readable entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let config = read_config(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                config.validate_for_data(&data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 6, "only {seen} configs found in {}", dir.display());
    }
}
