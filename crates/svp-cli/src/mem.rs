//! Process memory as the operating system sees it (Linux `/proc`).

/// The value of `field` (a line's prefix, such as `VmHWM:`) in a `/proc`
/// file whose values are in kB.
fn proc_field_kib(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn status_field_kib(pid: Option<u32>, field: &str) -> Option<u64> {
    match pid {
        Some(p) => proc_field_kib(&format!("/proc/{p}/status"), field),
        None => proc_field_kib("/proc/self/status", field),
    }
}

/// The share of the memory the system has available that a run takes by
/// default, so that the rest of the machine keeps working beside it.
pub const DEFAULT_SHARE: (usize, usize) = (3, 4);

/// How much heap a run may take beyond what this process holds now.
#[derive(Clone, Copy, Debug)]
pub enum Budget {
    /// [`DEFAULT_SHARE`] of what the system had available (bytes).
    Default(usize),
    /// What `--max-memory` asked for (bytes).
    Asked(usize),
    /// What the system had available, where `--max-memory` asked for more.
    Available(usize),
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: usize| b as f64 / 1048576.0;
        match *self {
            Budget::Default(b) => write!(
                f,
                "the {:.1} MiB a run may take ({}/{} of the memory available; --max-memory sets it)",
                mib(b),
                DEFAULT_SHARE.0,
                DEFAULT_SHARE.1
            ),
            Budget::Asked(b) => write!(f, "--max-memory {} MiB", b >> 20),
            Budget::Available(b) => write!(f, "the {:.1} MiB the system has available", mib(b)),
        }
    }
}

/// Limits the buffers this process reserves from now on to `cap` bytes, or
/// by default to [`DEFAULT_SHARE`] of what the system can still give without
/// swapping (`MemAvailable`), whichever is less: past it, a buffer is refused
/// when it is reserved ([`svp_alloc::try_zeroed`]), before it is written,
/// instead of being granted and the process killed when the pages are
/// touched. Returns the budget (`None` where the system does not say what
/// it has available and no cap was given).
pub fn limit_heap_to_available(cap: Option<usize>) -> Option<Budget> {
    let available = proc_field_kib("/proc/meminfo", "MemAvailable:").map(|kib| (kib as usize).saturating_mul(1024));
    let budget = match (cap, available) {
        (Some(c), Some(a)) if a < c => Budget::Available(a),
        (Some(c), _) => Budget::Asked(c),
        (None, Some(a)) => Budget::Default(a / DEFAULT_SHARE.1 * DEFAULT_SHARE.0),
        (None, None) => return None,
    };
    let bytes = match budget {
        Budget::Default(b) | Budget::Asked(b) | Budget::Available(b) => b,
    };
    // A budget of 0 would mean none at all.
    crate::ALLOC.set_budget(crate::ALLOC.stats().live.saturating_add(bytes).max(1));
    Some(budget)
}

/// Peak resident set size of this process in KiB (`VmHWM`), if known.
pub fn peak_rss_kib() -> Option<u64> {
    status_field_kib(None, "VmHWM:")
}

/// Resident set size of this process now, in KiB (`VmRSS`), if known.
pub fn current_rss_kib() -> Option<u64> {
    status_field_kib(None, "VmRSS:")
}

/// Peak resident set size of another (live) process in KiB.
pub fn peak_rss_kib_of(pid: u32) -> Option<u64> {
    status_field_kib(Some(pid), "VmHWM:")
}
