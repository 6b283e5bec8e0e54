//! Copies blocks of the operands into the panel layout the kernel reads.
//!
//! A packed `A` block is a run of panels of `MR` rows (the kernel's tile
//! height): for each step `p` of the inner dimension, the `MR` values
//! `a[i, p]` side by side. A packed `B` block is a run of panels of `NR`
//! columns (the tile width): for each `p`, the `NR` values
//! `b[p, j]`. Rows or columns past the block's edge are zero, so the kernel
//! always computes whole tiles.

use super::KC;
use super::kernel::Kernel;
use ndarray::{ArrayView2, Axis};

/// Packs the `(mc, kc)` block `a` into `out` (at least `mc.div_ceil(MR) * MR * kc` long).
pub fn pack_a<K: Kernel<MR, NR>, const MR: usize, const NR: usize>(kernel: K, a: ArrayView2<f32>, out: &mut [f32]) {
    pack_panels::<K, MR, NR, MR>(kernel, a, out);
}

/// Packs the `(kc, nc)` block `b` into `out` (at least `nc.div_ceil(NR) * NR * kc` long).
///
/// Panels of `NR` columns of `b` are panels of `NR` rows of `b^T`, so this is
/// [`pack_a`]'s layout for the transposed view.
pub fn pack_b<K: Kernel<MR, NR>, const MR: usize, const NR: usize>(kernel: K, b: ArrayView2<f32>, out: &mut [f32]) {
    pack_panels::<K, MR, NR, NR>(kernel, b.reversed_axes(), out);
}

/// Packs the `(rows, depth)` block `x` into panels of `W` rows: for each step
/// `p` of the depth, the `W` values `x[i, p]` side by side, zeros past the
/// last row.
fn pack_panels<K: Kernel<MR, NR>, const MR: usize, const NR: usize, const W: usize>(
    kernel: K,
    x: ArrayView2<f32>,
    out: &mut [f32],
) {
    let (rows, depth) = x.dim();
    let panel_len = W * depth;
    let out = &mut out[..rows.div_ceil(W) * panel_len];
    if x.strides()[0] == 1 {
        // Each step's values are contiguous (the layout the kernel wants): each
        // panel takes a run of every step. Panel by panel, so the writes are
        // sequential (step by step, the panels' equal strides would alias in
        // the L1 cache).
        let steps = lines(x.axis_iter(Axis(1)).map(|c| c.to_slice().expect("unit stride")));
        for (t, panel) in out.chunks_exact_mut(panel_len).enumerate() {
            let run = t * W..((t + 1) * W).min(rows);
            for (step, dst) in steps[..depth].iter().zip(panel.chunks_exact_mut(W)) {
                copy_padded::<W>(&step[run.clone()], dst);
            }
        }
    } else {
        for (panel, block) in out.chunks_exact_mut(panel_len).zip(x.axis_chunks_iter(Axis(0), W)) {
            let valid = block.nrows();
            if block.strides()[1] == 1 {
                // Each row is contiguous (`W^T` in a forward, row-major
                // activations): a transpose, one value from each row per step.
                let row_slices: [&[f32]; W] = std::array::from_fn(|r| {
                    if r < valid { block.row(r).to_slice().expect("unit stride row") } else { &[] }
                });
                kernel.transpose_into::<W>(&row_slices, depth, panel);
            } else {
                for (p, dst) in panel.chunks_exact_mut(W).enumerate() {
                    for (r, d) in dst.iter_mut().enumerate() {
                        *d = if r < valid { block[(r, p)] } else { 0.0 };
                    }
                }
            }
        }
    }
}

/// `dst = values` followed by zeros; `dst` is `W` long.
#[inline(always)]
fn copy_padded<const W: usize>(values: &[f32], dst: &mut [f32]) {
    let dst: &mut [f32; W] = dst.try_into().expect("a step of W values");
    match <&[f32; W]>::try_from(values) {
        // The whole-step case is a fixed-size copy the compiler inlines.
        Ok(whole) => *dst = *whole,
        Err(_) => {
            dst[..values.len()].copy_from_slice(values);
            dst[values.len()..].fill(0.0);
        }
    }
}

/// Up to [`KC`] line slices of a block, gathered once so the packing loops
/// index them instead of rebuilding a view per step.
fn lines<'a>(mut iter: impl Iterator<Item = &'a [f32]>) -> [&'a [f32]; KC] {
    std::array::from_fn(|_| iter.next().unwrap_or_default())
}
