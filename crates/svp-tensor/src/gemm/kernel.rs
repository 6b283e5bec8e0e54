//! The register-tiled inner kernel and the transposes that feed it.
//!
//! The portable code is plain Rust over fixed-size arrays, so LLVM keeps a
//! tile in vector registers and emits fused multiply-adds for whatever SIMD
//! the build targets (AVX2, NEON). AVX-512 builds use the intrinsics in
//! [`super::avx512`] instead. The tile shape is chosen per target so the
//! accumulators fit the register file without spilling.

#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod shape {
    pub const MR: usize = 12;
    pub const NR: usize = 32;
}
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", not(target_feature = "avx512f")))]
mod shape {
    pub const MR: usize = 6;
    pub const NR: usize = 16;
}
#[cfg(target_arch = "aarch64")]
mod shape {
    pub const MR: usize = 8;
    pub const NR: usize = 12;
}
#[cfg(not(any(target_arch = "aarch64", all(target_arch = "x86_64", target_feature = "avx2"))))]
mod shape {
    pub const MR: usize = 4;
    pub const NR: usize = 8;
}

/// Rows of an output tile (values of `A` broadcast per step of `k`).
pub const MR: usize = shape::MR;
/// Columns of an output tile (a whole number of vector registers).
pub const NR: usize = shape::NR;

/// One output tile, row by row.
pub type Tile = [[f32; NR]; MR];

/// How a tile of `alpha * a b` joins what the output holds.
///
/// Scalar and vector code apply it with the same operations (a product, a
/// product and a sum, never fused), so an element's bits do not depend on
/// whether its tile was stored whole or clipped at an edge.
#[derive(Clone, Copy, Debug)]
pub enum Blend {
    /// First block of the inner dimension: `c = alpha * t + beta * c`
    /// (`c` is not read when `beta` is 0, so it may hold anything).
    Beta(f32),
    /// Later blocks: `c = c + alpha * t`.
    Accumulate,
}

impl Blend {
    #[inline(always)]
    pub fn apply(self, alpha: f32, t: f32, c: &mut f32) {
        *c = match self {
            Blend::Beta(0.0) => alpha * t,
            Blend::Beta(beta) => alpha * t + beta * *c,
            Blend::Accumulate => *c + alpha * t,
        };
    }
}

/// `a * b + c`, fused where the target has a fused multiply-add instruction
/// (without one, `f32::mul_add` would be a slow library call).
#[cfg_attr(all(target_arch = "x86_64", target_feature = "avx512f"), allow(dead_code))]
#[inline(always)]
fn madd(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(any(target_feature = "fma", target_arch = "aarch64"))]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(any(target_feature = "fma", target_arch = "aarch64")))]
    {
        a * b + c
    }
}

/// The `MR x NR` product of a packed `A` panel (`kc` steps of `MR` values) and
/// a packed `B` panel (`kc` steps of `NR` values), summed over `k` in order.
///
/// Every element of the tile sees the same sequence of operations (one fused
/// multiply-add per step, and `fma(a, b, c) == fma(b, a, c)`), so neither the
/// tile's place in the output nor which operand was packed as `A` changes a bit.
///
/// # Panics
/// If a panel is shorter than `kc` steps.
#[inline(always)]
pub fn tile_product(kc: usize, a: &[f32], b: &[f32]) -> Tile {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    {
        super::avx512::tile_product(kc, a, b)
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    {
        portable_tile_product(kc, a, b)
    }
}

/// [`tile_product`] in plain Rust. Not inlined: where the caller reads the
/// tile element by element (a transposed output), LLVM otherwise splits the
/// accumulators into scalars and runs the whole loop scalar; on its own the
/// function keeps them in vector registers and stores the tile once.
#[cfg_attr(all(target_arch = "x86_64", target_feature = "avx512f"), allow(dead_code))]
#[inline(never)]
fn portable_tile_product(kc: usize, a: &[f32], b: &[f32]) -> Tile {
    let mut acc = [[0.0f32; NR]; MR];
    for (ak, bk) in a[..kc * MR].chunks_exact(MR).zip(b[..kc * NR].chunks_exact(NR)) {
        // Fixed-size steps and a row built whole: LLVM then keeps the tile
        // in vector registers (over plain slices, element by element, it
        // kept it on the stack and ran scalar code: 5 against 66-79 GFLOP/s
        // on AVX2).
        let ak: &[f32; MR] = ak.try_into().expect("a step of MR values");
        let bk: &[f32; NR] = bk.try_into().expect("a step of NR values");
        for (row, &ai) in acc.iter_mut().zip(ak) {
            *row = std::array::from_fn(|j| madd(ai, bk[j], row[j]));
        }
    }
    acc
}

/// Blends `alpha` times the tile product into columns `j0..j0 + NR` of `rows`,
/// clipped to the rows' length (rows past the output's edge are empty).
#[inline(always)]
pub fn tile_into(kc: usize, a: &[f32], b: &[f32], rows: &mut [&mut [f32]; MR], j0: usize, alpha: f32, blend: Blend) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    {
        // SAFETY: `avx512` is compiled only when the build targets AVX-512F
        // (its module docs), so the CPU running this has the instructions.
        unsafe { super::avx512::tile_into(kc, a, b, rows, j0, alpha, blend) };
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    store_tile(&tile_product(kc, a, b), rows, j0, alpha, blend);
}

/// Writes the valid part of `tile` into columns `j0..` of `rows`.
#[cfg_attr(all(target_arch = "x86_64", target_feature = "avx512f"), allow(dead_code))]
#[inline(always)]
fn store_tile(tile: &Tile, rows: &mut [&mut [f32]; MR], j0: usize, alpha: f32, blend: Blend) {
    for (row, tile_row) in rows.iter_mut().zip(tile) {
        if let Some(dst) = row.get_mut(j0..) {
            for (d, &v) in dst.iter_mut().zip(tile_row) {
                blend.apply(alpha, v, d);
            }
        }
    }
}

/// `panel[p * W + i] = lines[i][p]` for `p < len`: `W` lines of at least `len`
/// values (or empty lines, which give zeros) transposed into steps of `W`.
pub fn transpose_into<const W: usize>(lines: &[&[f32]; W], len: usize, panel: &mut [f32]) {
    let panel = &mut panel[..len * W];
    // SAFETY: `avx512` is compiled only when the build targets AVX-512F
    // (its module docs), so the CPU running this has the instructions.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    let done = unsafe { super::avx512::transpose_blocks(lines, len, panel) };
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    let done = 0;
    // Line by line: each line is read once, in order, and written with a
    // stride of W into the panel (which stays in L1); step by step over all
    // lines, with a check per value, the forward's GEMM was 6 % slower on
    // AVX2.
    let rest = &mut panel[done * W..];
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
