//! Training rules for svp.
//!
//! The network they train ([`Network`], its layers, projection heads and
//! inference) is svp-net's, re-exported here; this crate adds what training
//! needs on top of it:
//!
//! * [`fit`]: the epoch loop (data order, schedule, evaluation, checkpoints,
//!   a memory budget checked before the first step).
//! * [`SvpTrainer`]: Stochastic Variational Propagation. Unit by unit (a layer,
//!   or for SVP+ a few consecutive layers, see [`units`]): forward, project the
//!   unit's output with the seed-regenerated `R_l`, local loss `CE + lambda *
//!   FA`, backward inside the unit alone, update, move on. One workspace sized
//!   for the widest unit serves every unit and step, so memory does not grow
//!   with depth.
//! * [`BpTrainer`]: backpropagation over the same layers; it keeps every layer's
//!   activations, which is the memory contrast.
//! * [`checkpoint`]: checkpoint files, to resume a run bit for bit.
//! * [`finetune`]: the config that continues training a model file.
//! * [`config`]: what a run is (network, rule options, optimizer, schedule),
//!   validated against the data before anything is allocated.
//!
//! ```
//! use svp_train::config::{ModelConfig, TrainConfig};
//! use svp_train::{Config, Method, fit};
//!
//! let data = svp_data::DataSplit::embedded(); // 6,000 + 1,000 Fashion-MNIST images
//! let config = Config {
//!     model: ModelConfig::mlp(vec![64]),
//!     svp: Default::default(),
//!     train: TrainConfig { method: Method::Svp, epochs: 2, batch_size: 64, ..Default::default() },
//!     optimizer: svp_optim::Optimizer::adam(1e-3),
//!     schedule: Default::default(),
//! };
//! config.validate_for_data(&data)?;
//! let run = fit(&config, &data, &mut ()); // `fit_with` adds checkpoints, fine-tuning, a memory budget
//! assert!(run.epochs[1].test_acc > 0.6, "{}", run.epochs[1].test_acc);
//! # Ok::<(), svp_train::ConfigError>(())
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod bp;
pub mod checkpoint;
pub mod config;
pub mod device;
mod eval;
pub mod finetune;
mod fit;
mod frozen;
mod schedule;
mod svp;
mod updater;

pub use bp::BpTrainer;
pub use checkpoint::{Checkpoint, CheckpointRef};
pub use config::{Config, ConfigError, Method};
pub use eval::{EvalReport, argmax, evaluate, evaluate_with};
pub use fit::{
    EpochModel, EpochReport, FitError, FitObserver, FitOptions, FitOutcome, FitState, FitStateRef, LayerEpoch,
    MemoryBreakdown, Progress, fit, fit_with, trainer_for, try_fit_on, try_fit_with,
};
pub use schedule::Schedule;
pub use svp::{LayerMetrics, SvpTrainer, units};
pub use svp_net::{
    InferenceWorkspace, Layer, LayerCache, LayerScratch, Network, Normalization, ProjectionHeads, Readout,
};
pub use updater::Updater;

/// Why a training step stopped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainError {
    /// A local (SVP) or global (BP) loss was NaN or infinite. The update that
    /// would have used it was not applied.
    #[error("training diverged: non-finite loss ({loss}) at layer {layer}, step {step}")]
    Diverged {
        /// 1-based layer whose loss was not finite (the head is the last).
        layer: usize,
        /// Global step.
        step: u64,
        /// The loss value.
        loss: f32,
    },
    /// A layer's weights went NaN or infinite while every loss stayed finite
    /// (a gradient overflowed, and the activation clamped the NaNs away
    /// downstream). Found when an epoch ends, before it is evaluated.
    #[error("training diverged: layer {layer}'s weights are not finite after step {step}")]
    NonFiniteWeights {
        /// 1-based layer holding a non-finite weight.
        layer: usize,
        /// Steps taken.
        step: u64,
    },
    /// The device a [`device::DeviceTrainer`] runs on failed (out of its
    /// memory, a kernel launch, the driver).
    #[error("the GPU failed: {0}")]
    Device(String),
}

/// One training rule, driven by the epoch loop.
pub trait Trainer {
    /// One step on a batch `x` (rows x features) with labels `y`; returns the
    /// classifier head's cross-entropy. On error no update from that loss was applied.
    fn step(&mut self, model: &mut Network, x: &[f32], y: &[u32], lr_scale: f32) -> Result<f32, TrainError>;

    /// The optimizer, its per-layer state and the step counter.
    fn updater(&self) -> &Updater;

    /// Mutable [`Trainer::updater`].
    fn updater_mut(&mut self) -> &mut Updater;

    /// Steps taken so far.
    fn steps(&self) -> u64 {
        self.updater().step()
    }

    /// Bytes of optimizer state.
    fn optimizer_bytes(&self) -> usize {
        self.updater().bytes()
    }

    /// Bytes of training workspace (activations, caches, gradients, projections).
    fn workspace_bytes(&self) -> usize;

    /// From now on, stores each dense block's weight gradient before the
    /// optimizer reads it, instead of handing it straight from the GEMM to
    /// the optimizer: the same bits, a larger gradient buffer (allocated
    /// here) and more memory traffic. For measuring what the fused path saves.
    fn store_weight_gradients(&mut self, model: &Network) -> Result<(), svp_alloc::OutOfMemory> {
        self.updater_mut().store_weight_gradients(model)
    }

    /// Per-layer local losses and head accuracies since the last reset (SVP only).
    fn layer_metrics(&self) -> Option<&LayerMetrics> {
        None
    }

    /// Clears the metrics of [`Trainer::layer_metrics`].
    fn reset_layer_metrics(&mut self) {}

    /// Each layer's optimizer state, for a checkpoint (borrowed: a checkpoint
    /// is written without copying it).
    fn optimizer_states(&self) -> &[svp_optim::LayerState] {
        self.updater().states()
    }

    /// Restores a checkpoint's step counter and optimizer state (for the same model shape).
    fn restore(&mut self, state: TrainerState) -> Result<(), String> {
        self.updater_mut().restore(state)
    }

    /// Bytes of the device's memory in use, for a trainer on a GPU (as its
    /// driver reports it, every process's); `None` on the CPU.
    fn device_memory_in_use(&self) -> Option<usize> {
        None
    }

    /// Brings weights and optimizer state kept elsewhere (a device's
    /// memory) into `model` and [`Trainer::updater`], before anything reads
    /// them: an evaluation, a checkpoint, the model file. The CPU trainers
    /// update `model` in place and have nothing to bring.
    fn sync_to_host(&mut self, _model: &mut Network) -> Result<(), TrainError> {
        Ok(())
    }
}

/// A trainer's resumable state: the step counter and each layer's optimizer state.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Steps taken (drives dropout masks and the learning-rate schedule).
    pub step: u64,
    /// Optimizer state per layer.
    pub optimizer: Vec<svp_optim::LayerState>,
}

/// A borrowed [`TrainerState`], serialized exactly like it.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct TrainerStateRef<'a> {
    /// Steps taken.
    pub step: u64,
    /// Optimizer state per layer.
    pub optimizer: &'a [svp_optim::LayerState],
}
