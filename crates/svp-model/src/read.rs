//! Decoding a model file, every length, shape and value checked first.

use crate::meta::{layer_param_len, layer_tensors};
use crate::write::{CHECKED_HEADER, version_of};
use crate::{
    ALIGN, CHECKPOINT_MAGIC, DType, FORMAT_VERSION, Front, HEADER_LEN, MAGIC, MAX_LAYERS, MAX_META, ModelError,
    ModelFile, ModelMeta, Role, TensorEntry, dtype, fnv1a64,
};
use std::path::Path;
use svp_net::{ModelConfig, Network};
use svp_nn::DenseSpec;

impl ModelFile {
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
        if version < 4 {
            section.extend([0, 0]); // `vit_norm_eps` and `units`, `None`: versions 1 to 3 leave them out
        }
        let meta: ModelMeta = postcard::from_bytes(&section).map_err(|e| invalid(format!("metadata: {e}")))?;
        if version != version_of(&meta) {
            return Err(invalid(format!(
                "a version {version} file describing a version {} model (its front: {})",
                version_of(&meta),
                match &meta.front {
                    None => "none",
                    Some(Front::Mobile { .. }) => "mobile blocks",
                    Some(_) => "conv blocks or a ViT",
                }
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
        if let Some(eps) = m.vit_norm_eps {
            if !matches!(m.front, Some(Front::Vit { .. })) {
                return Err("a LayerNorm epsilon for a ViT, in a file without one".into());
            }
            if !(eps.is_finite() && eps > 0.0) {
                return Err(format!("ViT LayerNorm epsilon {eps}"));
            }
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
            self.tensor_into(t, &mut buf);
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

    /// Decodes one of this file's tensors (an entry of `meta.tensors`) into
    /// `out`, which holds its [`TensorEntry::elements`] values.
    ///
    /// # Panics
    /// If `t` is not an entry of this file or `out` has another length.
    pub fn tensor_into(&self, t: &TensorEntry, out: &mut [f32]) {
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
            self.tensor_into(t, &mut out[at..at + n]);
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

    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io { path: path.to_owned(), source })?;
        Self::from_bytes(&bytes, path)
    }
}
