//! Data sets for svp.
//!
//! * [`idx`]: the IDX format of MNIST and Fashion-MNIST, raw or gzipped, read
//!   with every length checked against the file.
//! * [`Dataset`] and [`DataSplit`]: images as bytes plus labels; sizes come
//!   from the files, never from constants.
//! * [`DataSource`]: where data comes from (`--data DIR`, the Debian package's
//!   full Fashion-MNIST, or the subset embedded in the binary).
//! * [`Batcher`]: seeded shuffling and batch gathering into buffers the caller
//!   owns; the data set itself is never copied.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod idx;

mod batch;
mod dataset;

pub use batch::{Augment, Batcher, split_validation};
pub use dataset::{DEBIAN_FASHION_MNIST, DataError, DataSource, DataSplit, Dataset};
