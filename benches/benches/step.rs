//! One training step of the reference model (784-1024-1024-1024-10, batch 128,
//! Adam) under SVP and under backpropagation, plus the step-vs-GEMM breakdown.
//!
//! Everything is timed on a thread of the rayon pool, where `svp_train::fit`
//! runs its steps.

use criterion::{Criterion, criterion_group, criterion_main};
use std::time::Duration;
use svp_benches::{GemmOperands, GemmShape, SHAPES, StepBench};
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
/// caches (the same operands a second time in a row) and with cold ones (32
/// MB written before the call, as a step moves every other layer's weights,
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
/// The host is shared, and it changes speed (every GEMM up to a third faster
/// or slower) from one second to the next. So the measurement is a run of
/// pairs: a step of each way (each after an untimed step of its own, as
/// training runs them back to back), then every GEMM shape of the step,
/// warm and cold, right after it. Each pair's share compares times taken
/// within a fraction of a second of each other; the medians over the pairs
/// are the figures to read. The fastest step against the fastest GEMMs is
/// printed too, but on this host the two can come from different speeds.
fn overhead(_c: &mut Criterion) {
    const PAIRS: usize = 100;
    let secs = |d: Duration| d.as_secs_f64();
    let mut evict = vec![0.0f32; 8 << 20];
    for (name, method) in [("svp", Method::Svp), ("bp", Method::Bp)] {
        let per_step = |s: &GemmShape| if method == Method::Svp { s.per_svp_step } else { s.per_bp_step } as f64;
        let mut benches = [StepBench::new(method), StepBench::new(method)];
        let stored = &mut benches[1];
        stored.trainer.store_weight_gradients(&stored.model).expect("memory for the stored gradient");
        let mut gemms: Vec<GemmOperands> = SHAPES.iter().map(|&s| GemmOperands::new(s)).collect();
        for bench in &mut benches {
            bench.timed(5);
        }
        let mut pairs = Vec::with_capacity(PAIRS);
        for _ in 0..PAIRS {
            let mut pair = Pair::default();
            for (b, bench) in benches.iter_mut().enumerate() {
                bench.timed(1);
                svp_tensor::reset_gemm_clock();
                svp_optim::reset_update_clock();
                pair.step[b] = secs(bench.timed(1));
                pair.inside[b] = secs(svp_tensor::gemm_clock().0);
                pair.update[b] = secs(svp_optim::update_clock());
            }
            for ops in &mut gemms {
                ops.timed(1);
                pair.warm.push(secs(ops.timed(1)));
                pair.cold.push(secs(ops.timed_cold(1, &mut evict)));
            }
            pairs.push(pair);
        }
        let step_gemms = |times: &[f64]| -> f64 { SHAPES.iter().zip(times).map(|(s, t)| per_step(s) * t).sum() };
        let fastest_gemms = |pick: fn(&Pair) -> &[f64]| -> f64 {
            let fastest: Vec<f64> =
                (0..SHAPES.len()).map(|i| pairs.iter().map(|p| pick(p)[i]).fold(f64::INFINITY, f64::min)).collect();
            step_gemms(&fastest)
        };
        let (warm, cold) = (fastest_gemms(|p| &p.warm), fastest_gemms(|p| &p.cold));
        println!(
            "overhead/{name}: its GEMMs alone {:.3} ms (warm caches), {:.3} ms (cold); fastest of {PAIRS}",
            warm * 1e3,
            cold * 1e3
        );
        for (b, way) in ["fused weight updates", "gradients stored"].into_iter().enumerate() {
            let fastest = pairs.iter().min_by(|p, q| p.step[b].total_cmp(&q.step[b])).expect("pairs");
            let step = fastest.step[b];
            let share = |gemm: f64| format!("{:.3} ms = {:.1} %", (step - gemm) * 1e3, 100.0 * (step - gemm) / step);
            println!(
                "overhead/{name}, {way}: fastest step {:.3} ms (optimizer outside GEMMs {:.3} ms); non-GEMM time \
                 against the fastest GEMMs alone, warm: {}; cold: {}",
                step * 1e3,
                fastest.update[b] * 1e3,
                share(warm),
                share(cold),
            );
            let median_share = |share: &dyn Fn(&Pair) -> f64| {
                let mut shares: Vec<f64> = pairs.iter().map(share).collect();
                shares.sort_by(f64::total_cmp);
                let at = |q: f64| 100.0 * shares[((shares.len() - 1) as f64 * q).round() as usize];
                format!("median {:.1} % (quartiles {:.1}-{:.1} %)", at(0.5), at(0.25), at(0.75))
            };
            let inside = if b == 1 {
                format!("; inside the step's own GEMM calls: {}", median_share(&|p| 1.0 - p.inside[b] / p.step[b]))
            } else {
                String::new()
            };
            println!(
                "overhead/{name}, {way}, pair by pair: warm {}; cold {}{inside}",
                median_share(&|p| 1.0 - step_gemms(&p.warm) / p.step[b]),
                median_share(&|p| 1.0 - step_gemms(&p.cold) / p.step[b]),
            );
        }
    }
}

/// One pair of [`overhead`]: a step of each way and the GEMMs timed right after.
#[derive(Default)]
struct Pair {
    /// Seconds of a step, fused then stored.
    step: [f64; 2],
    /// Seconds inside the step's GEMM calls.
    inside: [f64; 2],
    /// Seconds in the optimizer outside the GEMMs.
    update: [f64; 2],
    /// Seconds of one call of each of [`SHAPES`], warm caches.
    warm: Vec<f64>,
    /// The same with cold caches.
    cold: Vec<f64>,
}

criterion_group!(benches, steps, overhead);
criterion_main!(benches);
