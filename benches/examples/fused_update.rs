//! The reference model's weight-gradient GEMMs and Adam updates, two ways:
//! the gradient stored and then read by the optimizer, or handed from the
//! GEMM straight to the optimizer strip by strip (`gemm_to_sink`), with 64
//! MB of other data through the cache before each layer (as in a training
//! step; `NO_EVICT=1` leaves the state in cache), plus the GEMMs and the
//! updates alone:
//!
//! `cargo run --release -p svp-benches --example fused_update` (`MOMENTS=bf16`
//! for bfloat16 moments)

use ndarray::Array2;
use std::time::Instant;
use svp_tensor::{GradientSink, gemm, gemm_to_sink, view_mut};

struct Layer {
    rows: usize,
    cols: usize,
    dz: Array2<f32>,
    x: Array2<f32>,
    params: Vec<f32>,
    grad: Vec<f32>,
    state: svp_optim::LayerState,
}

fn main() {
    let batch = 128;
    // `MOMENTS=bf16` for Adam with bfloat16 moments.
    let moments = match std::env::var("MOMENTS").as_deref() {
        Ok("bf16") => svp_optim::MomentDtype::Bf16,
        _ => svp_optim::MomentDtype::F32,
    };
    let opt = svp_optim::Optimizer::adam(3e-4).with_moments(moments);
    let wave = |i: usize, salt: usize| (((i * 7919 + salt) % 2003) as f32 - 1001.0) * 1e-4;
    let mut layers: Vec<Layer> = [(1024, 784), (1024, 1024), (1024, 1024)]
        .into_iter()
        .map(|(rows, cols)| Layer {
            rows,
            cols,
            dz: Array2::from_shape_fn((batch, rows), |(b, r)| wave(b * rows + r, 1)),
            x: Array2::from_shape_fn((batch, cols), |(b, c)| wave(b * cols + c, 2)),
            params: (0..rows * cols).map(|i| wave(i, 3)).collect(),
            grad: vec![0.0; rows * cols],
            state: opt.new_state(rows * cols),
        })
        .collect();
    let mut other = vec![1.0f32; 16 << 20];
    svp_benches::on_pool(|| {
        // The fastest of the rounds for each layer and way (other work on
        // the host only ever adds time).
        let mut best = [[f64::INFINITY; 3]; 4];
        for round in 0..60 {
            for (way, best) in best.iter_mut().enumerate() {
                for (l, best) in layers.iter_mut().zip(best.iter_mut()) {
                    if std::env::var_os("NO_EVICT").is_none() {
                        other.iter_mut().for_each(|x| *x += 1.0);
                    }
                    let start = Instant::now();
                    if way == 0 {
                        gemm(1.0, l.dz.t(), l.x.view(), 0.0, view_mut(&mut l.grad, l.rows, l.cols));
                        opt.update(1.0, &mut l.params, &l.grad, &mut l.state);
                    } else if way == 2 {
                        gemm(1.0, l.dz.t(), l.x.view(), 0.0, view_mut(&mut l.grad, l.rows, l.cols));
                    } else if way == 3 {
                        opt.update(1.0, &mut l.params, &l.grad, &mut l.state);
                    } else {
                        let mut update = opt.begin_update(1.0, &mut l.state);
                        let sink = update.weight_rows(0, &mut l.params, l.cols).expect("takes a product");
                        gemm_to_sink(l.dz.t(), l.x.view(), sink);
                    }
                    *best = best.min(start.elapsed().as_secs_f64());
                }
            }
            if round % 20 == 19 {
                let best = best.map(|b| b.iter().sum::<f64>());
                println!(
                    "after {} rounds: gradient stored then Adam {:.3} ms; handed to Adam strip by strip {:.3} ms; \
                     GEMMs alone {:.3} ms, Adam alone {:.3} ms",
                    round + 1,
                    best[0] * 1e3,
                    best[1] * 1e3,
                    best[2] * 1e3,
                    best[3] * 1e3
                );
            }
        }
    });
}
