//! One training step of the reference model (784-1024-1024-1024-10, batch 128,
//! Adam) under SVP and under backpropagation, plus the step-vs-GEMM breakdown.

use criterion::{Criterion, criterion_group, criterion_main};
use std::time::{Duration, Instant};
use svp_benches::{GemmOperands, SHAPES, StepBench};
use svp_train::Method;

fn steps(c: &mut Criterion) {
    let mut group = c.benchmark_group("step");
    group.sample_size(30).measurement_time(Duration::from_secs(8));
    for (name, method) in [("svp", Method::Svp), ("bp", Method::Bp)] {
        let mut bench = StepBench::new(method);
        bench.step();
        group.bench_function(name, |b| b.iter(|| bench.step()));
    }
    group.finish();
}

/// Median wall time of `f` over `reps` runs after a warm-up.
fn median(reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..reps / 5 + 1 {
        f();
    }
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

/// Prints each step's time against the time its GEMMs took inside that same
/// step (the GEMM clock of svp-tensor), and against the same shapes run alone.
/// The difference is the non-GEMM overhead: norms, activations, losses,
/// projection regeneration, optimizer.
fn overhead(_c: &mut Criterion) {
    let isolated: Vec<f64> = SHAPES
        .iter()
        .map(|&s| {
            let mut ops = GemmOperands::new(s);
            median(200, || ops.run())
        })
        .collect();
    for (name, method) in [("svp", Method::Svp), ("bp", Method::Bp)] {
        let mut bench = StepBench::new(method);
        for _ in 0..10 {
            bench.step();
        }
        let steps = 100;
        svp_tensor::reset_gemm_clock();
        let start = Instant::now();
        for _ in 0..steps {
            bench.step();
        }
        let step = start.elapsed().as_secs_f64() / steps as f64;
        let (gemm, calls) = svp_tensor::gemm_clock();
        let in_situ = gemm.as_secs_f64() / steps as f64;
        let alone: f64 = SHAPES
            .iter()
            .zip(&isolated)
            .map(|(s, t)| t * if method == Method::Svp { s.per_svp_step } else { s.per_bp_step } as f64)
            .sum();
        println!(
            "overhead/{name}: step {:.3} ms; its {} GEMMs alone {:.3} ms (inside the step {:.3} ms); \
             non-GEMM {:.3} ms = {:.1} % of the step",
            step * 1e3,
            calls / steps,
            alone * 1e3,
            in_situ * 1e3,
            (step - alone) * 1e3,
            100.0 * (step - alone) / step
        );
    }
}

criterion_group!(benches, steps, overhead);
criterion_main!(benches);
