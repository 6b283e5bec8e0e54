//! The GPU backend proper (feature `cuda`): cudarc's driver, cuBLAS and
//! NVRTC, all loaded at run time.

use crate::{CudaError, DeviceInfo, check_len};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
use std::sync::Arc;

const KERNELS: &str = include_str!("kernels.cu");
const THREADS_PER_BLOCK: u32 = 256;

/// The libraries a GPU run loads, in the order they are needed.
#[derive(Clone, Copy)]
enum Library {
    Driver,
    Blas,
    Nvrtc,
}

impl Library {
    fn present(self) -> bool {
        // SAFETY: `is_culib_present` only tries to dlopen the library by its
        // usual names and closes it again. Loading runs the library's own
        // initializers, NVIDIA's, the same ones the first real call would
        // run; nothing on the Rust side depends on the outcome but the bool.
        // Exercised by `devices()` in this crate's tests on every machine.
        unsafe {
            match self {
                Library::Driver => cudarc::driver::sys::is_culib_present(),
                Library::Blas => cudarc::cublas::sys::is_culib_present(),
                Library::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
            }
        }
    }

    /// Loading a missing library through cudarc panics, so every entry point
    /// asks first.
    fn require(self) -> Result<(), CudaError> {
        if self.present() {
            return Ok(());
        }
        Err(match self {
            Library::Driver => CudaError::LibraryMissing {
                what: "driver",
                file: "libcuda.so",
                hint: "this machine has no NVIDIA driver (no GPU, or the driver is not installed)",
            },
            Library::Blas => CudaError::LibraryMissing {
                what: "cuBLAS",
                file: "libcublas.so",
                hint: "install the CUDA toolkit's cuBLAS (on Jetson: JetPack) or add its folder to LD_LIBRARY_PATH",
            },
            Library::Nvrtc => CudaError::LibraryMissing {
                what: "NVRTC",
                file: "libnvrtc.so",
                hint: "install the CUDA toolkit's NVRTC (on Jetson: JetPack) or add its folder to LD_LIBRARY_PATH",
            },
        })
    }
}

fn driver(e: cudarc::driver::DriverError) -> CudaError {
    CudaError::Driver(e.to_string())
}

fn blas(e: cudarc::cublas::result::CublasError) -> CudaError {
    CudaError::Blas(e.to_string())
}

fn device_count() -> Result<usize, CudaError> {
    Library::Driver.require()?;
    // No device at all comes back from cuInit as an error; it means zero.
    match CudaContext::device_count() {
        Ok(n) => Ok(n.max(0) as usize),
        Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => Ok(0),
        Err(e) => Err(driver(e)),
    }
}

fn describe(ctx: &CudaContext) -> Result<DeviceInfo, CudaError> {
    Ok(DeviceInfo {
        ordinal: ctx.ordinal(),
        name: ctx.name().map_err(driver)?,
        compute_capability: ctx.compute_capability().map_err(driver)?,
        total_memory: ctx.total_mem().map_err(driver)?,
    })
}

/// The GPUs this machine has (an empty list when the driver sees none).
pub fn devices() -> Result<Vec<DeviceInfo>, CudaError> {
    (0..device_count()?).map(|i| CudaContext::new(i).map_err(driver).and_then(|ctx| describe(&ctx))).collect()
}

/// f32 values in device memory.
pub struct GpuBuffer {
    data: CudaSlice<f32>,
}

impl GpuBuffer {
    /// Its number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.data.len() == 0
    }
}

struct Kernels {
    add_bias: CudaFunction,
    relu_backward: CudaFunction,
    column_sums: CudaFunction,
}

/// An opened GPU: its context, one stream that orders all work, a cuBLAS
/// handle on that stream, and svp's kernels compiled for it.
pub struct Gpu {
    info: DeviceInfo,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
}

