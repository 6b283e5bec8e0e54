//! Shared setup for the benchmarks: the reference model and its GEMM shapes.

#![warn(missing_docs)]

use std::time::{Duration, Instant};
use svp_train::Config;

/// The reference run (`models/mlp-fmnist.toml`). With `SVP_BENCH_MOMENTS=bf16`
/// in the environment, Adam keeps its moments in bfloat16 (for comparing the
/// two; the file itself keeps f32).
pub fn reference_config() -> Config {
    let text = include_str!("../models/mlp-fmnist.toml");
    let mut config = toml_free_parse(text);
    if std::env::var("SVP_BENCH_MOMENTS").as_deref() == Ok("bf16") {
        config.optimizer = config.optimizer.with_moments(svp_optim::MomentDtype::Bf16);
    }
    config
}

/// The benches avoid a TOML dependency: the reference config is rebuilt here
/// and checked against the file's key values.
fn toml_free_parse(text: &str) -> Config {
    assert!(text.contains("hidden = [1024, 1024, 1024]"), "reference config changed: update the benches");
    Config {
        model: svp_train::config::ModelConfig::mlp(vec![1024, 1024, 1024]),
        svp: Default::default(),
        train: svp_train::config::TrainConfig { batch_size: 128, ..Default::default() },
        optimizer: svp_optim::Optimizer::adam(3e-4),
        schedule: Default::default(),
    }
}

