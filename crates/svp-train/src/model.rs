//! The network and its inference path.

use crate::config::{Config, ModelConfig};
use serde::{Deserialize, Serialize};
use svp_alloc::OutOfMemory;
use svp_nn::{Dense, DenseCache, DenseSpec, Mode, Projection};
use svp_tensor::view;

/// The SVP projection heads of a model: enough to regenerate every `R_l`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProjectionHeads {
    /// Model seed.
    pub seed: u64,
    /// Projection width `d'`.
    pub dim: usize,
    /// Entry standard deviation; `None` = `1/sqrt(d_l)` per layer.
    pub sigma: Option<f32>,
    /// Dropout on the entries during training.
    pub dropout: f32,
    /// Label-concatenation variant (`Some(classes)`).
    pub label_classes: Option<usize>,
}

impl ProjectionHeads {
    /// The heads an SVP run of `config` uses on data with `classes` classes.
    pub fn from_config(config: &Config, classes: usize) -> Self {
        Self {
            seed: config.train.seed,
            dim: config.svp.projection_dim.unwrap_or(classes),
            sigma: config.svp.sigma,
            dropout: config.svp.projection_dropout,
            label_classes: config.svp.label_concat.then_some(classes),
        }
    }

    /// Projection of layer `layer` (0 = input) of width `width`.
    pub fn for_layer(&self, layer: usize, width: usize, with_labels: bool) -> Projection {
        Projection {
            seed: self.seed,
            layer: layer as u64,
            in_dim: width,
            out_dim: self.dim,
            sigma: self.sigma.unwrap_or(1.0 / (width as f32).sqrt()),
            dropout: self.dropout,
            label_classes: if with_labels { self.label_classes } else { None },
        }
    }
}

/// A multilayer perceptron: dense hidden blocks, then a linear head. All
/// parameters live in one contiguous buffer, layer after layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Network {
    input: usize,
    classes: usize,
    layers: Vec<Dense>,
    offsets: Vec<usize>,
    params: Vec<f32>,
}

impl Network {
    /// The layer specs of `config` for `input` features and `classes` classes.
    pub fn specs(input: usize, classes: usize, config: &ModelConfig) -> Vec<DenseSpec> {
        let mut specs = Vec::with_capacity(config.hidden.len() + 1);
        let mut width = input;
        for &w in &config.hidden {
            specs.push(DenseSpec {
                in_dim: width,
                out_dim: w,
                norm: config.norm,
                activation: config.activation,
                dropout: config.dropout,
            });
            width = w;
        }
        specs.push(DenseSpec::linear(width, classes));
        specs
    }

    /// A freshly initialized network (weights from `seed`).
    ///
    /// # Panics
    /// If the memory is not there (see [`Network::try_new`]).
    pub fn new(input: usize, classes: usize, config: &ModelConfig, seed: u64) -> Self {
        Self::try_new(input, classes, config, seed).expect("memory for the network's weights")
    }

    /// [`Network::new`], failing cleanly when the memory is not there.
    pub fn try_new(input: usize, classes: usize, config: &ModelConfig, seed: u64) -> Result<Self, OutOfMemory> {
        let mut m = Self::try_with_specs(Self::specs(input, classes, config))?;
        for l in 0..m.layers.len() {
            let range = m.offsets[l]..m.offsets[l + 1];
            m.layers[l].init_params(seed, &mut m.params[range]);
        }
        Ok(m)
    }

    /// A zero network of the given layers (the last one is the head).
    ///
    /// # Panics
    /// If `specs` is empty, consecutive widths do not chain, or the memory is not there.
    pub fn with_specs(specs: Vec<DenseSpec>) -> Self {
        Self::try_with_specs(specs).expect("memory for the network's weights")
    }

    /// [`Network::with_specs`], failing cleanly when the memory is not there.
    ///
    /// # Panics
    /// If `specs` is empty or consecutive widths do not chain.
    pub fn try_with_specs(specs: Vec<DenseSpec>) -> Result<Self, OutOfMemory> {
        assert!(!specs.is_empty(), "a network needs at least a head");
        for pair in specs.windows(2) {
            assert_eq!(pair[0].out_dim, pair[1].in_dim, "layer widths must chain");
        }
        let input = specs[0].in_dim;
        let classes = specs.last().map(|s| s.out_dim).unwrap_or(0);
        let layers: Vec<Dense> = specs.into_iter().enumerate().map(|(i, s)| Dense::new(s, i as u64 + 1)).collect();
        let mut offsets = vec![0];
        for l in &layers {
            offsets.push(offsets.last().copied().unwrap_or(0) + l.param_len());
        }
        let params = svp_alloc::try_zeros(*offsets.last().unwrap_or(&0), "the network's weights")?;
        Ok(Self { input, classes, layers, offsets, params })
    }

