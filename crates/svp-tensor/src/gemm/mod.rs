//! General matrix multiply: packed panels, a register-tiled kernel, and a
//! deterministic split over the rayon pool.
//!
//! The loop nest is the classic one (Goto and van de Geijn): blocks of `B`
//! (`KC x NC`) and of `A` (`MC x KC`) are packed into per-thread buffers of a
//! fixed size, and the kernel computes `MR x NR` tiles from them. The buffers
//! are allocated once per thread and reused by every later call, so after a
//! thread's first GEMM (or [`try_reserve_workspaces`]) a GEMM allocates nothing.

#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod avx512;
mod kernel;
mod pack;
mod sink;

pub use sink::{GradientSink, ProductSink, SINK_MAX_DEPTH, gemm_to_sink, gemm_to_sink_with_chunks};

use kernel::{Blend, MR, NR};
use ndarray::{ArrayView2, ArrayViewMut2, Axis, s};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use svp_alloc::{OutOfMemory, try_zeros};

/// Wall time spent inside [`gemm`] since the last [`reset_gemm_clock`], in ns.
static GEMM_NANOS: AtomicU64 = AtomicU64::new(0);
static GEMM_CALLS: AtomicU64 = AtomicU64::new(0);

/// Wall time spent in [`gemm`] calls, and their number, since the last reset.
///
/// The clock runs in every build (two `Instant::now` per call, tens of
/// nanoseconds against microseconds of GEMM), so a benchmark can measure a
/// training step's non-GEMM overhead in the same run as the step itself.
pub fn gemm_clock() -> (Duration, u64) {
    (Duration::from_nanos(GEMM_NANOS.load(Ordering::Relaxed)), GEMM_CALLS.load(Ordering::Relaxed))
}

