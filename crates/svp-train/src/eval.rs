//! Test-set evaluation.

use svp_data::{Batcher, Dataset};
use svp_net::{InferenceWorkspace, Network, Normalization, ProjectionHeads};

/// Accuracy of a model on a data set.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    /// Fraction of samples whose argmax logit is the label.
    pub accuracy: f64,
    /// Mean cross-entropy of the head.
    pub loss: f64,
    /// Accuracy of each hidden layer's early exit (`argmax R_l h_l` over the
    /// first `classes` entries), when projection heads were given.
    pub exit_accuracy: Vec<f64>,
}

/// Index of the largest value (the first, on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (j, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = j;
        }
    }
    best
}

/// Evaluates `model` on `data` in batches of `batch_size`.
pub fn evaluate(
    model: &Network,
    data: &Dataset,
    norm: Normalization,
    batch_size: usize,
    exits: Option<&ProjectionHeads>,
    ws: &mut InferenceWorkspace,
) -> EvalReport {
    let (mut x, mut y) = (vec![0.0; batch_size * data.features()], vec![0u32; batch_size]);
    evaluate_with(model, data, norm, exits, ws, &mut x, &mut y)
}

/// [`evaluate`] gathering its batches into `x` (`batch_size x features`)
/// and `y` (`batch_size`), the caller's: the training loop lends its own
/// batch buffers, so that an evaluation needs no memory of its own.
pub fn evaluate_with(
    model: &Network,
    data: &Dataset,
    norm: Normalization,
    exits: Option<&ProjectionHeads>,
    ws: &mut InferenceWorkspace,
    x: &mut [f32],
    y: &mut [u32],
) -> EvalReport {
    let batch_size = y.len();
    let features = data.features();
    assert_eq!(x.len(), batch_size * features, "evaluate: the input buffer holds {batch_size} samples");
    let mut batcher = Batcher::new(data.len(), batch_size, norm.table());
    batcher.start_epoch(0, 0, false);
    let classes = model.classes();
    let hidden = model.hidden_layers();
    let (mut correct, mut loss) = (0usize, 0.0f64);
    let mut exit_correct = vec![0usize; if exits.is_some() { hidden } else { 0 }];
    for b in 0..batcher.batches() {
        let rows = batcher.gather(data, b, x, y);
        let logits = model.predict(x, rows, ws, exits);
        for (row, &label) in logits.chunks_exact(classes).zip(&y[..rows]) {
            correct += usize::from(argmax(row) == label as usize);
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = row.iter().map(|&v| (v - m).exp()).sum();
            loss += (z.ln() + m - row[label as usize]) as f64;
        }
        if let Some(h) = exits {
            for (l, count) in exit_correct.iter_mut().enumerate() {
                let v = ws.exit_logits(l, rows);
                for (row, &label) in v.chunks_exact(h.dim).zip(&y[..rows]) {
                    *count += usize::from(argmax(&row[..classes.min(h.dim)]) == label as usize);
                }
            }
        }
    }
    let n = data.len().max(1) as f64;
    EvalReport {
        accuracy: correct as f64 / n,
        loss: loss / n,
        exit_accuracy: exit_correct.iter().map(|&c| c as f64 / n).collect(),
    }
}
