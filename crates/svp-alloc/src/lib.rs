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
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts what passes through to [`System`].
#[derive(Debug)]
pub struct CountingAlloc {
    live: AtomicUsize,
    peak: AtomicUsize,
    allocations: AtomicUsize,
    largest: AtomicUsize,
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
        }
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

    fn added(&self, size: usize) {
        let live = self.live.fetch_add(size, Ordering::Relaxed) + size;
        self.peak.fetch_max(live, Ordering::Relaxed);
        self.allocations.fetch_add(1, Ordering::Relaxed);
        self.largest.fetch_max(size, Ordering::Relaxed);
    }

    fn removed(&self, size: usize) {
        self.live.fetch_sub(size, Ordering::Relaxed);
    }
}

impl Default for CountingAlloc {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every method forwards the caller's pointer and layout unchanged to
// `System`, which upholds the `GlobalAlloc` contract; the bookkeeping is plain
// atomic arithmetic that never allocates, never touches the returned memory and
// cannot unwind. Counts are updated only when `System` succeeded (non-null), so
// `removed` always matches an earlier `added` of the same size.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees (non-zero size layout).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            self.added(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            self.added(layout.size());
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
        // SAFETY: the caller's pointer and layout come from this allocator, and
        // `new_size` obeys the `GlobalAlloc::realloc` contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            self.removed(layout.size());
            self.added(new_size);
        }
        p
    }
}
