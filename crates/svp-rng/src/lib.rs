//! Random streams whose every bit is fixed by this crate's own code.
//!
//! svp never stores its random projections: a projection row is regenerated
//! from `(model seed, purpose, layer, row)` each time it is needed, on every
//! platform and thread count. That only works if a seed means the same numbers
//! everywhere, so nothing here leans on samplers whose output may change between
//! crate versions or platforms (`rand_distr` promises neither):
//!
//! * [`Stream`] is xoshiro256++ (the reference algorithm, from `rand_xoshiro`),
//!   keyed by a [`StreamKey`] hashed with SplitMix64. Each key is its own stream,
//!   so any row of any matrix can be produced without producing the others.
//! * [`Stream::gaussian`] is a 128-layer ziggurat (Marsaglia & Tsang, in
//!   Doornik's formulation). Its tables are built with `libm` (pure Rust, the
//!   same bits on every target), and the fast path uses only IEEE-754 exact
//!   operations (multiply, compare).
//!
//! Golden-vector tests pin the output; changing any of it is a format break and
//! must bump [`GENERATOR_ID`].
//!
//! ```
//! use svp_rng::{Purpose, Stream, StreamKey};
//!
//! // The same key gives the same numbers on every machine, in any order of use.
//! let key = StreamKey::new(42, Purpose::Projection, 1, 0, 0);
//! let (mut a, mut b) = (Stream::new(key), Stream::new(key));
//! assert_eq!(a.gaussian().to_bits(), b.gaussian().to_bits());
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::{Rng, SeedableRng};
use std::sync::OnceLock;

/// Name and version of the generator, recorded in model files.
pub const GENERATOR_ID: &str = "svp-rng/xoshiro256pp+ziggurat128/v1";

/// What a stream is used for; part of its key so purposes never share numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Purpose {
    /// Entries of the fixed random projection `R_l`.
    Projection = 1,
    /// Dropout mask on the entries of `R_l`, redrawn every step.
    ProjectionDropout = 2,
    /// Dropout mask on hidden activations.
    ActivationDropout = 3,
    /// Initial weights.
    WeightInit = 4,
    /// Order of the training samples in each epoch.
    Shuffle = 5,
    /// Random shifts and flips of training images (per sample and epoch),
    /// and the validation split.
    Augment = 6,
}

/// The address of one stream: `(seed, purpose, a, b, c)`.
///
/// The meaning of `a`, `b`, `c` is the caller's (for a projection: layer, row, 0;
/// for its dropout mask: layer, row, step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamKey {
    /// The model seed.
    pub seed: u64,
    /// What the numbers are for.
    pub purpose: Purpose,
    /// First coordinate (usually the layer index).
    pub a: u64,
    /// Second coordinate (usually a row index).
    pub b: u64,
    /// Third coordinate (usually the step).
    pub c: u64,
}

impl StreamKey {
    /// A key with all coordinates given.
    pub fn new(seed: u64, purpose: Purpose, a: u64, b: u64, c: u64) -> Self {
        Self { seed, purpose, a, b, c }
    }
}

/// SplitMix64 finalizer: a bijective 64-bit mix.
#[inline]
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A deterministic random stream.
#[derive(Clone, Debug)]
pub struct Stream {
    rng: Xoshiro256PlusPlus,
}

