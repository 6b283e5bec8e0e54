//! Conv networks, MobileNet blocks and vision transformers end to end: the
//! SVP (and SVP+) and backprop steps of a small CNN, mobile network and ViT give the gradients finite
//! differences of their losses give, and training is bit-identical on 1 or 2
//! threads.

use svp_integration_tests::{embedded_subset, small_config};
use svp_nn::{FaWorkspace, FeatureAlignment, Mode, softmax_cross_entropy};
use svp_tensor::{view, view_mut};
use svp_train::config::{ConvItem, MobileItem, PoolMarker, VitConfig};
use svp_train::{BpTrainer, Config, LayerCache, LayerScratch, Method, Network, SvpTrainer, Trainer};

/// conv 3 -> M -> conv 4, readout 2x2, then a linear head.
fn cnn_config(method: Method) -> Config {
    let mut c = small_config(method, 1);
    c.model.conv = vec![ConvItem::Channels(3), ConvItem::Pool(PoolMarker::M), ConvItem::Channels(4)];
    c.model.hidden = vec![];
    c
}

/// A conv 3 stem, then mobile blocks 4 (expansion 2, stride 2) and 4
/// (expansion 2, stride 1: with the residual), readout 2x2, a linear head.
fn mobile_config(method: Method) -> Config {
    let mut c = small_config(method, 1);
    c.model.conv = vec![ConvItem::Channels(3)];
    c.model.mobile =
        vec![MobileItem { channels: 4, expansion: 2, stride: 2 }, MobileItem { channels: 4, expansion: 2, stride: 1 }];
    c.model.hidden = vec![];
    c
}

/// Patch 7 (16 patches and a class token), width 8, three blocks of 2 heads.
fn vit_config(method: Method, readout: svp_nn::vit::TokenReadout) -> Config {
    let mut c = small_config(method, 1);
    c.model.vit = Some(VitConfig {
        patch: 7,
        dim: 8,
        depth: 3,
        heads: 2,
        mlp: 16,
        readout,
        norm_eps: svp_nn::layer_norm::LAYER_NORM_EPS,
    });
    c.model.hidden = vec![];
    c
}

fn batch(rows: usize) -> (Vec<f32>, Vec<u32>) {
    let data = embedded_subset(rows);
    let norm = svp_train::Normalization::of_pixels(&data.train.images);
    let mut b = svp_data::Batcher::new(rows, rows, norm.table());
    b.start_epoch(1, 0, false);
    let (mut x, mut y) = (vec![0.0; rows * 784], vec![0; rows]);
    b.gather(&data.train, 0, &mut x, &mut y);
    (x, y)
}

/// One SGD step with lr = 1 moves every trained weight by minus its gradient.
fn applied_gradient(config: &Config, x: &[f32], y: &[u32]) -> (Network, Network) {
    let mut c = config.clone();
    c.optimizer = svp_optim::Optimizer::Sgd { lr: 1.0, momentum: 0.0, weight_decay: 0.0 };
    let before = Network::try_for_images((28, 28), 10, &c.model, c.train.seed).unwrap();
    let mut after = before.clone();
    let mut trainer: Box<dyn Trainer> = match c.train.method {
        Method::Svp => Box::new(SvpTrainer::new(&after, &c)),
        Method::Bp => Box::new(BpTrainer::new(&after, &c)),
    };
    trainer.step(&mut after, x, y, 1.0).unwrap();
    (before, after)
}

/// Runs layers `0..=last` of `net` forward in training mode; returns the output of `last`.
fn forward_to(net: &mut Network, last: usize, x: &[f32], rows: usize) -> Vec<f32> {
    let mut h = x.to_vec();
    let mut cache = LayerCache::try_for(net.all_layers(), rows).unwrap();
    let mut scratch = LayerScratch::try_for(net.all_layers(), rows).unwrap();
    for l in 0..=last {
        let mut out = vec![0.0; rows * net.out_len(l)];
        let (layer, params) = net.layer_mut(l);
        layer.forward(params, &h, rows, &mut cache, &mut scratch, &mut out, Mode::Train { seed: 7, step: 0 });
        h = out;
    }
    h
}

