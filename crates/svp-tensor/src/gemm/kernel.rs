//! The register-tiled inner kernels, one per instruction set, behind one trait.
//!
//! A kernel computes an `MR x NR` tile of a product from a packed `A` panel
//! and a packed `B` panel. Each kernel type can only be had from a
//! constructor that checks the CPU (rten's pattern), so holding one is the
//! proof its instructions are there: that is what makes the `unsafe` calls to
//! `#[target_feature]` functions below sound. The tile shape is chosen per
//! instruction set so the accumulators fit the register file without
//! spilling.
//!
//! Every kernel computes each element as the same chain of fused
//! multiply-adds over `k`, in order, so a product's bits do not depend on the
//! kernel (checked in the parent module's tests).

#[cfg(target_arch = "x86_64")]
use crate::cpu::Isa;

/// How a tile of `alpha * a b` joins what the output holds.
///
/// Scalar and vector code apply it with the same operations (a product, a
/// product and a sum, never fused), so an element's bits do not depend on
/// whether its tile was stored whole or clipped at an edge.
#[derive(Clone, Copy, Debug)]
pub enum Blend<'a> {
    /// First block of the inner dimension: `c = alpha * t + beta * c`
    /// (`c` is not read when `beta` is 0, so it may hold anything).
    Beta(f32),
    /// First block, a value per output column: `c = alpha * t + bias[j]`
    /// for column `j` of the block (`c` is not read). The bits of `c`
    /// filled with the bias and blended with `Beta(1.0)`.
    Bias(&'a [f32]),
    /// Later blocks: `c = c + alpha * t`.
    Accumulate,
}

impl Blend<'_> {
    /// Blends `t` into `c`, the output's element in column `column` of the block.
    #[inline(always)]
    pub fn apply(self, alpha: f32, t: f32, c: &mut f32, column: usize) {
        *c = match self {
            Blend::Beta(0.0) => alpha * t,
            Blend::Beta(beta) => alpha * t + beta * *c,
            Blend::Bias(bias) => alpha * t + bias[column],
            Blend::Accumulate => *c + alpha * t,
        };
    }
}

/// A GEMM micro-kernel with `MR x NR` tiles.
pub trait Kernel<const MR: usize, const NR: usize>: Copy + Send + Sync {
    /// The `MR x NR` product of a packed `A` panel (`kc` steps of `MR`
    /// values) and a packed `B` panel (`kc` steps of `NR` values), summed
    /// over `k` in order with one fused multiply-add per step.
    ///
    /// Every element of the tile sees the same sequence of operations (and
    /// `fma(a, b, c) == fma(b, a, c)`), so neither the tile's place in the
    /// output nor which operand was packed as `A` changes a bit.
    ///
    /// # Panics
    /// If a panel is shorter than `kc` steps.
    fn tile_product(self, kc: usize, a: &[f32], b: &[f32]) -> [[f32; NR]; MR];

    /// Blends `alpha` times the tile product into columns `j0..j0 + NR` of
    /// `rows`, clipped to the rows' length (rows past the output's edge are
    /// empty).
    #[allow(clippy::too_many_arguments)]
    fn tile_into(
        self,
        kc: usize,
        a: &[f32],
        b: &[f32],
        rows: &mut [&mut [f32]; MR],
        j0: usize,
        alpha: f32,
        blend: Blend<'_>,
    );

    /// `panel[p * W + i] = lines[i][p]` for `p < len`: `W` lines of at least
    /// `len` values (or empty lines, which give zeros) transposed into steps
    /// of `W`.
    fn transpose_into<const W: usize>(self, lines: &[&[f32]; W], len: usize, panel: &mut [f32]) {
        transpose_rest(lines, len, 0, panel);
    }
}

/// The tile product in plain Rust, for any shape. `f32::mul_add` is one
/// fused instruction where the function it is inlined into targets FMA
/// (or NEON); elsewhere it is the C library's `fmaf`, correctly rounded in
/// software: slow, but the same bits.
#[inline(always)]
fn fma_tile<const MR: usize, const NR: usize>(kc: usize, a: &[f32], b: &[f32]) -> [[f32; NR]; MR] {
    let mut acc = [[0.0f32; NR]; MR];
    for (ak, bk) in a[..kc * MR].chunks_exact(MR).zip(b[..kc * NR].chunks_exact(NR)) {
        // Fixed-size steps and a row built whole: LLVM then keeps the tile
        // in vector registers (over plain slices, element by element, it
        // kept it on the stack and ran scalar code: 5 against 66-79 GFLOP/s
        // on AVX2).
        let ak: &[f32; MR] = ak.try_into().expect("a step of MR values");
        let bk: &[f32; NR] = bk.try_into().expect("a step of NR values");
        for (row, &ai) in acc.iter_mut().zip(ak) {
            *row = std::array::from_fn(|j| ai.mul_add(bk[j], row[j]));
        }
    }
    acc
}

