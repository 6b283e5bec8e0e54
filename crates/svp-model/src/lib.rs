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
#![forbid(unsafe_code)]

pub mod atomic;
pub mod dtype;
mod inference;
pub mod pytorch;

pub use dtype::DType;
pub use inference::InferenceModel;
pub use svp_net::InferenceWorkspace;

use dtype::ByteSink;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use svp_net::{ConvItem, ModelConfig, Network, Normalization, PoolMarker, ProjectionHeads, VitConfig};
use svp_nn::vit::TokenReadout;
use svp_nn::{Dense, DenseSpec, Norm};

/// First eight bytes of every model file.
pub const MAGIC: [u8; 8] = *b"SVPMODEL";
/// First eight bytes of an svp checkpoint (`svp_train::checkpoint`): a
/// model file's loader names what it was given instead of a bad magic.
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"SVPCKPT\0";
/// Newest format version this build writes and reads: 2 adds conv and ViT
/// fronts ([`Front`]); a file without one is written as version 1, which
/// every earlier build reads.
pub const FORMAT_VERSION: u32 = 2;
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
}

impl Front {
    /// The front of `config`, if it has one.
    pub fn of(config: &ModelConfig) -> Option<Self> {
        if let Some(v) = &config.vit {
            let [patch, dim, depth, heads, mlp] = [v.patch, v.dim, v.depth, v.heads, v.mlp].map(|x| x as u32);
            let mean_readout = v.readout == TokenReadout::Mean;
            return Some(Front::Vit { patch, dim, depth, heads, mlp, mean_readout });
        }
        (!config.conv.is_empty()).then(|| Front::Conv {
            blocks: config.conv_blocks().into_iter().map(|(c, pool)| (c as u32, pool)).collect(),
            readout: config.conv_readout as u32,
        })
    }

    /// The model config of this front followed by dense layers `layers` (the head last).
    fn config(&self, layers: &[DenseSpec]) -> ModelConfig {
        let mut config = dense_config(layers);
        match self {
            Front::Conv { blocks, readout } => {
                for &(channels, pool) in blocks {
                    config.conv.push(ConvItem::Channels(channels as usize));
                    if pool {
                        config.conv.push(ConvItem::Pool(PoolMarker::M));
                    }
                }
                config.conv_readout = *readout as usize;
            }
            &Front::Vit { patch, dim, depth, heads, mlp, mean_readout } => {
                let [patch, dim, depth, heads, mlp] = [patch, dim, depth, heads, mlp].map(|x| x as usize);
                let readout = if mean_readout { TokenReadout::Mean } else { TokenReadout::Cls };
                config.vit = Some(VitConfig { patch, dim, depth, heads, mlp, readout });
            }
        }
        config
    }

