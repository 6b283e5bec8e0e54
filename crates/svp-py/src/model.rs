//! `svp.Model`: a model file in memory, and what Python does with it.

use crate::SvpError;
use crate::arrays;
use numpy::{PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyMemoryError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::path::PathBuf;
use svp_data::{DataSplit, Dataset};
use svp_model::{DType, InferenceModel, InferenceWorkspace, ModelError, ModelFile, Provenance, Role};
use svp_optim::MomentDtype;
use svp_train::finetune::{self, FineTuning};
use svp_train::{EpochModel, EpochReport, FitObserver, FitOptions, Method, argmax};

/// A model file's errors as Python's: `OSError` for the filesystem, `SvpError`
/// for a file that is not a valid model.
fn model_error(e: ModelError) -> PyErr {
    match e {
        ModelError::Io { .. } => PyOSError::new_err(e.to_string()),
        other => SvpError::new_err(other.to_string()),
    }
}

fn parse_dtype(name: &str) -> PyResult<DType> {
    DType::parse(name).ok_or_else(|| PyValueError::new_err(format!("dtype {name:?}: give f32, f16, bf16 or int8")))
}

/// Samples per forward pass of `predict`, `logits` and `evaluate`: bounds the
/// activations held at once, whatever the array's length.
const EVAL_BATCH: usize = 256;

/// A trained network as an svp model file holds it: weights (f32, f16, bf16
/// or int8), the input preprocessing it was trained with, and the seed of its
/// SVP projection heads.
///
/// Images are numpy arrays shaped `(n, h, w)`, `(n, 1, h, w)` or
/// `(n, h * w)`: uint8 pixels, or float32 values `pixel / 255` in [0, 1].
/// The model standardizes them itself, with the mean and standard deviation
/// it was trained with.
#[pyclass(module = "svp")]
pub struct Model {
    inner: InferenceModel,
}

impl Model {
    fn new(file: ModelFile) -> Self {
        Self { inner: InferenceModel::new(file) }
    }

    fn file(&self) -> &ModelFile {
        self.inner.file()
    }

    fn image_shape_usize(&self) -> (usize, usize) {
        let (h, w) = self.file().meta.image_shape;
        (h as usize, w as usize)
    }

    fn check_exit(&self, exit: Option<usize>) -> PyResult<()> {
        let Some(k) = exit else { return Ok(()) };
        let hidden = self.inner.hidden_layers();
        if self.file().meta.heads.is_none() {
            return Err(PyValueError::new_err(
                "early exits need SVP projection heads, and this model has none (it was trained by backpropagation \
                 or imported)",
            ));
        }
        if !(1..=hidden + 1).contains(&k) {
            return Err(PyValueError::new_err(format!(
                "exit={k}: the model has exits 1 to {hidden} and its head, {}",
                hidden + 1
            )));
        }
        Ok(())
    }

    /// Logits of `x`, `n x classes`, computed without the GIL.
    fn logits_of(&self, py: Python<'_>, x: &Bound<'_, PyAny>, exit: Option<usize>) -> PyResult<(Vec<f32>, usize)> {
        self.check_exit(exit)?;
        let (pixels, n) = arrays::images(x, "x", self.image_shape_usize())?;
        let meta = &self.file().meta;
        let (features, classes) = (meta.image_shape.0 as usize * meta.image_shape.1 as usize, meta.classes());
        let input = pixels.normalized(meta.norm);
        drop(pixels);
        let logits = py.detach(|| {
            let mut ws = InferenceWorkspace::default();
            let mut out = Vec::with_capacity(n * classes);
            for chunk in input.chunks(EVAL_BATCH * features) {
                let rows = chunk.len() / features;
                out.extend_from_slice(self.inner.predict(chunk, rows, exit, &mut ws));
            }
            out
        });
        Ok((logits, n))
    }
}

/// What a fine-tuning run reports after each epoch, and the weights of the
/// epoch `keep="best"` keeps.
struct Recorder {
    epochs: Vec<EpochReport>,
    keep_best: bool,
    /// (validation accuracy, epoch, parameters) of the best epoch so far.
    best: Option<(f64, usize, Vec<f32>)>,
}

impl FitObserver for Recorder {
    fn on_epoch(&mut self, report: &EpochReport, model: EpochModel<'_>) -> Result<(), String> {
        self.epochs.push(report.clone());
        if let (true, Some(val)) = (self.keep_best, report.val_acc)
            && self.best.as_ref().is_none_or(|(best, _, _)| val > *best)
        {
            self.best = Some((val, report.epoch, model.network.params().to_vec()));
        }
        Ok(())
    }
}

fn epoch_dict<'py>(py: Python<'py>, r: &EpochReport, has_test: bool) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("epoch", r.epoch)?;
    d.set_item("train_loss", r.train_loss)?;
    d.set_item("test_acc", has_test.then_some(r.test_acc))?;
    d.set_item("val_acc", r.val_acc)?;
    d.set_item("seconds", r.seconds)?;
    d.set_item("samples_per_s", r.samples_per_s)?;
    Ok(d)
}

