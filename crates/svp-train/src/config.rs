//! What a training run is, and the checks that reject a bad one early.

use crate::Schedule;
use serde::{Deserialize, Serialize};
use svp_nn::{Activation, Norm};
use svp_optim::Optimizer;

/// Training rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Stochastic Variational Propagation (layer-local).
    Svp,
    /// Backpropagation (the baseline).
    Bp,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Svp => "svp",
            Method::Bp => "bp",
        })
    }
}

/// The network: optional convolutional blocks, hidden dense blocks, then a
/// linear classifier. Input width, image shape and class count come from the data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Expected input width; checked against the data when given.
    #[serde(default)]
    pub input: Option<usize>,
    /// Number of classes. Default: the largest training label + 1, where
    /// every class below it has a training sample (else the data is refused:
    /// a damaged label would add classes); stated, every label must be below it.
    #[serde(default)]
    pub classes: Option<usize>,
    /// Widths of the hidden layers, first to last.
    pub hidden: Vec<usize>,
    /// Normalization in each hidden block.
    #[serde(default = "default_norm")]
    pub norm: Norm,
    /// Activation in each hidden block.
    #[serde(default = "default_activation")]
    pub activation: Activation,
    /// Dropout on hidden activations (training only).
    #[serde(default)]
    pub dropout: f32,
    /// Convolutional blocks before the dense ones, VGG style: a number is a
    /// block `conv3x3 -> BatchNorm -> ReLU` with that many output channels,
    /// `"M"` a 2x2 max pooling after the block before it. Empty: an MLP.
    #[serde(default)]
    pub conv: Vec<ConvItem>,
    /// Side of the adaptive average pooling that reads a conv block's output
    /// out for its projection head (SVP's local loss and early exits):
    /// `R_l` sees `channels x conv_readout x conv_readout` values.
    #[serde(default = "default_conv_readout")]
    pub conv_readout: usize,
    /// A vision transformer before the dense layers (`[model.vit]`); not
    /// together with `conv`.
    #[serde(default)]
    pub vit: Option<VitConfig>,
}

/// A vision transformer: patch embedding with class token and learned
/// positions, `depth` pre-norm blocks, then LayerNorm of the readout token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    /// Side of a square patch (divides the image sides).
    pub patch: usize,
    /// Token width.
    pub dim: usize,
    /// Transformer blocks.
    pub depth: usize,
    /// Attention heads (divides `dim`).
    pub heads: usize,
    /// Hidden width of each block's MLP.
    pub mlp: usize,
    /// What the classifier and SVP's projections read: `"cls"` or `"mean"`.
    #[serde(default = "default_token_readout")]
    pub readout: svp_nn::vit::TokenReadout,
}

fn default_token_readout() -> svp_nn::vit::TokenReadout {
    svp_nn::vit::TokenReadout::Cls
}

/// One entry of [`ModelConfig::conv`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ConvItem {
    /// A conv block with this many output channels.
    Channels(usize),
    /// `"M"`: 2x2 max pooling after the previous block.
    Pool(PoolMarker),
}

/// The `"M"` of a VGG layer list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolMarker {
    /// 2x2 max pooling, stride 2.
    M,
}

impl ModelConfig {
    /// Whether this network can read `(height, width)` images: the ViT's
    /// patch divides both sides, and no conv block pools them to nothing.
    pub fn check_image_shape(&self, (height, width): (usize, usize)) -> Result<(), String> {
        let (mut h, mut w) = (height, width);
        if let Some(v) = &self.vit
            && (v.patch == 0 || h % v.patch != 0 || w % v.patch != 0)
        {
            return Err(format!("model.vit.patch = {} does not divide the {h}x{w} images", v.patch));
        }
        for (i, (_, pool)) in self.conv_blocks().into_iter().enumerate() {
            if pool {
                (h, w) = (h / 2, w / 2);
            }
            if h == 0 || w == 0 {
                return Err(format!(
                    "({height}, {width}) images shrink to nothing after conv block {} and its pooling",
                    i + 1
                ));
            }
        }
        Ok(())
    }

