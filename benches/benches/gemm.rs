//! Every GEMM shape of one step of the reference model: svp's GEMM on the
//! rayon pool, and on one thread beside matrixmultiply on one thread.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use svp_benches::{GemmOperands, SHAPES};

fn gemm_shapes(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm");
    for &shape in SHAPES {
        let mut ops = GemmOperands::new(shape);
        group.throughput(Throughput::Elements((2 * shape.m * shape.k * shape.n) as u64));
        group.bench_function(shape.name, |b| b.iter_custom(|iters| ops.timed(iters)));
    }
    group.finish();
}

/// The reference the kernel has to match: matrixmultiply (with its AVX-512
/// kernel where the CPU has one), both on one thread.
fn against_matrixmultiply(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm-1-thread");
    for &shape in SHAPES {
        let mut ops = GemmOperands::new(shape);
        group.throughput(Throughput::Elements((2 * shape.m * shape.k * shape.n) as u64));
        group.bench_function(format!("svp {}", shape.name), |b| b.iter(|| ops.run_serial()));
        group.bench_function(format!("matrixmultiply {}", shape.name), |b| b.iter(|| ops.run_matrixmultiply()));
    }
    group.finish();
}

criterion_group!(benches, gemm_shapes, against_matrixmultiply);
criterion_main!(benches);
