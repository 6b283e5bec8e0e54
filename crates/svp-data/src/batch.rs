//! Shuffling and batch gathering.

use crate::Dataset;
use serde::{Deserialize, Serialize};
use svp_rng::{Purpose, Stream, StreamKey};

/// Input standardization `x = (pixel / 255 - mean) / std`, from training data.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    /// Mean of `pixel / 255` over the training set.
    pub mean: f32,
    /// Standard deviation of `pixel / 255` over the training set.
    pub std: f32,
}

impl Normalization {
    /// Mean and standard deviation over all pixels of `data`.
    pub fn fit(data: &Dataset) -> Self {
        let mut hist = [0u64; 256];
        for &p in &data.images {
            hist[p as usize] += 1;
        }
        let n = data.images.len().max(1) as f64;
        let mean = hist.iter().enumerate().map(|(v, &c)| v as f64 / 255.0 * c as f64).sum::<f64>() / n;
        let var = hist.iter().enumerate().map(|(v, &c)| (v as f64 / 255.0 - mean).powi(2) * c as f64).sum::<f64>() / n;
        Self { mean: mean as f32, std: (var.sqrt() as f32).max(1e-6) }
    }

    /// The normalized value of each possible pixel byte.
    pub fn table(&self) -> [f32; 256] {
        let mut t = [0.0; 256];
        for (v, out) in t.iter_mut().enumerate() {
            *out = (v as f32 / 255.0 - self.mean) / self.std;
        }
        t
    }
}

/// Visits a data set in seeded random order, one batch at a time, gathering
/// into caller-owned buffers.
#[derive(Clone, Debug)]
pub struct Batcher {
    order: Vec<u32>,
    batch_size: usize,
    table: [f32; 256],
}

impl Batcher {
    /// A batcher over `len` samples.
    ///
    /// # Panics
    /// If `batch_size` is zero (configs are validated before this).
    pub fn new(len: usize, batch_size: usize, norm: Normalization) -> Self {
        assert!(batch_size > 0, "batch size must be positive");
        Self { order: (0..len as u32).collect(), batch_size, table: norm.table() }
    }

    /// Orders the samples for `epoch` of the model with `seed` (Fisher-Yates
    /// over the stream `(seed, Shuffle, epoch)`), or in file order if `shuffle`
    /// is false.
    pub fn start_epoch(&mut self, seed: u64, epoch: u64, shuffle: bool) {
        for (i, o) in self.order.iter_mut().enumerate() {
            *o = i as u32;
        }
        if shuffle {
            let mut s = Stream::new(StreamKey::new(seed, Purpose::Shuffle, epoch, 0, 0));
            for i in (1..self.order.len()).rev() {
                let j = s.below(i as u64 + 1) as usize;
                self.order.swap(i, j);
            }
        }
    }

    /// Number of batches per epoch (the last may be short).
    pub fn batches(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    /// The sample indices of batch `b` in the current order.
    pub fn indices(&self, b: usize) -> &[u32] {
        let start = b * self.batch_size;
        &self.order[start..(start + self.batch_size).min(self.order.len())]
    }

    /// Gathers batch `b` of `data` into `x` (rows x features) and `y`; returns
    /// the number of rows.
    pub fn gather(&self, data: &Dataset, b: usize, x: &mut [f32], y: &mut [u32]) -> usize {
        let f = data.features();
        let idx = self.indices(b);
        for ((&i, row), label) in idx.iter().zip(x.chunks_exact_mut(f)).zip(y.iter_mut()) {
            for (o, &p) in row.iter_mut().zip(data.image(i as usize)) {
                *o = self.table[p as usize];
            }
            *label = data.labels[i as usize] as u32;
        }
        idx.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        Dataset {
            images: (0..40).map(|v| v as u8 * 6).collect(),
            labels: (0..10).map(|v| v % 3).collect(),
            image_shape: (2, 2),
        }
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let d = tiny();
        let norm = Normalization::fit(&d);
        let mut b = Batcher::new(d.len(), 4, norm);
        b.start_epoch(1, 0, true);
        let first: Vec<u32> = (0..b.batches()).flat_map(|i| b.indices(i).to_vec()).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        b.start_epoch(1, 1, true);
        let second: Vec<u32> = (0..b.batches()).flat_map(|i| b.indices(i).to_vec()).collect();
        assert_ne!(first, second);
        b.start_epoch(1, 0, true);
        let again: Vec<u32> = (0..b.batches()).flat_map(|i| b.indices(i).to_vec()).collect();
        assert_eq!(first, again);
        assert_eq!(b.batches(), 3);
        assert_eq!(b.indices(2).len(), 2);
    }

    #[test]
    fn gather_normalizes() {
        let d = tiny();
        let norm = Normalization { mean: 0.5, std: 0.25 };
        let mut b = Batcher::new(d.len(), 4, norm);
        b.start_epoch(0, 0, false);
        let mut x = vec![0.0; 16];
        let mut y = vec![0; 4];
        assert_eq!(b.gather(&d, 2, &mut x, &mut y), 2);
        assert_eq!(y[..2], [2, 0]);
        assert!((x[0] - (d.image(8)[0] as f32 / 255.0 - 0.5) / 0.25).abs() < 1e-6);
        let fit = Normalization::fit(&d);
        let all: Vec<f64> = d.images.iter().map(|&p| p as f64 / 255.0).collect();
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        assert!((fit.mean as f64 - mean).abs() < 1e-6);
    }
}
