//! Training on a device other than the CPU engine: the backend seam.
//!
//! [`Backend`] is the small set of operations an MLP training step needs on
//! device memory: buffers, GEMM, and the elementwise and row kernels of a
//! dense block, the local loss and Adam. [`DeviceTrainer`] runs SVP and BP
//! steps through it with the weights, optimizer state and workspace on the
//! device, and brings the weights and moments back to the host
//! [`Network`](crate::Network) when a checkpoint, an evaluation or the end
//! of the run needs them ([`crate::Trainer::sync_to_host`]).
//!
//! Two backends implement it:
//! * [`HostBackend`]: the CPU engine's own functions (svp-tensor's GEMM,
//!   svp-nn's LayerNorm and cross-entropy, the optimizer's Adam arithmetic)
//!   over host vectors. It is the reference every other backend is checked
//!   against, and it checks [`DeviceTrainer`]'s logic on any machine: a run
//!   through it matches [`crate::SvpTrainer`] and [`crate::BpTrainer`].
//! * `svp_cuda::Gpu` (feature `cuda`): cuBLAS and NVRTC kernels.
//!
//! The CPU trainers do not go through this seam: they fuse what a device
//! keeps apart (the weight gradient straight from the GEMM into Adam, tiles
//! of `R`), and their bits are pinned by the golden tests.

mod host;
mod infer;
mod trainer;

#[cfg(feature = "cuda")]
mod gpu;

pub use host::HostBackend;
pub use infer::DeviceInference;
pub use svp_cuda::{AdamScalars, CudaError};
pub use trainer::{DeviceTrainer, Unsupported};

/// Which engine a run trains on ([`crate::try_fit_on`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TrainOn {
    /// The CPU engine ([`crate::SvpTrainer`], [`crate::BpTrainer`]).
    #[default]
    Cpu,
    /// [`DeviceTrainer`] on NVIDIA GPU `N` (a build with the `cuda` feature).
    Cuda(usize),
    /// [`DeviceTrainer`] on [`HostBackend`]: the device trainer's logic on
    /// the CPU, to check it (and the GPU against it) anywhere.
    HostBackend,
}

impl From<svp_cuda::Device> for TrainOn {
    fn from(device: svp_cuda::Device) -> Self {
        match device {
            svp_cuda::Device::Cpu => TrainOn::Cpu,
            svp_cuda::Device::Cuda(n) => TrainOn::Cuda(n),
        }
    }
}

/// Evaluates `model` on `data` on the device `on` names (not the CPU
/// engine: [`crate::evaluate`] is that), in batches of `batch_size`.
pub fn evaluate_on(
    on: TrainOn,
    model: &crate::Network,
    data: &svp_data::Dataset,
    norm: crate::Normalization,
    batch_size: usize,
) -> Result<crate::EvalReport, Unsupported> {
    match on {
        TrainOn::Cpu => Err(Unsupported::Config("the CPU engine evaluates with svp_train::evaluate".into())),
        TrainOn::HostBackend => {
            Ok(DeviceInference::try_new(HostBackend::new(), model, batch_size)?.evaluate(data, norm)?)
        }
        TrainOn::Cuda(ordinal) => evaluate_on_gpu(ordinal, model, data, norm, batch_size),
    }
}

#[cfg(feature = "cuda")]
fn evaluate_on_gpu(
    ordinal: usize,
    model: &crate::Network,
    data: &svp_data::Dataset,
    norm: crate::Normalization,
    batch_size: usize,
) -> Result<crate::EvalReport, Unsupported> {
    let gpu = svp_cuda::Gpu::open(ordinal)?;
    Ok(DeviceInference::try_new(gpu, model, batch_size)?.evaluate(data, norm)?)
}

#[cfg(not(feature = "cuda"))]
fn evaluate_on_gpu(
    ordinal: usize,
    _model: &crate::Network,
    _data: &svp_data::Dataset,
    _norm: crate::Normalization,
    _batch_size: usize,
) -> Result<crate::EvalReport, Unsupported> {
    // This build has no CUDA: the stand-in's `open` says so, and opens nothing.
    svp_cuda::Gpu::open(ordinal)?;
    Err(CudaError::NotCompiled.into())
}

/// What a training step needs of a device. Matrices are row-major f32, as
/// on the CPU; a buffer may be longer than an operation uses (its first
/// elements are used), so one workspace buffer serves every layer. Every
/// operation checks its buffers' lengths and fails with
/// [`CudaError::Shape`] instead of touching memory past them.
///
/// Operations are queued in order; only [`Backend::read`] waits for them.
pub trait Backend {
    /// f32 values in the device's memory.
    type Buffer;

    /// A buffer of `len` zeros.
    fn zeros(&self, len: usize) -> Result<Self::Buffer, CudaError>;

    /// Copies `values` into the first `values.len()` elements of `dst`.
    fn write(&self, dst: &mut Self::Buffer, values: &[f32]) -> Result<(), CudaError>;

    /// Copies the first `out.len()` elements of `src` into `out`, after the
    /// work queued before it.
    fn read(&self, src: &Self::Buffer, out: &mut [f32]) -> Result<(), CudaError>;

    /// Copies the first `n` elements of `src` into `dst`.
    fn copy(&self, src: &Self::Buffer, dst: &mut Self::Buffer, n: usize) -> Result<(), CudaError>;

