//! The SVP training step: every layer learns from its own local loss.

use crate::config::{Config, FirstLayerAlignment};
use crate::frozen::FrozenLayers;
use crate::{TrainError, Trainer, Updater};
use std::ops::Range;
use svp_alloc::{OutOfMemory, try_zeros};
use svp_net::{Layer, LayerCache, LayerScratch, Network, ProjectionHeads, Readout};
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
    pub(crate) fn new(layers: usize) -> Self {
        Self { ce_sum: vec![0.0; layers], fa_sum: vec![0.0; layers], correct: vec![0; layers], steps: 0, samples: 0 }
    }

    /// Adds a step's local loss and head accuracy at layer `l` (0-based).
    pub(crate) fn record(&mut self, l: usize, ce: f32, fa: f32, correct: usize) {
        self.ce_sum[l] += ce as f64;
        self.fa_sum[l] += fa as f64;
        self.correct[l] += correct as u64;
    }

    /// Counts a step of `rows` samples.
    pub(crate) fn count_step(&mut self, rows: usize) {
        self.steps += 1;
        self.samples += rows as u64;
    }

    pub(crate) fn reset(&mut self) {
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
    /// The current unit's input and its layers' outputs.
    ring: ActivationRing,
    /// One backward cache per position in a unit, serving that position of every unit.
    caches: Vec<LayerCache>,
    /// The buffers a layer uses only while its forward or backward runs,
    /// shared by all layers (frozen ones included).
    scratch: LayerScratch,
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
        self.ring.bytes()
            + 4 * (self.dh.len()
                + self.dx.len()
                + self.v.len()
                + self.dv.len()
                + self.tile.len()
                + self.readout.len()
                + self.d_readout.len())
            + self.caches.iter().map(LayerCache::bytes).sum::<usize>()
            + self.scratch.bytes()
            + self.fa.bytes()
    }
}

/// The activations of the unit being trained: its input, then each of its
/// layers' outputs, in buffers used in rotation (one more than the longest
/// unit has layers, so a unit never overwrites its own input). A unit's
/// output stays where it is and becomes the next unit's input.
struct ActivationRing {
    bufs: Vec<Vec<f32>>,
    /// The buffer holding the current unit's input; `None` while that is the batch itself.
    input: Option<usize>,
}

impl ActivationRing {
    fn try_new(buffers: usize, len: usize) -> Result<Self, OutOfMemory> {
        assert!(buffers >= 2, "a unit's input and its output");
        let bufs = (0..buffers).map(|_| try_zeros(len, "layer activations")).collect::<Result<_, _>>()?;
        Ok(Self { bufs, input: None })
    }

    /// The buffer of the output of the unit's layer `j`.
    fn slot(&self, j: usize) -> usize {
        (self.input.unwrap_or(0) + 1 + j) % self.bufs.len()
    }

    /// The input of the unit's layer `j` (`x`, the batch, may be the unit's).
    fn input<'a>(&'a self, x: &'a [f32], j: usize) -> &'a [f32] {
        match (j, self.input) {
            (0, None) => x,
            (0, Some(i)) => &self.bufs[i],
            _ => &self.bufs[self.slot(j - 1)],
        }
    }

    /// The input and the output of the unit's layer `j`.
    fn layer_io<'a>(&'a mut self, x: &'a [f32], j: usize) -> (&'a [f32], &'a mut [f32]) {
        let write = self.slot(j);
        let read = match (j, self.input) {
            (0, None) => return (x, &mut self.bufs[write]),
            (0, Some(i)) => i,
            _ => self.slot(j - 1),
        };
        read_write(&mut self.bufs, read, write)
    }

    /// The output of a unit of `len` layers.
    fn output(&self, len: usize) -> &[f32] {
        &self.bufs[self.slot(len - 1)]
    }

    /// Makes the output of the unit of `len` layers the next unit's input.
    fn pass_on(&mut self, len: usize) {
        self.input = Some(self.slot(len - 1));
    }

    /// Starts a step whose first unit reads buffer `input` (what the frozen
    /// layers computed), or with `None` the batch.
    fn start(&mut self, input: Option<usize>) {
        self.input = input;
    }

    /// The first two buffers, for the frozen layers' forward before a step.
    fn first_two(&mut self) -> [&mut [f32]; 2] {
        let (a, b) = self.bufs.split_at_mut(1);
        [&mut a[0], &mut b[0]]
    }

    fn bytes(&self) -> usize {
        4 * self.bufs.iter().map(Vec::len).sum::<usize>()
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

/// What the phases of one step share: the batch and where the run is.
struct Batch<'a> {
    x: &'a [f32],
    y: &'a [u32],
    rows: usize,
    step: u64,
    mode: Mode,
    lr_scale: f32,
}