fn launch_for(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(THREADS_PER_BLOCK).max(1), 1, 1),
        block_dim: (THREADS_PER_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Gpu {
    /// Opens device `ordinal` and compiles svp's kernels for its
    /// architecture. Fails with one line if a library or the device is
    /// missing.
    pub fn open(ordinal: usize) -> Result<Gpu, CudaError> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        Library::Blas.require()?;
        Library::Nvrtc.require()?;
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        let info = describe(&ctx)?;
        let (major, minor) = info.compute_capability;
        // A virtual architecture: the driver finishes the PTX for the exact
        // chip, which is what Jetson (8.7) needs.
        let options = CompileOptions {
            options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(KERNELS, options).map_err(|e| CudaError::Compile(e.to_string()))?;
        let module = ctx.load_module(ptx).map_err(driver)?;
        let function = |name: &str| module.load_function(name).map_err(driver);
        let kernels = Kernels {
            add_bias: function("add_bias")?,
            relu_backward: function("relu_backward")?,
            column_sums: function("column_sums")?,
        };
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(blas)?;
        Ok(Gpu { info, stream, blas, kernels })
    }

    /// The device.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Copies `values` to a new device buffer.
    pub fn upload(&self, values: &[f32]) -> Result<GpuBuffer, CudaError> {
        Ok(GpuBuffer { data: self.stream.clone_htod(values).map_err(driver)? })
    }

    /// A new device buffer of `len` zeros.
    pub fn zeros(&self, len: usize) -> Result<GpuBuffer, CudaError> {
        Ok(GpuBuffer { data: self.stream.alloc_zeros(len).map_err(driver)? })
    }

    /// Copies a device buffer into `out` (of the buffer's length); waits for
    /// the work queued before it.
    pub fn download(&self, buffer: &GpuBuffer, out: &mut [f32]) -> Result<(), CudaError> {
        if out.len() != buffer.len() {
            return Err(CudaError::Shape(format!(
                "download: the buffer has {} elements, the destination {}",
                buffer.len(),
                out.len()
            )));
        }
        self.stream.memcpy_dtoh(&buffer.data, out).map_err(driver)
    }

    /// `c = alpha * op(a) * op(b) + beta * c` on row-major matrices: `c` is
    /// `m x n`, `op(a)` is `m x k` (`a` stored `k x m` when transposed),
    /// `op(b)` is `k x n` (`b` stored `n x k` when transposed).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        transpose_a: bool,
        transpose_b: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &GpuBuffer,
        b: &GpuBuffer,
        beta: f32,
        c: &mut GpuBuffer,
    ) -> Result<(), CudaError> {
        check_len("gemm A", a.len(), m, k)?;
        check_len("gemm B", b.len(), k, n)?;
        check_len("gemm C", c.len(), m, n)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        // cuBLAS is column-major, and a row-major matrix read column-major is
        // its transpose: computing C^T = op(B)^T op(A)^T gives row-major C.
        let op = |t| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let config = GemmConfig {
            transa: op(transpose_b),
            transb: op(transpose_a),
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha,
            lda: (if transpose_b { k } else { n }).max(1) as i32,
            ldb: (if transpose_a { m } else { k }).max(1) as i32,
            beta,
            ldc: n as i32,
        };
        // SAFETY: cuBLAS reads op(A) (m*k elements), op(B) (k*n) and writes
        // C (m*n) within the leading dimensions set above, and check_len has
        // proven each buffer holds at least that many elements, all below
        // i32::MAX; the buffers live on this stream's context.
        unsafe { self.blas.gemm(config, &b.data, &a.data, &mut c.data) }.map_err(blas)
    }

    /// Adds `bias` to each row of `x` (`rows x cols`), then applies ReLU if
    /// asked.
    pub fn add_bias(
        &self,
        x: &mut GpuBuffer,
        bias: &GpuBuffer,
        rows: usize,
        cols: usize,
        relu: bool,
    ) -> Result<(), CudaError> {
        check_len("add_bias x", x.len(), rows, cols)?;
        check_len("add_bias bias", bias.len(), 1, cols)?;
        let (r, c, flag) = (rows as i32, cols as i32, relu as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.add_bias);
        launch.arg(&mut x.data).arg(&bias.data).arg(&r).arg(&c).arg(&flag);
        // SAFETY: the arguments match `add_bias(float*, const float*, int,
        // int, int)`; the kernel touches x[i] for i < rows*cols and
        // bias[i % cols], both within the lengths check_len proved.
        unsafe { launch.launch(launch_for(rows * cols)) }.map(drop).map_err(driver)
    }

    /// Zeroes `grad` where `output` (a ReLU's output) is not positive.
    pub fn relu_backward(&self, grad: &mut GpuBuffer, output: &GpuBuffer) -> Result<(), CudaError> {
        let n = grad.len();
        check_len("relu_backward", output.len(), 1, n)?;
        let count = n as i32;
        let mut launch = self.stream.launch_builder(&self.kernels.relu_backward);
        launch.arg(&mut grad.data).arg(&output.data).arg(&count);
        // SAFETY: the arguments match `relu_backward(float*, const float*,
        // int)`; the kernel touches index i < n of both, and output holds at
        // least n elements (checked), grad exactly n.
        unsafe { launch.launch(launch_for(n)) }.map(drop).map_err(driver)
    }

    /// `sums[c] = sum over rows of x[r][c]` (a bias's gradient).
    pub fn column_sums(&self, x: &GpuBuffer, rows: usize, cols: usize, sums: &mut GpuBuffer) -> Result<(), CudaError> {
        check_len("column_sums x", x.len(), rows, cols)?;
        check_len("column_sums sums", sums.len(), 1, cols)?;
        let (r, c) = (rows as i32, cols as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.column_sums);
        launch.arg(&x.data).arg(&mut sums.data).arg(&r).arg(&c);
        // SAFETY: the arguments match `column_sums(const float*, float*, int,
        // int)`; the kernel reads x[r*cols + c] for r < rows, c < cols and
        // writes sums[c], within the lengths check_len proved.
        unsafe { launch.launch(launch_for(cols)) }.map(drop).map_err(driver)
    }

    /// Waits for everything queued on the device.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(driver)
    }
}
