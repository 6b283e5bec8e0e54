//! Command-line arguments.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// svp: on-device training with Stochastic Variational Propagation.
#[derive(Debug, Parser)]
#[command(name = "svp", version, about, long_about = None)]
pub struct Cli {
    /// Worker threads for the compute pool, 1 to 256 (default: one per core).
    #[arg(long, global = true, value_parser = parse_threads)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

/// Most threads `--threads` takes: the pool starts them all before the
/// command runs, and far more threads than cores only slow a step down.
pub const MAX_THREADS: usize = 256;

fn parse_threads(arg: &str) -> Result<usize, String> {
    match arg.parse::<usize>() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
        _ => Err(format!("must be a whole number from 1 to {MAX_THREADS}")),
    }
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model and report test accuracy per epoch.
    Train(TrainArgs),
    /// Evaluate a saved model on a test set.
    Eval(EvalArgs),
    /// Predict the class of each sample with a saved model.
    Predict(PredictArgs),
    /// Write a model with its weights as f32, f16, bf16 or int8, or as a
    /// PyTorch state dict (safetensors).
    Export(ExportArgs),
    /// Make a model file of PyTorch weights (a safetensors state dict).
    Import(ImportArgs),
    /// Continue training a model file on new data (its own projections and
    /// preprocessing), and report its test accuracy before and after.
    Finetune(FinetuneArgs),
    /// Describe a model file.
    Info(InfoArgs),
    /// Measure peak training memory against depth, SVP against backprop.
    Memory(MemoryArgs),
    /// List the devices svp can compute on: the CPU's kernels and any CUDA GPUs.
    Devices,
    /// One measurement of `svp memory`, in a fresh process (internal).
    #[command(hide = true)]
    MemoryChild(MemoryChildArgs),
}

/// `svp predict`.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// The model file.
    pub model: PathBuf,
    /// Samples: an IDX image file (raw or .gz) or raw little-endian f32 values
    /// (already normalized, one sample after another).
    #[arg(long, conflicts_with = "data")]
    pub input: Option<PathBuf>,
    /// Or the test images of an IDX folder (or `embedded`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Predict from hidden layer K's projection head instead of the last layer (SVP models).
    #[arg(long)]
    pub exit_layer: Option<usize>,
}

/// `svp export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The model file to convert.
    pub model: PathBuf,
    /// Weight type of an svp model file: f32, f16, bf16 or int8
    /// (per-output-channel scales).
    #[arg(long)]
    pub dtype: Option<String>,
    /// `svpm` (a model file) or `safetensors` (the weights as f32 under the
    /// names of a PyTorch nn.Sequential, see `svp import`).
    #[arg(long, value_enum, default_value = "svpm")]
    pub format: ExportFormat,
    /// Where to write the converted model.
    #[arg(long)]
    pub out: PathBuf,
}

/// What `svp export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// An svp model file.
    Svpm,
    /// A safetensors file for PyTorch.
    Safetensors,
}

/// Which epoch's model `--out` keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Keep {
    /// The last epoch's.
    Last,
    /// The epoch with the best validation accuracy (needs --val-split).
    Best,
}

/// `svp finetune`.
#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// The model file (any weight type: f16, bf16 and int8 are widened to f32).
    pub model: PathBuf,
    /// Where to compute: cpu, or `cuda[:N]` (as for `train`; MLPs with
    /// every layer trained, for now).
    #[arg(long, default_value = "cpu")]
    pub device: svp_cuda::Device,
    /// IDX data folder, or `embedded`. Default as for `train`.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Training rule. Default: SVP for a model svp trained with SVP (it
    /// keeps aligning to the projections it was trained against), else
    /// backpropagation (SVP would first re-align a backprop-trained model's
    /// layers to fresh random projections, and lose accuracy doing so).
    #[arg(long, value_enum)]
    pub method: Option<MethodArg>,
    /// Passes over the new training set.
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    /// Samples per step.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Adam's peak learning rate (cosine schedule over the run).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Use only the first N training samples.
    #[arg(long)]
    pub limit_train: Option<usize>,
    /// Train layer K and the layers after it; the layers below K keep their
    /// weights and run forward only, with no optimizer state, gradients or
    /// backward caches. Layers count from 1: conv blocks (or a ViT's patch
    /// embedding, blocks and token head) first, then the dense layers; the
    /// head is the last.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub train_from_layer: usize,
    /// Save the fine-tuned model here after every epoch (it may be the model
    /// itself: the file is read whole first and written atomically).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// One JSON object per line on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Shift training images by up to N pixels, drawn per sample and epoch
    /// (small data: on-device fine-tuning always is).
    #[arg(long, value_name = "N")]
    pub augment_shift: Option<usize>,
    /// Mirror training images left-right at random.
    #[arg(long)]
    pub augment_flip: bool,
    /// Hold out this fraction of the training set (0 < F < 1) and report the
    /// accuracy on it after every epoch.
    #[arg(long, value_name = "F")]
    pub val_split: Option<f64>,
    /// With --val-split and --out: `best` writes the model only when an
    /// epoch improves the validation accuracy; `last` every epoch.
    #[arg(long, value_enum, default_value = "last")]
    pub keep: Keep,
    /// Heap the run may take beyond the data, in MiB (default: three quarters
    /// of the memory the system has available).
    #[arg(long, value_name = "MIB")]
    pub max_memory: Option<usize>,
}