/// The units of a step, in order: ranges of consecutive layers trained
/// together by backprop from one local loss at the unit's last layer, with
/// no gradient between units. Conv blocks, mobile blocks, transformer blocks and dense
/// hidden layers go in runs of up to `per_unit` of a kind (1: plain SVP);
/// a ViT's patch embedding and token head join the unit after them; the
/// classifier head ends the last unit, which is the head alone (with the
/// token head, if any) unless `head_joins` merges it into the unit before.
pub fn units(model: &Network, per_unit: usize, head_joins: bool) -> Vec<Range<usize>> {
    let head = model.n_layers() - 1;
    let same_kind = |a: Layer, b: Layer| {
        matches!(
            (a, b),
            (Layer::Conv(_), Layer::Conv(_))
                | (Layer::Mobile(_), Layer::Mobile(_))
                | (Layer::Block(_), Layer::Block(_))
                | (Layer::Dense(_), Layer::Dense(_))
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
        let heads = config.projection_heads(classes);
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
            ring: ActivationRing::try_new(unit_len + 1, rows * width)?,
            caches,
            scratch: LayerScratch::try_for(model.all_layers(), rows)?,
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
    /// One SVP step, unit by unit: forward the unit; its local loss (project
    /// its output with `R`, cross-entropy plus feature alignment); backward
    /// and update inside the unit alone; pass its output, detached, and its
    /// `S(v)`, as the next alignment target, on to the next unit.
    fn step(&mut self, model: &mut Network, x: &[f32], y: &[u32], lr_scale: f32) -> Result<f32, TrainError> {
        let rows = y.len();
        assert!(rows > 0 && rows <= self.max_rows, "batch of {rows} rows for a trainer sized for {}", self.max_rows);
        let step = self.updater.step();
        let b = Batch { x, y, rows, step, mode: Mode::Train { seed: self.heads.seed, step }, lr_scale };

        self.forward_frozen_layers(model, &b);
        let mut has_target = self.first_alignment_target(model, &b);
        let mut head_ce = 0.0;
        for u in 0..self.units.len() {
            let unit = self.units[u].clone();
            self.forward_unit(model, &unit, &b);
            let ce = self.local_loss(model, &unit, &b, has_target)?;
            self.backward_update_unit(model, &unit, &b);
            if unit.end == model.n_layers() {
                head_ce = ce;
            } else {
                self.pass_target_on(has_target, rows);
                has_target = true;
            }
            self.ws.ring.pass_on(unit.len());
        }
        self.metrics.count_step(rows);
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

/// The phases of [`SvpTrainer`]'s step, in the order it calls them.
impl SvpTrainer {
    /// Runs the batch through the frozen layers, if any, into the first
    /// unit's input.
    fn forward_frozen_layers(&mut self, model: &Network, b: &Batch) {
        let input = self.frozen.forward(model, b.x, b.rows, &mut self.ws.scratch, self.ws.ring.first_two());
        self.ws.ring.start(input);
    }

    /// Sets the first unit's alignment target, if it has one, and says
    /// whether it does: the last frozen layer's local logits (as a unit
    /// ending there computes them), or, with `first_layer_alignment =
    /// "input"`, the projected batch `v_0 = R_0 x`.
    fn first_alignment_target(&mut self, model: &Network, b: &Batch) -> bool {
        let (first_trained, vdim) = (self.frozen.len(), self.heads.dim);
        let ws = &mut self.ws;
        let v = view_mut(&mut ws.v, b.rows, vdim);
        if first_trained > 0 {
            let last_frozen = first_trained - 1;
            let (out_len, read_len) = (model.out_len(last_frozen), model.readout_len(last_frozen));
            let h = &ws.ring.input(b.x, 0)[..b.rows * out_len];
            let readout = model.layer(last_frozen).readout();
            let read = readout.read(h, b.rows, out_len, model.token_readout(), &mut ws.readout);
            let p = self.heads.for_layer(first_trained, read_len, true);
            p.forward(view(read, b.rows, read_len), Some(b.y), Some(b.step), v, &mut ws.tile);
        } else if self.align_first {
            let p0 = self.heads.for_layer(0, model.input(), false);
            p0.forward(view(b.x, b.rows, model.input()), None, None, v, &mut ws.tile);
        } else {
            return false;
        }
        self.fa.set_target(view(&ws.v, b.rows, vdim), &mut ws.fa);
        true
    }

    /// Forward through the unit's layers, each into the next activation
    /// buffer, filling their backward caches.
    fn forward_unit(&mut self, model: &mut Network, unit: &Range<usize>, b: &Batch) {
        let ws = &mut self.ws;
        for (j, l) in unit.clone().enumerate() {
            let (layer, params) = model.layer_mut(l);
            let (input, out) = ws.ring.layer_io(b.x, j);
            layer.forward(params, input, b.rows, &mut ws.caches[self.cache_slots[l]], &mut ws.scratch, out, b.mode);
        }
    }

    /// The unit's local loss: its local logits `v` (the projection
    /// `Dropout(R) readout(h)` of its output, or the head's own logits),
    /// cross-entropy plus `lambda` times the feature alignment to the target.
    /// Leaves `dL/dv` in the workspace and returns the cross-entropy; a
    /// non-finite loss is an error, and the unit is not updated.
    fn local_loss(
        &mut self,
        model: &Network,
        unit: &Range<usize>,
        b: &Batch,
        has_target: bool,
    ) -> Result<f32, TrainError> {
        let last = unit.end - 1;
        let is_head = unit.end == model.n_layers();
        let (d_out, read_len, vdim) = (model.out_len(last), model.readout_len(last), self.heads.dim);
        let ws = &mut self.ws;
        let out = &ws.ring.output(unit.len())[..b.rows * d_out];
        let (v, width) = if is_head {
            (out, d_out)
        } else {
            let read = model.layer(last).readout().read(out, b.rows, d_out, model.token_readout(), &mut ws.readout);
            let p = self.heads.for_layer(unit.end, read_len, true);
            let v = view_mut(&mut ws.v, b.rows, vdim);
            p.forward(view(read, b.rows, read_len), Some(b.y), Some(b.step), v, &mut ws.tile);
            (&ws.v[..b.rows * vdim], vdim)
        };
        let lambda = if is_head { self.head_lambda } else { self.lambda };
        let v = view(v, b.rows, width);
        let (ce, correct) = softmax_cross_entropy(v, b.y, &mut ws.dv);
        let fa = if has_target { self.fa.align(v, &mut ws.fa, lambda, &mut ws.dv) } else { 0.0 };
        let loss = ce + lambda * fa;
        if !loss.is_finite() {
            // Earlier units' updates are done (their losses were finite); this one's is never applied.
            return Err(TrainError::Diverged { layer: unit.end, step: b.step, loss });
        }
        self.metrics.record(last, ce, fa, correct);
        Ok(ce)
    }

    /// `dL/dh` at the unit's output, into the workspace: from `dL/dv`
    /// through `R` alone (and the readout), or for the head its logit
    /// gradient itself.
    fn output_gradient(&mut self, model: &Network, unit: &Range<usize>, b: &Batch) {
        let last = unit.end - 1;
        let (d_out, read_len) = (model.out_len(last), model.readout_len(last));
        let ws = &mut self.ws;
        if unit.end == model.n_layers() {
            // To a full-width buffer: inside a unit, dout and dx trade places layer by layer.
            ws.dh[..b.rows * d_out].copy_from_slice(&ws.dv[..b.rows * d_out]);
            return;
        }
        let p = self.heads.for_layer(unit.end, read_len, true);
        let dv = view(&ws.dv, b.rows, self.heads.dim);
        match model.layer(last).readout() {
            Readout::Whole => {
                p.backward_after_forward(dv, Some(b.step), view_mut(&mut ws.dh, b.rows, d_out), &mut ws.tile);
            }
            readout => {
                let d_read = view_mut(&mut ws.d_readout, b.rows, read_len);
                p.backward_after_forward(dv, Some(b.step), d_read, &mut ws.tile);
                let out = &ws.ring.output(unit.len())[..b.rows * d_out];
                readout.backward(out, b.rows, d_out, model.token_readout(), &ws.d_readout, &mut ws.dh);
            }
        }
    }

    /// Backprop inside the unit from `dL/dh` at its output, each layer
    /// updated right after its own backward; the unit's input stays
    /// detached. (Overlapping an update with the next layer's forward, which
    /// SVP allows, measured no faster on 2 cores: both compete for the same
    /// cores and memory bandwidth.)
    fn backward_update_unit(&mut self, model: &mut Network, unit: &Range<usize>, b: &Batch) {
        self.output_gradient(model, unit, b);
        let head = model.n_layers() - 1;
        let ws = &mut self.ws;
        let (mut dout, mut dx) = (&mut ws.dh, &mut ws.dx);
        for (j, l) in unit.clone().enumerate().rev() {
            let trainable = model.trainable_len(l);
            let (layer, params) = model.layer_mut(l);
            let input = ws.ring.input(b.x, j);
            let dinput = (j > 0).then_some(&mut dx[..]);
            let lr = if l == head { b.lr_scale * self.head_lr_scale } else { b.lr_scale };
            let (mut update, grad) = self.updater.begin(l, lr);
            let (cache, scratch) = (&mut ws.caches[self.cache_slots[l]], &mut ws.scratch);
            let rows = b.rows;
            layer.backward_update(
                params,
                trainable,
                input,
                rows,
                cache,
                scratch,
                dout,
                grad,
                dinput,
                b.mode,
                &mut update,
            );
            if j > 0 {
                std::mem::swap(&mut dout, &mut dx);
            }
        }
    }

    /// Makes this unit's `S(v)` the next unit's alignment target.
    fn pass_target_on(&mut self, had_target: bool, rows: usize) {
        if had_target {
            self.ws.fa.promote();
        } else {
            self.fa.set_target(view(&self.ws.v, rows, self.heads.dim), &mut self.ws.fa);
        }
    }
}
