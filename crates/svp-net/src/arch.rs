//! The architecture of a network, as a run config's `[model]` table writes it.

use serde::{Deserialize, Serialize};
use svp_nn::{Activation, Norm};

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
    /// MobileNetV2 inverted residual blocks after the conv blocks (which
    /// serve as their stem), before the dense layers: `mobile = [{ channels
    /// = 16, expansion = 6, stride = 2 }, ...]`. Not together with a ViT.
    #[serde(default)]
    pub mobile: Vec<MobileItem>,
    /// A vision transformer before the dense layers (`[model.vit]`); not
    /// together with `conv` or `mobile`.
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
    /// The LayerNorms' variance epsilon: PyTorch's default `1e-5`, or timm's
    /// `1e-6` for a ViT imported from timm.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f32,
}

fn default_token_readout() -> svp_nn::vit::TokenReadout {
    svp_nn::vit::TokenReadout::Cls
}

fn default_norm_eps() -> f32 {
    svp_nn::layer_norm::LAYER_NORM_EPS
}

/// One entry of [`ModelConfig::mobile`]: an inverted residual block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MobileItem {
    /// Output channels.
    pub channels: usize,
    /// Hidden channels per input channel (1: no expand convolution).
    #[serde(default = "default_expansion")]
    pub expansion: usize,
    /// The depthwise convolution's stride: 1 or 2.
    #[serde(default = "default_stride")]
    pub stride: usize,
}

fn default_expansion() -> usize {
    6
}

fn default_stride() -> usize {
    1
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
        for (i, m) in self.mobile.iter().enumerate() {
            if m.channels == 0 || m.expansion == 0 || !(1..=2).contains(&m.stride) {
                return Err(format!(
                    "model.mobile block {}: channels and expansion must be at least 1 and stride 1 or 2",
                    i + 1
                ));
            }
            // A 3x3 depthwise convolution with padding 1.
            (h, w) = ((h - 1) / m.stride + 1, (w - 1) / m.stride + 1);
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
            mobile: Vec::new(),
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
        let front = self.conv_blocks().len() + self.mobile.len() + self.vit.as_ref().map_or(0, |v| v.depth + 2);
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
