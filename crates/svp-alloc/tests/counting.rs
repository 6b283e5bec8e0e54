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

    // A budget refuses what would exceed it; fallible allocations see an error.
    let live = ALLOC.stats().live;
    ALLOC.set_budget(live + (1 << 20));
    let small = svp_alloc::try_zeros(1000, "small").expect("fits");
    let err = svp_alloc::try_zeros(1 << 20, "the big buffer").unwrap_err();
    assert_eq!(err.bytes, 4 << 20);
    assert_eq!(err.to_string(), "out of memory: need 4194304 bytes for the big buffer");
    assert_eq!(ALLOC.refused(), 1);
    // Past the budget, an allocation outside the fallible constructors is
    // granted (refusing it would abort the process) and counted.
    let overdrawn = ALLOC.overdrawn();
    let bookkeeping: Vec<u8> = vec![7; 2 << 20];
    assert_eq!(bookkeeping[(2 << 20) - 1], 7);
    assert_eq!(ALLOC.overdrawn(), overdrawn + 1);
    drop(bookkeeping);
    // A zeroed buffer is zeros, however large, and fits a budget it fits.
    let zeros = svp_alloc::try_zeroed::<u16>(300_000, "zeros").expect("fits");
    assert!(zeros.len() == 300_000 && zeros.iter().all(|&v| v == 0));
    assert!(svp_alloc::try_zeroed::<u16>(0, "nothing").expect("empty").is_empty());
    let err = svp_alloc::try_zeroed::<u64>(usize::MAX / 4, "an impossible buffer").unwrap_err();
    assert_eq!(err.bytes, usize::MAX);
    drop(zeros);
    ALLOC.set_budget(0);
    assert!(svp_alloc::try_zeros(1 << 20, "after the budget").is_ok());
    drop(small);
}
