//! The network and its inference path.

use crate::config::{Config, ModelConfig};
use serde::{Deserialize, Serialize};
use svp_alloc::OutOfMemory;
use svp_nn::vit::{BlockCache, BlockSpec, PatchEmbed, TokenHead, TokenReadout, TransformerBlock};
use svp_nn::{ConvBlock, ConvBlockCache, ConvBlockSpec, Dense, DenseCache, DenseSpec, Mode, Projection};
use svp_tensor::{GradientSink, view, view_mut};

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

    /// Sets `config`'s seed and projection options to these heads', so that
    /// an SVP run of it regenerates the same `R_l`: fine-tuning a model must
    /// align its layers to the projections they were trained against, not to
    /// fresh ones. Options the heads do not fix (lambda, the first layer's
    /// target, ...) are left as they are.
    pub fn configure(&self, config: &mut Config) {
        config.train.seed = self.seed;
        config.svp.projection_dim = Some(self.dim);
        config.svp.sigma = self.sigma;
        config.svp.projection_dropout = self.dropout;
        config.svp.label_concat = self.label_classes.is_some();
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

/// A feed-forward network: optional conv blocks or a vision transformer,
/// dense hidden blocks, then a linear head. All parameters live in one
/// contiguous buffer, layer after layer. Layers are numbered globally, front
/// layers (conv blocks, or a ViT's patch embedding, blocks and token head)
/// first: layer `l` of a network with `f` front layers is a front layer for
/// `l < f`, else `layers()[l - f]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Network {
    input: usize,
    classes: usize,
    front: Vec<Front>,
    layers: Vec<Dense>,
    offsets: Vec<usize>,
    params: Vec<f32>,
}

/// A layer before the dense ones.
#[derive(Clone, Debug, PartialEq)]
enum Front {
    Conv(ConvBlock),
    Patch(PatchEmbed),
    Block(TransformerBlock),
    Readout(TokenHead),
}

fn front_layer(f: &Front) -> Layer<'_> {
    match f {
        Front::Conv(c) => Layer::Conv(c),
        Front::Patch(p) => Layer::Patch(p),
        Front::Block(b) => Layer::Block(b),
        Front::Readout(r) => Layer::Readout(r),
    }
}

