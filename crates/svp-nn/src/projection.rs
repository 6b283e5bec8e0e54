//! The fixed random projection `R_l`, regenerated from the seed, never stored.
//!
//! Row `r` of layer `l`'s matrix is the stream `(seed, Projection, l, r)` of
//! `sigma * N(0, 1)` samples; its dropout mask at step `t` is the stream
//! `(seed, ProjectionDropout, l, r, t)`. A pass over `R` goes tile by tile
//! (a few rows at a time, as many as fit the caller's tile buffer), so memory
//! holds at most one tile of `R`, whatever `d'` and the layer width.

use rayon::prelude::*;
use svp_rng::{Purpose, Stream, StreamKey, drop_threshold};
use svp_tensor::{ArrayView2, ArrayViewMut2, Axis, gemm, s, view};

/// Samples of `R` below which a fill stays on one thread.
const FILL_PARALLEL_MIN: usize = 4096;

/// One layer's projection `v = Dropout(R) [h, onehot(y)?]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Projection {
    /// Model seed.
    pub seed: u64,
    /// Layer index (0 = the input projection `R_0`).
    pub layer: u64,
    /// Width of the activations projected (`d_l`).
    pub in_dim: usize,
    /// Projection width `d'`.
    pub out_dim: usize,
    /// Standard deviation of the entries.
    pub sigma: f32,
    /// Dropout probability on the entries (training only).
    pub dropout: f32,
    /// `Some(C)`: the label-concatenation variant, `R` has `C` extra columns
    /// multiplied by the one-hot label.
    pub label_classes: Option<usize>,
}

impl Projection {
    /// Columns of `R` (`d_l`, plus `C` in the label variant).
    pub fn cols(&self) -> usize {
        self.in_dim + self.label_classes.unwrap_or(0)
    }

    /// Rows of `R` that fit a tile buffer of `tile_len` floats (at least one).
    pub fn rows_per_tile(&self, tile_len: usize) -> usize {
        (tile_len / self.cols()).clamp(1, self.out_dim.max(1))
    }

    /// Writes rows `r0..r0 + rows` of `R` (with the dropout mask of `step`, if
    /// given) into `tile`, row-major with `cols()` columns.
    pub fn fill_rows(&self, r0: usize, rows: usize, step: Option<u64>, tile: &mut [f32]) {
        let cols = self.cols();
        let threshold = drop_threshold(self.dropout);
        let keep_scale = 1.0 / (1.0 - self.dropout);
        let fill = |(i, row): (usize, &mut [f32])| {
            let r = (r0 + i) as u64;
            Stream::new(StreamKey::new(self.seed, Purpose::Projection, self.layer, r, 0))
                .fill_gaussian(row, self.sigma);
            if let (Some(t), true) = (step, self.dropout > 0.0) {
                Stream::new(StreamKey::new(self.seed, Purpose::ProjectionDropout, self.layer, r, t))
                    .apply_dropout(row, threshold, keep_scale);
            }
        };
        let tile = &mut tile[..rows * cols];
        // Rows are independent streams at ~3 ns a sample, so a few thousand
        // samples already pay for a second thread.
        if rows < 2 || rows * cols < FILL_PARALLEL_MIN {
            tile.chunks_exact_mut(cols).enumerate().for_each(fill);
        } else {
            tile.par_chunks_mut(cols).enumerate().for_each(fill);
        }
    }

    /// `v = R h` row by row (`v` is rows x d'), through the tile buffer.
    /// `labels` is required in the label variant. `step` = `Some` in training.
    ///
    /// # Panics
    /// If `tile` cannot hold one row of `R`, or `labels` is missing in the label variant.
    pub fn forward(
        &self,
        h: ArrayView2<f32>,
        labels: Option<&[u32]>,
        step: Option<u64>,
        mut v: ArrayViewMut2<f32>,
        tile: &mut [f32],
    ) {
        assert_eq!(h.ncols(), self.in_dim, "projection: input width");
        assert_eq!(v.dim(), (h.nrows(), self.out_dim), "projection: output shape");
        assert!(tile.len() >= self.cols(), "projection: tile smaller than one row");
        let (d, cols) = (self.in_dim, self.cols());
        let per_tile = self.rows_per_tile(tile.len());
        let mut r0 = 0;
        while r0 < self.out_dim {
            let rows = per_tile.min(self.out_dim - r0);
            self.fill_rows(r0, rows, step, tile);
            let r_tile = view(tile, rows, cols);
            let mut v_block = v.slice_mut(s![.., r0..r0 + rows]);
            gemm(1.0, h, r_tile.slice(s![.., ..d]).t(), 0.0, v_block.view_mut());
            if self.label_classes.is_some() {
                let labels = labels.expect("label-concatenation projection needs labels");
                for (mut v_row, &y) in v_block.axis_iter_mut(Axis(0)).zip(labels) {
                    for (k, x) in v_row.iter_mut().enumerate() {
                        *x += r_tile[(k, d + y as usize)];
                    }
                }
            }
            r0 += rows;
        }
    }

    /// `dh = dv R[:, :d_l]` (overwriting `dh`), regenerating `R` tile by tile with
    /// the same `step` as the forward.
    pub fn backward(&self, dv: ArrayView2<f32>, step: Option<u64>, dh: ArrayViewMut2<f32>, tile: &mut [f32]) {
        self.backward_from(dv, step, dh, tile, false);
    }

    /// [`Projection::backward`] right after this projection's
    /// [`Projection::forward`] with the same `step` and `tile`, the tile
    /// untouched in between: when all of `R` fit the tile (`d' = 10` rows of
    /// a layer, 40 KiB), the forward left it there and it is not regenerated.
    /// Otherwise it regenerates tile by tile, as `backward` does.
    pub fn backward_after_forward(
        &self,
        dv: ArrayView2<f32>,
        step: Option<u64>,
        dh: ArrayViewMut2<f32>,
        tile: &mut [f32],
    ) {
        self.backward_from(dv, step, dh, tile, true);
    }

    fn backward_from(
        &self,
        dv: ArrayView2<f32>,
        step: Option<u64>,
        mut dh: ArrayViewMut2<f32>,
        tile: &mut [f32],
        tile_from_forward: bool,
    ) {
        assert_eq!(dv.ncols(), self.out_dim, "projection backward: gradient width");
        assert_eq!(dh.dim(), (dv.nrows(), self.in_dim), "projection backward: output shape");
        let (d, cols) = (self.in_dim, self.cols());
        let per_tile = self.rows_per_tile(tile.len());
        let reuse = tile_from_forward && per_tile >= self.out_dim;
        let mut r0 = 0;
        while r0 < self.out_dim {
            let rows = per_tile.min(self.out_dim - r0);
            if !reuse {
                self.fill_rows(r0, rows, step, tile);
            }
            let r_tile = view(tile, rows, cols);
            let beta = if r0 == 0 { 0.0 } else { 1.0 };
            gemm(1.0, dv.slice(s![.., r0..r0 + rows]), r_tile.slice(s![.., ..d]), beta, dh.view_mut());
            r0 += rows;
        }
    }
}
