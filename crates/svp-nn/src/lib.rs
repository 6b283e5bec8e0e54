//! Layers and losses of svp, each an explicit forward/backward pair.
//!
//! Nothing here allocates on the hot path: every function writes into buffers
//! the caller owns (a trainer sizes them once for the widest layer and reuses
//! them for every layer and step). Parameters are slices of one contiguous
//! buffer per model; a layer only knows its dimensions and offsets.
//!
//! * [`dense`]: the hidden block `act(norm(x W^T + b))` with optional dropout,
//!   and (with no norm and identity activation) the linear classifier head.
//! * [`layer_norm`]: LayerNorm fused with the bias before it and the
//!   activation after it, its backward with the column sums of its gradients.
//! * [`depthwise`]: depthwise convolution and ReLU6 (MobileNet blocks).
//! * [`mobile_block`]: MobileNetV2's inverted residual block (expand, depthwise,
//!   project, residual) over those layers.
//! * [`conv`]: 2-D convolution (im2col + GEMM; for 3x3, [`winograd`], or
//!   [`direct`] where there are few input channels), BatchNorm2d, max,
//!   average and adaptive average pooling over NCHW batches.
//! * [`loss`]: softmax cross-entropy and the SVP feature-alignment loss.
//! * [`vit`]: vision-transformer layers: patch embedding with class token and
//!   positions, the pre-norm transformer block, the token readout.
//! * [`projection`]: the fixed random projection `R_l`, regenerated from the
//!   seed tile by tile each time it is used and never stored whole.
//!
//! ```
//! use svp_nn::{Dense, DenseCache, DenseSpec, Mode};
//! use svp_tensor::view;
//!
//! // A linear layer 3 -> 2: its parameters live in a slice the caller owns.
//! let layer = Dense::new(DenseSpec::linear(3, 2), 1);
//! let mut params = vec![0.0; layer.param_len()];
//! layer.init_params(7, &mut params);
//! let (x, mut out) = ([1.0f32, 2.0, 3.0], [0.0f32; 2]);
//! layer.forward(&params, view(&x, 1, 3), &mut DenseCache::new(1, 3), &mut out, Mode::Infer);
//! assert!(out.iter().all(|v| v.is_finite()));
//! ```

#![warn(missing_docs)]

pub mod activation;
pub mod conv;
pub mod conv_block;
pub mod dense;
pub mod depthwise;
pub mod direct;
pub mod layer_norm;
pub mod loss;
pub mod mobile_block;
pub mod projection;
pub mod vit;
pub mod winograd;

pub use activation::Activation;

/// Which passes a layer's scratch (`ConvBlockScratch` and its kin) serves:
/// inference needs the forward's buffers only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Passes {
    /// The forward alone (inference).
    Forward,
    /// The forward and the backward (training).
    Both,
}
pub use conv_block::{ConvBlock, ConvBlockCache, ConvBlockScratch, ConvBlockSpec};
pub use dense::{Dense, DenseCache, DenseSpec, Mode, Norm};
pub use loss::{FaWorkspace, FeatureAlignment, softmax_cross_entropy};
pub use projection::Projection;