    /// `c = alpha * op(a) * op(b) + beta * c`: `c` is `m x n`, `op(a)` is
    /// `m x k` (`a` stored `k x m` when transposed), `op(b)` is `k x n` (`b`
    /// stored `n x k` when transposed).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        transpose_a: bool,
        transpose_b: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &Self::Buffer,
        b: &Self::Buffer,
        beta: f32,
        c: &mut Self::Buffer,
    ) -> Result<(), CudaError>;

    /// A dense block without a norm: `out = act(x W^T + bias)` for `rows`
    /// rows, `x` being `rows x in_dim` and `w` `out_dim x in_dim`, act ReLU
    /// or the identity.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        x: &Self::Buffer,
        w: &Self::Buffer,
        bias: &Self::Buffer,
        out: &mut Self::Buffer,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
        relu: bool,
    ) -> Result<(), CudaError>;

    /// Zeroes the first `n` values of `grad` where `output` (a ReLU's) is not positive.
    fn relu_backward(&self, grad: &mut Self::Buffer, output: &Self::Buffer, n: usize) -> Result<(), CudaError>;

    /// `sums[c]` = the sum over `rows` of `x[r][c]`.
    fn column_sums(&self, x: &Self::Buffer, rows: usize, cols: usize, sums: &mut Self::Buffer)
    -> Result<(), CudaError>;

    /// `z += bias`, LayerNorm per row (`z` keeps the normalized values,
    /// `rstd` the rows' `1/std`), `out = act(gamma * xhat + beta)` with act
    /// ReLU or the identity: svp-nn's `layer_norm::forward`.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_forward(
        &self,
        z: &mut Self::Buffer,
        bias: &Self::Buffer,
        gamma: &Self::Buffer,
        beta: &Self::Buffer,
        rstd: &mut Self::Buffer,
        out: &mut Self::Buffer,
        rows: usize,
        d: usize,
        relu: bool,
    ) -> Result<(), CudaError>;

    /// The backward of [`Backend::layer_norm_forward`]: `dy` (wrt `out`)
    /// becomes the gradient wrt `z`, in place; writes the gradients of
    /// gamma, beta and the bias.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(
        &self,
        xhat: &Self::Buffer,
        rstd: &Self::Buffer,
        gamma: &Self::Buffer,
        beta: &Self::Buffer,
        dy: &mut Self::Buffer,
        dgamma: &mut Self::Buffer,
        dbeta: &mut Self::Buffer,
        dbias: &mut Self::Buffer,
        rows: usize,
        d: usize,
        relu: bool,
    ) -> Result<(), CudaError>;

    /// Softmax cross-entropy against `labels` (class indices as floats):
    /// `grad` = d(mean loss)/d logits, `stats[slot]` = the mean loss,
    /// `stats[slot + 1]` = rows whose argmax is the label.
    #[allow(clippy::too_many_arguments)]
    fn softmax_xent(
        &self,
        logits: &Self::Buffer,
        labels: &Self::Buffer,
        grad: &mut Self::Buffer,
        stats: &mut Self::Buffer,
        slot: usize,
        rows: usize,
        classes: usize,
    ) -> Result<(), CudaError>;

    /// Feature alignment: the rows of `v` (centred if asked) over their norm
    /// plus 1e-8 into `normed`, the norms into `norms`.
    fn fa_normalize(
        &self,
        v: &Self::Buffer,
        normed: &mut Self::Buffer,
        norms: &mut Self::Buffer,
        rows: usize,
        d: usize,
        center: bool,
    ) -> Result<(), CudaError>;

    /// Feature alignment: `target` (`b x b`) becomes `D = sim - target`;
    /// `stats[slot]` = the sum of `D^2` over `b^2`.
    fn fa_difference(
        &self,
        sim: &Self::Buffer,
        target: &mut Self::Buffer,
        stats: &mut Self::Buffer,
        slot: usize,
        b: usize,
    ) -> Result<(), CudaError>;

    /// Feature alignment: through the normalization from `dnormed` (dL/dN,
    /// used as scratch), `dv += weight * dL/dv`.
    #[allow(clippy::too_many_arguments)]
    fn fa_gradient(
        &self,
        dnormed: &mut Self::Buffer,
        normed: &Self::Buffer,
        norms: &Self::Buffer,
        dv: &mut Self::Buffer,
        rows: usize,
        d: usize,
        center: bool,
        weight: f32,
    ) -> Result<(), CudaError>;

    /// One plain SGD update of the first `n` parameters: `p -= lr * (g +
    /// weight_decay * p)`.
    fn sgd(
        &self,
        params: &mut Self::Buffer,
        grad: &Self::Buffer,
        n: usize,
        lr: f32,
        weight_decay: f32,
    ) -> Result<(), CudaError>;

    /// Bytes of the device's memory in use (by every process), where the
    /// device says; `None` for host memory.
    fn memory_in_use(&self) -> Option<usize> {
        None
    }

    /// One Adam update of the first `n` parameters.
    #[allow(clippy::too_many_arguments)]
    fn adam(
        &self,
        params: &mut Self::Buffer,
        grad: &Self::Buffer,
        m: &mut Self::Buffer,
        v: &mut Self::Buffer,
        n: usize,
        scalars: AdamScalars,
    ) -> Result<(), CudaError>;
}
