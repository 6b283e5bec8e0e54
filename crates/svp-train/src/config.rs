//! What a training run is, and the checks that reject a bad one early.

use crate::Schedule;
use serde::{Deserialize, Serialize};
pub use svp_net::{ConvItem, MobileItem, ModelConfig, PoolMarker, VitConfig};
use svp_net::{ProjectionHeads, UnitLayout};
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
    /// The projection heads an SVP run of this config uses on data with
    /// `classes` classes.
    pub fn projection_heads(&self, classes: usize) -> ProjectionHeads {
        ProjectionHeads {
            seed: self.train.seed,
            dim: self.svp.projection_dim.unwrap_or(classes),
            sigma: self.svp.sigma,
            dropout: self.svp.projection_dropout,
            label_classes: self.svp.label_concat.then_some(classes),
        }
    }

    /// How SVP groups the layers into units under this config.
    pub fn unit_layout(&self) -> UnitLayout {
        UnitLayout {
            layers_per_unit: self.svp.layers_per_unit as u32,
            head_joins_last_unit: self.svp.head_joins_last_unit,
        }
    }

    /// Groups the layers as `units` says: fine-tuning keeps a model's local
    /// losses where its training put them.
    pub fn use_unit_layout(&mut self, units: UnitLayout) {
        self.svp.layers_per_unit = units.layers_per_unit as usize;
        self.svp.head_joins_last_unit = units.head_joins_last_unit;
    }

    /// Sets the seed and projection options to `heads`', so that an SVP run
    /// regenerates the same `R_l`: fine-tuning a model must align its layers
    /// to the projections they were trained against, not to fresh ones.
    /// Options the heads do not fix (lambda, the first layer's target, ...)
    /// are left as they are.
    pub fn use_projection_heads(&mut self, heads: &ProjectionHeads) {
        self.train.seed = heads.seed;
        self.svp.projection_dim = Some(heads.dim);
        self.svp.sigma = heads.sigma;
        self.svp.projection_dropout = heads.dropout;
        self.svp.label_concat = heads.label_classes.is_some();
    }

    /// Checks every value that would otherwise fail (or silently misbehave) later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (no_conv, no_mobile) = (self.model.conv.is_empty(), self.model.mobile.is_empty());
        if self.model.hidden.is_empty() && no_conv && no_mobile && self.model.vit.is_none() {
            return invalid(
                "model.hidden must list at least one hidden layer width (or model.conv a conv block, model.mobile a mobile block, or model.vit)",
            );
        }
        for (i, m) in self.model.mobile.iter().enumerate() {
            if m.channels == 0 || m.expansion == 0 || !(1..=2).contains(&m.stride) {
                return invalid(format!("model.mobile[{i}]: channels and expansion must be at least 1, stride 1 or 2"));
            }
        }
        if let Some(v) = &self.model.vit {
            if !no_conv || !no_mobile {
                return invalid("model.vit cannot be given with model.conv or model.mobile");
            }
            for (name, value) in
                [("patch", v.patch), ("dim", v.dim), ("depth", v.depth), ("heads", v.heads), ("mlp", v.mlp)]
            {
                if value == 0 {
                    return invalid(format!("model.vit.{name} must be at least 1"));
                }
            }
            if !(v.norm_eps.is_finite() && v.norm_eps > 0.0) {
                return invalid(format!("model.vit.norm_eps = {} must be a positive number", v.norm_eps));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_heads_are_the_heads_a_run_regenerates() {
        let cases = [
            ProjectionHeads { seed: 3, dim: 10, sigma: None, dropout: 0.0, label_classes: None },
            ProjectionHeads { seed: 42, dim: 64, sigma: Some(0.25), dropout: 0.1, label_classes: Some(10) },
        ];
        for heads in cases {
            let mut config = Config {
                model: ModelConfig::mlp(vec![8]),
                svp: SvpConfig { lambda: 0.5, ..SvpConfig::default() },
                train: TrainConfig { seed: 11, ..TrainConfig::default() },
                optimizer: svp_optim::Optimizer::adam(1e-3),
                schedule: crate::Schedule::default(),
            };
            assert_ne!(config.projection_heads(10), heads);
            config.use_projection_heads(&heads);
            assert_eq!(config.projection_heads(10), heads);
            assert_eq!(config.svp.lambda, 0.5, "options the heads do not fix are kept");
        }
    }
}
