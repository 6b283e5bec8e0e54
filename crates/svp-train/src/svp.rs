//! The SVP training step: every layer learns from its own local loss.

use crate::config::{Config, FirstLayerAlignment};
use crate::model::{Layer, Network, ProjectionHeads};
use crate::{TrainError, Trainer, Updater};
use svp_alloc::{OutOfMemory, try_zeros};
use svp_nn::{ConvBlockCache, DenseCache, FaWorkspace, FeatureAlignment, Mode, Projection, softmax_cross_entropy};
use svp_tensor::{view, view_mut};

/// Sums of per-layer local losses and head accuracies over the steps since
/// the last reset. Index `l` is layer `l + 1`; the classifier head is last.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerMetrics {
    /// Sum over steps of each layer's cross-entropy.
    pub ce_sum: Vec<f64>,
    /// Sum over steps of each layer's feature-alignment loss.
    pub fa_sum: Vec<f64>,
    /// Training samples each layer's head classified correctly.
    pub correct: Vec<u64>,
    /// Steps summed.
    pub steps: u64,
    /// Samples seen.
    pub samples: u64,
}

impl LayerMetrics {
    fn new(layers: usize) -> Self {
        Self { ce_sum: vec![0.0; layers], fa_sum: vec![0.0; layers], correct: vec![0; layers], steps: 0, samples: 0 }
    }

    fn reset(&mut self) {
        self.ce_sum.fill(0.0);
        self.fa_sum.fill(0.0);
        self.correct.fill(0);
        self.steps = 0;
        self.samples = 0;
    }
}

/// SVP trainer: options, optimizer state per layer and one workspace sized for
/// the widest layer (or, for SVP+, the widest unit), reused by every layer and step.
pub struct SvpTrainer {
    updater: Updater,
    heads: ProjectionHeads,
    lambda: f32,
    head_lambda: f32,
    align_first: bool,
    fa: FeatureAlignment,
    layers_per_unit: usize,
    head_joins_last_unit: bool,
    head_lr_scale: f32,
    max_rows: usize,
    ws: Workspace,
    metrics: LayerMetrics,
}

/// Everything a step touches besides the weights and optimizer state.
struct Workspace {
    /// Hidden activations: a unit's input and the outputs of its layers, in
    /// rotation (one more than the longest unit; two for plain SVP).
    act: Vec<Vec<f32>>,
    /// One backward cache per dense layer of a unit.
    caches: Vec<DenseCache>,
    /// The backward cache of a conv block (each conv block is its own unit).
    conv_cache: ConvBlockCache,
    /// A conv block's pooled readout, and its gradient.
    readout: Vec<f32>,
    d_readout: Vec<f32>,
    /// Gradient wrt the current layer's output.
    dh: Vec<f32>,
    /// Gradient wrt the current layer's input, inside an SVP+ unit (empty for plain SVP).
    dx: Vec<f32>,
    v_cur: Vec<f32>,
    v_prev: Vec<f32>,
    dv: Vec<f32>,
    tile: Vec<f32>,
    fa: FaWorkspace,
    grad: Vec<f32>,
}

impl Workspace {
    fn bytes(&self) -> usize {
        4 * (self.act.iter().map(Vec::len).sum::<usize>()
            + self.dh.len()
            + self.dx.len()
            + self.v_cur.len()
            + self.v_prev.len()
            + self.dv.len()
            + self.tile.len()
            + self.grad.len())
            + self.caches.iter().map(DenseCache::bytes).sum::<usize>()
            + self.conv_cache.bytes()
            + 4 * (self.readout.len() + self.d_readout.len())
            + self.fa.bytes()
    }
}

/// `bufs[read]` shared and `bufs[write]` exclusive (`read != write`).
fn read_write(bufs: &mut [Vec<f32>], read: usize, write: usize) -> (&[f32], &mut [f32]) {
    assert_ne!(read, write, "a layer cannot write its own input");
    if read < write {
        let (a, b) = bufs.split_at_mut(write);
        (&a[read], &mut b[0])
    } else {
        let (a, b) = bufs.split_at_mut(read);
        (&b[0], &mut a[write])
    }
}

impl SvpTrainer {
    /// A trainer for `model` under `config`, for batches of up to `config.train.batch_size` rows.
    ///
    /// # Panics
    /// If the memory is not there (see [`SvpTrainer::try_new`]).
    pub fn new(model: &Network, config: &Config) -> Self {
        Self::try_new(model, config).expect("memory for the SVP workspace")
    }

