//! `svp memory`: peak training memory against depth, SVP against backprop.
//!
//! Each (method, depth) runs in a fresh child process of this binary, so one
//! run's heap cannot flatter or burden the next. The parent watches the child's
//! peak resident set (`VmHWM`) from outside while it runs; the child reports
//! its own `VmHWM` at exit, its counted heap peak, and the bytes of
//! parameters, optimizer state and training workspace.

use crate::ALLOC;
use crate::cli::{MemoryArgs, MemoryChildArgs, MemoryData, MemoryRun, MethodArg, OptimizerArg};
use crate::error::CliError;
use crate::mem::{current_rss_kib, peak_rss_kib, peak_rss_kib_of};
use crate::plot::{Series, line_chart_svg};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use svp_rng::{Purpose, Stream, StreamKey};
use svp_train::config::{ModelConfig, SvpConfig, TrainConfig};
use svp_train::{Config, Method, Network};

/// What a child measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChildReport {
    /// `svp` or `bp`.
    pub method: String,
    /// Hidden layers.
    pub depth: usize,
    /// RSS before the model existed (the binary and its runtime), KiB.
    pub baseline_rss_kib: u64,
    /// The child's own `VmHWM` at exit, KiB.
    pub peak_rss_kib: u64,
    /// Most heap bytes live at once (counting allocator).
    pub heap_peak_bytes: usize,
    /// Parameter bytes.
    pub param_bytes: usize,
    /// Optimizer-state bytes.
    pub optimizer_bytes: usize,
    /// Training workspace bytes (activations, caches, gradients, tiles, and
    /// every thread's GEMM packing buffers).
    pub workspace_bytes: usize,
    /// Timed steps per second.
    pub steps_per_s: f64,
    /// Heap allocations during the timed steps.
    pub step_allocations: usize,
    /// Largest single allocation during the timed steps.
    pub step_largest_alloc: usize,
    /// On a GPU: its memory in use after the timed steps (every process's,
    /// as the driver reports it).
    #[serde(default)]
    pub device_in_use_bytes: Option<usize>,
}

fn method_of(m: MethodArg) -> Method {
    match m {
        MethodArg::Svp => Method::Svp,
        MethodArg::Bp => Method::Bp,
    }
}

/// The network a sweep row trains: `run.config`'s scaled to `depth`, or a
/// plain MLP of `run.width`.
fn config(run: &MemoryRun, method: Method, depth: usize) -> Result<Config, CliError> {
    let mut config = match &run.config {
        Some(path) => scaled(crate::train_cmd::read_config(path)?, depth),
        None => mlp_config(run, depth),
    };
    config.train =
        TrainConfig { method, epochs: 1, batch_size: run.batch, seed: 1, shuffle: false, ..Default::default() };
    config.optimizer = optimizer(run);
    config.schedule = Default::default();
    config.validate()?;
    Ok(config)
}

/// `config`'s network at `depth`: a ViT gets `depth` transformer blocks; a
/// network with mobile blocks `depth` of those after its stem; conv
/// networks `depth` conv blocks (the list's first ones with their pooling,
/// then copies of its last block without pooling); MLPs `depth` hidden layers
/// of their first width.
fn scaled(mut config: Config, depth: usize) -> Config {
    use svp_train::config::{ConvItem, PoolMarker};
    let blocks = config.model.conv_blocks();
    if let Some(vit) = &mut config.model.vit {
        vit.depth = depth;
    } else if let Some(&last) = config.model.mobile.last() {
        // The stem stays; the list's first mobile blocks, then copies of its
        // last at stride 1.
        let mobile = &mut config.model.mobile;
        mobile.truncate(depth);
        mobile.resize(depth, svp_train::config::MobileItem { stride: 1, ..last });
    } else if let Some(&(last, _)) = blocks.last() {
        let mut conv = Vec::new();
        for i in 0..depth {
            let (channels, pool) = blocks.get(i).copied().unwrap_or((last, false));
            conv.push(ConvItem::Channels(channels));
            if pool {
                conv.push(ConvItem::Pool(PoolMarker::M));
            }
        }
        config.model.conv = conv;
    } else if let Some(&width) = config.model.hidden.first() {
        config.model.hidden = vec![width; depth];
    }
    config
}

