//! The device trainer (`svp_train::device`) against the CPU engine.
//!
//! On the host reference backend it runs everywhere: its SVP and BP steps
//! follow the CPU trainers', its checkpoints resume bit for bit, and what it
//! cannot do yet it refuses in one line. On a GPU (a build with the `cuda`
//! feature, on a machine with one) it is checked against the host backend
//! and the CPU's accuracy; without one those tests say "skipped: no CUDA
//! device".

use svp_integration_tests::{embedded_subset, small_config};
use svp_train::device::{Backend, DeviceTrainer, HostBackend, TrainOn};
use svp_train::{BpTrainer, FitError, Method, Network, SvpTrainer, Trainer, try_fit_on};

/// `steps` steps of `trainer` on the first batches of the embedded subset;
/// the weights after them (brought to the host), each step's loss and the
/// per-layer metrics (SVP).
fn run_steps(
    config: &svp_train::Config,
    mut trainer: Box<dyn Trainer>,
    steps: usize,
) -> (Network, Vec<f32>, Option<svp_train::LayerMetrics>) {
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
    let metrics = trainer.layer_metrics().cloned();
    (model, losses, metrics)
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
    let (want, want_losses, want_metrics) = run_steps(&config, cpu, 6);
    let (got, got_losses, got_metrics) = run_steps(&config, device, 6);
    assert_eq!(got_losses, want_losses, "{what}: losses");
    assert_eq!(got_metrics, want_metrics, "{what}: per-layer losses and accuracies");
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
    same_bits_as_the_cpu(Method::Svp, "SVP, the head's learning rate doubled", |c| c.svp.head_lr_scale = 2.0);
    same_bits_as_the_cpu(Method::Svp, "SVP+, units of 2", |c| c.svp.layers_per_unit = 2);
    same_bits_as_the_cpu(Method::Svp, "SVP+, units of 2, the head joining", |c| {
        c.model.hidden = vec![64, 64, 64, 64, 64];
        c.svp.layers_per_unit = 2;
        c.svp.head_joins_last_unit = true;
    });
    same_bits_as_the_cpu(Method::Svp, "SVP+, one unit of everything", |c| {
        c.svp.layers_per_unit = 8;
        c.svp.head_joins_last_unit = true;
    });
    same_bits_as_the_cpu(Method::Svp, "SVP, no norm", |c| c.model.norm = svp_nn::Norm::None);
    let sgd = svp_optim::Optimizer::Sgd { lr: 0.05, momentum: 0.0, weight_decay: 1e-4 };
    same_bits_as_the_cpu(Method::Svp, "SVP, plain SGD", |c| c.optimizer = sgd);
    same_bits_as_the_cpu(Method::Bp, "BP, plain SGD", |c| c.optimizer = sgd);
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
        // 10 batches per epoch, the last of 24 rows (a similarity matrix
        // smaller than the buffers it lives in).
        let data = embedded_subset(600);
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
        c.optimizer = svp_optim::Optimizer::Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.0 }
    });
    assert_eq!(
        sgd,
        "svp cannot run this on a GPU yet: SGD with momentum (plain SGD, Adam and AdamW are there); \
         run it on the CPU (--device cpu)"
    );
    let units = refused(TrainOn::HostBackend, &|c| c.svp.label_concat = true);
    assert!(units.contains("label-concatenation"), "{units}");
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

/// Reproducible values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// One operation's body as the two closures [`OpCheck::check`] takes: for
/// the backend under test and for the host reference (the same code,
/// typed once for each backend's buffers).
macro_rules! both {
    (|$b:ident, $x:ident| $body:block) => {
        (|$b: &B, $x: &mut [B::Buffer]| $body, |$b: &HostBackend, $x: &mut [Vec<f32>]| $body)
    };
}

/// Runs `op` on `backend` and on the host reference with the same inputs
/// (uploaded), and compares the buffers it writes: largest difference
/// relative to the reference's largest value, at most `tolerance`.
struct OpCheck<'a, B: Backend> {
    backend: &'a B,
    host: HostBackend,
    tolerance: f32,
}

