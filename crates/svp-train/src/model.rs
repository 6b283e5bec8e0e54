//! The network and its inference path.

use crate::config::{Config, ModelConfig};
use serde::{Deserialize, Serialize};
use svp_alloc::OutOfMemory;
use svp_nn::{ConvBlock, ConvBlockCache, ConvBlockSpec, Dense, DenseCache, DenseSpec, Mode, Projection};
use svp_tensor::{view, view_mut};

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

/// A feed-forward network: optional conv blocks, dense hidden blocks, then a
/// linear head. All parameters live in one contiguous buffer, layer after
/// layer. Layers are numbered globally, conv blocks first: layer `l` of a
/// network with `c` conv blocks is `convs()[l]` for `l < c`, else `layers()[l - c]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Network {
    input: usize,
    classes: usize,
    convs: Vec<ConvBlock>,
    layers: Vec<Dense>,
    offsets: Vec<usize>,
    params: Vec<f32>,
}

/// One layer of a [`Network`].
#[derive(Clone, Copy, Debug)]
pub enum Layer<'a> {
    /// A conv block.
    Conv(&'a ConvBlock),
    /// A dense block or the head.
    Dense(&'a Dense),
}

impl Layer<'_> {
    /// Forward over `rows` samples of `x` into `out` (conv blocks in training
    /// update their running statistics in `params`). A dense layer fills
    /// `dense`, a conv block `conv`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        params: &mut [f32],
        x: &[f32],
        rows: usize,
        dense: &mut DenseCache,
        conv: &mut ConvBlockCache,
        out: &mut [f32],
        mode: Mode,
    ) {
        match self {
            Layer::Conv(c) => c.forward(params, x, rows, conv, out, mode),
            Layer::Dense(d) => d.forward(params, view(x, rows, d.spec().in_dim), dense, out, mode),
        }
    }

    /// Backward of [`Layer::forward`] from `dout` (overwritten as scratch):
    /// the trained parameters' gradient into `grad`, and the input gradient
    /// into `dx` if given.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        dense: &DenseCache,
        conv: &mut ConvBlockCache,
        dout: &mut [f32],
        grad: &mut [f32],
        dx: Option<&mut [f32]>,
        mode: Mode,
    ) {
        match self {
            Layer::Conv(c) => c.backward(params, x, rows, conv, dout, grad, dx),
            Layer::Dense(d) => {
                let d_in = d.spec().in_dim;
                let dx = dx.map(|dx| view_mut(dx, rows, d_in));
                d.backward(params, view(x, rows, d_in), dense, dout, grad, dx, mode)
            }
        }
    }
}

impl Network {
    /// The conv block specs of `config` for `(height, width)` single-channel images.
    pub fn conv_specs(image_shape: (usize, usize), config: &ModelConfig) -> Vec<ConvBlockSpec> {
        let (mut c, (mut h, mut w)) = (1, image_shape);
        let mut specs = Vec::new();
        for (out_channels, pool) in config.conv_blocks() {
            specs.push(ConvBlockSpec {
                in_channels: c,
                in_h: h,
                in_w: w,
                out_channels,
                pool,
                readout: config.conv_readout,
            });
            c = out_channels;
            if pool {
                (h, w) = (h / 2, w / 2);
            }
        }
        specs
    }

    /// A freshly initialized network for images of `image_shape` (conv blocks
    /// need the shape; an MLP sees only its `h * w` features).
    pub fn try_for_images(
        image_shape: (usize, usize),
        classes: usize,
        config: &ModelConfig,
        seed: u64,
    ) -> Result<Self, OutOfMemory> {
        let convs = Self::conv_specs(image_shape, config);
        let flat = convs.last().map_or(image_shape.0 * image_shape.1, |s| {
            let b = ConvBlock::new(*s, 0);
            b.output().len()
        });
        let mut m = Self::try_with_blocks(convs, Self::specs(flat, classes, config))?;
        m.input = image_shape.0 * image_shape.1;
        m.init(seed);
        Ok(m)
    }

