//! svp's weight quantizers on numpy arrays: what a fleet client uses to send
//! a smaller update (the same encodings as model files').

use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use svp_model::DType;

/// Quantized values, and the per-row scales of int8 ones.
type Quantized<'py> = (Bound<'py, PyAny>, Option<Bound<'py, PyArray1<f32>>>);

/// Values per int8 scale: rows run along the last axis, so a weight matrix
/// `(out, in)` gets one scale per output channel, as in model files, and a
/// 1-D array one scale.
fn cols_of(shape: &[usize]) -> usize {
    shape.last().copied().unwrap_or(1).max(1)
}

/// Quantizes float32 `x` as svp's model files store weights: `dtype="f16"`
/// gives `(float16 array, None)`; `dtype="int8"` gives `(int8 array, scales)`
/// with one float32 scale per row (symmetric, `max |row| / 127`).
#[pyfunction]
pub fn quantize<'py>(py: Python<'py>, x: PyReadonlyArrayDyn<'py, f32>, dtype: &str) -> PyResult<Quantized<'py>> {
    let shape = x.shape().to_vec();
    let values: Vec<f32> = x.as_array().iter().copied().collect();
    match DType::parse(dtype) {
        Some(DType::F16) => {
            let halves: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
            Ok((PyArray1::from_vec(py, halves).reshape(shape)?.into_any(), None))
        }
        Some(DType::I8) => {
            let mut bytes = Vec::with_capacity(values.len());
            let scales = svp_model::dtype::encode(DType::I8, &values, cols_of(&shape), &mut bytes)
                .expect("int8 encoding gives scales");
            let q: Vec<i8> = bytes.into_iter().map(|b| b as i8).collect();
            Ok((PyArray1::from_vec(py, q).reshape(shape)?.into_any(), Some(PyArray1::from_vec(py, scales))))
        }
        _ => Err(PyValueError::new_err(format!("quantize: dtype {dtype:?}: give \"f16\" or \"int8\""))),
    }
}

/// The float32 values of what [`quantize`] gave: a float16 array, or an int8
/// array with its per-row `scales`.
#[pyfunction]
#[pyo3(signature = (q, scales=None))]
pub fn dequantize<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    scales: Option<PyReadonlyArrayDyn<'py, f32>>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    if let Ok(h) = q.extract::<PyReadonlyArrayDyn<'py, half::f16>>() {
        let values: Vec<f32> = h.as_array().iter().map(|v| v.to_f32()).collect();
        return PyArray1::from_vec(py, values).reshape(h.shape());
    }
    let Ok(q) = q.extract::<PyReadonlyArrayDyn<'py, i8>>() else {
        return Err(PyValueError::new_err("dequantize: give a float16 array, or an int8 array with its scales"));
    };
    let scales = scales.ok_or_else(|| PyValueError::new_err("dequantize: an int8 array needs its scales"))?;
    let cols = cols_of(q.shape());
    let rows = q.len() / cols;
    if scales.len() != rows {
        return Err(PyValueError::new_err(format!("dequantize: {} scales for {rows} rows of {cols}", scales.len())));
    }
    let bytes: Vec<u8> = q.as_array().iter().map(|&v| v as u8).collect();
    let scales: Vec<f32> = scales.as_array().iter().copied().collect();
    let mut out = vec![0.0f32; q.len()];
    svp_model::dtype::decode(DType::I8, &bytes, Some(&scales), cols, &mut out);
    PyArray1::from_vec(py, out).reshape(q.shape())
}
