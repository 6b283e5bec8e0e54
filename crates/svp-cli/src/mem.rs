//! Process memory as the operating system sees it (Linux `/proc`).

fn status_field_kib(pid: Option<u32>, field: &str) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Memory the system can still give without swapping (`MemAvailable` in
/// `/proc/meminfo`), in bytes, if known.
pub fn available_bytes() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
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
