//! Times BatchNorm2d's training forward and backward alone on the CNN's
//! three plane sizes at batch 128 (fastest of 30 runs each):
//! `bn_passes` (honours `RAYON_NUM_THREADS`).
use svp_benches::fastest_ms;
use svp_nn::conv::{BatchNorm2d, BnActivation, Chw};

fn main() {
    let rows = 128;
    for shape in [Chw { c: 32, h: 28, w: 28 }, Chw { c: 64, h: 14, w: 14 }, Chw { c: 128, h: 7, w: 7 }] {
        let bn = BatchNorm2d { shape, momentum: 0.1, activation: BnActivation::Relu };
        let len = rows * shape.c * shape.h * shape.w;
        let wave =
            |salt: usize| (0..len).map(|i| ((i * 7919 + salt) % 1000) as f32 / 500.0 - 1.0).collect::<Vec<f32>>();
        let x = wave(1);
        let dout = wave(2);
        let params: Vec<f32> = (0..2 * shape.c).map(|i| if i < shape.c { 1.0 } else { 0.1 }).collect();
        let mut running = vec![0.0; 2 * shape.c];
        let mut xhat = x.clone();
        let mut out = vec![0.0; len];
        let mut stats = vec![0.0; 2 * shape.c];
        let mut grad = vec![0.0; 2 * shape.c];
        let mut dx = vec![0.0; len];
        let fwd = fastest_ms(30, || {
            xhat.copy_from_slice(&x);
            bn.forward_train(&params, &mut running, &mut xhat, rows, &mut out, &mut stats);
        });
        let copy = fastest_ms(30, || xhat.copy_from_slice(&x));
        let bwd = fastest_ms(30, || bn.backward(&params, &xhat, &stats[..shape.c], rows, &dout, &mut grad, &mut dx));
        println!("{}x{}x{}: forward {:.3} ms, backward {:.3} ms", shape.c, shape.h, shape.w, fwd - copy, bwd);
    }
}
