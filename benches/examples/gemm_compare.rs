//! A quick table of svp's GEMM against matrixmultiply for every step shape
//! (best of several alternating runs; criterion's `gemm-1-thread` group in
//! `benches/gemm.rs` is the careful version):
//!
//! `cargo run --release -p svp-benches --example gemm_compare`

use std::time::Instant;
use svp_benches::{GemmOperands, SHAPES};

/// Fastest of `reps` runs of `f`, in seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    println!("{:<24} {:>12} {:>16} {:>12}", "shape", "svp 1 thread", "matrixmultiply", "svp pool");
    for &shape in SHAPES {
        let mut ops = GemmOperands::new(shape);
        let flop = 2.0 * (shape.m * shape.k * shape.n) as f64;
        let reps = (4e9 / flop).clamp(4.0, 400.0) as usize;
        let (mut serial, mut mm, mut pool) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            serial = serial.min(best(reps, || ops.run_serial()));
            mm = mm.min(best(reps, || ops.run_matrixmultiply()));
            pool = pool.min(best(reps, || ops.run()));
        }
        let gflops = |t: f64| flop / t / 1e9;
        println!("{:<24} {:>12.1} {:>16.1} {:>12.1}   GFLOP/s", shape.name, gflops(serial), gflops(mm), gflops(pool));
    }
}
