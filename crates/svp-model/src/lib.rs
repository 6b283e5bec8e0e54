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

#![warn(missing_docs)]

pub mod atomic;
pub mod checkpoint;
pub mod dtype;
mod inference;

pub use checkpoint::{Checkpoint, CheckpointRef};
pub use dtype::DType;
pub use inference::{InferenceModel, InferenceWorkspace};

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use svp_data::Normalization;
use svp_nn::{Dense, DenseSpec, Norm};
use svp_train::{Network, ProjectionHeads};

/// First eight bytes of every model file.
pub const MAGIC: [u8; 8] = *b"SVPMODEL";
/// Format version written by this build.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Alignment of every tensor's first byte, from the start of the file.
pub const ALIGN: usize = 64;
/// Metadata larger than this is rejected before decoding (a real model's is a few KiB).
const MAX_META: u64 = 16 << 20;
/// Most layers a file may describe.
const MAX_LAYERS: usize = 100_000;

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
    fn elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    fn bytes(&self) -> u64 {
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
    /// Every tensor, layer by layer in [`Role`] order.
    pub tensors: Vec<TensorEntry>,
}

impl ModelMeta {
    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.layers.last().map_or(0, |l| l.out_dim)
    }

    /// Dtype of the weight matrices.
    pub fn weight_dtype(&self) -> DType {
        self.tensors.iter().find(|t| t.role == Role::Weight).map_or(DType::F32, |t| t.dtype)
    }
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