    /// Input width.
    pub fn input(&self) -> usize {
        self.input
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// All layers, the head last.
    pub fn layers(&self) -> &[Dense] {
        &self.layers
    }

    /// Number of hidden layers.
    pub fn hidden_layers(&self) -> usize {
        self.layers.len() - 1
    }

    /// Widest activation (input included).
    pub fn max_width(&self) -> usize {
        self.layers.iter().map(|l| l.spec().out_dim).chain([self.input]).max().unwrap_or(0)
    }

    /// Widest layer output (what activation and gradient buffers must hold; the
    /// input itself is never copied into them).
    pub fn max_out_width(&self) -> usize {
        self.layers.iter().map(|l| l.spec().out_dim).max().unwrap_or(0)
    }

    /// Largest parameter count of one layer.
    pub fn max_layer_params(&self) -> usize {
        self.layers.iter().map(Dense::param_len).max().unwrap_or(0)
    }

    /// All parameters, layer after layer.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// All parameters, mutable.
    pub fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    /// Parameters of layer `l` (0-based; the head is last).
    pub fn layer_params(&self, l: usize) -> &[f32] {
        &self.params[self.offsets[l]..self.offsets[l + 1]]
    }

    /// Layer `l` and its parameters, mutable.
    pub fn layer_mut(&mut self, l: usize) -> (&Dense, &mut [f32]) {
        (&self.layers[l], &mut self.params[self.offsets[l]..self.offsets[l + 1]])
    }

    /// Bytes of parameters.
    pub fn param_bytes(&self) -> usize {
        4 * self.params.len()
    }

    /// Logits of a batch `x` (rows x input) into `ws`; returns them (rows x classes).
    /// With `exits`, also writes each hidden layer's early-exit logits `R_l h_l`
    /// (see [`InferenceWorkspace::exit_logits`]).
    pub fn predict<'w>(
        &self,
        x: &[f32],
        rows: usize,
        ws: &'w mut InferenceWorkspace,
        exits: Option<&ProjectionHeads>,
    ) -> &'w [f32] {
        ws.ensure(rows, self, exits.map(|h| h.dim));
        let mut input_is_x = true;
        let mut cur = 0;
        for (l, layer) in self.layers.iter().enumerate() {
            let d_in = layer.spec().in_dim;
            let d_out = layer.spec().out_dim;
            let (a, b) = ws.act.split_at_mut(1);
            let (src, dst) = if cur == 0 { (&a[0], &mut b[0]) } else { (&b[0], &mut a[0]) };
            let input = if input_is_x { view(x, rows, d_in) } else { view(src, rows, d_in) };
            layer.forward(self.layer_params(l), input, &mut ws.cache, dst, Mode::Infer);
            if let Some(heads) = exits
                && l + 1 < self.layers.len()
            {
                let p = heads.for_layer(l + 1, d_out, false);
                let out = &mut ws.exits[l * rows * heads.dim..(l + 1) * rows * heads.dim];
                p.forward(view(dst, rows, d_out), None, None, svp_tensor::view_mut(out, rows, heads.dim), &mut ws.tile);
            }
            input_is_x = false;
            cur = 1 - cur;
        }
        let last = if cur == 0 { &ws.act[0] } else { &ws.act[1] };
        &last[..rows * self.classes]
    }
}

/// Buffers for [`Network::predict`], grown on first use and reused after.
#[derive(Debug, Default)]
pub struct InferenceWorkspace {
    act: [Vec<f32>; 2],
    cache: DenseCache,
    exits: Vec<f32>,
    tile: Vec<f32>,
    rows: usize,
    exit_dim: usize,
}

/// Tile of `R_l` used by inference-time exits.
const EXIT_TILE_FLOATS: usize = 16 * 1024;

impl InferenceWorkspace {
    fn ensure(&mut self, rows: usize, model: &Network, exit_dim: Option<usize>) {
        self.try_prepare(rows, model, exit_dim).expect("memory for inference buffers");
    }

    /// Sizes the buffers for batches of `rows` (and exits of width `exit_dim`)
    /// now, failing cleanly when the memory is not there; later predictions of
    /// up to that size allocate nothing.
    pub fn try_prepare(&mut self, rows: usize, model: &Network, exit_dim: Option<usize>) -> Result<(), OutOfMemory> {
        let width = model.max_out_width();
        let need = rows * width;
        if self.act[0].len() < need || self.rows < rows {
            self.act = [
                svp_alloc::try_zeros(need, "inference activations")?,
                svp_alloc::try_zeros(need, "inference activations")?,
            ];
            self.cache = DenseCache::try_new(rows, width)?;
            self.rows = rows;
        }
        if let Some(d) = exit_dim {
            let need = rows * d * model.hidden_layers();
            if self.exits.len() < need {
                self.exits = svp_alloc::try_zeros(need, "early-exit logits")?;
            }
            let tile = EXIT_TILE_FLOATS.max(model.max_width());
            if self.tile.len() < tile {
                self.tile = svp_alloc::try_zeros(tile, "a tile of R")?;
            }
            self.exit_dim = d;
        }
        Ok(())
    }

    /// Early-exit logits of hidden layer `l` (0-based) from the last
    /// [`Network::predict`] with exits: rows x `d'`.
    pub fn exit_logits(&self, l: usize, rows: usize) -> &[f32] {
        let n = rows * self.exit_dim;
        &self.exits[l * n..(l + 1) * n]
    }
}