/// Compares the applied gradient with finite differences of `loss` at a
/// spread of each layer's trained parameters, on the half-relative measure
/// `|a - n| / (|a| + |n|)` (a gradient scaled by 1 + d is off by about d/2).
///
/// A transformer's (and a dense layer's) loss is smooth: the five-point
/// stencil with a step of 4e-3 (truncation O(h^4); a larger step divides the
/// f32 forward's rounding down) agrees to 2.3e-3 at worst, median 5.8e-4 at
/// worst, so every point must be within 5e-3 and the median within 1.5e-3.
/// A conv block's loss has thousands of ReLU and max-pool switches, so it is
/// smooth only at a fine scale and any finite difference is approximate
/// there (the blocks' exact checks on small shapes are in svp-nn's
/// conv_gradcheck): central differences with a step of 1e-3 are within 0.11
/// at worst, median 4.7e-3 at worst; the bounds are 0.15 and 8e-3. A wiring
/// mistake (wrong input, readout or projection) is off by far more. Mobile
/// blocks (ReLU6 kinks, three BatchNorms) are held to the conv bounds.
fn check_layer(what: &str, before: &Network, after: &Network, l: usize, loss: impl Fn(&Network) -> f64) {
    let n = before.trainable_len(l);
    let (b, a) = (before.layer_params(l), after.layer_params(l));
    let conv = matches!(before.layer(l), svp_train::Layer::Conv(_) | svp_train::Layer::Mobile(_));
    let (point_tol, median_tol) = if conv { (0.15, 8e-3) } else { (5e-3, 1.5e-3) };
    let mut errors = Vec::new();
    // Entries far below the layer's typical gradient are all noise: errors
    // are measured against at least 5 % of the largest.
    let floor = 0.05 * (0..n).map(|i| (b[i] - a[i]).abs() as f64).fold(1e-3, f64::max);
    for i in (0..n).step_by((n / 24).max(1)) {
        let analytic = (b[i] - a[i]) as f64;
        let at = |step: f32| {
            let mut net = before.clone();
            net.layer_params_mut(l)[i] += step;
            loss(&net)
        };
        let central = |step: f32| (at(step) - at(-step)) / (2.0 * step as f64);
        let numeric = if conv { central(1e-3) } else { (4.0 * central(4e-3) - central(8e-3)) / 3.0 };
        let err = (analytic - numeric).abs() / (analytic.abs() + numeric.abs()).max(floor);
        assert!(err < point_tol, "{what}, layer {} param {i}: applied {analytic} vs numeric {numeric}", l + 1);
        errors.push(err);
    }
    errors.sort_by(f64::total_cmp);
    let median = errors[errors.len() / 2];
    eprintln!("{what}, layer {}: median {median:.2e}, worst {:.2e}", l + 1, errors[errors.len() - 1]);
    assert!(median < median_tol, "{what}, layer {}: median relative error {median}", l + 1);
}

fn check_backprop(config: &Config) {
    let rows = 8;
    let (x, y) = batch(rows);
    let (before, after) = applied_gradient(config, &x, &y);
    let loss = |net: &Network| {
        let mut net = net.clone();
        let last = net.n_layers() - 1;
        let logits = forward_to(&mut net, last, &x, rows);
        let mut g = vec![0.0; logits.len()];
        softmax_cross_entropy(view(&logits, rows, 10), &y, &mut g).0 as f64
    };
    for l in 0..before.n_layers() {
        check_layer("backprop", &before, &after, l, loss);
    }
}

