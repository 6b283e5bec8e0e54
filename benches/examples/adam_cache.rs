//! One step's Adam updates of the reference model's layers, with the state in
//! cache and after other data went through the cache between layers (as the
//! rest of a training step does):
//!
//! `cargo run --release -p svp-benches --example adam_cache`

use std::time::Instant;

fn main() {
    let sizes = [784 * 1024 + 3 * 1024, 1024 * 1024 + 3 * 1024, 1024 * 1024 + 3 * 1024, 10 * 1024 + 10];
    let opt = svp_optim::Optimizer::adam(3e-4);
    let mut layers: Vec<_> = sizes
        .iter()
        .map(|&n| {
            let params: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 1e-3).collect();
            let grad: Vec<f32> = (0..n).map(|i| ((i % 89) as f32 - 44.0) * 1e-4).collect();
            (params, grad, opt.new_state(n))
        })
        .collect();
    // 64 MB of other data, touched between layers.
    let mut other = vec![1.0f32; 16 << 20];
    svp_benches::on_pool(|| {
        for evict in [false, true, false, true] {
            let mut best = f64::INFINITY;
            for _ in 0..20 {
                let mut seconds = 0.0;
                for (params, grad, state) in layers.iter_mut() {
                    if evict {
                        other.iter_mut().for_each(|x| *x += 1.0);
                    }
                    let start = Instant::now();
                    opt.update(1.0, params, grad, state);
                    seconds += start.elapsed().as_secs_f64();
                }
                best = best.min(seconds);
            }
            let label = if evict { "after 64 MB of other data per layer" } else { "state in cache" };
            println!("{label}: {:.3} ms for one step's updates (fastest of 20)", best * 1e3);
        }
    });
}
