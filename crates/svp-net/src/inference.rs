//! Inference through a [`Network`], with the early exits SVP's heads give.

use crate::heads::ProjectionHeads;
use crate::layer::LayerCache;
use crate::network::Network;
use svp_alloc::OutOfMemory;
use svp_tensor::{view, view_mut};

impl Network {
    /// Logits of a batch `x` (rows x input) into `ws`; returns them (rows x classes).
    /// With `exits`, also writes each hidden layer's early-exit logits `R_l h_l`
    /// (see [`InferenceWorkspace::exit_logits`]).
    pub fn predict<'w>(
        &self,
        x: &[f32],
        rows: usize,
        ws: &'w mut InferenceWorkspace,
        exits: Option<&ProjectionHeads>,
    ) -> &'w [f32] {
        ws.ensure(rows, self, exits.map(|h| h.dim));
        let token = self.token_readout();
        let mut cur = 0;
        for l in 0..self.n_layers() {
            let (a, b) = ws.act.split_at_mut(1);
            let (src, dst) = if cur == 0 { (&a[0], &mut b[0]) } else { (&b[0], &mut a[0]) };
            let input = if l == 0 { x } else { &src[..] };
            let layer = self.layer(l);
            layer.infer(self.layer_params(l), input, rows, &mut ws.cache, dst);
            if let Some(heads) = exits
                && l + 1 < self.n_layers()
            {
                let width = self.readout_len(l);
                let read = layer.readout().read(dst, rows, self.out_len(l), token, &mut ws.readout);
                let p = heads.for_layer(l + 1, width, false);
                let out = &mut ws.exits[l * rows * heads.dim..(l + 1) * rows * heads.dim];
                p.forward(view(read, rows, width), None, None, view_mut(out, rows, heads.dim), &mut ws.tile);
            }
            cur = 1 - cur;
        }
        let last = if cur == 0 { &ws.act[0] } else { &ws.act[1] };
        &last[..rows * self.classes]
    }
}

/// Buffers for [`Network::predict`], grown on first use and reused after.
#[derive(Debug, Default)]
pub struct InferenceWorkspace {
    act: [Vec<f32>; 2],
    cache: LayerCache,
    readout: Vec<f32>,
    exits: Vec<f32>,
    tile: Vec<f32>,
    rows: usize,
    exit_dim: usize,
}

/// Tile of `R_l` used by inference-time exits.
const EXIT_TILE_FLOATS: usize = 16 * 1024;

impl InferenceWorkspace {
    fn ensure(&mut self, rows: usize, model: &Network, exit_dim: Option<usize>) {
        self.try_prepare(rows, model, exit_dim).expect("memory for inference buffers");
    }

    /// Sizes the buffers for batches of `rows` (and exits of width `exit_dim`)
    /// now, failing cleanly when the memory is not there; later predictions of
    /// up to that size allocate nothing.
    pub fn try_prepare(&mut self, rows: usize, model: &Network, exit_dim: Option<usize>) -> Result<(), OutOfMemory> {
        let width = model.max_out_width();
        let need = rows * width;
        if self.act[0].len() < need || self.rows < rows {
            svp_tensor::try_reserve_workspaces()?;
            self.act = [
                svp_alloc::try_zeros(need, "inference activations")?,
                svp_alloc::try_zeros(need, "inference activations")?,
            ];
            self.cache = LayerCache::try_for(model.all_layers(), rows)?;
            self.rows = rows;
        }
        if let Some(d) = exit_dim {
            let need = rows * d * model.hidden_layers();
            if self.exits.len() < need {
                self.exits = svp_alloc::try_zeros(need, "early-exit logits")?;
            }
            if !model.is_mlp() && self.readout.len() < rows * model.max_readout_len() {
                self.readout = svp_alloc::try_zeros(rows * model.max_readout_len(), "projection readouts")?;
            }
            let tile = EXIT_TILE_FLOATS.max(model.max_width());
            if self.tile.len() < tile {
                self.tile = svp_alloc::try_zeros(tile, "a tile of R")?;
            }
            self.exit_dim = d;
        }
        Ok(())
    }

    /// Early-exit logits of hidden layer `l` (0-based) from the last
    /// [`Network::predict`] with exits: rows x `d'`.
    pub fn exit_logits(&self, l: usize, rows: usize) -> &[f32] {
        let n = rows * self.exit_dim;
        &self.exits[l * n..(l + 1) * n]
    }
}
