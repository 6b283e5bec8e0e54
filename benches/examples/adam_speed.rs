//! How long one Adam update of the reference model's weights takes.
use std::time::Instant;
fn main() {
    let n = 784 * 1024 + 2 * 1024 * 1024 + 10 * 1024;
    let opt = svp_optim::Optimizer::adam(3e-4);
    let mut p: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 1e-3).collect();
    let g: Vec<f32> = (0..n).map(|i| ((i % 89) as f32 - 44.0) * 1e-4).collect();
    let mut st = opt.new_state(n);
    for _ in 0..5 {
        opt.update(1.0, &mut p, &g, &mut st);
    }
    let mut best = f64::INFINITY;
    for _ in 0..50 {
        let s = Instant::now();
        opt.update(1.0, &mut p, &g, &mut st);
        best = best.min(s.elapsed().as_secs_f64());
    }
    println!(
        "Adam over {n} params: {:.3} ms ({:.1} GB/s of 28 B per element)",
        best * 1e3,
        n as f64 * 28.0 / best / 1e9
    );
}
