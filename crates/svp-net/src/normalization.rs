//! The input preprocessing a network is trained with and deployed with.

use serde::{Deserialize, Serialize};

/// Input standardization `x = (pixel / 255 - mean) / std`, from training data.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    /// Mean of `pixel / 255` over the training set.
    pub mean: f32,
    /// Standard deviation of `pixel / 255` over the training set.
    pub std: f32,
}

impl Normalization {
    /// Mean and standard deviation over all of `pixels`.
    pub fn of_pixels(pixels: &[u8]) -> Self {
        let mut hist = [0u64; 256];
        for &p in pixels {
            hist[p as usize] += 1;
        }
        let n = pixels.len().max(1) as f64;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standardizes_the_pixels_it_was_fitted_to() {
        let pixels: Vec<u8> = (0..=255).chain([0, 0, 255]).collect();
        let norm = Normalization::of_pixels(&pixels);
        let values: Vec<f64> = pixels.iter().map(|&p| p as f64 / 255.0).collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
        assert!((norm.mean as f64 - mean).abs() < 1e-6 && (norm.std as f64 - var.sqrt()).abs() < 1e-6);
        let table = norm.table();
        let standardized: Vec<f64> = pixels.iter().map(|&p| table[p as usize] as f64).collect();
        let (m, s) =
            (standardized.iter().sum::<f64>() / 259.0, standardized.iter().map(|v| v * v).sum::<f64>() / 259.0);
        assert!(m.abs() < 1e-5 && (s - 1.0).abs() < 1e-5, "mean {m}, mean square {s}");
        // A constant image does not divide by zero.
        assert!(Normalization::of_pixels(&[7; 10]).table().iter().all(|v| v.is_finite()));
    }
}
