//! Data sets, where they come from, and what can go wrong reading them.

use crate::idx::{IdxArray, parse_idx, read_idx};
use std::path::{Path, PathBuf};

/// Where Debian's `dataset-fashion-mnist` package installs the full data set.
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Everything that can go wrong loading data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not an unsigned-byte IDX file.
    #[error("{} is not an IDX file of bytes (magic 0x{found:08x}, expected 0x0000080N)", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first four bytes, big-endian.
        found: u32,
    },
    /// Fewer bytes than the header declares.
    #[error("{} is truncated: header declares {expected} bytes of data, file has {found}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes declared.
        expected: usize,
        /// Bytes present.
        found: usize,
    },
    /// Structurally invalid.
    #[error("{} is corrupt: {what}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A file of the set is missing from the folder.
    #[error("no {what} file in {} (looked for {tried})", dir.display())]
    Missing {
        /// The folder.
        dir: PathBuf,
        /// Which file.
        what: &'static str,
        /// The names tried.
        tried: String,
    },
    /// Images and labels disagree, or train and test do.
    #[error("{0}")]
    Mismatch(String),
}

/// Images (bytes, row-major per image) and their labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    /// `count * features` pixel bytes.
    pub images: Vec<u8>,
    /// One class index per image.
    pub labels: Vec<u8>,
    /// Height and width of each image.
    pub image_shape: (usize, usize),
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per sample (height x width).
    pub fn features(&self) -> usize {
        self.image_shape.0 * self.image_shape.1
    }

    /// Pixels of sample `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let f = self.features();
        &self.images[i * f..(i + 1) * f]
    }

    fn from_idx(images: IdxArray, labels: IdxArray, what: &str) -> Result<Self, DataError> {
        if images.dims.len() != 3 {
            return Err(DataError::Mismatch(format!(
                "{what} images must have 3 dimensions (count, rows, cols), found {:?}",
                images.dims
            )));
        }
        if labels.dims.len() != 1 {
            return Err(DataError::Mismatch(format!("{what} labels must have 1 dimension, found {:?}", labels.dims)));
        }
        if images.dims[0] != labels.dims[0] {
            return Err(DataError::Mismatch(format!(
                "{what} set has {} images but {} labels",
                images.dims[0], labels.dims[0]
            )));
        }
        if images.dims[0] == 0 || images.dims[1] * images.dims[2] == 0 {
            return Err(DataError::Mismatch(format!("{what} set is empty")));
        }
        Ok(Self { images: images.data, labels: labels.data, image_shape: (images.dims[1], images.dims[2]) })
    }
}

/// A training set and a test set of the same shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataSplit {
    /// Training samples.
    pub train: Dataset,
    /// Test samples.
    pub test: Dataset,
    /// Number of classes (largest training label + 1).
    pub classes: usize,
    /// Where it came from, for reports.
    pub origin: String,
}

impl DataSplit {
    fn new(train: Dataset, test: Dataset, origin: String) -> Result<Self, DataError> {
        if train.image_shape != test.image_shape {
            return Err(DataError::Mismatch(format!(
                "training images are {:?} but test images are {:?}",
                train.image_shape, test.image_shape
            )));
        }
        let classes = train.labels.iter().copied().max().map_or(0, |m| m as usize + 1);
        if classes < 2 {
            return Err(DataError::Mismatch(format!("training labels name {classes} class(es); need at least 2")));
        }
        if let Some(&bad) = test.labels.iter().find(|&&y| y as usize >= classes) {
            return Err(DataError::Mismatch(format!(
                "test label {bad} is outside the {classes} classes of the training set"
            )));
        }
        Ok(Self { train, test, classes, origin })
    }

    /// Values per sample.
    pub fn features(&self) -> usize {
        self.train.features()
    }

