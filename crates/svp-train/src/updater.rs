//! What both trainers update weights with, and what a checkpoint restores.

use crate::{Network, TrainerState};
use svp_alloc::OutOfMemory;
use svp_optim::{LayerState, LayerUpdate, Optimizer};

/// The optimizer, each layer's optimizer state and the step counter.
#[derive(Debug)]
pub struct Updater {
    optimizer: Optimizer,
    states: Vec<LayerState>,
    step: u64,
    fused: bool,
}

impl Updater {
    /// Fresh state for every layer of `model`, failing cleanly without the memory.
    pub fn try_new(model: &Network, optimizer: Optimizer) -> Result<Self, OutOfMemory> {
        let states =
            (0..model.n_layers()).map(|l| optimizer.try_new_state(model.trainable_len(l))).collect::<Result<_, _>>()?;
        Ok(Self { optimizer, states, step: 0, fused: true })
    }

    /// One update of layer `l`.
    pub fn update(&mut self, l: usize, lr_scale: f32, params: &mut [f32], grad: &[f32]) {
        self.optimizer.update(lr_scale, params, grad, &mut self.states[l]);
    }

    /// Starts one update of layer `l`, which the layer's backward then
    /// completes as its gradient comes ([`crate::Layer::backward_update`]).
    pub fn begin(&mut self, l: usize, lr_scale: f32) -> LayerUpdate<'_> {
        let update = self.optimizer.begin_update(lr_scale, &mut self.states[l]);
        if self.fused { update } else { update.stored_gradients_only() }
    }

    /// Whether dense weights are updated from their gradient as the GEMM
    /// computes it, without storing it (the default; for batches of at most
    /// [`svp_tensor::SINK_MAX_DEPTH`] rows).
    /// Both ways give the same bits ([`crate::Trainer::store_weight_gradients`]
    /// switches, with a gradient buffer that has room).
    pub(crate) fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    /// Steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Counts a completed step.
    pub fn finish_step(&mut self) {
        self.step += 1;
    }

    /// Each layer's optimizer state.
    pub fn states(&self) -> &[LayerState] {
        &self.states
    }

    /// Bytes of optimizer state.
    pub fn bytes(&self) -> usize {
        self.states.iter().map(LayerState::bytes).sum()
    }

    /// Restores a checkpoint's counter and states, if they fit this model.
    pub fn restore(&mut self, state: TrainerState) -> Result<(), String> {
        if self.states.len() != state.optimizer.len() {
            return Err(format!(
                "optimizer state for {} layers, the model has {}",
                state.optimizer.len(),
                self.states.len()
            ));
        }
        for (l, (a, b)) in self.states.iter().zip(&state.optimizer).enumerate() {
            if !a.moments.same_shape(&b.moments) {
                return Err(format!(
                    "optimizer state of layer {} does not fit the layer (another kind or size of moments)",
                    l + 1
                ));
            }
        }
        self.step = state.step;
        self.states = state.optimizer;
        Ok(())
    }
}
