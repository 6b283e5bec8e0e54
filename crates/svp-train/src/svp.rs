//! The SVP training step: every layer learns from its own local loss.

use crate::config::{Config, FirstLayerAlignment};
use crate::frozen::FrozenLayers;
use crate::model::{Layer, LayerCache, Network, ProjectionHeads, Readout};
use crate::{TrainError, Trainer, Updater};
use std::ops::Range;
use svp_alloc::{OutOfMemory, try_zeros};
use svp_nn::{FaWorkspace, FeatureAlignment, Mode, softmax_cross_entropy};
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
    /// The layers below `train_from_layer`, run forward only.
    frozen: FrozenLayers,
    /// The units of the trained layers.
    units: Vec<Range<usize>>,
    /// Which of the workspace's caches each trained layer uses.
    cache_slots: Vec<usize>,
    head_lr_scale: f32,
    max_rows: usize,
    ws: Workspace,
    metrics: LayerMetrics,
}

/// Everything a step touches besides the weights and optimizer state.
struct Workspace {
    /// Activations: a unit's input and the outputs of its layers, in
    /// rotation (one more than the longest unit; two for plain SVP).
    act: Vec<Vec<f32>>,
    /// One backward cache per position in a unit, serving that position of every unit.
    caches: Vec<LayerCache>,
    /// What a projection reads from a unit's output (a conv block's pooling,
    /// a transformer block's readout token), and its gradient.
    readout: Vec<f32>,
    d_readout: Vec<f32>,
    /// Gradient wrt the current layer's output.
    dh: Vec<f32>,
    /// Gradient wrt the current layer's input, inside a unit of several layers (else empty).
    dx: Vec<f32>,
    /// The current unit's local logits `v` (its alignment target is in `fa`).
    v: Vec<f32>,
    dv: Vec<f32>,
    tile: Vec<f32>,
    fa: FaWorkspace,
}