/// `models/cnn-fmnist.toml`'s network and rule (checked against the file's key lines).
pub fn cnn_config() -> Config {
    use svp_train::config::{ConvItem, PoolMarker};
    let text = include_str!("../models/cnn-fmnist.toml");
    assert!(
        text.contains(r#"conv = [32, 32, "M", 64, 64, "M", 128, 128, "M"]"#),
        "CNN config changed: update the benches"
    );
    let mut c = reference_config();
    let m = ConvItem::Pool(PoolMarker::M);
    c.model.conv = [32, 32, 0, 64, 64, 0, 128, 128, 0]
        .into_iter()
        .map(|ch| if ch == 0 { m } else { ConvItem::Channels(ch) })
        .collect();
    c.model.hidden = vec![];
    c.svp.layers_per_unit = 2;
    c
}

/// `models/vit-fmnist.toml`'s network and rule (checked against the file's key lines).
pub fn vit_config() -> Config {
    let text = include_str!("../models/vit-fmnist.toml");
    for line in ["patch = 7", "dim = 128", "depth = 6", "heads = 4", "mlp = 256", "layers_per_unit = 2"] {
        assert!(text.contains(line), "ViT config changed ({line}): update the benches");
    }
    let mut c = reference_config();
    c.model.vit = Some(svp_train::config::VitConfig {
        patch: 7,
        dim: 128,
        depth: 6,
        heads: 4,
        mlp: 256,
        readout: svp_nn::vit::TokenReadout::Cls,
        norm_eps: svp_nn::layer_norm::LAYER_NORM_EPS,
    });
    c.model.hidden = vec![];
    c.svp.layers_per_unit = 2;
    c
}

/// `models/mobilenet-fmnist.toml`'s network and rule (checked against the file's key lines).
pub fn mobilenet_config() -> Config {
    use svp_train::config::{ConvItem, MobileItem};
    let text = include_str!("../models/mobilenet-fmnist.toml");
    let blocks = [(16, 1, 1), (24, 6, 2), (24, 6, 1), (32, 6, 2), (32, 6, 1), (64, 6, 1)];
    for (channels, expansion, stride) in blocks {
        let line = format!("{{ channels = {channels}, expansion = {expansion}, stride = {stride} }}");
        assert!(text.contains(&line), "MobileNet config changed ({line}): update the benches");
    }
    for line in ["conv = [16]", "layers_per_unit = 2"] {
        assert!(text.contains(line), "MobileNet config changed ({line}): update the benches");
    }
    let mut c = reference_config();
    c.model.conv = vec![ConvItem::Channels(16)];
    c.model.mobile =
        blocks.into_iter().map(|(channels, expansion, stride)| MobileItem { channels, expansion, stride }).collect();
    c.model.hidden = vec![];
    c.svp.layers_per_unit = 2;
    c
}

/// One GEMM the training steps run: `(m, k) x (k, n)`, with a name saying where.
#[derive(Clone, Copy, Debug)]
pub struct GemmShape {
    /// Where it runs.
    pub name: &'static str,
    /// Rows of the output.
    pub m: usize,
    /// Inner dimension.
    pub k: usize,
    /// Columns of the output.
    pub n: usize,
    /// Times per SVP step.
    pub per_svp_step: usize,
    /// Times per BP step.
    pub per_bp_step: usize,
    /// The left operand is a transposed view (as in the weight gradient).
    pub a_t: bool,
    /// The right operand is a transposed view (as `W^T` in the forward).
    pub b_t: bool,
}

/// Every GEMM of one step of the reference model at batch 128, `d' = 10`.
pub const SHAPES: &[GemmShape] = &[
    GemmShape {
        name: "fwd 128x784x1024",
        m: 128,
        k: 784,
        n: 1024,
        per_svp_step: 1,
        per_bp_step: 1,
        a_t: false,
        b_t: true,
    },
    GemmShape {
        name: "fwd 128x1024x1024",
        m: 128,
        k: 1024,
        n: 1024,
        per_svp_step: 2,
        per_bp_step: 2,
        a_t: false,
        b_t: true,
    },
    GemmShape {
        name: "fwd head 128x1024x10",
        m: 128,
        k: 1024,
        n: 10,
        per_svp_step: 1,
        per_bp_step: 1,
        a_t: false,
        b_t: true,
    },
    GemmShape {
        name: "wgrad 1024x128x784",
        m: 1024,
        k: 128,
        n: 784,
        per_svp_step: 1,
        per_bp_step: 1,
        a_t: true,
        b_t: false,
    },
    GemmShape {
        name: "wgrad 1024x128x1024",
        m: 1024,
        k: 128,
        n: 1024,
        per_svp_step: 2,
        per_bp_step: 2,
        a_t: true,
        b_t: false,
    },
    GemmShape {
        name: "wgrad head 10x128x1024",
        m: 10,
        k: 128,
        n: 1024,
        per_svp_step: 1,
        per_bp_step: 1,
        a_t: true,
        b_t: false,
    },
    GemmShape {
        name: "dgrad 128x1024x1024",
        m: 128,
        k: 1024,
        n: 1024,
        per_svp_step: 0,
        per_bp_step: 2,
        a_t: false,
        b_t: false,
    },
    GemmShape {
        name: "dgrad head 128x10x1024",
        m: 128,
        k: 10,
        n: 1024,
        per_svp_step: 0,
        per_bp_step: 1,
        a_t: false,
        b_t: false,
    },
    GemmShape {
        name: "proj 128x784x10",
        m: 128,
        k: 784,
        n: 10,
        per_svp_step: 1,
        per_bp_step: 0,
        a_t: false,
        b_t: true,
    },
    GemmShape {
        name: "proj 128x1024x10",
        m: 128,
        k: 1024,
        n: 10,
        per_svp_step: 3,
        per_bp_step: 0,
        a_t: false,
        b_t: true,
    },
    GemmShape {
        name: "proj back 128x10x1024",
        m: 128,
        k: 10,
        n: 1024,
        per_svp_step: 3,
        per_bp_step: 0,
        a_t: false,
        b_t: false,
    },
    GemmShape {
        name: "fa sim 128x10x128",
        m: 128,
        k: 10,
        n: 128,
        per_svp_step: 5,
        per_bp_step: 0,
        a_t: false,
        b_t: true,
    },
    GemmShape {
        name: "fa grad 128x128x10",
        m: 128,
        k: 128,
        n: 10,
        per_svp_step: 4,
        per_bp_step: 0,
        a_t: false,
        b_t: false,
    },
];

/// Operands and output of `shape`, laid out as the training step lays them out.
pub struct GemmOperands {
    a: Vec<f32>,
    b: Vec<f32>,
    /// The output buffer.
    pub c: Vec<f32>,
    shape: GemmShape,
}

impl GemmOperands {
    /// Deterministic operands for `shape`.
    pub fn new(shape: GemmShape) -> Self {
        let fill =
            |n: usize, salt: usize| (0..n).map(|i| (((i * 7919 + salt) % 2003) as f32 - 1001.0) / 1001.0).collect();
        Self { a: fill(shape.m * shape.k, 1), b: fill(shape.k * shape.n, 2), c: vec![0.0; shape.m * shape.n], shape }
    }

    /// Wall time of `iters` runs of `run` on a thread of the rayon pool.
    pub fn timed(&mut self, iters: u64) -> Duration {
        timed_on_pool(iters, || self.run())
    }

    /// Wall time of `iters` runs, each after `evict` was written on every
    /// thread of the pool (untimed), so that the operands come from memory
    /// as a step's weights do: between two uses of a layer's weights, a step
    /// moves every other layer's weights, gradients and moments.
    pub fn timed_cold(&mut self, iters: u64, evict: &mut [f32]) -> Duration {
        use rayon::prelude::*;
        on_pool(|| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                evict.par_chunks_mut(1 << 16).for_each(|c| c.iter_mut().for_each(|x| *x += 1.0));
                let start = Instant::now();
                self.run();
                total += start.elapsed();
            }
            total
        })
    }

    /// Runs the GEMM once on the rayon pool.
    pub fn run(&mut self) {
        let (a, b, c) = self.views();
        svp_tensor::gemm(1.0, a, b, 0.0, c);
    }

    /// Runs the GEMM once on the calling thread.
    pub fn run_serial(&mut self) {
        let (a, b, c) = self.views();
        svp_tensor::gemm_with_chunks(1.0, a, b, 0.0, c, 1);
    }

    /// Runs the same product once with matrixmultiply (through ndarray), on the calling thread.
    pub fn run_matrixmultiply(&mut self) {
        let (a, b, mut c) = self.views();
        ndarray::linalg::general_mat_mul(1.0, &a, &b, 0.0, &mut c);
    }

    fn views(
        &mut self,
    ) -> (svp_tensor::ArrayView2<'_, f32>, svp_tensor::ArrayView2<'_, f32>, svp_tensor::ArrayViewMut2<'_, f32>) {
        use svp_tensor::{view, view_mut};
        let GemmShape { m, k, n, a_t, b_t, .. } = self.shape;
        let a = if a_t { view(&self.a, k, m).reversed_axes() } else { view(&self.a, m, k) };
        let b = if b_t { view(&self.b, n, k).reversed_axes() } else { view(&self.b, k, n) };
        (a, b, view_mut(&mut self.c, m, n))
    }
}

