//! The GPU backend proper (feature `cuda`): cudarc's driver, cuBLAS and
//! NVRTC, all loaded at run time.

use crate::{AdamScalars, CudaError, DeviceInfo, check_len};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};
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

/// svp's kernels compiled by NVRTC into PTX for a virtual architecture: the
/// driver finishes the PTX for the exact chip, which is what Jetson (8.7)
/// needs.
fn compile((major, minor): (i32, i32)) -> Result<Ptx, CudaError> {
    Library::Nvrtc.require()?;
    let options =
        CompileOptions { options: vec![format!("--gpu-architecture=compute_{major}{minor}")], ..Default::default() };
    compile_ptx_with_opts(KERNELS, options).map_err(|e| CudaError::Compile(e.to_string()))
}

/// svp's kernels as PTX for compute capability `(major, minor)`, compiled
/// by NVRTC alone: no driver and no GPU needed, so a machine without one
/// still checks that the kernels compile (for Jetson Orin, 8.7).
pub fn compile_kernels(compute_capability: (i32, i32)) -> Result<String, CudaError> {
    compile(compute_capability).map(|ptx| ptx.to_src())
}

/// f32 values in device memory.
pub struct GpuBuffer {
    /// At least one element: the driver refuses allocations of zero bytes
    /// (`cuMemAlloc` answers `CUDA_ERROR_INVALID_VALUE`), and a trainer
    /// asks for empty buffers where a layer kind needs none.
    data: CudaSlice<f32>,
    /// The elements the buffer holds for its users (`data` may have one more).
    len: usize,
}

