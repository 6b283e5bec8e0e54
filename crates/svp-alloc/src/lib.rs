//! A global allocator that counts.
//!
//! [`CountingAlloc`] forwards every request to the system allocator and keeps,
//! in relaxed atomics: bytes live now, the peak of bytes live, the number of
//! allocations, and the largest single allocation since the last
//! [`CountingAlloc::reset_peaks`]. A binary opts in with
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: svp_alloc::CountingAlloc = svp_alloc::CountingAlloc::new();
//! ```
//!
//! svp uses it to measure training memory from inside (`svp memory`, `svp
//! train`'s final report) and to prove that a training step allocates nothing.

#![warn(missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts what passes through to [`System`].
///
/// With a budget set ([`CountingAlloc::set_budget`]), a buffer asked for
/// through this crate's fallible constructors ([`try_zeros`], [`try_zeroed`],
/// [`try_filled`]) that would take the live bytes over it is refused, as a
/// device with that much RAM would refuse it: the constructor returns
/// [`OutOfMemory`]. Every other allocation (a `String`, a small `Vec` of
/// bookkeeping) is granted even past the budget, and counted
/// ([`CountingAlloc::overdrawn`]): refusing it could only abort the process,
/// and the buffers that size a run all go through the fallible constructors.
#[derive(Debug)]
pub struct CountingAlloc {
    live: AtomicUsize,
    peak: AtomicUsize,
    allocations: AtomicUsize,
    largest: AtomicUsize,
    budget: AtomicUsize,
    refused: AtomicUsize,
    overdrawn: AtomicUsize,
}

thread_local! {
    /// Set while this thread asks for a buffer that may be refused.
    static REFUSABLE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with this thread's allocations refusable by the budget.
fn refusable<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            REFUSABLE.with(|r| r.set(self.0));
        }
    }
    let _reset = Reset(REFUSABLE.with(|r| r.replace(true)));
    f()
}

/// A snapshot of a [`CountingAlloc`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Bytes allocated and not yet freed.
    pub live: usize,
    /// Most bytes live at once since the last reset.
    pub peak: usize,
    /// Allocations (and growing reallocations) since the last reset.
    pub allocations: usize,
    /// Largest single allocation since the last reset.
    pub largest: usize,
}

impl CountingAlloc {
    /// A counter at zero.
    pub const fn new() -> Self {
        Self {
            live: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            allocations: AtomicUsize::new(0),
            largest: AtomicUsize::new(0),
            budget: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            overdrawn: AtomicUsize::new(0),
        }
    }

    /// Refuses a fallible buffer that would take the live bytes over `bytes`
    /// (0: no budget).
    pub fn set_budget(&self, bytes: usize) {
        self.budget.store(bytes, Ordering::Relaxed);
    }

    /// The budget in bytes (0: none).
    pub fn budget(&self) -> usize {
        self.budget.load(Ordering::Relaxed)
    }

    /// Allocations refused for the budget so far.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }

    /// Allocations granted past the budget so far (not through a fallible
    /// constructor, so not refusable).
    pub fn overdrawn(&self) -> usize {
        self.overdrawn.load(Ordering::Relaxed)
    }

    /// Reserves `size` bytes of the budget; false (and nothing reserved) if
    /// that would exceed it and the request may be refused.
    fn reserve(&self, size: usize) -> bool {
        let live = self.live.fetch_add(size, Ordering::Relaxed) + size;
        let budget = self.budget.load(Ordering::Relaxed);
        if budget != 0 && live > budget {
            // A thread being torn down has no flag left: its allocations are
            // not the fallible constructors'.
            if REFUSABLE.try_with(Cell::get).unwrap_or(false) {
                self.live.fetch_sub(size, Ordering::Relaxed);
                self.refused.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            self.overdrawn.fetch_add(1, Ordering::Relaxed);
        }
        self.peak.fetch_max(live, Ordering::Relaxed);
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.largest.fetch_max(size, Ordering::Relaxed);
        true
    }

    /// The counters now.
    pub fn stats(&self) -> AllocStats {
        AllocStats {
            live: self.live.load(Ordering::Relaxed),
            peak: self.peak.load(Ordering::Relaxed),
            allocations: self.allocations.load(Ordering::Relaxed),
            largest: self.largest.load(Ordering::Relaxed),
        }
    }

    /// Restarts the peak at the live bytes, and the allocation count and
    /// largest allocation at zero.
    pub fn reset_peaks(&self) {
        self.peak.store(self.live.load(Ordering::Relaxed), Ordering::Relaxed);
        self.allocations.store(0, Ordering::Relaxed);
        self.largest.store(0, Ordering::Relaxed);
    }

    fn removed(&self, size: usize) {
        self.live.fetch_sub(size, Ordering::Relaxed);
    }
}

/// A fallible allocation failed: the device is out of memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutOfMemory {
    /// Bytes asked for.
    pub bytes: usize,
    /// What they were for.
    pub what: &'static str,
}

impl std::fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "out of memory: need {} bytes for {}", self.bytes, self.what)
    }
}

impl std::error::Error for OutOfMemory {}

/// `len` zeros, allocated fallibly: an error instead of an abort when the
/// memory (or the device budget) is not there. See [`try_zeroed`].
pub fn try_zeros(len: usize, what: &'static str) -> Result<Vec<f32>, OutOfMemory> {
    try_zeroed(len, what)
}

/// Element types whose all-zero bytes are a valid value (zero).
pub trait Zeroed: Copy + private::Sealed {}

impl Zeroed for f32 {}
impl Zeroed for f64 {}
impl Zeroed for u8 {}
impl Zeroed for u16 {}
impl Zeroed for u32 {}
impl Zeroed for u64 {}

