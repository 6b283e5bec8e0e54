//! Forward-only inference of an MLP through a [`Backend`]: evaluation on a device.

use super::trainer::{check_network, forward_dense, part_ranges, read_write};
use super::{Backend, CudaError, Unsupported};
use crate::EvalReport;
use crate::eval::argmax;
use svp_data::{Batcher, Dataset};
use svp_net::{Network, Normalization};
use svp_nn::{DenseSpec, Norm};

/// An MLP's weights on a device, and the buffers a forward pass needs for
/// batches of up to `max_rows` rows: two activation buffers used in turn,
/// one layer's LayerNorm values. Each batch is one copy in and one read
/// back of its logits.
pub struct DeviceInference<B: Backend> {
    backend: B,
    specs: Vec<DenseSpec>,
    /// Per layer: `W`, `b` and, with LayerNorm, `gamma`, `beta`.
    params: Vec<Vec<B::Buffer>>,
    x: B::Buffer,
    acts: [B::Buffer; 2],
    xhat: B::Buffer,
    rstd: B::Buffer,
    logits: Vec<f32>,
    max_rows: usize,
}

impl<B: Backend> DeviceInference<B> {
    /// Uploads `model`'s weights to `backend`, with buffers for batches of
    /// up to `max_rows`; fails in one line for a network a device does not
    /// run yet, or without the device's memory.
    pub fn try_new(backend: B, model: &Network, max_rows: usize) -> Result<Self, Unsupported> {
        check_network(model)?;
        let specs: Vec<DenseSpec> = model.layers().iter().map(|d| *d.spec()).collect();
        let width = specs.iter().map(|s| s.out_dim).max().unwrap_or(0);
        let norm_width = specs.iter().filter(|s| s.norm == Norm::LayerNorm).map(|s| s.out_dim).max().unwrap_or(0);
        let upload = |values: &[f32]| -> Result<B::Buffer, CudaError> {
            let mut buffer = backend.zeros(values.len())?;
            backend.write(&mut buffer, values)?;
            Ok(buffer)
        };
        let mut params = Vec::with_capacity(specs.len());
        for (l, spec) in specs.iter().enumerate() {
            let layer = model.layer_params(l);
            let parts = part_ranges(spec).into_iter().map(|(at, len)| upload(&layer[at..at + len]));
            params.push(parts.collect::<Result<Vec<_>, _>>()?);
        }
        let x = backend.zeros(max_rows * model.input())?;
        let acts = [backend.zeros(max_rows * width)?, backend.zeros(max_rows * width)?];
        let (xhat, rstd) = (backend.zeros(max_rows * norm_width)?, backend.zeros(max_rows)?);
        let logits = vec![0.0; max_rows * model.classes()];
        Ok(Self { backend, specs, params, x, acts, xhat, rstd, logits, max_rows })
    }

    /// The logits (`rows x classes`) of the batch `x` (`rows x input`,
    /// normalized as the model expects).
    ///
    /// # Panics
    /// If `rows` is more than the buffers were sized for.
    pub fn predict(&mut self, x: &[f32], rows: usize) -> Result<&[f32], CudaError> {
        assert!(rows <= self.max_rows, "a batch of {rows} rows for buffers of {}", self.max_rows);
        self.backend.write(&mut self.x, x)?;
        let n = self.specs.len();
        for (l, spec) in self.specs.iter().enumerate() {
            let (backend, params) = (&self.backend, &self.params[l]);
            let (input, out) = match l {
                0 => (&self.x, &mut self.acts[0]),
                _ => read_write(&mut self.acts, (l - 1) % 2, l % 2),
            };
            forward_dense(backend, spec, |p| &params[p], rows, input, out, &mut self.xhat, &mut self.rstd)?;
        }
        let classes = self.specs[n - 1].out_dim;
        let logits = &mut self.logits[..rows * classes];
        self.backend.read(&self.acts[(n - 1) % 2], logits)?;
        Ok(logits)
    }

    /// Accuracy and mean cross-entropy on `data` in batches of the size the
    /// buffers were made for (no early exits: those run on the CPU).
    pub fn evaluate(&mut self, data: &Dataset, norm: Normalization) -> Result<EvalReport, CudaError> {
        let features = data.features();
        let (mut x, mut y) = (vec![0.0; self.max_rows * features], vec![0u32; self.max_rows]);
        let mut batcher = Batcher::new(data.len(), self.max_rows, norm.table());
        batcher.start_epoch(0, 0, false);
        let classes = self.specs.last().map_or(0, |s| s.out_dim);
        let (mut correct, mut loss) = (0usize, 0.0f64);
        for b in 0..batcher.batches() {
            let rows = batcher.gather(data, b, &mut x, &mut y);
            let logits = self.predict(&x[..rows * features], rows)?;
            for (row, &label) in logits.chunks_exact(classes).zip(&y[..rows]) {
                correct += usize::from(argmax(row) == label as usize);
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = row.iter().map(|&v| (v - m).exp()).sum();
                loss += (z.ln() + m - row[label as usize]) as f64;
            }
        }
        let n = data.len().max(1) as f64;
        Ok(EvalReport { accuracy: correct as f64 / n, loss: loss / n, exit_accuracy: Vec::new() })
    }
}
