//! The network svp trains and deploys, below both the training rules and the
//! model files: an inference-only build (a board that runs a model file)
//! needs this crate and the layers and kernels under it, and no optimizer,
//! trainer or data loader.
//!
//! * [`ModelConfig`]: the architecture, as a run config's `[model]` table
//!   writes it (conv blocks or a vision transformer, dense hidden layers, a
//!   linear head).
//! * [`Network`]: that architecture's layers in order, all parameters in one
//!   contiguous buffer; [`Layer`] runs any one of them (forward, inference,
//!   backward and update) over caller-owned buffers: a [`LayerCache`] for
//!   what a layer's backward reads from its forward, and a [`LayerScratch`]
//!   for what it needs only while it runs, which one serves every layer.
//! * [`ProjectionHeads`]: the seed and options that regenerate SVP's fixed
//!   random projection `R_l` of every layer (local losses in training, early
//!   exits in inference).
//! * [`Normalization`]: the input preprocessing `(pixel / 255 - mean) / std`.
//! * [`Network::predict`] with an [`InferenceWorkspace`]: inference, with
//!   early exits.
//!
//! ```
//! use svp_net::{InferenceWorkspace, ModelConfig, Network};
//!
//! let net = Network::new(784, 10, &ModelConfig::mlp(vec![64]), 1);
//! let x = vec![0.5f32; 2 * 784];
//! let mut ws = InferenceWorkspace::default();
//! let logits = net.predict(&x, 2, &mut ws, None);
//! assert_eq!(logits.len(), 2 * 10);
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod arch;
mod heads;
mod inference;
mod layer;
mod network;
mod normalization;

pub use arch::{ConvItem, MobileItem, ModelConfig, PoolMarker, VitConfig};
pub use heads::{ProjectionHeads, UnitLayout};
pub use inference::{InferenceWorkspace, predict_streamed};
pub use layer::{Layer, LayerCache, LayerScratch, Readout};
pub use network::Network;
pub use normalization::Normalization;
