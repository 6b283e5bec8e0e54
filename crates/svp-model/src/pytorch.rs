//! PyTorch weights in and out, as safetensors files.
//!
//! svp's networks map onto a PyTorch `nn.Sequential` of the layers svp has
//! (its *canonical layout*, which [`export`] writes and [`import`] reads):
//!
//! * an MLP: `Flatten`, then per hidden layer `Linear`, `LayerNorm` (when the
//!   config has it), the activation (`ReLU` or `GELU`) and `Dropout` (when the
//!   config has it), then the head `Linear`;
//! * a conv network: per conv block `Conv2d(in, out, 3, padding=1)`,
//!   `BatchNorm2d`, `ReLU` and `MaxPool2d(2)` after a pooled block; then
//!   `Flatten`, the dense layers as above, and the head.
//!
//! * a vision transformer: timm's `VisionTransformer` names (there is no
//!   `nn.Sequential` for it): `cls_token` `[1, 1, dim]`, `pos_embed` `[1,
//!   tokens, dim]`, `patch_embed.proj` (a `Conv2d` with kernel and stride
//!   the patch), per block `blocks.{i}.norm1`, `.attn.qkv` (queries, keys
//!   and values stacked, heads side by side), `.attn.proj`, `.norm2`,
//!   `.mlp.fc1`, `.mlp.fc2`; then `norm` and `head`. The class token is
//!   the readout (timm's average pooling leaves the class token out, svp's
//!   token mean does not). svp's LayerNorm epsilon is PyTorch's default,
//!   `1e-5` (timm's ViTs use `1e-6`).
//!
//! A state dict names each module's tensors by its index: `1.weight`,
//! `1.bias`, `2.weight`, ... Import matches tensors by those names; a file
//! whose numbering differs (no `Flatten` first, a wrapper's `model.` prefix)
//! is matched by the order of its numbered modules instead, and other names
//! (torchvision's `features.0`, `classifier.1`) are renamed by prefix first.
//! Every shape is checked against the architecture; f32, f16 and bf16
//! tensors are taken, `num_batches_tracked` (an integer count) is ignored.

use crate::{DType, ModelError, ModelFile, ModelInfo, Provenance};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use svp_net::{Layer, ModelConfig, Network, Normalization, ProjectionHeads};

/// What a PyTorch model does not say about itself, for [`import`].
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Height and width of an input image.
    pub image_shape: (usize, usize),
    /// The preprocessing the model was trained with: `x = (pixel/255 - mean) / std`.
    pub norm: Normalization,
    /// Class names (empty: "0", "1", ...).
    pub class_names: Vec<String>,
    /// Prefix renames applied to the file's tensor names first: (theirs, svp's).
    pub rename: Vec<(String, String)>,
    /// SVP's projection heads, drawn from a seed as training draws them (a
    /// PyTorch model has none).
    pub heads: Option<ProjectionHeads>,
    /// Where the weights came from, for the file's provenance.
    pub source: String,
}

/// A parameter module of the canonical layout: its name (index), kind, and
/// where its tensors go in svp's network: layer `layer`'s parameters from
/// `base` on.
#[derive(Clone, Debug)]
struct Module {
    name: String,
    layer: usize,
    kind: Kind,
    base: usize,
}

impl Module {
    /// The state-dict key of the module's tensor `suffix`.
    fn key(&self, suffix: &str) -> String {
        if self.name.is_empty() { suffix.to_string() } else { format!("{}.{suffix}", self.name) }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Weight `[out, in]` then bias `[out]`, at the start of a dense layer.
    Linear { input: usize, output: usize },
    /// Gain and bias `[width]`, after a dense layer's weight and bias.
    LayerNorm { width: usize },
    /// Weight `[out, in, 3, 3]` then bias `[out]`, at the start of a conv block.
    Conv2d { input: usize, output: usize },
    /// Gain, bias, running mean and variance `[channels]`, after the conv.
    BatchNorm2d { channels: usize },
    /// A ViT's patch embedding, a `Conv2d` with kernel and stride `patch`:
    /// weight `[dim, channels, patch, patch]` then bias `[dim]`.
    PatchEmbed { channels: usize, patch: usize, dim: usize },
    /// A ViT's class token `[1, 1, dim]` then position embedding
    /// `[1, tokens, dim]`: bare parameters, not a module's.
    Tokens { tokens: usize, dim: usize },
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Linear { .. } => "Linear",
            Kind::LayerNorm { .. } => "LayerNorm",
            Kind::Conv2d { .. } => "Conv2d",
            Kind::BatchNorm2d { .. } => "BatchNorm2d",
            Kind::PatchEmbed { .. } => "patch embedding",
            Kind::Tokens { .. } => "token embedding",
        }
    }

    /// Each tensor of the module: its name within the module, its shape, and
    /// its offset from the module's first parameter ([`module_base`]).
    fn tensors(self) -> Vec<(&'static str, Vec<usize>, usize)> {
        match self {
            Kind::Linear { input, output } => {
                vec![("weight", vec![output, input], 0), ("bias", vec![output], output * input)]
            }
            Kind::LayerNorm { width } => vec![("weight", vec![width], 0), ("bias", vec![width], width)],
            Kind::Conv2d { input, output } => {
                vec![("weight", vec![output, input, 3, 3], 0), ("bias", vec![output], output * input * 9)]
            }
            Kind::BatchNorm2d { channels } => vec![
                ("weight", vec![channels], 0),
                ("bias", vec![channels], channels),
                ("running_mean", vec![channels], 2 * channels),
                ("running_var", vec![channels], 3 * channels),
            ],
            Kind::PatchEmbed { channels, patch, dim } => vec![
                ("weight", vec![dim, channels, patch, patch], 0),
                ("bias", vec![dim], dim * channels * patch * patch),
            ],
            Kind::Tokens { tokens, dim } => {
                vec![("cls_token", vec![1, 1, dim], 0), ("pos_embed", vec![1, tokens, dim], dim)]
            }
        }
    }
}

