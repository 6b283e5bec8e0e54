//! svp's NVIDIA GPU backend, for Jetson-class modules and desktop GPUs.
//!
//! Built with the `cuda` feature, it loads the CUDA driver, cuBLAS and NVRTC
//! at run time (cudarc's dynamic loading): the binary builds and starts on
//! machines with no CUDA at all, and [`Gpu::open`] says in one line what is
//! missing. Kernels are compiled by NVRTC for the device's own architecture
//! when a device is opened, so no precompiled desktop cubin is needed (Jetson
//! Orin, compute capability 8.7, runs none).
//!
//! Built without the feature, the same API is a stand-in whose every entry
//! point answers [`CudaError::NotCompiled`], so callers and tests compile and
//! run the same way everywhere (candle's pattern).
//!
//! Buffers hold f32, matrices are row-major as on the CPU, and every
//! operation checks its buffers' lengths before anything reaches the device.

mod device;
pub use device::Device;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub use cuda::{Gpu, GpuBuffer, compile_kernels, devices};

#[cfg(not(feature = "cuda"))]
mod stand_in;
#[cfg(not(feature = "cuda"))]
pub use stand_in::{Gpu, GpuBuffer, compile_kernels, devices};

/// Whether this build has the GPU backend (the `cuda` feature).
pub const BUILT_WITH_CUDA: bool = cfg!(feature = "cuda");

/// What the driver says about one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's index, as in `cuda:N`.
    pub ordinal: usize,
    /// Its name, for example "Orin" or "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability (major, minor): 8.7 on Jetson Orin.
    pub compute_capability: (i32, i32),
    /// Device memory in bytes (on Jetson, the memory shared with the CPU).
    pub total_memory: usize,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (major, minor) = self.compute_capability;
        write!(
            f,
            "cuda:{}  {}  compute capability {major}.{minor}  {:.1} GiB",
            self.ordinal,
            self.name,
            self.total_memory as f64 / (1u64 << 30) as f64
        )
    }
}

/// The scalars of one Adam (or AdamW) update, as the CPU's optimizer fixes
/// them for a layer and step (`svp_optim::AdamStep`): each weight becomes
/// `p * decay - step * m / (sqrt(v) * inv_bc2_sqrt + eps)` after the moments
/// take the gradient plus `l2 * p`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamScalars {
    /// First-moment decay rate.
    pub beta1: f32,
    /// Second-moment decay rate.
    pub beta2: f32,
    /// Denominator guard.
    pub eps: f32,
    /// L2 coefficient added to the gradient (Adam).
    pub l2: f32,
    /// Decoupled decay factor (AdamW): `1 - lr * wd`.
    pub decay: f32,
    /// `lr / (1 - beta1^t)`.
    pub step: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    pub inv_bc2_sqrt: f32,
}

/// Why the GPU backend cannot do what was asked. Each prints as one line.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// This build has no GPU backend.
    #[error("svp was built without CUDA support; rebuild with `--features cuda`")]
    NotCompiled,
    /// A CUDA library could not be loaded.
    #[error("the CUDA {what} library ({file}) was not found: {hint}")]
    LibraryMissing {
        /// Which library: "driver", "cuBLAS" or "NVRTC".
        what: &'static str,
        /// Its file name on Linux.
        file: &'static str,
        /// What to install or set.
        hint: &'static str,
    },
    /// There is no device with this index.
    #[error("there is no CUDA device {ordinal}: this machine has {count}")]
    NoDevice {
        /// The index asked for.
        ordinal: usize,
        /// How many the driver sees.
        count: usize,
    },
    /// A driver call failed (out of device memory, a launch error, ...).
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Blas(String),
    /// NVRTC could not compile svp's kernels for this device.
    #[error("compiling svp's kernels with NVRTC: {0}")]
    Compile(String),
    /// Buffers that do not fit the operation's shape (a caller's bug).
    #[error("{0}")]
    Shape(String),
}

/// Checks that a buffer of `len` elements holds the `rows` x `cols` matrix
/// that `what` needs, and that its size fits the kernels' 32-bit indices.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn check_len(what: &str, len: usize, rows: usize, cols: usize) -> Result<(), CudaError> {
    let need = rows.checked_mul(cols).filter(|&n| n <= i32::MAX as usize);
    match need {
        Some(n) if len >= n => Ok(()),
        Some(n) => Err(CudaError::Shape(format!("{what}: {rows} x {cols} needs {n} elements, the buffer has {len}"))),
        None => Err(CudaError::Shape(format!("{what}: {rows} x {cols} is too large for one buffer"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked_before_the_device() {
        assert!(check_len("a", 6, 2, 3).is_ok());
        let e = check_len("gemm A", 5, 2, 3).unwrap_err().to_string();
        assert_eq!(e, "gemm A: 2 x 3 needs 6 elements, the buffer has 5");
        assert!(check_len("x", usize::MAX, 1 << 20, 1 << 12).unwrap_err().to_string().contains("too large"));
    }

    #[test]
    fn device_info_prints_as_one_line() {
        let info = DeviceInfo { ordinal: 0, name: "Orin".into(), compute_capability: (8, 7), total_memory: 8 << 30 };
        assert_eq!(info.to_string(), "cuda:0  Orin  compute capability 8.7  8.0 GiB");
    }

    /// Without a GPU backend, every entry point answers the same one line.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn the_stand_in_says_how_to_get_cuda() {
        let msg = "svp was built without CUDA support; rebuild with `--features cuda`";
        assert_eq!(Gpu::open(0).err().unwrap().to_string(), msg);
        assert_eq!(devices().unwrap_err().to_string(), msg);
    }
}
