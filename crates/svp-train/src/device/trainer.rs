//! SVP and BP steps for MLPs through a [`Backend`].

use super::{AdamScalars, Backend, CudaError};
use crate::config::FirstLayerAlignment;
use crate::svp::LayerMetrics;
use crate::{Config, Method, TrainError, Trainer, TrainerState, Updater};
use svp_net::{Network, ProjectionHeads};
use svp_nn::{Activation, DenseSpec, Norm};
use svp_optim::{MomentDtype, Moments, Optimizer};

/// Why a run cannot train (or a model run) on a device yet. Prints as one line.
#[derive(Debug, thiserror::Error)]
pub enum Unsupported {
    /// What this config or network asks that a device does not do yet.
    #[error("svp cannot run this on a GPU yet: {0}; run it on the CPU (--device cpu)")]
    Config(String),
    /// The device failed (out of memory, a launch error, ...).
    #[error(transparent)]
    Device(#[from] CudaError),
}

/// A dense block's parameter in device memory: one of `W`, `b`, `gamma`,
/// `beta`, at `offset` in the host layout, with its Adam moments.
struct Part<Buf> {
    offset: usize,
    len: usize,
    value: Buf,
    m: Buf,
    v: Buf,
}

/// Where a step's buffers live: its batch, activations, caches, gradients
/// and the local loss's projections, sized once for the longest unit of
/// the widest layers (SVP) or with one activation and cache per layer (BP).
struct Workspace<Buf> {
    x: Buf,
    labels: Buf,
    /// SVP: a unit's input and its layers' outputs, used in turn; BP: one per layer.
    acts: Vec<Buf>,
    /// LayerNorm's normalized values and `1/std`: SVP one per position in a
    /// unit, BP one per layer.
    xhat: Vec<Buf>,
    rstd: Vec<Buf>,
    /// Gradients wrt the current layer's output and input.
    dh: Buf,
    dx: Buf,
    /// One layer's parameter gradient, part by part (`W`, `b`, `gamma`, `beta`).
    grads: [Buf; 4],
    /// SVP: one layer's `R` (`d' x width`, regenerated on the host each
    /// step and uploaded), the local logits, their gradient, and the
    /// feature alignment's buffers.
    r: Buf,
    v: Buf,
    dv: Buf,
    normed: Buf,
    dnormed: Buf,
    norms: Buf,
    sim: Buf,
    target: Buf,
    /// Per layer: cross-entropy, correct rows, alignment loss.
    stats: Buf,
}

/// Host-side staging for a step: labels as floats, a tile of `R`, the
/// statistics read back once per step.
struct Staging {
    labels: Vec<f32>,
    tile: Vec<f32>,
    stats: Vec<f32>,
}

/// SVP's options, as [`crate::SvpTrainer`] reads them.
struct SvpOptions {
    heads: ProjectionHeads,
    lambda: f32,
    head_lambda: f32,
    align_first: bool,
    mean_center: bool,
    head_lr_scale: f32,
}

/// Trains an MLP (dense blocks with LayerNorm or none, ReLU or the
/// identity) with SVP, SVP+ or BP on a [`Backend`]: weights, Adam's moments and
/// the workspace live on the device; each step copies the batch there once
/// and reads back one small vector of losses. The projections `R_l` are
/// regenerated on the host from the seed, exactly as on the CPU, and
/// uploaded one layer's at a time (`d' x d_l`, 40 KiB for the reference
/// MLP), never all layers' at once. Model files and checkpoints are the
/// CPU's: [`Trainer::sync_to_host`] brings the weights and moments back.
///
/// A step whose local loss is not finite is reported as on the CPU, but
/// the device has applied its update by then (the check reads the losses
/// back after the step's work is queued, to keep the step free of round
/// trips); the host model keeps the weights of its last sync.
pub struct DeviceTrainer<B: Backend> {
    backend: B,
    method: Method,
    specs: Vec<DenseSpec>,
    layers: Vec<Vec<Part<B::Buffer>>>,
    ws: Workspace<B::Buffer>,
    staging: Staging,
    svp: SvpOptions,
    /// SVP's units (ranges of layers trained together from one local loss).
    units: Vec<std::ops::Range<usize>>,
    optimizer: Optimizer,
    updater: Updater,
    metrics: LayerMetrics,
    max_rows: usize,
    /// Whether the device holds the current weights and moments (they are
    /// uploaded before the first step, and again after a restore).
    on_device: bool,
    /// Device bytes of the workspace (the weights and moments besides).
    workspace_bytes: usize,
}

/// What of `model`'s layers a device does not run yet, if anything.
pub(super) fn check_network(model: &Network) -> Result<(), Unsupported> {
    let no = |what: &str| Err(Unsupported::Config(what.to_string()));
    if !model.is_mlp() {
        return no("only MLPs run on a GPU for now (CNNs and ViTs are next)");
    }
    if model.layers().iter().any(|d| d.spec().activation == Activation::Gelu) {
        return no("the GELU activation (ReLU and the identity are there)");
    }
    Ok(())
}

/// One dense block's forward on `backend`: from `input` into `out`
/// (`rows` rows), LayerNorm's values into `xhat` and `rstd`. `value(p)` is
/// the block's parameter `p`: `W`, `b`, then with LayerNorm `gamma`, `beta`.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_dense<'a, B: Backend>(
    backend: &B,
    spec: &DenseSpec,
    value: impl Fn(usize) -> &'a B::Buffer,
    rows: usize,
    input: &B::Buffer,
    out: &mut B::Buffer,
    xhat: &mut B::Buffer,
    rstd: &mut B::Buffer,
) -> Result<(), CudaError>
where
    B::Buffer: 'a,
{
    let (i, o) = (spec.in_dim, spec.out_dim);
    let relu = spec.activation == Activation::Relu;
    if spec.norm == Norm::LayerNorm {
        backend.gemm(false, true, rows, o, i, 1.0, input, value(0), 0.0, xhat)?;
        backend.layer_norm_forward(xhat, value(1), value(2), value(3), rstd, out, rows, o, relu)
    } else {
        backend.linear(input, value(0), value(1), out, rows, i, o, relu)
    }
}

