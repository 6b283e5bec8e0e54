//! The GPU API of a build without the `cuda` feature: the same names and
//! signatures, whose constructors answer [`CudaError::NotCompiled`]. Values
//! of [`Gpu`] and [`GpuBuffer`] cannot exist here, so their methods are
//! never called.

use crate::{CudaError, DeviceInfo};
use std::convert::Infallible;

/// The GPUs this machine has: never any, in this build.
pub fn devices() -> Result<Vec<DeviceInfo>, CudaError> {
    Err(CudaError::NotCompiled)
}

/// svp's kernels as PTX: never in this build.
pub fn compile_kernels(_compute_capability: (i32, i32)) -> Result<String, CudaError> {
    Err(CudaError::NotCompiled)
}

/// An opened GPU (uninhabited without the `cuda` feature).
pub struct Gpu {
    never: Infallible,
}

/// f32 values in device memory (uninhabited without the `cuda` feature).
pub struct GpuBuffer {
    never: Infallible,
}

impl GpuBuffer {
    /// Its number of elements.
    pub fn len(&self) -> usize {
        match self.never {}
    }

    /// Whether it holds no elements.
    pub fn is_empty(&self) -> bool {
        match self.never {}
    }
}

impl Gpu {
    /// Opens device `ordinal`: always [`CudaError::NotCompiled`] here.
    pub fn open(_ordinal: usize) -> Result<Gpu, CudaError> {
        Err(CudaError::NotCompiled)
    }

    /// The device.
    pub fn info(&self) -> &DeviceInfo {
        match self.never {}
    }

    /// Copies `values` to a new device buffer.
    pub fn upload(&self, _values: &[f32]) -> Result<GpuBuffer, CudaError> {
        match self.never {}
    }

    /// A new device buffer of `len` zeros.
    pub fn zeros(&self, _len: usize) -> Result<GpuBuffer, CudaError> {
        match self.never {}
    }

    /// Copies a device buffer into `out` (of the buffer's length).
    pub fn download(&self, _buffer: &GpuBuffer, _out: &mut [f32]) -> Result<(), CudaError> {
        match self.never {}
    }

    /// Copies `values` into the first `values.len()` elements of `buffer`.
    pub fn write(&self, _buffer: &mut GpuBuffer, _values: &[f32]) -> Result<(), CudaError> {
        match self.never {}
    }

    /// Copies the first `n` values of `src` into `dst`.
    pub fn copy(&self, _src: &GpuBuffer, _dst: &mut GpuBuffer, _n: usize) -> Result<(), CudaError> {
        match self.never {}
    }

    /// `c = alpha * op(a) * op(b) + beta * c` on row-major matrices.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        _transpose_a: bool,
        _transpose_b: bool,
        _m: usize,
        _n: usize,
        _k: usize,
        _alpha: f32,
        _a: &GpuBuffer,
        _b: &GpuBuffer,
        _beta: f32,
        _c: &mut GpuBuffer,
    ) -> Result<(), CudaError> {
        match self.never {}
    }

    /// Adds `bias` to each row of `x`, then applies ReLU if asked.
    pub fn add_bias(
        &self,
        _x: &mut GpuBuffer,
        _bias: &GpuBuffer,
        _rows: usize,
        _cols: usize,
        _relu: bool,
    ) -> Result<(), CudaError> {
        match self.never {}
    }

    /// Zeroes the first `n` values of `grad` where `output` (a ReLU's output) is not positive.
    pub fn relu_backward(&self, _grad: &mut GpuBuffer, _output: &GpuBuffer, _n: usize) -> Result<(), CudaError> {
        match self.never {}
    }

    /// `sums[c] = sum over rows of x[r][c]` (a bias's gradient).
    pub fn column_sums(
        &self,
        _x: &GpuBuffer,
        _rows: usize,
        _cols: usize,
        _sums: &mut GpuBuffer,
    ) -> Result<(), CudaError> {
        match self.never {}
    }

    /// Waits for everything queued on the device.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        match self.never {}
    }
}