fn optimizer(run: &MemoryRun) -> svp_optim::Optimizer {
    match run.optimizer {
        OptimizerArg::Sgd => svp_optim::Optimizer::Sgd { lr: 0.01, momentum: 0.0, weight_decay: 0.0 },
        OptimizerArg::Adam => svp_optim::Optimizer::adam(3e-4),
        OptimizerArg::AdamBf16 => svp_optim::Optimizer::adam(3e-4).with_moments(svp_optim::MomentDtype::Bf16),
    }
}

/// A plain MLP of `run.width` (train, optimizer and schedule are set by [`config`]).
fn mlp_config(run: &MemoryRun, depth: usize) -> Config {
    Config {
        model: ModelConfig::mlp(vec![run.width; depth]),
        svp: SvpConfig::default(),
        train: TrainConfig {
            method: Method::Svp,
            epochs: 1,
            batch_size: run.batch,
            seed: 1,
            shuffle: false,
            ..Default::default()
        },
        optimizer: optimizer(run),
        schedule: Default::default(),
    }
}

/// Runs one measurement in this process and prints its report as JSON.
pub fn run_child(args: MemoryChildArgs) -> Result<(), CliError> {
    let run = &args.run;
    let method = method_of(args.method);
    let config = config(run, method, args.depth)?;
    // As `svp train`: what does not fit the machine fails cleanly, and before
    // it is written.
    let budget = crate::mem::limit_heap_to_available(None);
    let out_of_memory = |error| CliError::OutOfMemory { error, budget };
    // On a pool thread, as in `svp_train::fit`: that is where steps allocate nothing.
    let report = rayon::scope(|_| measure(args.depth, run, method, &config).map_err(|e| e.into_cli(out_of_memory)))?;
    println!("{}", serde_json::to_string(&report).expect("report serializes"));
    Ok(())
}

/// Why a measurement failed.
enum MeasureError {
    OutOfMemory(svp_alloc::OutOfMemory),
    Diverged(svp_train::TrainError),
    Device(svp_train::device::Unsupported),
}

impl MeasureError {
    fn into_cli(self, out_of_memory: impl FnOnce(svp_alloc::OutOfMemory) -> CliError) -> CliError {
        match self {
            MeasureError::OutOfMemory(e) => out_of_memory(e),
            MeasureError::Diverged(error) => CliError::Diverged { error, saved: "nothing saved".into() },
            MeasureError::Device(e) => CliError::Device(e),
        }
    }
}

impl From<svp_train::FitError> for MeasureError {
    fn from(e: svp_train::FitError) -> Self {
        match e {
            svp_train::FitError::Memory(e) => MeasureError::OutOfMemory(e),
            svp_train::FitError::Device(e) => MeasureError::Device(e),
        }
    }
}

impl From<svp_alloc::OutOfMemory> for MeasureError {
    fn from(e: svp_alloc::OutOfMemory) -> Self {
        MeasureError::OutOfMemory(e)
    }
}

impl From<svp_train::TrainError> for MeasureError {
    fn from(e: svp_train::TrainError) -> Self {
        MeasureError::Diverged(e)
    }
}

/// Both kinds of inputs are Fashion-MNIST shaped.
const IMAGE_SHAPE: (usize, usize) = (28, 28);
const CLASSES: usize = 10;

/// One batch, reused by every step of a measurement (random by default, so
/// no data set sits in memory), in a buffer reserved with the run's others.
fn inputs(run: &MemoryRun) -> Result<(Vec<f32>, Vec<u32>), svp_alloc::OutOfMemory> {
    let features = IMAGE_SHAPE.0 * IMAGE_SHAPE.1;
    let mut x = svp_alloc::try_zeros(run.batch * features, "the input batch")?;
    let mut y = svp_alloc::try_zeroed::<u32>(run.batch, "the input batch")?;
    match run.data {
        MemoryData::Random => {
            let mut s = Stream::new(StreamKey::new(1, Purpose::Shuffle, 99, 0, 0));
            x.iter_mut().for_each(|v| *v = s.gaussian() as f32);
            y.iter_mut().for_each(|v| *v = s.below(CLASSES as u64) as u32);
        }
        MemoryData::Embedded => {
            let data = svp_data::DataSplit::embedded();
            debug_assert_eq!((data.train.image_shape, data.classes), (IMAGE_SHAPE, CLASSES));
            let norm = svp_train::Normalization::of_pixels(&data.train.images);
            let mut b = svp_data::Batcher::new(data.train.len(), run.batch, norm.table());
            b.start_epoch(1, 0, true);
            let n = b.gather(&data.train, 0, &mut x, &mut y);
            x.truncate(n * features);
            y.truncate(n);
        }
    }
    Ok((x, y))
}

