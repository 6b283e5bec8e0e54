//! `Dense::backward_update` (the weight gradient handed from the GEMM's tiles
//! to the update, never stored) against `Dense::backward` followed by the
//! same update from the stored gradient: the same bits, for every kind of
//! block, with the sink taking tiles and with one that refuses them.

use svp_nn::{Activation, Dense, DenseCache, DenseSpec, Mode, Norm};
use svp_rng::{Purpose, Stream, StreamKey};
use svp_tensor::{Array2, GradientSink, ProductSink, SINK_MAX_DEPTH, view};

fn random(len: usize, salt: u64) -> Vec<f32> {
    let mut s = Stream::new(StreamKey::new(salt, Purpose::WeightInit, 7, 0, 0));
    (0..len).map(|_| s.gaussian() as f32).collect()
}

/// A per-parameter rule that depends on the parameter's place, so a
/// misplaced element shows: `p -= lr_i * g`, `lr_i = 1e-2 * (1 + i % 5)`.
fn step(index: usize, p: &mut f32, g: f32) {
    *p -= 1e-2 * (1 + index % 5) as f32 * g;
}

/// Updates with [`step`]; takes weight tiles only when `tiles`.
struct Sgd {
    tiles: bool,
    /// Parameters handed over, to check each one comes exactly once.
    seen: Vec<u8>,
}

struct Rows<'a> {
    offset: usize,
    weights: &'a mut [f32],
    cols: usize,
    seen: &'a mut [u8],
}

impl ProductSink for Rows<'_> {
    fn take(&mut self, row: usize, col0: usize, grad: &[f32]) {
        for (j, &g) in grad.iter().enumerate() {
            let at = row * self.cols + col0 + j;
            step(self.offset + at, &mut self.weights[at], g);
            self.seen[at] += 1;
        }
    }

    fn split_rows(self, at: usize) -> (Self, Self) {
        let cut = at * self.cols;
        let (w_top, w_bottom) = self.weights.split_at_mut(cut);
        let (s_top, s_bottom) = self.seen.split_at_mut(cut);
        (
            Rows { offset: self.offset, weights: w_top, cols: self.cols, seen: s_top },
            Rows { offset: self.offset + cut, weights: w_bottom, cols: self.cols, seen: s_bottom },
        )
    }
}

impl GradientSink for Sgd {
    type Rows<'a> = Rows<'a>;

    fn weight_rows<'a>(&'a mut self, offset: usize, weights: &'a mut [f32], cols: usize) -> Option<Rows<'a>> {
        let seen = &mut self.seen[offset..offset + weights.len()];
        self.tiles.then_some(Rows { offset, weights, cols, seen })
    }

    fn apply(&mut self, offset: usize, params: &mut [f32], grad: &[f32]) {
        for (i, (p, &g)) in params.iter_mut().zip(grad).enumerate() {
            step(offset + i, p, g);
            self.seen[offset + i] += 1;
        }
    }
}

#[test]
fn updating_from_tiles_matches_the_stored_gradient() {
    let blocks = [
        (Norm::None, Activation::Identity, 0.0),
        (Norm::LayerNorm, Activation::Relu, 0.0),
        (Norm::LayerNorm, Activation::Gelu, 0.25),
        (Norm::None, Activation::Relu, 0.1),
    ];
    // Shapes across the GEMM's tiles and blocks; a parallel split; a batch
    // deeper than one packed block (the stored-gradient path).
    let shapes = [(6, 9, 7), (33, 70, 45), (128, 300, 200), (SINK_MAX_DEPTH + 3, 20, 30)];
    for (norm, activation, dropout) in blocks {
        for (rows, din, dout) in shapes {
            let spec = DenseSpec { in_dim: din, out_dim: dout, norm, activation, dropout };
            let layer = Dense::new(spec, 2);
            let mut start = vec![0.0; layer.param_len()];
            layer.init_params(5, &mut start);
            let x = random(rows * din, 1);
            let probe = random(rows * dout, 2);
            let mode = Mode::Train { seed: 3, step: 9 };
            let run = |fused: Option<bool>| {
                let mut params = start.clone();
                let mut cache = DenseCache::new(rows, din.max(dout));
                let mut out = vec![0.0; rows * dout];
                layer.forward(&params, view(&x, rows, din), &mut cache, &mut out, mode);
                let mut dy = probe.clone();
                // Taking tiles, the block stores only the bias's and norm's
                // gradient (when the batch allows it).
                let fits = rows <= SINK_MAX_DEPTH && fused == Some(true);
                let stored = if fits { layer.fused_gradient_len() } else { layer.param_len() };
                let mut grad = vec![f32::NAN; stored];
                let mut dx = Array2::<f32>::zeros((rows, din));
                let mut sgd = Sgd { tiles: fused.unwrap_or(false), seen: vec![0; params.len()] };
                let xv = view(&x, rows, din);
                match fused {
                    None => {
                        layer.backward(&params, xv, &mut cache, &mut dy, &mut grad, Some(dx.view_mut()), mode);
                        sgd.apply(0, &mut params, &grad);
                    }
                    Some(_) => {
                        let dx = Some(dx.view_mut());
                        layer.backward_update(&mut params, xv, &mut cache, &mut dy, &mut grad, dx, mode, &mut sgd);
                    }
                }
                assert!(sgd.seen.iter().all(|&s| s == 1), "{spec:?}, {rows} rows: a parameter not updated once");
                (params, dx)
            };
            let (want, want_dx) = run(None);
            for tiles in [true, false] {
                let (got, got_dx) = run(Some(tiles));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let what = format!("{spec:?}, {rows} rows, tiles {tiles}");
                assert_eq!(bits(&got), bits(&want), "{what}: parameters differ");
                assert_eq!(bits(got_dx.as_slice().unwrap()), bits(want_dx.as_slice().unwrap()), "{what}: dx differs");
            }
        }
    }
}
