//! Copies blocks of the operands into the panel layout the kernel reads.
//!
//! A packed `A` block is a run of panels of [`MR`] rows: for each step `p` of
//! the inner dimension, the `MR` values `a[i, p]` side by side. A packed `B`
//! block is a run of panels of [`NR`] columns: for each `p`, the `NR` values
//! `b[p, j]`. Rows or columns past the block's edge are zero, so the kernel
//! always computes whole tiles.

use super::KC;
use super::kernel::{MR, NR, transpose_into};
use ndarray::{ArrayView2, Axis};

/// Packs the `(mc, kc)` block `a` into `out` (at least `mc.div_ceil(MR) * MR * kc` long).
pub fn pack_a(a: ArrayView2<f32>, out: &mut [f32]) {
    let (mc, kc) = a.dim();
    let panel_len = MR * kc;
    let out = &mut out[..mc.div_ceil(MR) * panel_len];
    if a.strides()[0] == 1 {
        // Columns are contiguous (a transposed view): each panel takes a run
        // of every column. Panel by panel, so the writes are sequential.
        let columns = lines(a.axis_iter(Axis(1)).map(|c| c.to_slice().expect("unit stride column")));
        for (t, panel) in out.chunks_exact_mut(panel_len).enumerate() {
            let rows = t * MR..((t + 1) * MR).min(mc);
            for (column, dst) in columns[..kc].iter().zip(panel.chunks_exact_mut(MR)) {
                copy_padded::<MR>(&column[rows.clone()], dst);
            }
        }
    } else {
        for (panel, rows) in out.chunks_exact_mut(panel_len).zip(a.axis_chunks_iter(Axis(0), MR)) {
            let valid = rows.nrows();
            if rows.strides()[1] == 1 {
                // A transpose: gather one value from each row per step.
                let row_slices: [&[f32]; MR] =
                    std::array::from_fn(
                        |r| if r < valid { rows.row(r).to_slice().expect("unit stride row") } else { &[] },
                    );
                transpose_into::<MR>(&row_slices, kc, panel);
            } else {
                for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
                    for (r, d) in dst.iter_mut().enumerate() {
                        *d = if r < valid { rows[(r, p)] } else { 0.0 };
                    }
                }
            }
        }
    }
}

/// Packs the `(kc, nc)` block `b` into `out` (at least `nc.div_ceil(NR) * NR * kc` long).
pub fn pack_b(b: ArrayView2<f32>, out: &mut [f32]) {
    let (kc, nc) = b.dim();
    let panel_len = NR * kc;
    let out = &mut out[..nc.div_ceil(NR) * panel_len];
    if b.strides()[1] == 1 {
        // Rows are contiguous: each panel takes a run of every row. Panel by
        // panel, so the writes are sequential (row by row, the panels' equal
        // strides would alias in the L1 cache).
        let rows = lines(b.axis_iter(Axis(0)).map(|r| r.to_slice().expect("unit stride row")));
        for (t, panel) in out.chunks_exact_mut(panel_len).enumerate() {
            let columns = t * NR..((t + 1) * NR).min(nc);
            for (row, dst) in rows[..kc].iter().zip(panel.chunks_exact_mut(NR)) {
                copy_padded::<NR>(&row[columns.clone()], dst);
            }
        }
    } else {
        for (panel, columns) in out.chunks_exact_mut(panel_len).zip(b.axis_chunks_iter(Axis(1), NR)) {
            let valid = columns.ncols();
            if columns.strides()[0] == 1 {
                // Columns are contiguous (a transposed view such as `W^T`).
                let column_slices: [&[f32]; NR] = std::array::from_fn(|j| {
                    if j < valid { columns.column(j).to_slice().expect("unit stride column") } else { &[] }
                });
                transpose_into::<NR>(&column_slices, kc, panel);
            } else {
                for (p, dst) in panel.chunks_exact_mut(NR).enumerate() {
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d = if j < valid { columns[(p, j)] } else { 0.0 };
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