mod private {
    /// Only this crate names the types [`super::Zeroed`] may be.
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for u8 {}
    impl Sealed for u16 {}
    impl Sealed for u32 {}
    impl Sealed for u64 {}
}

/// `len` zeros, allocated fallibly and without touching the memory: a large
/// buffer is zero pages the system commits only when a step first writes
/// them. So a run reserves all its buffers, each counted against the budget,
/// before any of them takes real memory: one that cannot fit fails at its
/// reservation, not after filling the machine with the buffers before it.
///
/// Buffers of a few MiB and more (weights, gradients, optimizer moments: what
/// a training step streams through) are backed by transparent huge pages
/// where the OS offers them ([`huge_pages`]).
pub fn try_zeroed<T: Zeroed>(len: usize, what: &'static str) -> Result<Vec<T>, OutOfMemory> {
    let out_of_memory = || OutOfMemory { bytes: len.saturating_mul(size_of::<T>()), what };
    let layout = std::alloc::Layout::array::<T>(len).map_err(|_| out_of_memory())?;
    if layout.size() == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: `layout` has a non-zero size (checked above), as `alloc_zeroed`
    // requires.
    let ptr = refusable(|| unsafe { std::alloc::alloc_zeroed(layout) }).cast::<T>();
    if ptr.is_null() {
        return Err(out_of_memory());
    }
    // Before the first touch, so that the page faults can take huge pages.
    huge_pages::advise(ptr.cast(), layout.size());
    // SAFETY: `ptr` comes from the global allocator (which `Vec` frees with)
    // for `Layout::array::<T>(len)`: T's alignment and exactly `len *
    // size_of::<T>()` bytes, at most `isize::MAX` (`Layout::array` checks), so
    // a capacity of `len` describes the allocation. The allocation is zeroed,
    // and all-zero bytes are a valid `T` for every `Zeroed` type (the sealed
    // trait admits only floats and unsigned integers), so all `len` elements
    // are initialized.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// `len` copies of `value`, allocated fallibly (see [`try_zeros`]); unlike
/// [`try_zeroed`], the memory is touched (filled) at once.
pub fn try_filled<T: Clone>(len: usize, value: T, what: &'static str) -> Result<Vec<T>, OutOfMemory> {
    let mut v: Vec<T> = Vec::new();
    refusable(|| v.try_reserve_exact(len))
        .map_err(|_| OutOfMemory { bytes: len.saturating_mul(size_of::<T>()), what })?;
    // Before the first touch, so that the page faults can take huge pages.
    huge_pages::advise(v.as_ptr().cast(), len * size_of::<T>());
    v.resize(len, value);
    Ok(v)
}

/// Transparent huge pages for large buffers.
///
/// Adam's update streams four arrays of every layer through the cache each
/// step. With 4 KiB pages that is a TLB miss every 1,024 floats per stream,
/// and the hardware prefetchers stop at every page boundary; with 2 MiB pages
/// neither happens (the README has the measurement).
pub mod huge_pages {
    /// The huge page size the advice is aligned to (x86-64's and arm64's
    /// with 4 KiB base pages; a multiple of every base page size).
    pub const HUGE_PAGE: usize = 2 << 20;

    /// Asks the kernel to back the whole 2 MiB blocks inside `len` bytes at
    /// `ptr` with huge pages. Advice only: the memory's contents and mapping
    /// do not change, and where huge pages are off (or on other systems than
    /// Linux) nothing happens.
    pub fn advise(ptr: *const u8, len: usize) {
        let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
        let end = (ptr as usize).saturating_add(len) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            madvise_hugepage(start, end - start);
        }
    }

    #[cfg(target_os = "linux")]
    fn madvise_hugepage(start: usize, len: usize) {
        use std::ffi::{c_int, c_void};
        /// `MADV_HUGEPAGE` (asm-generic/mman-common.h, the same on every Linux architecture).
        const MADV_HUGEPAGE: c_int = 14;
        unsafe extern "C" {
            fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int;
        }
        // SAFETY: madvise(2) with MADV_HUGEPAGE only marks the range as
        // eligible for huge pages; it never changes the contents, the mapping
        // or the protection of the memory, so no Rust reference into it is
        // affected. The range is page-aligned (2 MiB is a multiple of every
        // base page size) and lies inside an allocation the caller owns. The
        // call cannot fail in a way that matters: an error (THP compiled out,
        // EINVAL on an old kernel) leaves ordinary pages, which is ignored.
        let _ = unsafe { madvise(start as *mut c_void, len, MADV_HUGEPAGE) };
    }

    #[cfg(not(target_os = "linux"))]
    fn madvise_hugepage(_start: usize, _len: usize) {}
}

impl Default for CountingAlloc {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every method forwards the caller's pointer and layout unchanged to
// `System`, which upholds the `GlobalAlloc` contract, or returns null, which
// the contract allows for any request. The bookkeeping is plain atomic
// arithmetic and one read of a `const`-initialized thread-local `Cell<bool>`
// (no lazy initialization, no destructor, read with `try_with`, which does not
// panic): it never allocates, never touches the memory and cannot unwind.
// Bytes are reserved before `System` is asked and released if it fails, so
// every `removed` matches an earlier reservation of the same size.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !self.reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's guarantees (non-zero size layout).
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            self.removed(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !self.reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            self.removed(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller passes a pointer this allocator (hence `System`)
        // returned, with the layout it was allocated with.
        unsafe { System.dealloc(ptr, layout) };
        self.removed(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Reserve the new size while the old block still counts: a device
        // needs both during the copy.
        if !self.reserve(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's pointer and layout come from this allocator, and
        // `new_size` obeys the `GlobalAlloc::realloc` contract. On failure the
        // old block stays valid and counted.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            self.removed(new_size);
        } else {
            self.removed(layout.size());
        }
        p
    }
}