    /// [`SvpTrainer::new`], failing cleanly when the memory is not there.
    pub fn try_new(model: &Network, config: &Config) -> Result<Self, OutOfMemory> {
        let classes = model.classes();
        let heads = ProjectionHeads::from_config(config, classes);
        let dim = heads.dim;
        let rows = config.train.batch_size;
        let width = model.max_out_width();
        let vdim = dim.max(classes);
        let label_cols = if config.svp.label_concat { classes } else { 0 };
        let tile_floats = (config.svp.tile_bytes / 4).max(model.max_readout_len() + label_cols);
        let dense_hidden = model.layers().len() - 1;
        let layers_per_unit = config.svp.layers_per_unit.clamp(1, dense_hidden.max(1));
        let head_joins = config.svp.head_joins_last_unit && dense_hidden > 0;
        // Layers of the longest unit (the last one, when the head joins it).
        let unit_len = layers_per_unit + usize::from(head_joins);
        let readout_len = if model.convs().is_empty() { 0 } else { rows * model.max_readout_len() };
        let act = (0..=unit_len).map(|_| try_zeros(rows * width, "layer activations")).collect::<Result<_, _>>()?;
        let dense_width = model.layers().iter().map(|l| l.spec().out_dim).max().unwrap_or(0);
        let caches = (0..unit_len).map(|_| DenseCache::try_new(rows, dense_width)).collect::<Result<_, _>>()?;
        let dx_len = if unit_len > 1 { rows * width } else { 0 };
        let ws = Workspace {
            act,
            caches,
            conv_cache: ConvBlockCache::try_new_for(model.convs(), rows)?,
            readout: try_zeros(readout_len, "conv readouts")?,
            d_readout: try_zeros(readout_len, "conv readout gradients")?,
            dh: try_zeros(rows * width, "the activation gradient")?,
            dx: try_zeros(dx_len, "the input gradient inside a unit")?,
            v_cur: try_zeros(rows * vdim, "the projections")?,
            v_prev: try_zeros(rows * vdim, "the projections")?,
            dv: try_zeros(rows * vdim, "the projection gradient")?,
            tile: try_zeros(tile_floats, "a tile of R")?,
            fa: FaWorkspace::try_new(rows, vdim)?,
            grad: try_zeros(model.max_layer_params(), "one layer's gradient")?,
        };
        Ok(Self {
            updater: Updater::try_new(model, config.optimizer)?,
            heads,
            lambda: config.svp.lambda,
            head_lambda: config.svp.head_lambda.unwrap_or(config.svp.lambda),
            align_first: config.svp.first_layer_alignment == FirstLayerAlignment::Input,
            fa: FeatureAlignment { mean_center: config.svp.mean_center },
            layers_per_unit,
            head_joins_last_unit: head_joins,
            head_lr_scale: config.svp.head_lr_scale,
            max_rows: rows,
            ws,
            metrics: LayerMetrics::new(model.n_layers()),
        })
    }

    /// The projection heads (what a model file needs to regenerate `R_l`).
    pub fn heads(&self) -> &ProjectionHeads {
        &self.heads
    }

    /// Layer `l`'s projection (1-based hidden index; 0 = input).
    fn projection(&self, layer: usize, width: usize) -> Projection {
        self.heads.for_layer(layer, width, layer > 0)
    }
}