/// `svp import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The weights: a safetensors file of a PyTorch nn.Sequential's state dict.
    pub weights: PathBuf,
    /// The architecture, as a run config's `[model]` table says it (with
    /// `[svp]` and `[train] seed` for the projection heads fine-tuning uses),
    /// and an optional `[import]` table: `image = [H, W]`, `input_mean`,
    /// `input_std`, `class_names`, `rename = { "their.prefix" = "svp's" }`.
    #[arg(long)]
    pub config: PathBuf,
    /// The model's input preprocessing `x = (pixel/255 - mean) / std`: mean
    /// (default: the config's `input_mean`, else what a file svp exported
    /// says, else 0).
    #[arg(long)]
    pub input_mean: Option<f32>,
    /// ... and std (default: the config's `input_std`, else the file's, else 1).
    #[arg(long)]
    pub input_std: Option<f32>,
    /// Input image size, HxW (default: the config's `image`, else the
    /// file's; an MLP whose first layer reads a square number of values is
    /// taken as square).
    #[arg(long, value_parser = parse_image)]
    pub image: Option<(usize, usize)>,
    /// Where to write the model file.
    #[arg(long)]
    pub out: PathBuf,
}

fn parse_image(arg: &str) -> Result<(usize, usize), String> {
    let parsed = arg.split_once('x').and_then(|(h, w)| Some((h.parse().ok()?, w.parse().ok()?)));
    match parsed {
        Some((h, w)) if h > 0 && w > 0 => Ok((h, w)),
        _ => Err("must be HEIGHTxWIDTH, for example 28x28".into()),
    }
}

/// `svp info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The model file.
    pub model: PathBuf,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `svp memory`.
#[derive(Debug, Args)]
pub struct MemoryArgs {
    /// Depths (hidden layers) to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    pub depths: Vec<usize>,
    /// Training rules to measure.
    #[arg(long, value_delimiter = ',', value_enum, default_value = "svp,bp")]
    pub methods: Vec<MethodArg>,
    #[command(flatten)]
    pub run: MemoryRun,
    /// Write the table as CSV here.
    #[arg(long, default_value = "memory.csv")]
    pub csv: PathBuf,
    /// Draw peak memory against depth into this SVG file.
    #[arg(long, default_value = "memory.svg")]
    pub plot: PathBuf,
}

/// What one measured run trains.
#[derive(Clone, Debug, Args)]
pub struct MemoryRun {
    /// Width of every hidden layer.
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Training steps per run, at least 2 (the first is not timed).
    #[arg(long, default_value_t = 5, value_parser = parse_steps)]
    pub steps: usize,
    /// Optimizer: SGD without momentum, as in the paper's memory figure, or Adam.
    #[arg(long, value_enum, default_value = "sgd")]
    pub optimizer: OptimizerArg,
    /// Inputs of every step.
    #[arg(long, value_enum, default_value = "random")]
    pub data: MemoryData,
    /// Sweep this config's network instead of a plain MLP of `--width`: for a
    /// ViT, depth is the number of transformer blocks; for a conv network, the
    /// number of conv blocks (its first blocks, then more like its last,
    /// without further pooling); for an MLP, the number of hidden layers of
    /// its first width. Its `[svp]` options apply;
    /// batch and optimizer come from the flags.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where to train: cpu, or `cuda[:N]` (MLPs; the table and plot then
    /// show the GPU's memory in use, as its driver reports it).
    #[arg(long, default_value = "cpu")]
    pub device: svp_cuda::Device,
}

