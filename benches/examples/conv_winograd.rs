//! Winograd's F(4x4, 3x3) against im2col + GEMM on `models/cnn-fmnist.toml`'s
//! 3x3 convolutions at batch 128: the forward of each, the two paths
//! alternating within one process (the host is shared and noisy), fastest of
//! several rounds.
//!
//!     cargo run --release -p svp-benches --example conv_winograd [rounds]
use std::time::Instant;
use svp_nn::conv::{Chw, Conv2d};

const ROWS: usize = 128;

fn wave(n: usize, salt: usize) -> Vec<f32> {
    (0..n).map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 - 1001.0) * 1e-3).collect()
}

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let shapes = [(32, 28, 32), (32, 14, 64), (64, 14, 64), (64, 7, 128), (128, 7, 128)];
    println!("{:<14} {:>10} {:>10} {:>8}", "conv fwd (ms)", "im2col", "winograd", "ratio");
    let (mut sum_i, mut sum_w) = (0.0, 0.0);
    svp_benches::on_pool(|| {
        for &(c_in, side, c_out) in &shapes {
            let conv = Conv2d { input: Chw { c: c_in, h: side, w: side }, c_out, k: 3, stride: 1, padding: 1 };
            assert!(conv.winograd().is_some());
            let params = wave(conv.param_len(), 1);
            let x = wave(ROWS * conv.input.len(), 2);
            let mut out = vec![0.0; ROWS * conv.output().len()];
            let mut col = vec![0.0; conv.col_len()];
            let (mut best_i, mut best_w) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..=rounds {
                let t = Instant::now();
                conv.forward_im2col(&params, &x, ROWS, &mut out, &mut col);
                best_i = best_i.min(t.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                conv.forward(&params, &x, ROWS, &mut out, &mut col);
                best_w = best_w.min(t.elapsed().as_secs_f64() * 1e3);
            }
            println!(
                "{:<14} {best_i:>10.2} {best_w:>10.2} {:>7.2}x",
                format!("{c_in}->{c_out} @{side}"),
                best_i / best_w
            );
            sum_i += best_i;
            sum_w += best_w;
        }
    });
    println!("{:<14} {sum_i:>10.2} {sum_w:>10.2} {:>7.2}x", "all five", sum_i / sum_w);
}
