//! Times one GEMM shape on one thread: `gemm_shape M K N` (fastest of 20
//! batches), for before/after comparisons of kernel changes. With `BT=1`,
//! B is the transposed view of an `N x K` row-major matrix, as the forward's
//! `W^T` is. With `SMALL=1`, through `small_gemm` instead (products of at
//! most `SMALL_MAX_SIDE` on a side, as attention's per-head ones). With
//! `BIAS=epilogue`, `c = a b + bias` by `gemm_bias`; with `BIAS=fill`, the
//! same by filling `c`'s rows with the bias and blending with `beta = 1`.
use std::time::Instant;

fn main() {
    let dims: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("M K N")).collect();
    let [m, k, n] = dims[..] else { panic!("usage: gemm_shape M K N") };
    let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut c = vec![0.0f32; m * n];
    let transposed = std::env::var_os("BT").is_some();
    let small = std::env::var_os("SMALL").is_some();
    let bias_mode = std::env::var("BIAS").ok();
    let bias: Vec<f32> = (0..n).map(|j| (j % 5) as f32 * 0.01).collect();
    let reps = (2e9 / (2.0 * (m * k * n) as f64)).clamp(3.0, 1000.0) as usize;
    let mut best = f64::INFINITY;
    for _ in 0..20 {
        let start = Instant::now();
        for _ in 0..reps {
            if small {
                use svp_tensor::{Strided, StridedMut};
                let a = Strided::rows(&a, m, k, k);
                let b = if transposed { Strided::rows(&b, n, k, k).t() } else { Strided::rows(&b, k, n, n) };
                svp_tensor::small_gemm(1.0, a, b, 0.0, StridedMut::rows(&mut c, m, n, n));
                continue;
            }
            let a = svp_tensor::view(&a, m, k);
            let b = if transposed { svp_tensor::view(&b, n, k).reversed_axes() } else { svp_tensor::view(&b, k, n) };
            match bias_mode.as_deref() {
                Some("epilogue") => {
                    let isa = svp_tensor::cpu::selected();
                    svp_tensor::gemm_bias_with_chunks_on(isa, a, b, &bias, svp_tensor::view_mut(&mut c, m, n), 1);
                }
                Some("fill") => {
                    c.chunks_exact_mut(n).for_each(|row| row.copy_from_slice(&bias));
                    svp_tensor::gemm_with_chunks(1.0, a, b, 1.0, svp_tensor::view_mut(&mut c, m, n), 1);
                }
                _ => svp_tensor::gemm_with_chunks(1.0, a, b, 0.0, svp_tensor::view_mut(&mut c, m, n), 1),
            }
        }
        best = best.min(start.elapsed().as_secs_f64() / reps as f64);
    }
    let layout = match (transposed, small) {
        (false, false) => "B row-major",
        (true, false) => "B transposed",
        (false, true) => "B row-major, small_gemm",
        (true, true) => "B transposed, small_gemm",
    };
    let layout = match bias_mode.as_deref() {
        Some(mode) => format!("{layout}, bias by {mode}"),
        None => layout.to_string(),
    };
    println!("{m}x{k}x{n}, {layout}: {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / best / 1e9);
}
