//! Times one GEMM shape on one thread: `gemm_shape M K N` (fastest of 20
//! batches), for before/after comparisons of kernel changes. With `BT=1`,
//! B is the transposed view of an `N x K` row-major matrix, as the forward's
//! `W^T` is.
use std::time::Instant;

fn main() {
    let dims: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("M K N")).collect();
    let [m, k, n] = dims[..] else { panic!("usage: gemm_shape M K N") };
    let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut c = vec![0.0f32; m * n];
    let transposed = std::env::var_os("BT").is_some();
    let reps = (2e9 / (2.0 * (m * k * n) as f64)).clamp(3.0, 1000.0) as usize;
    let mut best = f64::INFINITY;
    for _ in 0..20 {
        let start = Instant::now();
        for _ in 0..reps {
            let a = svp_tensor::view(&a, m, k);
            let b = if transposed { svp_tensor::view(&b, n, k).reversed_axes() } else { svp_tensor::view(&b, k, n) };
            svp_tensor::gemm_with_chunks(1.0, a, b, 0.0, svp_tensor::view_mut(&mut c, m, n), 1);
        }
        best = best.min(start.elapsed().as_secs_f64() / reps as f64);
    }
    let layout = if transposed { "B transposed" } else { "B row-major" };
    println!("{m}x{k}x{n}, {layout}: {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / best / 1e9);
}
