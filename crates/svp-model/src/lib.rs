//! Model files.
//!
//! Layout (all integers little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `SVPM` |
//! | 4 | format version |
//! | 8 | payload length `n` |
//! | 8 | FNV-1a 64 checksum of the payload |
//! | n | postcard-encoded [`ModelFile`] |
//!
//! Version 0 is this interim container (weights as f32 only); the deployable
//! format with f16/bf16/int8 tensors and aligned tensor data replaces it.
//! Random projections are never stored: the file keeps the seed and the
//! generator's id, and `R_l` is regenerated from them.

#![warn(missing_docs)]

pub mod atomic;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use svp_data::Normalization;
use svp_nn::DenseSpec;
use svp_train::{Mlp, ProjectionHeads};

/// First four bytes of every model file.
pub const MAGIC: [u8; 4] = *b"SVPM";
/// Version written by this build.
pub const FORMAT_VERSION: u32 = 0;
const HEADER_LEN: usize = 24;

/// How a model was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// `svp` or `bp`.
    pub method: String,
    /// Epochs trained.
    pub epochs: usize,
    /// Test accuracy at the end of training.
    pub test_acc: f64,
    /// The data it was trained on.
    pub data: String,
}

/// Everything inference needs, and where it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelFile {
    /// [`svp_rng::GENERATOR_ID`] of the build that wrote the file.
    pub generator: String,
    /// Layers, the head last.
    pub specs: Vec<DenseSpec>,
    /// All parameters, layer after layer.
    pub params: Vec<f32>,
    /// SVP projection heads, for early exits.
    pub heads: Option<ProjectionHeads>,
    /// Input standardization.
    pub norm: Normalization,
    /// Height and width of an input image.
    pub image_shape: (usize, usize),
    /// Training provenance.
    pub provenance: Provenance,
}

/// What can go wrong reading or writing a model file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Filesystem error.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a model file, or a damaged one.
    #[error("{} is not a valid svp model file: {what}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl ModelFile {
    /// A file for a trained model.
    pub fn new(
        model: &Mlp,
        heads: Option<ProjectionHeads>,
        norm: Normalization,
        image_shape: (usize, usize),
        provenance: Provenance,
    ) -> Self {
        Self {
            generator: svp_rng::GENERATOR_ID.to_string(),
            specs: model.layers().iter().map(|l| *l.spec()).collect(),
            params: model.params().to_vec(),
            heads,
            norm,
            image_shape,
            provenance,
        }
    }

    /// Encodes header and payload.
    pub fn to_bytes(&self) -> Vec<u8> {
        let payload = postcard::to_stdvec(self).expect("model file serializes");
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&fnv1a64(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Decodes and checks a file's bytes; `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, ModelError> {
        let invalid = |what: String| ModelError::Invalid { path: path.to_owned(), what };
        if bytes.len() < HEADER_LEN {
            return Err(invalid(format!("{} bytes is shorter than the header", bytes.len())));
        }
        if bytes[..4] != MAGIC {
            return Err(invalid("wrong magic number".into()));
        }
        let version = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(invalid(format!("format version {version}, this build reads {FORMAT_VERSION}")));
        }
        let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let payload = &bytes[HEADER_LEN..];
        if len != payload.len() as u64 {
            return Err(invalid(format!("header says {len} payload bytes, file has {}", payload.len())));
        }
        let sum = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        if sum != fnv1a64(payload) {
            return Err(invalid("checksum mismatch (the file is damaged)".into()));
        }
        let file: ModelFile = postcard::from_bytes(payload).map_err(|e| invalid(format!("payload: {e}")))?;
        file.check().map_err(invalid)?;
        Ok(file)
    }

    /// Consistency of architecture and weights.
    fn check(&self) -> Result<(), String> {
        if self.specs.is_empty() {
            return Err("no layers".into());
        }
        for (i, pair) in self.specs.windows(2).enumerate() {
            if pair[0].out_dim != pair[1].in_dim {
                return Err(format!(
                    "layer {} outputs {} values but layer {} takes {}",
                    i + 1,
                    pair[0].out_dim,
                    i + 2,
                    pair[1].in_dim
                ));
            }
        }
        if self.specs.iter().any(|s| s.in_dim == 0 || s.out_dim == 0) {
            return Err("a layer has zero width".into());
        }
        let want: usize =
            self.specs.iter().enumerate().map(|(i, s)| svp_nn::Dense::new(*s, i as u64 + 1).param_len()).sum();
        if want != self.params.len() {
            return Err(format!("architecture needs {want} parameters, file has {}", self.params.len()));
        }
        if self.image_shape.0 * self.image_shape.1 != self.specs[0].in_dim {
            return Err(format!(
                "image shape {:?} does not match input width {}",
                self.image_shape, self.specs[0].in_dim
            ));
        }
        if let Some(i) = self.params.iter().position(|v| !v.is_finite()) {
            return Err(format!("parameter {i} is not finite"));
        }
        if self.generator != svp_rng::GENERATOR_ID && self.heads.is_some() {
            return Err(format!(
                "projections were made by generator {:?}, this build has {:?}",
                self.generator,
                svp_rng::GENERATOR_ID
            ));
        }
        Ok(())
    }

    /// The network.
    pub fn to_mlp(&self) -> Mlp {
        let mut m = Mlp::with_specs(self.specs.clone());
        m.params_mut().copy_from_slice(&self.params);
        m
    }

    /// Writes the file atomically (see [`atomic::write`]).
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        atomic::write(path, &self.to_bytes()).map_err(|source| ModelError::Io { path: path.to_owned(), source })
    }

    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io { path: path.to_owned(), source })?;
        Self::from_bytes(&bytes, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use svp_train::config::ModelConfig;

    fn sample() -> ModelFile {
        let cfg = ModelConfig {
            input: None,
            hidden: vec![5, 4],
            norm: svp_nn::Norm::LayerNorm,
            activation: svp_nn::Activation::Relu,
            dropout: 0.0,
        };
        let m = Mlp::new(6, 3, &cfg, 9);
        let heads = ProjectionHeads { seed: 9, dim: 3, sigma: None, dropout: 0.0, label_classes: None };
        let prov = Provenance { method: "svp".into(), epochs: 1, test_acc: 0.5, data: "test".into() };
        ModelFile::new(&m, Some(heads), Normalization { mean: 0.3, std: 0.4 }, (2, 3), prov)
    }

    #[test]
    fn round_trip_and_damage() {
        let f = sample();
        let bytes = f.to_bytes();
        let p = Path::new("m.svpm");
        assert_eq!(ModelFile::from_bytes(&bytes, p).unwrap(), f);
        assert_eq!(f.to_mlp().params(), &f.params[..]);
        for cut in [0, 3, 23, 24, bytes.len() - 1] {
            assert!(ModelFile::from_bytes(&bytes[..cut], p).is_err(), "truncated at {cut}");
        }
        for i in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(ModelFile::from_bytes(&b, p).is_err(), "flip at {i}");
        }
        let mut nan = f.clone();
        nan.params[3] = f32::NAN;
        assert!(ModelFile::from_bytes(&nan.to_bytes(), p).is_err());
        let mut short = f.clone();
        short.params.pop();
        assert!(ModelFile::from_bytes(&short.to_bytes(), p).is_err());
    }
}
