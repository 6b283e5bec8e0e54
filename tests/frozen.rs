//! Frozen layers (`train.train_from_layer`, `svp finetune --train-from-layer`):
//! the layers below the first trained one never change and hold no optimizer
//! state, and the trained layers learn exactly what they would have learned
//! with everything trained.

use svp_integration_tests::{embedded_subset, small_config};
use svp_train::config::{ConvItem, PoolMarker, VitConfig};
use svp_train::{BpTrainer, Config, FitOptions, Method, Network, SvpTrainer, Trainer};

fn batch(data: &svp_data::DataSplit, rows: usize) -> (Vec<f32>, Vec<u32>) {
    let norm = svp_train::Normalization::of_pixels(&data.train.images);
    let mut b = svp_data::Batcher::new(data.train.len(), rows, norm.table());
    b.start_epoch(1, 0, false);
    let (mut x, mut y) = (vec![0.0; rows * data.features()], vec![0; rows]);
    b.gather(&data.train, 0, &mut x, &mut y);
    (x, y)
}

fn trainer(model: &Network, config: &Config) -> Box<dyn Trainer> {
    match config.train.method {
        Method::Svp => Box::new(SvpTrainer::new(model, config)),
        Method::Bp => Box::new(BpTrainer::new(model, config)),
    }
}

fn network(config: &Config) -> Network {
    Network::try_for_images((28, 28), 10, &config.model, config.train.seed).unwrap()
}

/// Where two parameter slices first differ in bits, and the values there.
fn first_difference(a: &[f32], b: &[f32]) -> Option<(usize, f32, f32)> {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits()).map(|i| (i, a[i], b[i]))
}

/// One step from the same weights, with every layer trained and with the
/// layers below `first` (1-based) frozen: the frozen layers keep their
/// weights, the others get bit for bit the weights the full step gave them.
/// (In one step, a trained layer sees what it would have seen: the layers
/// below it had not moved yet when they computed its input. This holds for
/// layers whose forward is the same in training and inference, so not for
/// BatchNorm, and at a unit boundary for SVP+.)
///
/// Under SGD as well as the config's Adam: Adam's first step moves each
/// weight by about `lr` whatever its gradient's size, so a gradient a little
/// off (an alignment target from another layer) changes a bit here and
/// there at most; SGD's step shows it in every weight.
fn assert_one_step_matches(config: &Config, first: usize) {
    let sgd = svp_optim::Optimizer::Sgd { lr: 0.05, momentum: 0.0, weight_decay: 0.0 };
    for optimizer in [config.optimizer, sgd] {
        assert_one_step_matches_under(&Config { optimizer, ..config.clone() }, first);
    }
}

fn assert_one_step_matches_under(config: &Config, first: usize) {
    let (x, y) = batch(&embedded_subset(64), 64);
    let initial = network(config);
    let mut full = initial.clone();
    trainer(&full, config).step(&mut full, &x, &y, 1.0).unwrap();

    let mut frozen_config = config.clone();
    frozen_config.train.train_from_layer = first;
    let mut frozen = initial.clone();
    trainer(&frozen, &frozen_config).step(&mut frozen, &x, &y, 1.0).unwrap();

    let what = format!("{} ({:?}) with layers below {first} frozen", config.train.method, config.optimizer);
    for l in 0..initial.n_layers() {
        let (got, want) = match l + 1 < first {
            true => (frozen.layer_params(l), initial.layer_params(l)),
            false => (frozen.layer_params(l), full.layer_params(l)),
        };
        assert_eq!(first_difference(got, want), None, "{what}: layer {} (index, got, want)", l + 1);
        if l + 1 >= first {
            assert!(first_difference(got, initial.layer_params(l)).is_some(), "{what}: layer {} was trained", l + 1);
        }
    }
}

#[test]
fn mlp_trained_layers_step_as_in_a_full_step() {
    for method in [Method::Svp, Method::Bp] {
        let mut config = small_config(method, 1);
        config.model.hidden = vec![48, 40, 32];
        for first in [2, 3, 4] {
            assert_one_step_matches(&config, first);
        }
    }
}

#[test]
fn vit_trained_layers_step_as_in_a_full_step() {
    for method in [Method::Svp, Method::Bp] {
        let mut config = small_config(method, 1);
        config.model.vit = Some(VitConfig {
            patch: 7,
            dim: 8,
            depth: 3,
            heads: 2,
            mlp: 16,
            readout: svp_nn::vit::TokenReadout::Cls,
            norm_eps: svp_nn::layer_norm::LAYER_NORM_EPS,
        });
        config.model.hidden = vec![];
        // Layers: patch embedding, 3 blocks, token head, classifier. With
        // plain SVP a unit ends at each block; SVP+ (2 blocks a unit) at block 2.
        // The token head joins the classifier's unit, so training from the
        // classifier (6) is not at a unit boundary for SVP: its alignment
        // target is then projected from the frozen token head's output, not
        // from block 3's, and only backprop steps exactly as in full.
        let firsts: &[usize] = if method == Method::Svp { &[3, 4, 5] } else { &[3, 4, 5, 6] };
        for &first in firsts {
            assert_one_step_matches(&config, first);
        }
        if method == Method::Svp {
            config.svp.layers_per_unit = 2;
            assert_one_step_matches(&config, 4);
        }
    }
}