/// What in `config` (and `model`) the device trainer does not do yet, if anything.
fn check_supported(model: &Network, config: &Config) -> Result<(), Unsupported> {
    let no = |what: &str| Err(Unsupported::Config(what.to_string()));
    check_network(model)?;
    if model.layers().iter().any(|d| d.spec().dropout > 0.0) {
        return no("dropout on a block's output");
    }
    if config.train.train_from_layer > 1 {
        return no("frozen layers (train_from_layer)");
    }
    match config.optimizer {
        Optimizer::Adam { state: MomentDtype::F32, .. } | Optimizer::AdamW { state: MomentDtype::F32, .. } => {}
        Optimizer::Adam { .. } | Optimizer::AdamW { .. } => return no("bf16 optimizer moments"),
        Optimizer::Sgd { momentum: 0.0, .. } => {}
        Optimizer::Sgd { .. } => return no("SGD with momentum (plain SGD, Adam and AdamW are there)"),
    }
    if config.train.method == Method::Svp && config.svp.label_concat {
        return no("the label-concatenation projection");
    }
    Ok(())
}

/// `bufs[read]` shared and `bufs[write]` exclusive (`read != write`).
pub(super) fn read_write<T>(bufs: &mut [T], read: usize, write: usize) -> (&T, &mut T) {
    assert_ne!(read, write, "a layer cannot write its own input");
    if read < write {
        let (a, b) = bufs.split_at_mut(write);
        (&a[read], &mut b[0])
    } else {
        let (a, b) = bufs.split_at_mut(read);
        (&b[0], &mut a[write])
    }
}

/// The parts of a dense block's parameters: `(offset, len)` of `W`, `b`
/// and, with LayerNorm, `gamma` and `beta`, in the host layout.
pub(super) fn part_ranges(spec: &DenseSpec) -> Vec<(usize, usize)> {
    let (i, o) = (spec.in_dim, spec.out_dim);
    let mut parts = vec![(0, o * i), (o * i, o)];
    if spec.norm == Norm::LayerNorm {
        parts.extend([(o * i + o, o), (o * i + 2 * o, o)]);
    }
    parts
}

