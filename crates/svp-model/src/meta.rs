//! What a model file says about its model besides the weights: the
//! metadata section's types.

use crate::DType;
use serde::{Deserialize, Serialize};
use svp_net::{ConvItem, MobileItem, ModelConfig, Normalization, PoolMarker, ProjectionHeads, UnitLayout, VitConfig};
use svp_nn::vit::TokenReadout;
use svp_nn::{Dense, DenseSpec, Norm};

/// How a model was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// `svp` or `bp`.
    pub method: String,
    /// Epochs trained.
    pub epochs: usize,
    /// Test accuracy at the end of training, in f32 weights.
    pub test_acc: f64,
    /// The data it was trained on.
    pub data: String,
}

/// The role of a tensor inside its layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Weight matrix, `out x in`.
    Weight,
    /// Bias, `out`.
    Bias,
    /// LayerNorm gain, `out`.
    Gamma,
    /// LayerNorm bias, `out`.
    Beta,
    /// All of a conv or transformer layer's parameters, flat, in the layer's
    /// own order (for a conv block: weights, bias, BatchNorm gain and shift,
    /// running mean and variance). Format version 2.
    Params,
}

/// What comes before the dense layers of a conv network or a vision
/// transformer (format version 2); with the dense layers' specs and the image
/// shape it rebuilds the network exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Front {
    /// VGG-style conv blocks.
    Conv {
        /// Each block's output channels, and whether a 2x2 max pool follows it.
        blocks: Vec<(u32, bool)>,
        /// Side of the adaptive pooling a projection head reads.
        readout: u32,
    },
    /// A vision transformer.
    Vit {
        /// Side of a square patch.
        patch: u32,
        /// Token width.
        dim: u32,
        /// Transformer blocks.
        depth: u32,
        /// Attention heads.
        heads: u32,
        /// Hidden width of each block's MLP.
        mlp: u32,
        /// The classifier reads the token mean (else the class token).
        mean_readout: bool,
    },
    /// Conv blocks as a stem (possibly none), then MobileNetV2 inverted
    /// residual blocks (format version 3).
    Mobile {
        /// Each conv block's output channels, and whether a 2x2 max pool follows it.
        conv: Vec<(u32, bool)>,
        /// Each mobile block's output channels, expansion and stride.
        blocks: Vec<(u32, u32, u32)>,
        /// Side of the adaptive pooling a projection head reads.
        readout: u32,
    },
}

impl Front {
    /// The front of `config`, if it has one.
    pub fn of(config: &ModelConfig) -> Option<Self> {
        if let Some(v) = &config.vit {
            let [patch, dim, depth, heads, mlp] = [v.patch, v.dim, v.depth, v.heads, v.mlp].map(|x| x as u32);
            let mean_readout = v.readout == TokenReadout::Mean;
            return Some(Front::Vit { patch, dim, depth, heads, mlp, mean_readout });
        }
        let conv: Vec<(u32, bool)> = config.conv_blocks().into_iter().map(|(c, pool)| (c as u32, pool)).collect();
        let readout = config.conv_readout as u32;
        if !config.mobile.is_empty() {
            let blocks =
                config.mobile.iter().map(|m| (m.channels as u32, m.expansion as u32, m.stride as u32)).collect();
            return Some(Front::Mobile { conv, blocks, readout });
        }
        (!conv.is_empty()).then_some(Front::Conv { blocks: conv, readout })
    }

    /// The model config of this front followed by dense layers `layers` (the head last).
    pub(crate) fn config(&self, layers: &[DenseSpec]) -> ModelConfig {
        let mut config = dense_config(layers);
        let push_conv = |config: &mut ModelConfig, blocks: &[(u32, bool)], readout: u32| {
            for &(channels, pool) in blocks {
                config.conv.push(ConvItem::Channels(channels as usize));
                if pool {
                    config.conv.push(ConvItem::Pool(PoolMarker::M));
                }
            }
            config.conv_readout = readout as usize;
        };
        match self {
            Front::Conv { blocks, readout } => push_conv(&mut config, blocks, *readout),
            Front::Mobile { conv, blocks, readout } => {
                push_conv(&mut config, conv, *readout);
                config.mobile = blocks
                    .iter()
                    .map(|&(c, e, s)| MobileItem { channels: c as usize, expansion: e as usize, stride: s as usize })
                    .collect();
            }
            &Front::Vit { patch, dim, depth, heads, mlp, mean_readout } => {
                let [patch, dim, depth, heads, mlp] = [patch, dim, depth, heads, mlp].map(|x| x as usize);
                let readout = if mean_readout { TokenReadout::Mean } else { TokenReadout::Cls };
                let norm_eps = svp_nn::layer_norm::LAYER_NORM_EPS;
                config.vit = Some(VitConfig { patch, dim, depth, heads, mlp, readout, norm_eps });
            }
        }
        config
    }

