//! The epoch loop shared by the CLI, tests and the device simulator.

use crate::config::{Config, Method};
use crate::eval::{EvalReport, evaluate};
use crate::model::{InferenceWorkspace, Mlp, ProjectionHeads};
use crate::{BpTrainer, SvpTrainer, TrainError, Trainer};
use std::time::Instant;
use svp_data::{Batcher, DataSplit, Normalization};

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
}

/// The result of [`fit`]: the model (its last good weights if training
/// diverged), the epochs completed and, if it stopped early, why.
pub struct FitOutcome {
    /// The trained network.
    pub model: Mlp,
    /// SVP projection heads (`None` for backpropagation).
    pub heads: Option<ProjectionHeads>,
    /// Input normalization fitted on the training set.
    pub norm: Normalization,
    /// One report per completed epoch.
    pub epochs: Vec<EpochReport>,
    /// Set when a non-finite loss stopped training.
    pub diverged: Option<TrainError>,
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

/// Watches a run of [`fit`].
pub trait FitObserver {
    /// After every step.
    fn on_step(&mut self, _progress: &Progress) {}
    /// After every epoch's evaluation.
    fn on_epoch(&mut self, _report: &EpochReport) {}
}

/// Watches nothing.
impl FitObserver for () {}

/// Trains a fresh model on `data` as `config` says. `config` must have been
/// validated against the data.
pub fn fit(config: &Config, data: &DataSplit, observer: &mut impl FitObserver) -> FitOutcome {
    let seed = config.train.seed;
    let mut model = Mlp::new(data.features(), data.classes, &config.model, seed);
    let norm = Normalization::fit(&data.train);
    let rows = config.train.batch_size;
    let mut trainer: Box<dyn Trainer> = match config.train.method {
        Method::Svp => Box::new(SvpTrainer::new(&model, config)),
        Method::Bp => Box::new(BpTrainer::new(&model, config)),
    };
    let heads = match config.train.method {
        Method::Svp => Some(ProjectionHeads::from_config(config, data.classes)),
        Method::Bp => None,
    };
    let mut batcher = Batcher::new(data.train.len(), rows, norm);
    let mut x = vec![0.0f32; rows * data.features()];
    let mut y = vec![0u32; rows];
    let total_steps = (batcher.batches() * config.train.epochs) as u64;
    let mut eval_ws = InferenceWorkspace::default();
    let mut epochs = Vec::new();
    let mut diverged = None;

    'epochs: for epoch in 1..=config.train.epochs {
        batcher.start_epoch(seed, epoch as u64, config.train.shuffle);
        trainer.reset_layer_metrics();
        let start = Instant::now();
        let (mut loss_sum, mut samples) = (0.0f64, 0usize);
        let batches = batcher.batches();
        for b in 0..batches {
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
            let elapsed = start.elapsed().as_secs_f64().max(1e-9);
            observer.on_step(&Progress {
                epoch,
                batch: b + 1,
                batches,
                loss: loss_sum / (b + 1) as f64,
                samples_per_s: samples as f64 / elapsed,
            });
        }
        let seconds = start.elapsed().as_secs_f64();
        let EvalReport { accuracy, exit_accuracy, .. } =
            evaluate(&model, &data.test, norm, rows, heads.as_ref(), &mut eval_ws);
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
            samples_per_s: samples as f64 / seconds.max(1e-9),
            layers,
        };
        observer.on_epoch(&report);
        epochs.push(report);
    }
    let memory = MemoryBreakdown {
        params: model.param_bytes(),
        optimizer: trainer.optimizer_bytes(),
        workspace: trainer.workspace_bytes(),
    };
    FitOutcome { model, heads, norm, epochs, diverged, memory }
}