impl<B: Backend> DeviceTrainer<B> {
    /// A trainer for `model` under `config` on `backend`, for batches of up
    /// to `config.train.batch_size` rows; fails with one line if the config
    /// asks for what the device trainer does not do yet, or the device's
    /// memory is not there.
    pub fn try_new(backend: B, model: &Network, config: &Config) -> Result<Self, Unsupported> {
        check_supported(model, config)?;
        let specs: Vec<DenseSpec> = model.layers().iter().map(|d| *d.spec()).collect();
        let rows = config.train.batch_size;
        let (input, classes) = (model.input(), model.classes());
        let width = specs.iter().map(|s| s.out_dim).max().unwrap_or(classes);
        let heads = config.projection_heads(classes);
        let dim = heads.dim;
        let vdim = dim.max(classes);
        let method = config.train.method;
        let svp = method == Method::Svp;
        // The weights and Adam's two moments; the rest is the workspace.
        let adam = !matches!(config.optimizer, Optimizer::Sgd { .. });
        let copies = if adam { 3 } else { 1 };
        let state_bytes: usize = model.layers().iter().map(|d| copies * 4 * d.param_len()).sum();
        let mut bytes = 0;
        let mut zeros = |len: usize| {
            bytes += 4 * len;
            backend.zeros(len)
        };
        let mut layers = Vec::with_capacity(specs.len());
        for spec in &specs {
            let parts = part_ranges(spec)
                .into_iter()
                .map(|(offset, len)| {
                    let moments = if adam { len } else { 0 };
                    Ok(Part { offset, len, value: zeros(len)?, m: zeros(moments)?, v: zeros(moments)? })
                })
                .collect::<Result<Vec<_>, CudaError>>()?;
            layers.push(parts);
        }
        let per_layer = |f: &dyn Fn(&DenseSpec) -> usize| specs.iter().map(f).collect::<Vec<_>>();
        let units = if svp {
            crate::units(model, config.svp.layers_per_unit, config.svp.head_joins_last_unit)
        } else {
            Vec::new()
        };
        let unit_len = units.iter().map(|u| u.len()).max().unwrap_or(1);
        let (act_lens, norm_lens) = if svp {
            // A unit's input and each of its layers' outputs; one cache per position in a unit.
            (vec![rows * width; unit_len + 1], vec![rows * width; unit_len])
        } else {
            (
                per_layer(&|s| rows * s.out_dim),
                per_layer(&|s| if s.norm == Norm::LayerNorm { rows * s.out_dim } else { 0 }),
            )
        };
        let max_params = specs.iter().map(|s| s.in_dim * s.out_dim).max().unwrap_or(0);
        let (fa_rows, proj_width) = if svp { (rows, width.max(input)) } else { (0, 0) };
        let ws = Workspace {
            x: zeros(rows * input)?,
            labels: zeros(rows)?,
            acts: act_lens.iter().map(|&n| zeros(n)).collect::<Result<_, _>>()?,
            xhat: norm_lens.iter().map(|&n| zeros(n)).collect::<Result<_, _>>()?,
            rstd: norm_lens.iter().map(|&n| zeros(if n > 0 { rows } else { 0 })).collect::<Result<_, _>>()?,
            dh: zeros(rows * width)?,
            dx: zeros(if svp && unit_len == 1 { 0 } else { rows * width })?,
            grads: [zeros(max_params)?, zeros(width)?, zeros(width)?, zeros(width)?],
            r: zeros(dim * proj_width)?,
            v: zeros(fa_rows * vdim)?,
            dv: zeros(fa_rows * vdim)?,
            normed: zeros(fa_rows * vdim)?,
            dnormed: zeros(fa_rows * vdim)?,
            norms: zeros(fa_rows)?,
            sim: zeros(fa_rows * fa_rows)?,
            target: zeros(fa_rows * fa_rows)?,
            stats: zeros(3 * specs.len())?,
        };
        let staging =
            Staging { labels: vec![0.0; rows], tile: vec![0.0; dim * proj_width], stats: vec![0.0; 3 * specs.len()] };
        Ok(Self {
            backend,
            method,
            layers,
            ws,
            staging,
            svp: SvpOptions {
                heads,
                lambda: config.svp.lambda,
                head_lambda: config.svp.head_lambda.unwrap_or(config.svp.lambda),
                align_first: config.svp.first_layer_alignment == FirstLayerAlignment::Input,
                mean_center: config.svp.mean_center,
                head_lr_scale: config.svp.head_lr_scale,
            },
            optimizer: config.optimizer,
            updater: Updater::try_new(model, config.optimizer, rows, 0)
                .map_err(|e| Unsupported::Config(e.to_string()))?,
            metrics: LayerMetrics::new(specs.len()),
            units,
            max_rows: rows,
            on_device: false,
            workspace_bytes: bytes - state_bytes,
            specs,
        })
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Copies the model's weights and the optimizer's moments to the device.
    fn upload(&mut self, model: &Network) -> Result<(), CudaError> {
        for (l, parts) in self.layers.iter_mut().enumerate() {
            let params = model.layer_params(l);
            let (m, v) = match &self.updater.states()[l].moments {
                Moments::F32 { m, v } => (&m[..], &v[..]),
                _ => (&[][..], &[][..]),
            };
            for p in parts {
                let range = p.offset..p.offset + p.len;
                self.backend.write(&mut p.value, &params[range.clone()])?;
                if m.len() >= range.end && v.len() >= range.end {
                    self.backend.write(&mut p.m, &m[range.clone()])?;
                    self.backend.write(&mut p.v, &v[range])?;
                }
            }
        }
        self.on_device = true;
        Ok(())
    }

    /// Layer `l`'s backward from `dy` (wrt its output, used as scratch) and
    /// its Adam update; `dx`, if given, gets the gradient wrt its input
    /// (from the weights before the update).
    #[allow(clippy::too_many_arguments)]
    fn backward_update_layer(
        &mut self,
        l: usize,
        rows: usize,
        read: Read,
        out: usize,
        cache: usize,
        with_dx: bool,
        lr_scale: f32,
    ) -> Result<(), CudaError> {
        let spec = self.specs[l];
        let (i, o) = (spec.in_dim, spec.out_dim);
        let relu = spec.activation == Activation::Relu;
        let (backend, ws, parts) = (&self.backend, &mut self.ws, &mut self.layers[l]);
        let [dw, db, dgamma, dbeta] = &mut ws.grads;
        if spec.norm == Norm::LayerNorm {
            let (xhat, rstd) = (&ws.xhat[cache], &ws.rstd[cache]);
            let (gamma, beta) = (&parts[2].value, &parts[3].value);
            backend.layer_norm_backward(xhat, rstd, gamma, beta, &mut ws.dh, dgamma, dbeta, db, rows, o, relu)?;
        } else {
            if relu {
                backend.relu_backward(&mut ws.dh, &ws.acts[out], rows * o)?;
            }
            backend.column_sums(&ws.dh, rows, o, db)?;
        }
        let input = match read {
            Read::Batch => &ws.x,
            Read::Act(a) => &ws.acts[a],
        };
        backend.gemm(true, false, o, i, rows, 1.0, &ws.dh, input, 0.0, dw)?;
        if with_dx {
            backend.gemm(false, false, rows, i, o, 1.0, &ws.dh, &parts[0].value, 0.0, &mut ws.dx)?;
        }
        let state = &mut self.updater.states_mut()[l];
        state.steps += 1;
        let grads = parts.iter_mut().zip([&*dw, &*db, &*dgamma, &*dbeta]);
        match (self.optimizer, self.optimizer.adam_step(lr_scale, state.steps)) {
            (_, Some(step)) => {
                let scalars = AdamScalars {
                    beta1: step.beta1,
                    beta2: step.beta2,
                    eps: step.eps,
                    l2: step.l2,
                    decay: step.decay,
                    step: step.step,
                    inv_bc2_sqrt: step.inv_bc2_sqrt,
                };
                for (p, grad) in grads {
                    backend.adam(&mut p.value, grad, &mut p.m, &mut p.v, p.len, scalars)?;
                }
            }
            (Optimizer::Sgd { lr, weight_decay, .. }, None) => {
                for (p, grad) in grads {
                    backend.sgd(&mut p.value, grad, p.len, lr * lr_scale, weight_decay)?;
                }
            }
            (_, None) => unreachable!("Adam and AdamW have Adam's scalars"),
        }
        Ok(())
    }

    /// Copies `x` and `y` to the device (uploading the weights first, if they are not there).
    fn load_batch(&mut self, model: &Network, x: &[f32], y: &[u32]) -> Result<(), CudaError> {
        if !self.on_device {
            self.upload(model)?;
        }
        self.backend.write(&mut self.ws.x, x)?;
        for (f, &label) in self.staging.labels.iter_mut().zip(y) {
            *f = label as f32;
        }
        self.backend.write(&mut self.ws.labels, &self.staging.labels[..y.len()])
    }

    /// Uploads layer `layer`'s `R` (of width `width`; 0 = the input's),
    /// with the dropout mask of `step` if given, into the workspace.
    fn upload_projection(
        &mut self,
        layer: usize,
        width: usize,
        with_labels: bool,
        step: Option<u64>,
    ) -> Result<(), CudaError> {
        let p = self.svp.heads.for_layer(layer, width, with_labels);
        let len = p.out_dim * width;
        p.fill_rows(0, p.out_dim, step, &mut self.staging.tile[..len]);
        self.backend.write(&mut self.ws.r, &self.staging.tile[..len])
    }

    /// SVP's local loss of layer `l` on its local logits (`ws.v`, or for
    /// the head its output `ws.acts[a]` with `logits = Some(a)`) of
    /// `width`: cross-entropy plus `lambda` times the alignment to the
    /// target, if there is one; `dL/dlogits` into `ws.dv`. Leaves `S(v)` as
    /// the next layer's target unless `is_head`.
    #[allow(clippy::too_many_arguments)]
    fn local_loss(
        &mut self,
        l: usize,
        rows: usize,
        logits: Option<usize>,
        width: usize,
        has_target: bool,
        lambda: f32,
        is_head: bool,
    ) -> Result<(), CudaError> {
        let (backend, center) = (&self.backend, self.svp.mean_center);
        let Workspace { acts, v, labels, dv, stats, normed, norms, sim, target, dnormed, .. } = &mut self.ws;
        let logits = match logits {
            Some(a) => &acts[a],
            None => &*v,
        };
        backend.softmax_xent(logits, labels, dv, stats, 3 * l, rows, width)?;
        if has_target {
            backend.fa_normalize(logits, normed, norms, rows, width, center)?;
            backend.gemm(false, true, rows, rows, width, 1.0, normed, normed, 0.0, sim)?;
            backend.fa_difference(sim, target, stats, 3 * l + 2, rows)?;
            if lambda != 0.0 {
                let scale = 4.0 / (rows * rows) as f32;
                backend.gemm(false, false, rows, width, rows, scale, target, normed, 0.0, dnormed)?;
                backend.fa_gradient(dnormed, normed, norms, dv, rows, width, center, lambda)?;
            }
            // S(v) becomes the next layer's target (D, in `target`, is used up).
            std::mem::swap(sim, target);
        } else if !is_head {
            backend.fa_normalize(logits, normed, norms, rows, width, center)?;
            backend.gemm(false, true, rows, rows, width, 1.0, normed, normed, 0.0, target)?;
        }
        Ok(())
    }

    /// The first layer's alignment target `S(R_0 x)`, with
    /// `first_layer_alignment = "input"`; says whether there is one.
    fn first_alignment_target(&mut self, rows: usize) -> Result<bool, CudaError> {
        if !self.svp.align_first {
            return Ok(false);
        }
        let (input, dim) = (self.specs[0].in_dim, self.svp.heads.dim);
        self.upload_projection(0, input, false, None)?;
        let (backend, center) = (&self.backend, self.svp.mean_center);
        let Workspace { x, r, v, normed, norms, target, .. } = &mut self.ws;
        backend.gemm(false, true, rows, dim, input, 1.0, x, r, 0.0, v)?;
        backend.fa_normalize(v, normed, norms, rows, dim, center)?;
        backend.gemm(false, true, rows, rows, dim, 1.0, normed, normed, 0.0, target)?;
        Ok(true)
    }

    /// One SVP step, unit by unit (a unit is one layer, or for SVP+ a few,
    /// as [`crate::units`] splits the network): forward the unit; project
    /// its output with the seed's `R` (the head: its own logits); local
    /// loss; `dL/dh` through `R` alone; backprop and update inside the unit;
    /// its output, detached, is the next unit's input. Each unit's losses go
    /// to the statistics slot of its last layer.
    fn svp_step(&mut self, rows: usize, step: u64, lr_scale: f32) -> Result<(), CudaError> {
        let n = self.specs.len();
        let ring = self.ws.acts.len();
        let mut has_target = self.first_alignment_target(rows)?;
        let dim = self.svp.heads.dim;
        // The buffer holding the unit's input; `None` while that is the batch.
        let mut unit_input: Option<usize> = None;
        for u in 0..self.units.len() {
            let unit = self.units[u].clone();
            let slot = |j: usize| (unit_input.unwrap_or(0) + 1 + j) % ring;
            let read = |j: usize| match (j, unit_input) {
                (0, None) => Read::Batch,
                (0, Some(i)) => Read::Act(i),
                _ => Read::Act(slot(j - 1)),
            };
            for (j, l) in unit.clone().enumerate() {
                let spec = self.specs[l];
                let (backend, ws, parts) = (&self.backend, &mut self.ws, &self.layers[l]);
                let (input, out) = match read(j) {
                    Read::Batch => (&ws.x, &mut ws.acts[slot(j)]),
                    Read::Act(a) => read_write(&mut ws.acts, a, slot(j)),
                };
                forward_dense(backend, &spec, |p| &parts[p].value, rows, input, out, &mut ws.xhat[j], &mut ws.rstd[j])?;
            }
            let (last, len) = (unit.end - 1, unit.len());
            let (o, is_head) = (self.specs[last].out_dim, unit.end == n);
            let out = slot(len - 1);
            if is_head {
                self.local_loss(last, rows, Some(out), o, has_target, self.svp.head_lambda, true)?;
                self.backend.copy(&self.ws.dv, &mut self.ws.dh, rows * o)?;
            } else {
                self.upload_projection(unit.end, o, true, Some(step))?;
                let Workspace { acts, r, v, .. } = &mut self.ws;
                self.backend.gemm(false, true, rows, dim, o, 1.0, &acts[out], r, 0.0, v)?;
                self.local_loss(last, rows, None, dim, has_target, self.svp.lambda, false)?;
                let Workspace { dv, r, dh, .. } = &mut self.ws;
                self.backend.gemm(false, false, rows, o, dim, 1.0, dv, r, 0.0, dh)?;
                has_target = true;
            }
            for (j, l) in unit.clone().enumerate().rev() {
                let lr = if l + 1 == n { lr_scale * self.svp.head_lr_scale } else { lr_scale };
                self.backward_update_layer(l, rows, read(j), slot(j), j, j > 0, lr)?;
                if j > 0 {
                    std::mem::swap(&mut self.ws.dh, &mut self.ws.dx);
                }
            }
            unit_input = Some(out);
        }
        Ok(())
    }

    /// One BP step: forward through every layer, keeping each one's
    /// activations and LayerNorm values; cross-entropy at the head; backward
    /// layer by layer from the head, each updated after its input gradient
    /// is computed.
    fn bp_step(&mut self, rows: usize, lr_scale: f32) -> Result<(), CudaError> {
        let n = self.specs.len();
        for l in 0..n {
            let spec = self.specs[l];
            let (backend, ws, parts) = (&self.backend, &mut self.ws, &self.layers[l]);
            let (input, out) = if l == 0 { (&ws.x, &mut ws.acts[0]) } else { read_write(&mut ws.acts, l - 1, l) };
            forward_dense(backend, &spec, |p| &parts[p].value, rows, input, out, &mut ws.xhat[l], &mut ws.rstd[l])?;
        }
        let classes = self.specs[n - 1].out_dim;
        let Workspace { acts, labels, dh, stats, .. } = &mut self.ws;
        self.backend.softmax_xent(&acts[n - 1], labels, dh, stats, 3 * (n - 1), rows, classes)?;
        for l in (0..n).rev() {
            let read = if l == 0 { Read::Batch } else { Read::Act(l - 1) };
            self.backward_update_layer(l, rows, read, l, l, l > 0, lr_scale)?;
            if l > 0 {
                std::mem::swap(&mut self.ws.dh, &mut self.ws.dx);
            }
        }
        Ok(())
    }
}

impl<B: Backend> Trainer for DeviceTrainer<B> {
    fn step(&mut self, model: &mut Network, x: &[f32], y: &[u32], lr_scale: f32) -> Result<f32, TrainError> {
        let rows = y.len();
        assert!(rows > 0 && rows <= self.max_rows, "batch of {rows} rows for a trainer sized for {}", self.max_rows);
        let step = self.updater.step();
        let device = |e: CudaError| TrainError::Device(e.to_string());
        self.load_batch(model, x, y).map_err(device)?;
        let n = self.specs.len();
        match self.method {
            Method::Svp => self.svp_step(rows, step, lr_scale).map_err(device)?,
            Method::Bp => self.bp_step(rows, lr_scale).map_err(device)?,
        }
        // The step's one read back: every unit's losses.
        self.backend.read(&self.ws.stats, &mut self.staging.stats).map_err(device)?;
        let units = if self.method == Method::Svp { self.units.len() } else { 1 };
        for u in 0..units {
            // Where a unit's losses are (its last layer's slot), and whether
            // it had an alignment target: every unit after the first does,
            // the first with `first_layer_alignment = "input"`.
            let (l, aligned) = match self.method {
                Method::Svp => (self.units[u].end - 1, u > 0 || self.svp.align_first),
                Method::Bp => (n - 1, false),
            };
            let s = &self.staging.stats[3 * l..3 * l + 3];
            let fa = if aligned { s[2] } else { 0.0 };
            let lambda = if l + 1 == n { self.svp.head_lambda } else { self.svp.lambda };
            let loss = if self.method == Method::Svp { s[0] + lambda * fa } else { s[0] };
            if !loss.is_finite() {
                return Err(TrainError::Diverged { layer: l + 1, step, loss });
            }
            if self.method == Method::Svp {
                self.metrics.record(l, s[0], fa, s[1] as usize);
            }
        }
        if self.method == Method::Svp {
            self.metrics.count_step(rows);
        }
        self.updater.finish_step();
        Ok(self.staging.stats[3 * (n - 1)])
    }

