//! One SVP step and a five-step loss trajectory against PyTorch.
//!
//! `tools/golden/svp_step.py` rebuilds the same tiny network from the seed in
//! PyTorch (weights, projections and their dropout masks through an independent
//! Python implementation of svp-rng), runs Algorithm 1 with autograd and Adam,
//! and writes `tests/golden/svp_step.json`; with `--layers-per-unit 2` it runs
//! blockwise SVP+ instead and writes `tests/golden/svp_plus_step.json`. These
//! tests read both.

use serde_json::Value;
use svp_nn::{DenseCache, Mode};
use svp_tensor::{view, view_mut};
use svp_train::config::{ModelConfig, SvpConfig, TrainConfig};
use svp_train::{Config, Method, Network, SvpTrainer, Trainer};

fn fixture() -> Value {
    serde_json::from_str(include_str!("golden/svp_step.json")).expect("fixture parses")
}

/// SVP+ with units of two hidden layers (four hidden layers, then the head).
fn plus_fixture() -> Value {
    let g: Value = serde_json::from_str(include_str!("golden/svp_plus_step.json")).expect("fixture parses");
    assert_eq!(g["layers_per_unit"].as_u64(), Some(2));
    g
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

fn config(g: &Value, optimizer: svp_optim::Optimizer) -> Config {
    Config {
        model: ModelConfig::mlp(g["hidden"].as_array().unwrap().iter().map(|w| w.as_u64().unwrap() as usize).collect()),
        svp: SvpConfig {
            lambda: g["lambda"].as_f64().unwrap() as f32,
            projection_dropout: g["projection_dropout"].as_f64().unwrap() as f32,
            layers_per_unit: g["layers_per_unit"].as_u64().unwrap_or(1) as usize,
            head_joins_last_unit: g["head_joins_last_unit"].as_bool().unwrap_or(false),
            ..SvpConfig::default()
        },
        train: TrainConfig {
            method: Method::Svp,
            epochs: 1,
            batch_size: g["y"].as_array().unwrap().len(),
            seed: g["seed"].as_u64().unwrap(),
            shuffle: false,
            ..Default::default()
        },
        optimizer,
        schedule: Default::default(),
    }
}

fn adam(g: &Value) -> svp_optim::Optimizer {
    svp_optim::Optimizer::adam(g["lr"].as_f64().unwrap() as f32)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what}[{i}]: svp {a} vs PyTorch {b}");
    }
}

fn setup(g: &Value, optimizer: svp_optim::Optimizer) -> (Config, Network, Vec<f32>, Vec<u32>) {
    let cfg = config(g, optimizer);
    let input = g["input"].as_u64().unwrap() as usize;
    let classes = g["classes"].as_u64().unwrap() as usize;
    let model = Network::new(input, classes, &cfg.model, cfg.train.seed);
    let x = floats(&g["x"]);
    let y: Vec<u32> = g["y"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    (cfg, model, x, y)
}

#[test]
fn initial_weights_match_bit_for_bit() {
    let g = fixture();
    let (_, model, _, _) = setup(&g, adam(&g));
    let layers = g["params_before"].as_array().unwrap();
    assert_eq!(layers.len(), model.n_layers(), "one fixture entry per layer");
    for (l, want) in layers.iter().enumerate() {
        let want = floats(want);
        let got = model.layer_params(l);
        assert_eq!(got.len(), want.len(), "layer {} parameter count", l + 1);
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "layer {} init", l + 1);
    }
}

#[test]
fn projections_and_local_logits_match() {
    let g = fixture();
    let (cfg, model, x, y) = setup(&g, adam(&g));
    let heads = cfg.projection_heads(model.classes());
    let rows = y.len();
    let mut h = x.clone();
    let mut cache = DenseCache::new(rows, 16);
    let mut tile = vec![0.0; 64];
    for (l, layer) in model.layers().iter().enumerate() {
        let spec = *layer.spec();
        let mut out = vec![0.0; rows * spec.out_dim];
        let mode = Mode::Train { seed: cfg.train.seed, step: 0 };
        layer.forward(model.layer_params(l), view(&h, rows, spec.in_dim), &mut cache, &mut out, mode);
        let v = if l + 1 < model.layers().len() {
            let p = heads.for_layer(l + 1, spec.out_dim, true);
            let mut v = vec![0.0; rows * heads.dim];
            p.forward(view(&out, rows, spec.out_dim), Some(&y), Some(0), view_mut(&mut v, rows, heads.dim), &mut tile);
            v
        } else {
            out.clone()
        };
        assert_close(&format!("v_{}", l + 1), &v, &floats(&g["layers"][l]["v"]), 1e-5);
        h = out;
    }
}

