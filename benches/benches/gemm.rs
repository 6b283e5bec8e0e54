//! Every GEMM shape of one step of the reference model.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use svp_benches::{GemmOperands, SHAPES};

fn gemm_shapes(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm");
    for &shape in SHAPES {
        let mut ops = GemmOperands::new(shape);
        group.throughput(Throughput::Elements((2 * shape.m * shape.k * shape.n) as u64));
        group.bench_function(shape.name, |b| b.iter(|| ops.run()));
    }
    group.finish();
}

criterion_group!(benches, gemm_shapes);
criterion_main!(benches);
