//! The device trainer (`svp_train::device`) against the CPU engine.
//!
//! On the host reference backend it runs everywhere: its SVP and BP steps
//! follow the CPU trainers', its checkpoints resume bit for bit, and what it
//! cannot do yet it refuses in one line. On a GPU (a build with the `cuda`
//! feature, on a machine with one) it is checked against the host backend
//! and the CPU's accuracy; without one those tests say "skipped: no CUDA
//! device".

use svp_integration_tests::{embedded_subset, small_config};
use svp_train::device::{DeviceTrainer, HostBackend, TrainOn};
use svp_train::{BpTrainer, FitError, Method, Network, SvpTrainer, Trainer, try_fit_on};

/// `steps` steps of `trainer` on the first batches of the embedded subset;
/// the weights after them (brought to the host) and each step's loss.
fn run_steps(config: &svp_train::Config, mut trainer: Box<dyn Trainer>, steps: usize) -> (Network, Vec<f32>) {
    let data = embedded_subset(64 * steps);
    let mut model = Network::try_for_images(data.train.image_shape, data.classes, &config.model, config.train.seed)
        .expect("memory");
    let rows = config.train.batch_size;
    let norm = svp_train::Normalization::of_pixels(&data.train.images);
    let mut batcher = svp_data::Batcher::new(data.train.len(), rows, norm.table());
    batcher.start_epoch(config.train.seed, 0, true);
    let (mut x, mut y) = (vec![0.0; rows * data.features()], vec![0; rows]);
    let mut losses = Vec::new();
    for b in 0..steps {
        let n = batcher.gather(&data.train, b, &mut x, &mut y);
        let lr_scale = 1.0 - b as f32 / (2 * steps) as f32;
        losses.push(trainer.step(&mut model, &x[..n * data.features()], &y[..n], lr_scale).expect("finite loss"));
    }
    trainer.sync_to_host(&mut model).expect("host backend");
    (model, losses)
}

/// The weights' bits.
fn bits(model: &Network) -> Vec<u32> {
    model.params().iter().map(|v| v.to_bits()).collect()
}

/// Six steps of the CPU trainer and of the device trainer on the host
/// backend give the same bits: the device trainer composes the CPU
/// engine's own kernels in the CPU trainers' order (with the weight
/// gradient stored, which the CPU's fused path matches bit for bit), so
/// any difference is a fault in its logic.
fn same_bits_as_the_cpu(method: Method, what: &str, mutate: impl Fn(&mut svp_train::Config)) {
    let mut config = small_config(method, 1);
    mutate(&mut config);
    let model = Network::try_for_images((28, 28), 10, &config.model, config.train.seed).unwrap();
    let cpu: Box<dyn Trainer> = match method {
        Method::Svp => Box::new(SvpTrainer::new(&model, &config)),
        Method::Bp => Box::new(BpTrainer::new(&model, &config)),
    };
    let device = Box::new(DeviceTrainer::try_new(HostBackend::new(), &model, &config).unwrap());
    let (want, want_losses) = run_steps(&config, cpu, 6);
    let (got, got_losses) = run_steps(&config, device, 6);
    assert_eq!(got_losses, want_losses, "{what}: losses");
    for l in 0..got.n_layers() {
        let differ = got.layer_params(l).iter().zip(want.layer_params(l)).filter(|(g, w)| g.to_bits() != w.to_bits());
        assert_eq!(differ.count(), 0, "{what}: layer {}'s weights differ", l + 1);
    }
    assert_ne!(got.params(), model.params(), "{what}: trained");
}

#[test]
fn host_backend_gives_the_cpu_trainers_bits() {
    same_bits_as_the_cpu(Method::Bp, "BP", |_| {});
    same_bits_as_the_cpu(Method::Svp, "SVP", |_| {});
    same_bits_as_the_cpu(Method::Svp, "SVP, mean-centred alignment", |c| c.svp.mean_center = true);
    same_bits_as_the_cpu(Method::Svp, "SVP, no input alignment", |c| {
        c.svp.first_layer_alignment = svp_train::config::FirstLayerAlignment::Off
    });
    same_bits_as_the_cpu(Method::Svp, "SVP, projection dropout", |c| c.svp.projection_dropout = 0.2);
    same_bits_as_the_cpu(Method::Svp, "SVP, d' = 32, head lambda 0.5", |c| {
        c.svp.projection_dim = Some(32);
        c.svp.head_lambda = Some(0.5);
    });
    same_bits_as_the_cpu(Method::Svp, "SVP, lambda 0", |c| c.svp.lambda = 0.0);
    same_bits_as_the_cpu(Method::Svp, "SVP, no norm", |c| c.model.norm = svp_nn::Norm::None);
    same_bits_as_the_cpu(Method::Bp, "BP, no norm, AdamW", |c| {
        c.model.norm = svp_nn::Norm::None;
        c.optimizer = svp_optim::Optimizer::AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            state: svp_optim::MomentDtype::F32,
        };
    });
}

