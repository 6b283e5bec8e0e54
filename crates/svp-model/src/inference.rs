//! The inference path. For an MLP it is lean: a model file's bytes, and one
//! buffer into which each layer is dequantized in turn; no optimizer state, no
//! training workspace, no f32 copy of the whole network. A conv network or a
//! ViT is dequantized once into an f32 network (its layers need their own
//! caches and shapes) and runs through [`Network::predict`].

use crate::{ModelError, ModelFile, layer_param_len};
use std::path::Path;
use svp_net::Network;
use svp_nn::{DenseCache, Mode};
use svp_tensor::{view, view_mut};

/// A model ready to predict.
pub struct InferenceModel {
    file: ModelFile,
    body: Body,
}

/// How the layers run.
enum Body {
    /// An MLP's layers without parameters (only their specs and stream
    /// indices): each layer's are dequantized from the file when it runs.
    Lean(Vec<svp_nn::Dense>),
    /// A conv network or ViT, dequantized once.
    Network(Box<Network>),
}

/// Buffers for [`InferenceModel::predict`], grown on first use and reused.
#[derive(Debug, Default)]
pub struct InferenceWorkspace {
    params: Vec<f32>,
    act: [Vec<f32>; 2],
    cache: DenseCache,
    logits: Vec<f32>,
    tile: Vec<f32>,
    rows: usize,
    net: svp_net::InferenceWorkspace,
}

/// Floats of `R_l` held at once by an early exit.
const EXIT_TILE_FLOATS: usize = 16 * 1024;