/// The parameter modules of `network`'s canonical layout, in order. A dense
/// layer holds `[W, b, gamma, beta]`, a conv block `[W, b, gamma, beta,
/// running mean, running variance]`.
fn canonical_modules(network: &Network, config: &ModelConfig) -> Result<Vec<Module>, String> {
    if !config.mobile.is_empty() {
        return Err(
            "mobile blocks have no PyTorch layout in svp yet; import and export take MLPs, conv networks and ViTs"
                .into(),
        );
    }
    if config.vit.is_some() {
        return vit_modules(network);
    }
    let mut modules = Vec::new();
    let mut index = 0;
    let mut push = |layer, kind, base, index: &mut usize| {
        modules.push(Module { name: index.to_string(), layer, kind, base });
        *index += 1;
    };
    let blocks = config.conv_blocks();
    for (l, &(_, pool)) in blocks.iter().enumerate() {
        let Layer::Conv(c) = network.layer(l) else { unreachable!("conv blocks come first") };
        let (input, output) = (c.spec().in_channels, c.spec().out_channels);
        push(l, Kind::Conv2d { input, output }, 0, &mut index);
        push(l, Kind::BatchNorm2d { channels: output }, input * output * 9 + output, &mut index);
        index += 1 + usize::from(pool); // ReLU, MaxPool2d
    }
    index += 1; // Flatten
    for (d, layer) in network.layers().iter().enumerate() {
        let l = blocks.len() + d;
        let spec = layer.spec();
        push(l, Kind::Linear { input: spec.in_dim, output: spec.out_dim }, 0, &mut index);
        if d + 1 < network.layers().len() {
            if spec.norm == svp_nn::Norm::LayerNorm {
                let width = spec.out_dim;
                push(l, Kind::LayerNorm { width }, spec.in_dim * width + width, &mut index);
            }
            index += 1 + usize::from(spec.dropout > 0.0); // activation, Dropout
        }
    }
    Ok(modules)
}

/// A ViT's modules under timm's names: the patch embedding's `[W | b | cls |
/// pos]`, each block's `[ln1 | Wqkv, bqkv | Wo, bo | ln2 | W1, b1 | W2, b2]`
/// ([`svp_nn::vit::TransformerBlock`]), the token head's LayerNorm, the
/// classifier.
fn vit_modules(network: &Network) -> Result<Vec<Module>, String> {
    let mut modules = Vec::new();
    let module = |name: &str, layer, kind, base| Module { name: name.to_string(), layer, kind, base };
    let mut l = 0;
    let Layer::Patch(p) = network.layer(l) else { unreachable!("a ViT starts with its patch embedding") };
    let (dim, channels, patch) = (p.dim, p.channels, p.patch);
    let weights = dim * channels * patch * patch + dim;
    modules.push(module("", l, Kind::Tokens { tokens: p.tokens(), dim }, weights));
    modules.push(module("patch_embed.proj", l, Kind::PatchEmbed { channels, patch, dim }, 0));
    l += 1;
    let mut block = 0;
    while let Layer::Block(b) = network.layer(l) {
        let (d, m) = (b.spec.dim, b.spec.mlp);
        let name = |part: &str| format!("blocks.{block}.{part}");
        let linear = |input, output| Kind::Linear { input, output };
        let mut base = 0;
        for (part, kind) in [
            ("norm1", Kind::LayerNorm { width: d }),
            ("attn.qkv", linear(d, 3 * d)),
            ("attn.proj", linear(d, d)),
            ("norm2", Kind::LayerNorm { width: d }),
            ("mlp.fc1", linear(d, m)),
            ("mlp.fc2", linear(m, d)),
        ] {
            modules.push(module(&name(part), l, kind, base));
            base += kind.tensors().iter().map(|(_, shape, _)| shape.iter().product::<usize>()).sum::<usize>();
        }
        (l, block) = (l + 1, block + 1);
    }
    let Layer::Readout(head) = network.layer(l) else { unreachable!("a ViT's blocks end at its token head") };
    if head.readout != svp_nn::vit::TokenReadout::Cls {
        return Err("timm's average pooling leaves the class token out, svp's token mean does not: \
                    import and export take ViTs with readout = \"cls\""
            .into());
    }
    modules.push(module("norm", l, Kind::LayerNorm { width: head.dim }, 0));
    if network.layers().len() != 1 {
        return Err(
            "timm's ViT layout has one Linear after the token head (`head`); the config has hidden layers".into()
        );
    }
    let spec = network.layers()[0].spec();
    modules.push(module("head", l + 1, Kind::Linear { input: spec.in_dim, output: spec.out_dim }, 0));
    Ok(modules)
}