#[test]
fn frozen_layers_hold_no_optimizer_state_and_less_workspace() {
    for method in [Method::Svp, Method::Bp] {
        let mut config = small_config(method, 1);
        config.model.hidden = vec![256, 128, 64];
        let model = network(&config);
        let full = trainer(&model, &config);
        config.train.train_from_layer = 3;
        let frozen = trainer(&model, &config);
        // Adam: two f32 moments per trained parameter.
        let frozen_params = (0..2).map(|l| model.trainable_len(l)).sum::<usize>();
        assert_eq!(frozen.optimizer_bytes(), full.optimizer_bytes() - 8 * frozen_params, "{method}");
        let states = frozen.optimizer_states();
        assert!(states[..2].iter().all(|s| s.bytes() == 0) && states[2..].iter().all(|s| s.bytes() > 0));
        if method == Method::Bp {
            // Two of four layers' activations and caches are no longer kept.
            assert!(frozen.workspace_bytes() < full.workspace_bytes(), "{method}");
        }
    }
}

/// A conv network fine-tuned with its first block frozen, through the same
/// library path `svp finetune` takes: the frozen block (BatchNorm's running
/// statistics included) is the base model's bit for bit, the rest moved and
/// kept learning.
#[test]
fn a_frozen_conv_block_and_its_batchnorm_statistics_stay_as_they_were() {
    let data = embedded_subset(2000);
    for method in [Method::Svp, Method::Bp] {
        let mut config = small_config(method, 2);
        let m = ConvItem::Pool(PoolMarker::M);
        config.model.conv = vec![ConvItem::Channels(8), m, ConvItem::Channels(16), m];
        config.model.hidden = vec![];
        let base = svp_train::fit(&config, &data, &mut ());
        let base_acc = base.epochs.last().unwrap().test_acc;
        config.train.train_from_layer = 2;
        config.train.seed = 8;
        config.validate_for_data(&data).unwrap();
        let options = FitOptions { initial_params: Some(base.model.params().to_vec()), ..Default::default() };
        let tuned = svp_train::fit_with(&config, &data, &mut (), options);
        assert!(tuned.diverged.is_none());
        for l in 0..base.model.n_layers() {
            let moved = first_difference(tuned.model.layer_params(l), base.model.layer_params(l));
            assert_eq!(moved.is_some(), l > 0, "{method}: layer {}: first change {moved:?}", l + 1);
        }
        let acc = tuned.epochs.last().unwrap().test_acc;
        eprintln!("{method}: {:.1}% -> {:.1}% with the first conv block frozen", 100.0 * base_acc, 100.0 * acc);
        assert!(acc > base_acc, "{method}: fine-tuned with the first conv block frozen: {base_acc} -> {acc}");
    }
}

#[test]
fn train_from_layer_outside_the_network_is_refused() {
    let mut config = small_config(Method::Svp, 1);
    assert_eq!(config.model.layer_count(), 3);
    for bad in [0, 4] {
        config.train.train_from_layer = bad;
        let e = config.validate().unwrap_err().to_string();
        assert!(e.contains(&format!("train.train_from_layer = {bad} must be from 1 to 3")), "{e}");
    }
    config.train.train_from_layer = 3;
    config.validate().unwrap();
}

#[test]
fn the_layer_count_is_the_networks() {
    let mut configs = vec![small_config(Method::Svp, 1)];
    let mut cnn = small_config(Method::Svp, 1);
    cnn.model.conv = vec![ConvItem::Channels(2), ConvItem::Pool(PoolMarker::M), ConvItem::Channels(2)];
    configs.push(cnn);
    let mut vit = small_config(Method::Svp, 1);
    vit.model.vit = Some(VitConfig {
        patch: 7,
        dim: 8,
        depth: 2,
        heads: 2,
        mlp: 8,
        readout: svp_nn::vit::TokenReadout::Mean,
        norm_eps: svp_nn::layer_norm::LAYER_NORM_EPS,
    });
    vit.model.hidden = vec![];
    configs.push(vit);
    for config in configs {
        assert_eq!(config.model.layer_count(), network(&config).n_layers(), "{:?}", config.model);
    }
}
