//! One training step of the reference model (784-1024-1024-1024-10, batch 128,
//! Adam) under SVP and under backpropagation, plus the step-vs-GEMM breakdown.
//!
//! Everything is timed on a thread of the rayon pool, where `svp_train::fit`
//! runs its steps.

use criterion::{Criterion, criterion_group, criterion_main};
use std::time::Duration;
use svp_benches::{GemmOperands, SHAPES, StepBench};
use svp_train::Method;

fn steps(c: &mut Criterion) {
    let mut group = c.benchmark_group("step");
    group.sample_size(30).measurement_time(Duration::from_secs(8));
    for (name, method) in [("svp", Method::Svp), ("bp", Method::Bp)] {
        let mut bench = StepBench::new(method);
        bench.step();
        group.bench_function(name, |b| b.iter_custom(|iters| bench.timed(iters)));
    }
    group.finish();
}

/// Prints each step's time against the time its GEMMs took inside that same
/// step (the GEMM clock of svp-tensor), and against the same shapes run alone,
/// with warm caches (the same operands call after call) and with cold ones
/// (32 MB written between calls, as a step moves every other layer's
/// weights, gradients and moments between two uses of a layer's weights).
/// The difference is the non-GEMM overhead: norms, activations, losses,
/// projection regeneration, optimizer.
///
/// The host is shared and other work only ever adds time, so each figure is
/// the fastest of several rounds, and the rounds alternate steps and isolated
/// GEMMs so that all see the same conditions.
fn overhead(_c: &mut Criterion) {
    const ROUNDS: usize = 15;
    const STEPS: u64 = 20;
    let per_call = |d: Duration, n: u64| d.as_secs_f64() / n as f64;
    let mut evict = vec![0.0f32; 8 << 20];
    for (name, method) in [("svp", Method::Svp), ("bp", Method::Bp)] {
        let mut bench = StepBench::new(method);
        let mut gemms: Vec<GemmOperands> = SHAPES.iter().map(|&s| GemmOperands::new(s)).collect();
        bench.timed(5);
        let (mut step, mut in_situ, mut calls, mut update) = (f64::INFINITY, f64::INFINITY, 0, 0.0);
        let mut warm = vec![f64::INFINITY; SHAPES.len()];
        let mut cold = vec![f64::INFINITY; SHAPES.len()];
        for _ in 0..ROUNDS {
            svp_tensor::reset_gemm_clock();
            svp_optim::reset_update_clock();
            let t = per_call(bench.timed(STEPS), STEPS);
            let (gemm, n) = svp_tensor::gemm_clock();
            if t < step {
                (step, in_situ, calls) = (t, per_call(gemm, STEPS), n / STEPS);
                update = per_call(svp_optim::update_clock(), STEPS);
            }
            for ((w, c), ops) in warm.iter_mut().zip(cold.iter_mut()).zip(&mut gemms) {
                *w = w.min(per_call(ops.timed(10), 10));
                *c = c.min(per_call(ops.timed_cold(5, &mut evict), 5));
            }
        }
        let per_step = |times: &[f64]| -> f64 {
            SHAPES
                .iter()
                .zip(times)
                .map(|(s, t)| t * if method == Method::Svp { s.per_svp_step } else { s.per_bp_step } as f64)
                .sum()
        };
        let (warm, cold) = (per_step(&warm), per_step(&cold));
        let share = |gemm: f64| format!("{:.3} ms = {:.1} %", (step - gemm) * 1e3, 100.0 * (step - gemm) / step);
        println!(
            "overhead/{name}: step {:.3} ms, optimizer {:.3} ms; its {calls} GEMMs inside the step {:.3} ms, \
             alone {:.3} ms (warm caches), {:.3} ms (cold)",
            step * 1e3,
            update * 1e3,
            in_situ * 1e3,
            warm * 1e3,
            cold * 1e3,
        );
        println!(
            "overhead/{name}: non-GEMM time against the GEMMs alone, warm: {}; cold: {}; inside the step: {}",
            share(warm),
            share(cold),
            share(in_situ)
        );
    }
}

criterion_group!(benches, steps, overhead);
criterion_main!(benches);
