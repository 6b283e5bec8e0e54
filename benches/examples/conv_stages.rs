//! Where a conv block's time goes: each of `models/cnn-fmnist.toml`'s six
//! conv blocks at batch 128, on the rayon pool, stage by stage (the
//! convolution, the bare GEMM it contains, BatchNorm, pooling, and the
//! backward with and without the input gradient), fastest of several rounds.
//!
//!     cargo run --release -p svp-benches --example conv_stages [rounds]
//!
//! "conv fwd - gemm" is what the convolution spends outside its GEMM
//! (unfolding, the layout change, the bias).
use svp_benches::fastest_ms;
use svp_nn::conv::{BatchNorm2d, BnActivation, Chw, Conv2d, Pool2d, PoolKind};
use svp_nn::{ConvBlock, ConvBlockCache, ConvBlockScratch, ConvBlockSpec, Mode};
use svp_tensor::{gemm, view, view_mut};

const ROWS: usize = 128;

fn wave(n: usize, salt: usize) -> Vec<f32> {
    (0..n).map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 - 1001.0) * 1e-3).collect()
}

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let blocks = [
        (1, 28, 32, false),
        (32, 28, 32, true),
        (32, 14, 64, false),
        (64, 14, 64, true),
        (64, 7, 128, false),
        (128, 7, 128, true),
    ];
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9} {:>9}",
        "block (ms)",
        "conv fwd",
        "gemm",
        "fwd-gemm",
        "bn fwd",
        "block fwd",
        "pool",
        "bwd no dx",
        "bwd + dx",
        "bn bwd",
        "dW gemm",
        "dX gemm"
    );
    let mut total = [0.0f64; 11];
    svp_benches::on_pool(|| {
        for (l, &(c_in, side, c_out, pool)) in blocks.iter().enumerate() {
            let spec =
                ConvBlockSpec { in_channels: c_in, in_h: side, in_w: side, out_channels: c_out, pool, readout: 2 };
            let block = ConvBlock::new(spec, l as u64 + 1);
            let mut params = vec![0.0; block.param_len()];
            block.init_params(1, &mut params);
            let input = Chw { c: c_in, h: side, w: side };
            let x = wave(ROWS * input.len(), l);
            let conv = Conv2d { input, c_out, k: 3, stride: 1, padding: 1 };
            let plane = ROWS * conv.output().len();
            let (mut z, mut col) = (vec![0.0; plane], vec![0.0; conv.col_len()]);
            let conv_p = &params[..conv.param_len()];
            let conv_fwd = fastest_ms(rounds, || conv.forward(conv_p, &x, ROWS, &mut z, &mut col));
            // The same products as bare GEMMs over groups of columns as wide as the convolution's.
            let (patch, hw) = (c_in * 9, side * side);
            let cols = conv.group_size() * hw;
            let (a, bm, mut cm) = (wave(c_out * patch, 1), wave(patch * cols, 2), vec![0.0; c_out * cols]);
            let groups = ROWS.div_ceil(conv.group_size());
            let gemm_ms = fastest_ms(rounds, || {
                for _ in 0..groups {
                    gemm(1.0, view(&a, c_out, patch), view(&bm, patch, cols), 0.0, view_mut(&mut cm, c_out, cols));
                }
            }) * (ROWS * hw) as f64
                / (groups * cols) as f64;
            // The backward's two products over the same groups: dW += dY cols^T, dcols = W^T dY.
            let (dy, mut gw) = (wave(c_out * cols, 3), vec![0.0; c_out * patch]);
            let dw_ms = fastest_ms(rounds, || {
                for _ in 0..groups {
                    gemm(1.0, view(&dy, c_out, cols), view(&bm, patch, cols).t(), 1.0, view_mut(&mut gw, c_out, patch));
                }
            }) * (ROWS * hw) as f64
                / (groups * cols) as f64;
            let mut dcols = vec![0.0; patch * cols];
            let dx_ms = fastest_ms(rounds, || {
                for _ in 0..groups {
                    gemm(
                        1.0,
                        view(&a, c_out, patch).t(),
                        view(&dy, c_out, cols),
                        0.0,
                        view_mut(&mut dcols, patch, cols),
                    );
                }
            }) * (ROWS * hw) as f64
                / (groups * cols) as f64;
            let bn = BatchNorm2d { shape: conv.output(), momentum: 0.1, activation: BnActivation::Relu };
            let (mut bn_p, mut running) = (vec![1.0; 2 * c_out], vec![0.0; 2 * c_out]);
            bn_p[c_out..].fill(0.0);
            bn.init_running(&mut running);
            let (mut out, mut xhat, mut stats) = (vec![0.0; plane], vec![0.0; plane], vec![0.0; 2 * c_out]);
            // BatchNorm normalizes in place: each round refills the input
            // (a copy the block itself does not make, timed with it).
            let bn_fwd = fastest_ms(rounds, || {
                xhat.copy_from_slice(&z);
                bn.forward_train(&bn_p, &mut running, &mut xhat, ROWS, &mut out, &mut stats)
            });
            let mut cache = ConvBlockCache::try_new(&block, ROWS).unwrap();
            let mut scratch = ConvBlockScratch::try_new(&block, ROWS).unwrap();
            let mut y = vec![0.0; ROWS * block.output().len()];
            let mode = Mode::Train { seed: 1, step: 0 };
            let block_fwd =
                fastest_ms(rounds, || block.forward(&mut params, &x, ROWS, &mut cache, &mut scratch, &mut y, mode));
            let pool_ms = if pool {
                let p = Pool2d::fixed(conv.output(), PoolKind::Max, 2, 2);
                let mut dz = vec![0.0; plane];
                fastest_ms(rounds, || {
                    p.forward(&out, ROWS, &mut y);
                    p.backward(&out, ROWS, &y, &mut dz);
                })
            } else {
                0.0
            };
            let dout = wave(y.len(), 9);
            let mut grad = vec![0.0; block.trainable_len()];
            let mut dx = vec![0.0; x.len()];
            block.forward(&mut params, &x, ROWS, &mut cache, &mut scratch, &mut y, mode);
            let bwd =
                fastest_ms(rounds, || block.backward(&params, &x, ROWS, &cache, &mut scratch, &dout, &mut grad, None));
            let bwd_dx = fastest_ms(rounds, || {
                block.backward(&params, &x, ROWS, &cache, &mut scratch, &dout, &mut grad, Some(&mut dx))
            });
            let (dz_in, mut g_bn, mut dz) = (wave(plane, 4), vec![0.0; 2 * c_out], vec![0.0; plane]);
            let bn_bwd = fastest_ms(rounds, || bn.backward(&bn_p, &xhat, &stats, ROWS, &dz_in, &mut g_bn, &mut dz));
            let row =
                [conv_fwd, gemm_ms, conv_fwd - gemm_ms, bn_fwd, block_fwd, pool_ms, bwd, bwd_dx, bn_bwd, dw_ms, dx_ms];
            total.iter_mut().zip(&row).for_each(|(t, v)| *t += v);
            let name = format!("{c_in}->{c_out} @{side}{}", if pool { " +M" } else { "" });
            println!(
                "{name:<14} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10.2} {:>10.2} {:>9.2} {:>9.2} {:>9.2}",
                row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10]
            );
        }
    });
    let t = total;
    println!(
        "{:<14} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10.2} {:>10.2} {:>9.2} {:>9.2} {:>9.2}",
        "all six", t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10]
    );
}