/// Writes the valid part of `tile` into columns `j0..` of `rows`.
#[inline(always)]
fn store_tile<const MR: usize, const NR: usize>(
    tile: &[[f32; NR]; MR],
    rows: &mut [&mut [f32]; MR],
    j0: usize,
    alpha: f32,
    blend: Blend<'_>,
) {
    for (row, tile_row) in rows.iter_mut().zip(tile) {
        if let Some(dst) = row.get_mut(j0..) {
            for (j, (d, &v)) in dst.iter_mut().zip(tile_row).enumerate() {
                blend.apply(alpha, v, d, j0 + j);
            }
        }
    }
}

/// Steps `done..len` of [`Kernel::transpose_into`], line by line: each line
/// is read once, in order, and written with a stride of `W` into the panel
/// (which stays in L1); step by step over all lines, with a check per
/// value, the forward's GEMM was 6 % slower on AVX2.
#[inline(always)]
fn transpose_rest<const W: usize>(lines: &[&[f32]; W], len: usize, done: usize, panel: &mut [f32]) {
    let rest = &mut panel[done * W..len * W];
    for (i, line) in lines.iter().enumerate() {
        let values = line.get(done..len.min(line.len())).unwrap_or_default();
        for (step, &v) in rest.chunks_exact_mut(W).zip(values) {
            step[i] = v;
        }
        for step in rest.chunks_exact_mut(W).skip(values.len()) {
            step[i] = 0.0;
        }
    }
}

/// Plain Rust for the base instruction set, 4x8 tiles: what runs where no
/// other kernel does (an x86-64 CPU without AVX2 and FMA).
#[derive(Clone, Copy, Debug)]
pub struct Portable;

/// [`fma_tile`] for [`Portable`]. Not inlined: where the caller reads the
/// tile element by element (a transposed output), LLVM otherwise splits the
/// accumulators into scalars and runs the whole loop scalar; on its own the
/// function keeps them in vector registers and stores the tile once.
#[inline(never)]
fn portable_tile(kc: usize, a: &[f32], b: &[f32]) -> [[f32; 8]; 4] {
    fma_tile(kc, a, b)
}

impl Kernel<4, 8> for Portable {
    #[inline(always)]
    fn tile_product(self, kc: usize, a: &[f32], b: &[f32]) -> [[f32; 8]; 4] {
        portable_tile(kc, a, b)
    }

    #[inline(always)]
    fn tile_into(
        self,
        kc: usize,
        a: &[f32],
        b: &[f32],
        rows: &mut [&mut [f32]; 4],
        j0: usize,
        alpha: f32,
        blend: Blend<'_>,
    ) {
        store_tile(&portable_tile(kc, a, b), rows, j0, alpha, blend);
    }
}

/// x86-64 with AVX2 and FMA: the plain-Rust tile compiled for them, 6x16.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub struct Avx2(());

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    /// The kernel, if this CPU has AVX2 and FMA.
    pub fn new() -> Option<Self> {
        Isa::Avx2.is_supported().then_some(Avx2(()))
    }
}

