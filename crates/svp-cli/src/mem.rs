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

/// Limits this process's heap to what it holds now plus what the system can
/// still give without swapping (`MemAvailable`), or plus `cap` bytes if that
/// is less: past it, fallible allocations fail cleanly instead of being
/// granted lazily and the process killed when the pages are touched.
pub fn limit_heap_to_available(cap: Option<usize>) {
    let available = proc_field_kib("/proc/meminfo", "MemAvailable:").map(|kib| (kib as usize).saturating_mul(1024));
    if let Some(bytes) = [available, cap].into_iter().flatten().min() {
        crate::ALLOC.set_budget(crate::ALLOC.stats().live.saturating_add(bytes));
    }
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