/// Collects every checkpoint a run offers.
struct Collect(Vec<svp_train::FitState>);

impl svp_train::FitObserver for Collect {
    fn on_checkpoint(&mut self, state: &svp_train::FitStateRef<'_>) -> Result<(), String> {
        self.0.push(state.to_owned_state());
        Ok(())
    }
}

fn fit_on(
    on: TrainOn,
    config: &svp_train::Config,
    data: &svp_data::DataSplit,
    options: svp_train::FitOptions,
) -> svp_train::FitOutcome {
    let outcome = try_fit_on(on, config, data, &mut Collect(Vec::new()), options).expect("runs");
    assert!(outcome.diverged.is_none() && outcome.interrupted.is_none());
    outcome
}

/// A whole run through the epoch loop (evaluation after each epoch,
/// checkpoints, the model brought back from the device) gives the CPU's
/// model and accuracy; resuming from any of its checkpoints (weights and
/// Adam's moments brought back, then uploaded again) gives the same bits
/// as the run that never stopped.
#[test]
fn host_backend_runs_and_resumes_as_the_cpu_does() {
    use svp_train::FitOptions;
    for method in [Method::Svp, Method::Bp] {
        let config = small_config(method, 2);
        let data = embedded_subset(640); // 10 batches of 64 per epoch
        let cpu = fit_on(TrainOn::Cpu, &config, &data, FitOptions::default());
        let mut seen = Collect(Vec::new());
        let options = FitOptions { checkpoint_every: Some(7), ..Default::default() };
        let device = try_fit_on(TrainOn::HostBackend, &config, &data, &mut seen, options).expect("runs");
        assert!(bits(&device.model) == bits(&cpu.model), "{method:?}: the device trainer's run");
        let accuracy = |o: &svp_train::FitOutcome| o.epochs.iter().map(|e| e.test_acc).collect::<Vec<_>>();
        assert_eq!(accuracy(&device), accuracy(&cpu), "{method:?}");
        assert_eq!(seen.0.len(), 4, "{method:?}: steps 7 and 14 and each epoch's end");
        for state in seen.0 {
            let at = (state.epoch, state.next_batch);
            let resumed =
                fit_on(TrainOn::HostBackend, &config, &data, FitOptions { resume: Some(state), ..Default::default() });
            assert!(bits(&resumed.model) == bits(&cpu.model), "{method:?} resumed at {at:?}");
        }
    }
}

/// What the device trainer does not do yet, and a GPU this build or
/// machine lacks, each fail in one line before anything trains.
#[test]
fn what_a_device_cannot_do_is_one_line() {
    let data = embedded_subset(128);
    let refused = |on: TrainOn, mutate: &dyn Fn(&mut svp_train::Config)| {
        let mut config = small_config(Method::Svp, 1);
        mutate(&mut config);
        match try_fit_on(on, &config, &data, &mut (), Default::default()) {
            Err(FitError::Device(e)) => e.to_string(),
            Err(e) => panic!("not a device error: {e}"),
            Ok(_) => panic!("trained"),
        }
    };
    let sgd = refused(TrainOn::HostBackend, &|c| {
        c.optimizer = svp_optim::Optimizer::Sgd { lr: 0.1, momentum: 0.0, weight_decay: 0.0 }
    });
    assert_eq!(
        sgd,
        "svp cannot train this on a GPU yet: SGD (Adam and AdamW are there); train it on the CPU (--device cpu)"
    );
    let units = refused(TrainOn::HostBackend, &|c| c.svp.layers_per_unit = 2);
    assert!(units.contains("SVP+ units of several layers"), "{units}");
    let cnn = refused(TrainOn::HostBackend, &|c| {
        c.model.conv = vec![svp_train::config::ConvItem::Channels(4)];
    });
    assert!(cnn.contains("only MLPs"), "{cnn}");
    if !cfg!(feature = "cuda") {
        let line = refused(TrainOn::Cuda(0), &|_| {});
        assert_eq!(line, "svp was built without CUDA support; rebuild with `--features cuda`");
    }
    for line in [sgd, units, cnn] {
        assert!(!line.contains('\n'), "{line:?}");
    }
}
