//! Conv networks end to end: the SVP and backprop steps of a small CNN give
//! the gradients finite differences of their losses give, and training is
//! bit-identical on 1 or 2 threads and across a resume.

use svp_integration_tests::{embedded_subset, small_config};
use svp_nn::{ConvBlockCache, DenseCache, FaWorkspace, FeatureAlignment, Mode, softmax_cross_entropy};
use svp_tensor::{view, view_mut};
use svp_train::config::{ConvItem, PoolMarker};
use svp_train::{BpTrainer, Config, Method, Network, ProjectionHeads, SvpTrainer, Trainer};

/// conv 3 -> M -> conv 4, readout 2x2, then a linear head.
fn cnn_config(method: Method) -> Config {
    let mut c = small_config(method, 1);
    c.model.conv = vec![ConvItem::Channels(3), ConvItem::Pool(PoolMarker::M), ConvItem::Channels(4)];
    c.model.hidden = vec![];
    c
}

fn batch(rows: usize) -> (Vec<f32>, Vec<u32>) {
    let data = embedded_subset(rows);
    let norm = svp_data::Normalization::fit(&data.train);
    let mut b = svp_data::Batcher::new(rows, rows, norm);
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
    let mut dense = DenseCache::new(rows, 64);
    let mut conv = ConvBlockCache::try_new_for(net.convs().to_vec().iter(), rows).unwrap();
    for l in 0..=last {
        let mut out = vec![0.0; rows * net.out_len(l)];
        let (layer, params) = net.layer_mut(l);
        layer.forward(params, &h, rows, &mut dense, &mut conv, &mut out, Mode::Train { seed: 7, step: 0 });
        h = out;
    }
    h
}

/// Compares the applied gradient with central differences of `loss` at a
/// spread of each layer's trained parameters. A conv block's loss has
/// thousands of ReLU and max-pool switches, so it is piecewise smooth at a fine
/// scale and a finite difference is only approximate (the blocks' exact
/// checks on small shapes are in svp-nn's conv_gradcheck): each point within
/// 25 %, the median within 3 %. A wiring mistake (wrong input, readout or
/// projection) is off by far more.
fn check_layer(what: &str, before: &Network, after: &Network, l: usize, loss: impl Fn(&Network) -> f64) {
    let n = before.trainable_len(l);
    let (b, a) = (before.layer_params(l), after.layer_params(l));
    let mut errors = Vec::new();
    let eps = 1e-3;
    // Entries far below the layer's typical gradient are all noise: errors
    // are measured against at least 5 % of the largest.
    let floor = 0.05 * (0..n).map(|i| (b[i] - a[i]).abs() as f64).fold(1e-3, f64::max);
    for i in (0..n).step_by((n / 24).max(1)) {
        let analytic = (b[i] - a[i]) as f64;
        let (mut up, mut down) = (before.clone(), before.clone());
        up.layer_params_mut(l)[i] += eps;
        down.layer_params_mut(l)[i] -= eps;
        let numeric = (loss(&up) - loss(&down)) / (2.0 * eps as f64);
        let err = (analytic - numeric).abs() / (analytic.abs() + numeric.abs()).max(floor);
        assert!(err < 0.25, "{what}, layer {} param {i}: applied {analytic} vs numeric {numeric}", l + 1);
        errors.push(err);
    }
    errors.sort_by(f64::total_cmp);
    let median = errors[errors.len() / 2];
    assert!(median < 0.03, "{what}, layer {}: median relative error {median}", l + 1);
}

#[test]
fn backprop_cnn_gradient_matches_finite_differences() {
    let rows = 8;
    let (x, y) = batch(rows);
    let config = cnn_config(Method::Bp);
    let (before, after) = applied_gradient(&config, &x, &y);
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

#[test]
fn svp_cnn_local_gradients_match_finite_differences() {
    let rows = 8;
    let (x, y) = batch(rows);
    let config = cnn_config(Method::Svp);
    let (before, after) = applied_gradient(&config, &x, &y);
    let heads = ProjectionHeads::from_config(&config, 10);
    let fa = FeatureAlignment { mean_center: false };
    let project = |net: &Network, l: usize, h: &[f32]| {
        // Conv blocks are read out through their adaptive pooling.
        let (read, width) = match net.layer(l) {
            svp_train::Layer::Conv(c) => {
                let pool = c.readout();
                let mut r = vec![0.0; rows * pool.output().len()];
                pool.forward(h, rows, &mut r);
                (r, pool.output().len())
            }
            svp_train::Layer::Dense(d) => (h.to_vec(), d.spec().out_dim),
        };
        let mut v = vec![0.0; rows * heads.dim];
        let mut tile = vec![0.0; 4096];
        heads.for_layer(l + 1, width, true).forward(
            view(&read, rows, width),
            Some(&y),
            Some(0),
            view_mut(&mut v, rows, heads.dim),
            &mut tile,
        );
        v
    };
    // Each layer's local loss as a function of its own parameters (the
    // perturbed network differs from `before` in layer l only), with its input
    // and alignment target from the layers below, as SVP computes them.
    let (heads, y, x, project, fa) = (&heads, &y[..], &x[..], &project, &fa);
    let local = |l: usize| {
        move |net: &Network| {
            let mut net = net.clone();
            let mut tile = vec![0.0; 4096];
            let v_prev = if l == 0 {
                let mut v0 = vec![0.0; rows * heads.dim];
                let input = view(x, rows, 784);
                heads.for_layer(0, 784, false).forward(
                    input,
                    None,
                    None,
                    view_mut(&mut v0, rows, heads.dim),
                    &mut tile,
                );
                v0
            } else {
                let h = forward_to(&mut net, l - 1, x, rows);
                project(&net, l - 1, &h)
            };
            let h = forward_to(&mut net, l, x, rows);
            let v = if l + 1 == net.n_layers() { h } else { project(&net, l, &h) };
            let d = v.len() / rows;
            let mut g = vec![0.0; v.len()];
            let ce = softmax_cross_entropy(view(&v, rows, d), y, &mut g).0 as f64;
            let mut ws = FaWorkspace::new(rows, d.max(heads.dim));
            let fa = fa.loss_and_grad(view(&v, rows, d), view(&v_prev, rows, heads.dim), &mut ws, 1.0, &mut g);
            ce + fa as f64
        }
    };
    for l in 0..before.n_layers() {
        check_layer("SVP local loss", &before, &after, l, local(l));
    }
}

fn train_bits(method: Method, threads: usize) -> Vec<u32> {
    let config = cnn_config(method);
    let data = embedded_subset(256);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let outcome = pool.install(|| svp_train::fit(&config, &data, &mut ()));
    assert!(outcome.diverged.is_none());
    outcome.model.params().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn cnn_training_is_bit_identical_on_one_and_two_threads() {
    for method in [Method::Svp, Method::Bp] {
        assert_eq!(train_bits(method, 1), train_bits(method, 2), "{method}: 1 vs 2 threads");
    }
}
