//! A run that does not fit its memory budget fails before it has written
//! that memory (Linux: the process's peak resident set is read from /proc).
//! One test in this binary: the peak is the whole process's.

use svp_alloc::CountingAlloc;
use svp_integration_tests::small_config;
use svp_train::{Method, try_fit_with};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc::new();

#[cfg(target_os = "linux")]
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let value = status.lines().find_map(|l| l.strip_prefix(field)).expect("the field");
    value.trim().trim_end_matches("kB").trim().parse().expect("kB")
}

/// 784-4096-4096-4096-10 with Adam at batch 6,000 reserves about 1.3 GiB
/// (weights and moments 0.45 GiB, a few 94 MiB activation buffers, 137 MiB
/// similarity matrices); under a 600 MiB budget it fails part way through
/// reserving, and the resident set does not grow by what was reserved
/// before the refusal (with buffers filled as they were reserved, as before
/// this test, it grew by about 600 MiB).
#[cfg(target_os = "linux")]
#[test]
fn a_run_over_its_budget_fails_before_touching_its_memory() {
    let data = svp_data::DataSplit::embedded();
    let mut config = small_config(Method::Svp, 1);
    config.model.hidden = vec![4096; 3];
    config.train.batch_size = 6000;
    let budget = 600 << 20;
    // Reset the peak to the resident set now (Linux 4.0+: "5" to clear_refs).
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak resident set");
    let before = status_kib("VmHWM:");
    ALLOC.set_budget(ALLOC.stats().live + budget);
    let outcome = try_fit_with(&config, &data, &mut (), Default::default());
    ALLOC.set_budget(0);
    let refused = outcome.err().expect("1.3 GiB does not fit 600 MiB");
    let grew = status_kib("VmHWM:") - before;
    eprintln!("refused {} bytes for {}; peak resident set grew by {grew} KiB", refused.bytes, refused.what);
    assert!(ALLOC.refused() >= 1);
    assert!(grew < 32 * 1024, "the refused run touched {grew} KiB");
}
