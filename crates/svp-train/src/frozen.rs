//! The frozen layers of a fine-tuning run (`train_from_layer`): the first
//! layers of the network, run forward as at inference and never updated.

use svp_alloc::OutOfMemory;
use svp_net::{LayerCache, LayerScratch, Network};

/// The forward pass through the frozen layers, which both trainers start a
/// step with: what the frozen layers compute is the trained layers' input, as
/// the images are when nothing is frozen. The frozen layers keep no backward
/// cache, gradient or optimizer state; their forward needs one inference cache
/// (held here), the trainer's layer scratch and two activation buffers (the
/// caller's).
#[derive(Debug, Default)]
pub(crate) struct FrozenLayers {
    layers: usize,
    cache: LayerCache,
}

impl FrozenLayers {
    /// The forward pass through `model`'s first `layers` layers, for batches
    /// of up to `rows` rows (nothing to hold when `layers` is 0).
    pub(crate) fn try_new(model: &Network, layers: usize, rows: usize) -> Result<Self, OutOfMemory> {
        assert!(layers < model.n_layers(), "the head is always trained");
        if layers == 0 {
            return Ok(Self::default());
        }
        Ok(Self { layers, cache: LayerCache::try_for((0..layers).map(|l| model.layer(l)), rows)? })
    }

    /// How many layers are frozen: the first trained layer's index (0-based).
    pub(crate) fn len(&self) -> usize {
        self.layers
    }

    /// Values per sample the activation buffers of [`FrozenLayers::forward`] need.
    pub(crate) fn max_out_len(&self, model: &Network) -> usize {
        (0..self.layers).map(|l| model.out_len(l)).max().unwrap_or(0)
    }

    /// Runs the batch `x` of `rows` samples through the frozen layers, layer
    /// by layer from one of `bufs` into the other, and says which one holds
    /// their output (`None`, with nothing written, when no layer is frozen:
    /// the trained layers read `x`).
    pub(crate) fn forward(
        &mut self,
        model: &Network,
        x: &[f32],
        rows: usize,
        scratch: &mut LayerScratch,
        bufs: [&mut [f32]; 2],
    ) -> Option<usize> {
        let [mut src, mut dst] = bufs;
        for l in 0..self.layers {
            let input = if l == 0 { x } else { &src[..rows * model.out_len(l - 1)] };
            model.layer(l).infer(model.layer_params(l), input, rows, &mut self.cache, scratch, dst);
            std::mem::swap(&mut src, &mut dst);
        }
        // After an odd number of layers the output is in the second buffer.
        (self.layers > 0).then_some(self.layers % 2)
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.cache.bytes()
    }
}