/// Each unit's local loss as a function of its layers' parameters (the
/// perturbed network differs from `before` in one layer), with the unit's
/// input and alignment target from the units below, as SVP computes them.
fn check_svp(config: &Config) {
    let rows = 8;
    let (x, y) = batch(rows);
    let (before, after) = applied_gradient(config, &x, &y);
    let heads = config.projection_heads(10);
    let fa = FeatureAlignment { mean_center: false };
    // Written here from the layers' shapes, not with the trainer's readout code.
    let project = |net: &Network, l: usize, h: &[f32]| {
        let (read, width) = match net.layer(l) {
            svp_train::Layer::Conv(c) => {
                let pool = c.readout();
                let mut r = vec![0.0; rows * pool.output().len()];
                pool.forward(h, rows, &mut r);
                (r, pool.output().len())
            }
            svp_train::Layer::Mobile(m) => {
                let pool = m.readout();
                let mut r = vec![0.0; rows * pool.output().len()];
                pool.forward(h, rows, &mut r);
                (r, pool.output().len())
            }
            svp_train::Layer::Block(b) => {
                let (t, d) = (b.spec.tokens, b.spec.dim);
                let mut r = vec![0.0; rows * d];
                for s in 0..rows {
                    let tokens = &h[s * t * d..(s + 1) * t * d];
                    for k in 0..d {
                        r[s * d + k] = match config.model.vit.as_ref().map(|v| v.readout) {
                            Some(svp_nn::vit::TokenReadout::Mean) => {
                                (0..t).map(|i| tokens[i * d + k]).sum::<f32>() / t as f32
                            }
                            _ => tokens[k],
                        };
                    }
                }
                (r, d)
            }
            svp_train::Layer::Dense(d) => (h.to_vec(), d.spec().out_dim),
            other => panic!("no projection reads a {other:?}"),
        };
        let mut v = vec![0.0; rows * heads.dim];
        let mut tile = vec![0.0; 4096];
        let p = heads.for_layer(l + 1, width, true);
        p.forward(view(&read, rows, width), Some(&y), Some(0), view_mut(&mut v, rows, heads.dim), &mut tile);
        v
    };
    let units = svp_train::units(&before, config.svp.layers_per_unit, config.svp.head_joins_last_unit);
    for (k, unit) in units.iter().enumerate() {
        let end = unit.end - 1;
        let below = k.checked_sub(1).map(|p| units[p].end - 1);
        let loss = |net: &Network| {
            let mut net = net.clone();
            let mut tile = vec![0.0; 4096];
            let v_prev = match below {
                None => {
                    let mut v0 = vec![0.0; rows * heads.dim];
                    let input = view(&x, rows, 784);
                    heads.for_layer(0, 784, false).forward(
                        input,
                        None,
                        None,
                        view_mut(&mut v0, rows, heads.dim),
                        &mut tile,
                    );
                    v0
                }
                Some(b) => {
                    let h = forward_to(&mut net, b, &x, rows);
                    project(&net, b, &h)
                }
            };
            let h = forward_to(&mut net, end, &x, rows);
            let v = if end + 1 == net.n_layers() { h } else { project(&net, end, &h) };
            let d = v.len() / rows;
            let mut g = vec![0.0; v.len()];
            let ce = softmax_cross_entropy(view(&v, rows, d), &y, &mut g).0 as f64;
            let mut ws = FaWorkspace::new(rows, d.max(heads.dim));
            let fa = fa.loss_and_grad(view(&v, rows, d), view(&v_prev, rows, heads.dim), &mut ws, 1.0, &mut g);
            ce + fa as f64
        };
        for l in unit.clone() {
            check_layer("SVP local loss", &before, &after, l, loss);
        }
    }
}

#[test]
fn backprop_cnn_gradient_matches_finite_differences() {
    check_backprop(&cnn_config(Method::Bp));
}

#[test]
fn svp_cnn_local_gradients_match_finite_differences() {
    check_svp(&cnn_config(Method::Svp));
    // SVP+: both conv blocks in one unit, backprop between them.
    let mut plus = cnn_config(Method::Svp);
    plus.svp.layers_per_unit = 2;
    check_svp(&plus);
}

/// Plain SVP: each mobile block's own local loss (its readout, projection
/// and input). Backprop through a stack of mobile blocks is not checked
/// here: through their ReLU6 kinks and three BatchNorms, differences of the
/// f32 network loss are too noisy at any one step (svp-nn's
/// mobile_block_gradcheck checks the block's input gradient instead, in the
/// kinked and the smooth regime).
#[test]
fn svp_mobile_local_gradients_match_finite_differences() {
    check_svp(&mobile_config(Method::Svp));
}

#[test]
fn backprop_vit_gradient_matches_finite_differences() {
    check_backprop(&vit_config(Method::Bp, svp_nn::vit::TokenReadout::Cls));
}

#[test]
fn svp_vit_local_gradients_match_finite_differences() {
    use svp_nn::vit::TokenReadout;
    // Plain SVP (every block a unit), SVP+ in units of two with the mean
    // token, and the head inside the last unit.
    check_svp(&vit_config(Method::Svp, TokenReadout::Cls));
    let mut plus = vit_config(Method::Svp, TokenReadout::Mean);
    plus.svp.layers_per_unit = 2;
    check_svp(&plus);
    plus.svp.head_joins_last_unit = true;
    check_svp(&plus);
}

fn train_bits(config: &Config, threads: usize) -> Vec<u32> {
    let data = embedded_subset(256);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let outcome = pool.install(|| svp_train::fit(config, &data, &mut ()));
    assert!(outcome.diverged.is_none());
    outcome.model.params().iter().map(|v| v.to_bits()).collect()
}

/// The same bits on 1, 2, 3 and 8 threads (the GEMM and the per-sample
/// loops split their work by the thread count).
#[test]
fn vision_training_is_bit_identical_on_any_thread_count() {
    let vit = |m| {
        let mut c = vit_config(m, svp_nn::vit::TokenReadout::Cls);
        c.svp.layers_per_unit = 2;
        c
    };
    let configs = [cnn_config(Method::Svp), cnn_config(Method::Bp), vit(Method::Svp), vit(Method::Bp)];
    for config in configs.into_iter().chain([mobile_config(Method::Svp), mobile_config(Method::Bp)]) {
        let one = train_bits(&config, 1);
        for threads in [2, 3, 8] {
            let other = train_bits(&config, threads);
            assert!(one == other, "{:?}: 1 vs {threads} threads", config.train.method);
        }
    }
}