fn import_error(path: &Path, what: String) -> ModelError {
    ModelError::Import { path: path.to_owned(), what }
}

/// The file's tensor names after the renames, each with its original name.
fn renamed<'a>(names: &[&'a str], rename: &[(String, String)]) -> BTreeMap<String, &'a str> {
    names
        .iter()
        .map(|&n| {
            let new = rename
                .iter()
                .find_map(|(theirs, ours)| n.strip_prefix(theirs.as_str()).map(|rest| format!("{ours}{rest}")))
                .unwrap_or_else(|| n.to_string());
            (new, n)
        })
        .collect()
}

/// A module prefix's sort key: its dot-separated parts, numbers as numbers.
fn natural_key(prefix: &str) -> Vec<(u64, String)> {
    prefix.split('.').map(|p| p.parse::<u64>().map_or((u64::MAX, p.to_string()), |n| (n, String::new()))).collect()
}

/// The number of classes of a safetensors file's network: the rows of its
/// head's weight (a ViT's `head.weight`, else the last numbered module's),
/// its names renamed as [`import`] does.
pub fn head_outputs(bytes: &[u8], path: &Path, rename: &[(String, String)]) -> Result<usize, ModelError> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| import_error(path, format!("not a readable safetensors file: {e}")))?;
    let names = st.names();
    let by_name = renamed(&names, rename);
    let last = by_name
        .get_key_value("head.weight")
        .or_else(|| {
            by_name
                .iter()
                .filter(|(n, _)| n.ends_with(".weight") || n.as_str() == "weight")
                .max_by_key(|(n, _)| natural_key(n.rsplit_once('.').map_or("", |(p, _)| p)))
        })
        .ok_or_else(|| import_error(path, "the file has no weight tensors".into()))?;
    let view = st.tensor(last.1).map_err(|e| import_error(path, format!("tensor `{}`: {e}", last.1)))?;
    match view.shape() {
        [classes, _] => Ok(*classes),
        shape => Err(import_error(
            path,
            format!("the last module's weight `{}` has shape {shape:?}, not a Linear's", last.1),
        )),
    }
}

