//! General matrix multiply: packed panels, a register-tiled kernel, and a
//! deterministic split over the rayon pool.
//!
//! The loop nest is the classic one (Goto and van de Geijn): blocks of `B`
//! (`KC x NC`) and of `A` (`MC x KC`) are packed into per-thread buffers of a
//! fixed size, and the kernel computes `MR x NR` tiles from them. The buffers
//! are allocated once per thread and reused by every later call, so after a
//! thread's first GEMM (or [`try_reserve_workspaces`]) a GEMM allocates nothing.

#[cfg(target_arch = "x86_64")]
mod avx512;
mod kernel;
mod pack;
mod sink;

pub use sink::{GradientSink, ProductSink, SINK_MAX_DEPTH, gemm_to_sink, gemm_to_sink_with_chunks};

use crate::cpu::{self, Isa};
use kernel::{Blend, Kernel};
use ndarray::{ArrayView2, ArrayViewMut2, Axis, s};
use std::cell::RefCell;
use std::sync::OnceLock;
#[cfg(feature = "clock")]
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicUsize, Ordering};
#[cfg(feature = "clock")]
use std::time::Duration;
use std::time::Instant;
use svp_alloc::{OutOfMemory, try_zeros};

/// Runs `$body` with `$kernel` bound to the kernel of `$isa` (a value of a
/// different type for each: the body is compiled once per kernel).
///
/// # Panics
/// If this CPU does not run `$isa` (callers pass [`cpu::selected`], or check).
macro_rules! with_kernel {
    ($isa:expr, |$kernel:ident| $body:expr) => {
        match $isa {
            #[cfg(target_arch = "x86_64")]
            $crate::cpu::Isa::Avx512 => {
                let $kernel = $crate::gemm::kernel::Avx512::new().expect("a CPU with AVX-512F");
                $body
            }
            #[cfg(target_arch = "x86_64")]
            $crate::cpu::Isa::Avx2 => {
                let $kernel = $crate::gemm::kernel::Avx2::new().expect("a CPU with AVX2 and FMA");
                $body
            }
            #[cfg(target_arch = "aarch64")]
            $crate::cpu::Isa::Neon => {
                let $kernel = $crate::gemm::kernel::Neon;
                $body
            }
            $crate::cpu::Isa::Portable => {
                let $kernel = $crate::gemm::kernel::Portable;
                $body
            }
            #[allow(unreachable_patterns)] // the arms above cover every kernel of some targets
            other => panic!("the {other} kernel does not run on this CPU"),
        }
    };
}
pub(crate) use with_kernel;

/// Wall time spent inside [`gemm`] since the last [`reset_gemm_clock`], in ns.
#[cfg(feature = "clock")]
static GEMM_NANOS: AtomicU64 = AtomicU64::new(0);
#[cfg(feature = "clock")]
static GEMM_CALLS: AtomicU64 = AtomicU64::new(0);

/// Wall time spent in [`gemm`] and [`gemm_to_sink`] calls, and their number,
/// since the last reset.
///
/// Only with the `clock` feature (the benches turn it on): a benchmark then
/// measures a training step's non-GEMM overhead in the same run as the step
/// itself, for two `Instant::now` per call.
#[cfg(feature = "clock")]
pub fn gemm_clock() -> (Duration, u64) {
    (Duration::from_nanos(GEMM_NANOS.load(Ordering::Relaxed)), GEMM_CALLS.load(Ordering::Relaxed))
}

/// Zeroes [`gemm_clock`].
#[cfg(feature = "clock")]
pub fn reset_gemm_clock() {
    GEMM_NANOS.store(0, Ordering::Relaxed);
    GEMM_CALLS.store(0, Ordering::Relaxed);
}

/// Starts timing one GEMM call for [`gemm_clock`].
#[inline(always)]
fn clock_start() -> Option<Instant> {
    #[cfg(feature = "clock")]
    return Some(Instant::now());
    #[cfg(not(feature = "clock"))]
    None
}