/// One step against the fixture: each local loss (where the fixture has one:
/// plain SVP everywhere, SVP+ at unit outputs), every layer after Adam, and
/// every layer's gradient (one SGD step with lr = 1 moves each weight by minus it).
fn check_one_step(g: &Value) {
    let (cfg, mut model, x, y) = setup(g, adam(g));
    let mut trainer = SvpTrainer::new(&model, &cfg);
    trainer.step(&mut model, &x, &y, 1.0).unwrap();
    let m = trainer.layer_metrics().unwrap();
    assert_eq!(g["layers"].as_array().unwrap().len(), model.layers().len(), "one fixture entry per layer");
    let mut with_losses = Vec::new();
    for l in 0..model.layers().len() {
        let want = &g["layers"][l];
        // Every entry names both losses; null where the layer has none (inside an SVP+ unit).
        assert!(want.get("ce").is_some() && want.get("fa").is_some(), "layer {}: no ce/fa keys", l + 1);
        if let (Some(ce), Some(fa)) = (want["ce"].as_f64(), want["fa"].as_f64()) {
            let (got_ce, got_fa) = (m.ce_sum[l] as f32, m.fa_sum[l] as f32);
            assert_close(&format!("layer {} CE", l + 1), &[got_ce], &[ce as f32], 1e-5);
            assert_close(&format!("layer {} FA", l + 1), &[got_fa], &[fa as f32], 1e-5);
            with_losses.push(l);
        }
        assert_close(
            &format!("layer {} after Adam", l + 1),
            model.layer_params(l),
            &floats(&want["params_after"]),
            2e-5,
        );
    }
    assert_eq!(with_losses, unit_ends(g), "the losses compared are those of every unit");
    let sgd = svp_optim::Optimizer::Sgd { lr: 1.0, momentum: 0.0, weight_decay: 0.0 };
    let (cfg, mut model, x, y) = setup(g, sgd);
    let before = model.params().to_vec();
    let mut trainer = SvpTrainer::new(&model, &cfg);
    trainer.step(&mut model, &x, &y, 1.0).unwrap();
    let mut offset = 0;
    for l in 0..model.layers().len() {
        let n = model.layer_params(l).len();
        let grad: Vec<f32> = (0..n).map(|i| before[offset + i] - model.params()[offset + i]).collect();
        assert_close(&format!("layer {} gradient", l + 1), &grad, &floats(&g["layers"][l]["grad"]), 1e-5);
        offset += n;
    }
}

/// The layers (0-based) that end a unit, where the local losses sit, from
/// the fixture's own description: hidden layers in runs of
/// `layers_per_unit`, then the head, which takes the last run in when
/// `head_joins_last_unit`.
fn unit_ends(g: &Value) -> Vec<usize> {
    let hidden = g["hidden"].as_array().unwrap().len();
    let per_unit = g["layers_per_unit"].as_u64().unwrap_or(1) as usize;
    let mut ends: Vec<usize> = (0..hidden).filter(|&l| (l + 1) % per_unit == 0 || l + 1 == hidden).collect();
    if g["head_joins_last_unit"].as_bool().unwrap_or(false) {
        ends.pop();
    }
    ends.push(hidden);
    ends
}

fn check_trajectory(g: &Value) {
    let (cfg, mut model, x, y) = setup(g, adam(g));
    let mut trainer = SvpTrainer::new(&model, &cfg);
    let losses: Vec<f32> = (0..5).map(|_| trainer.step(&mut model, &x, &y, 1.0).unwrap()).collect();
    assert_close("head loss per step", &losses, &floats(&g["head_loss_per_step"]), 2e-5);
}

#[test]
fn one_step_losses_gradients_and_adam_update_match() {
    check_one_step(&fixture());
}

#[test]
fn svp_plus_one_step_matches_blockwise_backprop() {
    check_one_step(&plus_fixture());
}