    /// An MLP of these hidden widths with the defaults a config file gets:
    /// LayerNorm + ReLU, no dropout, no conv blocks or ViT.
    pub fn mlp(hidden: Vec<usize>) -> Self {
        Self {
            input: None,
            classes: None,
            hidden,
            norm: default_norm(),
            activation: default_activation(),
            dropout: 0.0,
            conv: Vec::new(),
            conv_readout: default_conv_readout(),
            vit: None,
        }
    }

    /// The conv blocks as (output channels, pool after) pairs.
    pub fn conv_blocks(&self) -> Vec<(usize, bool)> {
        let mut blocks: Vec<(usize, bool)> = Vec::new();
        for item in &self.conv {
            match item {
                ConvItem::Channels(c) => blocks.push((*c, false)),
                ConvItem::Pool(_) => {
                    if let Some(last) = blocks.last_mut() {
                        last.1 = true;
                    }
                }
            }
        }
        blocks
    }

    /// How many layers the network has, numbered as reports number them:
    /// conv blocks, or a ViT's patch embedding, blocks and token head, then
    /// the dense hidden layers and the head.
    pub fn layer_count(&self) -> usize {
        let front = self.conv_blocks().len() + self.vit.as_ref().map_or(0, |v| v.depth + 2);
        front + self.hidden.len() + 1
    }
}

fn default_conv_readout() -> usize {
    2
}

fn default_norm() -> Norm {
    Norm::LayerNorm
}
fn default_activation() -> Activation {
    Activation::Relu
}

/// How layer 1 gets its alignment target `v_0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FirstLayerAlignment {
    /// `v_0 = R_0 x`, a fixed random projection of the input.
    Input,
    /// No feature alignment on layer 1.
    Off,
}

/// Options of the SVP rule (docs/ALGORITHM.md; every default is the paper's or the one that page gives where the paper is silent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SvpConfig {
    /// Projection width `d'`; `None` = number of classes.
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// Standard deviation of `R_l`'s entries; `None` = `1/sqrt(d_l)`.
    #[serde(default)]
    pub sigma: Option<f32>,
    /// Dropout on the entries of `R_l` (training only).
    #[serde(default)]
    pub projection_dropout: f32,
    /// Weight of the feature-alignment loss.
    #[serde(default = "default_lambda")]
    pub lambda: f32,
    /// Weight of the feature-alignment loss on the classifier head; `None` =
    /// `lambda` (the default of docs/ALGORITHM.md).
    #[serde(default)]
    pub head_lambda: Option<f32>,
    /// Target of layer 1's alignment loss.
    #[serde(default = "default_first")]
    pub first_layer_alignment: FirstLayerAlignment,
    /// Project `[h_l, onehot(y)]` instead of `h_l` (Algorithm 1's variant).
    #[serde(default)]
    pub label_concat: bool,
    /// Mean-centre rows before the cosine similarity (PredSim's variant).
    #[serde(default)]
    pub mean_center: bool,
    /// Largest piece of `R_l` held at once, in bytes.
    #[serde(default = "default_tile_bytes")]
    pub tile_bytes: usize,
    /// Layers per unit: 1 is plain SVP; k > 1 is blockwise SVP+, where
    /// backprop runs inside each unit of k consecutive layers of a kind (conv
    /// blocks, transformer blocks or dense hidden layers) and the local loss
    /// sits on the unit's output. Memory grows with k, not depth.
    #[serde(default = "default_layers_per_unit")]
    pub layers_per_unit: usize,
    /// Learning-rate multiplier of the classifier head (a per-layer learning
    /// rate: the head is a convex problem on features that keep moving).
    #[serde(default = "default_head_lr_scale")]
    pub head_lr_scale: f32,
    /// The classifier head joins the last unit of hidden layers: that
    /// unit is trained by backprop from the head's own loss, so its features
    /// are made for the head rather than for a random projection (as SVP+
    /// feeds a ViT's last unit into its classifier). Still local: no gradient
    /// leaves the unit.
    #[serde(default)]
    pub head_joins_last_unit: bool,
}

fn default_lambda() -> f32 {
    1.0
}
fn default_first() -> FirstLayerAlignment {
    FirstLayerAlignment::Input
}
fn default_tile_bytes() -> usize {
    64 * 1024
}
fn default_layers_per_unit() -> usize {
    1
}
fn default_head_lr_scale() -> f32 {
    1.0
}