    /// An upper bound of the front's parameter count on `(h, w)` images.
    pub(crate) fn param_bound(&self, (h, w): (usize, usize)) -> u128 {
        match self {
            Front::Conv { blocks, .. } => {
                let mut c_in = 1u128;
                blocks
                    .iter()
                    .map(|&(c, _)| {
                        let c = c as u128;
                        let n = 9 * c_in * c + 6 * c;
                        c_in = c;
                        n
                    })
                    .sum()
            }
            Front::Mobile { conv, blocks, .. } => {
                let c_in = conv.last().map_or(1, |&(c, _)| c as u128);
                let stem = Front::Conv { blocks: conv.clone(), readout: 1 }.param_bound((h, w));
                let mut c_in = c_in;
                let mobile: u128 = blocks
                    .iter()
                    .map(|&(c, e, _)| {
                        let (c, hid) = (c as u128, c_in * e as u128);
                        // expand, depthwise, project, three BatchNorms with running statistics
                        let n = (c_in + 1) * hid + 10 * hid + (hid + 1) * c + 8 * hid + 4 * c;
                        c_in = c;
                        n
                    })
                    .sum();
                stem + mobile
            }
            &Front::Vit { patch, dim, depth, mlp, .. } => {
                let (p, d, m) = (patch.max(1) as u128, dim as u128, mlp as u128);
                let tokens = (h as u128 * w as u128) / (p * p) + 1;
                p * p * d + (tokens + 4) * d + depth as u128 * (4 * d * d + 2 * d * m + m + 9 * d)
            }
        }
    }

    /// Whether the numbers are sane for `image_shape` (before anything is
    /// sized from them): a damaged or hostile file must not allocate a
    /// network of absurd size.
    pub(crate) fn check(&self, image_shape: (usize, usize)) -> Result<(), String> {
        const MAX: u32 = 1 << 16;
        let too_big = |name: &str, v: u32| (v == 0 || v > MAX).then(|| format!("{name} = {v}"));
        let problem = match self {
            Front::Conv { blocks, readout } => blocks
                .iter()
                .find_map(|&(c, _)| too_big("conv channels", c))
                .or_else(|| too_big("conv readout", *readout))
                .or_else(|| {
                    (blocks.is_empty() || blocks.len() > 4096).then(|| format!("{} conv blocks", blocks.len()))
                }),
            Front::Mobile { conv, blocks, readout } => conv
                .iter()
                .find_map(|&(c, _)| too_big("conv channels", c))
                .or_else(|| {
                    blocks.iter().find_map(|&(c, e, _)| {
                        too_big("mobile channels", c).or_else(|| too_big("mobile expansion", e.min(MAX + 1)))
                    })
                })
                .or_else(|| {
                    blocks.iter().find_map(|&(_, _, s)| (!(1..=2).contains(&s)).then(|| format!("mobile stride = {s}")))
                })
                .or_else(|| too_big("conv readout", *readout))
                .or_else(|| {
                    (blocks.is_empty() || conv.len() + blocks.len() > 4096)
                        .then(|| format!("{} conv and {} mobile blocks", conv.len(), blocks.len()))
                }),
            &Front::Vit { patch, dim, depth, heads, mlp, .. } => {
                [("patch", patch), ("dim", dim), ("depth", depth.min(MAX + 1)), ("heads", heads), ("mlp", mlp)]
                    .into_iter()
                    .find_map(|(n, v)| too_big(n, v))
                    .or_else(|| (dim % heads != 0).then(|| format!("dim {dim} is not a multiple of {heads} heads")))
            }
        };
        match problem {
            Some(p) => Err(format!("front: {p}")),
            None => self.config(&[]).check_image_shape(image_shape),
        }
    }
}