/// Ends timing a GEMM call started with [`clock_start`].
#[inline(always)]
fn clock_stop(start: Option<Instant>) {
    #[cfg(feature = "clock")]
    if let Some(start) = start {
        GEMM_NANOS.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        GEMM_CALLS.fetch_add(1, Ordering::Relaxed);
    }
    #[cfg(not(feature = "clock"))]
    let _ = start;
}

/// Below this many multiply-adds a GEMM runs as one call: splitting tiny
/// products (for example the `d' = 10` projections) costs more than it gains.
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// Narrowest column block worth a task of its own (one AVX-512 kernel width).
const MIN_CHUNK_COLS: usize = 16;

/// `c = alpha * a · b + beta * c`, shapes `(m, k) · (k, n) -> (m, n)`.
///
/// Any strides are accepted (pass `w.t()` for a transposed operand). Large
/// products are split by output rows or columns over the current rayon pool.
/// Runs on the kernel [`cpu::selected`] picked.
///
/// # Panics
/// If the shapes do not agree; shapes are fixed by the layer that calls this.
pub fn gemm(alpha: f32, a: ArrayView2<f32>, b: ArrayView2<f32>, beta: f32, c: ArrayViewMut2<f32>) {
    let chunks = pool_chunks(a.nrows(), a.ncols(), b.ncols());
    let start = clock_start();
    gemm_with_chunks(alpha, a, b, beta, c, chunks);
    clock_stop(start);
}

/// Pieces an `m x k x n` product is split into over the current rayon pool:
/// one below [`PARALLEL_MIN_MACS`], else a piece a thread, no narrower than
/// a tile's rows or [`MIN_CHUNK_COLS`] columns.
fn pool_chunks(m: usize, k: usize, n: usize) -> usize {
    let tile_rows = cpu::selected().gemm_tile().0;
    let pieces = (n / MIN_CHUNK_COLS).max(m / tile_rows);
    if m * n * k < PARALLEL_MIN_MACS { 1 } else { rayon::current_num_threads().min(pieces).max(1) }
}

/// [`gemm`] with an explicit number of pieces to split the output into
/// (1 = a single call on this thread).
///
/// Exposed so tests can prove the split never changes a bit of the result.
pub fn gemm_with_chunks(
    alpha: f32,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    beta: f32,
    c: ArrayViewMut2<f32>,
    chunks: usize,
) {
    gemm_with_chunks_on(cpu::selected(), alpha, a, b, beta, c, chunks);
}

/// [`gemm_with_chunks`] on the kernel `isa`, whatever [`cpu::selected`] says.
///
/// Exposed so tests can prove every kernel gives the same bits.
///
/// # Panics
/// If the shapes do not agree, or this CPU does not run `isa`.
pub fn gemm_with_chunks_on(
    isa: Isa,
    alpha: f32,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    beta: f32,
    c: ArrayViewMut2<f32>,
    chunks: usize,
) {
    assert_eq!(a.ncols(), b.nrows(), "gemm: inner dimensions differ");
    assert_eq!(c.dim(), (a.nrows(), b.ncols()), "gemm: output shape differs");
    assert!(isa.is_supported(), "gemm: the {isa} kernel does not run on this CPU");
    with_kernel!(isa, |kernel| split_product(kernel, alpha, a, b, Blend::Beta(beta), c, chunks.max(1)));
}

/// `c = a · b + bias`, `bias` added to every row (`bias[j]` to column `j`):
/// a linear map's forward. The same bits as filling each row of `c` with
/// `bias` and calling `gemm(1.0, a, b, 1.0, c)`, without writing `c` and
/// reading it back first. Split over the rayon pool as [`gemm`] is.
///
/// # Panics
/// If the shapes do not agree or `bias` is not `b.ncols()` long.
pub fn gemm_bias(a: ArrayView2<f32>, b: ArrayView2<f32>, bias: &[f32], c: ArrayViewMut2<f32>) {
    let chunks = pool_chunks(a.nrows(), a.ncols(), b.ncols());
    let start = clock_start();
    gemm_bias_with_chunks_on(cpu::selected(), a, b, bias, c, chunks);
    clock_stop(start);
}

