//! Backpropagation over the same layers: the baseline SVP is measured against.

use crate::config::Config;
use crate::frozen::FrozenLayers;
use crate::{TrainError, Trainer, Updater};
use svp_alloc::{OutOfMemory, try_zeros};
use svp_net::{LayerCache, LayerScratch, Network};
use svp_nn::{Mode, softmax_cross_entropy};
use svp_tensor::view;

/// Backpropagation trainer. It keeps every trained layer's output and
/// backward cache for the whole step, so its memory grows with depth (the
/// contrast to SVP). Each layer is updated as soon as its gradient and its
/// input gradient exist.
pub struct BpTrainer {
    updater: Updater,
    seed: u64,
    max_rows: usize,
    /// The layers below `train_from_layer`, run forward only, and the two
    /// buffers their forward alternates between.
    frozen: FrozenLayers,
    frozen_acts: [Vec<f32>; 2],
    /// Output of every trained layer (the head's logits last; frozen layers' are empty).
    acts: Vec<Vec<f32>>,
    /// Each trained layer's backward cache.
    caches: Vec<LayerCache>,
    /// The buffers a layer uses only while its forward or backward runs,
    /// shared by all layers (frozen ones included).
    scratch: LayerScratch,
    /// Ping-pong gradients wrt layer outputs.
    grads_out: [Vec<f32>; 2],
}

impl BpTrainer {
    /// A trainer for `model` under `config`.
    ///
    /// # Panics
    /// If the memory is not there (see [`BpTrainer::try_new`]).
    pub fn new(model: &Network, config: &Config) -> Self {
        Self::try_new(model, config).expect("memory for the backprop activations")
    }

    /// [`BpTrainer::new`], failing cleanly when the memory is not there.
    pub fn try_new(model: &Network, config: &Config) -> Result<Self, OutOfMemory> {
        svp_tensor::try_reserve_workspaces()?;
        let rows = config.train.batch_size;
        let n = model.n_layers();
        let first = config.train.train_from_layer - 1;
        let trained = |l: usize, len: usize| if l < first { 0 } else { len };
        let acts = (0..n)
            .map(|l| try_zeros(trained(l, rows * model.out_len(l)), "every layer's activations"))
            .collect::<Result<_, _>>()?;
        let caches = (0..n)
            .map(|l| if l < first { Ok(LayerCache::default()) } else { LayerCache::try_for([model.layer(l)], rows) })
            .collect::<Result<_, _>>()?;
        let width = (first..n).map(|l| model.out_len(l)).max().unwrap_or(0);
        let frozen = FrozenLayers::try_new(model, first, rows)?;
        let frozen_act = || try_zeros(rows * frozen.max_out_len(model), "the frozen layers' activations");
        Ok(Self {
            updater: Updater::try_new(model, config.optimizer, rows, first)?,
            seed: config.train.seed,
            max_rows: rows,
            frozen_acts: [frozen_act()?, frozen_act()?],
            frozen,
            acts,
            caches,
            scratch: LayerScratch::try_for(model.all_layers(), rows)?,
            grads_out: [try_zeros(rows * width, "output gradients")?, try_zeros(rows * width, "input gradients")?],
        })
    }
}

impl Trainer for BpTrainer {
    fn step(&mut self, model: &mut Network, x: &[f32], y: &[u32], lr_scale: f32) -> Result<f32, TrainError> {
        let rows = y.len();
        assert!(rows > 0 && rows <= self.max_rows, "batch of {rows} rows for a trainer sized for {}", self.max_rows);
        let step = self.updater.step();
        let mode = Mode::Train { seed: self.seed, step };
        let n = model.n_layers();
        let first = self.frozen.len();
        let [a, b] = &mut self.frozen_acts;
        let h0 = match self.frozen.forward(model, x, rows, &mut self.scratch, [a, b]) {
            Some(i) => &self.frozen_acts[i][..rows * model.out_len(first - 1)],
            None => x,
        };

        for l in first..n {
            let (layer, params) = model.layer_mut(l);
            let (before, after) = self.acts.split_at_mut(l);
            let input = if l == first { h0 } else { &before[l - 1][..] };
            layer.forward(params, input, rows, &mut self.caches[l], &mut self.scratch, &mut after[0], mode);
        }
        let classes = model.classes();
        let (loss, _) = softmax_cross_entropy(view(&self.acts[n - 1], rows, classes), y, &mut self.grads_out[0]);
        if !loss.is_finite() {
            return Err(TrainError::Diverged { layer: n, step, loss });
        }

        let mut cur = 0;
        for l in (first..n).rev() {
            let trainable = model.trainable_len(l);
            let (layer, params) = model.layer_mut(l);
            let input = if l == first { h0 } else { &self.acts[l - 1][..] };
            let (a, b) = self.grads_out.split_at_mut(1);
            let (dout, dx) = if cur == 0 { (&mut a[0], &mut b[0]) } else { (&mut b[0], &mut a[0]) };
            let dx = (l > first).then_some(&mut dx[..]);
            let (mut update, grad) = self.updater.begin(l, lr_scale);
            let (cache, scratch) = (&mut self.caches[l], &mut self.scratch);
            layer.backward_update(params, trainable, input, rows, cache, scratch, dout, grad, dx, mode, &mut update);
            cur = 1 - cur;
        }
        self.updater.finish_step();
        Ok(loss)
    }

    fn updater(&self) -> &Updater {
        &self.updater
    }

    fn updater_mut(&mut self) -> &mut Updater {
        &mut self.updater
    }

    fn workspace_bytes(&self) -> usize {
        4 * (self.acts.iter().map(Vec::len).sum::<usize>() + self.grads_out[0].len() + self.grads_out[1].len())
            + self.caches.iter().map(LayerCache::bytes).sum::<usize>()
            + self.scratch.bytes()
            + self.frozen.bytes()
            + 4 * (self.frozen_acts[0].len() + self.frozen_acts[1].len())
            + self.updater.gradient_bytes()
    }
}
