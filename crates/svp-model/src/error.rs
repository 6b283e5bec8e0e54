//! What can go wrong reading or writing a model file.

use std::path::PathBuf;

/// What can go wrong reading or writing a model file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Filesystem error.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a model file, or a damaged one.
    #[error("{} is not a valid svp model file: {what}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Weights from elsewhere that do not fit the architecture, or cannot be read.
    #[error("cannot import {}: {what}", path.display())]
    Import {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Not a checkpoint, or a damaged one.
    #[error("{} is not a valid svp checkpoint: {what}", path.display())]
    InvalidCheckpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}
