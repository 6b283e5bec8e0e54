//! A zeroed buffer takes no memory until it is written (Linux).

/// This process's resident set in KiB.
#[cfg(target_os = "linux")]
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("a VmRSS line");
    line.trim().trim_end_matches("kB").trim().parse().expect("a number of kB")
}

/// What lets a run that cannot fit fail before it fills the machine: its
/// buffers are reserved (and counted) first, and only a step commits them.
#[cfg(target_os = "linux")]
#[test]
fn a_zeroed_buffer_is_committed_only_when_written() {
    const LEN: usize = 64 << 20; // 256 MiB of f32
    let before = rss_kib();
    let mut buf = svp_alloc::try_zeros(LEN, "a large buffer").expect("256 MiB of address space");
    let reserved = rss_kib();
    assert!(reserved < before + 16 * 1024, "reserving took {} KiB", reserved - before);
    // Reads see zeros; writing a quarter commits about a quarter.
    assert!(buf.iter().step_by(4096).all(|&v| v == 0.0));
    buf[..LEN / 4].fill(1.0);
    let written = rss_kib();
    assert!(written >= reserved + 60 * 1024, "writing 64 MiB took only {} KiB", written - reserved);
    assert!(buf[LEN / 4 - 1] == 1.0 && buf[LEN / 4] == 0.0);
}