    fn updater(&self) -> &Updater {
        &self.updater
    }

    fn updater_mut(&mut self) -> &mut Updater {
        &mut self.updater
    }

    /// Device memory besides the weights and Adam's moments (which take
    /// as much there as [`Trainer::optimizer_bytes`] on the host).
    fn workspace_bytes(&self) -> usize {
        self.workspace_bytes
    }

    fn device_memory_in_use(&self) -> Option<usize> {
        self.backend.memory_in_use()
    }

    fn layer_metrics(&self) -> Option<&LayerMetrics> {
        (self.method == Method::Svp).then_some(&self.metrics)
    }

    fn reset_layer_metrics(&mut self) {
        self.metrics.reset();
    }

    fn restore(&mut self, state: TrainerState) -> Result<(), String> {
        self.updater.restore(state)?;
        self.on_device = false;
        Ok(())
    }

    fn store_weight_gradients(&mut self, _model: &Network) -> Result<(), svp_alloc::OutOfMemory> {
        // A device trainer always stores the weight gradient.
        Ok(())
    }

    /// Downloads the weights into `model` and Adam's moments into the
    /// optimizer state (for a checkpoint, an evaluation, the model file).
    fn sync_to_host(&mut self, model: &mut Network) -> Result<(), TrainError> {
        if !self.on_device {
            return Ok(());
        }
        let device = |e: CudaError| TrainError::Device(e.to_string());
        for (l, parts) in self.layers.iter().enumerate() {
            let params = model.layer_params_mut(l);
            let moments = &mut self.updater.states_mut()[l].moments;
            for p in parts {
                let range = p.offset..p.offset + p.len;
                self.backend.read(&p.value, &mut params[range.clone()]).map_err(device)?;
                if let Moments::F32 { m, v } = moments {
                    self.backend.read(&p.m, &mut m[range.clone()]).map_err(device)?;
                    self.backend.read(&p.v, &mut v[range]).map_err(device)?;
                }
            }
        }
        Ok(())
    }
}

/// Which buffer a layer reads as its input.
#[derive(Clone, Copy)]
enum Read {
    Batch,
    Act(usize),
}