impl Workspace {
    fn bytes(&self) -> usize {
        4 * (self.act.iter().map(Vec::len).sum::<usize>()
            + self.dh.len()
            + self.dx.len()
            + self.v.len()
            + self.dv.len()
            + self.tile.len()
            + self.readout.len()
            + self.d_readout.len())
            + self.caches.iter().map(LayerCache::bytes).sum::<usize>()
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

/// The units of a step, in order: ranges of consecutive layers trained
/// together by backprop from one local loss at the unit's last layer, with
/// no gradient between units. Conv blocks, transformer blocks and dense
/// hidden layers go in runs of up to `per_unit` of a kind (1: plain SVP);
/// a ViT's patch embedding and token head join the unit after them; the
/// classifier head ends the last unit, which is the head alone (with the
/// token head, if any) unless `head_joins` merges it into the unit before.
pub fn units(model: &Network, per_unit: usize, head_joins: bool) -> Vec<Range<usize>> {
    let head = model.n_layers() - 1;
    let same_kind = |a: Layer, b: Layer| {
        matches!(
            (a, b),
            (Layer::Conv(_), Layer::Conv(_)) | (Layer::Block(_), Layer::Block(_)) | (Layer::Dense(_), Layer::Dense(_))
        )
    };
    let mut units = Vec::new();
    let (mut start, mut l) = (0, 0);
    while l < head {
        match model.layer(l) {
            Layer::Patch(_) | Layer::Readout(_) => {
                l += 1;
                continue;
            }
            kind => {
                let first = l;
                while l < head && l - first < per_unit.max(1) && same_kind(kind, model.layer(l)) {
                    l += 1;
                }
            }
        }
        units.push(start..l);
        start = l;
    }
    units.push(start..head + 1);
    let n = units.len();
    if head_joins && n >= 2 {
        let last = units.pop().unwrap_or_default();
        if let Some(prev) = units.last_mut() {
            prev.end = last.end;
        }
    }
    units
}

/// The workspace cache layer `l` uses: its position in its unit, except that
/// a patch embedding shares the first cache with the block after it (it uses
/// only the cache's patch buffer), so the first unit, one layer longer than
/// the others, needs no cache of its own and memory does not depend on how
/// many units there are.
fn cache_slot(model: &Network, units: &[Range<usize>], l: usize) -> usize {
    let unit = units.iter().find(|u| u.contains(&l)).expect("every layer is in a unit");
    let j = l - unit.start;
    if j > 0 && matches!(model.layer(unit.start), Layer::Patch(_)) { j - 1 } else { j }
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
        svp_tensor::try_reserve_workspaces()?;
        let classes = model.classes();
        let heads = ProjectionHeads::from_config(config, classes);
        let dim = heads.dim;
        let rows = config.train.batch_size;
        let width = model.max_out_width();
        let vdim = dim.max(classes);
        let label_cols = if config.svp.label_concat { classes } else { 0 };
        let tile_floats = (config.svp.tile_bytes / 4).max(model.max_readout_len() + label_cols);
        let first = config.train.train_from_layer - 1;
        // Frozen layers leave the units; a unit they cut into starts at the first trained layer.
        let units: Vec<_> = units(model, config.svp.layers_per_unit, config.svp.head_joins_last_unit)
            .into_iter()
            .filter(|u| u.end > first)
            .map(|u| u.start.max(first)..u.end)
            .collect();
        let unit_len = units.iter().map(|u| u.len()).max().unwrap_or(1);
        let caches = (0..unit_len)
            .map(|slot| {
                let served = units.iter().flat_map(|u| u.clone()).filter(|&l| cache_slot(model, &units, l) == slot);
                LayerCache::try_for(served.map(|l| model.layer(l)), rows)
            })
            .collect::<Result<_, _>>()?;
        let readout_len = if model.is_mlp() { 0 } else { rows * model.max_readout_len() };
        let ws = Workspace {
            act: (0..=unit_len).map(|_| try_zeros(rows * width, "layer activations")).collect::<Result<_, _>>()?,
            caches,
            readout: try_zeros(readout_len, "projection readouts")?,
            d_readout: try_zeros(readout_len, "projection readout gradients")?,
            dh: try_zeros(rows * width, "the activation gradient")?,
            dx: try_zeros(if unit_len > 1 { rows * width } else { 0 }, "the input gradient inside a unit")?,
            v: try_zeros(rows * vdim, "the projections")?,
            dv: try_zeros(rows * vdim, "the projection gradient")?,
            tile: try_zeros(tile_floats, "a tile of R")?,
            fa: FaWorkspace::try_new(rows, vdim)?,
        };
        Ok(Self {
            updater: Updater::try_new(model, config.optimizer, rows, first)?,
            frozen: FrozenLayers::try_new(model, first, rows)?,
            heads,
            lambda: config.svp.lambda,
            head_lambda: config.svp.head_lambda.unwrap_or(config.svp.lambda),
            align_first: config.svp.first_layer_alignment == FirstLayerAlignment::Input,
            fa: FeatureAlignment { mean_center: config.svp.mean_center },
            cache_slots: (0..model.n_layers())
                .map(|l| if l < first { 0 } else { cache_slot(model, &units, l) })
                .collect(),
            units,
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
}

impl Trainer for SvpTrainer {
    fn step(&mut self, model: &mut Network, x: &[f32], y: &[u32], lr_scale: f32) -> Result<f32, TrainError> {
        let rows = y.len();
        assert!(rows > 0 && rows <= self.max_rows, "batch of {rows} rows for a trainer sized for {}", self.max_rows);
        let step = self.updater.step();
        let mode = Mode::Train { seed: self.heads.seed, step };
        let n_layers = model.n_layers();
        let input_dim = model.input();
        let vdim = self.heads.dim;
        let slots = self.ws.act.len();
        let token = model.token_readout();

        let first_trained = self.frozen.len();
        let h0 = self.frozen.forward(model, x, rows);

        // v_0: the alignment target of layer 1.
        let mut have_prev = false;
        if first_trained > 0 {
            // The first trained unit aligns to the last frozen layer's local
            // logits, as it would to a unit ending there.
            let last_frozen = first_trained - 1;
            let read_len = model.readout_len(last_frozen);
            let p = self.heads.for_layer(first_trained, read_len, true);
            let ws = &mut self.ws;
            let out_len = model.out_len(last_frozen);
            let read = model.layer(last_frozen).readout().read(h0, rows, out_len, token, &mut ws.readout);
            p.forward(view(read, rows, read_len), Some(y), Some(step), view_mut(&mut ws.v, rows, vdim), &mut ws.tile);
            self.fa.set_target(view(&ws.v, rows, vdim), &mut ws.fa);
            have_prev = true;
        } else if self.align_first {
            let p0 = self.heads.for_layer(0, input_dim, false);
            let ws = &mut self.ws;
            p0.forward(view(x, rows, input_dim), None, None, view_mut(&mut ws.v, rows, vdim), &mut ws.tile);
            self.fa.set_target(view(&ws.v, rows, vdim), &mut ws.fa);
            have_prev = true;
        }

        let mut head_ce = 0.0;
        // The activation slot holding the current unit's input (unused while it is `x`).
        let mut unit_input = 0;
        for unit in 0..self.units.len() {
            let (first, end) = (self.units[unit].start, self.units[unit].end);
            let is_head = end == n_layers;
            let slot = |j: usize| (unit_input + 1 + j) % slots;
            let ws = &mut self.ws;

            for (j, l) in (first..end).enumerate() {
                let (layer, params) = model.layer_mut(l);
                let (src, dst) = read_write(&mut ws.act, if j == 0 { unit_input } else { slot(j - 1) }, slot(j));
                let input = if l == first_trained { h0 } else { src };
                layer.forward(params, input, rows, &mut ws.caches[self.cache_slots[l]], dst, mode);
            }
            let last = end - 1;
            let d_out = model.out_len(last);
            let out = &ws.act[slot(end - first - 1)][..rows * d_out];

            // Local logits: v = Dropout(R) readout(h) at the unit's output, or the head's own output.
            let readout = model.layer(last).readout();
            let read_len = model.readout_len(last);
            let out_dim = if is_head { d_out } else { vdim };
            let proj = (!is_head).then(|| self.heads.for_layer(end, read_len, true));
            let v = if let Some(p) = &proj {
                let read = readout.read(out, rows, d_out, token, &mut ws.readout);
                p.forward(
                    view(read, rows, read_len),
                    Some(y),
                    Some(step),
                    view_mut(&mut ws.v, rows, vdim),
                    &mut ws.tile,
                );
                &ws.v[..rows * vdim]
            } else {
                out
            };

            let lambda = if is_head { self.head_lambda } else { self.lambda };
            let (ce, correct) = softmax_cross_entropy(view(v, rows, out_dim), y, &mut ws.dv);
            let fa =
                if have_prev { self.fa.align(view(v, rows, out_dim), &mut ws.fa, lambda, &mut ws.dv) } else { 0.0 };
            let loss = ce + lambda * fa;
            if !loss.is_finite() {
                // Earlier units' updates are done (their losses were finite); this one's is never applied.
                return Err(TrainError::Diverged { layer: end, step, loss });
            }
            self.metrics.ce_sum[last] += ce as f64;
            self.metrics.fa_sum[last] += fa as f64;
            self.metrics.correct[last] += correct as u64;

            // eps = dL/dh through R only (and the readout), or the head's
            // logit gradient; then backprop inside the unit, each layer updated
            // right after its own backward; the unit's input stays detached.
            // (Overlapping an update with the next layer's forward, which SVP
            // allows, measured no faster on 2 cores: both compete for the same
            // cores and memory bandwidth.)
            let mut dout = match &proj {
                Some(p) if matches!(readout, Readout::Whole) => {
                    let dh = view_mut(&mut ws.dh, rows, d_out);
                    p.backward_after_forward(view(&ws.dv, rows, vdim), Some(step), dh, &mut ws.tile);
                    &mut ws.dh
                }
                Some(p) => {
                    let d_read = view_mut(&mut ws.d_readout, rows, read_len);
                    p.backward_after_forward(view(&ws.dv, rows, vdim), Some(step), d_read, &mut ws.tile);
                    let out = &ws.act[slot(end - first - 1)][..rows * d_out];
                    readout.backward(out, rows, d_out, token, &ws.d_readout, &mut ws.dh);
                    &mut ws.dh
                }
                None => {
                    // The logit gradient moves to a full-width buffer: inside a
                    // unit, dout and dx trade places layer by layer.
                    head_ce = ce;
                    ws.dh[..rows * d_out].copy_from_slice(&ws.dv[..rows * d_out]);
                    &mut ws.dh
                }
            };
            let mut dx = &mut ws.dx;
            for (j, l) in (first..end).enumerate().rev() {
                let trainable = model.trainable_len(l);
                let (layer, params) = model.layer_mut(l);
                let src = &ws.act[if j == 0 { unit_input } else { slot(j - 1) }];
                let input = if l == first_trained { h0 } else { &src[..] };
                let dinput = (j > 0).then_some(&mut dx[..]);
                let lr = if l + 1 == n_layers { lr_scale * self.head_lr_scale } else { lr_scale };
                let (mut update, grad) = self.updater.begin(l, lr);
                let cache = &mut ws.caches[self.cache_slots[l]];
                layer.backward_update(params, trainable, input, rows, cache, dout, grad, dinput, mode, &mut update);
                if j > 0 {
                    std::mem::swap(&mut dout, &mut dx);
                }
            }

            if !is_head {
                // This unit's S(v) is the next one's alignment target.
                if have_prev {
                    ws.fa.promote();
                } else {
                    self.fa.set_target(view(&ws.v, rows, vdim), &mut ws.fa);
                }
                have_prev = true;
            }
            unit_input = slot(end - first - 1);
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
        self.ws.bytes() + self.frozen.bytes() + self.updater.gradient_bytes()
    }

    fn layer_metrics(&self) -> Option<&LayerMetrics> {
        Some(&self.metrics)
    }

    fn reset_layer_metrics(&mut self) {
        self.metrics.reset();
    }
}
