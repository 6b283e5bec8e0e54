//! svp model files, and the inference path that reads them.
//!
//! A file is a fixed 64-byte header, postcard-encoded metadata, then the
//! tensors as raw little-endian bytes, each starting on a 64-byte boundary so a
//! loader can read (or map) a tensor without copying it. The layout is
//! specified in `docs/FORMAT.md`. Random projections are never stored: the
//! metadata keeps the seed and the generator's id, and `R_l` is regenerated.
//!
//! * [`ModelFile`]: a model in memory, as written or read (any dtype).
//! * [`InferenceModel`]: what prediction needs and nothing else: the file's
//!   bytes and one buffer into which each layer is dequantized in turn.
//! * [`atomic::write`]: crash-safe replacement of a file.
//!
//! ```
//! use svp_model::{DType, InferenceModel, InferenceWorkspace, ModelFile, ModelInfo, Provenance};
//! use svp_net::{ModelConfig, Network, Normalization};
//!
//! let config = ModelConfig::mlp(vec![32]);
//! let net = Network::new(784, 10, &config, 1);
//! let info = ModelInfo {
//!     heads: None,
//!     units: None,
//!     norm: Normalization { mean: 0.29, std: 0.35 },
//!     image_shape: (28, 28),
//!     class_names: Vec::new(),
//!     provenance: Provenance { method: "svp".into(), epochs: 0, test_acc: 0.0, data: "none".into() },
//! };
//! // In memory here; `ModelFile::save_network` streams it to disk atomically.
//! let bytes = ModelFile::from_network(&net, &config, info, DType::I8).to_bytes();
//! let model = InferenceModel::new(ModelFile::from_bytes(&bytes, "model.svpm".as_ref())?);
//! let logits = model.predict(&vec![0.0; 784], 1, None, &mut InferenceWorkspace::default()).to_vec();
//! assert_eq!(logits.len(), 10);
//! # Ok::<(), svp_model::ModelError>(())
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod atomic;
mod checksum;
pub mod dtype;
mod error;
mod inference;
mod meta;
pub mod pytorch;
mod read;
#[cfg(test)]
mod tests;
mod write;

pub use checksum::{Fnv64, fnv1a64};
pub use dtype::DType;
pub use error::ModelError;
pub use inference::InferenceModel;
pub use meta::{Front, ModelMeta, Provenance, Role, TensorEntry, layer_param_len};
pub use svp_net::InferenceWorkspace;

use svp_net::{Normalization, ProjectionHeads, UnitLayout};

/// First eight bytes of every model file.
pub const MAGIC: [u8; 8] = *b"SVPMODEL";
/// First eight bytes of an svp checkpoint (`svp_train::checkpoint`): a
/// model file's loader names what it was given instead of a bad magic.
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"SVPCKPT\0";
/// Newest format version this build writes and reads: 2 adds conv and ViT
/// fronts ([`Front`]), 3 mobile blocks, 4 a ViT's LayerNorm epsilon other
/// than `1e-5`; each file is written as the oldest version that holds it
/// (an MLP as version 1, which every build reads).
pub const FORMAT_VERSION: u32 = 4;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Alignment of every tensor's first byte, from the start of the file.
pub const ALIGN: usize = 64;
/// Metadata larger than this is rejected before decoding (a real model's is a few KiB).
const MAX_META: u64 = 16 << 20;
/// Most layers a file may describe.
const MAX_LAYERS: usize = 100_000;

/// A model file in memory: metadata and the raw data section.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelFile {
    /// The metadata.
    pub meta: ModelMeta,
    /// The data section (offsets in `meta.tensors` are relative to it).
    pub data: Vec<u8>,
}

/// Everything but the weights, to build a file from a trained network.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// SVP projection heads.
    pub heads: Option<ProjectionHeads>,
    /// How SVP grouped the layers into units, if not one layer a unit
    /// (SVP+): fine-tuning keeps the local losses where training put them.
    pub units: Option<UnitLayout>,
    /// Input standardization.
    pub norm: Normalization,
    /// Height and width of an input image.
    pub image_shape: (usize, usize),
    /// Class names (empty: "0", "1", ...).
    pub class_names: Vec<String>,
    /// Provenance.
    pub provenance: Provenance,
}