/// Zeroes [`gemm_clock`].
pub fn reset_gemm_clock() {
    GEMM_NANOS.store(0, Ordering::Relaxed);
    GEMM_CALLS.store(0, Ordering::Relaxed);
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
///
/// # Panics
/// If the shapes do not agree; shapes are fixed by the layer that calls this.
pub fn gemm(alpha: f32, a: ArrayView2<f32>, b: ArrayView2<f32>, beta: f32, c: ArrayViewMut2<f32>) {
    let (m, k) = a.dim();
    let n = b.ncols();
    let pieces = (n / MIN_CHUNK_COLS).max(m / MR);
    let chunks = if m * n * k < PARALLEL_MIN_MACS { 1 } else { rayon::current_num_threads().min(pieces).max(1) };
    let start = Instant::now();
    gemm_with_chunks(alpha, a, b, beta, c, chunks);
    GEMM_NANOS.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    GEMM_CALLS.fetch_add(1, Ordering::Relaxed);
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
    assert_eq!(a.ncols(), b.nrows(), "gemm: inner dimensions differ");
    assert_eq!(c.dim(), (a.nrows(), b.ncols()), "gemm: output shape differs");
    split_product(alpha, a, b, beta, c, chunks.max(1));
}

/// Depth of a packed block: a `B` panel (`KC x NR`) stays in L1 beside the `A` panel.
pub(crate) const KC: usize = 256;
/// Rows of a packed `A` block.
const MC: usize = 16 * MR;
/// Columns of a packed `B` block (`KC x NC` floats, 1 MiB, stays in L2).
const NC: usize = 32 * NR;

/// One thread's packing buffers, sized for the largest block.
struct Workspace {
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Workspace {
    fn new() -> Self {
        Self::try_new().expect("memory for GEMM packing buffers")
    }

    fn try_new() -> Result<Self, OutOfMemory> {
        let ws = Self {
            a: try_zeros(MC * KC, "GEMM packing buffers")?,
            b: try_zeros(B_BUFFER_LEN, "GEMM packing buffers")?,
        };
        RESERVED_BYTES.fetch_add(WORKSPACE_BYTES, Ordering::Relaxed);
        Ok(ws)
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        RESERVED_BYTES.fetch_sub(WORKSPACE_BYTES, Ordering::Relaxed);
    }
}

thread_local! {
    static WORKSPACE: RefCell<Option<Workspace>> = const { RefCell::new(None) };
}

/// Bytes of packing buffers each thread that runs a GEMM keeps.
pub const WORKSPACE_BYTES: usize = (MC * KC + B_BUFFER_LEN) * size_of::<f32>();

/// Floats of a thread's `B` packing buffer: a `KC x NC` block for [`gemm`],
/// and at least a strip of [`sink::SINK_BLOCK_COLS`] columns at a depth of
/// [`sink::WHOLE_ROWS_DEPTH`] for [`gemm_to_sink`], so that a weight
/// gradient at batch 128 goes to the optimizer in whole 1,024-wide rows on
/// every target. AVX2 and AVX-512 blocks hold that already; SSE2's (256 KiB)
/// and NEON's (384 KiB) grow to 512 KiB. (SSE2 build on the AVX2 machine,
/// `fused_update`, two alternating runs: the update from the GEMM 3.86 and
/// 4.22 ms beyond the GEMMs alone with half rows, 0.86 and 1.07 ms with
/// whole ones.)
pub(crate) const B_BUFFER_LEN: usize = {
    let strip = sink::WHOLE_ROWS_DEPTH * sink::SINK_BLOCK_COLS;
    if KC * NC > strip { KC * NC } else { strip }
};

/// Packing-buffer bytes held by all threads together.
static RESERVED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes of GEMM packing buffers the process holds now, over all threads.
pub fn workspace_bytes_reserved() -> usize {
    RESERVED_BYTES.load(Ordering::Relaxed)
}

/// Allocates the packing buffers ([`WORKSPACE_BYTES`]) of the calling thread
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

/// `c = alpha * a b + beta * c` on the calling thread.
fn gemm_serial(alpha: f32, a: ArrayView2<f32>, b: ArrayView2<f32>, beta: f32, mut c: ArrayViewMut2<f32>) {
    let (m, k) = a.dim();
    let n = b.ncols();
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 || alpha == 0.0 {
        if beta == 0.0 {
            c.fill(0.0);
        } else {
            c.map_inplace(|x| *x *= beta);
        }
        return;
    }
    if n < NR && n < m {
        // A narrow product (a projection to d' = 10 dimensions, a 10-class
        // head) would fill a third of each tile; its transpose fills nearly
        // all of one. Same bits either way (`kernel::tile_product`).
        let c = c.reversed_axes();
        with_workspace(|ws| packed_product(alpha, b.reversed_axes(), a.reversed_axes(), beta, c, ws));
    } else {
        with_workspace(|ws| packed_product(alpha, a, b, beta, c, ws));
    }
}

/// The blocked loop nest of [`gemm_serial`] for non-empty operands.
fn packed_product(
    alpha: f32,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    beta: f32,
    mut c: ArrayViewMut2<f32>,
    ws: &mut Workspace,
) {
    let (m, k) = a.dim();
    let n = b.ncols();
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            pack::pack_b(b.slice(s![pc..pc + kc, jc..jc + nc]), &mut ws.b);
            let blend = if pc == 0 { Blend::Beta(beta) } else { Blend::Accumulate };
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                pack::pack_a(a.slice(s![ic..ic + mc, pc..pc + kc]), &mut ws.a);
                let block = c.slice_mut(s![ic..ic + mc, jc..jc + nc]);
                block_product(kc, &ws.a, &ws.b, alpha, blend, block);
            }
        }
    }
}

