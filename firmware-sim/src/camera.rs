//! The device's camera: Fashion-MNIST as a different sensor sees it.
//!
//! A fixed, documented shift applied to each 28x28 image:
//! 1. a rotation by 12 degrees about the centre (bilinear sampling; outside is black),
//! 2. lower contrast and a brighter floor: `p' = 0.45 p + 90`,
//! 3. sensor noise: Gaussian, standard deviation 20 grey levels, from the
//!    stream `(seed, Shuffle, 7, image index)`, so the same image always
//!    gets the same noise,
//! 4. rounding and clamping to 0..=255.

use svp_data::Dataset;
use svp_rng::{Purpose, Stream, StreamKey};

/// Rotation, in degrees.
pub const ROTATION_DEG: f64 = 12.0;
/// Contrast factor.
pub const CONTRAST: f64 = 0.45;
/// Added brightness, grey levels.
pub const BRIGHTNESS: f64 = 90.0;
/// Noise standard deviation, grey levels.
pub const NOISE_STD: f64 = 20.0;

fn sample(img: &[u8], h: usize, w: usize, y: f64, x: f64) -> f64 {
    if y < 0.0 || x < 0.0 || y > (h - 1) as f64 || x > (w - 1) as f64 {
        return 0.0;
    }
    let (y0, x0) = (y.floor() as usize, x.floor() as usize);
    let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
    let (fy, fx) = (y - y0 as f64, x - x0 as f64);
    let p = |yy: usize, xx: usize| img[yy * w + xx] as f64;
    (1.0 - fy) * ((1.0 - fx) * p(y0, x0) + fx * p(y0, x1)) + fy * ((1.0 - fx) * p(y1, x0) + fx * p(y1, x1))
}

/// The shifted version of image `index` of a set, into `out`.
pub fn shift_image(img: &[u8], (h, w): (usize, usize), seed: u64, index: u64, out: &mut [u8]) {
    let (cy, cx) = ((h as f64 - 1.0) / 2.0, (w as f64 - 1.0) / 2.0);
    let (sin, cos) = ROTATION_DEG.to_radians().sin_cos();
    let mut noise = Stream::new(StreamKey::new(seed, Purpose::Shuffle, 7, index, 0));
    for y in 0..h {
        for x in 0..w {
            // Inverse rotation: where in the source does this pixel come from.
            let (dy, dx) = (y as f64 - cy, x as f64 - cx);
            let (sy, sx) = (cy + cos * dy - sin * dx, cx + sin * dy + cos * dx);
            let v = CONTRAST * sample(img, h, w, sy, sx) + BRIGHTNESS + NOISE_STD * noise.gaussian();
            out[y * w + x] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// A shifted copy of the first `limit` samples of `data`.
pub fn shift_dataset(data: &Dataset, seed: u64, limit: usize) -> Dataset {
    let n = limit.min(data.len());
    let f = data.features();
    let mut images = vec![0u8; n * f];
    for (i, out) in images.chunks_exact_mut(f).enumerate() {
        shift_image(data.image(i), data.image_shape, seed, i as u64, out);
    }
    Dataset { images, labels: data.labels[..n].to_vec(), image_shape: data.image_shape }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_is_deterministic_and_changes_the_image() {
        let data = svp_data::DataSplit::embedded();
        let a = shift_dataset(&data.test, 1, 20);
        let b = shift_dataset(&data.test, 1, 20);
        assert_eq!(a, b);
        assert_eq!(a.len(), 20);
        let clean = &data.test.images[..20 * 784];
        let mean = |v: &[u8]| v.iter().map(|&p| p as f64).sum::<f64>() / v.len() as f64;
        // Brighter on average (the floor rises by 90, the contrast halves).
        assert!(mean(&a.images) > mean(clean) + 40.0, "{} vs {}", mean(&a.images), mean(clean));
        // A black background pixel becomes grey noise around 90.
        let corner: Vec<f64> = (0..20).map(|i| a.images[i * 784] as f64).collect();
        let m = corner.iter().sum::<f64>() / 20.0;
        assert!((m - 90.0).abs() < 15.0, "{m}");
    }
}