impl Trainer for SvpTrainer {
    fn step(&mut self, model: &mut Network, x: &[f32], y: &[u32], lr_scale: f32) -> Result<f32, TrainError> {
        let rows = y.len();
        assert!(rows > 0 && rows <= self.max_rows, "batch of {rows} rows for a trainer sized for {}", self.max_rows);
        let step = self.updater.step();
        let mode = Mode::Train { seed: self.heads.seed, step };
        let n_layers = model.n_layers();
        let n_hidden = n_layers - 1;
        let n_conv = model.convs().len();
        let input_dim = model.input();
        let vdim = self.heads.dim;
        let slots = self.ws.act.len();

        // v_0: the alignment target of layer 1.
        let mut have_prev = false;
        let mut prev_dim = 0;
        if self.align_first {
            let p0 = self.projection(0, input_dim);
            let ws = &mut self.ws;
            p0.forward(view(x, rows, input_dim), None, None, view_mut(&mut ws.v_prev, rows, vdim), &mut ws.tile);
            have_prev = true;
            prev_dim = vdim;
        }

        let mut head_ce = 0.0;
        // The activation slot holding the current unit's input (unused while it is `x`).
        let mut unit_input = 0;
        let mut first = 0;
        while first < n_layers {
            // A unit: one conv block, `layers_per_unit` dense hidden layers
            // (the last of them with the head, if it joins), or the head alone.
            let end = if first < n_conv {
                first + 1
            } else if first == n_hidden {
                n_layers
            } else {
                let end = (first + self.layers_per_unit).min(n_hidden);
                if end == n_hidden && self.head_joins_last_unit { n_layers } else { end }
            };
            let is_head = end == n_layers;
            let slot = |j: usize| (unit_input + 1 + j) % slots;
            let ws = &mut self.ws;

            for (j, l) in (first..end).enumerate() {
                let (layer, params) = model.layer_mut(l);
                let (src, dst) = read_write(&mut ws.act, if j == 0 { unit_input } else { slot(j - 1) }, slot(j));
                let input = if l == 0 { x } else { src };
                layer.forward(params, input, rows, &mut ws.caches[j], &mut ws.conv_cache, dst, mode);
            }
            let last = end - 1;
            let d_out = model.out_len(last);
            let out = &ws.act[slot(end - first - 1)][..rows * d_out];

            // What the projection reads: a conv block's pooled readout, a dense block's output.
            let conv_readout = match model.layer(last) {
                Layer::Conv(c) => Some(c.readout()),
                Layer::Dense(_) => None,
            };
            let read_len = model.readout_len(last);
            let read = if let Some(pool) = &conv_readout {
                pool.forward(out, rows, &mut ws.readout);
                &ws.readout[..rows * read_len]
            } else {
                out
            };

            // Local logits: v = Dropout(R) h at the unit's output, or the head's own output.
            let out_dim = if is_head { d_out } else { vdim };
            let proj = (!is_head).then(|| self.heads.for_layer(end, read_len, true));
            let v = if let Some(p) = &proj {
                p.forward(
                    view(read, rows, read_len),
                    Some(y),
                    Some(step),
                    view_mut(&mut ws.v_cur, rows, vdim),
                    &mut ws.tile,
                );
                &ws.v_cur[..rows * vdim]
            } else {
                out
            };

            let lambda = if is_head { self.head_lambda } else { self.lambda };
            let (ce, correct) = softmax_cross_entropy(view(v, rows, out_dim), y, &mut ws.dv);
            let fa = if have_prev {
                self.fa.loss_and_grad(
                    view(v, rows, out_dim),
                    view(&ws.v_prev, rows, prev_dim),
                    &mut ws.fa,
                    lambda,
                    &mut ws.dv,
                )
            } else {
                0.0
            };
            let loss = ce + lambda * fa;
            if !loss.is_finite() {
                // Earlier units' updates are done (their losses were finite); this one's is never applied.
                return Err(TrainError::Diverged { layer: end, step, loss });
            }
            self.metrics.ce_sum[last] += ce as f64;
            self.metrics.fa_sum[last] += fa as f64;
            self.metrics.correct[last] += correct as u64;

            // eps = dL/dh through R only (and the readout pooling), or the head's
            // logit gradient; then backprop inside the unit, each layer updated
            // right after its own backward; the unit's input stays detached.
            // (Overlapping an update with the next layer's forward, which SVP
            // allows, measured no faster on 2 cores: both compete for the same
            // cores and memory bandwidth.)
            let mut dout = match (&proj, &conv_readout) {
                (Some(p), Some(pool)) => {
                    let d_read = view_mut(&mut ws.d_readout, rows, read_len);
                    p.backward(view(&ws.dv, rows, vdim), Some(step), d_read, &mut ws.tile);
                    pool.backward(&ws.act[slot(0)][..rows * d_out], rows, &ws.d_readout, &mut ws.dh);
                    &mut ws.dh
                }
                (Some(p), None) => {
                    p.backward(view(&ws.dv, rows, vdim), Some(step), view_mut(&mut ws.dh, rows, d_out), &mut ws.tile);
                    &mut ws.dh
                }
                (None, _) => {
                    head_ce = ce;
                    &mut ws.dv
                }
            };
            let mut dx = &mut ws.dx;
            for (j, l) in (first..end).enumerate().rev() {
                let trainable = model.trainable_len(l);
                let (layer, params) = model.layer_mut(l);
                let src = &ws.act[if j == 0 { unit_input } else { slot(j - 1) }];
                let input = if l == 0 { x } else { &src[..] };
                let grad = &mut ws.grad[..trainable];
                let dinput = (j > 0).then_some(&mut dx[..]);
                layer.backward(params, input, rows, &ws.caches[j], &mut ws.conv_cache, dout, grad, dinput, mode);
                let lr = if is_head { lr_scale * self.head_lr_scale } else { lr_scale };
                self.updater.update(l, lr, &mut params[..trainable], grad);
                if j > 0 {
                    std::mem::swap(&mut dout, &mut dx);
                }
            }

            if !is_head {
                std::mem::swap(&mut ws.v_cur, &mut ws.v_prev);
                have_prev = true;
                prev_dim = vdim;
            }
            unit_input = slot(end - first - 1);
            first = end;
        }
        self.metrics.steps += 1;
        self.metrics.samples += rows as u64;
        self.updater.finish_step();
        Ok(head_ce)
    }

    fn updater(&self) -> &Updater {
        &self.updater
    }

    fn updater_mut(&mut self) -> &mut Updater {
        &mut self.updater
    }

    fn workspace_bytes(&self) -> usize {
        self.ws.bytes()
    }

    fn layer_metrics(&self) -> Option<&LayerMetrics> {
        Some(&self.metrics)
    }

    fn reset_layer_metrics(&mut self) {
        self.metrics.reset();
    }
}
