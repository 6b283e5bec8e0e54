//! AVX-512 versions of the kernel and the panel transpose.
//!
//! Written with intrinsics because LLVM's tuning for these CPUs prefers
//! 256-bit vectors, which turns the plain-Rust kernel into register spills at
//! a third of the speed. Compiled into every x86-64 build; callers hold a
//! [`super::kernel::Avx512`], which exists only where the CPU has AVX-512F,
//! and that is what makes their calls to these `#[target_feature]` functions
//! sound.

use super::kernel::Blend;
use core::arch::x86_64::*;

const LANES: usize = 16;
/// Rows of a tile.
const MR: usize = 12;
/// Columns of a tile: two registers.
const NR: usize = 2 * LANES;
const _: () = assert!(MR <= LANES, "a transposed A step fits one register");

type Tile = [[f32; NR]; MR];

/// The tile's accumulators: row `r` of the tile in `acc[r][0..2]`.
#[target_feature(enable = "avx512f")]
fn accumulate(kc: usize, a: &[f32], b: &[f32]) -> [[__m512; 2]; MR] {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for (ak, bk) in a[..kc * MR].chunks_exact(MR).zip(b[..kc * NR].chunks_exact(NR)) {
        // SAFETY: `bk` is a chunk of exactly NR = 2 * LANES floats, so both
        // unaligned 16-float loads, at offsets 0 and LANES, stay inside it.
        let (b0, b1) = unsafe { (_mm512_loadu_ps(bk.as_ptr()), _mm512_loadu_ps(bk.as_ptr().add(LANES))) };
        for (row, &ai) in acc.iter_mut().zip(ak) {
            let ai = _mm512_set1_ps(ai);
            row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
        }
    }
    acc
}

/// See [`super::kernel::Kernel::tile_product`].
#[target_feature(enable = "avx512f")]
pub fn tile_product(kc: usize, a: &[f32], b: &[f32]) -> Tile {
    let acc = accumulate(kc, a, b);
    let mut tile = [[0.0f32; NR]; MR];
    for (dst, row) in tile.iter_mut().zip(&acc) {
        let (lo, hi) = dst.split_at_mut(LANES);
        store16(lo, row[0]);
        store16(hi, row[1]);
    }
    tile
}

/// [`super::kernel::Kernel::tile_into`]: rows that hold all `NR` columns of the tile
/// are blended in registers, a row cut by the output's right edge goes
/// through a small array, and rows past its bottom edge (empty) are skipped.
#[target_feature(enable = "avx512f")]
pub fn tile_into(
    kc: usize,
    a: &[f32],
    b: &[f32],
    rows: &mut [&mut [f32]; MR],
    j0: usize,
    alpha: f32,
    blend: Blend<'_>,
) {
    let acc = accumulate(kc, a, b);
    let alpha_v = _mm512_set1_ps(alpha);
    for (row, acc) in rows.iter_mut().zip(&acc) {
        if row.len() >= j0 + NR {
            let (lo, hi) = row[j0..j0 + NR].split_at_mut(LANES);
            for (half, (dst, &t)) in [lo, hi].into_iter().zip(acc).enumerate() {
                // The same operations as `Blend::apply`, lane by lane.
                let scaled = _mm512_mul_ps(alpha_v, t);
                let value = match blend {
                    Blend::Beta(0.0) => scaled,
                    Blend::Beta(beta) => _mm512_add_ps(scaled, _mm512_mul_ps(_mm512_set1_ps(beta), load16(dst))),
                    Blend::Bias(bias) => _mm512_add_ps(scaled, load16(&bias[j0 + half * LANES..])),
                    Blend::Accumulate => _mm512_add_ps(load16(dst), scaled),
                };
                store16(dst, value);
            }
        } else if let Some(dst) = row.get_mut(j0..) {
            let mut values = [0.0f32; NR];
            let (lo, hi) = values.split_at_mut(LANES);
            store16(lo, acc[0]);
            store16(hi, acc[1]);
            for (j, (d, &v)) in dst.iter_mut().zip(&values).enumerate() {
                blend.apply(alpha, v, d, j0 + j);
            }
        }
    }
}