impl Stream {
    /// The stream at `key`.
    pub fn new(key: StreamKey) -> Self {
        // Absorb the coordinates one at a time; then squeeze four state words.
        let mut h = splitmix(key.seed);
        for word in [key.purpose as u64, key.a, key.b, key.c] {
            h = splitmix(h ^ word);
        }
        let mut seed = [0u8; 32];
        for (i, chunk) in seed.chunks_exact_mut(8).enumerate() {
            h = splitmix(h ^ (i as u64 + 1));
            chunk.copy_from_slice(&h.to_le_bytes());
        }
        Self { rng: Xoshiro256PlusPlus::from_seed(seed) }
    }

    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// Uniform on `[0, 1)` with 53 random bits.
    #[inline]
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform on `(0, 1]`: safe to take the logarithm of.
    #[inline]
    fn uniform_open0(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in `0..n` (Lemire's multiply-shift; bias below 2^-32 for n < 2^32).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// A standard normal sample.
    #[inline]
    pub fn gaussian(&mut self) -> f64 {
        let t = tables();
        loop {
            let bits = self.next_u64();
            let layer = (bits & 0x7F) as usize;
            // Top 53 bits as a uniform on [-1, 1).
            let u = 2.0 * ((bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)) - 1.0;
            if u.abs() < t.ratio[layer] {
                return u * t.x[layer];
            }
            if layer == 0 {
                return self.tail(u < 0.0);
            }
            let x = u * t.x[layer];
            let f0 = libm::exp(-0.5 * (t.x[layer] * t.x[layer] - x * x));
            let f1 = libm::exp(-0.5 * (t.x[layer + 1] * t.x[layer + 1] - x * x));
            if f1 + self.uniform() * (f0 - f1) < 1.0 {
                return x;
            }
        }
    }

    /// Sample from the normal tail beyond [`ZIG_R`] (Marsaglia's method).
    fn tail(&mut self, negative: bool) -> f64 {
        loop {
            let x = libm::log(self.uniform_open0()) / ZIG_R;
            let y = libm::log(self.uniform_open0());
            if -2.0 * y >= x * x {
                return if negative { x - ZIG_R } else { ZIG_R - x };
            }
        }
    }

    /// Inverted dropout in place: each entry is zeroed when its 32-bit draw is
    /// below `threshold` (see [`drop_threshold`]) and multiplied by `keep_scale`
    /// otherwise. Two entries consume one 64-bit draw (low half first).
    pub fn apply_dropout(&mut self, values: &mut [f32], threshold: u32, keep_scale: f32) {
        for pair in values.chunks_mut(2) {
            let bits = self.next_u64();
            let draws = [bits as u32, (bits >> 32) as u32];
            for (v, &u) in pair.iter_mut().zip(&draws) {
                *v = if u >= threshold { *v * keep_scale } else { 0.0 };
            }
        }
    }

    /// Fills `out` with `scale * N(0, 1)` samples, in order.
    pub fn fill_gaussian(&mut self, out: &mut [f32], scale: f32) {
        for o in out {
            *o = self.gaussian() as f32 * scale;
        }
    }
}

const ZIG_LAYERS: usize = 128;
/// Start of the tail for the 128-layer ziggurat.
const ZIG_R: f64 = 3.442_619_855_899;
/// Area of each layer for the 128-layer ziggurat.
const ZIG_V: f64 = 9.912_563_035_262_17e-3;

struct ZigTables {
    x: [f64; ZIG_LAYERS + 1],
    ratio: [f64; ZIG_LAYERS],
}

fn tables() -> &'static ZigTables {
    static TABLES: OnceLock<ZigTables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut x = [0.0f64; ZIG_LAYERS + 1];
        let mut f = libm::exp(-0.5 * ZIG_R * ZIG_R);
        x[0] = ZIG_V / f;
        x[1] = ZIG_R;
        for i in 2..ZIG_LAYERS {
            x[i] = libm::sqrt(-2.0 * libm::log(ZIG_V / x[i - 1] + f));
            f = libm::exp(-0.5 * x[i] * x[i]);
        }
        x[ZIG_LAYERS] = 0.0;
        let mut ratio = [0.0f64; ZIG_LAYERS];
        for i in 0..ZIG_LAYERS {
            ratio[i] = x[i + 1] / x[i];
        }
        ZigTables { x, ratio }
    })
}

