//! The allocator installed for real, as a binary would.

use svp_alloc::CountingAlloc;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc::new();

#[test]
fn counts_live_peak_largest_and_calls() {
    // One test in this binary, so no other thread allocates meanwhile.
    let start = ALLOC.stats();
    ALLOC.reset_peaks();
    let a: Vec<u8> = vec![1; 1 << 20];
    let b: Vec<u64> = vec![2; 1000];
    let mid = ALLOC.stats();
    assert_eq!(mid.live - start.live, (1 << 20) + 8000);
    assert_eq!(mid.allocations, 2);
    assert_eq!(mid.largest, 1 << 20);
    drop(a);
    let after = ALLOC.stats();
    assert_eq!(after.live - start.live, 8000);
    assert!(after.peak >= start.live + (1 << 20) + 8000, "peak remembers");
    // realloc: growing counts as an allocation of the new size.
    let mut c: Vec<u8> = Vec::with_capacity(10);
    c.extend_from_slice(&[0; 10]);
    ALLOC.reset_peaks();
    c.reserve_exact(5000);
    assert_eq!(ALLOC.stats().allocations, 1);
    assert!(ALLOC.stats().largest >= 5010);
    // The memory the allocator hands out is real and writable.
    let mut big = vec![0u32; 100_000];
    big.iter_mut().enumerate().for_each(|(i, v)| *v = i as u32);
    assert_eq!(big[99_999], 99_999);
    let zeroed = vec![0u8; 4096];
    assert!(zeroed.iter().all(|&x| x == 0));
    drop((b, c, big, zeroed));
}
