//! `svp import` and `svp export --format safetensors`: PyTorch weights in and out.

use crate::cli::{ExportArgs, ImportArgs};
use crate::error::CliError;
use serde::Deserialize;
use std::collections::BTreeMap;
use svp_model::pytorch::{self, ImportOptions};
use svp_model::{ModelError, ModelFile};
use svp_optim::Optimizer;
use svp_train::config::{ModelConfig, SvpConfig, TrainConfig};
use svp_train::{Config, Schedule};

/// An import config: a run config (whose `[optimizer]` may be left out)
/// with an `[import]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportFile {
    model: ModelConfig,
    #[serde(default)]
    svp: SvpConfig,
    #[serde(default)]
    train: TrainConfig,
    #[serde(default)]
    optimizer: Option<Optimizer>,
    #[serde(default)]
    schedule: Schedule,
    #[serde(default)]
    import: ImportTable,
}

/// What a PyTorch model does not say about itself.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportTable {
    /// Height and width of an input image.
    image: Option<[usize; 2]>,
    /// Preprocessing `x = (pixel/255 - input_mean) / input_std`.
    input_mean: Option<f32>,
    input_std: Option<f32>,
    /// Class names, in label order.
    #[serde(default)]
    class_names: Vec<String>,
    /// Their name prefixes to svp's (the canonical nn.Sequential's indices).
    #[serde(default)]
    rename: BTreeMap<String, String>,
}

fn invalid(message: String) -> CliError {
    svp_train::ConfigError::Invalid(message).into()
}

/// The image shape: asked, configured, or for an MLP whose first layer reads
/// a square number of values, that square.
fn image_shape(
    args: &ImportArgs,
    table: &ImportTable,
    bytes: &[u8],
    config: &ModelConfig,
) -> Result<(usize, usize), CliError> {
    if let Some(shape) = args.image.or(table.image.map(|[h, w]| (h, w))) {
        return Ok(shape);
    }
    let ask = "give the input image size with --image HxW or `image = [H, W]` under [import]";
    if !config.conv.is_empty() || config.vit.is_some() {
        return Err(invalid(format!("a conv network's input size is not in its weights: {ask}")));
    }
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| ModelError::Import {
        path: args.weights.clone(),
        what: format!("not a readable safetensors file: {e}"),
    })?;
    // The first module's weight, by the order of the names' numbers.
    let width = st
        .tensors()
        .into_iter()
        .filter(|(n, v)| n.ends_with(".weight") && v.shape().len() == 2)
        .min_by_key(|(n, _)| n.split('.').filter_map(|p| p.parse::<u64>().ok()).collect::<Vec<_>>())
        .map(|(_, v)| v.shape()[1]);
    match width {
        Some(w) if w.isqrt() * w.isqrt() == w && w > 0 => Ok((w.isqrt(), w.isqrt())),
        Some(w) => Err(invalid(format!("the first layer reads {w} values, not a square image: {ask}"))),
        None => Err(invalid(format!("no 2-D weight to read the input size from: {ask}"))),
    }
}