impl<B: Backend> OpCheck<'_, B> {
    /// `inputs` uploaded to both; each side's closure gets its buffers; the
    /// buffers numbered in `outputs` are compared afterwards.
    fn check(
        &self,
        what: &str,
        inputs: &[Vec<f32>],
        outputs: &[usize],
        (on_device, on_host): (impl Fn(&B, &mut [B::Buffer]), impl Fn(&HostBackend, &mut [Vec<f32>])),
    ) {
        let mut device: Vec<B::Buffer> = inputs
            .iter()
            .map(|v| {
                let mut b = self.backend.zeros(v.len()).unwrap();
                self.backend.write(&mut b, v).unwrap();
                b
            })
            .collect();
        let mut host = inputs.to_vec();
        on_device(self.backend, &mut device);
        on_host(&self.host, &mut host);
        for &i in outputs {
            let mut got = vec![0.0; inputs[i].len()];
            self.backend.read(&device[i], &mut got).unwrap();
            let want = &host[i];
            let scale = want.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
            for (j, (g, w)) in got.iter().zip(want).enumerate() {
                let ok = (g - w).abs() <= self.tolerance * scale || (g.is_nan() && w.is_nan());
                assert!(ok, "{what}: buffer {i}, element {j}: {g} against the host's {w} (scale {scale})");
            }
        }
    }
}