    fn init(&mut self, seed: u64) {
        for l in 0..self.n_layers() {
            let range = self.offsets[l]..self.offsets[l + 1];
            match self.layer(l) {
                Layer::Conv(c) => c.clone().init_params(seed, &mut self.params[range]),
                Layer::Dense(d) => d.clone().init_params(seed, &mut self.params[range]),
            }
        }
    }

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
    ///
    /// # Panics
    /// If `config` has conv blocks (they need the image shape: [`Network::try_for_images`]).
    pub fn try_new(input: usize, classes: usize, config: &ModelConfig, seed: u64) -> Result<Self, OutOfMemory> {
        assert!(config.conv.is_empty(), "a network with conv blocks needs the image shape");
        let mut m = Self::try_with_specs(Self::specs(input, classes, config))?;
        m.init(seed);
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
        Self::try_with_blocks(Vec::new(), specs)
    }

    /// A zero network of conv blocks, then dense layers (the last one is the head).
    ///
    /// # Panics
    /// If `specs` is empty or consecutive shapes do not chain.
    pub fn try_with_blocks(conv: Vec<ConvBlockSpec>, specs: Vec<DenseSpec>) -> Result<Self, OutOfMemory> {
        assert!(!specs.is_empty(), "a network needs at least a head");
        for pair in specs.windows(2) {
            assert_eq!(pair[0].out_dim, pair[1].in_dim, "layer widths must chain");
        }
        let n_conv = conv.len();
        let convs: Vec<ConvBlock> =
            conv.into_iter().enumerate().map(|(i, s)| ConvBlock::new(s, i as u64 + 1)).collect();
        for pair in convs.windows(2) {
            assert_eq!(pair[0].output(), pair[1].spec().input(), "conv shapes must chain");
        }
        if let Some(last) = convs.last() {
            assert_eq!(last.output().len(), specs[0].in_dim, "the first dense layer reads the last conv block");
        }
        let input = convs.first().map_or(specs[0].in_dim, |c| c.spec().input().len());
        let classes = specs.last().map(|s| s.out_dim).unwrap_or(0);
        let layers: Vec<Dense> =
            specs.into_iter().enumerate().map(|(i, s)| Dense::new(s, (n_conv + i) as u64 + 1)).collect();
        let mut offsets = vec![0];
        let lens = convs.iter().map(ConvBlock::param_len).chain(layers.iter().map(Dense::param_len));
        for len in lens {
            offsets.push(offsets.last().copied().unwrap_or(0) + len);
        }
        let params = svp_alloc::try_zeros(*offsets.last().unwrap_or(&0), "the network's weights")?;
        Ok(Self { input, classes, convs, layers, offsets, params })
    }

    /// Input width.
    pub fn input(&self) -> usize {
        self.input
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The dense layers, the head last.
    pub fn layers(&self) -> &[Dense] {
        &self.layers
    }

    /// The conv blocks, first to last.
    pub fn convs(&self) -> &[ConvBlock] {
        &self.convs
    }

    /// Number of layers: conv blocks, dense blocks and the head.
    pub fn n_layers(&self) -> usize {
        self.convs.len() + self.layers.len()
    }

    /// Layer `l` (global numbering, see [`Network`]).
    pub fn layer(&self, l: usize) -> Layer<'_> {
        match l.checked_sub(self.convs.len()) {
            None => Layer::Conv(&self.convs[l]),
            Some(d) => Layer::Dense(&self.layers[d]),
        }
    }

    /// Number of hidden layers (conv and dense; the head excluded).
    pub fn hidden_layers(&self) -> usize {
        self.n_layers() - 1
    }

    /// Values per sample of layer `l`'s output.
    pub fn out_len(&self, l: usize) -> usize {
        match self.layer(l) {
            Layer::Conv(c) => c.output().len(),
            Layer::Dense(d) => d.spec().out_dim,
        }
    }