/// Reads a safetensors file's weights into a model file for the network
/// `config` describes, with `classes` outputs (which the head's shape must
/// have; [`head_outputs`] reads them from the file).
pub fn import(
    bytes: &[u8],
    path: &Path,
    config: &ModelConfig,
    classes: usize,
    options: ImportOptions,
) -> Result<ModelFile, ModelError> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| import_error(path, format!("not a readable safetensors file: {e}")))?;
    let mut network = Network::try_for_images(options.image_shape, classes, config, 0)
        .map_err(|e| import_error(path, format!("the architecture does not fit in memory: {e}")))?;
    let modules = canonical_modules(&network, config).map_err(|e| import_error(path, e))?;
    let names: Vec<&str> = st.names().into_iter().filter(|n| !n.ends_with(".num_batches_tracked")).collect();
    let by_name = renamed(&names, &options.rename);
    // The file's module prefixes, in the order of their numbering.
    let mut prefixes: Vec<String> =
        by_name.keys().map(|n| n.rsplit_once('.').map_or(String::new(), |(p, _)| p.to_string())).collect();
    prefixes.sort_by_key(|p| natural_key(p));
    prefixes.dedup();
    // A ViT's names are not numbered: they match as named, or not at all.
    let canonical =
        config.vit.is_some() || modules.iter().all(|m| prefixes.contains(&m.name)) && prefixes.len() == modules.len();
    if !canonical && prefixes.len() != modules.len() {
        let want: Vec<String> = modules.iter().map(|m| format!("{} {}", m.name, m.kind.label())).collect();
        return Err(import_error(
            path,
            format!(
                "the file has {} modules with parameters ({}), the architecture {} ({}){}",
                prefixes.len(),
                prefixes.join(", "),
                modules.len(),
                want.join(", "),
                if options.rename.is_empty() { "; [import] rename maps other names" } else { "" }
            ),
        ));
    }
    let mut used = 0;
    for (i, module) in modules.iter().enumerate() {
        // Canonical names, or else the i-th numbered module of the file.
        let named =
            Module { name: if canonical { module.name.clone() } else { prefixes[i].clone() }, ..module.clone() };
        let base = module.base;
        for (suffix, shape, offset) in module.kind.tensors() {
            let key = named.key(suffix);
            let what = format!("layer {}'s {} {suffix}", module.layer + 1, module.kind.label());
            let Some(&original) = by_name.get(&key) else {
                return Err(import_error(path, format!("no tensor `{key}` for {what} (shape {shape:?})")));
            };
            let view = st.tensor(original).map_err(|e| import_error(path, format!("tensor `{original}`: {e}")))?;
            if view.shape() != shape.as_slice() {
                return Err(import_error(
                    path,
                    format!("tensor `{original}` has shape {:?}, {what} needs {shape:?}", view.shape()),
                ));
            }
            let params = &mut network.layer_params_mut(module.layer)[base + offset..][..shape.iter().product()];
            read_values(&view, params).map_err(|e| import_error(path, format!("tensor `{original}`: {e}")))?;
            used += 1;
        }
    }
    let parametric = by_name.len();
    if used != parametric {
        let expected: std::collections::HashSet<String> = if canonical {
            modules.iter().flat_map(|m| m.kind.tensors().into_iter().map(|(s, ..)| m.key(s))).collect()
        } else {
            modules
                .iter()
                .zip(&prefixes)
                .flat_map(|(m, p)| m.kind.tensors().into_iter().map(move |(s, ..)| format!("{p}.{s}")))
                .collect()
        };
        let extra: Vec<&str> = by_name.iter().filter(|(k, _)| !expected.contains(*k)).map(|(_, &n)| n).collect();
        return Err(import_error(path, format!("tensors the architecture has no place for: {}", extra.join(", "))));
    }
    if let Some(l) = network.first_non_finite_layer() {
        return Err(import_error(path, format!("layer {}'s weights are not all finite", l + 1)));
    }
    let info = ModelInfo {
        heads: options.heads,
        units: None,
        norm: options.norm,
        image_shape: options.image_shape,
        class_names: options.class_names,
        provenance: Provenance { method: "imported".into(), epochs: 0, test_acc: 0.0, data: options.source },
    };
    Ok(ModelFile::from_network(&network, config, info, DType::F32))
}

/// Widens a tensor's values into `out` (f32, f16, bf16; little-endian).
fn read_values(view: &TensorView<'_>, out: &mut [f32]) -> Result<(), String> {
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => out
            .iter_mut()
            .zip(data.chunks_exact(4))
            .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Dtype::F16 => out
            .iter_mut()
            .zip(data.chunks_exact(2))
            .for_each(|(o, b)| *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        Dtype::BF16 => out
            .iter_mut()
            .zip(data.chunks_exact(2))
            .for_each(|(o, b)| *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        other => return Err(format!("dtype {other:?}; svp takes F32, F16 and BF16")),
    }
    Ok(())
}

/// The weights of `file` (dequantized to f32) as a safetensors file under
/// the canonical layout's names, with what svp needs to read them back
/// (architecture, image shape, preprocessing, class names) in its metadata.
pub fn export(file: &ModelFile) -> Result<Vec<u8>, String> {
    let network = file.to_network();
    let config = file.model_config();
    let modules = canonical_modules(&network, &config)?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for module in &modules {
        for (suffix, shape, offset) in module.kind.tensors() {
            let values = &network.layer_params(module.layer)[module.base + offset..][..shape.iter().product()];
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((module.key(suffix), shape, bytes));
        }
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| Ok((name.as_str(), TensorView::new(Dtype::F32, shape.clone(), bytes)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| e.to_string())?;
    let meta = &file.meta;
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("svp.model".to_string(), serde_json::to_string(&config).map_err(|e| e.to_string())?);
    metadata.insert("svp.image_shape".to_string(), format!("{}x{}", meta.image_shape.0, meta.image_shape.1));
    metadata.insert("svp.input_mean".to_string(), meta.norm.mean.to_string());
    metadata.insert("svp.input_std".to_string(), meta.norm.std.to_string());
    metadata
        .insert("svp.class_names".to_string(), serde_json::to_string(&meta.class_names).map_err(|e| e.to_string())?);
    safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())
}