    /// An upper bound of the front's parameter count on `(h, w)` images.
    fn param_bound(&self, (h, w): (usize, usize)) -> u128 {
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
    fn check(&self, image_shape: (usize, usize)) -> Result<(), String> {
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
    /// Every tensor, layer by layer (the front's first) in [`Role`] order.
    pub tensors: Vec<TensorEntry>,
    /// Conv blocks or a vision transformer before `layers` (version 2; a
    /// version-1 file is an MLP). Last, so that a version-1 metadata section
    /// is this one without its final byte (postcard's `None`).
    pub front: Option<Front>,
}

impl ModelMeta {
    /// The architecture, as a config's `[model]` table describes it.
    pub fn model_config(&self) -> ModelConfig {
        match &self.front {
            Some(front) => front.config(&self.layers),
            None => dense_config(&self.layers),
        }
    }

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
    /// Weights from elsewhere that do not fit the architecture, or cannot be read.
    #[error("cannot import {}: {what}", path.display())]
    Import {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Not a checkpoint, or a damaged one.
    #[error("{} is not a valid svp checkpoint: {what}", path.display())]
    InvalidCheckpoint {
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
    /// Encodes an MLP with its weight matrices in `dtype` (biases and
    /// LayerNorm parameters stay f32: they are a fraction of a percent of the
    /// bytes and carry the most per value).
    ///
    /// # Panics
    /// If the network has conv blocks or a ViT: use [`ModelFile::from_network`].
    pub fn from_mlp(model: &Network, info: ModelInfo, dtype: DType) -> Self {
        assert!(model.is_mlp(), "from_mlp: the network has a conv or ViT front");
        Self::build(model, None, info, dtype)
    }

    /// Encodes any network built from `config` (an MLP as [`ModelFile::from_mlp`]
    /// does). A conv or ViT front is stored layer by layer as flat tensors in
    /// `dtype`, except that int8 stores the front in f16 (int8 has one scale
    /// per row of a weight matrix; a front layer's parameters are one flat
    /// run of several kinds).
    pub fn from_network(model: &Network, config: &ModelConfig, info: ModelInfo, dtype: DType) -> Self {
        Self::build(model, Front::of(config), info, dtype)
    }

    fn build(model: &Network, front: Option<Front>, info: ModelInfo, dtype: DType) -> Self {
        let mut data = Vec::new();
        let tensors = emit_data(model, dtype, &mut data);
        Self { meta: meta_for(model, front, info, tensors), data }
    }

    /// Writes the file [`ModelFile::from_network`] would hold, atomically,
    /// streaming the weights from `model` into it: no copy of them is made
    /// (a model saved during training on a device with little RAM). The bytes
    /// are those of `ModelFile::from_network(..).save(path)`.
    pub fn save_network(
        path: &Path,
        model: &Network,
        config: &ModelConfig,
        info: ModelInfo,
        dtype: DType,
    ) -> Result<(), ModelError> {
        // Three passes over the weights: to lay out the data section, to
        // checksum it, to write it.
        let mut count = Count(0);
        let tensors = emit_data(model, dtype, &mut count);
        let meta = meta_for(model, Front::of(config), info, tensors);
        let head = head_bytes(&meta, count.0, |hash| {
            emit_data(model, dtype, &mut Hashing { hash, written: 0 });
        });
        atomic::write_with(path, |w| {
            w.write_all(&head)?;
            let mut sink = WriteSink { w, written: 0, error: None };
            emit_data(model, dtype, &mut sink);
            sink.error.map_or(Ok(()), Err)
        })
        .map_err(|source| ModelError::Io { path: path.to_owned(), source })
    }

    /// The format version this file is written as: 1 for an MLP, 2 with a front.
    pub fn version(&self) -> u32 {
        if self.meta.front.is_some() { 2 } else { 1 }
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.head();
        out.extend_from_slice(&self.data);
        out
    }

    /// Everything before the weights: the header (its checksum covers the
    /// weights too), the metadata and the padding up to the data section.
    fn head(&self) -> Vec<u8> {
        head_bytes(&self.meta, self.data.len() as u64, |h| h.feed(&self.data))
    }

    /// Decodes and checks a file's bytes; `path` names it in errors. Nothing
    /// is allocated beyond what the file's own size justifies.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, ModelError> {
        let invalid = |what: String| ModelError::Invalid { path: path.to_owned(), what };
        if bytes.len() < HEADER_LEN {
            return Err(invalid(format!("{} bytes is shorter than the {HEADER_LEN}-byte header", bytes.len())));
        }
        if bytes.starts_with(&CHECKPOINT_MAGIC) {
            return Err(invalid("it is an svp checkpoint, not a model file".into()));
        }
        if bytes[..8] != MAGIC {
            return Err(invalid("wrong magic number (not an svp model file)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if !(1..=FORMAT_VERSION).contains(&version) {
            return Err(invalid(format!("format version {version}; this build reads versions 1 to {FORMAT_VERSION}")));
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
        let mut section = bytes[meta_offset as usize..(meta_offset + meta_len) as usize].to_vec();
        if version == 1 {
            section.push(0); // `front: None`, which version 1 leaves out
        }
        let meta: ModelMeta = postcard::from_bytes(&section).map_err(|e| invalid(format!("metadata: {e}")))?;
        if (version == 2) != meta.front.is_some() {
            return Err(invalid(format!(
                "a version {version} file {} a conv or ViT front",
                if version == 2 { "without" } else { "with" }
            )));
        }
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
        let front_lens = match &m.front {
            None if h as usize * w as usize != m.layers[0].in_dim => {
                return Err(format!("image shape {h}x{w} does not match input width {}", m.layers[0].in_dim));
            }
            None => Vec::new(),
            Some(front) => self.front_layer_lens(front)?,
        };
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
        let front_len = front_lens.len();
        let expected: Vec<(u32, Role, Vec<u32>)> =
            front_lens
                .iter()
                .enumerate()
                .map(|(l, &len)| (l as u32, Role::Params, vec![len as u32]))
                .chain(m.layers.iter().enumerate().flat_map(|(d, s)| {
                    layer_tensors(s).into_iter().map(move |(r, sh)| ((front_len + d) as u32, r, sh))
                }))
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

    /// Parameters per front layer of the network `front` and `meta.layers`
    /// describe, after checking that it is small enough for the data section
    /// to hold and that its dense layers are `meta.layers`.
    fn front_layer_lens(&self, front: &Front) -> Result<Vec<usize>, String> {
        let m = &self.meta;
        let image_shape = (m.image_shape.0 as usize, m.image_shape.1 as usize);
        front.check(image_shape)?;
        // Every stored value takes at least a byte: a network with more
        // parameters than the data section has bytes is not in this file
        // (and is not allocated to find that out).
        let bound = front.param_bound(image_shape) + m.layers.iter().map(|s| layer_param_len(s) as u128).sum::<u128>();
        if bound > self.data.len() as u128 * 2 + (1 << 20) {
            return Err(format!("the front and layers need about {bound} parameters; the file holds far fewer"));
        }
        let config = front.config(&m.layers);
        let net = Network::try_for_images(image_shape, m.classes(), &config, 0).map_err(|e| e.to_string())?;
        let dense: Vec<DenseSpec> = net.layers().iter().map(|l| *l.spec()).collect();
        if dense != m.layers {
            return Err("the dense layers do not follow from the front and the image shape".into());
        }
        Ok((0..net.n_layers() - dense.len()).map(|l| net.layer_params(l).len()).collect())
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

    /// Layer `l`'s parameters (the network's layer order, the front's first),
    /// dequantized into `out` in the layer's own layout.
    pub fn layer_params_into(&self, l: usize, out: &mut [f32]) {
        let mut at = 0;
        for t in self.meta.tensors.iter().filter(|t| t.layer as usize == l) {
            let n = t.elements() as usize;
            self.decode_into(t, &mut out[at..at + n]);
            at += n;
        }
    }

    /// The architecture, as a config's `[model]` table describes it.
    pub fn model_config(&self) -> ModelConfig {
        self.meta.model_config()
    }

    /// The network with every parameter dequantized to f32.
    ///
    /// # Panics
    /// If the memory for the weights is not there.
    pub fn to_network(&self) -> Network {
        let mut net = match &self.meta.front {
            None => Network::with_specs(self.meta.layers.clone()),
            Some(_) => {
                let (h, w) = self.meta.image_shape;
                Network::try_for_images((h as usize, w as usize), self.meta.classes(), &self.model_config(), 0)
                    .expect("memory for the network")
            }
        };
        for l in 0..net.n_layers() {
            self.layer_params_into(l, net.layer_params_mut(l));
        }
        net
    }

    /// The same model with its weights re-encoded as `dtype`.
    pub fn convert(&self, dtype: DType) -> Self {
        let meta = &self.meta;
        let info = ModelInfo {
            heads: meta.heads.clone(),
            norm: meta.norm,
            image_shape: (meta.image_shape.0 as usize, meta.image_shape.1 as usize),
            class_names: meta.class_names.clone(),
            provenance: meta.provenance.clone(),
        };
        Self::build(&self.to_network(), meta.front.clone(), info, dtype)
    }

    /// Writes the file atomically (see [`atomic::write`]), the weights
    /// straight from `self` (no copy of the whole file in memory).
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let head = self.head();
        atomic::write_with(path, |w| {
            w.write_all(&head)?;
            w.write_all(&self.data)
        })
        .map_err(|source| ModelError::Io { path: path.to_owned(), source })
    }

    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io { path: path.to_owned(), source })?;
        Self::from_bytes(&bytes, path)
    }
}

/// The data section of `model` in `dtype`, into `out`; returns its tensors'
/// table (offsets relative to the section's start).
fn emit_data(model: &Network, dtype: DType, out: &mut (impl ByteSink + ?Sized)) -> Vec<TensorEntry> {
    let mut tensors = Vec::new();
    let mut push = |layer: usize, role: Role, dt: DType, shape: Vec<u32>, values: &[f32]| {
        pad_sink(out);
        let offset = out.written();
        let scales = dtype::encode(dt, values, *shape.last().unwrap_or(&1) as usize, out);
        let scale_offset = scales.map(|s| {
            pad_sink(out);
            let off = out.written();
            s.iter().for_each(|v| out.put(&v.to_le_bytes()));
            off
        });
        tensors.push(TensorEntry { layer: layer as u32, role, dtype: dt, shape, offset, scale_offset });
    };
    let front_len = model.n_layers() - model.layers().len();
    let front_dtype = if dtype == DType::I8 { DType::F16 } else { dtype };
    for l in 0..front_len {
        let params = model.layer_params(l);
        push(l, Role::Params, front_dtype, vec![params.len() as u32], params);
    }
    for (d, layer) in model.layers().iter().enumerate() {
        let l = front_len + d;
        let params = model.layer_params(l);
        let mut at = 0;
        for (role, shape) in layer_tensors(layer.spec()) {
            let n: usize = shape.iter().map(|&d| d as usize).product();
            let dt = if role == Role::Weight { dtype } else { DType::F32 };
            push(l, role, dt, shape, &params[at..at + n]);
            at += n;
        }
    }
    tensors
}

/// Pads `out` with zeros to a multiple of [`ALIGN`] bytes.
fn pad_sink(out: &mut (impl ByteSink + ?Sized)) {
    let gap = out.written().next_multiple_of(ALIGN as u64) - out.written();
    out.put(&[0u8; ALIGN][..gap as usize]);
}

/// The metadata of a file holding `model` with these tensors.
fn meta_for(model: &Network, front: Option<Front>, info: ModelInfo, tensors: Vec<TensorEntry>) -> ModelMeta {
    let classes = model.classes();
    let class_names = if info.class_names.len() == classes {
        info.class_names
    } else {
        (0..classes).map(|c| c.to_string()).collect()
    };
    ModelMeta {
        generator: svp_rng::GENERATOR_ID.to_string(),
        layers: model.layers().iter().map(|l| *l.spec()).collect(),
        heads: info.heads,
        norm: info.norm,
        image_shape: (info.image_shape.0 as u32, info.image_shape.1 as u32),
        class_names,
        provenance: info.provenance,
        tensors,
        front,
    }
}

/// Everything before a data section of `data_len` bytes: the header, whose
/// checksum covers the metadata and the data (which `hash_data` feeds), the
/// metadata, and the padding up to the data.
fn head_bytes(meta: &ModelMeta, data_len: u64, hash_data: impl FnOnce(&mut Fnv64)) -> Vec<u8> {
    let mut meta_bytes = postcard::to_stdvec(meta).expect("metadata serializes");
    let version: u32 = if meta.front.is_some() { 2 } else { 1 };
    if meta.front.is_none() {
        // Version 1: the same section without `front`, its last byte.
        meta_bytes.pop();
    }
    let meta_offset = HEADER_LEN as u64;
    let data_offset = (HEADER_LEN + meta_bytes.len()).div_ceil(ALIGN) * ALIGN;
    let mut out = vec![0u8; HEADER_LEN];
    out.extend_from_slice(&meta_bytes);
    pad_to(&mut out, ALIGN);
    debug_assert_eq!(out.len(), data_offset);
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    h.extend_from_slice(&meta_offset.to_le_bytes());
    h.extend_from_slice(&(meta_bytes.len() as u64).to_le_bytes());
    h.extend_from_slice(&(data_offset as u64).to_le_bytes());
    h.extend_from_slice(&data_len.to_le_bytes());
    let mut hasher = Fnv64::new();
    hasher.feed(&h);
    hasher.feed(&out[HEADER_LEN..]);
    hash_data(&mut hasher);
    h.extend_from_slice(&hasher.finish().to_le_bytes());
    h.resize(HEADER_LEN, 0);
    out[..HEADER_LEN].copy_from_slice(&h);
    out
}

/// Feeds a checksum that has seen the header already; counts from the data.
struct Hashing<'a> {
    hash: &'a mut Fnv64,
    written: u64,
}

impl ByteSink for Hashing<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.hash.feed(bytes);
        self.written += bytes.len() as u64;
    }
    fn written(&self) -> u64 {
        self.written
    }
}

/// Counts bytes and keeps none.
struct Count(u64);

impl ByteSink for Count {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len() as u64;
    }
    fn written(&self) -> u64 {
        self.0
    }
}

/// Writes into a file, keeping the first error (and writing nothing after it).
struct WriteSink<'a> {
    w: &'a mut dyn Write,
    written: u64,
    error: Option<std::io::Error>,
}