/// FNV-1a 64, fed in pieces; also a [`std::io::Write`] sink that counts what
/// it hashes, so a payload can be measured and checksummed by streaming it.
#[derive(Clone, Copy, Debug)]
pub struct Fnv64 {
    hash: u64,
    len: u64,
}

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv64 {
    /// The empty hash.
    pub fn new() -> Self {
        Self { hash: 0xcbf2_9ce4_8422_2325, len: 0 }
    }

    /// Hashes `bytes` after what came before.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.hash ^= b as u64;
            self.hash = self.hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.len += bytes.len() as u64;
    }

    /// The hash so far.
    pub fn finish(&self) -> u64 {
        self.hash
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was hashed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::io::Write for Fnv64 {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// FNV-1a, 64 bits, over several pieces in order.
pub fn fnv1a64(pieces: &[&[u8]]) -> u64 {
    let mut h = Fnv64::new();
    pieces.iter().for_each(|p| h.feed(p));
    h.finish()
}

/// Bytes of the header covered by the checksum (all fields before it).
const CHECKED_HEADER: usize = 48;

fn pad_to(out: &mut Vec<u8>, align: usize) {
    while !out.len().is_multiple_of(align) {
        out.push(0);
    }
}

/// The tensors a dense layer has, with their shapes.
fn layer_tensors(spec: &DenseSpec) -> Vec<(Role, Vec<u32>)> {
    let (o, i) = (spec.out_dim as u32, spec.in_dim as u32);
    let mut t = vec![(Role::Weight, vec![o, i]), (Role::Bias, vec![o])];
    if spec.norm == Norm::LayerNorm {
        t.push((Role::Gamma, vec![o]));
        t.push((Role::Beta, vec![o]));
    }
    t
}

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
    /// Input standardization.
    pub norm: Normalization,
    /// Height and width of an input image.
    pub image_shape: (usize, usize),
    /// Class names (empty: "0", "1", ...).
    pub class_names: Vec<String>,
    /// Provenance.
    pub provenance: Provenance,
}

impl ModelFile {
    /// Encodes a network with its weight matrices in `dtype` (biases and
    /// LayerNorm parameters stay f32: they are a fraction of a percent of the
    /// bytes and carry the most per value).
    ///
    /// # Panics
    /// If the network has conv blocks: format version 1 describes MLPs only.
    pub fn from_mlp(model: &Network, info: ModelInfo, dtype: DType) -> Self {
        assert!(model.is_mlp(), "model file format v1 holds MLPs only");
        let layers: Vec<DenseSpec> = model.layers().iter().map(|l| *l.spec()).collect();
        let mut data = Vec::new();
        let mut tensors = Vec::new();
        for (l, spec) in layers.iter().enumerate() {
            let params = model.layer_params(l);
            let mut at = 0;
            for (role, shape) in layer_tensors(spec) {
                let n: usize = shape.iter().map(|&d| d as usize).product();
                let values = &params[at..at + n];
                at += n;
                let dt = if role == Role::Weight { dtype } else { DType::F32 };
                pad_to(&mut data, ALIGN);
                let offset = data.len() as u64;
                let scales = dtype::encode(dt, values, *shape.last().unwrap_or(&1) as usize, &mut data);
                let scale_offset = scales.map(|s| {
                    pad_to(&mut data, ALIGN);
                    let off = data.len() as u64;
                    s.iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes()));
                    off
                });
                tensors.push(TensorEntry { layer: l as u32, role, dtype: dt, shape, offset, scale_offset });
            }
        }
        let classes = model.classes();
        let class_names = if info.class_names.len() == classes {
            info.class_names
        } else {
            (0..classes).map(|c| c.to_string()).collect()
        };
        let meta = ModelMeta {
            generator: svp_rng::GENERATOR_ID.to_string(),
            layers,
            heads: info.heads,
            norm: info.norm,
            image_shape: (info.image_shape.0 as u32, info.image_shape.1 as u32),
            class_names,
            provenance: info.provenance,
            tensors,
        };
        Self { meta, data }
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let meta = postcard::to_stdvec(&self.meta).expect("metadata serializes");
        let meta_offset = HEADER_LEN as u64;
        let data_offset = (HEADER_LEN + meta.len()).div_ceil(ALIGN) * ALIGN;
        let mut out = vec![0u8; HEADER_LEN];
        out.extend_from_slice(&meta);
        pad_to(&mut out, ALIGN);
        debug_assert_eq!(out.len(), data_offset);
        out.extend_from_slice(&self.data);
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        h.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        h.extend_from_slice(&meta_offset.to_le_bytes());
        h.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        h.extend_from_slice(&(data_offset as u64).to_le_bytes());
        h.extend_from_slice(&(self.data.len() as u64).to_le_bytes());
        let checksum = fnv1a64(&[&h, &out[HEADER_LEN..]]);
        h.extend_from_slice(&checksum.to_le_bytes());
        h.resize(HEADER_LEN, 0);
        out[..HEADER_LEN].copy_from_slice(&h);
        out
    }

    /// Decodes and checks a file's bytes; `path` names it in errors. Nothing
    /// is allocated beyond what the file's own size justifies.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, ModelError> {
        let invalid = |what: String| ModelError::Invalid { path: path.to_owned(), what };
        if bytes.len() < HEADER_LEN {
            return Err(invalid(format!("{} bytes is shorter than the {HEADER_LEN}-byte header", bytes.len())));
        }
        if bytes[..8] != MAGIC {
            return Err(invalid("wrong magic number (not an svp model file)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(invalid(format!("format version {version}; this build reads version {FORMAT_VERSION}")));
        }
        if u32_at(12) as usize != HEADER_LEN {
            return Err(invalid(format!("header length {} (expected {HEADER_LEN})", u32_at(12))));
        }
        let (meta_offset, meta_len, data_offset, data_len, checksum) =
            (u64_at(16), u64_at(24), u64_at(32), u64_at(40), u64_at(48));
        let file_len = bytes.len() as u64;
        if meta_offset != HEADER_LEN as u64 || meta_len > MAX_META || meta_offset + meta_len > file_len {
            return Err(invalid(format!("metadata at {meta_offset}+{meta_len} does not fit the {file_len}-byte file")));
        }
        if data_offset % ALIGN as u64 != 0 || data_offset < meta_offset + meta_len || data_offset > file_len {
            return Err(invalid(format!("data section offset {data_offset} is misplaced")));
        }
        if data_offset.checked_add(data_len) != Some(file_len) {
            return Err(invalid(format!(
                "data section of {data_len} bytes at {data_offset} does not end the {file_len}-byte file (truncated?)"
            )));
        }
        if bytes[56..HEADER_LEN].iter().any(|&b| b != 0) {
            return Err(invalid("reserved header bytes are not zero".into()));
        }
        if fnv1a64(&[&bytes[..CHECKED_HEADER], &bytes[HEADER_LEN..]]) != checksum {
            return Err(invalid("checksum mismatch (the file is damaged)".into()));
        }
        let meta: ModelMeta = postcard::from_bytes(&bytes[meta_offset as usize..(meta_offset + meta_len) as usize])
            .map_err(|e| invalid(format!("metadata: {e}")))?;
        let file = Self { meta, data: bytes[data_offset as usize..].to_vec() };
        file.check().map_err(invalid)?;
        Ok(file)
    }

    /// Architecture against tensors, tensors against the data section.
    fn check(&self) -> Result<(), String> {
        let m = &self.meta;
        if m.layers.is_empty() || m.layers.len() > MAX_LAYERS {
            return Err(format!("{} layers", m.layers.len()));
        }
        for (i, s) in m.layers.iter().enumerate() {
            if s.in_dim == 0 || s.out_dim == 0 || s.in_dim > 1 << 24 || s.out_dim > 1 << 24 {
                return Err(format!("layer {} has width {} -> {}", i + 1, s.in_dim, s.out_dim));
            }
            if !(0.0..1.0).contains(&s.dropout) {
                return Err(format!("layer {} has dropout {}", i + 1, s.dropout));
            }
        }
        for (i, pair) in m.layers.windows(2).enumerate() {
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
        let (h, w) = m.image_shape;
        if h as usize * w as usize != m.layers[0].in_dim {
            return Err(format!("image shape {h}x{w} does not match input width {}", m.layers[0].in_dim));
        }
        if m.class_names.len() != m.classes() {
            return Err(format!("{} class names for {} classes", m.class_names.len(), m.classes()));
        }
        if !(m.norm.std.is_finite() && m.norm.std > 0.0 && m.norm.mean.is_finite()) {
            return Err("input normalization is not finite and positive".into());
        }
        if let Some(heads) = &m.heads {
            if m.generator != svp_rng::GENERATOR_ID {
                return Err(format!(
                    "projections were made by generator {:?}, this build has {:?}",
                    m.generator,
                    svp_rng::GENERATOR_ID
                ));
            }
            if heads.dim == 0 || heads.dim > 1 << 20 {
                return Err(format!("projection width {}", heads.dim));
            }
        }
        let expected: Vec<(u32, Role, Vec<u32>)> = m
            .layers
            .iter()
            .enumerate()
            .flat_map(|(l, s)| layer_tensors(s).into_iter().map(move |(r, sh)| (l as u32, r, sh)))
            .collect();
        if expected.len() != m.tensors.len() {
            return Err(format!("{} tensors listed, the architecture has {}", m.tensors.len(), expected.len()));
        }
        let data_len = self.data.len() as u64;
        for (t, (layer, role, shape)) in m.tensors.iter().zip(&expected) {
            let name = format!("layer {} {:?}", t.layer + 1, t.role);
            if t.layer != *layer || t.role != *role || t.shape != *shape {
                return Err(format!("{name}: shape {:?} where the architecture needs {:?}", t.shape, shape));
            }
            if t.offset % ALIGN as u64 != 0 || t.offset.checked_add(t.bytes()).is_none_or(|end| end > data_len) {
                return Err(format!("{name}: {} bytes at offset {} overrun the data section", t.bytes(), t.offset));
            }
            match (t.dtype, t.scale_offset) {
                (DType::I8, Some(off)) => {
                    let n = shape[0] as u64 * 4;
                    if off % ALIGN as u64 != 0 || off.checked_add(n).is_none_or(|end| end > data_len) {
                        return Err(format!("{name}: scales overrun the data section"));
                    }
                }
                (DType::I8, None) => return Err(format!("{name}: int8 without scales")),
                (_, Some(_)) => return Err(format!("{name}: scales on a {} tensor", t.dtype.name())),
                _ => {}
            }
        }
        // Values: decode once to reject NaN and infinity.
        let mut buf = Vec::new();
        for t in &m.tensors {
            buf.resize(t.elements() as usize, 0.0);
            self.decode_into(t, &mut buf);
            if let Some(i) = buf.iter().position(|v| !v.is_finite()) {
                return Err(format!("layer {} {:?}: value {i} is not finite", t.layer + 1, t.role));
            }
        }
        Ok(())
    }

    /// Decodes one (checked) tensor into `out`.
    fn decode_into(&self, t: &TensorEntry, out: &mut [f32]) {
        let bytes = &self.data[t.offset as usize..(t.offset + t.bytes()) as usize];
        let cols = *t.shape.last().unwrap_or(&1) as usize;
        let scales: Option<Vec<f32>> = t.scale_offset.map(|off| {
            let raw = &self.data[off as usize..off as usize + t.shape[0] as usize * 4];
            raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        });
        dtype::decode(t.dtype, bytes, scales.as_deref(), cols, out);
    }

    /// Layer `l`'s parameters in [`Dense`] layout, dequantized into `out`.
    pub fn layer_params_into(&self, l: usize, out: &mut [f32]) {
        let mut at = 0;
        for t in self.meta.tensors.iter().filter(|t| t.layer as usize == l) {
            let n = t.elements() as usize;
            self.decode_into(t, &mut out[at..at + n]);
            at += n;
        }
    }

    /// The network with every weight dequantized to f32.
    pub fn to_mlp(&self) -> Network {
        let mut m = Network::with_specs(self.meta.layers.clone());
        for l in 0..self.meta.layers.len() {
            let (_, params) = m.layer_mut(l);
            self.layer_params_into(l, params);
        }
        m
    }

    /// The same model with its weight matrices re-encoded as `dtype`.
    pub fn convert(&self, dtype: DType) -> Self {
        let meta = &self.meta;
        let info = ModelInfo {
            heads: meta.heads.clone(),
            norm: meta.norm,
            image_shape: (meta.image_shape.0 as usize, meta.image_shape.1 as usize),
            class_names: meta.class_names.clone(),
            provenance: meta.provenance.clone(),
        };
        Self::from_mlp(&self.to_mlp(), info, dtype)
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

/// Parameters of a dense layer, for sizing buffers.
pub fn layer_param_len(spec: &DenseSpec) -> usize {
    Dense::new(*spec, 0).param_len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use svp_train::config::ModelConfig;

    pub(crate) fn sample(dtype: DType) -> ModelFile {
        let cfg = sample_cfg();
        let m = Network::new(6, 3, &cfg, 9);
        let info = ModelInfo {
            heads: Some(ProjectionHeads { seed: 9, dim: 3, sigma: None, dropout: 0.0, label_classes: None }),
            norm: Normalization { mean: 0.3, std: 0.4 },
            image_shape: (2, 3),
            class_names: vec!["a".into(), "b".into(), "c".into()],
            provenance: Provenance { method: "svp".into(), epochs: 1, test_acc: 0.5, data: "test".into() },
        };
        ModelFile::from_mlp(&m, info, dtype)
    }

    #[test]
    fn round_trip_every_dtype_with_aligned_tensors() {
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::I8] {
            let f = sample(dtype);
            let bytes = f.to_bytes();
            let back = ModelFile::from_bytes(&bytes, Path::new("m")).unwrap();
            assert_eq!(back, f);
            let data_offset = u64::from_le_bytes(bytes[32..40].try_into().unwrap()) as usize;
            assert_eq!(data_offset % ALIGN, 0);
            for t in &back.meta.tensors {
                assert_eq!((data_offset + t.offset as usize) % ALIGN, 0, "{t:?}");
            }
            assert_eq!(back.meta.weight_dtype(), dtype);
        }
        let f32_file = sample(DType::F32);
        assert_eq!(f32_file.to_mlp().params(), Network::new(6, 3, &sample_cfg(), 9).params());
    }

    fn sample_cfg() -> ModelConfig {
        ModelConfig::mlp(vec![5, 4])
    }

    #[test]
    fn damaged_files_are_errors() {
        let bytes = sample(DType::I8).to_bytes();
        let p = Path::new("m");
        for cut in [0, 7, 63, 64, 100, bytes.len() - 1] {
            assert!(ModelFile::from_bytes(&bytes[..cut], p).is_err(), "truncated at {cut}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(ModelFile::from_bytes(&b, p).is_err(), "flip at {i}");
        }
        let mut nan = sample(DType::F32);
        let t = nan.meta.tensors[0].clone();
        nan.data[t.offset as usize..t.offset as usize + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        let err = ModelFile::from_bytes(&nan.to_bytes(), p).unwrap_err().to_string();
        assert!(err.contains("not finite"), "{err}");
        let mut wrong_shape = sample(DType::F32);
        wrong_shape.meta.tensors[0].shape = vec![4, 6];
        let err = ModelFile::from_bytes(&wrong_shape.to_bytes(), p).unwrap_err().to_string();
        assert!(err.contains("architecture needs"), "{err}");
        let mut v2 = bytes.clone();
        v2[8] = 2;
        let err = ModelFile::from_bytes(&v2, p).unwrap_err().to_string();
        assert!(err.contains("version 2"), "{err}");
    }
}
