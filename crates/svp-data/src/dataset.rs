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
    /// A label that cannot be right: beyond the classes a run expects, or far
    /// beyond the other labels (a damaged byte would add a class).
    #[error("{file}: label {label} at index {index} {why}")]
    Label {
        /// The labels file.
        file: String,
        /// The sample's index in it.
        index: usize,
        /// Its label.
        label: u8,
        /// Why it is refused.
        why: String,
    },
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
    /// Number of classes: as the run stated it, or else the largest training
    /// label + 1 (every class below it then has a training sample).
    pub classes: usize,
    /// Where it came from, for reports.
    pub origin: String,
}

/// Where a split's training and test labels were read from, for errors.
struct LabelFiles {
    train: String,
    test: String,
}

impl DataSplit {
    fn new(
        train: Dataset,
        test: Dataset,
        origin: String,
        files: LabelFiles,
        classes: Option<usize>,
    ) -> Result<Self, DataError> {
        if train.image_shape != test.image_shape {
            return Err(DataError::Mismatch(format!(
                "training images are {:?} but test images are {:?}",
                train.image_shape, test.image_shape
            )));
        }
        let classes = match classes {
            Some(n) => {
                for (labels, file) in [(&train.labels, &files.train), (&test.labels, &files.test)] {
                    if let Some((index, &label)) = labels.iter().enumerate().find(|&(_, &y)| y as usize >= n) {
                        let why = format!("is not one of the {n} classes expected (labels 0 to {})", n - 1);
                        return Err(DataError::Label { file: file.clone(), index, label, why });
                    }
                }
                n
            }
            None => Self::classes_of(&train.labels, &files.train)?,
        };
        if classes < 2 {
            return Err(DataError::Mismatch(format!("training labels name {classes} class(es); need at least 2")));
        }
        if let Some((index, &label)) = test.labels.iter().enumerate().find(|&(_, &y)| y as usize >= classes) {
            let why = format!("is outside the {classes} classes of the training set");
            return Err(DataError::Label { file: files.test, index, label, why });
        }
        Ok(Self { train, test, classes, origin })
    }

    /// The classes training labels name when the run does not say: the
    /// largest label + 1, if every class below it has a sample. A class with
    /// none cannot be learned, and is what one damaged label byte (a 200
    /// among 0-9) would add: such a label is an error, not 191 new classes.
    fn classes_of(labels: &[u8], file: &str) -> Result<usize, DataError> {
        let mut seen = [false; 256];
        labels.iter().for_each(|&y| seen[y as usize] = true);
        let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
        if let Some(missing) = seen[..classes].iter().position(|&s| !s) {
            let (index, &label) = labels
                .iter()
                .enumerate()
                .find(|&(_, &y)| y as usize > missing)
                .expect("the largest label is past the gap");
            let why = format!(
                "is beyond the others: no training sample has label {missing}; if the data really has \
                 {classes} classes, state `classes = {classes}` under [model] in the config"
            );
            return Err(DataError::Label { file: file.to_owned(), index, label, why });
        }
        Ok(classes)
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
        Self::load_dir_with(dir, None)
    }