impl InferenceModel {
    /// Reads and checks a model file.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        Ok(Self::new(ModelFile::load(path)?))
    }

    /// Wraps a checked model file.
    pub fn new(file: ModelFile) -> Self {
        let body = match file.meta.front {
            None => Body::Lean(Network::with_specs(file.meta.layers.clone()).layers().to_vec()),
            Some(_) => Body::Network(Box::new(file.to_network())),
        };
        Self { file, body }
    }

    /// The file's metadata.
    pub fn meta(&self) -> &crate::ModelMeta {
        &self.file.meta
    }

    /// Number of hidden layers (possible exits).
    pub fn hidden_layers(&self) -> usize {
        match &self.body {
            Body::Lean(layers) => layers.len() - 1,
            Body::Network(net) => net.n_layers() - 1,
        }
    }

    /// Logits for `rows` samples in `x` (rows x input), from the head, or with
    /// `exit = Some(k)` from hidden layer `k`'s projection head (1-based; only
    /// for SVP models). Returns `rows x classes` values.
    ///
    /// # Panics
    /// If `exit` is out of range or the model has no projection heads (the CLI
    /// checks both first).
    pub fn predict<'w>(
        &self,
        x: &[f32],
        rows: usize,
        exit: Option<usize>,
        ws: &'w mut InferenceWorkspace,
    ) -> &'w [f32] {
        let layers = match &self.body {
            Body::Lean(layers) => layers,
            Body::Network(net) => return self.predict_network(net, x, rows, exit, ws),
        };
        let classes = self.file.meta.classes();
        let width = layers.iter().map(|l| l.spec().out_dim).chain([layers[0].spec().in_dim]).max().unwrap_or(0);
        if ws.rows < rows || ws.act[0].len() < rows * width {
            // Later predictions then allocate nothing, GEMM packing included.
            svp_tensor::try_reserve_workspaces().expect("memory for GEMM packing buffers");
            ws.act = [vec![0.0; rows * width], vec![0.0; rows * width]];
            let (norm_width, plain_width) = DenseCache::widths(layers.iter().map(|l| l.spec()));
            ws.cache = DenseCache::try_sized(rows, norm_width, plain_width).expect("memory for the layer cache");
            ws.rows = rows;
        }
        let max_params = layers.iter().map(|l| layer_param_len(l.spec())).max().unwrap_or(0);
        if ws.params.len() < max_params {
            ws.params = vec![0.0; max_params];
        }
        let last = exit.unwrap_or(layers.len());
        assert!((1..=layers.len()).contains(&last), "exit layer {last} out of range");
        let mut cur = 0;
        for (l, layer) in layers.iter().enumerate().take(last) {
            let spec = layer.spec();
            let params = &mut ws.params[..layer_param_len(spec)];
            self.file.layer_params_into(l, params);
            let (a, b) = ws.act.split_at_mut(1);
            let (src, dst) = if cur == 0 { (&a[0], &mut b[0]) } else { (&b[0], &mut a[0]) };
            let input = if l == 0 { view(x, rows, spec.in_dim) } else { view(src, rows, spec.in_dim) };
            layer.forward(params, input, &mut ws.cache, dst, Mode::Infer);
            cur = 1 - cur;
        }
        let out = if cur == 0 { &ws.act[0] } else { &ws.act[1] };
        match exit {
            Some(k) if k < layers.len() => {
                let heads = self.file.meta.heads.as_ref().expect("early exits need SVP projection heads");
                let width = layers[k - 1].spec().out_dim;
                let p = heads.for_layer(k, width, false);
                if ws.logits.len() < rows * heads.dim {
                    ws.logits = vec![0.0; rows * heads.dim];
                }
                if ws.tile.len() < EXIT_TILE_FLOATS.max(width) {
                    ws.tile = vec![0.0; EXIT_TILE_FLOATS.max(width)];
                }
                p.forward(view(out, rows, width), None, None, view_mut(&mut ws.logits, rows, heads.dim), &mut ws.tile);
                // Exits predict among the first `classes` entries of v_l.
                if heads.dim != classes {
                    for r in 0..rows {
                        ws.logits.copy_within(r * heads.dim..r * heads.dim + classes.min(heads.dim), r * classes);
                    }
                }
                &ws.logits[..rows * classes.min(heads.dim)]
            }
            _ => &out[..rows * classes],
        }
    }

    /// [`InferenceModel::predict`] for a conv network or ViT.
    fn predict_network<'w>(
        &self,
        net: &Network,
        x: &[f32],
        rows: usize,
        exit: Option<usize>,
        ws: &'w mut InferenceWorkspace,
    ) -> &'w [f32] {
        let classes = self.file.meta.classes();
        let head = net.n_layers();
        let last = exit.unwrap_or(head);
        assert!((1..=head).contains(&last), "exit layer {last} out of range");
        if last == head {
            return net.predict(x, rows, &mut ws.net, None);
        }
        let heads = self.file.meta.heads.as_ref().expect("early exits need SVP projection heads");
        net.predict(x, rows, &mut ws.net, Some(heads));
        let logits = ws.net.exit_logits(last - 1, rows);
        // Exits predict among the first `classes` entries of v_l.
        let kept = classes.min(heads.dim);
        ws.logits.clear();
        ws.logits.extend(logits.chunks_exact(heads.dim).flat_map(|row| &row[..kept]));
        &ws.logits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn matches_the_training_network_and_its_exits() {
        for dtype in [DType::F32, DType::F16, DType::I8] {
            let file = crate::tests::sample(dtype);
            let mlp = file.to_network();
            let heads = file.meta.heads.clone();
            let model = InferenceModel::new(file);
            let x: Vec<f32> = (0..4 * 6).map(|i| (i % 5) as f32 * 0.3 - 0.6).collect();
            let mut ws = InferenceWorkspace::default();
            let got = model.predict(&x, 4, None, &mut ws).to_vec();
            let mut train_ws = svp_net::InferenceWorkspace::default();
            let want = mlp.predict(&x, 4, &mut train_ws, heads.as_ref()).to_vec();
            assert_eq!(got, want, "{dtype:?} head");
            for k in 1..=2 {
                let exit = model.predict(&x, 4, Some(k), &mut ws).to_vec();
                assert_eq!(exit, train_ws.exit_logits(k - 1, 4), "{dtype:?} exit {k}");
            }
        }
    }

    /// A conv network and a ViT from a file predict what the network they
    /// were written from predicts, bit for bit in f32, exits included (the
    /// first `classes` of each exit's `d'` values).
    #[test]
    fn conv_and_vit_files_predict_as_their_networks() {
        for (name, config) in crate::tests::front_configs() {
            let (net, file) = crate::tests::front_file(&config, DType::F32);
            let heads = file.meta.heads.clone().unwrap();
            let model = InferenceModel::new(file);
            let x: Vec<f32> = (0..5 * 64).map(|i| ((i * 37) % 23) as f32 * 0.1 - 1.1).collect();
            let mut ws = InferenceWorkspace::default();
            let mut train_ws = svp_net::InferenceWorkspace::default();
            let want = net.predict(&x, 5, &mut train_ws, Some(&heads)).to_vec();
            assert_eq!(model.predict(&x, 5, None, &mut ws), &want[..], "{name} head");
            assert_eq!(model.hidden_layers(), net.n_layers() - 1);
            for k in 1..=model.hidden_layers() {
                let exit = model.predict(&x, 5, Some(k), &mut ws).to_vec();
                let full = train_ws.exit_logits(k - 1, 5);
                let kept: Vec<f32> = full.chunks_exact(heads.dim).flat_map(|r| r[..3].to_vec()).collect();
                assert_eq!(exit, kept, "{name} exit {k}");
            }
        }
    }
}
