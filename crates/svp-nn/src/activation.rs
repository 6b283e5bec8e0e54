//! Elementwise activations.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Activation after the (optional) normalization of a hidden block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// `max(0, x)`.
    Relu,
    /// `x Φ(x)` with the normal CDF (PyTorch's default, exact GELU), its
    /// `erf` computed to within 3e-7 by a branch-free approximation that
    /// vectorizes ([`erf_and_gaussian`]).
    Gelu,
    /// `x` (used by the classifier head).
    Identity,
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2 pi)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;

impl Activation {
    /// `out[i] = act(x[i])`.
    pub fn forward(self, x: &[f32], out: &mut [f32]) {
        match self {
            Activation::Relu => in_chunks(x, out, relu_forward),
            Activation::Gelu => in_chunks(x, out, gelu_forward),
            Activation::Identity => out.copy_from_slice(x),
        }
    }

    /// `grad[i] *= act'(x[i])`, with `x` the activation's input.
    pub fn backward(self, x: &[f32], grad: &mut [f32]) {
        match self {
            Activation::Relu => in_chunks(x, grad, relu_backward),
            Activation::Gelu => in_chunks(x, grad, gelu_backward),
            Activation::Identity => {}
        }
    }
}

#[inline(always)]
pub(crate) fn relu(v: f32) -> f32 {
    v.max(0.0)
}

/// A select, not a branch: the sign of `v` is a coin flip, and a mispredicted
/// branch per element cost ~1 ms per layer.
#[inline(always)]
pub(crate) fn relu_grad(g: f32, v: f32) -> f32 {
    if v > 0.0 { g } else { 0.0 }
}

#[inline(always)]
pub(crate) fn gelu(v: f32) -> f32 {
    let (erf, _) = erf_and_gaussian(v * FRAC_1_SQRT_2);
    0.5 * v * (1.0 + erf)
}

#[inline(always)]
pub(crate) fn gelu_grad(g: f32, v: f32) -> f32 {
    // exp(-(v / sqrt 2)^2) = exp(-v^2 / 2): the normal density's.
    let (erf, gaussian) = erf_and_gaussian(v * FRAC_1_SQRT_2);
    g * (0.5 * (1.0 + erf) + v * INV_SQRT_2PI * gaussian)
}

// The loops, compiled once per instruction set: the portable build targets
// baseline x86-64, where `f32::round` in GELU's exponential is a call to
// libm per element (SSE2 has no rounding instruction) and nothing vectorizes.
// Every operation is exactly rounded and none is fused, so the bits are the
// same on every kernel. Plain `for` loops: `for_each` goes through
// `Zip::fold`, which is not inlined, so it kept the baseline code.
svp_tensor::multiversion! {
    fn relu_forward(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = relu(v);
        }
    }
}

svp_tensor::multiversion! {
    fn gelu_forward(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = gelu(v);
        }
    }
}

svp_tensor::multiversion! {
    fn relu_backward(x: &[f32], grad: &mut [f32]) {
        for (g, &v) in grad.iter_mut().zip(x) {
            *g = relu_grad(*g, v);
        }
    }
}

svp_tensor::multiversion! {
    fn gelu_backward(x: &[f32], grad: &mut [f32]) {
        for (g, &v) in grad.iter_mut().zip(x) {
            *g = gelu_grad(*g, v);
        }
    }
}

/// Elements per task of the parallel activation loops.
const CHUNK: usize = 1 << 14;

/// `f` over matching chunks of `x` and `out`, in parallel when they are long
/// (each element is computed alone, so the split never changes a bit).
fn in_chunks(x: &[f32], out: &mut [f32], f: fn(&[f32], &mut [f32])) {
    let out = &mut out[..x.len()];
    if x.len() < 2 * CHUNK {
        f(x, out);
    } else {
        x.par_chunks(CHUNK).zip(out.par_chunks_mut(CHUNK)).for_each(|(x, out)| f(x, out));
    }
}