/// Where one tensor's bytes are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// 0-based layer (the head is last).
    pub layer: u32,
    /// Which of the layer's tensors.
    pub role: Role,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: Vec<u32>,
    /// Offset of the first byte from the start of the data section.
    pub offset: u64,
    /// For int8: offset of the `shape[0]` f32 scales.
    pub scale_offset: Option<u64>,
}

impl TensorEntry {
    /// Number of values.
    pub fn elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.elements() * self.dtype.size() as u64
    }
}

/// The metadata section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// [`svp_rng::GENERATOR_ID`] of the build that wrote the file.
    pub generator: String,
    /// Layers, the head last.
    pub layers: Vec<DenseSpec>,
    /// SVP projection heads (seed, `d'`, sigma), for early exits.
    pub heads: Option<ProjectionHeads>,
    /// Input standardization.
    pub norm: Normalization,
    /// Height and width of an input image.
    pub image_shape: (u32, u32),
    /// One name per class.
    pub class_names: Vec<String>,
    /// Training provenance.
    pub provenance: Provenance,
    /// Every tensor, layer by layer (the front's first) in [`Role`] order.
    pub tensors: Vec<TensorEntry>,
    /// Conv blocks or a vision transformer before `layers` (version 2; a
    /// version-1 file is an MLP). Next to last, so that a version-1
    /// metadata section is a version-2 one without its last byte
    /// (postcard's `None`).
    pub front: Option<Front>,
    /// A ViT's LayerNorm epsilon where it is not PyTorch's `1e-5` (timm's
    /// `1e-6`; version 4).
    pub vit_norm_eps: Option<f32>,
    /// SVP's units where they were not one layer each (SVP+; version 4).
    /// With `vit_norm_eps`, last: a version-2 or 3 section is this one
    /// without its last two bytes (two `None`s).
    pub units: Option<UnitLayout>,
}

impl ModelMeta {
    /// The architecture, as a config's `[model]` table describes it.
    pub fn model_config(&self) -> ModelConfig {
        let mut config = match &self.front {
            Some(front) => front.config(&self.layers),
            None => dense_config(&self.layers),
        };
        if let (Some(vit), Some(eps)) = (config.vit.as_mut(), self.vit_norm_eps) {
            vit.norm_eps = eps;
        }
        config
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.layers.last().map_or(0, |l| l.out_dim)
    }

    /// Everything but the weights and their layout: what a file of the same
    /// model with other weights records.
    pub fn info(&self) -> crate::ModelInfo {
        crate::ModelInfo {
            heads: self.heads.clone(),
            units: self.units,
            norm: self.norm,
            image_shape: (self.image_shape.0 as usize, self.image_shape.1 as usize),
            class_names: self.class_names.clone(),
            provenance: self.provenance.clone(),
        }
    }

    /// Dtype of the weight matrices.
    pub fn weight_dtype(&self) -> DType {
        self.tensors.iter().find(|t| t.role == Role::Weight).map_or(DType::F32, |t| t.dtype)
    }
}

/// The tensors a dense layer has, with their shapes.
pub(crate) fn layer_tensors(spec: &DenseSpec) -> Vec<(Role, Vec<u32>)> {
    let (o, i) = (spec.out_dim as u32, spec.in_dim as u32);
    let mut t = vec![(Role::Weight, vec![o, i]), (Role::Bias, vec![o])];
    if spec.norm == Norm::LayerNorm {
        t.push((Role::Gamma, vec![o]));
        t.push((Role::Beta, vec![o]));
    }
    t
}

/// The config of an MLP with dense layers `layers` (the head last; the hidden
/// layers share one norm, activation and dropout, as configs make them).
pub(crate) fn dense_config(layers: &[DenseSpec]) -> ModelConfig {
    let hidden = &layers[..layers.len().saturating_sub(1)];
    let mut config = ModelConfig::mlp(hidden.iter().map(|l| l.out_dim).collect());
    if let Some(first) = hidden.first() {
        (config.norm, config.activation, config.dropout) = (first.norm, first.activation, first.dropout);
    }
    config
}

/// Parameters of a dense layer, for sizing buffers.
pub fn layer_param_len(spec: &DenseSpec) -> usize {
    Dense::new(*spec, 0).param_len()
}
