//! The network: its layers in order, with all parameters in one buffer.

use crate::arch::ModelConfig;
use crate::layer::Layer;
use svp_alloc::OutOfMemory;
use svp_nn::conv::Chw;
use svp_nn::mobile_block::{MobileBlock, MobileBlockSpec};
use svp_nn::vit::{BlockOutput, BlockSpec, PatchEmbed, TokenHead, TokenReadout, TransformerBlock};
use svp_nn::{ConvBlock, ConvBlockSpec, Dense, DenseSpec};

/// A feed-forward network: optional conv and mobile blocks or a vision transformer,
/// dense hidden blocks, then a linear head. All parameters live in one
/// contiguous buffer, layer after layer. Layers are numbered globally, front
/// layers (conv blocks, or a ViT's patch embedding, blocks and token head)
/// first: layer `l` of a network with `f` front layers is a front layer for
/// `l < f`, else `layers()[l - f]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Network {
    pub(crate) input: usize,
    pub(crate) classes: usize,
    front: Vec<FrontLayer>,
    layers: Vec<Dense>,
    offsets: Vec<usize>,
    params: Vec<f32>,
}

/// A layer before the dense ones.
#[derive(Clone, Debug, PartialEq)]
enum FrontLayer {
    Conv(ConvBlock),
    Mobile(MobileBlock),
    Patch(PatchEmbed),
    Block(TransformerBlock),
    Readout(TokenHead),
}

fn front_layer(f: &FrontLayer) -> Layer<'_> {
    match f {
        FrontLayer::Conv(c) => Layer::Conv(c),
        FrontLayer::Mobile(m) => Layer::Mobile(m),
        FrontLayer::Patch(p) => Layer::Patch(p),
        FrontLayer::Block(b) => Layer::Block(b),
        FrontLayer::Readout(r) => Layer::Readout(r),
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
        let mut front: Vec<FrontLayer> = Self::conv_specs(image_shape, config)
            .into_iter()
            .enumerate()
            .map(|(i, s)| FrontLayer::Conv(ConvBlock::new(s, i as u64 + 1)))
            .collect();
        // Mobile blocks read what the conv blocks (their stem) write.
        let mut shape = match front.last() {
            Some(FrontLayer::Conv(c)) => c.output(),
            _ => Chw { c: 1, h: image_shape.0, w: image_shape.1 },
        };
        for m in &config.mobile {
            let spec = MobileBlockSpec {
                input: shape,
                out_channels: m.channels,
                expansion: m.expansion,
                stride: m.stride,
                readout: config.conv_readout,
            };
            let block = MobileBlock::new(spec, front.len() as u64 + 1);
            shape = block.output();
            front.push(FrontLayer::Mobile(block));
        }
        if let Some(v) = &config.vit {
            let patch = PatchEmbed { channels: 1, h: image_shape.0, w: image_shape.1, patch: v.patch, dim: v.dim };
            let spec = BlockSpec { tokens: patch.tokens(), dim: v.dim, heads: v.heads, mlp: v.mlp };
            front.push(FrontLayer::Patch(patch));
            let block = TransformerBlock { norm_eps: v.norm_eps, ..TransformerBlock::new(spec) };
            front.extend((0..v.depth).map(|_| FrontLayer::Block(block)));
            // The token head reads the last block's class token alone: that block need compute no other.
            if let (TokenReadout::Cls, Some(FrontLayer::Block(last))) = (v.readout, front.last_mut()) {
                last.output = BlockOutput::ClassToken;
            }
            let (tokens, dim, readout, norm_eps) = (spec.tokens, v.dim, v.readout, v.norm_eps);
            front.push(FrontLayer::Readout(TokenHead { tokens, dim, readout, norm_eps }));
        }
        let flat = match front.last() {
            None => image_shape.0 * image_shape.1,
            Some(FrontLayer::Conv(c)) => c.output().len(),
            Some(FrontLayer::Mobile(m)) => m.output().len(),
            Some(FrontLayer::Readout(r)) => r.dim,
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
                Layer::Mobile(m) => m.init_params(seed, params),
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
    /// If `config` has conv or mobile blocks or a ViT (they need the image shape: [`Network::try_for_images`]).
    pub fn try_new(input: usize, classes: usize, config: &ModelConfig, seed: u64) -> Result<Self, OutOfMemory> {
        assert!(
            config.conv.is_empty() && config.mobile.is_empty() && config.vit.is_none(),
            "a conv, mobile or ViT network needs the image shape"
        );
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

    fn try_with_front(front: Vec<FrontLayer>, specs: Vec<DenseSpec>) -> Result<Self, OutOfMemory> {
        assert!(!specs.is_empty(), "a network needs at least a head");
        for pair in specs.windows(2) {
            assert_eq!(pair[0].out_dim, pair[1].in_dim, "layer widths must chain");
        }
        let n_front = front.len();
        let input = match front.first() {
            None => specs[0].in_dim,
            Some(FrontLayer::Conv(c)) => c.spec().input().len(),
            Some(FrontLayer::Mobile(m)) => m.spec().input.len(),
            Some(FrontLayer::Patch(p)) => p.input().len(),
            Some(_) => panic!("a ViT starts with its patch embedding"),
        };
        let classes = specs.last().map(|s| s.out_dim).unwrap_or(0);
        let layers: Vec<Dense> =
            specs.into_iter().enumerate().map(|(i, s)| Dense::new(s, (n_front + i) as u64 + 1)).collect();
        let lens = front.iter().map(|f| match f {
            FrontLayer::Conv(c) => c.param_len(),
            FrontLayer::Mobile(m) => m.param_len(),
            FrontLayer::Patch(p) => p.param_len(),
            FrontLayer::Block(b) => b.param_len(),
            FrontLayer::Readout(r) => r.param_len(),
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
                Layer::Mobile(m) => m.spec().input.len(),
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
            Layer::Mobile(m) => m.output().len(),
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
                FrontLayer::Readout(r) => Some(r.readout),
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
            Layer::Mobile(m) => m.trainable_len(),
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
}