/// Reserves the network, trainer and inputs, then takes one step and times
/// the rest.
fn measure(depth: usize, run: &MemoryRun, method: Method, config: &Config) -> Result<ChildReport, MeasureError> {
    let baseline_rss_kib = current_rss_kib().unwrap_or(0);
    let mut model = Network::try_zeroed_for_images(IMAGE_SHAPE, CLASSES, &config.model)?;
    let mut trainer = svp_train::trainer_for(run.device.into(), &model, config)?;
    let (x, y) = inputs(run)?;
    model.init(config.train.seed);
    trainer.step(&mut model, &x, &y, 1.0)?;
    ALLOC.reset_peaks();
    let heap_before = ALLOC.stats();
    let start = Instant::now();
    let timed = run.steps - 1;
    for _ in 0..timed {
        trainer.step(&mut model, &x, &y, 1.0)?;
    }
    // The step's results (one read back of its losses) end the device's work.
    let seconds = start.elapsed().as_secs_f64();
    let heap = ALLOC.stats();

    let report = ChildReport {
        method: method.to_string(),
        depth,
        baseline_rss_kib,
        peak_rss_kib: peak_rss_kib().unwrap_or(0),
        heap_peak_bytes: heap.peak.max(heap_before.peak),
        param_bytes: model.param_bytes(),
        optimizer_bytes: trainer.optimizer_bytes(),
        workspace_bytes: trainer.workspace_bytes() + svp_tensor::workspace_bytes_reserved(),
        steps_per_s: timed as f64 / seconds.max(1e-9),
        step_allocations: heap.allocations,
        step_largest_alloc: heap.largest,
        device_in_use_bytes: trainer.device_memory_in_use(),
    };
    Ok(report)
}

/// One row of the sweep.
struct Row {
    report: ChildReport,
    /// max(parent's outside observation, child's own VmHWM), KiB.
    peak_rss_kib: u64,
}

impl Row {
    fn weights_and_state(&self) -> u64 {
        ((self.report.param_bytes + self.report.optimizer_bytes) / 1024) as u64
    }

    /// What the sweep measures: the peak resident set, or on a GPU the
    /// device's memory in use (where the weights, moments and workspace are).
    fn measured_kib(&self) -> u64 {
        match self.report.device_in_use_bytes {
            Some(bytes) => (bytes / 1024) as u64,
            None => self.peak_rss_kib,
        }
    }

    fn non_weight_kib(&self) -> u64 {
        self.measured_kib().saturating_sub(self.weights_and_state())
    }

    /// weights + optimizer state + training workspace: what a step needs.
    fn floor_kib(&self) -> u64 {
        self.weights_and_state() + (self.report.workspace_bytes / 1024) as u64
    }
}

fn spawn_child(method: MethodArg, depth: usize, run: &MemoryRun) -> Result<Row, CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Output { path: "svp".into(), reason: format!("cannot find this binary: {e}") })?;
    let method_name = match method {
        MethodArg::Svp => "svp",
        MethodArg::Bp => "bp",
    };
    let optimizer = match run.optimizer {
        OptimizerArg::Sgd => "sgd",
        OptimizerArg::Adam => "adam",
        OptimizerArg::AdamBf16 => "adam-bf16",
    };
    let mut child = Command::new(exe)
        .args(["memory-child", "--method", method_name, "--depth", &depth.to_string()])
        .args(["--width", &run.width.to_string(), "--batch", &run.batch.to_string()])
        .args(["--steps", &run.steps.to_string(), "--optimizer", optimizer, "--data", run.data.name()])
        .args(run.config.iter().flat_map(|c| [std::ffi::OsStr::new("--config"), c.as_os_str()]))
        .args(["--device", &run.device.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CliError::Output { path: "svp memory-child".into(), reason: e.to_string() })?;
    // Watch the child's peak RSS from outside while it runs.
    let pid = child.id();
    let mut outside = 0;
    let status = loop {
        if let Some(kib) = peak_rss_kib_of(pid) {
            outside = outside.max(kib);
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(CliError::Output { path: "svp memory-child".into(), reason: e.to_string() }),
        }
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(out) = child.stdout.take() {
        std::io::BufReader::new(out).lines().map_while(Result::ok).for_each(|l| stdout.push_str(&l));
    }
    if let Some(err) = child.stderr.take() {
        std::io::BufReader::new(err).lines().map_while(Result::ok).for_each(|l| stderr.push_str(&l));
    }
    if !status.success() {
        let why = stderr.trim().trim_start_matches("error: ").to_string();
        return Err(CliError::Measurement {
            what: format!("{method_name} at depth {depth}"),
            reason: if why.is_empty() { status.to_string() } else { why },
        });
    }
    let report: ChildReport = serde_json::from_str(stdout.trim())
        .map_err(|e| CliError::Output { path: "svp memory-child".into(), reason: format!("bad report: {e}") })?;
    Ok(Row { peak_rss_kib: outside.max(report.peak_rss_kib), report })
}

/// What depth counts in a sweep of `model`.
fn depth_unit(model: &ModelConfig) -> &'static str {
    if model.vit.is_some() {
        "transformer blocks"
    } else if !model.mobile.is_empty() {
        "mobile blocks"
    } else if !model.conv.is_empty() {
        "conv blocks"
    } else {
        "hidden layers"
    }
}