    /// Names of the classes: Fashion-MNIST's when the data is Fashion-MNIST
    /// shaped (28x28, 10 classes), else the class numbers.
    pub fn class_names(&self) -> Vec<String> {
        const FASHION: [&str; 10] =
            ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];
        let fashion = self.origin.to_lowercase().contains("fashion") && self.classes == 10;
        (0..self.classes).map(|c| if fashion { FASHION[c].to_string() } else { c.to_string() }).collect()
    }

    /// Reads `train-images`, `train-labels`, `t10k-images`, `t10k-labels`
    /// (`-idx3-ubyte` / `.idx3-ubyte` names, optionally `.gz`) from `dir`.
    pub fn load_dir(dir: &Path) -> Result<Self, DataError> {
        if !dir.is_dir() {
            return Err(DataError::Io {
                path: dir.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
            });
        }
        let read = |stem: &str, kind: &str, what: &'static str| -> Result<IdxArray, DataError> {
            let names: Vec<String> = [format!("{stem}-{kind}-ubyte"), format!("{stem}.{kind}-ubyte")]
                .into_iter()
                .flat_map(|n| [format!("{n}.gz"), n])
                .collect();
            match names.iter().map(|n| dir.join(n)).find(|p| p.is_file()) {
                Some(path) => read_idx(&path),
                None => Err(DataError::Missing { dir: dir.to_owned(), what, tried: names.join(", ") }),
            }
        };
        let train = Dataset::from_idx(
            read("train-images", "idx3", "training images")?,
            read("train-labels", "idx1", "training labels")?,
            "training",
        )?;
        let test = Dataset::from_idx(
            read("t10k-images", "idx3", "test images")?,
            read("t10k-labels", "idx1", "test labels")?,
            "test",
        )?;
        Self::new(train, test, dir.display().to_string())
    }

    /// The Fashion-MNIST subset compiled into the binary (6,000 training and
    /// 1,000 test samples).
    pub fn embedded() -> Self {
        let part = |bytes: &[u8], name: &str| parse_idx(bytes, Path::new(name)).expect("embedded data is valid");
        let train = Dataset::from_idx(
            part(include_bytes!("../embedded/train-images-idx3-ubyte.gz"), "embedded train images"),
            part(include_bytes!("../embedded/train-labels-idx1-ubyte.gz"), "embedded train labels"),
            "training",
        )
        .expect("embedded training set is consistent");
        let test = Dataset::from_idx(
            part(include_bytes!("../embedded/t10k-images-idx3-ubyte.gz"), "embedded test images"),
            part(include_bytes!("../embedded/t10k-labels-idx1-ubyte.gz"), "embedded test labels"),
            "test",
        )
        .expect("embedded test set is consistent");
        Self::new(train, test, "embedded Fashion-MNIST subset (6k train / 1k test)".into())
            .expect("embedded split is consistent")
    }
}

/// Where training data comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSource {
    /// An IDX folder.
    Dir(PathBuf),
    /// The subset compiled into the binary.
    Embedded,
}

impl DataSource {
    /// `--data DIR` if given; else Debian's full Fashion-MNIST if installed;
    /// else the embedded subset.
    pub fn resolve(dir: Option<&Path>) -> Self {
        match dir {
            Some(d) => DataSource::Dir(d.to_owned()),
            None if Path::new(DEBIAN_FASHION_MNIST).join("train-images-idx3-ubyte.gz").is_file() => {
                DataSource::Dir(PathBuf::from(DEBIAN_FASHION_MNIST))
            }
            None => DataSource::Embedded,
        }
    }

    /// Loads the split.
    pub fn load(&self) -> Result<DataSplit, DataError> {
        match self {
            DataSource::Dir(d) => DataSplit::load_dir(d),
            DataSource::Embedded => Ok(DataSplit::embedded()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_subset_is_fashion_mnist_shaped() {
        let s = DataSplit::embedded();
        assert_eq!(s.train.len(), 6000);
        assert_eq!(s.test.len(), 1000);
        assert_eq!(s.train.image_shape, (28, 28));
        assert_eq!(s.classes, 10);
        // Every class is present in both parts.
        for c in 0..10u8 {
            assert!(s.train.labels.iter().filter(|&&y| y == c).count() > 400);
            assert!(s.test.labels.iter().filter(|&&y| y == c).count() > 60);
        }
    }
}