/// One layer of a [`Network`].
#[derive(Clone, Copy, Debug)]
pub enum Layer<'a> {
    /// A conv block.
    Conv(&'a ConvBlock),
    /// A ViT's patch embedding (always a network's first layer).
    Patch(&'a PatchEmbed),
    /// A transformer block.
    Block(&'a TransformerBlock),
    /// A ViT's readout token, layer-normalized.
    Readout(&'a TokenHead),
    /// A dense block or the head.
    Dense(&'a Dense),
}

/// What layers' backward passes need from their forward passes: one part per
/// kind of layer, each sized for the largest of the layers it serves.
#[derive(Debug, Default)]
pub struct LayerCache {
    dense: DenseCache,
    conv: ConvBlockCache,
    block: BlockCache,
    patches: Vec<f32>,
}

impl LayerCache {
    /// A cache that serves any one of `layers` at a time, for batches of up to `rows`.
    pub fn try_for<'a>(layers: impl IntoIterator<Item = Layer<'a>>, rows: usize) -> Result<Self, OutOfMemory> {
        let (mut convs, mut block, mut patches, mut readout_width, mut dense) = (Vec::new(), None, 0, 0, Vec::new());
        for layer in layers {
            match layer {
                Layer::Conv(c) => convs.push(c),
                Layer::Patch(p) => patches = patches.max(p.scratch_len(rows)),
                Layer::Block(b) => block = Some(b.spec),
                Layer::Readout(r) => readout_width = readout_width.max(r.dim),
                Layer::Dense(d) => dense.push(d.spec()),
            }
        }
        let (norm_width, plain_width) = DenseCache::widths(dense);
        Ok(Self {
            dense: DenseCache::try_sized(rows, norm_width.max(readout_width), plain_width)?,
            conv: ConvBlockCache::try_new_for(convs, rows)?,
            block: block.map_or(Ok(BlockCache::default()), |spec| BlockCache::try_new(&spec, rows))?,
            patches: svp_alloc::try_zeros(patches, "unfolded patches")?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.dense.bytes() + self.conv.bytes() + self.block.bytes() + 4 * self.patches.len()
    }
}

impl Layer<'_> {
    /// Forward over `rows` samples of `x` into `out`, filling `cache` (conv
    /// blocks in training also update their running statistics in `params`).
    pub fn forward(
        &self,
        params: &mut [f32],
        x: &[f32],
        rows: usize,
        cache: &mut LayerCache,
        out: &mut [f32],
        mode: Mode,
    ) {
        match self {
            Layer::Conv(c) => c.forward(params, x, rows, &mut cache.conv, out, mode),
            Layer::Patch(p) => p.forward(params, x, rows, &mut cache.patches, out),
            Layer::Block(b) => b.forward(params, x, rows, &mut cache.block, out),
            Layer::Readout(r) => r.forward(params, x, rows, &mut cache.dense, out),
            Layer::Dense(d) => d.forward(params, view(x, rows, d.spec().in_dim), &mut cache.dense, out, mode),
        }
    }

    /// Inference forward (no dropout, BatchNorm with running statistics).
    pub fn infer(&self, params: &[f32], x: &[f32], rows: usize, cache: &mut LayerCache, out: &mut [f32]) {
        match self {
            Layer::Conv(c) => c.infer(params, x, rows, &mut cache.conv, out),
            Layer::Patch(p) => p.forward(params, x, rows, &mut cache.patches, out),
            Layer::Block(b) => b.forward(params, x, rows, &mut cache.block, out),
            Layer::Readout(r) => r.forward(params, x, rows, &mut cache.dense, out),
            Layer::Dense(d) => d.forward(params, view(x, rows, d.spec().in_dim), &mut cache.dense, out, Mode::Infer),
        }
    }

    /// Backward of [`Layer::forward`] from `dout` (overwritten as scratch):
    /// the trained parameters' gradient into `grad`, and the input gradient
    /// into `dx` if given (a patch embedding has none: it reads the images).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &[f32],
        x: &[f32],
        rows: usize,
        cache: &mut LayerCache,
        dout: &mut [f32],
        grad: &mut [f32],
        dx: Option<&mut [f32]>,
        mode: Mode,
    ) {
        match self {
            Layer::Conv(c) => c.backward(params, x, rows, &mut cache.conv, dout, grad, dx),
            Layer::Patch(p) => {
                assert!(dx.is_none(), "a patch embedding reads the input images: no input gradient");
                p.backward(x, rows, &mut cache.patches, dout, grad);
            }
            Layer::Block(b) => b.backward(params, rows, &mut cache.block, dout, grad, dx),
            Layer::Readout(r) => r.backward(params, rows, &mut cache.dense, dout, grad, dx),
            Layer::Dense(d) => {
                let d_in = d.spec().in_dim;
                let dx = dx.map(|dx| view_mut(dx, rows, d_in));
                d.backward(params, view(x, rows, d_in), &mut cache.dense, dout, grad, dx, mode)
            }
        }
    }

    /// [`Layer::backward`] followed by the update of the layer's first
    /// `trainable` parameters through `update`: a dense block hands its weight
    /// gradient from the GEMM straight to `update` ([`Dense::backward_update`];
    /// `grad` needs room for the rest only), other layers store their whole
    /// gradient in `grad` first ([`Network::max_stored_gradient_len`] sizes it).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_update<U: GradientSink>(
        &self,
        params: &mut [f32],
        trainable: usize,
        x: &[f32],
        rows: usize,
        cache: &mut LayerCache,
        dout: &mut [f32],
        grad: &mut [f32],
        dx: Option<&mut [f32]>,
        mode: Mode,
        update: &mut U,
    ) {
        match self {
            Layer::Dense(d) => {
                assert_eq!(trainable, d.param_len(), "a dense block's parameters are all trainable");
                let d_in = d.spec().in_dim;
                let dx = dx.map(|dx| view_mut(dx, rows, d_in));
                d.backward_update(params, view(x, rows, d_in), &mut cache.dense, dout, grad, dx, mode, update);
            }
            _ => {
                let grad = &mut grad[..trainable];
                self.backward(params, x, rows, cache, dout, grad, dx, mode);
                update.apply(0, &mut params[..trainable], grad);
            }
        }
    }

    /// How a projection head reads this layer's output, if not as it is.
    pub fn readout(&self) -> Readout {
        match self {
            Layer::Conv(c) => Readout::Pool(c.readout()),
            Layer::Block(b) => Readout::Token { tokens: b.spec.tokens, dim: b.spec.dim },
            _ => Readout::Whole,
        }
    }
}

/// How a projection head (SVP's local loss, an early exit) reads a layer's output.
#[derive(Clone, Copy, Debug)]
pub enum Readout {
    /// The output itself.
    Whole,
    /// A conv block's adaptive average pooling.
    Pool(svp_nn::conv::Pool2d),
    /// A transformer block's readout token (the network's [`TokenReadout`]).
    Token {
        /// Tokens per sample.
        tokens: usize,
        /// Token width.
        dim: usize,
    },
}

impl Readout {
    /// Values per sample read from a layer output of `out_len`.
    pub fn len(&self, out_len: usize) -> usize {
        match self {
            Readout::Whole => out_len,
            Readout::Pool(p) => p.output().len(),
            Readout::Token { dim, .. } => *dim,
        }
    }

    /// What a head reads from `h` (`rows` samples of `out_len`): `h` itself,
    /// or the pooled or token readout written into `buf`.
    pub fn read<'a>(
        &self,
        h: &'a [f32],
        rows: usize,
        out_len: usize,
        token: TokenReadout,
        buf: &'a mut [f32],
    ) -> &'a [f32] {
        match self {
            Readout::Whole => &h[..rows * out_len],
            Readout::Pool(p) => {
                p.forward(h, rows, buf);
                &buf[..rows * p.output().len()]
            }
            Readout::Token { tokens, dim } => {
                token.forward(h, rows, *tokens, *dim, buf);
                &buf[..rows * dim]
            }
        }
    }

    /// The gradient wrt `h` (into `dh`, overwriting) from the gradient wrt the readout.
    pub fn backward(
        &self,
        h: &[f32],
        rows: usize,
        out_len: usize,
        token: TokenReadout,
        d_read: &[f32],
        dh: &mut [f32],
    ) {
        match self {
            Readout::Whole => dh[..rows * out_len].copy_from_slice(&d_read[..rows * out_len]),
            Readout::Pool(p) => p.backward(h, rows, d_read, dh),
            Readout::Token { tokens, dim } => token.backward(d_read, rows, *tokens, *dim, dh),
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

    /// A freshly initialized network for single-channel images of
    /// `image_shape` (conv blocks and a ViT need the shape; an MLP sees only
    /// its `h * w` features).
    pub fn try_for_images(
        image_shape: (usize, usize),
        classes: usize,
        config: &ModelConfig,
        seed: u64,
    ) -> Result<Self, OutOfMemory> {
        let mut m = Self::try_zeroed_for_images(image_shape, classes, config)?;
        m.init(seed);
        Ok(m)
    }

    /// [`Network::try_for_images`] with every parameter zero and not yet
    /// written ([`svp_alloc::try_zeroed`]): a run reserves the weights with
    /// the rest of its memory, then [`Network::init`]s them once all of it
    /// fits.
    pub fn try_zeroed_for_images(
        image_shape: (usize, usize),
        classes: usize,
        config: &ModelConfig,
    ) -> Result<Self, OutOfMemory> {
        let mut front: Vec<Front> = Self::conv_specs(image_shape, config)
            .into_iter()
            .enumerate()
            .map(|(i, s)| Front::Conv(ConvBlock::new(s, i as u64 + 1)))
            .collect();
        if let Some(v) = &config.vit {
            let patch = PatchEmbed { channels: 1, h: image_shape.0, w: image_shape.1, patch: v.patch, dim: v.dim };
            let spec = BlockSpec { tokens: patch.tokens(), dim: v.dim, heads: v.heads, mlp: v.mlp };
            front.push(Front::Patch(patch));
            front.extend((0..v.depth).map(|_| Front::Block(TransformerBlock { spec })));
            front.push(Front::Readout(TokenHead { tokens: spec.tokens, dim: v.dim, readout: v.readout }));
        }
        let flat = match front.last() {
            None => image_shape.0 * image_shape.1,
            Some(Front::Conv(c)) => c.output().len(),
            Some(Front::Readout(r)) => r.dim,
            Some(_) => unreachable!("a ViT ends with its token head"),
        };
        let mut m = Self::try_with_front(front, Self::specs(flat, classes, config))?;
        m.input = image_shape.0 * image_shape.1;
        Ok(m)
    }

    /// Draws every layer's initial weights from `seed`.
    pub fn init(&mut self, seed: u64) {
        for l in 0..self.n_layers() {
            let (layer, params) = self.layer_mut(l);
            match layer {
                Layer::Conv(c) => c.init_params(seed, params),
                Layer::Patch(p) => p.init_params(seed, l as u64 + 1, params),
                Layer::Block(b) => b.init_params(seed, l as u64 + 1, params),
                Layer::Readout(r) => r.init_params(params),
                Layer::Dense(d) => d.init_params(seed, params),
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
    /// If `config` has conv blocks or a ViT (they need the image shape: [`Network::try_for_images`]).
    pub fn try_new(input: usize, classes: usize, config: &ModelConfig, seed: u64) -> Result<Self, OutOfMemory> {
        assert!(config.conv.is_empty() && config.vit.is_none(), "a conv or ViT network needs the image shape");
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
        Self::try_with_front(Vec::new(), specs)
    }

    fn try_with_front(front: Vec<Front>, specs: Vec<DenseSpec>) -> Result<Self, OutOfMemory> {
        assert!(!specs.is_empty(), "a network needs at least a head");
        for pair in specs.windows(2) {
            assert_eq!(pair[0].out_dim, pair[1].in_dim, "layer widths must chain");
        }
        let n_front = front.len();
        let input = match front.first() {
            None => specs[0].in_dim,
            Some(Front::Conv(c)) => c.spec().input().len(),
            Some(Front::Patch(p)) => p.input().len(),
            Some(_) => panic!("a ViT starts with its patch embedding"),
        };
        let classes = specs.last().map(|s| s.out_dim).unwrap_or(0);
        let layers: Vec<Dense> =
            specs.into_iter().enumerate().map(|(i, s)| Dense::new(s, (n_front + i) as u64 + 1)).collect();
        let lens = front.iter().map(|f| match f {
            Front::Conv(c) => c.param_len(),
            Front::Patch(p) => p.param_len(),
            Front::Block(b) => b.param_len(),
            Front::Readout(r) => r.param_len(),
        });
        let mut offsets = vec![0];
        for len in lens.chain(layers.iter().map(Dense::param_len)) {
            offsets.push(offsets.last().copied().unwrap_or(0) + len);
        }
        let params = svp_alloc::try_zeros(*offsets.last().unwrap_or(&0), "the network's weights")?;
        let m = Self { input, classes, front, layers, offsets, params };
        for l in 1..m.n_layers() {
            let want = match m.layer(l) {
                Layer::Conv(c) => c.spec().input().len(),
                Layer::Patch(_) => panic!("a patch embedding must be the first layer"),
                Layer::Block(b) => b.sample_len(),
                Layer::Readout(r) => r.tokens * r.dim,
                Layer::Dense(d) => d.spec().in_dim,
            };
            assert_eq!(m.out_len(l - 1), want, "layer {} does not read what layer {l} writes", l + 1);
        }
        Ok(m)
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

    /// Whether every layer is dense (what model files of format v1 hold).
    pub fn is_mlp(&self) -> bool {
        self.front.is_empty()
    }

    /// Number of layers: front layers, dense blocks and the head.
    pub fn n_layers(&self) -> usize {
        self.front.len() + self.layers.len()
    }

    /// Every layer, first to last.
    pub fn all_layers(&self) -> impl Iterator<Item = Layer<'_>> {
        (0..self.n_layers()).map(|l| self.layer(l))
    }

    /// Layer `l` (global numbering, see [`Network`]).
    pub fn layer(&self, l: usize) -> Layer<'_> {
        match self.front.get(l) {
            Some(f) => front_layer(f),
            None => Layer::Dense(&self.layers[l - self.front.len()]),
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
            Layer::Patch(p) => p.tokens() * p.dim,
            Layer::Block(b) => b.sample_len(),
            Layer::Readout(r) => r.dim,
            Layer::Dense(d) => d.spec().out_dim,
        }
    }

    /// Values per sample of what layer `l`'s projection head reads: a conv
    /// block's pooled readout, a transformer block's readout token, the output
    /// of anything else.
    pub fn readout_len(&self, l: usize) -> usize {
        self.layer(l).readout().len(self.out_len(l))
    }

    /// Which token a ViT's projection heads and classifier read.
    pub fn token_readout(&self) -> TokenReadout {
        self.front
            .iter()
            .find_map(|f| match f {
                Front::Readout(r) => Some(r.readout),
                _ => None,
            })
            .unwrap_or(TokenReadout::Cls)
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

    /// The most gradient values the update of one layer from `first_trained`
    /// on stores ([`Layer::backward_update`]): with `weights_fused`, dense
    /// blocks store only their bias's and norm's, their weights' going
    /// straight from the GEMM to the optimizer; every other layer stores all
    /// of its own.
    pub fn max_stored_gradient_len(&self, first_trained: usize, weights_fused: bool) -> usize {
        let stored = |l: usize| match self.layer(l) {
            Layer::Dense(d) if weights_fused => d.fused_gradient_len(),
            _ => self.trainable_len(l),
        };
        (first_trained..self.n_layers()).map(stored).max().unwrap_or(0)
    }

    /// Parameters of layer `l` that the optimizer trains (a conv block's
    /// BatchNorm running statistics follow them and are not trained).
    pub fn trainable_len(&self, l: usize) -> usize {
        match self.layer(l) {
            Layer::Conv(c) => c.trainable_len(),
            _ => self.offsets[l + 1] - self.offsets[l],
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
        let layer = match self.front.get(l) {
            Some(f) => front_layer(f),
            None => Layer::Dense(&self.layers[l - self.front.len()]),
        };
        (layer, params)
    }

    /// Parameters of layer `l`, mutable.
    pub fn layer_params_mut(&mut self, l: usize) -> &mut [f32] {
        &mut self.params[self.offsets[l]..self.offsets[l + 1]]
    }

    /// The first layer (0-based; the head is last) holding a NaN or an
    /// infinity, if any: a model file takes only finite weights.
    pub fn first_non_finite_layer(&self) -> Option<usize> {
        (0..self.n_layers()).find(|&l| !self.layer_params(l).iter().all(|v| v.is_finite()))
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
        let token = self.token_readout();
        let mut cur = 0;
        for l in 0..self.n_layers() {
            let (a, b) = ws.act.split_at_mut(1);
            let (src, dst) = if cur == 0 { (&a[0], &mut b[0]) } else { (&b[0], &mut a[0]) };
            let input = if l == 0 { x } else { &src[..] };
            let layer = self.layer(l);
            layer.infer(self.layer_params(l), input, rows, &mut ws.cache, dst);
            if let Some(heads) = exits
                && l + 1 < self.n_layers()
            {
                let width = self.readout_len(l);
                let read = layer.readout().read(dst, rows, self.out_len(l), token, &mut ws.readout);
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
    cache: LayerCache,
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
            svp_tensor::try_reserve_workspaces()?;
            self.act = [
                svp_alloc::try_zeros(need, "inference activations")?,
                svp_alloc::try_zeros(need, "inference activations")?,
            ];
            self.cache = LayerCache::try_for(model.all_layers(), rows)?;
            self.rows = rows;
        }
        if let Some(d) = exit_dim {
            let need = rows * d * model.hidden_layers();
            if self.exits.len() < need {
                self.exits = svp_alloc::try_zeros(need, "early-exit logits")?;
            }
            if !model.is_mlp() && self.readout.len() < rows * model.max_readout_len() {
                self.readout = svp_alloc::try_zeros(rows * model.max_readout_len(), "projection readouts")?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SvpConfig, TrainConfig};

    #[test]
    fn configured_heads_are_the_heads_a_run_regenerates() {
        let cases = [
            ProjectionHeads { seed: 3, dim: 10, sigma: None, dropout: 0.0, label_classes: None },
            ProjectionHeads { seed: 42, dim: 64, sigma: Some(0.25), dropout: 0.1, label_classes: Some(10) },
        ];
        for heads in cases {
            let mut config = Config {
                model: ModelConfig::mlp(vec![8]),
                svp: SvpConfig { lambda: 0.5, ..SvpConfig::default() },
                train: TrainConfig { seed: 11, ..TrainConfig::default() },
                optimizer: svp_optim::Optimizer::adam(1e-3),
                schedule: crate::Schedule::default(),
            };
            assert_ne!(ProjectionHeads::from_config(&config, 10), heads);
            heads.configure(&mut config);
            assert_eq!(ProjectionHeads::from_config(&config, 10), heads);
            assert_eq!(config.svp.lambda, 0.5, "options the heads do not fix are kept");
        }
    }
}