fn parse_steps(arg: &str) -> Result<usize, String> {
    match arg.parse::<usize>() {
        Ok(n) if n >= 2 => Ok(n),
        _ => Err("must be a whole number of at least 2 (the first step is not timed)".into()),
    }
}

/// What `svp memory` trains on.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MemoryData {
    /// Gaussian inputs and random labels (no data set held in memory).
    Random,
    /// One batch of the embedded Fashion-MNIST subset.
    Embedded,
}

impl MemoryData {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            MemoryData::Random => "random",
            MemoryData::Embedded => "embedded",
        }
    }
}

/// Optimizer for `svp memory`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OptimizerArg {
    /// Plain SGD (no state).
    Sgd,
    /// Adam (two moments per weight).
    Adam,
    /// Adam with its moments in bfloat16 (half the state).
    AdamBf16,
}

/// `svp memory-child`.
#[derive(Debug, Args)]
pub struct MemoryChildArgs {
    /// Training rule.
    #[arg(long, value_enum)]
    pub method: MethodArg,
    /// Hidden layers.
    #[arg(long)]
    pub depth: usize,
    #[command(flatten)]
    pub run: MemoryRun,
}

/// Training rule on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MethodArg {
    /// Stochastic Variational Propagation.
    Svp,
    /// Backpropagation.
    Bp,
}

/// `svp train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Run description (TOML). Default: the built-in models/mlp-fmnist.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where to compute: cpu, or `cuda[:N]` (a build with `--features cuda`
    /// and an NVIDIA GPU; `svp devices` lists them). On a GPU: MLPs, SVP,
    /// SVP+ or BP, Adam, AdamW or plain SGD; the model file and checkpoints
    /// are the same as the CPU's.
    #[arg(long, default_value = "cpu")]
    pub device: svp_cuda::Device,
    /// IDX data folder, or `embedded` for the built-in subset. Default: Debian's
    /// full Fashion-MNIST if installed, else the built-in subset.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Override the config's training rule.
    #[arg(long, value_enum)]
    pub method: Option<MethodArg>,
    /// Override the number of epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Override the seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Override the batch size.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Override the optimizer's learning rate.
    #[arg(long)]
    pub lr: Option<f32>,
    /// Use only the first N training samples.
    #[arg(long)]
    pub limit_train: Option<usize>,
    /// Save the model here after every epoch (atomically), so that a run
    /// that stops early, diverged or killed, leaves its last finished
    /// epoch's model.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// One JSON object per line on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write a checkpoint here after every epoch (and every `--checkpoint-every` steps).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Also checkpoint every N steps.
    #[arg(long, requires = "checkpoint")]
    pub checkpoint_every: Option<u64>,
    /// Continue the run saved in this checkpoint, with its config (give the same
    /// `--data` and `--limit-train`; `--epochs` may extend the run).
    #[arg(long, conflicts_with_all = ["config", "method", "seed", "batch_size", "lr"])]
    pub resume: Option<PathBuf>,
    /// Shift training images by up to N pixels, drawn per sample and epoch
    /// (small data: on-device fine-tuning always is).
    #[arg(long, value_name = "N")]
    pub augment_shift: Option<usize>,
    /// Mirror training images left-right at random.
    #[arg(long)]
    pub augment_flip: bool,
    /// Hold out this fraction of the training set (0 < F < 1) and report the
    /// accuracy on it after every epoch.
    #[arg(long, value_name = "F")]
    pub val_split: Option<f64>,
    /// With --val-split and --out: `best` writes the model only when an
    /// epoch improves the validation accuracy; `last` every epoch.
    #[arg(long, value_enum, default_value = "last")]
    pub keep: Keep,
    /// Heap the run may take beyond the data already loaded, in MiB (weights,
    /// optimizer state, workspace); a run that needs more stops before its
    /// first step, before it has written any of that memory. Default: three
    /// quarters of the memory the system has available.
    #[arg(long, value_name = "MIB")]
    pub max_memory: Option<usize>,
}

/// `svp eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model file.
    pub model: PathBuf,
    /// Where to compute: cpu, or `cuda[:N]` (MLPs in f32; without early
    /// exits, which run on the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: svp_cuda::Device,
    /// IDX data folder, or `embedded`. Default as for `train`.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Also report each hidden layer's early-exit accuracy (SVP models).
    #[arg(long)]
    pub exits: bool,
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}