/// [`gemm_bias`] on the kernel `isa`, in `chunks` pieces (tests prove
/// neither changes a bit).
///
/// # Panics
/// As [`gemm_bias`], or if this CPU does not run `isa`.
pub fn gemm_bias_with_chunks_on(
    isa: Isa,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    bias: &[f32],
    c: ArrayViewMut2<f32>,
    chunks: usize,
) {
    assert_eq!(a.ncols(), b.nrows(), "gemm: inner dimensions differ");
    assert_eq!(c.dim(), (a.nrows(), b.ncols()), "gemm: output shape differs");
    assert_eq!(bias.len(), b.ncols(), "gemm: one bias per output column");
    assert!(isa.is_supported(), "gemm: the {isa} kernel does not run on this CPU");
    with_kernel!(isa, |kernel| split_product(kernel, 1.0, a, b, Blend::Bias(bias), c, chunks.max(1)));
}

/// `panel[p * W + i] = lines[i][p]` for `p < len` (empty lines give
/// zeros): the packing's transpose on the kernel of `isa` (16x16 blocks in
/// registers on AVX-512), for [`crate::small`]'s copies of a transposed `B`.
///
/// # Panics
/// If this CPU does not run `isa`, or a line is shorter than `len`.
pub(crate) fn transpose_lines<const W: usize>(isa: Isa, lines: &[&[f32]; W], len: usize, panel: &mut [f32]) {
    with_kernel!(isa, |kernel| kernel.transpose_into::<W>(lines, len, panel));
}

/// Depth of a packed block: a `B` panel (`KC x NR`) stays in L1 beside the
/// `A` panel. The same for every kernel, so every kernel sums the same
/// blocks in the same order.
pub(crate) const KC: usize = 256;

/// Rows of a packed `A` block for a kernel `mr` rows tall.
const fn block_rows(mr: usize) -> usize {
    16 * mr
}

/// Columns of a packed `B` block for a kernel `nr` columns wide (`KC x NC`
/// floats: 1 MiB for AVX-512's, in L2).
const fn block_cols(nr: usize) -> usize {
    32 * nr
}

/// Floats of a thread's `A` and `B` packing buffers for a kernel's tile.
///
/// `B` holds a `KC x NC` block for [`gemm`], and at least a strip of
/// [`sink::SINK_BLOCK_COLS`] columns at a depth of [`sink::WHOLE_ROWS_DEPTH`]
/// for [`gemm_to_sink`], so that a weight gradient at batch 128 goes to the
/// optimizer in whole 1,024-wide rows with every kernel. AVX2 and AVX-512
/// blocks hold that already; the portable kernel's (256 KiB) and NEON's (384
/// KiB) grow to 512 KiB. (SSE2 build on the AVX2 machine, `fused_update`, two
/// alternating runs: the update from the GEMM 3.86 and 4.22 ms beyond the
/// GEMMs alone with half rows, 0.86 and 1.07 ms with whole ones.)
const fn buffer_lens((mr, nr): (usize, usize)) -> (usize, usize) {
    let strip = sink::WHOLE_ROWS_DEPTH * sink::SINK_BLOCK_COLS;
    let block = KC * block_cols(nr);
    (block_rows(mr) * KC, if block > strip { block } else { strip })
}

/// One thread's packing buffers, sized for every kernel this CPU runs (so a
/// test may switch kernels).
struct Workspace {
    a: Vec<f32>,
    b: Vec<f32>,
}

/// Floats of [`Workspace`]'s two buffers.
fn workspace_lens() -> (usize, usize) {
    static LENS: OnceLock<(usize, usize)> = OnceLock::new();
    *LENS.get_or_init(|| {
        Isa::supported()
            .into_iter()
            .map(|isa| buffer_lens(isa.gemm_tile()))
            .fold((0, 0), |(a, b), (ka, kb)| (a.max(ka), b.max(kb)))
    })
}

impl Workspace {
    fn new() -> Self {
        Self::try_new().expect("memory for GEMM packing buffers")
    }

