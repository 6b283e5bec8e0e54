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
//!
//! ```
//! use svp_data::{Batcher, DataSplit};
//!
//! let data = DataSplit::embedded(); // 6,000 + 1,000 Fashion-MNIST images
//! let pixels: [f32; 256] = std::array::from_fn(|p| p as f32 / 255.0);
//! let mut batcher = Batcher::new(data.train.len(), 128, pixels);
//! batcher.start_epoch(1, 0, true);
//! let (mut x, mut y) = (vec![0.0; 128 * data.features()], vec![0u32; 128]);
//! assert_eq!(batcher.gather(&data.train, 0, &mut x, &mut y), 128);
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod idx;

mod batch;
mod dataset;

pub use batch::{Augment, Batcher, split_validation};
pub use dataset::{DEBIAN_FASHION_MNIST, DataError, DataSource, DataSplit, Dataset};
