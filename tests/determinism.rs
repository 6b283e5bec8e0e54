//! Same seed and config give the same bits: run to run, and on any number of
//! threads (the GEMM splits its work by the thread count: 1, 2, 3 and 8).

use svp_integration_tests::{embedded_subset, small_config};
use svp_train::{Method, fit};

/// Thread counts every determinism check runs on: one, the CI machine's two,
/// an odd split, and more threads than cores.
const THREADS: [usize; 4] = [1, 2, 3, 8];

fn train_bits(method: Method, threads: usize, mutate: impl Fn(&mut svp_train::Config)) -> Vec<u32> {
    let mut config = small_config(method, 1);
    mutate(&mut config);
    let data = embedded_subset(640);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let outcome = pool.install(|| fit(&config, &data, &mut ()));
    assert!(outcome.diverged.is_none());
    outcome.model.params().iter().map(|v| v.to_bits()).collect()
}

fn assert_same(a: &[u32], b: &[u32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {} against {} weights", a.len(), b.len());
    let differing = a.iter().zip(b).filter(|(x, y)| x != y).count();
    assert_eq!(differing, 0, "{what}: {differing} of {} weights differ", a.len());
}

/// Trains on every count of [`THREADS`], asserts the same bits each time,
/// and returns them.
fn same_on_every_thread_count(method: Method, what: &str, mutate: impl Fn(&mut svp_train::Config)) -> Vec<u32> {
    let first = train_bits(method, THREADS[0], &mutate);
    for &threads in &THREADS[1..] {
        let other = train_bits(method, threads, &mutate);
        assert_same(&first, &other, &format!("{what}, {} vs {threads} threads", THREADS[0]));
    }
    first
}

/// The bits a fresh network of `small_config` starts from.
fn initial_bits() -> Vec<u32> {
    let config = small_config(Method::Svp, 1);
    let net = svp_train::Network::try_for_images((28, 28), 10, &config.model, config.train.seed).unwrap();
    net.params().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn svp_is_bit_identical_run_to_run_and_across_thread_counts() {
    let trained = same_on_every_thread_count(Method::Svp, "SVP", |_| {});
    assert_same(&trained, &train_bits(Method::Svp, 2, |_| {}), "SVP run to run");
    // And it trained: nearly every weight moved from its initial value (an
    // untouched network would pass every comparison above).
    let initial = initial_bits();
    let moved = trained.iter().zip(&initial).filter(|(a, b)| a != b).count();
    assert!(moved > initial.len() * 9 / 10, "only {moved} of {} weights moved", initial.len());
}

#[test]
fn bp_is_bit_identical_run_to_run_and_across_thread_counts() {
    let trained = same_on_every_thread_count(Method::Bp, "BP", |_| {});
    assert_same(&trained, &train_bits(Method::Bp, 2, |_| {}), "BP run to run");
    let initial = initial_bits();
    let moved = trained.iter().zip(&initial).filter(|(a, b)| a != b).count();
    assert!(moved > initial.len() * 9 / 10, "only {moved} of {} weights moved", initial.len());
}

#[test]
fn every_svp_option_stays_deterministic() {
    // Dropout on R and on activations, label concatenation, centring, a wide
    // projection that needs several tiles, and wider layers that take the
    // parallel paths of the row loops.
    let mutate = |c: &mut svp_train::Config| {
        c.model.hidden = vec![512, 300];
        c.model.dropout = 0.1;
        c.svp.projection_dim = Some(64);
        c.svp.projection_dropout = 0.2;
        c.svp.label_concat = true;
        c.svp.mean_center = true;
        c.svp.tile_bytes = 8 * 1024;
    };
    same_on_every_thread_count(Method::Svp, "SVP with every option", mutate);
}

#[test]
fn svp_plus_stays_deterministic() {
    // Units of two hidden layers over three: one full unit and one of a
    // single layer, with dropout inside the units.
    let mutate = |c: &mut svp_train::Config| {
        c.model.hidden = vec![256, 200, 128];
        c.model.dropout = 0.1;
        c.svp.layers_per_unit = 2;
    };
    let one = same_on_every_thread_count(Method::Svp, "SVP+", mutate);
    let plain = train_bits(Method::Svp, 2, |c| {
        c.model.hidden = vec![256, 200, 128];
        c.model.dropout = 0.1;
    });
    assert!(one != plain, "units of two train differently from plain SVP");
}

#[test]
fn the_seed_matters() {
    let a = train_bits(Method::Svp, 2, |_| {});
    let b = train_bits(Method::Svp, 2, |c| c.train.seed = 8);
    assert!(a.iter().zip(&b).filter(|(x, y)| x != y).count() > a.len() / 2);
}

/// Collects every checkpoint a run offers.
struct Collect(Vec<svp_train::FitState>);

impl svp_train::FitObserver for Collect {
    fn on_checkpoint(&mut self, state: &svp_train::FitStateRef<'_>) -> Result<(), String> {
        self.0.push(state.to_owned_state());
        Ok(())
    }
}

fn resume_case(method: Method, mutate: impl Fn(&mut svp_train::Config)) {
    use svp_train::{FitOptions, fit_with};
    let mut config = small_config(method, 2);
    mutate(&mut config);
    let data = embedded_subset(640); // 10 batches of 64 per epoch
    let full = fit(&config, &data, &mut ());
    let mut seen = Collect(Vec::new());
    let with_checkpoints =
        fit_with(&config, &data, &mut seen, FitOptions { checkpoint_every: Some(7), ..Default::default() });
    assert_same(&bits(&with_checkpoints.model), &bits(&full.model), "taking checkpoints changed the run");
    // Steps 7 and 14, and the end of each epoch.
    let positions: Vec<(usize, usize)> = seen.0.iter().map(|s| (s.epoch, s.next_batch)).collect();
    assert_eq!(positions, vec![(1, 7), (2, 0), (2, 4), (3, 0)], "{method:?}");
    for state in seen.0 {
        let at = (state.epoch, state.next_batch);
        let resumed = fit_with(&config, &data, &mut (), FitOptions { resume: Some(state), ..Default::default() });
        assert!(resumed.diverged.is_none() && resumed.interrupted.is_none());
        assert_same(&bits(&resumed.model), &bits(&full.model), &format!("{method:?} resumed at {at:?}"));
    }
}

fn bits(m: &svp_train::Network) -> Vec<u32> {
    m.params().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn resuming_svp_from_any_checkpoint_is_bit_identical() {
    resume_case(Method::Svp, |c| {
        c.svp.projection_dropout = 0.2;
        c.model.dropout = 0.1;
    });
}

#[test]
fn resuming_bp_from_any_checkpoint_is_bit_identical() {
    resume_case(Method::Bp, |_| {});
}

/// bf16 moments round stochastically with noise keyed by each layer's step
/// count, which the checkpoint carries.
#[test]
fn resuming_with_bf16_moments_is_bit_identical() {
    resume_case(Method::Svp, |c| {
        assert!(matches!(c.optimizer, svp_optim::Optimizer::Adam { .. }), "the small config uses Adam");
        c.optimizer = c.optimizer.with_moments(svp_optim::MomentDtype::Bf16);
    });
}

#[test]
fn head_lambda_weights_only_the_heads_alignment() {
    use svp_train::{Network, SvpTrainer, Trainer};
    let data = embedded_subset(64);
    let norm = svp_train::Normalization::of_pixels(&data.train.images);
    let mut b = svp_data::Batcher::new(64, 64, norm.table());
    b.start_epoch(1, 0, false);
    let (mut x, mut y) = (vec![0.0; 64 * 784], vec![0; 64]);
    b.gather(&data.train, 0, &mut x, &mut y);
    let one_step = |mutate: &dyn Fn(&mut svp_train::Config)| {
        let mut c = small_config(Method::Svp, 1);
        mutate(&mut c);
        let mut m = Network::new(784, 10, &c.model, c.train.seed);
        SvpTrainer::new(&m, &c).step(&mut m, &x, &y, 1.0).unwrap();
        m
    };
    let default = one_step(&|_| {});
    let head_off = one_step(&|c| c.svp.head_lambda = Some(0.0));
    let all_off = one_step(&|c| c.svp.lambda = 0.0);
    let head = default.layers().len() - 1;
    // The head's first step sees the same input in all three runs (earlier
    // layers' updates come after their outputs are computed).
    assert_eq!(head_off.layer_params(head), all_off.layer_params(head), "head without FA = head with lambda 0");
    assert_ne!(head_off.layer_params(head), default.layer_params(head), "head_lambda changes the head");
    assert_eq!(head_off.layer_params(0), default.layer_params(0), "and nothing below it");
}

#[test]
fn resuming_a_cnn_is_bit_identical() {
    // BatchNorm's running statistics live in the parameters, so a checkpoint carries them.
    use svp_train::config::{ConvItem, PoolMarker};
    for method in [Method::Svp, Method::Bp] {
        resume_case(method, |c| {
            c.model.conv = vec![ConvItem::Channels(4), ConvItem::Pool(PoolMarker::M), ConvItem::Channels(4)];
            c.model.hidden = vec![32];
        });
    }
}

/// Five steps driven by hand, so the trainer's update path can be chosen.
fn step_bits(method: Method, fused: bool, mutate: impl Fn(&mut svp_train::Config)) -> Vec<u32> {
    use svp_train::{BpTrainer, Network, SvpTrainer, Trainer};
    let mut config = small_config(method, 1);
    mutate(&mut config);
    let data = embedded_subset(640);
    let seed = config.train.seed;
    let mut model = Network::try_for_images(data.train.image_shape, data.classes, &config.model, seed).unwrap();
    let mut trainer: Box<dyn Trainer> = match method {
        Method::Svp => Box::new(SvpTrainer::new(&model, &config)),
        Method::Bp => Box::new(BpTrainer::new(&model, &config)),
    };
    if !fused {
        trainer.store_weight_gradients(&model).expect("memory");
    }
    let rows = config.train.batch_size;
    let mut batcher =
        svp_data::Batcher::new(data.train.len(), rows, svp_train::Normalization::of_pixels(&data.train.images).table());
    batcher.start_epoch(seed, 0, true);
    let (mut x, mut y) = (vec![0.0; rows * data.features()], vec![0; rows]);
    for b in 0..5 {
        let n = batcher.gather(&data.train, b, &mut x, &mut y);
        trainer.step(&mut model, &x[..n * data.features()], &y[..n], 1.0).expect("finite loss");
    }
    model.params().iter().map(|v| v.to_bits()).collect()
}

/// Dense weights updated from the GEMM's tiles (never stored) give the bits
/// of the update from a stored gradient, for both trainers, units of two
/// layers (an input gradient computed before the update), SGD and Adam with
/// bf16 moments.
#[test]
fn fused_weight_updates_change_no_bit() {
    let svp_plus = |c: &mut svp_train::Config| {
        c.model.hidden = vec![256, 200, 128];
        c.svp.layers_per_unit = 2;
    };
    let sgd = |c: &mut svp_train::Config| {
        c.optimizer = svp_optim::Optimizer::Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-4 }
    };
    let bf16 = |c: &mut svp_train::Config| c.optimizer = c.optimizer.with_moments(svp_optim::MomentDtype::Bf16);
    for (method, what) in [(Method::Svp, "SVP"), (Method::Bp, "BP")] {
        assert_same(&step_bits(method, true, |_| {}), &step_bits(method, false, |_| {}), what);
        assert_same(&step_bits(method, true, sgd), &step_bits(method, false, sgd), &format!("{what} with SGD"));
        let with_bf16 = format!("{what} with bf16 moments");
        assert_same(&step_bits(method, true, bf16), &step_bits(method, false, bf16), &with_bf16);
    }
    assert_same(&step_bits(Method::Svp, true, svp_plus), &step_bits(Method::Svp, false, svp_plus), "SVP+");
}