/// `(erf(z), exp(-z^2))` to within 3e-7 (absolute, for erf; relative, for
/// the exponential), branch-free so that loops over it vectorize.
///
/// Below `|z| = 1/2`, the Taylor series of `erf` to the `z^13` term (its
/// truncation error is under 1e-9 there); above, Abramowitz and Stegun
/// 7.1.26 (error below 1.5e-7), which needs `exp(-z^2)` anyway: that is
/// returned too, as GELU's backward uses it for the normal density. Both are
/// computed and one is selected, which is what keeps the loop vectorized.
#[inline(always)]
pub fn erf_and_gaussian(z: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_72, 1.421_413_8, -1.453_152, 1.061_405_4];
    // 2/sqrt(pi) * (-1)^n / (n! (2n + 1)), n = 0..6.
    const T: [f32; 7] = [
        std::f32::consts::FRAC_2_SQRT_PI,
        -0.376_126_4,
        0.112_837_92,
        -0.026_866_17,
        0.005_223_977,
        -0.000_854_832_7,
        0.000_120_553_3,
    ];
    let a = z.abs();
    let gaussian = exp(-a * a);
    let t = 1.0 / (1.0 + P * a);
    let tail = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4])))) * gaussian;
    let z2 = z * z;
    let series = z * (T[0] + z2 * (T[1] + z2 * (T[2] + z2 * (T[3] + z2 * (T[4] + z2 * (T[5] + z2 * T[6]))))));
    let erf = if a < 0.5 { series } else { (1.0 - tail).copysign(z) };
    (erf, gaussian)
}

/// `e^x` to about 2 ulp for `x` in `[-87, 88]` (clamped outside), branch-free:
/// `x = n ln 2 + r` with `|r| <= ln 2 / 2`, Cephes' polynomial for `e^r`,
/// and `2^n` built in the exponent bits.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let e_r = p * r * r + r + 1.0;
    // `n` is a whole number in [-126, 127]: adding 1.5 * 2^23 puts it in
    // the low mantissa bits, read back as an integer. The same value as
    // `n as i32`, whose saturating conversion does not vectorize on x86.
    const MAGIC: f32 = 12_582_912.0;
    let n = (n + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32;
    e_r * f32::from_bits(((n + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The approximations against libm over a fine grid and the extremes.
    #[test]
    fn erf_and_exp_match_libm() {
        let (mut worst_erf, mut worst_exp) = (0.0f64, 0.0f64);
        for i in -200_000..=200_000 {
            let z = i as f32 * 5e-5; // [-10, 10]
            let (erf, gaussian) = erf_and_gaussian(z);
            worst_erf = worst_erf.max((erf as f64 - libm::erf(z as f64)).abs());
            // Against the exponential of the f32 argument (rounding -z^2 to f32
            // alone moves e^-z^2 by up to 5e-6 at z = 9); below e^-87 it is
            // clamped there (1.6e-38, not a subnormal).
            let exponent = -(z.abs() * z.abs()) as f64;
            let want = libm::exp(exponent.max(-87.0));
            worst_exp = worst_exp.max((gaussian as f64 - want).abs() / want);
        }
        assert!(worst_erf < 3e-7, "erf off by {worst_erf}");
        assert!(worst_exp < 3e-7, "exp off by {worst_exp} (relative)");
        for x in [-100.0f32, -87.0, -20.0, -1.0, 0.0, 1.0, 20.0, 88.0] {
            let want = libm::expf(x.clamp(-87.0, 88.0));
            assert!(((exp(x) - want) / want).abs() < 3e-7, "exp({x}) = {} vs {want}", exp(x));
        }
        assert_eq!(erf_and_gaussian(0.0).0, 0.0);
        assert_eq!(erf_and_gaussian(40.0).0, 1.0);
        assert_eq!(erf_and_gaussian(-40.0).0, -1.0);
        assert!(erf_and_gaussian(f32::NAN).0.is_nan());
    }

    /// GELU and its derivative against the exact formulas (libm), on values a
    /// layer sees, and the same bits whether or not the loop runs in parallel.
    #[test]
    fn gelu_matches_the_exact_function() {
        let x: Vec<f32> = (0..100_000).map(|i| (i as f32 - 50_000.0) * 1.7e-4).collect();
        let mut out = vec![0.0; x.len()];
        Activation::Gelu.forward(&x, &mut out);
        let mut grad = vec![1.0; x.len()];
        Activation::Gelu.backward(&x, &mut grad);
        for ((&v, &o), &g) in x.iter().zip(&out).zip(&grad) {
            let v64 = v as f64;
            let cdf = 0.5 * (1.0 + libm::erf(v64 / 2f64.sqrt()));
            let pdf = (-0.5 * v64 * v64).exp() / (2.0 * std::f64::consts::PI).sqrt();
            assert!((o as f64 - v64 * cdf).abs() < 1e-6 * (1.0 + v64.abs()), "gelu({v}) = {o}");
            assert!((g as f64 - (cdf + v64 * pdf)).abs() < 2e-6 * (1.0 + v64.abs()), "gelu'({v}) = {g}");
        }
        let mut serial = vec![0.0; 1000];
        Activation::Gelu.forward(&x[..1000], &mut serial);
        assert!(serial.iter().zip(&out[..1000]).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