impl Default for SvpConfig {
    fn default() -> Self {
        Self {
            projection_dim: None,
            sigma: None,
            projection_dropout: 0.0,
            lambda: default_lambda(),
            head_lambda: None,
            first_layer_alignment: default_first(),
            label_concat: false,
            mean_center: false,
            tile_bytes: default_tile_bytes(),
            layers_per_unit: default_layers_per_unit(),
            head_lr_scale: default_head_lr_scale(),
            head_joins_last_unit: false,
        }
    }
}

/// The epoch loop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Training rule.
    #[serde(default = "default_method")]
    pub method: Method,
    /// Passes over the training set.
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Samples per step.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Model seed: initial weights, projections, dropout masks, data order.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Shuffle the training set each epoch.
    #[serde(default = "default_true")]
    pub shuffle: bool,
    /// Random shifts and flips of the training images (`augment = { shift
    /// = 2, flip = true }`), drawn per sample and epoch from the seed.
    /// Left out of the JSON when off, so checkpoints of runs without it read
    /// as they did before it existed.
    #[serde(default, skip_serializing_if = "is_off")]
    pub augment: svp_data::Augment,
    /// The first layer trained (1-based, as layers are numbered in reports):
    /// the layers below it are frozen. They run forward in inference mode
    /// (BatchNorm on its running statistics, no dropout) and hold no optimizer
    /// state, no backward cache and no gradient. 1 trains every layer; the
    /// head's number trains the head alone. Left out of the JSON when 1.
    #[serde(default = "default_train_from_layer", skip_serializing_if = "trains_every_layer")]
    pub train_from_layer: usize,
}

fn default_train_from_layer() -> usize {
    1
}

fn trains_every_layer(first: &usize) -> bool {
    *first == 1
}

fn is_off(augment: &svp_data::Augment) -> bool {
    !augment.is_active()
}

fn default_method() -> Method {
    Method::Svp
}
fn default_epochs() -> usize {
    10
}
fn default_batch() -> usize {
    128
}
fn default_seed() -> u64 {
    1
}
fn default_true() -> bool {
    true
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            method: default_method(),
            epochs: default_epochs(),
            batch_size: default_batch(),
            seed: default_seed(),
            shuffle: true,
            augment: Default::default(),
            train_from_layer: default_train_from_layer(),
        }
    }
}

/// A whole run, as written in `models/<name>.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The network.
    pub model: ModelConfig,
    /// SVP options (ignored by backpropagation).
    #[serde(default)]
    pub svp: SvpConfig,
    /// The epoch loop.
    #[serde(default)]
    pub train: TrainConfig,
    /// The update rule.
    pub optimizer: Optimizer,
    /// Learning-rate schedule.
    #[serde(default)]
    pub schedule: Schedule,
}

/// A config that cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A value out of its range.
    #[error("invalid config: {0}")]
    Invalid(String),
    /// The config does not fit the data.
    #[error("config does not fit the data: {0}")]
    DataMismatch(String),
}

fn invalid(msg: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid(msg.into()))
}