impl GpuBuffer {
    /// Its number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The kernels of `kernels.cu`, by name.
struct Kernels {
    add_bias: CudaFunction,
    relu_backward: CudaFunction,
    column_sums: CudaFunction,
    layer_norm_forward: CudaFunction,
    layer_norm_backward_columns: CudaFunction,
    layer_norm_backward_rows: CudaFunction,
    softmax_xent: CudaFunction,
    fa_normalize: CudaFunction,
    fa_difference: CudaFunction,
    fa_gradient: CudaFunction,
    adam: CudaFunction,
    sgd: CudaFunction,
}

/// An opened GPU: its context, one stream that orders all work, a cuBLAS
/// handle on that stream, and svp's kernels compiled for it.
pub struct Gpu {
    info: DeviceInfo,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
}

/// One thread per element of `n`.
fn launch_for(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(THREADS_PER_BLOCK).max(1), 1, 1),
        block_dim: (THREADS_PER_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `blocks` blocks of `kernels.cu`'s BLOCK threads (the reducing kernels).
fn launch_blocks(blocks: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks.max(1) as u32, 1, 1), block_dim: (THREADS_PER_BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Checks that `slot..slot + count` lies within a statistics buffer of `len`.
fn check_slot(what: &str, len: usize, slot: usize, count: usize) -> Result<(), CudaError> {
    match slot.checked_add(count) {
        Some(end) if end <= len && end <= i32::MAX as usize => Ok(()),
        _ => Err(CudaError::Shape(format!("{what}: statistics slot {slot} is past the buffer's {len} values"))),
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
        let ptx = compile(info.compute_capability)?;
        let module = ctx.load_module(ptx).map_err(driver)?;
        let function = |name: &str| module.load_function(name).map_err(driver);
        let kernels = Kernels {
            add_bias: function("add_bias")?,
            relu_backward: function("relu_backward")?,
            column_sums: function("column_sums")?,
            layer_norm_forward: function("layer_norm_forward")?,
            layer_norm_backward_columns: function("layer_norm_backward_columns")?,
            layer_norm_backward_rows: function("layer_norm_backward_rows")?,
            softmax_xent: function("softmax_xent")?,
            fa_normalize: function("fa_normalize")?,
            fa_difference: function("fa_difference")?,
            fa_gradient: function("fa_gradient")?,
            adam: function("adam")?,
            sgd: function("sgd")?,
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
        let mut buffer = self.zeros(values.len())?;
        self.write(&mut buffer, values)?;
        Ok(buffer)
    }

    /// A new device buffer of `len` zeros.
    pub fn zeros(&self, len: usize) -> Result<GpuBuffer, CudaError> {
        Ok(GpuBuffer { data: self.stream.alloc_zeros(len.max(1)).map_err(driver)?, len })
    }

    /// Copies the first `out.len()` values of a device buffer into `out`;
    /// waits for the work queued before it.
    pub fn download(&self, buffer: &GpuBuffer, out: &mut [f32]) -> Result<(), CudaError> {
        if out.len() > buffer.len() {
            return Err(CudaError::Shape(format!(
                "download: the buffer has {} elements, the destination {}",
                buffer.len(),
                out.len()
            )));
        }
        if !out.is_empty() {
            self.stream.memcpy_dtoh(&buffer.data.slice(..out.len()), out).map_err(driver)?;
        }
        self.synchronize()
    }

    /// Copies `values` into the first `values.len()` elements of `buffer`.
    pub fn write(&self, buffer: &mut GpuBuffer, values: &[f32]) -> Result<(), CudaError> {
        check_len("write", buffer.len(), 1, values.len())?;
        if values.is_empty() {
            return Ok(());
        }
        self.stream.memcpy_htod(values, &mut buffer.data.slice_mut(..values.len())).map_err(driver)
    }

    /// Copies the first `n` values of `src` into `dst`.
    pub fn copy(&self, src: &GpuBuffer, dst: &mut GpuBuffer, n: usize) -> Result<(), CudaError> {
        check_len("copy source", src.len(), 1, n)?;
        check_len("copy destination", dst.len(), 1, n)?;
        if n == 0 {
            return Ok(());
        }
        self.stream.memcpy_dtod(&src.data.slice(..n), &mut dst.data.slice_mut(..n)).map_err(driver)
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

    /// Zeroes the first `n` values of `grad` where `output` (a ReLU's
    /// output) is not positive.
    pub fn relu_backward(&self, grad: &mut GpuBuffer, output: &GpuBuffer, n: usize) -> Result<(), CudaError> {
        check_len("relu_backward grad", grad.len(), 1, n)?;
        check_len("relu_backward output", output.len(), 1, n)?;
        let count = n as i32;
        let mut launch = self.stream.launch_builder(&self.kernels.relu_backward);
        launch.arg(&mut grad.data).arg(&output.data).arg(&count);
        // SAFETY: the arguments match `relu_backward(float*, const float*,
        // int)`; the kernel touches index i < n of both, and both hold at
        // least n elements (checked).
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

    /// `z += bias` per row, LayerNorm over each of the `rows` rows of `d`
    /// (`z` keeps the normalized values, `rstd` each row's `1/std`), and
    /// `out = act(gamma * xhat + beta)`, act ReLU or the identity.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm_forward(
        &self,
        z: &mut GpuBuffer,
        bias: &GpuBuffer,
        gamma: &GpuBuffer,
        beta: &GpuBuffer,
        rstd: &mut GpuBuffer,
        out: &mut GpuBuffer,
        rows: usize,
        d: usize,
        relu: bool,
    ) -> Result<(), CudaError> {
        check_len("layer_norm_forward z", z.len(), rows, d)?;
        check_len("layer_norm_forward out", out.len(), rows, d)?;
        check_len("layer_norm_forward rstd", rstd.len(), rows, 1)?;
        for (what, p) in [("bias", bias), ("gamma", gamma), ("beta", beta)] {
            check_len(what, p.len(), 1, d)?;
        }
        if rows == 0 {
            return Ok(());
        }
        let (width, flag) = (d as i32, relu as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.layer_norm_forward);
        launch.arg(&mut z.data).arg(&bias.data).arg(&gamma.data).arg(&beta.data);
        launch.arg(&mut rstd.data).arg(&mut out.data).arg(&width).arg(&flag);
        // SAFETY: the arguments match `layer_norm_forward(float*, const
        // float*, const float*, const float*, float*, float*, int, int)`;
        // block r touches row r (< rows) of z and out, rstd[r], and columns
        // below d of the parameters, all within the lengths checked above.
        unsafe { launch.launch(launch_blocks(rows)) }.map(drop).map_err(driver)
    }

    /// The backward of [`Gpu::layer_norm_forward`]: `dy` (wrt `out`) becomes
    /// the gradient wrt `z` in place; writes `dgamma`, `dbeta` and `dbias`
    /// (the gradient of the bias added before the norm).
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm_backward(
        &self,
        xhat: &GpuBuffer,
        rstd: &GpuBuffer,
        gamma: &GpuBuffer,
        beta: &GpuBuffer,
        dy: &mut GpuBuffer,
        dgamma: &mut GpuBuffer,
        dbeta: &mut GpuBuffer,
        dbias: &mut GpuBuffer,
        rows: usize,
        d: usize,
        relu: bool,
    ) -> Result<(), CudaError> {
        check_len("layer_norm_backward xhat", xhat.len(), rows, d)?;
        check_len("layer_norm_backward dy", dy.len(), rows, d)?;
        check_len("layer_norm_backward rstd", rstd.len(), rows, 1)?;
        for (what, p) in [("gamma", gamma), ("beta", beta), ("dgamma", &*dgamma), ("dbeta", &*dbeta)] {
            check_len(what, p.len(), 1, d)?;
        }
        check_len("dbias", dbias.len(), 1, d)?;
        let (r, width, flag) = (rows as i32, d as i32, relu as i32);
        let mut columns = self.stream.launch_builder(&self.kernels.layer_norm_backward_columns);
        columns.arg(&xhat.data).arg(&gamma.data).arg(&beta.data).arg(&dy.data);
        columns.arg(&mut dgamma.data).arg(&mut dbeta.data).arg(&r).arg(&width).arg(&flag);
        // SAFETY: the arguments match `layer_norm_backward_columns(const
        // float*, const float*, const float*, const float*, float*, float*,
        // int, int, int)`; thread c < d reads column c of rows < rows of xhat
        // and dy and writes dgamma[c], dbeta[c], all within the checked lengths.
        unsafe { columns.launch(launch_for(d)) }.map_err(driver)?;
        if rows > 0 {
            let mut row_pass = self.stream.launch_builder(&self.kernels.layer_norm_backward_rows);
            row_pass.arg(&xhat.data).arg(&rstd.data).arg(&gamma.data).arg(&beta.data);
            row_pass.arg(&mut dy.data).arg(&width).arg(&flag);
            // SAFETY: the arguments match `layer_norm_backward_rows(const
            // float*, const float*, const float*, const float*, float*, int,
            // int)`; block r < rows touches row r of xhat and dy, rstd[r] and
            // parameter columns below d, within the checked lengths. It runs
            // after the column pass on the same stream.
            unsafe { row_pass.launch(launch_blocks(rows)) }.map_err(driver)?;
        }
        self.column_sums(dy, rows, d, dbias)
    }

    /// Softmax cross-entropy of `logits` (`rows x classes`) against `labels`
    /// (class indices as floats): `grad` = d(mean loss)/d logits;
    /// `stats[slot]` = the mean loss, `stats[slot + 1]` = how many rows' first
    /// largest logit is the label's. Labels must be below `classes`.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_xent(
        &self,
        logits: &GpuBuffer,
        labels: &GpuBuffer,
        grad: &mut GpuBuffer,
        stats: &mut GpuBuffer,
        slot: usize,
        rows: usize,
        classes: usize,
    ) -> Result<(), CudaError> {
        check_len("softmax_xent logits", logits.len(), rows, classes)?;
        check_len("softmax_xent grad", grad.len(), rows, classes)?;
        check_len("softmax_xent labels", labels.len(), rows, 1)?;
        check_slot("softmax_xent", stats.len(), slot, 2)?;
        if rows == 0 || classes == 0 {
            return Err(CudaError::Shape("softmax_xent: an empty batch".into()));
        }
        let (r, c) = (rows as i32, classes as i32);
        let mut stats_at = stats.data.slice_mut(slot..slot + 2);
        let mut launch = self.stream.launch_builder(&self.kernels.softmax_xent);
        launch.arg(&logits.data).arg(&labels.data).arg(&mut grad.data).arg(&mut stats_at).arg(&r).arg(&c);
        // SAFETY: the arguments match `softmax_xent(const float*, const
        // float*, float*, float*, int, int)`; the one block touches rows <
        // rows of logits and grad (checked), labels[r] for r < rows (checked;
        // the caller keeps labels below classes, so v[y] and g[y] stay in
        // the row) and the two statistics of the view.
        unsafe { launch.launch(launch_blocks(1)) }.map(drop).map_err(driver)
    }

    /// Feature alignment: each row of `v` (`rows x d`), mean-centred if
    /// `center`, over its norm plus 1e-8, into `normed`; the norms into `norms`.
    pub fn fa_normalize(
        &self,
        v: &GpuBuffer,
        normed: &mut GpuBuffer,
        norms: &mut GpuBuffer,
        rows: usize,
        d: usize,
        center: bool,
    ) -> Result<(), CudaError> {
        check_len("fa_normalize v", v.len(), rows, d)?;
        check_len("fa_normalize normed", normed.len(), rows, d)?;
        check_len("fa_normalize norms", norms.len(), rows, 1)?;
        let (r, width, flag) = (rows as i32, d as i32, center as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.fa_normalize);
        launch.arg(&v.data).arg(&mut normed.data).arg(&mut norms.data).arg(&r).arg(&width).arg(&flag);
        // SAFETY: the arguments match `fa_normalize(const float*, float*,
        // float*, int, int, int)`; thread r < rows touches row r of v and
        // normed and norms[r], within the checked lengths.
        unsafe { launch.launch(launch_for(rows)) }.map(drop).map_err(driver)
    }

    /// Feature alignment: `target` (`S(v_prev)`, `b x b`) becomes `D = sim -
    /// target`, and `stats[slot]` = the sum of `D^2` over `b^2`.
    pub fn fa_difference(
        &self,
        sim: &GpuBuffer,
        target: &mut GpuBuffer,
        stats: &mut GpuBuffer,
        slot: usize,
        b: usize,
    ) -> Result<(), CudaError> {
        check_len("fa_difference sim", sim.len(), b, b)?;
        check_len("fa_difference target", target.len(), b, b)?;
        check_slot("fa_difference", stats.len(), slot, 1)?;
        let n = (b * b) as i32;
        let inv_b2 = 1.0 / (b * b).max(1) as f32;
        let mut stats_at = stats.data.slice_mut(slot..slot + 1);
        let mut launch = self.stream.launch_builder(&self.kernels.fa_difference);
        launch.arg(&sim.data).arg(&mut target.data).arg(&mut stats_at).arg(&n).arg(&inv_b2);
        // SAFETY: the arguments match `fa_difference(const float*, float*,
        // float*, int, float)`; the one block touches indices below b*b of
        // sim and target (checked) and the one statistic of the view.
        unsafe { launch.launch(launch_blocks(1)) }.map(drop).map_err(driver)
    }

    /// Feature alignment: from `dnormed` (dL/dN, overwritten as scratch),
    /// the gradient through the normalization, `dv += weight * it`.
    #[allow(clippy::too_many_arguments)]
    pub fn fa_gradient(
        &self,
        dnormed: &mut GpuBuffer,
        normed: &GpuBuffer,
        norms: &GpuBuffer,
        dv: &mut GpuBuffer,
        rows: usize,
        d: usize,
        center: bool,
        weight: f32,
    ) -> Result<(), CudaError> {
        for (what, len) in [("dnormed", dnormed.len()), ("normed", normed.len()), ("dv", dv.len())] {
            check_len(what, len, rows, d)?;
        }
        check_len("fa_gradient norms", norms.len(), rows, 1)?;
        let (r, width, flag) = (rows as i32, d as i32, center as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.fa_gradient);
        launch.arg(&mut dnormed.data).arg(&normed.data).arg(&norms.data).arg(&mut dv.data);
        launch.arg(&r).arg(&width).arg(&flag).arg(&weight);
        // SAFETY: the arguments match `fa_gradient(float*, const float*,
        // const float*, float*, int, int, int, float)`; thread r < rows
        // touches row r of dnormed, normed and dv and norms[r], within the
        // checked lengths.
        unsafe { launch.launch(launch_for(rows)) }.map(drop).map_err(driver)
    }

    /// One Adam (or AdamW) update of the first `n` values of `params` from
    /// `grad`, with moments `m` and `v`, the CPU's arithmetic
    /// ([`AdamScalars`]).
    #[allow(clippy::too_many_arguments)]
    pub fn adam(
        &self,
        params: &mut GpuBuffer,
        grad: &GpuBuffer,
        m: &mut GpuBuffer,
        v: &mut GpuBuffer,
        n: usize,
        scalars: AdamScalars,
    ) -> Result<(), CudaError> {
        for (what, len) in [("params", params.len()), ("grad", grad.len()), ("m", m.len()), ("v", v.len())] {
            check_len(what, len, 1, n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let count = n as i32;
        let s = scalars;
        let mut launch = self.stream.launch_builder(&self.kernels.adam);
        launch.arg(&mut params.data).arg(&grad.data).arg(&mut m.data).arg(&mut v.data).arg(&count);
        launch.arg(&s.beta1).arg(&s.beta2).arg(&s.eps).arg(&s.l2).arg(&s.decay).arg(&s.step).arg(&s.inv_bc2_sqrt);
        // SAFETY: the arguments match `adam(float*, const float*, float*,
        // float*, int, float x 7)`; thread i < n touches index i of the four
        // buffers, each at least n long (checked).
        unsafe { launch.launch(launch_for(n)) }.map(drop).map_err(driver)
    }

    /// One plain SGD update of the first `n` values of `params`:
    /// `p -= lr * (g + weight_decay * p)`.
    pub fn sgd(
        &self,
        params: &mut GpuBuffer,
        grad: &GpuBuffer,
        n: usize,
        lr: f32,
        weight_decay: f32,
    ) -> Result<(), CudaError> {
        check_len("sgd params", params.len(), 1, n)?;
        check_len("sgd grad", grad.len(), 1, n)?;
        if n == 0 {
            return Ok(());
        }
        let count = n as i32;
        let mut launch = self.stream.launch_builder(&self.kernels.sgd);
        launch.arg(&mut params.data).arg(&grad.data).arg(&count).arg(&lr).arg(&weight_decay);
        // SAFETY: the arguments match `sgd(float*, const float*, int, float,
        // float)`; thread i < n touches index i of both buffers, each at
        // least n long (checked).
        unsafe { launch.launch(launch_for(n)) }.map(drop).map_err(driver)
    }

    /// Bytes of device memory in use by every process (total minus free),
    /// as the driver reports it.
    pub fn memory_in_use(&self) -> Result<usize, CudaError> {
        let (free, total) = self.stream.context().mem_get_info().map_err(driver)?;
        Ok(total.saturating_sub(free))
    }

    /// Waits for everything queued on the device.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(driver)
    }
}
