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

/// Prints each step's time against the time its GEMMs take alone, with warm
/// caches (the same operands call after call) and with cold ones (32 MB
/// written between calls, as a step moves every other layer's weights,
/// gradients and moments between two uses of a layer's weights). The
/// difference is the non-GEMM overhead: norms, activations, losses,
/// projection regeneration, optimizer.
///
/// Each method runs twice: with dense weights updated from their gradient as
/// the GEMM hands it over (the default), and with the gradient stored first
/// (`Trainer::store_weight_gradients`; the same bits). For the second, the GEMM
/// clock of svp-tensor also gives the time inside the step's own GEMM calls;
/// for the first those calls include the weights' update.
///
/// The host is shared and other work only ever adds time, so each figure is
/// the fastest of several rounds, and the rounds alternate the steps and the
/// isolated GEMMs so that all see the same conditions.
fn overhead(_c: &mut Criterion) {
    const ROUNDS: usize = 15;
    const STEPS: u64 = 20;
    let per_call = |d: Duration, n: u64| d.as_secs_f64() / n as f64;
    let mut evict = vec![0.0f32; 8 << 20];
    for (name, method) in [("svp", Method::Svp), ("bp", Method::Bp)] {
        let mut benches = [StepBench::new(method), StepBench::new(method)];
        let stored = &mut benches[1];
        stored.trainer.store_weight_gradients(&stored.model).expect("memory for the stored gradient");
        let mut gemms: Vec<GemmOperands> = SHAPES.iter().map(|&s| GemmOperands::new(s)).collect();
        let mut step = [f64::INFINITY; 2];
        let (mut in_situ, mut calls, mut update) = ([0.0; 2], [0; 2], [0.0; 2]);
        let mut warm = vec![f64::INFINITY; SHAPES.len()];
        let mut cold = vec![f64::INFINITY; SHAPES.len()];
        for bench in &mut benches {
            bench.timed(5);
        }
        for _ in 0..ROUNDS {
            for (b, bench) in benches.iter_mut().enumerate() {
                svp_tensor::reset_gemm_clock();
                svp_optim::reset_update_clock();
                let t = per_call(bench.timed(STEPS), STEPS);
                let (gemm, n) = svp_tensor::gemm_clock();
                if t < step[b] {
                    (step[b], in_situ[b], calls[b]) = (t, per_call(gemm, STEPS), n / STEPS);
                    update[b] = per_call(svp_optim::update_clock(), STEPS);
                }
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
        println!("overhead/{name}: its GEMMs alone {:.3} ms (warm caches), {:.3} ms (cold)", warm * 1e3, cold * 1e3);
        for (b, way) in ["fused weight updates", "gradients stored"].into_iter().enumerate() {
            let step = step[b];
            let share = |gemm: f64| format!("{:.3} ms = {:.1} %", (step - gemm) * 1e3, 100.0 * (step - gemm) / step);
            let inside = if b == 1 {
                format!("; inside the step's {} GEMMs: {}", calls[b], share(in_situ[b]))
            } else {
                String::new()
            };
            println!(
                "overhead/{name}, {way}: step {:.3} ms (optimizer outside GEMMs {:.3} ms); non-GEMM time against \
                 the GEMMs alone, warm: {}; cold: {}{inside}",
                step * 1e3,
                update[b] * 1e3,
                share(warm),
                share(cold),
            );
        }
    }
}

criterion_group!(benches, steps, overhead);
criterion_main!(benches);
