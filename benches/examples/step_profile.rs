//! Runs steps of the reference model (or, with `NET=cnn|vit|mobilenet`, of
//! the CNN, ViT or MobileNet config) on the pool and prints the fastest of several rounds:
//! `step_profile [svp|bp] [steps per round] [rounds]`, for a profiler or for
//! before/after comparisons on a noisy host.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let method = match args.get(1).map(String::as_str) {
        Some("bp") => svp_train::Method::Bp,
        _ => svp_train::Method::Svp,
    };
    let steps: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(400);
    let rounds: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let config = match std::env::var("NET").as_deref() {
        Ok("cnn") => svp_benches::cnn_config(),
        Ok("vit") => svp_benches::vit_config(),
        Ok("mobilenet") => svp_benches::mobilenet_config(),
        _ => svp_benches::reference_config(),
    };
    let mut bench = svp_benches::StepBench::with_config(method, config);
    bench.timed(3);
    let best = (0..rounds).map(|_| bench.timed(steps).as_secs_f64() / steps as f64).fold(f64::INFINITY, f64::min);
    println!("{:.3} ms per step (fastest of {rounds} rounds of {steps})", best * 1e3);
}
