//! One training step (batch 128, Adam) of the CNN (`models/cnn-fmnist.toml`)
//! and of the ViT (`models/vit-fmnist.toml`, SVP+ in units of two blocks),
//! under SVP and under backpropagation.

use criterion::{Criterion, criterion_group, criterion_main};
use std::time::Duration;
use svp_benches::{StepBench, cnn_config, vit_config};
use svp_train::Method;

fn vision_steps(c: &mut Criterion) {
    let mut group = c.benchmark_group("vision-step");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    for (net, config) in [("cnn", cnn_config()), ("vit", vit_config())] {
        for (rule, method) in [("svp", Method::Svp), ("bp", Method::Bp)] {
            let mut bench = StepBench::with_config(method, config.clone());
            bench.step();
            group.bench_function(format!("{net}/{rule}"), |b| b.iter_custom(|iters| bench.timed(iters)));
        }
    }
    group.finish();
}

criterion_group!(benches, vision_steps);
criterion_main!(benches);
