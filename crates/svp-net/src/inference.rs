//! Inference, with the early exits SVP's heads give: through a [`Network`],
//! or through dense layers whose parameters arrive one layer at a time
//! ([`predict_streamed`]: a model file's lean path).

use crate::heads::ProjectionHeads;
use crate::layer::{Layer, LayerCache, LayerScratch};
use crate::network::Network;
use svp_alloc::OutOfMemory;
use svp_nn::Dense;
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
            layer.infer(self.layer_params(l), input, rows, &mut ws.cache, &mut ws.scratch, dst);
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

impl Network {
    /// The early-exit logits of hidden layer `k` (1-based) for a batch `x`:
    /// the first `classes` of the `d'` entries of `v_k = R_k h_k`, rows x
    /// `min(classes, d')`.
    pub fn predict_exit<'w>(
        &self,
        x: &[f32],
        rows: usize,
        k: usize,
        heads: &ProjectionHeads,
        ws: &'w mut InferenceWorkspace,
    ) -> &'w [f32] {
        assert!((1..self.n_layers()).contains(&k), "exit layer {k} out of range");
        self.predict(x, rows, ws, Some(heads));
        let n = rows * heads.dim;
        let kept = self.classes.min(heads.dim);
        let exit = &ws.exits[(k - 1) * n..k * n];
        ws.logits.clear();
        ws.logits.extend(exit.chunks_exact(heads.dim).flat_map(|row| &row[..kept]));
        &ws.logits
    }
}

/// Logits of `rows` samples of `x` through dense `layers` (the last is the
/// head) whose parameters are not held: `load(l, params)` fills layer `l`'s
/// just before it runs (a model file dequantizing its f16 or int8 weights),
/// so memory holds one layer's parameters at a time, not the network's.
/// With `exit = Some((k, heads))` the pass stops after hidden layer `k`
/// (1-based) and returns its early-exit logits, the first `classes` entries
/// of `v_k`, as [`Network::predict_exit`] does.
///
/// # Panics
/// If `k` is not a hidden layer.
pub fn predict_streamed<'w>(
    layers: &[Dense],
    x: &[f32],
    rows: usize,
    exit: Option<(usize, &ProjectionHeads)>,
    mut load: impl FnMut(usize, &mut [f32]),
    ws: &'w mut InferenceWorkspace,
) -> &'w [f32] {
    let last = exit.map_or(layers.len(), |(k, _)| k);
    assert!((1..=layers.len()).contains(&last), "exit layer {last} out of range");
    let width = layers.iter().map(|l| l.spec().out_dim).chain([layers[0].spec().in_dim]).max().unwrap_or(0);
    if ws.rows < rows || ws.act[0].len() < rows * width {
        // Later predictions then allocate nothing, GEMM packing included.
        svp_tensor::try_reserve_workspaces().expect("memory for GEMM packing buffers");
        ws.act = [vec![0.0; rows * width], vec![0.0; rows * width]];
        ws.cache = LayerCache::try_for(layers.iter().map(Layer::Dense), rows).expect("memory for the layer cache");
        ws.rows = rows;
    }
    let max_params = layers.iter().map(Dense::param_len).max().unwrap_or(0);
    if ws.params.len() < max_params {
        ws.params = vec![0.0; max_params];
    }
    let mut cur = 0;
    for (l, layer) in layers.iter().enumerate().take(last) {
        let params = &mut ws.params[..layer.param_len()];
        load(l, params);
        let (a, b) = ws.act.split_at_mut(1);
        let (src, dst) = if cur == 0 { (&a[0], &mut b[0]) } else { (&b[0], &mut a[0]) };
        let input = if l == 0 { x } else { &src[..] };
        Layer::Dense(layer).infer(params, input, rows, &mut ws.cache, &mut ws.scratch, dst);
        cur = 1 - cur;
    }
    let width = layers[last - 1].spec().out_dim;
    let out = &ws.act[cur][..rows * width];
    let Some((k, heads)) = exit.filter(|&(k, _)| k < layers.len()) else {
        return out;
    };
    let classes = layers[layers.len() - 1].spec().out_dim;
    let p = heads.for_layer(k, width, false);
    if ws.logits.len() < rows * heads.dim {
        ws.logits = vec![0.0; rows * heads.dim];
    }
    if ws.tile.len() < EXIT_TILE_FLOATS.max(width) {
        ws.tile = vec![0.0; EXIT_TILE_FLOATS.max(width)];
    }
    p.forward(view(out, rows, width), None, None, view_mut(&mut ws.logits, rows, heads.dim), &mut ws.tile);
    // Exits predict among the first `classes` entries of v_l.
    if heads.dim != classes {
        for r in 0..rows {
            ws.logits.copy_within(r * heads.dim..r * heads.dim + classes.min(heads.dim), r * classes);
        }
    }
    &ws.logits[..rows * classes.min(heads.dim)]
}

/// Buffers for inference ([`Network::predict`], [`predict_streamed`]),
/// grown on first use and reused after.
#[derive(Debug, Default)]
pub struct InferenceWorkspace {
    act: [Vec<f32>; 2],
    cache: LayerCache,
    scratch: LayerScratch,
    readout: Vec<f32>,
    exits: Vec<f32>,
    tile: Vec<f32>,
    rows: usize,
    exit_dim: usize,
    /// One streamed layer's parameters.
    params: Vec<f32>,
    /// Early-exit logits cut to the class count.
    logits: Vec<f32>,
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
            self.scratch = LayerScratch::try_for_inference(model.all_layers(), rows)?;
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
