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
/// isolated GEMMs so that all see the same conditions. The fastest step and
/// the fastest GEMMs can still come from different speeds of the host, so
/// the shares are also given round by round (median and quartiles).
fn overhead(_c: &mut Criterion) {
    const ROUNDS: usize = 15;
    const STEPS: u64 = 20;
    let per_call = |d: Duration, n: u64| d.as_secs_f64() / n as f64;
    let mut evict = vec![0.0f32; 8 << 20];
    for (name, method) in [("svp", Method::Svp), ("bp", Method::Bp)] {
        let per_step = |times: &[f64]| -> f64 {
            SHAPES
                .iter()
                .zip(times)
                .map(|(s, t)| t * if method == Method::Svp { s.per_svp_step } else { s.per_bp_step } as f64)
                .sum()
        };
        let mut benches = [StepBench::new(method), StepBench::new(method)];
        let stored = &mut benches[1];
        stored.trainer.store_weight_gradients(&stored.model).expect("memory for the stored gradient");
        let mut gemms: Vec<GemmOperands> = SHAPES.iter().map(|&s| GemmOperands::new(s)).collect();
        let mut step = [f64::INFINITY; 2];
        let (mut in_situ, mut calls, mut update) = ([0.0; 2], [0; 2], [0.0; 2]);
        let mut warm = vec![f64::INFINITY; SHAPES.len()];
        let mut cold = vec![f64::INFINITY; SHAPES.len()];
        // Each round's own shares (warm, cold): its steps against the GEMMs
        // timed right after them, which a change of the host's speed between
        // rounds does not pair with another round's figures.
        let mut round_shares: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
        for bench in &mut benches {
            bench.timed(5);
        }
        for _ in 0..ROUNDS {
            let mut round_step = [0.0; 2];
            for (b, bench) in benches.iter_mut().enumerate() {
                svp_tensor::reset_gemm_clock();
                svp_optim::reset_update_clock();
                let t = per_call(bench.timed(STEPS), STEPS);
                round_step[b] = t;
                let (gemm, n) = svp_tensor::gemm_clock();
                if t < step[b] {
                    (step[b], in_situ[b], calls[b]) = (t, per_call(gemm, STEPS), n / STEPS);
                    update[b] = per_call(svp_optim::update_clock(), STEPS);
                }
            }
            let mut round_gemms = vec![(0.0, 0.0); SHAPES.len()];
            for (((w, c), ops), (rw, rc)) in warm.iter_mut().zip(cold.iter_mut()).zip(&mut gemms).zip(&mut round_gemms)
            {
                *rw = per_call(ops.timed(10), 10);
                *rc = per_call(ops.timed_cold(5, &mut evict), 5);
                *w = w.min(*rw);
                *c = c.min(*rc);
            }
            let round_warm = per_step(&round_gemms.iter().map(|g| g.0).collect::<Vec<_>>());
            let round_cold = per_step(&round_gemms.iter().map(|g| g.1).collect::<Vec<_>>());
            for (shares, t) in round_shares.iter_mut().zip(round_step) {
                shares.push(((t - round_warm) / t, (t - round_cold) / t));
            }
        }
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
            let quartiles = |pick: fn(&(f64, f64)) -> f64| {
                let mut shares: Vec<f64> = round_shares[b].iter().map(pick).collect();
                shares.sort_by(f64::total_cmp);
                let at = |q: f64| 100.0 * shares[((shares.len() - 1) as f64 * q).round() as usize];
                format!("median {:.1} % (quartiles {:.1}-{:.1} %)", at(0.5), at(0.25), at(0.75))
            };
            println!(
                "overhead/{name}, {way}, round by round: warm {}; cold {}",
                quartiles(|s| s.0),
                quartiles(|s| s.1)
            );
        }
    }
}

criterion_group!(benches, steps, overhead);
criterion_main!(benches);