/// Runs `svp import`.
pub fn run(args: ImportArgs) -> Result<(), CliError> {
    let text = std::fs::read_to_string(&args.config)
        .map_err(|source| CliError::ConfigRead { path: args.config.clone(), source })?;
    let file: ImportFile = crate::train_cmd::parse_toml(&text, &args.config)?;
    let config = Config {
        model: file.model,
        svp: file.svp,
        train: file.train,
        optimizer: file.optimizer.unwrap_or_else(|| Optimizer::adam(3e-4)),
        schedule: file.schedule,
    };
    config.validate()?;
    let mut table = file.import;
    crate::train_cmd::check_writable(&args.out)?;
    let bytes = std::fs::read(&args.weights).map_err(|source| ModelError::Io { path: args.weights.clone(), source })?;
    // A file svp exported says what the config may leave out.
    if let Ok((_, meta)) = safetensors::SafeTensors::read_metadata(&bytes)
        && let Some(meta) = meta.metadata()
    {
        let number = |key: &str| meta.get(key).and_then(|v| v.parse::<f32>().ok());
        table.input_mean = table.input_mean.or(number("svp.input_mean"));
        table.input_std = table.input_std.or(number("svp.input_std"));
        if table.image.is_none()
            && let Some((h, w)) = meta.get("svp.image_shape").and_then(|v| v.split_once('x'))
            && let (Ok(h), Ok(w)) = (h.parse(), w.parse())
        {
            table.image = Some([h, w]);
        }
        if table.class_names.is_empty()
            && let Some(names) = meta.get("svp.class_names").and_then(|v| serde_json::from_str(v).ok())
        {
            table.class_names = names;
        }
    }
    let mean = args.input_mean.or(table.input_mean).unwrap_or(0.0);
    let std = args.input_std.or(table.input_std).unwrap_or(1.0);
    if !(mean.is_finite() && std.is_finite() && std > 0.0) {
        return Err(invalid(format!("input mean {mean} and std {std}: the std must be a positive number")));
    }
    let rename: Vec<(String, String)> = table.rename.clone().into_iter().collect();
    let classes = match config.model.classes {
        Some(c) => c,
        None => pytorch::head_outputs(&bytes, &args.weights, &rename)?,
    };
    if !table.class_names.is_empty() && table.class_names.len() != classes {
        return Err(invalid(format!(
            "[import] class_names lists {}, the model has {classes} classes",
            table.class_names.len()
        )));
    }
    let image = image_shape(&args, &table, &bytes, &config.model)?;
    config.model.check_image_shape(image).map_err(invalid)?;
    let options = ImportOptions {
        image_shape: image,
        norm: svp_train::Normalization { mean, std },
        class_names: table.class_names,
        rename,
        heads: Some(config.projection_heads(classes)),
        source: format!("imported from {}", args.weights.display()),
    };
    let model = pytorch::import(&bytes, &args.weights, &config.model, classes, options)?;
    model.save(&args.out)?;
    let network = model.to_network();
    eprintln!(
        "svp import: {} ({} parameters, {classes} classes, {}x{} images, input (pixel/255 - {mean}) / {std}) \
         from {} into {}",
        describe(&model),
        network.params().len(),
        image.0,
        image.1,
        args.weights.display(),
        args.out.display()
    );
    Ok(())
}

fn describe(model: &ModelFile) -> String {
    let layers = &model.meta.layers;
    let widths: Vec<String> =
        std::iter::once(layers[0].in_dim).chain(layers.iter().map(|l| l.out_dim)).map(|w| w.to_string()).collect();
    match &model.meta.front {
        Some(front) => format!("{}, then {}", crate::eval_cmd::describe_front(front), widths.join("-")),
        None => widths.join("-"),
    }
}

/// Runs `svp export --format safetensors`.
pub fn export_safetensors(args: &ExportArgs) -> Result<(), CliError> {
    if let Some(d) = args.dtype.as_deref().filter(|&d| d != "f32") {
        return Err(invalid(format!("--dtype {d}: --format safetensors writes f32 weights (PyTorch's own)")));
    }
    crate::train_cmd::check_writable(&args.out)?;
    let file = ModelFile::load(&args.model)?;
    let bytes =
        pytorch::export(&file).map_err(|e| CliError::ModelMismatch(format!("{}: {e}", args.model.display())))?;
    svp_model::atomic::write(&args.out, &bytes)
        .map_err(|e| CliError::Output { path: args.out.clone(), reason: e.to_string() })?;
    let names = if file.meta.model_config().vit.is_some() {
        "timm VisionTransformer names"
    } else {
        "PyTorch nn.Sequential names"
    };
    eprintln!("wrote {} ({} bytes, f32 weights under {names})", args.out.display(), bytes.len());
    Ok(())
}