impl ByteSink for WriteSink<'_> {
    fn put(&mut self, bytes: &[u8]) {
        if self.error.is_none()
            && let Err(e) = self.w.write_all(bytes)
        {
            self.error = Some(e);
        }
        self.written += bytes.len() as u64;
    }
    fn written(&self) -> u64 {
        self.written
    }
}

/// The config of an MLP with dense layers `layers` (the head last; the hidden
/// layers share one norm, activation and dropout, as configs make them).
fn dense_config(layers: &[DenseSpec]) -> ModelConfig {
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

#[cfg(test)]
mod tests {
    use super::*;
    use svp_net::ModelConfig;

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
        assert_eq!(f32_file.to_network().params(), Network::new(6, 3, &sample_cfg(), 9).params());
    }

    fn sample_cfg() -> ModelConfig {
        ModelConfig::mlp(vec![5, 4])
    }

    /// `save` streams the file; it must be `to_bytes` exactly.
    #[test]
    fn a_saved_file_is_its_bytes() {
        let dir = std::env::temp_dir().join(format!("svp-model-save-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for dtype in [DType::F32, DType::I8] {
            let f = sample(dtype);
            let path = dir.join("m.svpm");
            f.save(&path).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), f.to_bytes(), "{dtype:?}");
            assert_eq!(ModelFile::load(&path).unwrap(), f);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A network streamed to a file (as training saves each epoch) gives the
    /// bytes of the file built in memory: MLP, conv and ViT, every dtype.
    #[test]
    fn a_streamed_network_is_the_file_built_in_memory() {
        let dir = std::env::temp_dir().join(format!("svp-model-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.svpm");
        let mut cases = front_configs();
        cases.push(("mlp", sample_cfg()));
        for (name, config) in cases {
            for dtype in [DType::F32, DType::F16, DType::BF16, DType::I8] {
                let (net, file) = front_file(&config, dtype);
                let info = ModelInfo { class_names: file.meta.class_names.clone(), ..front_info() };
                ModelFile::save_network(&path, &net, &config, info, dtype).unwrap();
                let (a, b) = (std::fs::read(&path).unwrap(), file.to_bytes());
                let first = a.iter().zip(&b).position(|(x, y)| x != y);
                assert!(a == b, "{name} {dtype:?}: {} vs {} bytes, first difference at {first:?}", a.len(), b.len());
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
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
        let mut v3 = bytes.clone();
        v3[8] = 3;
        let err = ModelFile::from_bytes(&v3, p).unwrap_err().to_string();
        assert!(err.contains("format version 3"), "{err}");
    }

    pub(crate) fn front_configs() -> Vec<(&'static str, ModelConfig)> {
        let mut cnn = ModelConfig::mlp(vec![6]);
        cnn.conv = vec![ConvItem::Channels(3), ConvItem::Pool(PoolMarker::M), ConvItem::Channels(4)];
        let mut vit = ModelConfig::mlp(vec![]);
        vit.vit = Some(VitConfig { patch: 4, dim: 8, depth: 2, heads: 2, mlp: 16, readout: TokenReadout::Mean });
        vec![("cnn", cnn), ("vit", vit)]
    }

    pub(crate) fn front_file(config: &ModelConfig, dtype: DType) -> (Network, ModelFile) {
        let mut net = Network::try_for_images((8, 8), 3, config, 4).unwrap();
        // Non-trivial BatchNorm running statistics and LayerNorm gains.
        for (i, p) in net.params_mut().iter_mut().enumerate() {
            *p += 0.01 * (i % 7) as f32;
        }
        let file = ModelFile::from_network(&net, config, front_info(), dtype);
        (net, file)
    }

    fn front_info() -> ModelInfo {
        ModelInfo {
            heads: Some(ProjectionHeads { seed: 4, dim: 5, sigma: None, dropout: 0.0, label_classes: None }),
            norm: Normalization { mean: 0.2, std: 0.5 },
            image_shape: (8, 8),
            class_names: vec![],
            provenance: Provenance { method: "svp".into(), epochs: 1, test_acc: 0.5, data: "test".into() },
        }
    }

    /// A conv network and a ViT survive the trip to bytes and back in every
    /// dtype, as version-2 files that rebuild the same network; an MLP stays
    /// version 1.
    #[test]
    fn conv_and_vit_files_round_trip() {
        for (name, config) in front_configs() {
            for dtype in [DType::F32, DType::F16, DType::BF16, DType::I8] {
                let (net, file) = front_file(&config, dtype);
                let bytes = file.to_bytes();
                assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 2, "{name}");
                let back = ModelFile::from_bytes(&bytes, Path::new("m")).unwrap();
                assert_eq!(back, file, "{name} {dtype:?}");
                let rebuilt = back.to_network();
                assert_eq!(rebuilt.n_layers(), net.n_layers(), "{name}");
                if dtype == DType::F32 {
                    assert_eq!(rebuilt.params(), net.params(), "{name}: f32 keeps every bit");
                } else {
                    // Each dtype's own rounding: half an ulp of f16 (11
                    // significant bits) or bf16 (8), relative to the value;
                    // int8 half a step of its row's scale (at most the
                    // largest weight / 254), and f16 for the front it keeps.
                    let largest = net.params().iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let bound = |b: f32| match dtype {
                        DType::F16 => b.abs() * 2f32.powi(-11) + 2f32.powi(-25),
                        DType::BF16 => b.abs() * 2f32.powi(-8),
                        _ => (largest / 254.0).max(b.abs() * 2f32.powi(-11) + 2f32.powi(-25)) * 1.0001,
                    };
                    for (i, (a, b)) in rebuilt.params().iter().zip(net.params()).enumerate() {
                        assert!((a - b).abs() <= bound(*b), "{name} {dtype:?}: parameter {i} is {a}, was {b}");
                    }
                }
            }
        }
        assert_eq!(sample(DType::F32).to_bytes()[8], 1, "an MLP is still written as version 1");
    }

    /// Damaged version-2 files are errors: a front that does not match the
    /// tensors, and a front too large for the file (refused before anything
    /// is allocated for it).
    #[test]
    fn damaged_front_files_are_errors() {
        let p = Path::new("m");
        let (_, file) = front_file(&front_configs()[0].1, DType::F32);
        let mut wider = file.clone();
        wider.meta.front = Some(Front::Conv { blocks: vec![(5, true), (4, false)], readout: 2 });
        let err = ModelFile::from_bytes(&wider.to_bytes(), p).unwrap_err().to_string();
        assert!(err.contains("architecture needs"), "{err}");
        let mut huge = file.clone();
        huge.meta.front = Some(Front::Conv { blocks: vec![(60_000, false); 40], readout: 2 });
        let err = ModelFile::from_bytes(&huge.to_bytes(), p).unwrap_err().to_string();
        assert!(err.contains("far fewer"), "{err}");
        let mut bad_patch = file.clone();
        bad_patch.meta.front = Some(Front::Vit { patch: 3, dim: 8, depth: 1, heads: 2, mlp: 8, mean_readout: false });
        let err = ModelFile::from_bytes(&bad_patch.to_bytes(), p).unwrap_err().to_string();
        assert!(err.contains("does not divide"), "{err}");
        let mut no_front = file.to_bytes();
        no_front[8] = 1; // a version-1 header on a file with a front
        assert!(ModelFile::from_bytes(&no_front, p).is_err());
        // Each bound of the front's numbers, just past it (the largest legal
        // values are far too large to build in a test).
        let vit = |patch, dim, depth, heads, mlp| Front::Vit { patch, dim, depth, heads, mlp, mean_readout: false };
        let cases = [
            (Front::Conv { blocks: vec![(0, false)], readout: 2 }, "front: conv channels = 0"),
            (Front::Conv { blocks: vec![(4, false), (65_537, false)], readout: 2 }, "front: conv channels = 65537"),
            (Front::Conv { blocks: vec![(4, false)], readout: 0 }, "front: conv readout = 0"),
            (Front::Conv { blocks: vec![(4, false)], readout: 65_537 }, "front: conv readout = 65537"),
            (Front::Conv { blocks: vec![], readout: 2 }, "front: 0 conv blocks"),
            (Front::Conv { blocks: vec![(1, false); 4097], readout: 2 }, "front: 4097 conv blocks"),
            (vit(0, 8, 1, 2, 8), "front: patch = 0"),
            (vit(4, 8, 65_537, 2, 8), "front: depth = 65537"),
            (vit(4, 8, 1, 0, 8), "front: heads = 0"),
            (vit(4, 65_537, 1, 1, 8), "front: dim = 65537"),
            (vit(4, 8, 1, 3, 8), "front: dim 8 is not a multiple of 3 heads"),
            (vit(4, 8, 1, 2, 0), "front: mlp = 0"),
        ];
        for (front, want) in cases {
            let mut damaged = file.clone();
            damaged.meta.front = Some(front);
            let err = ModelFile::from_bytes(&damaged.to_bytes(), p).unwrap_err().to_string();
            assert!(err.ends_with(want), "{err}\nwanted: {want}");
        }
    }

    /// Each check of the metadata against itself and the data section, hit
    /// on its own: a file damaged there (with its checksum made whole again)
    /// is refused with that check's message.
    #[test]
    fn every_metadata_check_refuses_by_name() {
        let original = sample(DType::I8);
        let p = Path::new("m");
        let refuse = |edit: &dyn Fn(&mut ModelFile), want: &str| {
            let mut f = original.clone();
            edit(&mut f);
            let err = ModelFile::from_bytes(&f.to_bytes(), p).unwrap_err().to_string();
            assert!(err.contains(want), "{err}\nwanted: {want}");
        };
        refuse(&|f| f.meta.layers.clear(), "0 layers");
        refuse(&|f| f.meta.layers[0].in_dim = 0, "layer 1 has width 0 -> 5");
        refuse(&|f| f.meta.layers[1].out_dim = 0, "layer 2 has width 5 -> 0");
        refuse(&|f| f.meta.layers[0].in_dim = (1 << 24) + 1, "layer 1 has width 16777217 -> 5");
        refuse(&|f| f.meta.layers[2].out_dim = (1 << 24) + 1, "layer 3 has width 4 -> 16777217");
        refuse(&|f| f.meta.layers[0].dropout = 1.0, "layer 1 has dropout 1");
        refuse(&|f| f.meta.layers[1].in_dim = 6, "layer 1 outputs 5 values but layer 2 takes 6");
        refuse(&|f| f.meta.image_shape = (3, 3), "image shape 3x3 does not match input width 6");
        refuse(&|f| f.meta.class_names.pop().map_or((), drop), "2 class names for 3 classes");
        refuse(&|f| f.meta.norm.std = 0.0, "input normalization is not finite and positive");
        refuse(&|f| f.meta.norm.mean = f32::NAN, "input normalization is not finite and positive");
        refuse(&|f| f.meta.generator = "another".into(), "projections were made by generator \"another\"");
        refuse(&|f| f.meta.heads.as_mut().unwrap().dim = 0, "projection width 0");
        refuse(&|f| f.meta.heads.as_mut().unwrap().dim = (1 << 20) + 1, "projection width 1048577");
        refuse(&|f| f.meta.tensors.pop().map_or((), drop), "tensors listed, the architecture has");
        refuse(&|f| f.meta.tensors[1].shape = vec![4], "layer 1 Bias: shape [4] where the architecture needs [5]");
        refuse(&|f| f.meta.tensors[0].offset += 1, "layer 1 Weight: 30 bytes at offset 1 overrun the data section");
        refuse(&|f| f.meta.tensors[0].offset = f.data.len() as u64, "overrun the data section");
        refuse(&|f| f.meta.tensors[0].scale_offset = None, "layer 1 Weight: int8 without scales");
        refuse(&|f| f.meta.tensors[0].scale_offset = Some(f.data.len() as u64), "layer 1 Weight: scales overrun");
        refuse(&|f| f.meta.tensors[0].scale_offset = Some(1), "layer 1 Weight: scales overrun");
        refuse(&|f| f.meta.tensors[1].scale_offset = Some(0), "layer 1 Bias: scales on a f32 tensor");
        refuse(
            &|f| {
                let at = f.meta.tensors[1].offset as usize;
                f.data[at..at + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
            },
            "layer 1 Bias: value 0 is not finite",
        );
    }

    /// Each header bound, one past it: a declared length or offset beyond
    /// the file, or metadata beyond its limit, is refused by name.
    #[test]
    fn header_bounds_are_checked_one_by_one() {
        let bytes = sample(DType::F32).to_bytes();
        let p = Path::new("m");
        let set = |at: usize, v: u64| {
            let mut b = bytes.clone();
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            ModelFile::from_bytes(&b, p).unwrap_err().to_string()
        };
        let len = bytes.len() as u64;
        let (meta_len, data_offset) = (
            u64::from_le_bytes(bytes[24..32].try_into().unwrap()),
            u64::from_le_bytes(bytes[32..40].try_into().unwrap()),
        );
        let meta_end = HEADER_LEN as u64 + meta_len;
        for (at, v, want) in [
            (16, HEADER_LEN as u64 + 1, "metadata at"),       // not right after the header
            (24, MAX_META + 1, "metadata at"),                // over its limit
            (24, len - HEADER_LEN as u64 + 1, "metadata at"), // past the end
            (24, len - HEADER_LEN as u64, "is misplaced"),    // up to the end: the data then overlaps it
            (32, data_offset + 1, "is misplaced"),            // data not aligned
            (32, meta_end.next_multiple_of(ALIGN as u64) - ALIGN as u64, "is misplaced"), // data over the metadata
            (32, len.next_multiple_of(ALIGN as u64) + ALIGN as u64, "is misplaced"), // data past the end
            (40, len - data_offset + 1, "does not end"),      // data longer than the file
        ] {
            let err = set(at, v);
            assert!(err.contains(want), "field at {at} = {v}: {err}\nwanted: {want}");
        }
    }
}
