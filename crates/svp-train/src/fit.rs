//! The epoch loop shared by the CLI, tests and the device simulator.

use crate::config::{Config, Method};
use crate::device::{DeviceTrainer, HostBackend, TrainOn, Unsupported};
use crate::eval::{EvalReport, evaluate_with};
use crate::{BpTrainer, SvpTrainer, TrainError, Trainer, TrainerState, TrainerStateRef};
use std::time::Instant;
use svp_alloc::OutOfMemory;
use svp_data::{Batcher, DataSplit};
use svp_net::{InferenceWorkspace, Network, Normalization, ProjectionHeads, UnitLayout};

/// Progress inside an epoch, reported after every step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// 1-based epoch.
    pub epoch: usize,
    /// Steps done in this epoch.
    pub batch: usize,
    /// Steps per epoch.
    pub batches: usize,
    /// Mean head loss over this epoch so far.
    pub loss: f64,
    /// Training samples per second over this epoch so far.
    pub samples_per_s: f64,
}

/// Per-layer numbers of one SVP epoch (index `l` = layer `l + 1`, head last).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerEpoch {
    /// Mean local cross-entropy.
    pub ce: Vec<f64>,
    /// Mean local feature-alignment loss.
    pub fa: Vec<f64>,
    /// Training accuracy of each layer's local head.
    pub train_acc: Vec<f64>,
    /// Test accuracy of each hidden layer's early exit.
    pub exit_test_acc: Vec<f64>,
}

/// What one epoch gave.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochReport {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean head cross-entropy over the epoch's steps.
    pub train_loss: f64,
    /// Test accuracy of the head.
    pub test_acc: f64,
    /// Wall time of the training part of the epoch (evaluation excluded).
    pub seconds: f64,
    /// Training samples per second.
    pub samples_per_s: f64,
    /// SVP only: per-layer losses and accuracies.
    pub layers: Option<LayerEpoch>,
    /// Accuracy on [`FitOptions::validation`], if given.
    pub val_acc: Option<f64>,
}

/// The result of [`fit`]: the model, the epochs completed and, if it
/// stopped early, why.
pub struct FitOutcome {
    /// The trained network. If training diverged, the weights where it
    /// stopped, which may not be finite: [`FitObserver::on_epoch`] saw the
    /// last finite ones (each epoch's, once checked).
    pub model: Network,
    /// SVP projection heads (`None` for backpropagation).
    pub heads: Option<ProjectionHeads>,
    /// How SVP grouped the layers into units (`None` for backpropagation).
    pub units: Option<UnitLayout>,
    /// Input normalization fitted on the training set.
    pub norm: Normalization,
    /// One report per completed epoch.
    pub epochs: Vec<EpochReport>,
    /// Set when a non-finite loss stopped training.
    pub diverged: Option<TrainError>,
    /// Set when the observer stopped the run (a checkpoint or an epoch's
    /// model could not be written), or a resume state did not fit.
    pub interrupted: Option<String>,
    /// Bytes of parameters, optimizer state and training workspace.
    pub memory: MemoryBreakdown,
}

/// Where training memory went (bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryBreakdown {
    /// Parameters.
    pub params: usize,
    /// Optimizer state.
    pub optimizer: usize,
    /// Activations, caches, gradients, projection tiles.
    pub workspace: usize,
}

/// The model as an epoch left it, with its weights checked finite: what a
/// model file holds.
#[derive(Clone, Copy)]
pub struct EpochModel<'a> {
    /// The network.
    pub network: &'a Network,
    /// SVP projection heads (`None` for backpropagation).
    pub heads: Option<&'a ProjectionHeads>,
    /// How SVP grouped the layers into units (`None` for backpropagation).
    pub units: Option<UnitLayout>,
    /// The input normalization it was trained with.
    pub norm: Normalization,
}