/// Keep probability threshold for a Bernoulli mask drawn from 32-bit uniforms.
///
/// An entry is kept when its 32-bit draw is `>= drop_threshold(p)`.
pub fn drop_threshold(p: f32) -> u32 {
    (p.clamp(0.0, 1.0) as f64 * 4_294_967_296.0).min(u32::MAX as f64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_stream_and_gaussian() {
        // Pinned output: if this test fails, the generator changed and every saved
        // model's projections with it. Bump GENERATOR_ID instead of editing numbers.
        let key = StreamKey::new(42, Purpose::Projection, 1, 0, 0);
        let mut s = Stream::new(key);
        let raw: Vec<u64> = (0..3).map(|_| s.next_u64()).collect();
        let mut s = Stream::new(key);
        let mut g = [0.0f32; 6];
        s.fill_gaussian(&mut g, 1.0);
        let bits: Vec<u32> = g.iter().map(|v| v.to_bits()).collect();
        assert_eq!(raw, GOLDEN_RAW, "raw stream changed");
        assert_eq!(bits, GOLDEN_GAUSS_BITS, "gaussian sampler changed: {g:?}");
    }

    // Produced independently by `python3 tools/rng_reference.py`.
    const GOLDEN_RAW: [u64; 3] = [3_738_011_075_765_557_847, 10_872_654_752_972_810_908, 15_193_071_142_996_401_662];
    const GOLDEN_GAUSS_BITS: [u32; 6] = [0xbf3a0320, 0x3ec07f84, 0x3e70800d, 0xbf2ce69b, 0x3f5469b1, 0xbfb210cb];

    #[test]
    fn keys_give_independent_streams() {
        let a = Stream::new(StreamKey::new(7, Purpose::Projection, 1, 2, 0)).next_u64();
        let b = Stream::new(StreamKey::new(7, Purpose::Projection, 1, 3, 0)).next_u64();
        let c = Stream::new(StreamKey::new(7, Purpose::ProjectionDropout, 1, 2, 0)).next_u64();
        let d = Stream::new(StreamKey::new(8, Purpose::Projection, 1, 2, 0)).next_u64();
        assert!(a != b && a != c && a != d && b != c);
        let again = Stream::new(StreamKey::new(7, Purpose::Projection, 1, 2, 0)).next_u64();
        assert_eq!(a, again);
    }

    #[test]
    fn gaussian_moments_and_tails() {
        let mut s = Stream::new(StreamKey::new(1, Purpose::WeightInit, 0, 0, 0));
        let n = 2_000_000;
        let (mut m1, mut m2, mut m4, mut beyond3) = (0.0f64, 0.0, 0.0, 0usize);
        for _ in 0..n {
            let z = s.gaussian();
            m1 += z;
            m2 += z * z;
            m4 += z * z * z * z;
            if z.abs() > 3.0 {
                beyond3 += 1;
            }
        }
        let nf = n as f64;
        let (mean, var, kurt) = (m1 / nf, m2 / nf, m4 / nf);
        assert!(mean.abs() < 3e-3, "mean {mean}");
        assert!((var - 1.0).abs() < 5e-3, "variance {var}");
        assert!((kurt - 3.0).abs() < 0.05, "fourth moment {kurt}");
        // P(|Z| > 3) = 0.0026998
        let frac = beyond3 as f64 / nf;
        assert!((frac - 0.0027).abs() < 2.5e-4, "tail fraction {frac}");
    }

    #[test]
    fn uniform_below_and_threshold() {
        let mut s = Stream::new(StreamKey::new(3, Purpose::Shuffle, 0, 0, 0));
        let mut counts = [0usize; 5];
        for _ in 0..50_000 {
            counts[s.below(5) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_500..10_500).contains(&c)), "{counts:?}");
        assert_eq!(drop_threshold(0.0), 0);
        assert_eq!(drop_threshold(0.5), 1 << 31);
        assert_eq!(drop_threshold(1.0), u32::MAX);
    }
}