/// Every operation of `backend` against the host reference over shapes
/// around a block's and a warp's size and the reference MLP's.
fn every_op_matches_the_host<B: Backend>(backend: &B, tolerance: f32) {
    let c = OpCheck { backend, host: HostBackend::new(), tolerance };
    for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (64, 10, 257), (128, 1024, 784), (128, 10, 1024), (300, 33, 65)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let ins = [values(m * k, 1), values(k * n, 2), values(m * n, 3)];
            let what = format!("gemm {m}x{n}x{k} {ta} {tb}");
            c.check(
                &what,
                &ins,
                &[2],
                both!(|b, x| {
                    let [a, bb, cc] = x else { unreachable!() };
                    b.gemm(ta, tb, m, n, k, 0.75, a, bb, 0.5, cc).unwrap()
                }),
            );
        }
    }
    for &(rows, d) in &[(1, 1), (2, 7), (64, 255), (128, 1024), (5, 1030), (300, 10)] {
        for relu in [false, true] {
            let what = format!("{rows}x{d} relu {relu}");
            let (i, o) = (d, (d / 3).max(1));
            let ins = [values(rows * i, 4), values(o * i, 5), values(o, 6), values(rows * o, 7)];
            c.check(
                &format!("linear {what}"),
                &ins,
                &[3],
                both!(|b, x| {
                    let [x, w, bias, out] = x else { unreachable!() };
                    b.linear(x, w, bias, out, rows, i, o, relu).unwrap()
                }),
            );
            // z, bias, gamma, beta, rstd, out; then dy, dgamma, dbeta, dbias.
            let gamma: Vec<f32> = values(d, 10).iter().map(|v| 1.0 + 0.5 * v).collect();
            let ins = [
                values(rows * d, 8).iter().map(|v| 3.0 * v + 0.5).collect(),
                values(d, 9),
                gamma,
                values(d, 11),
                vec![0.0; rows],
                vec![0.0; rows * d],
                values(rows * d, 12),
                vec![0.0; d],
                vec![0.0; d],
                vec![0.0; d],
            ];
            c.check(
                &format!("layer norm forward and backward {what}"),
                &ins,
                &[0, 4, 5, 6, 7, 8, 9],
                both!(|b, x| {
                    let [z, bias, gamma, beta, rstd, out, dy, dg, dbt, dbs] = x else { unreachable!() };
                    b.layer_norm_forward(z, bias, gamma, beta, rstd, out, rows, d, relu).unwrap();
                    b.layer_norm_backward(z, rstd, gamma, beta, dy, dg, dbt, dbs, rows, d, relu).unwrap();
                }),
            );
        }
        let ins = [values(rows * d, 13), values(rows * d, 14), vec![0.0; d]];
        c.check(
            &format!("relu backward and column sums {rows}x{d}"),
            &ins,
            &[1, 2],
            both!(|b, x| {
                let [out, grad, sums] = x else { unreachable!() };
                b.relu_backward(grad, out, rows * d).unwrap();
                b.column_sums(grad, rows, d, sums).unwrap();
            }),
        );
        // Cross-entropy and feature alignment over `d` classes / projection rows.
        let labels: Vec<f32> = (0..rows).map(|r| ((r * 7) % d) as f32).collect();
        for center in [false, true] {
            let ins = [
                values(rows * d, 15).iter().map(|v| 4.0 * v).collect(),
                labels.clone(),
                vec![0.0; rows * d],
                vec![0.0; 4],
                vec![0.0; rows * d],
                vec![0.0; rows],
                vec![0.0; rows * rows],
                values(rows * rows, 16),
                vec![0.0; rows * d],
            ];
            c.check(
                &format!("cross-entropy and alignment {rows}x{d} centred {center}"),
                &ins,
                &[2, 3, 4, 5, 6, 7, 8],
                both!(|b, x| {
                    let [v, y, dv, stats, normed, norms, sim, target, dnormed] = x else { unreachable!() };
                    b.softmax_xent(v, y, dv, stats, 1, rows, d).unwrap();
                    b.fa_normalize(v, normed, norms, rows, d, center).unwrap();
                    b.gemm(false, true, rows, rows, d, 1.0, normed, normed, 0.0, sim).unwrap();
                    b.fa_difference(sim, target, stats, 3, rows).unwrap();
                    b.gemm(false, false, rows, d, rows, 0.25, target, normed, 0.0, dnormed).unwrap();
                    b.fa_gradient(dnormed, normed, norms, dv, rows, d, center, 0.7).unwrap();
                }),
            );
        }
    }
    let optimizer = svp_optim::Optimizer::AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        state: svp_optim::MomentDtype::F32,
    };
    for n in [1, 1000, 4099] {
        c.check(
            &format!("sgd n {n}"),
            &[values(n, 21), values(n, 22)],
            &[0],
            both!(|b, x| {
                let [p, g] = x else { unreachable!() };
                b.sgd(p, g, n, 0.05, 1e-4).unwrap()
            }),
        );
    }
    for (n, t) in [(1, 1), (1000, 1), (4099, 7)] {
        let s = optimizer.adam_step(0.5, t).unwrap();
        let scalars = svp_train::device::AdamScalars {
            beta1: s.beta1,
            beta2: s.beta2,
            eps: s.eps,
            l2: s.l2,
            decay: s.decay,
            step: s.step,
            inv_bc2_sqrt: s.inv_bc2_sqrt,
        };
        let v: Vec<f32> = values(n, 20).iter().map(|x| x.abs() * 1e-3).collect();
        let ins = [values(n, 17), values(n, 18), values(n, 19).iter().map(|x| x * 1e-2).collect(), v, vec![0.0; n]];
        c.check(
            &format!("adam n {n} step {t}, copy"),
            &ins,
            &[0, 2, 3, 4],
            both!(|b, x| {
                let [p, g, m, v, copy] = x else { unreachable!() };
                b.adam(p, g, m, v, n, scalars).unwrap();
                b.copy(p, copy, n).unwrap();
            }),
        );
    }
}

/// The harness itself, on the host against the host: exact, and every
/// shape's lengths accepted.
#[test]
fn the_op_harness_runs_on_the_host_backend() {
    every_op_matches_the_host(&HostBackend::new(), 0.0);
}