/// A trainer of `method` on the reference model, with one batch of real data.
pub struct StepBench {
    /// The model.
    pub model: svp_train::Network,
    /// The trainer.
    pub trainer: Box<dyn svp_train::Trainer + Send>,
    /// Batch inputs.
    pub x: Vec<f32>,
    /// Batch labels.
    pub y: Vec<u32>,
}

impl StepBench {
    /// Builds the reference model and trainer and gathers one batch of the embedded data.
    pub fn new(method: svp_train::Method) -> Self {
        Self::with_config(method, reference_config())
    }

    /// As [`StepBench::new`] with another config.
    pub fn with_config(method: svp_train::Method, config: Config) -> Self {
        let data = svp_data::DataSplit::embedded();
        let model = svp_train::Network::try_for_images(data.train.image_shape, data.classes, &config.model, 1)
            .expect("memory for the model");
        let trainer: Box<dyn svp_train::Trainer + Send> = match method {
            svp_train::Method::Svp => Box::new(svp_train::SvpTrainer::new(&model, &config)),
            svp_train::Method::Bp => Box::new(svp_train::BpTrainer::new(&model, &config)),
        };
        let norm = svp_train::Normalization::of_pixels(&data.train.images);
        let mut batcher = svp_data::Batcher::new(data.train.len(), 128, norm.table());
        batcher.start_epoch(1, 0, true);
        let mut x = vec![0.0; 128 * data.features()];
        let mut y = vec![0; 128];
        batcher.gather(&data.train, 0, &mut x, &mut y);
        Self { model, trainer, x, y }
    }

    /// One training step.
    pub fn step(&mut self) {
        self.trainer.step(&mut self.model, &self.x, &self.y, 1.0).expect("finite loss");
    }

    /// Wall time of `iters` steps on a thread of the rayon pool, as
    /// `svp_train::fit` runs them.
    pub fn timed(&mut self, iters: u64) -> Duration {
        timed_on_pool(iters, || self.step())
    }
}

/// Wall time of `iters` calls of `f` on a thread of the rayon pool.
fn timed_on_pool(iters: u64, mut f: impl FnMut() + Send) -> Duration {
    on_pool(|| {
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        start.elapsed()
    })
}

/// Fastest of `rounds` runs of `f` after one warm-up run, in milliseconds:
/// the quick A/B examples' measure.
pub fn fastest_ms(rounds: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..rounds)
        .map(|_| {
            let start = std::time::Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// Runs `f` on a thread of the rayon pool and waits for it.
///
/// Training runs there (`svp_train::fit`): from outside the pool, every
/// parallel call inside a step would be injected into the pool and the caller
/// woken afterwards, several microseconds each, which a benchmark would count
/// as the engine's time.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