/// All tiles of one packed `A` block times one packed `B` block, into `c`.
fn block_product(kc: usize, a: &[f32], b: &[f32], alpha: f32, blend: Blend, mut c: ArrayViewMut2<f32>) {
    let (mc, nc) = c.dim();
    let a_panels = a[..mc.div_ceil(MR) * MR * kc].chunks_exact(MR * kc);
    let b_panels = &b[..nc.div_ceil(NR) * NR * kc];
    let unit_columns = c.strides()[1] == 1;
    for (a_panel, mut rows) in a_panels.zip(c.axis_chunks_iter_mut(Axis(0), MR)) {
        if unit_columns {
            let mut row_iter = rows.axis_iter_mut(Axis(0)).map(|r| r.into_slice().expect("unit stride row"));
            let mut row_slices: [&mut [f32]; MR] = std::array::from_fn(|_| row_iter.next().unwrap_or_default());
            for (t, b_panel) in b_panels.chunks_exact(NR * kc).enumerate() {
                kernel::tile_into(kc, a_panel, b_panel, &mut row_slices, t * NR, alpha, blend);
            }
        } else {
            for (t, b_panel) in b_panels.chunks_exact(NR * kc).enumerate() {
                let tile = kernel::tile_product(kc, a_panel, b_panel);
                let j0 = t * NR;
                let cols = NR.min(nc - j0);
                for (r, tile_row) in tile.iter().enumerate().take(rows.nrows()) {
                    for (j, &v) in tile_row.iter().enumerate().take(cols) {
                        blend.apply(alpha, v, &mut rows[(r, j0 + j)]);
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
fn split_product(alpha: f32, a: ArrayView2<f32>, b: ArrayView2<f32>, beta: f32, c: ArrayViewMut2<f32>, chunks: usize) {
    let (m, n) = c.dim();
    let left_chunks = chunks / 2;
    if chunks > 1 && m >= n {
        // Whole tiles on each side.
        let split = (m * left_chunks / chunks) / MR * MR;
        if split > 0 {
            let (a_top, a_bottom) = a.split_at(Axis(0), split);
            let (c_top, c_bottom) = c.split_at(Axis(0), split);
            rayon::join(
                || split_product(alpha, a_top, b, beta, c_top, left_chunks),
                || split_product(alpha, a_bottom, b, beta, c_bottom, chunks - left_chunks),
            );
            return;
        }
    }
    if chunks <= 1 || n < 2 {
        gemm_serial(alpha, a, b, beta, c);
        return;
    }
    let split = n * left_chunks / chunks;
    let (b_left, b_right) = b.split_at(Axis(1), split);
    let (c_left, c_right) = c.split_at(Axis(1), split);
    rayon::join(
        || split_product(alpha, a, b_left, beta, c_left, left_chunks),
        || split_product(alpha, a, b_right, beta, c_right, chunks - left_chunks),
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

    /// Shapes that cross every blocking edge: tiles (MR, NR), packed blocks
    /// (MC, KC, NC), the 16-step transpose, and narrow products that run transposed.
    const SHAPES: [(usize, usize, usize); 14] = [
        (1, 1, 1),
        (3, 5, 7),
        (17, 33, 9),
        (13, 15, 33),
        (12, 16, 32),
        (128, 784, 64),
        (64, 10, 130),
        (128, 1024, 10),
        (10, 128, 1024),
        (31, 257, 65),
        (MC + 5, KC + 17, NC + 40),
        (40, 2 * KC + 3, 20),
        (200, 3, 2 * NR + 1),
        (5, 300, 3),
    ];

    fn assert_close(got: ArrayView2<f32>, want: &Array2<f64>, k: usize, what: &str) {
        let tol = 1e-4 * (k as f64).sqrt() * 4.0;
        for ((i, j), &g) in got.indexed_iter() {
            assert!((g as f64 - want[(i, j)]).abs() <= tol, "{what} at ({i},{j}): {g} vs {}", want[(i, j)]);
        }
    }

    #[test]
    fn matches_naive_reference_over_shapes_and_layouts() {
        let layouts = [Layout::Rows, Layout::Columns, Layout::Strided, Layout::Reversed];
        for &(m, k, n) in &SHAPES {
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
                        gemm_with_chunks(1.0, av, bv, 0.0, c, 1);
                        let c = if c_columns { c_store.t() } else { c_store.view() };
                        let what = format!("{m}x{k}x{n} a {a_layout:?} b {b_layout:?} c columns {c_columns}");
                        assert_close(c, &want, k, &what);
                    }
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

    /// Splits by rows and by columns, splits that leave narrow pieces (which
    /// run transposed) and pieces that straddle tiles give the same bits as
    /// one call.
    #[test]
    fn any_split_and_orientation_is_bit_identical() {
        // (m, k, n) and the largest split tried.
        let cases = [((70, 300, 45), 7), ((128, 1024, 100), 7), ((9, 40, 64), 7), ((128, 1024, 1000), 16)];
        for ((m, k, n), most) in cases {
            let splits = [2, 3, 4, 7, 16].into_iter().filter(|&c| c <= most);
            let a = filled(m, k, 11);
            let b = filled(k, n, 12);
            let mut reference = Array2::<f32>::zeros((m, n));
            gemm_with_chunks(1.0, a.view(), b.view(), 0.0, reference.view_mut(), 1);
            for chunks in splits {
                let mut c = Array2::<f32>::zeros((m, n));
                gemm_with_chunks(1.0, a.view(), b.view(), 0.0, c.view_mut(), chunks);
                let same = c.iter().zip(reference.iter()).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{m}x{k}x{n}: {chunks} chunks changed the result");
            }
        }
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
        assert_eq!(bytes, WORKSPACE_BYTES);
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