fn network_name(run: &MemoryRun, depth_unit: &str) -> String {
    match &run.config {
        Some(path) => format!("{depth_unit} of {}", path.display()),
        None => format!("MLP, width {}", run.width),
    }
}

fn optimizer_name(o: OptimizerArg) -> &'static str {
    match o {
        OptimizerArg::Sgd => "SGD",
        OptimizerArg::Adam => "Adam",
        OptimizerArg::AdamBf16 => "Adam (bf16 moments)",
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Runs `svp memory`.
pub fn run(args: MemoryArgs) -> Result<(), CliError> {
    if args.depths.is_empty() || args.depths.contains(&0) {
        return Err(svp_train::ConfigError::Invalid("--depths must list positive depths".into()).into());
    }
    for path in [&args.csv, &args.plot] {
        crate::train_cmd::check_writable(path)?;
    }
    crate::train_cmd::probe_device(args.run.device)?;
    // A config that cannot be read or scaled fails here, once, not in every child.
    let unit = depth_unit(&config(&args.run, Method::Svp, args.depths[0])?.model);
    eprintln!(
        "svp memory: {}, batch {}, {} steps, optimizer {}, data {}; one child process per row",
        network_name(&args.run, unit),
        args.run.batch,
        args.run.steps,
        optimizer_name(args.run.optimizer),
        args.run.data.name()
    );
    let on_gpu = matches!(args.run.device, svp_cuda::Device::Cuda(_));
    println!(
        "{:<6} {:>5} {:>12} {:>14} {:>12} {:>12} {:>12} {:>10} {:>9} {:>11}",
        "method",
        "depth",
        if on_gpu { "GPU used MiB" } else { "peak RSS MiB" },
        "non-weight MiB",
        "heap peak",
        "params MiB",
        "optim MiB",
        "floor MiB",
        "steps/s",
        "allocs/step"
    );
    let mut rows: Vec<Row> = Vec::new();
    for &method in &args.methods {
        for &depth in &args.depths {
            let row = spawn_child(method, depth, &args.run)?;
            let r = &row.report;
            println!(
                "{:<6} {:>5} {:>12.1} {:>14.1} {:>12.1} {:>12.1} {:>12.1} {:>10.1} {:>9.2} {:>11}",
                r.method,
                depth,
                mib(row.measured_kib()),
                mib(row.non_weight_kib()),
                r.heap_peak_bytes as f64 / 1048576.0,
                r.param_bytes as f64 / 1048576.0,
                r.optimizer_bytes as f64 / 1048576.0,
                mib(row.floor_kib()),
                r.steps_per_s,
                // Allocations over the timed steps (all but the first), per step.
                format!("{:.1}", r.step_allocations as f64 / args.run.steps.saturating_sub(1).max(1) as f64)
            );
            let _ = std::io::stdout().flush();
            rows.push(row);
        }
    }
    write_csv(&args, &rows)?;
    write_plot(&args, unit, &rows)?;
    summarize(&rows);
    eprintln!("wrote {} and {}", args.csv.display(), args.plot.display());
    Ok(())
}

fn write_csv(args: &MemoryArgs, rows: &[Row]) -> Result<(), CliError> {
    let mut csv = String::from(
        "method,depth,width,batch,peak_rss_kib,non_weight_rss_kib,baseline_rss_kib,heap_peak_bytes,\
         param_bytes,optimizer_bytes,workspace_bytes,floor_kib,steps_per_s,step_allocations,step_largest_alloc,\
         device_in_use_bytes\n",
    );
    for row in rows {
        let r = &row.report;
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{:.3},{},{},{}\n",
            r.method,
            r.depth,
            args.run.width,
            args.run.batch,
            row.peak_rss_kib,
            row.non_weight_kib(),
            r.baseline_rss_kib,
            r.heap_peak_bytes,
            r.param_bytes,
            r.optimizer_bytes,
            r.workspace_bytes,
            row.floor_kib(),
            r.steps_per_s,
            r.step_allocations,
            r.step_largest_alloc,
            r.device_in_use_bytes.map_or(String::new(), |b| b.to_string())
        ));
    }
    svp_model::atomic::write(&args.csv, csv.as_bytes())
        .map_err(|e| CliError::Output { path: args.csv.clone(), reason: e.to_string() })
}

