//! The CLI's errors: each prints as one line.

use std::path::PathBuf;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The config file could not be read.
    #[error("cannot read config {}: {source}", path.display())]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for a run.
    #[error("config {}: {message}", path.display())]
    ConfigParse {
        /// The file.
        path: PathBuf,
        /// Where and what.
        message: String,
    },
    /// The config does not make sense, or does not fit the data.
    #[error(transparent)]
    Config(#[from] svp_train::ConfigError),
    /// A saved model cannot read these inputs (or this request of it).
    #[error("{0}")]
    ModelMismatch(String),
    /// The GPU backend is missing, or cannot open the device asked for.
    #[error(transparent)]
    Cuda(#[from] svp_cuda::CudaError),
    /// The device cannot train this run: not built in, not there, out of
    /// its memory, or a config the device trainer does not do yet.
    #[error(transparent)]
    Device(#[from] svp_train::device::Unsupported),
    /// Data could not be loaded.
    #[error(transparent)]
    Data(#[from] svp_data::DataError),
    /// A model file could not be read or written.
    #[error(transparent)]
    Model(#[from] svp_model::ModelError),
    /// The output path cannot be written.
    #[error("cannot write output {}: {reason}", path.display())]
    Output {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Training does not fit the memory there is (checked before the first step).
    #[error(
        "not enough memory to train: could not get {:.1} MiB more for {}{}; a smaller batch or network needs less",
        .error.bytes as f64 / 1048576.0,
        .error.what,
        .budget.map_or(String::new(), |b| format!(" within {b}"))
    )]
    OutOfMemory {
        /// What did not fit.
        error: svp_alloc::OutOfMemory,
        /// The budget it did not fit in, if one was set.
        budget: Option<crate::mem::Budget>,
    },
    /// One measurement of `svp memory` (a child process) failed.
    #[error("measuring {what}: {reason}")]
    Measurement {
        /// Which run.
        what: String,
        /// Why, as the child said it.
        reason: String,
    },
    /// A checkpoint that cannot be resumed as asked.
    #[error("{0}")]
    Resume(String),
    /// Training stopped because a file could not be written (a checkpoint or
    /// an epoch's model), or a resume state did not fit.
    #[error("{0}")]
    Interrupted(String),
    /// Training stopped on a non-finite loss or weights.
    #[error("{error}; {saved}")]
    Diverged {
        /// What happened.
        error: svp_train::TrainError,
        /// What was kept.
        saved: String,
    },
}

impl CliError {
    /// Process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Diverged { .. } => 3,
            _ => 1,
        }
    }
}