    /// Values per sample of what layer `l`'s projection head reads: a conv
    /// block's pooled readout, a dense block's output.
    pub fn readout_len(&self, l: usize) -> usize {
        match self.layer(l) {
            Layer::Conv(c) => c.readout().output().len(),
            Layer::Dense(d) => d.spec().out_dim,
        }
    }

    /// Widest activation (input included).
    pub fn max_width(&self) -> usize {
        (0..self.n_layers()).map(|l| self.out_len(l)).chain([self.input]).max().unwrap_or(0)
    }

    /// Widest layer output (what activation and gradient buffers must hold; the
    /// input itself is never copied into them).
    pub fn max_out_width(&self) -> usize {
        (0..self.n_layers()).map(|l| self.out_len(l)).max().unwrap_or(0)
    }

    /// Widest projection-head input.
    pub fn max_readout_len(&self) -> usize {
        (0..self.n_layers()).map(|l| self.readout_len(l)).max().unwrap_or(0)
    }

    /// Largest parameter count of one layer.
    pub fn max_layer_params(&self) -> usize {
        (0..self.n_layers()).map(|l| self.offsets[l + 1] - self.offsets[l]).max().unwrap_or(0)
    }

    /// Parameters of layer `l` that the optimizer trains (a conv block's
    /// BatchNorm running statistics follow them and are not trained).
    pub fn trainable_len(&self, l: usize) -> usize {
        match self.layer(l) {
            Layer::Conv(c) => c.trainable_len(),
            Layer::Dense(d) => d.param_len(),
        }
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
    pub fn layer_mut(&mut self, l: usize) -> (Layer<'_>, &mut [f32]) {
        let params = &mut self.params[self.offsets[l]..self.offsets[l + 1]];
        let layer = match l.checked_sub(self.convs.len()) {
            None => Layer::Conv(&self.convs[l]),
            Some(d) => Layer::Dense(&self.layers[d]),
        };
        (layer, params)
    }

    /// Parameters of layer `l`, mutable.
    pub fn layer_params_mut(&mut self, l: usize) -> &mut [f32] {
        &mut self.params[self.offsets[l]..self.offsets[l + 1]]
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
        let mut cur = 0;
        for l in 0..self.n_layers() {
            let (a, b) = ws.act.split_at_mut(1);
            let (src, dst) = if cur == 0 { (&a[0], &mut b[0]) } else { (&b[0], &mut a[0]) };
            let input = if l == 0 { x } else { &src[..] };
            let d_out = self.out_len(l);
            match self.layer(l) {
                Layer::Conv(c) => c.infer(self.layer_params(l), input, rows, &mut ws.conv_cache, dst),
                Layer::Dense(d) => {
                    let d_in = d.spec().in_dim;
                    d.forward(self.layer_params(l), view(input, rows, d_in), &mut ws.cache, dst, Mode::Infer);
                }
            }
            if let Some(heads) = exits
                && l + 1 < self.n_layers()
            {
                let width = self.readout_len(l);
                let read = match self.layer(l) {
                    Layer::Conv(c) => {
                        c.readout().forward(&dst[..rows * d_out], rows, &mut ws.readout);
                        &ws.readout[..rows * width]
                    }
                    Layer::Dense(_) => &dst[..rows * d_out],
                };
                let p = heads.for_layer(l + 1, width, false);
                let out = &mut ws.exits[l * rows * heads.dim..(l + 1) * rows * heads.dim];
                p.forward(view(read, rows, width), None, None, view_mut(out, rows, heads.dim), &mut ws.tile);
            }
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
    conv_cache: ConvBlockCache,
    readout: Vec<f32>,
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
            self.conv_cache = ConvBlockCache::try_new_for(model.convs(), rows)?;
            self.rows = rows;
        }
        if let Some(d) = exit_dim {
            let need = rows * d * model.hidden_layers();
            if self.exits.len() < need {
                self.exits = svp_alloc::try_zeros(need, "early-exit logits")?;
            }
            if !model.convs().is_empty() && self.readout.len() < rows * model.max_readout_len() {
                self.readout = svp_alloc::try_zeros(rows * model.max_readout_len(), "conv readouts")?;
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