/// [`fma_tile`] compiled for AVX2 and FMA (not inlined: see [`portable_tile`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
fn avx2_tile(kc: usize, a: &[f32], b: &[f32]) -> [[f32; 16]; 6] {
    fma_tile(kc, a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2_tile_into(
    kc: usize,
    a: &[f32],
    b: &[f32],
    rows: &mut [&mut [f32]; 6],
    j0: usize,
    alpha: f32,
    blend: Blend<'_>,
) {
    store_tile(&avx2_tile(kc, a, b), rows, j0, alpha, blend);
}

#[cfg(target_arch = "x86_64")]
impl Kernel<6, 16> for Avx2 {
    #[inline(always)]
    fn tile_product(self, kc: usize, a: &[f32], b: &[f32]) -> [[f32; 16]; 6] {
        // SAFETY: an `Avx2` exists only where `Avx2::new` found AVX2 and FMA.
        unsafe { avx2_tile(kc, a, b) }
    }

    #[inline(always)]
    fn tile_into(
        self,
        kc: usize,
        a: &[f32],
        b: &[f32],
        rows: &mut [&mut [f32]; 6],
        j0: usize,
        alpha: f32,
        blend: Blend<'_>,
    ) {
        // SAFETY: as in `tile_product`.
        unsafe { avx2_tile_into(kc, a, b, rows, j0, alpha, blend) }
    }
}

/// x86-64 with AVX-512F: intrinsics ([`super::avx512`]), 12x32 tiles.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub struct Avx512(());

#[cfg(target_arch = "x86_64")]
impl Avx512 {
    /// The kernel, if this CPU has AVX-512F.
    pub fn new() -> Option<Self> {
        Isa::Avx512.is_supported().then_some(Avx512(()))
    }
}

#[cfg(target_arch = "x86_64")]
impl Kernel<12, 32> for Avx512 {
    #[inline(always)]
    fn tile_product(self, kc: usize, a: &[f32], b: &[f32]) -> [[f32; 32]; 12] {
        // SAFETY: an `Avx512` exists only where `Avx512::new` found AVX-512F.
        unsafe { super::avx512::tile_product(kc, a, b) }
    }

    #[inline(always)]
    fn tile_into(
        self,
        kc: usize,
        a: &[f32],
        b: &[f32],
        rows: &mut [&mut [f32]; 12],
        j0: usize,
        alpha: f32,
        blend: Blend<'_>,
    ) {
        // SAFETY: as in `tile_product`.
        unsafe { super::avx512::tile_into(kc, a, b, rows, j0, alpha, blend) }
    }

    fn transpose_into<const W: usize>(self, lines: &[&[f32]; W], len: usize, panel: &mut [f32]) {
        // SAFETY: as in `tile_product`.
        let done = unsafe { super::avx512::transpose_blocks(lines, len, panel) };
        transpose_rest(lines, len, done, panel);
    }
}

/// aarch64, where NEON is part of the base architecture: intrinsics, 8x12
/// tiles (24 of the 32 vector registers hold the accumulators).
#[cfg(target_arch = "aarch64")]
#[derive(Clone, Copy, Debug)]
pub struct Neon;

/// The 8x12 tile product with NEON's fused multiply-add by a scalar.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
#[inline(never)]
fn neon_tile(kc: usize, a: &[f32], b: &[f32]) -> [[f32; 12]; 8] {
    use core::arch::aarch64::*;
    let mut acc = [[vdupq_n_f32(0.0); 3]; 8];
    for (ak, bk) in a[..kc * 8].chunks_exact(8).zip(b[..kc * 12].chunks_exact(12)) {
        let bk: &[f32; 12] = bk.try_into().expect("a step of 12 values");
        // SAFETY: `bk` holds 12 floats; the loads read 4 each at offsets 0, 4
        // and 8.
        let b = unsafe { [vld1q_f32(bk.as_ptr()), vld1q_f32(bk.as_ptr().add(4)), vld1q_f32(bk.as_ptr().add(8))] };
        for (row, &ai) in acc.iter_mut().zip(ak) {
            for (r, &bv) in row.iter_mut().zip(&b) {
                // r + bv * ai, fused (FMLA by element).
                *r = vfmaq_n_f32(*r, bv, ai);
            }
        }
    }
    let mut tile = [[0.0f32; 12]; 8];
    for (dst, row) in tile.iter_mut().zip(&acc) {
        for (d, &v) in dst.chunks_exact_mut(4).zip(row) {
            // SAFETY: `d` holds exactly the 4 floats the store writes.
            unsafe { vst1q_f32(d.as_mut_ptr(), v) };
        }
    }
    tile
}

#[cfg(target_arch = "aarch64")]
impl Kernel<8, 12> for Neon {
    #[inline(always)]
    fn tile_product(self, kc: usize, a: &[f32], b: &[f32]) -> [[f32; 12]; 8] {
        // SAFETY: NEON is part of the aarch64 base architecture.
        unsafe { neon_tile(kc, a, b) }
    }

    #[inline(always)]
    fn tile_into(
        self,
        kc: usize,
        a: &[f32],
        b: &[f32],
        rows: &mut [&mut [f32]; 8],
        j0: usize,
        alpha: f32,
        blend: Blend<'_>,
    ) {
        // SAFETY: as in `tile_product`.
        store_tile(&unsafe { neon_tile(kc, a, b) }, rows, j0, alpha, blend);
    }
}
