//! The reference model's non-GEMM layer work at batch 128: LayerNorm's fused
//! forward (bias, normalization, ReLU) and backward over a 128 x 1024 output,
//! on the rayon pool as a training step runs them.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::time::Instant;
use svp_benches::on_pool;
use svp_nn::{Activation, layer_norm};

fn layer_norm(c: &mut Criterion) {
    let (rows, d) = (128, 1024);
    let wave = |i: usize, salt: usize| (((i * 7919 + salt * 104_729) % 2003) as f32 - 1001.0) * 1e-3;
    let mut z: Vec<f32> = (0..rows * d).map(|i| wave(i, 1)).collect();
    let bias: Vec<f32> = (0..d).map(|i| wave(i, 2)).collect();
    let gamma: Vec<f32> = (0..d).map(|i| 1.0 + wave(i, 3)).collect();
    let beta: Vec<f32> = (0..d).map(|i| wave(i, 4)).collect();
    let mut rstd = vec![0.0; rows];
    let mut out = vec![0.0; rows * d];
    let dout: Vec<f32> = (0..rows * d).map(|i| wave(i, 5)).collect();
    let mut dy = dout.clone();
    let (mut dgamma, mut dbeta, mut dbias) = (vec![0.0; d], vec![0.0; d], vec![0.0; d]);
    let mut scratch = vec![0.0; layer_norm::backward_scratch_len(rows, d)];
    let act = Activation::Relu;

    let mut group = c.benchmark_group("layer_norm 128x1024");
    group.throughput(Throughput::Elements((rows * d) as u64));
    // Normalizing the normalized values again keeps them the same size.
    group.bench_function("forward", |b| {
        b.iter_custom(|iters| {
            on_pool(|| {
                let start = Instant::now();
                for _ in 0..iters {
                    layer_norm::forward(&mut z, Some(&bias), &gamma, &beta, act, &mut rstd, &mut out);
                }
                start.elapsed()
            })
        })
    });
    // The backward turns `dy` into the input gradient in place, so each
    // iteration first restores it (a 512 KiB copy, inside the time).
    group.bench_function("backward", |b| {
        b.iter_custom(|iters| {
            on_pool(|| {
                let start = Instant::now();
                for _ in 0..iters {
                    dy.copy_from_slice(&dout);
                    layer_norm::backward(
                        &z,
                        &rstd,
                        &gamma,
                        &beta,
                        act,
                        &mut dy,
                        &mut dgamma,
                        &mut dbeta,
                        Some(&mut dbias),
                        &mut scratch,
                    );
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, layer_norm);
criterion_main!(benches);
