//! Large buffers are advised to the kernel as huge-page memory (Linux).

/// The `VmFlags` of the mapping of `/proc/self/smaps` that contains `addr`.
#[cfg(target_os = "linux")]
fn vm_flags_at(addr: usize) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        // A mapping's header starts "lo-hi perms ..."; its attributes "Name: ...".
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let (lo, hi) = (usize::from_str_radix(lo, 16).ok()?, usize::from_str_radix(hi, 16).ok()?);
            inside = (lo..hi).contains(&addr);
        } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
            return Some(flags.trim().to_owned());
        }
    }
    None
}

#[cfg(target_os = "linux")]
#[test]
fn large_buffers_are_advised_as_huge_pages_and_keep_their_contents() {
    use svp_alloc::huge_pages::HUGE_PAGE;
    let len = 3 * HUGE_PAGE / 4;
    let buf = svp_alloc::try_filled(len, 1.5f32, "a test buffer").unwrap();
    assert!(buf.len() == len && buf.iter().all(|&v| v == 1.5));
    if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
        eprintln!("this kernel has no transparent huge pages: nothing to check");
        return;
    }
    // The first whole 2 MiB block inside the buffer carries the advice ("hg").
    let block = (buf.as_ptr() as usize).next_multiple_of(HUGE_PAGE);
    let flags = vm_flags_at(block).expect("the buffer's mapping in /proc/self/smaps");
    assert!(flags.split_whitespace().any(|f| f == "hg"), "VmFlags: {flags}");
    // A small buffer is left alone.
    let small = svp_alloc::try_filled(1000, 0u16, "a small buffer").unwrap();
    assert!(small.iter().all(|&v| v == 0));
}