/// Watches a run of [`fit`].
pub trait FitObserver {
    /// After every step.
    fn on_step(&mut self, _progress: &Progress) {}
    /// After every epoch's evaluation, with the model it evaluated (whose
    /// weights are all finite: an epoch that leaves any other is reported
    /// as [`TrainError::NonFiniteWeights`] instead). An error (a model that
    /// could not be saved) stops training.
    fn on_epoch(&mut self, _report: &EpochReport, _model: EpochModel<'_>) -> Result<(), String> {
        Ok(())
    }
    /// When a checkpoint is due ([`FitOptions::checkpoint_every`] steps, and
    /// after each epoch). An error stops training.
    fn on_checkpoint(&mut self, _state: &FitStateRef<'_>) -> Result<(), String> {
        Ok(())
    }
}

/// Everything needed to continue a run exactly where it stopped.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FitState {
    /// The epoch to continue (1-based).
    pub epoch: usize,
    /// The next batch of that epoch.
    pub next_batch: usize,
    /// Head-loss sum over that epoch's batches so far.
    pub loss_sum: f64,
    /// Samples of that epoch trained so far.
    pub samples: usize,
    /// Epoch reports so far: (epoch, train loss, test accuracy).
    pub history: Vec<(usize, f64, f64)>,
    /// All parameters.
    pub params: Vec<f32>,
    /// Step counter and optimizer state.
    pub trainer: TrainerState,
}

/// The state at a checkpoint, borrowed from the running trainer: it
/// serializes exactly as [`FitState`] does, without a copy of the weights or
/// the optimizer state (on a device with little RAM, a copy may not fit).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct FitStateRef<'a> {
    /// The epoch to continue (1-based).
    pub epoch: usize,
    /// The next batch of that epoch.
    pub next_batch: usize,
    /// Head-loss sum over that epoch's batches so far.
    pub loss_sum: f64,
    /// Samples of that epoch trained so far.
    pub samples: usize,
    /// Epoch reports so far: (epoch, train loss, test accuracy).
    pub history: &'a [(usize, f64, f64)],
    /// All parameters.
    pub params: &'a [f32],
    /// Step counter and optimizer state.
    pub trainer: TrainerStateRef<'a>,
}

impl FitStateRef<'_> {
    /// An owned copy.
    pub fn to_owned_state(&self) -> FitState {
        FitState {
            epoch: self.epoch,
            next_batch: self.next_batch,
            loss_sum: self.loss_sum,
            samples: self.samples,
            history: self.history.to_vec(),
            params: self.params.to_vec(),
            trainer: TrainerState { step: self.trainer.step, optimizer: self.trainer.optimizer.to_vec() },
        }
    }
}

/// How [`fit_with`] runs.
#[derive(Clone, Debug, Default)]
pub struct FitOptions {
    /// Continue from this state instead of a fresh model.
    pub resume: Option<FitState>,
    /// Start from these weights (fine-tuning) instead of a fresh initialization;
    /// the optimizer starts fresh. Must match the config's architecture.
    pub initial_params: Option<Vec<f32>>,
    /// Use this input normalization instead of fitting one to the training set
    /// (fine-tuning keeps the deployed model's preprocessing).
    pub norm: Option<Normalization>,
    /// Heap that must stay free once everything is allocated, for the
    /// transient buffers of a step (the GEMM's packing buffers): checked once,
    /// before the first step, so a tight budget fails cleanly instead of
    /// aborting mid-step.
    pub headroom_bytes: usize,
    /// Offer a checkpoint every this many steps.
    pub checkpoint_every: Option<u64>,
    /// Samples held out of training, evaluated after every epoch
    /// ([`EpochReport::val_acc`]).
    pub validation: Option<svp_data::Dataset>,
}

/// Watches nothing.
impl FitObserver for () {}

/// Trains a fresh model on `data` as `config` says. `config` must have been
/// validated against the data.
pub fn fit(config: &Config, data: &DataSplit, observer: &mut (impl FitObserver + Send)) -> FitOutcome {
    fit_with(config, data, observer, FitOptions::default())
}