#[pymethods]
impl Model {
    /// Reads and checks a model file.
    #[staticmethod]
    fn load(path: PathBuf) -> PyResult<Self> {
        ModelFile::load(&path).map(Self::new).map_err(model_error)
    }

    /// A model from the bytes of a model file.
    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        ModelFile::from_bytes(data, "<bytes>".as_ref()).map(Self::new).map_err(model_error)
    }

    /// Writes the model to `path` atomically (a crash leaves the old file or
    /// the new one, never a mix), as `dtype` (f32, f16, bf16 or int8; by
    /// default the dtype it has).
    #[pyo3(signature = (path, dtype=None))]
    fn save(&self, py: Python<'_>, path: PathBuf, dtype: Option<&str>) -> PyResult<()> {
        let dtype = dtype.map(parse_dtype).transpose()?;
        py.detach(|| match dtype {
            Some(d) if d != self.file().meta.weight_dtype() => self.file().convert(d).save(&path),
            _ => self.file().save(&path),
        })
        .map_err(model_error)
    }

    /// The bytes of the model file, as `dtype` (by default the dtype it has).
    #[pyo3(signature = (dtype=None))]
    fn to_bytes<'py>(&self, py: Python<'py>, dtype: Option<&str>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = match dtype.map(parse_dtype).transpose()? {
            Some(d) if d != self.file().meta.weight_dtype() => self.file().convert(d).to_bytes(),
            _ => self.file().to_bytes(),
        };
        Ok(PyBytes::new(py, &bytes))
    }

    /// Number of classes.
    #[getter]
    fn classes(&self) -> usize {
        self.file().meta.classes()
    }

    /// Height and width of an input image.
    #[getter]
    fn image_shape(&self) -> (usize, usize) {
        self.image_shape_usize()
    }

    /// One name per class.
    #[getter]
    fn class_names(&self) -> Vec<String> {
        let names = &self.file().meta.class_names;
        if names.is_empty() { (0..self.classes()).map(|c| c.to_string()).collect() } else { names.clone() }
    }

    /// Dtype of the weights: f32, f16, bf16 or int8.
    #[getter]
    fn dtype(&self) -> &'static str {
        self.file().meta.weight_dtype().name()
    }

    /// The rule that trained it last: "svp" or "bp".
    #[getter]
    fn method(&self) -> String {
        self.file().meta.provenance.method.clone()
    }

    /// Trainable layers, the classifier head included (what
    /// `train_from_layer` counts).
    #[getter]
    fn layers(&self) -> usize {
        self.inner.hidden_layers() + 1
    }

    /// Whether it keeps SVP projection heads (early exits, SVP fine-tuning
    /// against the projections it was trained with).
    #[getter]
    fn has_projection_heads(&self) -> bool {
        self.file().meta.heads.is_some()
    }

    /// The input standardization `(mean, std)` of `pixel / 255`.
    #[getter]
    fn input_norm(&self) -> (f32, f32) {
        let n = self.file().meta.norm;
        (n.mean, n.std)
    }

    /// Bytes of the model file.
    #[getter]
    fn nbytes(&self) -> usize {
        self.file().to_bytes().len()
    }

    /// Logits, float32 `(n, classes)`; with `exit=k`, those of hidden layer
    /// `k`'s projection head (SVP models).
    #[pyo3(signature = (x, exit=None))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        exit: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (logits, n) = self.logits_of(py, x, exit)?;
        let classes = self.classes();
        PyArray1::from_vec(py, logits).reshape([n, classes])
    }

    /// Predicted classes, int64 `(n,)`.
    #[pyo3(signature = (x, exit=None))]
    fn predict<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        exit: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let (logits, _) = self.logits_of(py, x, exit)?;
        let classes = self.classes();
        let labels: Vec<i64> = logits.chunks_exact(classes).map(|row| argmax(row) as i64).collect();
        Ok(PyArray1::from_vec(py, labels))
    }

    /// Accuracy and mean cross-entropy on images `x` with labels `y`:
    /// `{"accuracy": float, "loss": float, "samples": int}`.
    fn evaluate<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        y: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (logits, n) = self.logits_of(py, x, None)?;
        let classes = self.classes();
        let y = arrays::labels(y, "y", n, classes)?;
        let (mut correct, mut loss) = (0usize, 0.0f64);
        for (row, &label) in logits.chunks_exact(classes).zip(&y) {
            correct += usize::from(argmax(row) == label as usize);
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = row.iter().map(|&v| (v - m).exp()).sum();
            loss += (z.ln() + m - row[label as usize]) as f64;
        }
        let d = PyDict::new(py);
        let count = n.max(1) as f64;
        d.set_item("accuracy", correct as f64 / count)?;
        d.set_item("loss", loss / count)?;
        d.set_item("samples", n)?;
        Ok(d)
    }

    /// Continues training on images `x` (uint8) with labels `y`, in place,
    /// as `svp finetune` does: the model's own input preprocessing and, for
    /// SVP, its own projection heads; Adam with a cosine schedule.
    ///
    /// `method` is "svp" or "bp" (by default the one that trained it, "svp"
    /// where it has projection heads). `train_from_layer=k` trains layers k
    /// and up only: the layers below run forward only, with no gradients and
    /// no optimizer state. `augment_shift` and `augment_flip` draw random
    /// shifts and mirror images per sample and epoch, seeded: runs are
    /// bit-identical. `val_split` holds out that fraction of `x` and reports
    /// its accuracy each epoch; `keep="best"` then keeps the best epoch's
    /// weights. `x_test`, `y_test` are evaluated after each epoch.
    ///
    /// Returns `{"epochs": [{"epoch", "train_loss", "test_acc", "val_acc",
    /// "seconds", "samples_per_s"}...], "kept_epoch", "method",
    /// "param_bytes", "optimizer_bytes", "workspace_bytes"}`. On a diverged
    /// run (non-finite loss) it raises `SvpError` and the model is unchanged.
    #[pyo3(signature = (
        x, y, *, epochs=1, method=None, batch_size=128, lr=1e-3, train_from_layer=1,
        augment_shift=0, augment_flip=false, val_split=None, keep="last", x_test=None, y_test=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn finetune<'py>(
        &mut self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        y: &Bound<'py, PyAny>,
        epochs: usize,
        method: Option<&str>,
        batch_size: usize,
        lr: f32,
        train_from_layer: usize,
        augment_shift: usize,
        augment_flip: bool,
        val_split: Option<f64>,
        keep: &str,
        x_test: Option<&Bound<'py, PyAny>>,
        y_test: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let meta = &self.file().meta;
        let (image, classes) = (self.image_shape_usize(), meta.classes());
        let (images, n) = arrays::image_bytes(x, "x", image)?;
        let labels = arrays::labels(y, "y", n, classes)?;
        let train = Dataset { images, labels, image_shape: image };
        let test = match (x_test, y_test) {
            (Some(xt), Some(yt)) => {
                let (images, n) = arrays::image_bytes(xt, "x_test", image)?;
                Dataset { images, labels: arrays::labels(yt, "y_test", n, classes)?, image_shape: image }
            }
            (None, None) => Dataset { images: Vec::new(), labels: Vec::new(), image_shape: image },
            _ => return Err(PyValueError::new_err("give both x_test and y_test, or neither")),
        };
        let has_test = !test.is_empty();
        let origin = format!("numpy arrays ({n} samples)");
        let mut data = DataSplit { train, test, classes, origin: origin.clone() };

        let method = match method {
            Some("svp") => Method::Svp,
            Some("bp") => Method::Bp,
            Some(other) => return Err(PyValueError::new_err(format!("method {other:?}: give \"svp\" or \"bp\""))),
            None if meta.provenance.method == "svp" && meta.heads.is_some() => Method::Svp,
            None => Method::Bp,
        };
        let keep_best = match keep {
            "best" if val_split.is_none() => {
                return Err(PyValueError::new_err("keep=\"best\" needs val_split (what is best is judged on it)"));
            }
            "best" => true,
            "last" => false,
            other => return Err(PyValueError::new_err(format!("keep {other:?}: give \"best\" or \"last\""))),
        };
        if epochs == 0 || batch_size == 0 {
            return Err(PyValueError::new_err("epochs and batch_size must be at least 1"));
        }
        let run = FineTuning {
            method,
            epochs,
            batch_size,
            lr,
            moments: MomentDtype::F32,
            augment: svp_data::Augment { shift: augment_shift, flip: augment_flip },
            train_from_layer,
        };
        let config = finetune::config(meta, run);
        let layers = config.model.layer_count();
        if !(1..=layers).contains(&train_from_layer) {
            return Err(PyValueError::new_err(format!(
                "train_from_layer={train_from_layer}: the model has layers 1 to {layers} (the head is layer {layers})"
            )));
        }
        let validation = match val_split {
            None => None,
            Some(f) if !(f > 0.0 && f < 1.0) => {
                return Err(PyValueError::new_err(format!("val_split={f}: give a fraction between 0 and 1")));
            }
            Some(f) => {
                let val = svp_data::split_validation(&mut data.train, f, config.train.seed);
                if val.is_empty() {
                    return Err(PyValueError::new_err(format!("val_split={f} holds out no sample of {n}")));
                }
                Some(val)
            }
        };
        config.validate_for_data(&data).map_err(|e| PyValueError::new_err(e.to_string()))?;

        let norm = meta.norm;
        let mut recorder = Recorder { epochs: Vec::new(), keep_best, best: None };
        let outcome = py.detach(|| {
            let options = FitOptions {
                initial_params: Some(self.file().to_network().params().to_vec()),
                norm: Some(norm),
                validation,
                ..Default::default()
            };
            svp_train::try_fit_with(&config, &data, &mut recorder, options)
        });
        let mut outcome = outcome.map_err(|e| PyMemoryError::new_err(e.to_string()))?;
        if let Some(why) = outcome.interrupted {
            return Err(SvpError::new_err(why));
        }
        if let Some(error) = outcome.diverged {
            return Err(SvpError::new_err(format!("{error}; the model is unchanged (a smaller lr may help)")));
        }
        let kept_epoch = match recorder.best {
            Some((_, epoch, params)) => {
                outcome.model.params_mut().copy_from_slice(&params);
                epoch
            }
            None => epochs,
        };
        let last_test = recorder.epochs.iter().find(|r| r.epoch == kept_epoch).map_or(0.0, |r| r.test_acc);
        let mut info = meta.info();
        info.heads = outcome.heads.clone();
        info.provenance =
            Provenance { method: method.to_string(), epochs: kept_epoch, test_acc: last_test, data: origin };
        let file = ModelFile::from_network(&outcome.model, &config.model, info, DType::F32);

        let report = PyDict::new(py);
        let reports = recorder.epochs.iter().map(|r| epoch_dict(py, r, has_test)).collect::<PyResult<Vec<_>>>()?;
        report.set_item("epochs", reports)?;
        report.set_item("kept_epoch", kept_epoch)?;
        report.set_item("method", method.to_string())?;
        report.set_item("param_bytes", outcome.memory.params)?;
        report.set_item("optimizer_bytes", outcome.memory.optimizer)?;
        report.set_item("workspace_bytes", outcome.memory.workspace)?;
        self.inner = InferenceModel::new(file);
        Ok(report)
    }

    /// The weights as float32 numpy arrays, one per tensor of the model file
    /// in its order (`weight_names()` names them): an MLP layer's weight
    /// `(out, in)`, bias, and LayerNorm gain and shift where it has them; a
    /// conv block's or transformer block's parameters as one flat array.
    fn get_weights<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyArrayDyn<f32>>> {
        let file = self.file();
        file.meta
            .tensors
            .iter()
            .map(|t| {
                let mut values = vec![0.0f32; t.elements() as usize];
                file.tensor_into(t, &mut values);
                let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
                PyArray1::from_vec(py, values).reshape(shape).expect("the tensor's shape holds its values")
            })
            .collect()
    }

    /// Names of the arrays `get_weights()` returns: `layer{k}.{role}`, `k`
    /// from 1 (the head is the last layer).
    fn weight_names(&self) -> Vec<String> {
        self.file()
            .meta
            .tensors
            .iter()
            .map(|t| {
                let role = match t.role {
                    Role::Weight => "weight",
                    Role::Bias => "bias",
                    Role::Gamma => "gamma",
                    Role::Beta => "beta",
                    Role::Params => "params",
                };
                format!("layer{}.{role}", t.layer + 1)
            })
            .collect()
    }

    /// Replaces every weight with `weights` (arrays as `get_weights()` gives
    /// them, in its order and shapes, float32). The model then holds f32
    /// weights; `save(path, dtype=...)` quantizes again.
    fn set_weights(&mut self, weights: Vec<Bound<'_, PyAny>>) -> PyResult<()> {
        let file = self.file();
        let tensors = &file.meta.tensors;
        if weights.len() != tensors.len() {
            return Err(PyValueError::new_err(format!(
                "set_weights got {} arrays; the model has {} (as get_weights() gives them)",
                weights.len(),
                tensors.len()
            )));
        }
        let mut network = file.to_network();
        // Each layer's tensors lie one after another in its parameters.
        let mut at = vec![0usize; network.n_layers()];
        let names = self.weight_names();
        for ((t, w), name) in tensors.iter().zip(&weights).zip(&names) {
            let array: PyReadonlyArrayDyn<'_, f32> = w.extract().map_err(|_| {
                pyo3::exceptions::PyTypeError::new_err(format!(
                    "{name}: give a float32 numpy array (convert with .astype(numpy.float32))"
                ))
            })?;
            let want: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
            if array.shape() != want.as_slice() {
                return Err(PyValueError::new_err(format!(
                    "{name} has shape {:?}; the model's is {want:?}",
                    array.shape()
                )));
            }
            let l = t.layer as usize;
            let params = &mut network.layer_params_mut(l)[at[l]..at[l] + array.len()];
            for (p, &v) in params.iter_mut().zip(array.as_array().iter()) {
                *p = v;
            }
            at[l] += array.len();
        }
        if let Some(name) = names.iter().zip(tensors).find_map(|(name, t)| {
            let l = t.layer as usize;
            network.layer_params(l).iter().any(|v| !v.is_finite()).then_some(name)
        }) {
            return Err(PyValueError::new_err(format!("{name}'s layer would hold a value that is not finite")));
        }
        let meta = &file.meta;
        let rebuilt = ModelFile::from_network(&network, &meta.model_config(), meta.info(), DType::F32);
        self.inner = InferenceModel::new(rebuilt);
        Ok(())
    }

    fn __repr__(&self) -> String {
        let meta = &self.file().meta;
        let (h, w) = self.image_shape_usize();
        format!(
            "svp.Model({} layers, {h}x{w} -> {} classes, {} weights, trained by {})",
            self.layers(),
            meta.classes(),
            self.dtype(),
            meta.provenance.method
        )
    }
}