    fn try_new() -> Result<Self, OutOfMemory> {
        let (a_len, b_len) = workspace_lens();
        let ws = Self { a: try_zeros(a_len, "GEMM packing buffers")?, b: try_zeros(b_len, "GEMM packing buffers")? };
        RESERVED_BYTES.fetch_add(workspace_bytes(), Ordering::Relaxed);
        Ok(ws)
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        RESERVED_BYTES.fetch_sub(workspace_bytes(), Ordering::Relaxed);
    }
}

thread_local! {
    static WORKSPACE: RefCell<Option<Workspace>> = const { RefCell::new(None) };
}

/// Bytes of packing buffers each thread that runs a GEMM keeps (about
/// 1.2 MiB on a CPU with AVX-512, 0.6 MiB elsewhere).
pub fn workspace_bytes() -> usize {
    let (a, b) = workspace_lens();
    (a + b) * size_of::<f32>()
}

/// Packing-buffer bytes held by all threads together.
static RESERVED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes of GEMM packing buffers the process holds now, over all threads.
pub fn workspace_bytes_reserved() -> usize {
    RESERVED_BYTES.load(Ordering::Relaxed)
}

/// Allocates the packing buffers ([`workspace_bytes`]) of the calling thread
/// and of every thread of the current rayon pool now, so that no later GEMM
/// allocates, failing cleanly when the memory is not there.
///
/// Trainers and inference workspaces call this when they are built; a GEMM on
/// a thread that has no buffers yet allocates them itself.
pub fn try_reserve_workspaces() -> Result<(), OutOfMemory> {
    let reserve = || {
        WORKSPACE.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(Workspace::try_new()?);
            }
            Ok(())
        })
    };
    reserve()?;
    rayon::broadcast(|_| reserve()).into_iter().collect()
}

/// Runs `f` with the calling thread's packing buffers.
fn with_workspace<R>(f: impl FnOnce(&mut Workspace) -> R) -> R {
    WORKSPACE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut slot) => f(slot.get_or_insert_with(Workspace::new)),
        // Unreachable today: a GEMM never runs another GEMM on its own thread.
        // Should that change, a private buffer keeps it correct.
        Err(_) => f(&mut Workspace::new()),
    })
}

/// `MR` row slices of `rows` (unit-stride rows), empty past its last row.
#[inline(always)]
fn row_slices<'a, const MR: usize>(rows: impl Iterator<Item = &'a mut [f32]>) -> [&'a mut [f32]; MR] {
    let mut rows = rows;
    std::array::from_fn(|_| rows.next().unwrap_or_default())
}

/// `c = alpha * a b` blended into `c` by `first` ([`Blend::Beta`] or
/// [`Blend::Bias`]) on the calling thread.
fn gemm_serial<K: Kernel<MR, NR>, const MR: usize, const NR: usize>(
    kernel: K,
    alpha: f32,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    first: Blend<'_>,
    mut c: ArrayViewMut2<f32>,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 || alpha == 0.0 {
        match first {
            Blend::Beta(0.0) => c.fill(0.0),
            Blend::Beta(beta) => c.map_inplace(|x| *x *= beta),
            Blend::Bias(bias) => fill_rows(&mut c, bias),
            Blend::Accumulate => {}
        }
        return;
    }
    if n < NR && n < m {
        // A narrow product (a projection to d' = 10 dimensions, a 10-class
        // head) would fill a third of each tile; its transpose fills nearly
        // all of one. Same bits either way (`Kernel::tile_product`). A bias
        // runs along the transpose's columns, so it goes into `c` first.
        let first = match first {
            Blend::Bias(bias) => {
                fill_rows(&mut c, bias);
                Blend::Beta(1.0)
            }
            other => other,
        };
        let c = c.reversed_axes();
        with_workspace(|ws| packed_product(kernel, alpha, b.reversed_axes(), a.reversed_axes(), first, c, ws));
    } else {
        with_workspace(|ws| packed_product(kernel, alpha, a, b, first, c, ws));
    }
}

/// Every row of `c` set to `values`.
fn fill_rows(c: &mut ArrayViewMut2<f32>, values: &[f32]) {
    for mut row in c.rows_mut() {
        row.iter_mut().zip(values).for_each(|(d, &v)| *d = v);
    }
}