/// [`fit`] with checkpoints and resumption. Resuming from a state taken after
/// k steps gives bit-identical weights to a run that never stopped: data order
/// is a function of (seed, epoch), dropout masks and the schedule of the step.
pub fn fit_with(
    config: &Config,
    data: &DataSplit,
    observer: &mut (impl FitObserver + Send),
    options: FitOptions,
) -> FitOutcome {
    try_fit_with(config, data, observer, options).expect("memory for training")
}

/// [`fit_with`], failing cleanly (before any step) when the weights, optimizer
/// state or training workspace do not fit the memory there is.
///
/// The loop runs on a thread of the rayon pool, where the steps' parallel
/// work goes through that thread's own job queue: called from outside the
/// pool, every parallel call would pass through rayon's shared injector queue,
/// which allocates a block every 63 calls, and the steps would not be
/// allocation-free.
pub fn try_fit_with(
    config: &Config,
    data: &DataSplit,
    observer: &mut (impl FitObserver + Send),
    options: FitOptions,
) -> Result<FitOutcome, OutOfMemory> {
    match try_fit_on(TrainOn::Cpu, config, data, observer, options) {
        Ok(outcome) => Ok(outcome),
        Err(FitError::Memory(e)) => Err(e),
        Err(FitError::Device(e)) => unreachable!("the CPU engine opens no device: {e}"),
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    /// The host's memory is not there for the run (nothing was trained).
    #[error(transparent)]
    Memory(#[from] OutOfMemory),
    /// The device cannot run it: not built in, not there, out of its
    /// memory, or a config the device trainer does not do yet.
    #[error(transparent)]
    Device(#[from] Unsupported),
}

/// [`try_fit_with`] on the engine `train_on` names: the CPU's, or the
/// device trainer ([`crate::device`]) on a GPU or on the host reference
/// backend.
pub fn try_fit_on(
    train_on: TrainOn,
    config: &Config,
    data: &DataSplit,
    observer: &mut (impl FitObserver + Send),
    options: FitOptions,
) -> Result<FitOutcome, FitError> {
    rayon::scope(|_| fit_on_this_thread(train_on, config, data, observer, options))
}

/// The trainer `train_on` names for `model` under `config`, its buffers
/// reserved (on the host or the device).
pub fn trainer_for(train_on: TrainOn, model: &Network, config: &Config) -> Result<Box<dyn Trainer>, FitError> {
    Ok(match (train_on, config.train.method) {
        (TrainOn::Cpu, Method::Svp) => Box::new(SvpTrainer::try_new(model, config)?),
        (TrainOn::Cpu, Method::Bp) => Box::new(BpTrainer::try_new(model, config)?),
        (TrainOn::HostBackend, _) => Box::new(DeviceTrainer::try_new(HostBackend::new(), model, config)?),
        (TrainOn::Cuda(ordinal), _) => cuda_trainer(ordinal, model, config)?,
    })
}

#[cfg(feature = "cuda")]
fn cuda_trainer(ordinal: usize, model: &Network, config: &Config) -> Result<Box<dyn Trainer>, Unsupported> {
    let gpu = svp_cuda::Gpu::open(ordinal)?;
    Ok(Box::new(DeviceTrainer::try_new(gpu, model, config)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_trainer(ordinal: usize, _model: &Network, _config: &Config) -> Result<Box<dyn Trainer>, Unsupported> {
    // This build has no CUDA: the stand-in's `open` says so, and opens nothing.
    svp_cuda::Gpu::open(ordinal)?;
    Err(svp_cuda::CudaError::NotCompiled.into())
}

fn fit_on_this_thread(
    train_on: TrainOn,
    config: &Config,
    data: &DataSplit,
    observer: &mut impl FitObserver,
    options: FitOptions,
) -> Result<FitOutcome, FitError> {
    // A batch never holds more than the training set, so buffers sized for
    // the batch are sized for what a batch can hold (one batch of all of it
    // either way: the same run, without, for a large batch, similarity
    // matrices of the size asked for instead of the size used).
    let whole_set;
    let config = if config.train.batch_size > data.train.len() {
        whole_set = Config {
            train: crate::config::TrainConfig { batch_size: data.train.len().max(1), ..config.train.clone() },
            ..config.clone()
        };
        &whole_set
    } else {
        config
    };
    let seed = config.train.seed;
    let mut options = options;
    // Every buffer of the run is reserved (and counted against the heap's
    // budget) before any is written, so a run that cannot fit fails here
    // without having taken the memory of the buffers before the one that
    // did not fit.
    let mut model = Network::try_zeroed_for_images(data.train.image_shape, data.classes, &config.model)?;
    // Weights handed in move into the model at once: the caller's copy is
    // freed before the rest is reserved (a device may not hold both).
    let initialized = match options.initial_params.take() {
        Some(init) => {
            model.params_mut().copy_from_slice(&init);
            true
        }
        None => false,
    };
    let norm = options.norm.unwrap_or_else(|| Normalization::of_pixels(&data.train.images));
    let rows = config.train.batch_size;
    let mut trainer = trainer_for(train_on, &model, config)?;
    let heads = match config.train.method {
        Method::Svp => Some(config.projection_heads(data.classes)),
        Method::Bp => None,
    };
    let units = heads.is_some().then(|| config.unit_layout());
    let mut batcher = Batcher::new(data.train.len(), rows, norm.table()).with_augment(config.train.augment);
    let mut x = svp_alloc::try_zeros(rows * data.features(), "the input batch")?;
    drop(svp_alloc::try_zeros(options.headroom_bytes / 4, "headroom for a training step's transient buffers")?);
    let mut y = vec![0u32; rows];
    let total_steps = (batcher.batches() * config.train.epochs) as u64;
    let mut eval_ws = InferenceWorkspace::default();
    eval_ws.try_prepare(rows, &model, heads.as_ref().map(|h| h.dim))?;
    if !initialized {
        model.init(seed);
    }
    let mut epochs = Vec::new();
    let mut diverged = None;
    let mut interrupted = None;
    let mut history = Vec::new();
    let (mut first_epoch, mut first_batch, mut resumed_loss, mut resumed_samples) = (1, 0, 0.0, 0);
    if let Some(state) = options.resume {
        model.params_mut().copy_from_slice(&state.params);
        if let Err(e) = trainer.restore(state.trainer) {
            interrupted = Some(format!("cannot resume: {e}"));
        }
        (first_epoch, first_batch, resumed_loss, resumed_samples) =
            (state.epoch, state.next_batch, state.loss_sum, state.samples);
        history = state.history;
    }
    fn snapshot<'a>(
        model: &'a Network,
        trainer: &'a dyn Trainer,
        (epoch, next_batch, loss_sum, samples): (usize, usize, f64, usize),
        history: &'a [(usize, f64, f64)],
    ) -> FitStateRef<'a> {
        FitStateRef {
            epoch,
            next_batch,
            loss_sum,
            samples,
            history,
            params: model.params(),
            trainer: TrainerStateRef { step: trainer.steps(), optimizer: trainer.optimizer_states() },
        }
    }

    'epochs: for epoch in first_epoch..=config.train.epochs {
        if interrupted.is_some() {
            break;
        }
        batcher.start_epoch(seed, epoch as u64, config.train.shuffle);
        trainer.reset_layer_metrics();
        let start = Instant::now();
        let (mut loss_sum, mut samples) = (0.0f64, 0usize);
        let batches = batcher.batches();
        let skip = if epoch == first_epoch { first_batch.min(batches) } else { 0 };
        if skip > 0 {
            (loss_sum, samples) = (resumed_loss, resumed_samples);
        }
        let samples_before = samples; // trained before a resume: not in this run's rate
        for b in skip..batches {
            let n = batcher.gather(&data.train, b, &mut x, &mut y);
            let lr_scale = config.schedule.factor(trainer.steps(), total_steps);
            match trainer.step(&mut model, &x[..n * data.features()], &y[..n], lr_scale) {
                Ok(loss) => loss_sum += loss as f64,
                Err(e) => {
                    diverged = Some(e);
                    break 'epochs;
                }
            }
            samples += n;
            if let Some(every) = options.checkpoint_every
                && every > 0
                && trainer.steps().is_multiple_of(every)
                && b + 1 < batches
            {
                if let Err(e) = trainer.sync_to_host(&mut model) {
                    diverged = Some(e);
                    break 'epochs;
                }
                // A checkpoint takes only finite weights (its loader refuses others).
                if let Some(l) = model.first_non_finite_layer() {
                    diverged = Some(TrainError::NonFiniteWeights { layer: l + 1, step: trainer.steps() });
                    break 'epochs;
                }
                let state = snapshot(&model, trainer.as_ref(), (epoch, b + 1, loss_sum, samples), &history);
                if let Err(e) = observer.on_checkpoint(&state) {
                    interrupted = Some(e);
                    break 'epochs;
                }
            }
            let elapsed = start.elapsed().as_secs_f64().max(1e-9);
            observer.on_step(&Progress {
                epoch,
                batch: b + 1,
                batches,
                loss: loss_sum / (b + 1) as f64,
                samples_per_s: (samples - samples_before) as f64 / elapsed,
            });
        }
        let seconds = start.elapsed().as_secs_f64();
        if let Err(e) = trainer.sync_to_host(&mut model) {
            diverged = Some(e);
            break;
        }
        if let Some(l) = model.first_non_finite_layer() {
            diverged = Some(TrainError::NonFiniteWeights { layer: l + 1, step: trainer.steps() });
            break;
        }
        let EvalReport { accuracy, exit_accuracy, .. } =
            evaluate_with(&model, &data.test, norm, heads.as_ref(), &mut eval_ws, &mut x, &mut y);
        let val_acc = options
            .validation
            .as_ref()
            .map(|v| evaluate_with(&model, v, norm, None, &mut eval_ws, &mut x, &mut y).accuracy);
        let layers = trainer.layer_metrics().map(|m| {
            let s = m.steps.max(1) as f64;
            LayerEpoch {
                ce: m.ce_sum.iter().map(|v| v / s).collect(),
                fa: m.fa_sum.iter().map(|v| v / s).collect(),
                train_acc: m.correct.iter().map(|&c| c as f64 / m.samples.max(1) as f64).collect(),
                exit_test_acc: exit_accuracy.clone(),
            }
        });
        let report = EpochReport {
            epoch,
            train_loss: loss_sum / batches as f64,
            test_acc: accuracy,
            seconds,
            samples_per_s: (samples - samples_before) as f64 / seconds.max(1e-9),
            layers,
            val_acc,
        };
        let epoch_model = EpochModel { network: &model, heads: heads.as_ref(), units, norm };
        let saved = observer.on_epoch(&report, epoch_model);
        history.push((epoch, report.train_loss, report.test_acc));
        epochs.push(report);
        if let Err(e) = saved {
            interrupted = Some(e);
            break;
        }
        if options.checkpoint_every.is_some() {
            let state = snapshot(&model, trainer.as_ref(), (epoch + 1, 0, 0.0, 0), &history);
            if let Err(e) = observer.on_checkpoint(&state) {
                interrupted = Some(e);
                break;
            }
        }
    }
    let memory = MemoryBreakdown {
        params: model.param_bytes(),
        optimizer: trainer.optimizer_bytes(),
        workspace: trainer.workspace_bytes(),
    };
    Ok(FitOutcome { model, heads, units, norm, epochs, diverged, interrupted, memory })
}
