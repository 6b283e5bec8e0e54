//! Command-line arguments.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// svp: on-device training with Stochastic Variational Propagation.
#[derive(Debug, Parser)]
#[command(name = "svp", version, about, long_about = None)]
pub struct Cli {
    /// Worker threads for the compute pool (default: one per core).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model and report test accuracy per epoch.
    Train(TrainArgs),
    /// Evaluate a saved model on a test set.
    Eval(EvalArgs),
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
    /// Save the trained model here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// One JSON object per line on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `svp eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model file.
    pub model: PathBuf,
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