/// A buffer too short for the shape asked is an error, not a write past it.
#[test]
fn shapes_are_checked_before_any_write() {
    let h = HostBackend::new();
    let (a, b) = (vec![0.0; 6], vec![0.0; 6]);
    let mut c = vec![0.0; 3];
    let e = h.gemm(false, false, 2, 2, 3, 1.0, &a, &b, 0.0, &mut c).unwrap_err();
    assert_eq!(e.to_string(), "gemm C: 2 x 2 needs 4 elements, the buffer has 3");
}

/// The GPU, or `None` after saying why the GPU tests skip.
#[cfg(feature = "cuda")]
fn gpu() -> Option<svp_cuda::Gpu> {
    match svp_cuda::Gpu::open(0) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu() -> Option<std::convert::Infallible> {
    eprintln!("skipped: no CUDA device (svp was built without the cuda feature)");
    None
}

/// Each GPU operation against the host's: within 1e-4 of the largest value
/// of each buffer it writes (cuBLAS sums in another order, `expf` is within
/// 2 ulp, the row reductions are trees; no TF32).
#[test]
fn gpu_ops_match_the_host_backend() {
    #[cfg_attr(not(feature = "cuda"), allow(unreachable_code, unused_variables))]
    if let Some(gpu) = gpu() {
        #[cfg(feature = "cuda")]
        every_op_matches_the_host(&gpu, 1e-4);
    }
}

/// Six SVP and six BP steps on the GPU against the host backend's (the
/// CPU's bits): each step's loss within 1e-3 (relative), the weights within
/// 1e-5 on average (Adam's early steps move a weight by about the learning
/// rate whatever the gradient's size, so a gradient near zero that rounds
/// the other way moves one weight by up to 2e-3; the average bounds how
/// many do).
#[test]
fn gpu_steps_follow_the_cpu() {
    #[cfg_attr(not(feature = "cuda"), allow(unreachable_code, unused_variables))]
    if gpu().is_some() {
        #[cfg(feature = "cuda")]
        for method in [Method::Svp, Method::Bp] {
            let gpu = svp_cuda::Gpu::open(0).expect("opened once already");
            let config = small_config(method, 1);
            let model = Network::try_for_images((28, 28), 10, &config.model, config.train.seed).unwrap();
            let host = Box::new(DeviceTrainer::try_new(HostBackend::new(), &model, &config).unwrap());
            let device = Box::new(DeviceTrainer::try_new(gpu, &model, &config).unwrap());
            let (want, want_losses, _) = run_steps(&config, host, 6);
            let (got, got_losses, _) = run_steps(&config, device, 6);
            for (s, (g, w)) in got_losses.iter().zip(&want_losses).enumerate() {
                assert!((g - w).abs() <= 1e-3 * w.abs(), "{method:?} step {s}: GPU loss {g}, CPU {w}");
            }
            let diff: f64 = got.params().iter().zip(want.params()).map(|(g, w)| (g - w).abs() as f64).sum();
            let mean = diff / got.params().len() as f64;
            eprintln!(
                "{method:?} on the GPU: losses {got_losses:?} (CPU {want_losses:?}), mean |weight difference| {mean:e}"
            );
            assert!(mean <= 1e-5, "{method:?}: weights differ by {mean} on average");
        }
    }
}

/// The accuracy check: a short run on the GPU within 0.3 points of
/// the same run on the CPU (3 epochs of the 256-256 MLP on the embedded
/// subset: 6,000 training and 1,000 test images).
#[test]
fn gpu_trains_to_the_cpus_accuracy() {
    #[cfg_attr(not(feature = "cuda"), allow(unreachable_code, unused_variables))]
    if gpu().is_some() {
        let data = svp_data::DataSplit::embedded();
        for method in [Method::Svp, Method::Bp] {
            let config = small_config(method, 3);
            let cpu = fit_on(TrainOn::Cpu, &config, &data, Default::default());
            let device = fit_on(TrainOn::Cuda(0), &config, &data, Default::default());
            let (c, g) = (cpu.epochs.last().unwrap().test_acc, device.epochs.last().unwrap().test_acc);
            eprintln!("{method:?}: test accuracy CPU {:.2} %, GPU {:.2} %", 100.0 * c, 100.0 * g);
            assert!((c - g).abs() <= 0.003, "{method:?}: GPU {g}, CPU {c}");
        }
    }
}

/// The device trainer's workspace (everything on the device besides the
/// weights and moments) does not grow with depth under SVP, and grows by
/// one layer's activations and LayerNorm values per layer under BP: the
/// property `svp memory --device cuda` measures on a GPU.
#[test]
fn device_workspace_is_flat_in_depth_for_svp() {
    let workspace = |method: Method, depth: usize| {
        let mut config = small_config(method, 1);
        config.model.hidden = vec![256; depth];
        let model = Network::try_for_images((28, 28), 10, &config.model, 1).unwrap();
        DeviceTrainer::try_new(HostBackend::new(), &model, &config).unwrap().workspace_bytes()
    };
    let svp: Vec<usize> = [2, 4, 8, 16].iter().map(|&d| workspace(Method::Svp, d)).collect();
    // Only the step's loss vector, read back once a step, has a slot per
    // layer: three floats (cross-entropy, correct rows, alignment loss).
    for (b, depth) in svp.iter().zip([2, 4, 8, 16]) {
        assert_eq!(b - svp[0], 12 * (depth - 2), "SVP's workspace grows with depth: {svp:?}");
    }
    let bp: Vec<usize> = [2, 4, 8, 16].iter().map(|&d| workspace(Method::Bp, d)).collect();
    // Per added hidden layer: its output, normalized values (rows x 256
    // each), 1/std (rows) and its loss slot.
    let rows = small_config(Method::Bp, 1).train.batch_size;
    let per_layer = 4 * (2 * rows * 256 + rows) + 12;
    for (pair, depths) in bp.windows(2).zip([(2, 4), (4, 8), (8, 16)]) {
        assert_eq!(pair[1] - pair[0], per_layer * (depths.1 - depths.0), "BP's workspace: {bp:?}");
    }
    assert!(svp[0] < bp[0], "SVP {svp:?}, BP {bp:?}");
}

/// A trained model (3 epochs of the 256-256 MLP on 2,000 images) evaluated on `on`
/// and by the CPU engine's own evaluation.
fn evaluations(on: TrainOn) -> Option<(svp_train::EvalReport, svp_train::EvalReport)> {
    let config = small_config(Method::Svp, 3);
    let data = embedded_subset(2000);
    let run = fit_on(TrainOn::Cpu, &config, &data, Default::default());
    let got = match svp_train::device::evaluate_on(on, &run.model, &data.test, run.norm, 256) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            return None;
        }
    };
    let mut ws = svp_train::InferenceWorkspace::default();
    let want = svp_train::evaluate(&run.model, &data.test, run.norm, 256, None, &mut ws);
    Some((got, want))
}

/// Inference through the seam, on the host backend: the CPU's accuracy,
/// and its loss to within float rounding of the sum.
#[test]
fn host_backend_evaluates_as_the_cpu() {
    let (got, want) = evaluations(TrainOn::HostBackend).expect("the host backend");
    assert_eq!(got.accuracy, want.accuracy);
    assert!((got.loss - want.loss).abs() <= 1e-6 * want.loss, "loss {} vs {}", got.loss, want.loss);
    assert!(want.accuracy > 0.7, "trained: {}", want.accuracy);
}

/// The same on a GPU: accuracy within 0.2 points (two of 1,000 images
/// whose top logits are within rounding of each other), loss within 1e-4.
#[test]
fn gpu_evaluates_as_the_cpu() {
    if let Some((got, want)) = evaluations(TrainOn::Cuda(0)) {
        eprintln!("GPU: accuracy {} loss {}; CPU: {} {}", got.accuracy, got.loss, want.accuracy, want.loss);
        assert!((got.accuracy - want.accuracy).abs() <= 0.002, "{} vs {}", got.accuracy, want.accuracy);
        assert!((got.loss - want.loss).abs() <= 1e-4 * want.loss, "{} vs {}", got.loss, want.loss);
    }
}
