//! numpy arrays in, checked against the model: images and labels.

use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use svp_net::Normalization;

/// Images as the caller gave them.
pub enum Pixels {
    /// Bytes, 0-255: what svp trains on.
    Bytes(Vec<u8>),
    /// `pixel / 255`, as PyTorch's `ToTensor` gives them.
    Unit(Vec<f32>),
}

impl Pixels {
    /// The network's input: `(pixel / 255 - mean) / std`, as training fed it.
    pub fn normalized(&self, norm: Normalization) -> Vec<f32> {
        match self {
            Pixels::Bytes(b) => {
                let table = norm.table();
                b.iter().map(|&p| table[p as usize]).collect()
            }
            Pixels::Unit(v) => v.iter().map(|&x| (x - norm.mean) / norm.std).collect(),
        }
    }
}

/// The sample count of `shape` if it holds images of `(h, w)`: `(n, h, w)`,
/// `(n, 1, h, w)` (PyTorch's layout) or `(n, h * w)`.
fn samples(shape: &[usize], (h, w): (usize, usize)) -> Option<usize> {
    match *shape {
        [n, a, b] if (a, b) == (h, w) => Some(n),
        [n, 1, a, b] if (a, b) == (h, w) => Some(n),
        [n, f] if f == h * w => Some(n),
        _ => None,
    }
}

fn shape_error(name: &str, shape: &[usize], (h, w): (usize, usize)) -> PyErr {
    PyValueError::new_err(format!(
        "{name} has shape {shape:?}; the model takes {h}x{w} images: give (n, {h}, {w}), (n, 1, {h}, {w}) or (n, {})",
        h * w
    ))
}

/// The images of `x` (uint8 pixels or float32 in [0, 1]) and their count.
pub fn images(x: &Bound<'_, PyAny>, name: &str, image: (usize, usize)) -> PyResult<(Pixels, usize)> {
    if let Ok(a) = x.extract::<PyReadonlyArrayDyn<'_, u8>>() {
        let n = samples(a.shape(), image).ok_or_else(|| shape_error(name, a.shape(), image))?;
        return Ok((Pixels::Bytes(a.as_array().iter().copied().collect()), n));
    }
    if let Ok(a) = x.extract::<PyReadonlyArrayDyn<'_, f32>>() {
        let n = samples(a.shape(), image).ok_or_else(|| shape_error(name, a.shape(), image))?;
        return Ok((Pixels::Unit(a.as_array().iter().copied().collect()), n));
    }
    Err(PyTypeError::new_err(format!(
        "{name} must be a numpy array of uint8 pixels (0-255) or of float32 values in [0, 1], not {}",
        describe(x)
    )))
}

/// Images for training: bytes only, as svp's data sets hold them.
pub fn image_bytes(x: &Bound<'_, PyAny>, name: &str, image: (usize, usize)) -> PyResult<(Vec<u8>, usize)> {
    match images(x, name, image)? {
        (Pixels::Bytes(b), n) => Ok((b, n)),
        (Pixels::Unit(_), _) => Err(PyTypeError::new_err(format!(
            "{name}: training takes uint8 pixels (svp trains on bytes); convert float images in [0, 1] with \
             (x * 255).round().astype(numpy.uint8)"
        ))),
    }
}

/// Class labels of `n` samples, each below `classes`, from a 1-D array of
/// any integer dtype.
pub fn labels(y: &Bound<'_, PyAny>, name: &str, n: usize, classes: usize) -> PyResult<Vec<u8>> {
    let values: Vec<i128> = int_values(y).ok_or_else(|| {
        PyTypeError::new_err(format!("{name} must be a 1-D numpy array of integer labels, not {}", describe(y)))
    })??;
    if values.len() != n {
        return Err(PyValueError::new_err(format!("{name} has {} labels for {n} images", values.len())));
    }
    if let Some((i, &v)) = values.iter().enumerate().find(|&(_, &v)| !(0..classes as i128).contains(&v)) {
        return Err(PyValueError::new_err(format!(
            "{name}[{i}] = {v}, but the model has classes 0 to {}",
            classes - 1
        )));
    }
    Ok(values.into_iter().map(|v| v as u8).collect())
}

/// The values of a 1-D integer array (`None`: not an integer array; an
/// error: one of another rank).
fn int_values(y: &Bound<'_, PyAny>) -> Option<PyResult<Vec<i128>>> {
    macro_rules! try_dtypes {
        ($($t:ty),*) => {$(
            if let Ok(a) = y.extract::<PyReadonlyArrayDyn<'_, $t>>() {
                if a.ndim() != 1 {
                    return Some(Err(PyValueError::new_err(format!(
                        "labels must be 1-D, found shape {:?}",
                        a.shape()
                    ))));
                }
                return Some(Ok(a.as_array().iter().map(|&v| v as i128).collect()));
            }
        )*};
    }
    try_dtypes!(u8, i64, i32, u32, u64, i16, u16, i8);
    None
}

/// What `x` is, for an error: its numpy dtype or its Python type.
fn describe(x: &Bound<'_, PyAny>) -> String {
    if let Ok(dtype) = x.getattr("dtype") {
        return format!("an array of {dtype}");
    }
    match x.get_type().name() {
        Ok(name) => format!("a {name}"),
        Err(_) => "that object".into(),
    }
}