#[test]
fn svp_plus_five_step_loss_trajectory_matches() {
    check_trajectory(&plus_fixture());
}

/// SVP+ over four hidden layers in units of two, the head inside the second unit.
fn plus_head_fixture() -> Value {
    let g: Value = serde_json::from_str(include_str!("golden/svp_plus_head_step.json")).expect("fixture parses");
    assert_eq!(g["head_joins_last_unit"].as_bool(), Some(true));
    g
}

#[test]
fn svp_plus_with_the_head_in_the_last_unit_matches() {
    check_one_step(&plus_head_fixture());
    check_trajectory(&plus_head_fixture());
}

#[test]
fn five_step_loss_trajectory_matches() {
    check_trajectory(&fixture());
}

/// svp's vision blocks against PyTorch's own modules (float64), from
/// `tools/golden/vision_blocks.py`.
fn vision_fixture() -> Value {
    serde_json::from_str(include_str!("golden/vision_blocks.json")).expect("fixture parses")
}

/// Element by element within `tol` relative to the larger of 1 and the value.
fn assert_near(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f32;
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let err = (a - b).abs() / b.abs().max(1.0);
        worst = worst.max(err);
        assert!(err <= tol, "{what}[{i}]: svp {a} vs PyTorch {b}");
    }
    eprintln!("{what}: worst relative error {worst:.2e}");
}

/// A pre-norm transformer block with PyTorch's MultiheadAttention (q, k, v
/// stacked in `in_proj_weight`, heads splitting each contiguously): the
/// same output, parameter gradients and input gradient.
#[test]
fn transformer_block_matches_pytorch() {
    use svp_nn::vit::{BlockCache, BlockScratch, BlockSpec, TransformerBlock};
    let g = &vision_fixture()["transformer"];
    let n = |k: &str| g[k].as_u64().unwrap() as usize;
    let spec = BlockSpec { tokens: n("tokens"), dim: n("dim"), heads: n("heads"), mlp: n("mlp") };
    let block = TransformerBlock::new(spec);
    let rows = n("rows");
    let params = floats(&g["params"]);
    assert_eq!(params.len(), block.param_len());
    let x = floats(&g["x"]);
    let mut cache = BlockCache::try_new(&spec, rows).unwrap();
    let mut scratch = BlockScratch::try_new(&spec, rows).unwrap();
    let mut out = vec![f32::NAN; x.len()];
    block.forward(&params, &x, rows, &mut cache, &mut scratch, &mut out);
    assert_near("transformer output", &out, &floats(&g["out"]), 1e-5);
    let mut dout = floats(&g["probe"]);
    let (mut grad, mut dx) = (vec![f32::NAN; params.len()], vec![f32::NAN; x.len()]);
    block.backward(&params, rows, &cache, &mut scratch, &mut dout, &mut grad, Some(&mut dx));
    assert_near("transformer parameter gradient", &grad, &floats(&g["grad"]), 1e-4);
    assert_near("transformer input gradient", &dx, &floats(&g["dx"]), 1e-4);
}

/// A conv block in training mode (BatchNorm on the batch's statistics):
/// the same output, gradients, and running statistics after the step
/// (PyTorch keeps the unbiased variance, with momentum 0.1).
#[test]
fn conv_block_matches_pytorch_in_training() {
    use svp_nn::conv_block::{ConvBlock, ConvBlockCache, ConvBlockScratch, ConvBlockSpec};
    let g = &vision_fixture()["conv_block"];
    let n = |k: &str| g[k].as_u64().unwrap() as usize;
    let spec = ConvBlockSpec {
        in_channels: n("in_channels"),
        in_h: n("h"),
        in_w: n("w"),
        out_channels: n("out_channels"),
        pool: true,
        readout: 2,
    };
    let block = ConvBlock::new(spec, 1);
    let rows = n("rows");
    let mut params = floats(&g["params"]);
    assert_eq!(params.len(), block.param_len());
    let x = floats(&g["x"]);
    let mut cache = ConvBlockCache::try_new(&block, rows).unwrap();
    let mut scratch = ConvBlockScratch::try_new(&block, rows).unwrap();
    let mut out = vec![f32::NAN; rows * block.output().len()];
    block.forward(&mut params, &x, rows, &mut cache, &mut scratch, &mut out, Mode::Train { seed: 1, step: 0 });
    assert_near("conv block output", &out, &floats(&g["out"]), 1e-5);
    let c = spec.out_channels;
    let running = &params[block.trainable_len()..];
    assert_near("running statistics", &running[..2 * c], &floats(&g["running_after"]), 1e-5);
    let (mut grad, mut dx) = (vec![f32::NAN; block.trainable_len()], vec![f32::NAN; x.len()]);
    block.backward(&params, &x, rows, &cache, &mut scratch, &floats(&g["probe"]), &mut grad, Some(&mut dx));
    assert_near("conv block parameter gradient", &grad, &floats(&g["grad"]), 1e-4);
    assert_near("conv block input gradient", &dx, &floats(&g["dx"]), 1e-4);
}