/// The first 16 floats of `src`.
///
/// # Panics
/// If `src` is shorter than 16.
#[target_feature(enable = "avx512f")]
#[inline]
fn load16(src: &[f32]) -> __m512 {
    let src = &src[..LANES];
    // SAFETY: `src` holds exactly 16 floats, the load's width.
    unsafe { _mm512_loadu_ps(src.as_ptr()) }
}

/// Stores `v` into the first 16 floats of `dst`.
///
/// # Panics
/// If `dst` is shorter than 16.
#[target_feature(enable = "avx512f")]
#[inline]
fn store16(dst: &mut [f32], v: __m512) {
    let dst = &mut dst[..LANES];
    // SAFETY: `dst` holds exactly 16 floats, the store's width.
    unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), v) }
}

/// Stores the first `count` lanes of `v` into `dst`.
///
/// # Panics
/// If `dst` is shorter than `count` or `count` exceeds 16.
#[target_feature(enable = "avx512f")]
#[inline]
fn store_first(dst: &mut [f32], count: usize, v: __m512) {
    assert!(count <= LANES);
    let dst = &mut dst[..count];
    let mask: __mmask16 = ((1u32 << count) - 1) as __mmask16;
    // SAFETY: the mask enables lanes 0..count only, and `dst` holds exactly
    // `count` floats; masked-off lanes are neither written nor faulted on.
    unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), mask, v) }
}

/// Transposes 16 registers (rows) into 16 registers (columns).
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4g + q] holds rows 4g..4g+4 at steps q, q + 4, q + 8, q + 12 (one per 128-bit lane).
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let (lo0, hi0, lo1, hi1) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        let pd = |x: __m512| _mm512_castps_pd(x);
        u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(lo0), pd(lo1)));
        u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(lo0), pd(lo1)));
        u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(hi0), pd(hi1)));
        u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(hi0), pd(hi1)));
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        let x0 = _mm512_shuffle_f32x4::<0x88>(u[q], u[4 + q]);
        let x1 = _mm512_shuffle_f32x4::<0xDD>(u[q], u[4 + q]);
        let y0 = _mm512_shuffle_f32x4::<0x88>(u[8 + q], u[12 + q]);
        let y1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + q], u[12 + q]);
        out[q] = _mm512_shuffle_f32x4::<0x88>(x0, y0);
        out[q + 8] = _mm512_shuffle_f32x4::<0xDD>(x0, y0);
        out[q + 4] = _mm512_shuffle_f32x4::<0x88>(x1, y1);
        out[q + 12] = _mm512_shuffle_f32x4::<0xDD>(x1, y1);
    }
    out
}

/// The blocks of 16 steps of [`super::kernel::Kernel::transpose_into`];
/// returns how many steps it wrote (a multiple of 16), leaving the rest to
/// the caller.
#[target_feature(enable = "avx512f")]
pub fn transpose_blocks<const W: usize>(lines: &[&[f32]; W], len: usize, panel: &mut [f32]) -> usize {
    let full = len / LANES * LANES;
    for p0 in (0..full).step_by(LANES) {
        let steps = &mut panel[p0 * W..(p0 + LANES) * W];
        for (g, group) in lines.chunks(LANES).enumerate() {
            let rows: [__m512; LANES] = core::array::from_fn(|i| match group.get(i) {
                Some(line) if !line.is_empty() => load16(&line[p0..]),
                _ => _mm512_setzero_ps(),
            });
            let columns = transpose16(rows);
            for (step, column) in steps.chunks_exact_mut(W).zip(columns) {
                store_first(&mut step[g * LANES..], group.len(), column);
            }
        }
    }
    full
}
