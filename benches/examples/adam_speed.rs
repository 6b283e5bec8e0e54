//! How long one Adam update of the reference model's weights from a stored
//! gradient takes, against the same memory traffic with no arithmetic (the
//! gradient read, each weight and both moments read and written: 28 bytes per
//! weight): how far the update is from what the memory alone allows. On one
//! thread and on the pool, rounds of the two alternating (the host is
//! shared), fastest and median of each:
//!
//! `cargo run --release -p svp-benches --example adam_speed [rounds]`
use rayon::prelude::*;
use std::time::Instant;

/// Slices per parallel task (as svp-optim splits its pass).
const CHUNK: usize = 1 << 14;

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(30);
    let n = 784 * 1024 + 2 * 1024 * 1024 + 10 * 1024;
    let opt = svp_optim::Optimizer::adam(3e-4);
    // Every buffer as training allocates its large ones (huge pages where the
    // OS offers them), so both sides stream the same kind of memory.
    let buffer = || svp_alloc::try_zeros(n, "a benchmark buffer").expect("memory for the benchmark");
    let mut p = buffer();
    p.iter_mut().enumerate().for_each(|(i, x)| *x = (i % 97) as f32 * 1e-3);
    let mut g = buffer();
    g.iter_mut().enumerate().for_each(|(i, x)| *x = ((i % 89) as f32 - 44.0) * 1e-4);
    let mut state = opt.new_state(n);
    // The bare stream's own buffers, as large as the weights and moments,
    // and a gradient it only reads.
    let mut stream: [Vec<f32>; 3] = std::array::from_fn(|_| buffer());
    let read_only = buffer();
    for _ in 0..3 {
        opt.update(1.0, &mut p, &g, &mut state);
    }
    for (label, threads) in [("one thread", 1), ("the pool", rayon::current_num_threads())] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a thread pool");
        let (mut adam, mut bare) = (Vec::new(), Vec::new());
        pool.install(|| {
            for _ in 0..rounds {
                let start = Instant::now();
                opt.update(1.0, &mut p, &g, &mut state);
                adam.push(start.elapsed().as_secs_f64());
                let [a, b, c] = &mut stream;
                let start = Instant::now();
                let streams = a.par_chunks_mut(CHUNK).zip(b.par_chunks_mut(CHUNK)).zip(c.par_chunks_mut(CHUNK));
                streams.zip(read_only.par_chunks(CHUNK)).for_each(|(((a, b), c), g)| {
                    for (((a, b), c), g) in a.iter_mut().zip(b).zip(c).zip(g) {
                        (*a, *b, *c) = (*a + g, *b + g, *c + g);
                    }
                });
                bare.push(start.elapsed().as_secs_f64());
            }
        });
        let summary = |times: &mut Vec<f64>| {
            times.sort_by(f64::total_cmp);
            format!("{:.3} ms fastest, {:.3} median", times[0] * 1e3, times[times.len() / 2] * 1e3)
        };
        println!(
            "{label} ({threads}): Adam over {n} weights {}; the same 28 B per weight moved with no arithmetic {} \
             ({rounds} alternating rounds)",
            summary(&mut adam),
            summary(&mut bare)
        );
    }
    std::hint::black_box(&stream);
}