impl Config {
    /// Checks every value that would otherwise fail (or silently misbehave) later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.model.hidden.is_empty() && self.model.conv.is_empty() && self.model.vit.is_none() {
            return invalid(
                "model.hidden must list at least one hidden layer width (or model.conv a conv block, or model.vit)",
            );
        }
        if let Some(v) = &self.model.vit {
            if !self.model.conv.is_empty() {
                return invalid("model.conv and model.vit cannot both be given");
            }
            for (name, value) in
                [("patch", v.patch), ("dim", v.dim), ("depth", v.depth), ("heads", v.heads), ("mlp", v.mlp)]
            {
                if value == 0 {
                    return invalid(format!("model.vit.{name} must be at least 1"));
                }
            }
            if v.dim % v.heads != 0 {
                return invalid(format!("model.vit.dim = {} is not a multiple of heads = {}", v.dim, v.heads));
            }
        }
        let mut after_block = false;
        for (i, item) in self.model.conv.iter().enumerate() {
            match item {
                ConvItem::Channels(0) => return invalid(format!("model.conv[{i}] is 0: a block needs channels")),
                ConvItem::Channels(_) => after_block = true,
                ConvItem::Pool(_) if !after_block => {
                    return invalid(format!("model.conv[{i}] is \"M\" with no conv block before it to pool"));
                }
                ConvItem::Pool(_) => after_block = false,
            }
        }
        if self.model.conv_readout == 0 {
            return invalid("model.conv_readout must be at least 1");
        }
        if let Some(c) = self.model.classes
            && !(2..=256).contains(&c)
        {
            return invalid(format!("model.classes = {c} must be from 2 to 256 (labels are bytes)"));
        }
        if let Some(i) = self.model.hidden.iter().position(|&w| w == 0) {
            return invalid(format!("model.hidden[{i}] is 0: every width must be positive"));
        }
        if !(0.0..1.0).contains(&self.model.dropout) {
            return invalid(format!("model.dropout = {} must be in [0, 1)", self.model.dropout));
        }
        if self.svp.projection_dim == Some(0) {
            return invalid("svp.projection_dim = 0: the projection needs at least one row");
        }
        if let Some(s) = self.svp.sigma
            && !(s.is_finite() && s > 0.0)
        {
            return invalid(format!("svp.sigma = {s} must be a positive number"));
        }
        if !(0.0..1.0).contains(&self.svp.projection_dropout) {
            return invalid(format!("svp.projection_dropout = {} must be in [0, 1)", self.svp.projection_dropout));
        }
        if !(self.svp.lambda.is_finite() && self.svp.lambda >= 0.0) {
            return invalid(format!("svp.lambda = {} must be a non-negative number", self.svp.lambda));
        }
        if let Some(h) = self.svp.head_lambda
            && !(h.is_finite() && h >= 0.0)
        {
            return invalid(format!("svp.head_lambda = {h} must be a non-negative number"));
        }
        if self.svp.tile_bytes < 4 {
            return invalid("svp.tile_bytes must be at least 4");
        }
        if !(self.svp.head_lr_scale.is_finite() && self.svp.head_lr_scale > 0.0) {
            return invalid(format!("svp.head_lr_scale = {} must be a positive number", self.svp.head_lr_scale));
        }
        if self.svp.layers_per_unit == 0 {
            return invalid("svp.layers_per_unit must be at least 1");
        }
        if self.train.epochs == 0 {
            return invalid("train.epochs must be at least 1");
        }
        if self.train.batch_size == 0 {
            return invalid("train.batch_size must be at least 1");
        }
        let layers = self.model.layer_count();
        if !(1..=layers).contains(&self.train.train_from_layer) {
            return invalid(format!(
                "train.train_from_layer = {} must be from 1 to {layers}, the network's layer count (the head is layer {layers})",
                self.train.train_from_layer
            ));
        }
        let lr = self.optimizer.lr();
        if !(lr.is_finite() && lr > 0.0) {
            return invalid(format!("optimizer.lr = {lr} must be a positive number"));
        }
        Ok(())
    }

    /// Checks the config against a data set's input width and class count.
    pub fn validate_for_data(&self, data: &svp_data::DataSplit) -> Result<(), ConfigError> {
        let (features, classes, train_len) = (data.features(), data.classes, data.train.len());
        self.validate()?;
        self.model.check_image_shape(data.train.image_shape).map_err(ConfigError::DataMismatch)?;
        if features == 0 || classes < 2 {
            return Err(ConfigError::DataMismatch(format!("data has {features} features and {classes} classes")));
        }
        if let Some(want) = self.model.classes
            && want != classes
        {
            return Err(ConfigError::DataMismatch(format!(
                "model.classes = {want} but the data was loaded for {classes} classes"
            )));
        }
        if let Some(want) = self.model.input
            && want != features
        {
            return Err(ConfigError::DataMismatch(format!(
                "model.input = {want} but the data has {features} values per sample"
            )));
        }
        if train_len == 0 {
            return Err(ConfigError::DataMismatch("the training set is empty".into()));
        }
        let (h, w) = data.train.image_shape;
        let shift = self.train.augment.shift;
        if shift > 0 && shift >= h.min(w) {
            return Err(ConfigError::DataMismatch(format!(
                "train.augment.shift = {shift} would move a {h}x{w} image out of sight (give less than {})",
                h.min(w)
            )));
        }
        Ok(())
    }
}
