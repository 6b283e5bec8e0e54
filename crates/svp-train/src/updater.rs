//! What both trainers update weights with, and what a checkpoint restores.

use crate::TrainerState;
use svp_alloc::{OutOfMemory, try_zeros};
use svp_net::Network;
use svp_optim::{LayerState, LayerUpdate, Optimizer};

/// The optimizer, each trained layer's optimizer state, the step counter and
/// the buffer a layer's gradient is stored in when its update cannot take it
/// straight from a GEMM.
#[derive(Debug)]
pub struct Updater {
    optimizer: Optimizer,
    /// One per layer; frozen layers' are empty.
    states: Vec<LayerState>,
    /// Layers below this one are frozen.
    first_trained: usize,
    step: u64,
    /// One layer's stored gradient ([`Network::max_stored_gradient_len`]).
    grad: Vec<f32>,
    /// Whether dense weights take their gradient straight from the GEMM
    /// (batches of at most [`svp_tensor::SINK_MAX_DEPTH`] rows), so `grad`
    /// only holds the rest of a layer's.
    fused: bool,
}

impl Updater {
    /// Fresh state for every layer of `model` from `first_trained` (0-based;
    /// the layers below are frozen and get none), trained in batches of up
    /// to `batch_rows`, failing cleanly without the memory.
    pub fn try_new(
        model: &Network,
        optimizer: Optimizer,
        batch_rows: usize,
        first_trained: usize,
    ) -> Result<Self, OutOfMemory> {
        let state = |l| match l < first_trained {
            true => Ok(LayerState::default()),
            false => optimizer.try_new_state(model.trainable_len(l)),
        };
        let states = (0..model.n_layers()).map(state).collect::<Result<_, _>>()?;
        let fused = batch_rows <= svp_tensor::SINK_MAX_DEPTH;
        let grad = try_zeros(model.max_stored_gradient_len(first_trained, fused), "one layer's stored gradient")?;
        Ok(Self { optimizer, states, first_trained, step: 0, grad, fused })
    }

    /// Starts one update of layer `l`, which the layer's backward then
    /// completes as its gradient comes ([`crate::Layer::backward_update`]),
    /// with the buffer for the gradient it stores.
    ///
    /// # Panics
    /// If layer `l` is frozen.
    pub fn begin(&mut self, l: usize, lr_scale: f32) -> (LayerUpdate<'_>, &mut [f32]) {
        assert!(l >= self.first_trained, "layer {} is frozen", l + 1);
        let update = self.optimizer.begin_update(lr_scale, &mut self.states[l]);
        (if self.fused { update } else { update.stored_gradients_only() }, &mut self.grad)
    }

    /// See [`crate::Trainer::store_weight_gradients`].
    pub fn store_weight_gradients(&mut self, model: &Network) -> Result<(), OutOfMemory> {
        self.grad = try_zeros(model.max_stored_gradient_len(self.first_trained, false), "one layer's stored gradient")?;
        self.fused = false;
        Ok(())
    }

    /// Bytes of the stored-gradient buffer (training workspace, not state).
    pub fn gradient_bytes(&self) -> usize {
        4 * self.grad.len()
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

    /// Each layer's optimizer state, for a trainer that keeps the moments
    /// elsewhere (a device) and counts and mirrors them here.
    pub(crate) fn states_mut(&mut self) -> &mut [LayerState] {
        &mut self.states
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
