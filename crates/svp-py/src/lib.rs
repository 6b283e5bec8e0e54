//! Python bindings of svp: `import svp`.
//!
//! One class, [`Model`], over a model file held in memory: load and save it
//! (any dtype), predict and evaluate on numpy arrays, fine-tune it with SVP or
//! backpropagation through the same library path as `svp finetune`, and read
//! or replace its weights as numpy arrays (what a federated-learning client
//! sends and receives). Training and prediction release the GIL.
//!
//! Errors keep the one-line messages of the `svp` command: a damaged or
//! unreadable file raises [`SvpError`] or `OSError`, arrays of the wrong
//! shape or dtype `ValueError` or `TypeError`, a run that cannot fit
//! `MemoryError`.
//!
//! Built by maturin (`crates/svp-py/pyproject.toml`) into one abi3 wheel for
//! CPython 3.9 and later; the Python side (re-exports, type stubs) is in
//! `crates/svp-py/python/svp`.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod arrays;
mod model;
mod quant;

pub use model::Model;
use numpy::{PyArray1, PyArray3, PyArrayMethods};
use pyo3::prelude::*;
use std::path::PathBuf;

pyo3::create_exception!(
    svp,
    SvpError,
    pyo3::exceptions::PyException,
    "A model file that is damaged or does not fit, or a training run that failed."
);

/// Images `(n, h, w)` uint8 and labels `(n,)` uint8 of one part of a split.
type Part<'py> = (Bound<'py, PyArray3<u8>>, Bound<'py, PyArray1<u8>>);

/// Reads a data set as svp's `--data` does: IDX files (gzipped or not) in
/// the folder `path`, or with no path the Fashion-MNIST subset compiled into
/// svp (6,000 training and 1,000 test images). Returns `((x_train,
/// y_train), (x_test, y_test))`: uint8 images `(n, h, w)` and uint8 labels.
#[pyfunction]
#[pyo3(signature = (path=None))]
fn load_data<'py>(py: Python<'py>, path: Option<PathBuf>) -> PyResult<(Part<'py>, Part<'py>)> {
    let source = match path {
        Some(dir) => svp_data::DataSource::Dir(dir),
        None => svp_data::DataSource::Embedded,
    };
    let split = py.detach(|| source.load()).map_err(|e| SvpError::new_err(e.to_string()))?;
    let part = |d: svp_data::Dataset| -> PyResult<Part<'py>> {
        let (n, (h, w)) = (d.len(), d.image_shape);
        Ok((PyArray1::from_vec(py, d.images).reshape([n, h, w])?, PyArray1::from_vec(py, d.labels)))
    };
    Ok((part(split.train)?, part(split.test)?))
}

/// The native module, `svp._native`; `svp` re-exports what it holds.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_function(wrap_pyfunction!(load_data, m)?)?;
    m.add_function(wrap_pyfunction!(quant::quantize, m)?)?;
    m.add_function(wrap_pyfunction!(quant::dequantize, m)?)?;
    m.add("SvpError", m.py().get_type::<SvpError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