fn write_plot(args: &MemoryArgs, depth_unit: &str, rows: &[Row]) -> Result<(), CliError> {
    let mut series = Vec::new();
    for (method, color) in [("svp", "#1f77b4"), ("bp", "#d62728")] {
        let of: Vec<&Row> = rows.iter().filter(|r| r.report.method == method).collect();
        if of.is_empty() {
            continue;
        }
        let label = if method == "svp" { "SVP" } else { "BP" };
        let what = if matches!(args.run.device, svp_cuda::Device::Cuda(_)) { "GPU memory in use" } else { "peak RSS" };
        series.push(Series {
            label: format!("{label}: {what}"),
            color: color.into(),
            dashed: false,
            points: of.iter().map(|r| (r.report.depth as f64, mib(r.measured_kib()))).collect(),
        });
        series.push(Series {
            label: format!("{label}: {what} minus weights and optimizer state"),
            color: color.into(),
            dashed: true,
            points: of.iter().map(|r| (r.report.depth as f64, mib(r.non_weight_kib()))).collect(),
        });
    }
    let title = format!(
        "Peak training memory vs depth ({}, batch {}, {})",
        network_name(&args.run, depth_unit),
        args.run.batch,
        optimizer_name(args.run.optimizer)
    );
    let x_label = format!("{depth_unit} (log scale)");
    let svg = line_chart_svg(&title, &x_label, "MiB", &series);
    svp_model::atomic::write(&args.plot, svg.as_bytes())
        .map_err(|e| CliError::Output { path: args.plot.clone(), reason: e.to_string() })
}

fn summarize(rows: &[Row]) {
    let svp: Vec<&Row> = rows.iter().filter(|r| r.report.method == "svp").collect();
    // Depth 1 has no layer-to-layer buffer reuse to show; compare from depth 2.
    let lo = svp.iter().find(|r| r.report.depth == 2).or_else(|| svp.iter().min_by_key(|r| r.report.depth));
    let (Some(lo), Some(hi)) = (lo, svp.iter().max_by_key(|r| r.report.depth)) else {
        return;
    };
    let (a, b) = (lo.non_weight_kib() as f64, hi.non_weight_kib() as f64);
    eprintln!(
        "SVP memory beyond weights: {:.1} MiB at depth {} -> {:.1} MiB at depth {} ({:+.1} %)",
        a / 1024.0,
        lo.report.depth,
        b / 1024.0,
        hi.report.depth,
        100.0 * (b - a) / a.max(1.0)
    );
    eprintln!(
        "SVP peak RSS at depth {}: {:.1} MiB = {:.2} x (floor {:.1} MiB + baseline {:.1} MiB)",
        hi.report.depth,
        mib(hi.peak_rss_kib),
        hi.peak_rss_kib as f64 / (hi.floor_kib() + hi.report.baseline_rss_kib) as f64,
        mib(hi.floor_kib()),
        mib(hi.report.baseline_rss_kib)
    );
    if let Some(bp) = rows.iter().find(|r| r.report.method == "bp" && r.report.depth == hi.report.depth) {
        eprintln!(
            "BP memory beyond weights at depth {}: {:.1} MiB = {:.1} x SVP's",
            bp.report.depth,
            mib(bp.non_weight_kib()),
            bp.non_weight_kib() as f64 / b.max(1.0)
        );
    }
}
