//! The frozen layers of a fine-tuning run (`train_from_layer`): the first
//! layers of the network, run forward as at inference and never updated.

use crate::model::{LayerCache, Network};
use svp_alloc::{OutOfMemory, try_zeros};

/// Buffers for the forward pass through the frozen layers. Both trainers
/// start a step here: what the frozen layers compute is the trained layers'
/// input, as the images are when nothing is frozen. The frozen layers keep no
/// backward cache, gradient or optimizer state; their forward needs two
/// activation buffers (one layer's input and output) and one inference cache.
#[derive(Debug, Default)]
pub(crate) struct FrozenLayers {
    layers: usize,
    act: [Vec<f32>; 2],
    cache: LayerCache,
}

impl FrozenLayers {
    /// Buffers for `model`'s first `layers` layers and batches of up to
    /// `rows` rows (nothing when `layers` is 0).
    pub(crate) fn try_new(model: &Network, layers: usize, rows: usize) -> Result<Self, OutOfMemory> {
        assert!(layers < model.n_layers(), "the head is always trained");
        if layers == 0 {
            return Ok(Self::default());
        }
        let width = (0..layers).map(|l| model.out_len(l)).max().unwrap_or(0);
        let act = || try_zeros(rows * width, "the frozen layers' activations");
        Ok(Self {
            layers,
            act: [act()?, act()?],
            cache: LayerCache::try_for((0..layers).map(|l| model.layer(l)), rows)?,
        })
    }

    /// How many layers are frozen: the first trained layer's index (0-based).
    pub(crate) fn len(&self) -> usize {
        self.layers
    }

    /// The frozen layers' output for the batch `x` of `rows` samples: the
    /// input of the first trained layer (`x` itself when nothing is frozen).
    pub(crate) fn forward<'a>(&'a mut self, model: &Network, x: &'a [f32], rows: usize) -> &'a [f32] {
        let [a, b] = &mut self.act;
        let (mut src, mut dst) = (a, b);
        for l in 0..self.layers {
            let input = if l == 0 { x } else { &src[..rows * model.out_len(l - 1)] };
            model.layer(l).infer(model.layer_params(l), input, rows, &mut self.cache, dst);
            std::mem::swap(&mut src, &mut dst);
        }
        if self.layers == 0 { x } else { &src[..rows * model.out_len(self.layers - 1)] }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        4 * (self.act[0].len() + self.act[1].len()) + self.cache.bytes()
    }
}