/// `first` for columns `range` of the output: a bias's part of them.
fn first_for_columns<'a>(first: Blend<'a>, range: std::ops::Range<usize>) -> Blend<'a> {
    match first {
        Blend::Bias(bias) => Blend::Bias(&bias[range]),
        other => other,
    }
}

/// The blocked loop nest of [`gemm_serial`] for non-empty operands.
fn packed_product<K: Kernel<MR, NR>, const MR: usize, const NR: usize>(
    kernel: K,
    alpha: f32,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    first: Blend<'_>,
    mut c: ArrayViewMut2<f32>,
    ws: &mut Workspace,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    let (mc_max, nc_max) = (block_rows(MR), block_cols(NR));
    for jc in (0..n).step_by(nc_max) {
        let nc = nc_max.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            pack::pack_b(kernel, b.slice(s![pc..pc + kc, jc..jc + nc]), &mut ws.b);
            let blend = if pc == 0 { first_for_columns(first, jc..jc + nc) } else { Blend::Accumulate };
            for ic in (0..m).step_by(mc_max) {
                let mc = mc_max.min(m - ic);
                pack::pack_a(kernel, a.slice(s![ic..ic + mc, pc..pc + kc]), &mut ws.a);
                let block = c.slice_mut(s![ic..ic + mc, jc..jc + nc]);
                block_product(kernel, kc, &ws.a, &ws.b, alpha, blend, block);
            }
        }
    }
}

/// All tiles of one packed `A` block times one packed `B` block, into `c`.
fn block_product<K: Kernel<MR, NR>, const MR: usize, const NR: usize>(
    kernel: K,
    kc: usize,
    a: &[f32],
    b: &[f32],
    alpha: f32,
    blend: Blend<'_>,
    mut c: ArrayViewMut2<f32>,
) {
    let (mc, nc) = c.dim();
    let a_panels = a[..mc.div_ceil(MR) * MR * kc].chunks_exact(MR * kc);
    let b_panels = &b[..nc.div_ceil(NR) * NR * kc];
    let unit_columns = c.strides()[1] == 1;
    for (a_panel, mut rows) in a_panels.zip(c.axis_chunks_iter_mut(Axis(0), MR)) {
        if unit_columns {
            let mut rows =
                row_slices::<MR>(rows.axis_iter_mut(Axis(0)).map(|r| r.into_slice().expect("unit stride row")));
            for (t, b_panel) in b_panels.chunks_exact(NR * kc).enumerate() {
                kernel.tile_into(kc, a_panel, b_panel, &mut rows, t * NR, alpha, blend);
            }
        } else {
            for (t, b_panel) in b_panels.chunks_exact(NR * kc).enumerate() {
                let tile = kernel.tile_product(kc, a_panel, b_panel);
                let j0 = t * NR;
                let cols = NR.min(nc - j0);
                for (r, tile_row) in tile.iter().enumerate().take(rows.nrows()) {
                    for (j, &v) in tile_row.iter().enumerate().take(cols) {
                        blend.apply(alpha, v, &mut rows[(r, j0 + j)], j0 + j);
                    }
                }
            }
        }
    }
}

