//! Encoding a network into a model file: in memory, or streamed to disk
//! from the trainer's weights.

use crate::dtype::{self, ByteSink};
use crate::meta::layer_tensors;
use crate::{
    ALIGN, DType, Fnv64, Front, HEADER_LEN, MAGIC, ModelError, ModelFile, ModelInfo, ModelMeta, Role, TensorEntry,
    atomic,
};
use std::io::Write;
use std::path::Path;
use svp_net::{ModelConfig, Network, UnitLayout};

/// Bytes of the header covered by the checksum (all fields before it).
pub(crate) const CHECKED_HEADER: usize = 48;

fn pad_to(out: &mut Vec<u8>, align: usize) {
    while !out.len().is_multiple_of(align) {
        out.push(0);
    }
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
        Self::build(model, &ModelConfig::mlp(vec![]), info, dtype)
    }

    /// Encodes any network built from `config` (an MLP as [`ModelFile::from_mlp`]
    /// does). A conv or ViT front is stored layer by layer as flat tensors in
    /// `dtype`, except that int8 stores the front in f16 (int8 has one scale
    /// per row of a weight matrix; a front layer's parameters are one flat
    /// run of several kinds).
    pub fn from_network(model: &Network, config: &ModelConfig, info: ModelInfo, dtype: DType) -> Self {
        Self::build(model, config, info, dtype)
    }

    fn build(model: &Network, config: &ModelConfig, info: ModelInfo, dtype: DType) -> Self {
        let front = Front::of(config);
        let mut data = Vec::new();
        let tensors = emit_data(model, dtype, &mut data);
        Self { meta: meta_for(model, front, vit_norm_eps(config), info, tensors), data }
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
        let meta = meta_for(model, Front::of(config), vit_norm_eps(config), info, tensors);
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

    /// The format version this file is written as: 1 for an MLP, 2 with
    /// conv blocks or a ViT, 3 with mobile blocks.
    pub fn version(&self) -> u32 {
        version_of(&self.meta)
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

    /// The same model with its weights re-encoded as `dtype`.
    pub fn convert(&self, dtype: DType) -> Self {
        Self::build(&self.to_network(), &self.meta.model_config(), self.meta.info(), dtype)
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

/// A ViT's LayerNorm epsilon, if `config` has a ViT whose epsilon is not
/// the default one (which every file before version 4 implies).
fn vit_norm_eps(config: &ModelConfig) -> Option<f32> {
    config.vit.as_ref().map(|v| v.norm_eps).filter(|&eps| eps != svp_nn::layer_norm::LAYER_NORM_EPS)
}

/// The metadata of a file holding `model` with these tensors.
fn meta_for(
    model: &Network,
    front: Option<Front>,
    vit_norm_eps: Option<f32>,
    info: ModelInfo,
    tensors: Vec<TensorEntry>,
) -> ModelMeta {
    let classes = model.classes();
    let class_names = if info.class_names.len() == classes {
        info.class_names
    } else {
        (0..classes).map(|c| c.to_string()).collect()
    };
    // Plain SVP is what a file without units implies.
    let units = info.units.filter(|&u| u != UnitLayout::PLAIN);
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
        vit_norm_eps,
        units,
    }
}

/// Everything before a data section of `data_len` bytes: the header, whose
/// checksum covers the metadata and the data (which `hash_data` feeds), the
/// metadata, and the padding up to the data.
fn head_bytes(meta: &ModelMeta, data_len: u64, hash_data: impl FnOnce(&mut Fnv64)) -> Vec<u8> {
    let mut meta_bytes = postcard::to_stdvec(meta).expect("metadata serializes");
    let version = version_of(meta);
    if version < 4 {
        // Versions 1 to 3: the same section without `vit_norm_eps` and
        // `units`, its last two bytes; version 1 without `front` too.
        meta_bytes.truncate(meta_bytes.len() - if version == 1 { 3 } else { 2 });
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

/// The oldest format version that can hold `meta`: 1 for an MLP, 2 with
/// conv blocks or a ViT, 3 with mobile blocks (so that a build that cannot
/// read them says the file is newer instead of failing to decode it).
pub(crate) fn version_of(meta: &ModelMeta) -> u32 {
    match &meta.front {
        _ if meta.vit_norm_eps.is_some() || meta.units.is_some() => 4,
        None => 1,
        Some(Front::Mobile { .. }) => 3,
        Some(_) => 2,
    }
}