/// One SVP+ step of a small ViT or CNN, from `tools/golden/vision_step.py`:
/// PyTorch's own modules in float64, svp's layout, projections from the seed.
fn vision_step_fixture(network: &str) -> Value {
    let text = match network {
        "vit" => include_str!("golden/vit_svp_plus_step.json"),
        _ => include_str!("golden/cnn_svp_plus_step.json"),
    };
    serde_json::from_str(text).expect("fixture parses")
}

/// The fixture's run config and network, its parameters loaded, and the batch.
fn vision_setup(g: &Value, optimizer: svp_optim::Optimizer) -> (Config, Network, Vec<f32>, Vec<u32>) {
    use svp_train::config::VitConfig;
    let m = &g["model"];
    let n = |v: &Value| v.as_u64().unwrap() as usize;
    let mut model = ModelConfig::mlp(vec![]);
    match m["kind"].as_str() {
        Some("vit") => {
            model.vit = Some(VitConfig {
                patch: n(&m["patch"]),
                dim: n(&m["dim"]),
                depth: n(&m["depth"]),
                heads: n(&m["heads"]),
                mlp: n(&m["mlp"]),
                readout: svp_nn::vit::TokenReadout::Cls,
                norm_eps: svp_nn::layer_norm::LAYER_NORM_EPS,
            })
        }
        _ => {
            model.conv = serde_json::from_value(m["conv"].clone()).expect("conv list");
            model.conv_readout = n(&m["conv_readout"]);
        }
    }
    let y: Vec<u32> = g["y"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let cfg = Config {
        model,
        svp: SvpConfig {
            lambda: g["lambda"].as_f64().unwrap() as f32,
            projection_dropout: g["projection_dropout"].as_f64().unwrap() as f32,
            projection_dim: Some(n(&g["projection_dim"])),
            layers_per_unit: n(&g["layers_per_unit"]),
            ..SvpConfig::default()
        },
        train: TrainConfig {
            method: Method::Svp,
            epochs: 1,
            batch_size: y.len(),
            seed: g["seed"].as_u64().unwrap(),
            shuffle: false,
            ..Default::default()
        },
        optimizer,
        schedule: Default::default(),
    };
    let image = (n(&m["image"][0]), n(&m["image"][1]));
    let mut net = Network::try_for_images(image, n(&g["classes"]), &cfg.model, cfg.train.seed).unwrap();
    let before = g["params_before"].as_array().unwrap();
    assert_eq!(before.len(), net.n_layers(), "one fixture entry per layer");
    for (l, p) in before.iter().enumerate() {
        let p = floats(p);
        let dst = net.layer_params_mut(l);
        assert_eq!(dst.len(), p.len(), "layer {} parameter count (svp's layout)", l + 1);
        dst.copy_from_slice(&p);
    }
    (cfg, net, floats(&g["x"]), y)
}

/// Below this, a fixture's gradient is zero in exact arithmetic: those
/// measure at most 5.2e-16 in the float64 fixtures (the smallest other is
/// 1.5e-5), and at most 9e-8 in svp's step.
const ZERO_GRADIENT: f32 = 1e-6;

fn check_vision_step(network: &str) {
    let g = vision_step_fixture(network);
    let opt: svp_optim::Optimizer = serde_json::from_value(g["optimizer"].clone()).expect("optimizer");
    let (cfg, mut model, x, y) = vision_setup(&g, opt);
    let want_units: Vec<Vec<usize>> = serde_json::from_value(g["units"].clone()).unwrap();
    let got_units: Vec<Vec<usize>> =
        svp_train::units(&model, cfg.svp.layers_per_unit, false).into_iter().map(|u| u.collect()).collect();
    assert_eq!(got_units, want_units, "svp groups the layers into the fixture's units");

    let mut trainer = SvpTrainer::new(&model, &cfg);
    trainer.step(&mut model, &x, &y, 1.0).unwrap();
    let m = trainer.layer_metrics().unwrap();
    let unit_ends: Vec<usize> = want_units.iter().map(|u| *u.last().unwrap()).collect();
    let mut noise_only = 0;
    for l in 0..model.n_layers() {
        let want = &g["layers"][l];
        match (want["ce"].as_f64(), want["fa"].as_f64()) {
            (Some(ce), Some(fa)) => {
                assert!(unit_ends.contains(&l), "layer {} has a local loss only at a unit's end", l + 1);
                assert_near(&format!("{network} layer {} CE", l + 1), &[m.ce_sum[l] as f32], &[ce as f32], 1e-6);
                assert_near(&format!("{network} layer {} FA", l + 1), &[m.fa_sum[l] as f32], &[fa as f32], 1e-6);
            }
            _ => assert!(!unit_ends.contains(&l), "layer {}: the fixture has no losses at a unit's end", l + 1),
        }
        // Weights after the optimizer step, a conv block's running statistics
        // too, except where the gradient is zero in exact arithmetic (a conv
        // bias under BatchNorm, the attention's key bias): Adam's first step
        // moves a weight by about lr * sign(g), and there the sign is f32
        // rounding noise in svp (and would be in PyTorch's f32).
        let (after, grad) = (floats(&want["params_after"]), floats(&want["grad"]));
        let keep = |i: &usize| grad.get(*i).is_none_or(|g| g.abs() >= ZERO_GRADIENT);
        let pick = |v: &[f32]| v.iter().enumerate().filter(|(i, _)| keep(i)).map(|(_, &x)| x).collect::<Vec<_>>();
        noise_only += after.len() - pick(&after).len();
        let what = format!("{network} layer {} after the step", l + 1);
        assert_near(&what, &pick(model.layer_params(l)), &pick(&after), 1e-6);
    }
    eprintln!("{network}: {noise_only} weights with a zero exact gradient left out of the comparison after Adam");

    // The gradients: one SGD step with lr = 1 moves each weight by minus its gradient.
    let sgd = svp_optim::Optimizer::Sgd { lr: 1.0, momentum: 0.0, weight_decay: 0.0 };
    let (cfg, mut model, x, y) = vision_setup(&g, sgd);
    let before: Vec<Vec<f32>> = (0..model.n_layers()).map(|l| model.layer_params(l).to_vec()).collect();
    SvpTrainer::new(&model, &cfg).step(&mut model, &x, &y, 1.0).unwrap();
    for (l, before) in before.iter().enumerate() {
        let n = model.trainable_len(l);
        let grad: Vec<f32> = before[..n].iter().zip(model.layer_params(l)).map(|(b, a)| b - a).collect();
        assert_near(&format!("{network} layer {} gradient", l + 1), &grad, &floats(&g["layers"][l]["grad"]), 1e-5);
    }

    let (cfg, mut model, x, y) = vision_setup(&g, opt);
    let mut trainer = SvpTrainer::new(&model, &cfg);
    let want = floats(&g["head_loss_per_step"]);
    let losses: Vec<f32> = want.iter().map(|_| trainer.step(&mut model, &x, &y, 1.0).unwrap()).collect();
    assert_near(&format!("{network} head loss per step"), &losses, &want, 2e-6);
}

/// SVP+ on a ViT (units of two transformer blocks, the patch embedding in
/// the first, the class token projected; AdamW) against PyTorch.
#[test]
fn vit_svp_plus_step_matches_pytorch() {
    check_vision_step("vit");
}

/// SVP+ on a CNN (units of two conv blocks, BatchNorm on the batch, the
/// output read through 2x2 adaptive pooling and projected; Adam) against PyTorch.
#[test]
fn cnn_svp_plus_step_matches_pytorch() {
    check_vision_step("cnn");
}