/// Splits the product into `chunks` pieces over the rayon pool: by rows when
/// the output is at least as tall as it is wide (a weight gradient: each
/// thread then owns whole rows of it, which is how the optimizer's parallel
/// pass splits the same buffer next), else by columns (a batch-by-features
/// output, where each thread packs only its part of the weights).
fn split_product<K: Kernel<MR, NR>, const MR: usize, const NR: usize>(
    kernel: K,
    alpha: f32,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    first: Blend<'_>,
    c: ArrayViewMut2<f32>,
    chunks: usize,
) {
    let (m, n) = c.dim();
    let left_chunks = chunks / 2;
    if chunks > 1 && m >= n {
        // Whole tiles on each side.
        let split = (m * left_chunks / chunks) / MR * MR;
        if split > 0 {
            let (a_top, a_bottom) = a.split_at(Axis(0), split);
            let (c_top, c_bottom) = c.split_at(Axis(0), split);
            rayon::join(
                || split_product(kernel, alpha, a_top, b, first, c_top, left_chunks),
                || split_product(kernel, alpha, a_bottom, b, first, c_bottom, chunks - left_chunks),
            );
            return;
        }
    }
    if chunks <= 1 || n < 2 {
        gemm_serial(kernel, alpha, a, b, first, c);
        return;
    }
    let split = n * left_chunks / chunks;
    let (b_left, b_right) = b.split_at(Axis(1), split);
    let (c_left, c_right) = c.split_at(Axis(1), split);
    let (first_left, first_right) = (first_for_columns(first, 0..split), first_for_columns(first, split..n));
    rayon::join(
        || split_product(kernel, alpha, a, b_left, first_left, c_left, left_chunks),
        || split_product(kernel, alpha, a, b_right, first_right, c_right, chunks - left_chunks),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn filled(rows: usize, cols: usize, salt: u32) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            let x = (i as u32).wrapping_mul(2_654_435_761) ^ (j as u32).wrapping_mul(40_503) ^ salt;
            ((x % 2001) as f32 - 1000.0) / 997.0
        })
    }

    fn naive(a: &Array2<f32>, b: &Array2<f32>) -> Array2<f64> {
        Array2::from_shape_fn((a.nrows(), b.ncols()), |(i, j)| {
            (0..a.ncols()).map(|p| a[(i, p)] as f64 * b[(p, j)] as f64).sum()
        })
    }

    /// How an operand is laid out in memory.
    #[derive(Clone, Copy, Debug)]
    enum Layout {
        /// Row-major.
        Rows,
        /// Column-major (a transposed view, as `W^T`).
        Columns,
        /// Every other element of a wider row-major array (no unit stride).
        Strided,
        /// Row-major with the row order reversed (a negative stride).
        Reversed,
    }

    /// Storage holding `m` (a `rows x cols` matrix) in `layout`; `view_of` gives the view.
    fn stored(m: &Array2<f32>, layout: Layout) -> Array2<f32> {
        let (r, c) = m.dim();
        match layout {
            Layout::Rows => m.clone(),
            Layout::Columns => m.t().as_standard_layout().into_owned(),
            Layout::Strided => {
                Array2::from_shape_fn((r, 2 * c), |(i, j)| if j % 2 == 0 { m[(i, j / 2)] } else { f32::NAN })
            }
            Layout::Reversed => Array2::from_shape_fn((r, c), |(i, j)| m[(r - 1 - i, j)]),
        }
    }

    fn view_of(storage: &Array2<f32>, layout: Layout) -> ArrayView2<'_, f32> {
        match layout {
            Layout::Rows => storage.view(),
            Layout::Columns => storage.t(),
            Layout::Strided => storage.slice(s![.., ..;2]),
            Layout::Reversed => storage.slice(s![..;-1, ..]),
        }
    }

    /// Shapes that cross every blocking edge of the kernel `isa`: tiles
    /// (MR, NR), packed blocks (MC, KC, NC), the 16-step transpose, and
    /// narrow products that run transposed.
    fn shapes(isa: Isa) -> [(usize, usize, usize); 14] {
        let (mr, nr) = isa.gemm_tile();
        [
            (1, 1, 1),
            (3, 5, 7),
            (17, 33, 9),
            (13, 15, 33),
            (mr, 16, nr),
            (128, 784, 64),
            (64, 10, 130),
            (128, 1024, 10),
            (10, 128, 1024),
            (31, 257, 65),
            (block_rows(mr) + 5, KC + 17, block_cols(nr) + 40),
            (40, 2 * KC + 3, 20),
            (200, 3, 2 * nr + 1),
            (5, 300, 3),
        ]
    }

    fn assert_close(got: ArrayView2<f32>, want: &Array2<f64>, k: usize, what: &str) {
        let tol = 1e-4 * (k as f64).sqrt() * 4.0;
        for ((i, j), &g) in got.indexed_iter() {
            assert!((g as f64 - want[(i, j)]).abs() <= tol, "{what} at ({i},{j}): {g} vs {}", want[(i, j)]);
        }
    }

    /// Every kernel this CPU runs, against the naive product, over the
    /// shapes and every layout of every operand.
    #[test]
    fn matches_naive_reference_over_shapes_and_layouts() {
        let layouts = [Layout::Rows, Layout::Columns, Layout::Strided, Layout::Reversed];
        for isa in Isa::supported() {
            for (m, k, n) in shapes(isa) {
                matches_naive_reference(isa, m, k, n, layouts);
            }
        }
    }

    fn matches_naive_reference(isa: Isa, m: usize, k: usize, n: usize, layouts: [Layout; 4]) {
        let a = filled(m, k, 1);
        let b = filled(k, n, 2);
        let want = naive(&a, &b);
        for a_layout in layouts {
            for b_layout in layouts {
                let (a_store, b_store) = (stored(&a, a_layout), stored(&b, b_layout));
                let (av, bv) = (view_of(&a_store, a_layout), view_of(&b_store, b_layout));
                for c_columns in [false, true] {
                    // NaN in the output: beta = 0 must overwrite, never read.
                    let mut c_store = Array2::<f32>::from_elem(if c_columns { (n, m) } else { (m, n) }, f32::NAN);
                    let c = if c_columns { c_store.view_mut().reversed_axes() } else { c_store.view_mut() };
                    gemm_with_chunks_on(isa, 1.0, av, bv, 0.0, c, 1);
                    let c = if c_columns { c_store.t() } else { c_store.view() };
                    let what = format!("{isa}: {m}x{k}x{n} a {a_layout:?} b {b_layout:?} c columns {c_columns}");
                    assert_close(c, &want, k, &what);
                }
            }
        }
    }

    #[test]
    fn alpha_beta_and_empty_inner_dimension() {
        for &(m, k, n) in &[(20, 300, 50), (7, 3, 5), (40, 600, 9)] {
            let a = filled(m, k, 8);
            let b = filled(k, n, 9);
            let c0 = filled(m, n, 10);
            let ab = naive(&a, &b);
            for (alpha, beta) in [(0.5, 2.0), (-1.0, 1.0), (2.0, 0.0), (0.0, 3.0)] {
                let mut c = c0.clone();
                gemm(alpha, a.view(), b.view(), beta, c.view_mut());
                let want = Array2::from_shape_fn((m, n), |(i, j)| {
                    alpha as f64 * ab[(i, j)] + if beta == 0.0 { 0.0 } else { beta as f64 * c0[(i, j)] as f64 }
                });
                assert_close(c.view(), &want, k, &format!("{m}x{k}x{n} alpha {alpha} beta {beta}"));
            }
        }
        let a = Array2::<f32>::zeros((4, 0));
        let b = Array2::<f32>::zeros((0, 3));
        let mut c = Array2::<f32>::from_elem((4, 3), 5.0);
        gemm(1.0, a.view(), b.view(), 0.5, c.view_mut());
        assert!(c.iter().all(|&x| x == 2.5), "k = 0 leaves beta * c");
        gemm(1.0, a.view(), b.view(), 0.0, c.view_mut());
        assert!(c.iter().all(|&x| x == 0.0), "k = 0 with beta = 0 zeroes c");
    }

    /// Every kernel, and with it splits by rows and by columns, splits that
    /// leave narrow pieces (which run transposed) and pieces that straddle
    /// tiles, give the same bits as the portable kernel in one call, alpha
    /// and beta included.
    #[test]
    fn any_kernel_split_and_orientation_is_bit_identical() {
        // (m, k, n) and the largest split tried.
        let cases = [((70, 300, 45), 7), ((128, 1024, 100), 7), ((9, 40, 64), 7), ((128, 1024, 1000), 16)];
        for ((m, k, n), most) in cases {
            let a = filled(m, k, 11);
            let b = filled(k, n, 12);
            let c0 = filled(m, n, 13);
            let mut reference = c0.clone();
            gemm_with_chunks_on(Isa::Portable, 0.75, a.view(), b.view(), 0.5, reference.view_mut(), 1);
            for isa in Isa::supported() {
                for chunks in [1, 2, 3, 4, 7, 16].into_iter().filter(|&c| c <= most) {
                    let mut c = c0.clone();
                    gemm_with_chunks_on(isa, 0.75, a.view(), b.view(), 0.5, c.view_mut(), chunks);
                    let same = c.iter().zip(reference.iter()).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{m}x{k}x{n}: {isa} in {chunks} chunks changed the result");
                }
            }
        }
    }

    /// A bias blended in the kernel's epilogue gives the bits of the
    /// output filled with the bias and blended with `beta = 1`: every
    /// kernel, splits by rows and by columns (which split the bias), narrow
    /// products (which run transposed), several blocks deep, a transposed
    /// output (stored element by element), and an empty inner dimension.
    #[test]
    fn bias_in_the_epilogue_is_the_bias_filled_first() {
        for isa in Isa::supported() {
            let (mr, nr) = isa.gemm_tile();
            let shapes = [
                (1, 1, 1),
                (17, 33, 9),
                (9, 40, 200),
                (200, 3, 2 * nr + 1),
                (128, 2 * KC + 3, 100),
                (mr + 1, 5, 4),
                (6, 0, 5),
            ];
            for (m, k, n) in shapes {
                let a = filled(m, k, 21);
                let b = filled(k, n, 22);
                let bias: Vec<f32> = filled(1, n, 23).into_iter().collect();
                let mut want = Array2::from_shape_fn((m, n), |(_, j)| bias[j]);
                gemm_with_chunks_on(isa, 1.0, a.view(), b.view(), 1.0, want.view_mut(), 1);
                for chunks in [1, 2, 3, 7] {
                    let mut got = Array2::from_elem((m, n), f32::NAN);
                    gemm_bias_with_chunks_on(isa, a.view(), b.view(), &bias, got.view_mut(), chunks);
                    let same = got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{isa}: {m}x{k}x{n} in {chunks} chunks");
                }
                let mut got_t = Array2::from_elem((n, m), f32::NAN);
                gemm_bias_with_chunks_on(isa, a.view(), b.view(), &bias, got_t.view_mut().reversed_axes(), 1);
                let same = got_t.t().iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{isa}: {m}x{k}x{n} into a transposed output");
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    #[should_panic(expected = "does not run on this CPU")]
    fn refuses_a_kernel_the_cpu_lacks() {
        let a = Array2::<f32>::zeros((4, 4));
        let mut c = Array2::<f32>::zeros((4, 4));
        gemm_with_chunks_on(Isa::Neon, 1.0, a.view(), a.view(), 0.0, c.view_mut(), 1);
    }

    /// After a thread's buffers exist, a GEMM allocates nothing; measured in
    /// the integration tests with a counting allocator. Here: the reservation
    /// is idempotent and the buffers are the documented size.
    #[test]
    fn workspaces_are_reserved_once_at_their_documented_size() {
        try_reserve_workspaces().expect("memory");
        try_reserve_workspaces().expect("memory");
        let bytes = WORKSPACE.with(|w| {
            let w = w.borrow();
            let w = w.as_ref().expect("reserved");
            (w.a.len() + w.b.len()) * size_of::<f32>()
        });
        assert_eq!(bytes, workspace_bytes());
        let widest = Isa::supported().into_iter().map(|isa| buffer_lens(isa.gemm_tile())).max().expect("a kernel");
        assert_eq!(bytes, (widest.0 + widest.1) * size_of::<f32>(), "sized for the widest kernel");
        assert!(workspace_bytes_reserved() >= bytes);
    }

    #[test]
    fn transposed_operands_alpha_and_beta() {
        let a_t = filled(40, 24, 3); // a = a_t^T is 24 x 40
        let b = filled(40, 36, 4);
        let c0 = filled(24, 36, 5);
        let want = naive(&a_t.t().to_owned(), &b);
        let mut c = c0.clone();
        gemm(0.5, a_t.t(), b.view(), 2.0, c.view_mut());
        for ((i, j), &got) in c.indexed_iter() {
            let expect = 0.5 * want[(i, j)] + 2.0 * c0[(i, j)] as f64;
            assert!((got as f64 - expect).abs() < 1e-4, "({i},{j}): {got} vs {expect}");
        }
    }
}
