//! The inference path. For an MLP it is lean: a model file's bytes, and one
//! buffer into which each layer is dequantized in turn; no optimizer state, no
//! training workspace, no f32 copy of the whole network. A conv network or a
//! ViT is dequantized once into an f32 network (its layers need their own
//! caches and shapes) and runs through [`Network::predict`].

use crate::{ModelError, ModelFile};
use std::path::Path;
use svp_net::{InferenceWorkspace, Network, predict_streamed};

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

    /// The model file it reads.
    pub fn file(&self) -> &ModelFile {
        &self.file
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
    /// for SVP models: the first `classes` entries of `v_k`). Returns `rows x
    /// classes` values.
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
        let heads = || self.file.meta.heads.as_ref().expect("early exits need SVP projection heads");
        // The head is the last "exit": its own logits.
        let exit = exit.filter(|&k| k != self.hidden_layers() + 1);
        match &self.body {
            Body::Lean(layers) => {
                let load = |l, params: &mut [f32]| self.file.layer_params_into(l, params);
                predict_streamed(layers, x, rows, exit.map(|k| (k, heads())), load, ws)
            }
            Body::Network(net) => match exit {
                Some(k) => net.predict_exit(x, rows, k, heads(), ws),
                None => net.predict(x, rows, ws, None),
            },
        }
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
            let mut train_ws = InferenceWorkspace::default();
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
            let mut train_ws = InferenceWorkspace::default();
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