    /// [`DataSplit::load_dir`] for a run that expects `classes` classes
    /// (`None`: as the training labels say, see [`DataSplit::classes`]).
    pub fn load_dir_with(dir: &Path, classes: Option<usize>) -> Result<Self, DataError> {
        if !dir.is_dir() {
            return Err(DataError::Io {
                path: dir.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
            });
        }
        let find = |stem: &str, kind: &str, what: &'static str| -> Result<PathBuf, DataError> {
            let names: Vec<String> = [format!("{stem}-{kind}-ubyte"), format!("{stem}.{kind}-ubyte")]
                .into_iter()
                .flat_map(|n| [format!("{n}.gz"), n])
                .collect();
            names.iter().map(|n| dir.join(n)).find(|p| p.is_file()).ok_or_else(|| DataError::Missing {
                dir: dir.to_owned(),
                what,
                tried: names.join(", "),
            })
        };
        let train_labels = find("train-labels", "idx1", "training labels")?;
        let test_labels = find("t10k-labels", "idx1", "test labels")?;
        let train = Dataset::from_idx(
            read_idx(&find("train-images", "idx3", "training images")?)?,
            read_idx(&train_labels)?,
            "training",
        )?;
        let test = Dataset::from_idx(
            read_idx(&find("t10k-images", "idx3", "test images")?)?,
            read_idx(&test_labels)?,
            "test",
        )?;
        let files = LabelFiles { train: train_labels.display().to_string(), test: test_labels.display().to_string() };
        Self::new(train, test, dir.display().to_string(), files, classes)
    }

    /// The Fashion-MNIST subset compiled into the binary (6,000 training and
    /// 1,000 test samples).
    pub fn embedded() -> Self {
        Self::embedded_with(None).expect("the embedded subset has 10 classes")
    }

    /// [`DataSplit::embedded`] for a run that expects `classes` classes.
    pub fn embedded_with(classes: Option<usize>) -> Result<Self, DataError> {
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
        let files = LabelFiles { train: "embedded training labels".into(), test: "embedded test labels".into() };
        Self::new(train, test, "embedded Fashion-MNIST subset (6k train / 1k test)".into(), files, classes)
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
        self.load_with(None)
    }

    /// Loads the split for a run that expects `classes` classes (`None`: as
    /// the training labels say, see [`DataSplit::classes`]).
    pub fn load_with(&self, classes: Option<usize>) -> Result<DataSplit, DataError> {
        match self {
            DataSource::Dir(d) => DataSplit::load_dir_with(d, classes),
            DataSource::Embedded => DataSplit::embedded_with(classes),
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

    fn split(train_labels: Vec<u8>, test_labels: Vec<u8>, classes: Option<usize>) -> Result<DataSplit, DataError> {
        let set = |labels: Vec<u8>| Dataset { images: vec![0; labels.len()], labels, image_shape: (1, 1) };
        let files = LabelFiles { train: "train-labels".into(), test: "test-labels".into() };
        DataSplit::new(set(train_labels), set(test_labels), "test".into(), files, classes)
    }

    /// One damaged label byte does not add classes: it is refused, naming
    /// the file and the index, unless the run states that many classes.
    #[test]
    fn a_label_far_beyond_the_others_is_an_error() {
        let mut labels: Vec<u8> = (0..40).map(|i| i % 10).collect();
        assert_eq!(split(labels.clone(), vec![3, 9], None).unwrap().classes, 10);
        labels[17] = 200;
        let err = split(labels.clone(), vec![3], None).unwrap_err().to_string();
        assert!(err.starts_with("train-labels: label 200 at index 17 is beyond the others"), "{err}");
        assert!(err.contains("state `classes = 201`"), "{err}");
        // Stated, the same labels are 201 classes.
        assert_eq!(split(labels.clone(), vec![3], Some(201)).unwrap().classes, 201);
        // A run that expects 10 classes refuses it, and a test label beyond them.
        let err = split(labels, vec![3], Some(10)).unwrap_err().to_string();
        assert_eq!(err, "train-labels: label 200 at index 17 is not one of the 10 classes expected (labels 0 to 9)");
        let err = split((0..40).map(|i| i % 10).collect(), vec![1, 12], Some(10)).unwrap_err().to_string();
        assert_eq!(err, "test-labels: label 12 at index 1 is not one of the 10 classes expected (labels 0 to 9)");
        let err = split((0..40).map(|i| i % 10).collect(), vec![1, 10], None).unwrap_err().to_string();
        assert_eq!(err, "test-labels: label 10 at index 1 is outside the 10 classes of the training set");
        // A stated count may leave a class without training samples (here 3 of 0-3).
        assert_eq!(split(vec![0, 1, 2, 0], vec![0], Some(4)).unwrap().classes, 4);
    }
}
