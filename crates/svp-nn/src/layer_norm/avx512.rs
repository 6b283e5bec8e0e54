//! AVX-512 versions of the LayerNorm row passes, for ReLU and the identity
//! on rows that are a whole number of 16-float lanes (GELU, and other widths,
//! take the portable passes).
//!
//! Written with intrinsics because LLVM vectorizes the portable lane sums
//! two floats at a time once they are inlined into a row pass, which made
//! the forward twice as slow. Each function does the portable one's
//! operations in the same order, sixteen elements at a time; a lane sum is
//! one register in `reduce`'s layout, finished by the same fold. So the bits
//! are the same (checked in the parent module's tests). Compiled into every
//! x86-64 build; the parent calls these functions only when the process runs
//! the AVX-512 kernels (`svp_tensor::cpu::selected`), which it does only on a
//! CPU that has AVX-512F: that is what makes those calls sound.

use core::arch::x86_64::*;
use svp_tensor::reduce::{LANES, LaneSum};

const _: () = assert!(LANES == 16, "a lane sum is one 16-float register");

#[target_feature(enable = "avx512f")]
#[inline]
fn load(values: &[f32; LANES]) -> __m512 {
    // SAFETY: `values` is exactly one register's width of floats.
    unsafe { _mm512_loadu_ps(values.as_ptr()) }
}

#[target_feature(enable = "avx512f")]
#[inline]
fn store(dst: &mut [f32; LANES], v: __m512) {
    // SAFETY: as in `load`.
    unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), v) }
}

/// The register's lanes as a [`LaneSum`].
#[target_feature(enable = "avx512f")]
#[inline]
fn lanes(v: __m512) -> LaneSum {
    let mut values = [0.0; LANES];
    store(&mut values, v);
    LaneSum::from_lanes(values)
}

/// Whole lanes of `values`.
///
/// # Panics
/// If its length is not a multiple of 16 (callers check the width).
#[inline(always)]
fn chunks(values: &[f32]) -> &[[f32; LANES]] {
    let (whole, tail) = values.as_chunks::<LANES>();
    assert!(tail.is_empty(), "layer norm: row of {} is not whole lanes", values.len());
    whole
}

#[inline(always)]
fn chunks_mut(values: &mut [f32]) -> &mut [[f32; LANES]] {
    let len = values.len();
    let (whole, tail) = values.as_chunks_mut::<LANES>();
    assert!(tail.is_empty(), "layer norm: row of {len} is not whole lanes");
    whole
}

/// `super::forward_row` with `act` = ReLU (`relu`) or the identity.
#[target_feature(enable = "avx512f")]
pub fn forward_row(
    eps: f32,
    z: &mut [f32],
    bias: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    relu: bool,
    out: &mut [f32],
) -> f32 {
    let inv_d = 1.0 / z.len() as f32;
    let z = chunks_mut(z);
    let mut sum = _mm512_setzero_ps();
    if let Some(bias) = bias {
        for (c, b) in z.iter_mut().zip(chunks(bias)) {
            let v = _mm512_add_ps(load(c), load(b));
            store(c, v);
            sum = _mm512_add_ps(sum, v);
        }
    } else {
        for c in z.iter() {
            sum = _mm512_add_ps(sum, load(c));
        }
    }
    let mean = lanes(sum).finish([]) * inv_d;
    let mean_v = _mm512_set1_ps(mean);
    let mut squares = _mm512_setzero_ps();
    for c in z.iter() {
        let dev = _mm512_sub_ps(load(c), mean_v);
        squares = _mm512_add_ps(squares, _mm512_mul_ps(dev, dev));
    }
    let var = lanes(squares).finish([]) * inv_d;
    let r = 1.0 / (var + eps).sqrt();
    let r_v = _mm512_set1_ps(r);
    let zero = _mm512_setzero_ps();
    let params = chunks(gamma).iter().zip(chunks(beta));
    for ((c, o), (g, b)) in z.iter_mut().zip(chunks_mut(out)).zip(params) {
        let x = _mm512_mul_ps(_mm512_sub_ps(load(c), mean_v), r_v);
        store(c, x);
        let y = _mm512_add_ps(_mm512_mul_ps(load(g), x), load(b));
        // `max(y, 0)` answers 0 for a NaN `y` and +0 for -0, as `f32::max` does here.
        store(o, if relu { _mm512_max_ps(y, zero) } else { y });
    }
    r
}

/// `super::backward_row` with `act` = ReLU (`relu`) or the identity.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub fn backward_row(
    dy: &mut [f32],
    xhat: &[f32],
    r: f32,
    gamma: &[f32],
    beta: &[f32],
    relu: bool,
    (sum_dy, sum_dy_xhat, sum_dz): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let inv_d = 1.0 / dy.len() as f32;
    let (dy, x) = (chunks_mut(dy), chunks(xhat));
    let zero = _mm512_setzero_ps();
    let (mut sum_dxhat, mut sum_dxhat_x) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let params = chunks(gamma).iter().zip(chunks(beta));
    let sums = chunks_mut(sum_dy).iter_mut().zip(chunks_mut(sum_dy_xhat));
    for (((d, x), (g, b)), (s, sx)) in dy.iter_mut().zip(x).zip(params).zip(sums) {
        let (x, g) = (load(x), load(g));
        let grad = if relu {
            // `relu_grad`: the gradient where `gamma * xhat + beta > 0`, else +0.
            let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_add_ps(_mm512_mul_ps(g, x), load(b)), zero);
            _mm512_maskz_mov_ps(positive, load(d))
        } else {
            load(d)
        };
        store(s, _mm512_add_ps(load(s), grad));
        store(sx, _mm512_add_ps(load(sx), _mm512_mul_ps(grad, x)));
        let dxhat = _mm512_mul_ps(grad, g);
        store(d, dxhat);
        sum_dxhat = _mm512_add_ps(sum_dxhat, dxhat);
        sum_dxhat_x = _mm512_add_ps(sum_dxhat_x, _mm512_mul_ps(dxhat, x));
    }
    let mean_dxhat = _mm512_set1_ps(lanes(sum_dxhat).finish([]) * inv_d);
    let mean_dxhat_x = _mm512_set1_ps(lanes(sum_dxhat_x).finish([]) * inv_d);
    let r = _mm512_set1_ps(r);
    let dz = |d: &mut [f32; LANES], x: &[f32; LANES]| {
        let v =
            _mm512_mul_ps(r, _mm512_sub_ps(_mm512_sub_ps(load(d), mean_dxhat), _mm512_mul_ps(load(x), mean_dxhat_x)));
        store(d, v);
        v
    };
    if sum_dz.is_empty() {
        dy.iter_mut().zip(x).for_each(|(d, x)| {
            dz(d, x);
        });
    } else {
        for ((d, x), s) in dy.iter_mut().zip(x).zip(chunks_mut(sum_dz)) {
            let v = dz(d, x);
            store(s, _mm512_add_ps(load(s), v));
        }
    }
}
