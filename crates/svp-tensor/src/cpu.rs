//! Which SIMD kernels this process runs, chosen once from what the CPU
//! reports, so one binary runs on every CPU of its architecture and uses the
//! widest instructions each has.
//!
//! Every kernel computes each product element as the same chain of fused
//! multiply-adds, so the choice changes the speed, never a bit of a result.
//! `SVP_KERNEL=avx512|avx2|neon|portable` forces a kernel (for tests, and for
//! a CPU that misreports); [`check_env`] says when it names one this CPU
//! cannot run.

use std::sync::OnceLock;

/// A family of kernels, named for the instructions it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// x86-64 with AVX-512F (and AVX2 and FMA, as every such CPU has):
    /// intrinsics, 12x32 GEMM tiles.
    Avx512,
    /// x86-64 with AVX2 and FMA: plain Rust compiled for them, 6x16 tiles.
    Avx2,
    /// aarch64 (NEON is part of the base architecture): 8x12 tiles.
    Neon,
    /// Plain Rust for the base instruction set, 4x8 tiles. On an x86-64 CPU
    /// without FMA each fused multiply-add is done in software (correctly
    /// rounded, so the bits stay the same) and is slow.
    Portable,
}

impl Isa {
    /// Every kernel this build has, widest first.
    pub const ALL: [Isa; 4] = [Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Portable];

    /// The name `SVP_KERNEL` takes and `svp --version` prints.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Neon => "neon",
            Isa::Portable => "portable",
        }
    }

    /// The kernel called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|isa| isa.name() == name)
    }

    /// Whether this CPU runs it.
    pub fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f") && Isa::Avx2.is_supported(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => true,
            Isa::Portable => true,
            #[allow(unreachable_patterns)] // on x86-64 and aarch64 some arms above cover these
            _ => false,
        }
    }

    /// The kernels this CPU runs, widest first (the first is the default).
    pub fn supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.is_supported()).collect()
    }

    /// The GEMM tile, `(rows, columns)`, of this kernel.
    pub fn gemm_tile(self) -> (usize, usize) {
        match self {
            Isa::Avx512 => (12, 32),
            Isa::Avx2 => (6, 16),
            Isa::Neon => (8, 12),
            Isa::Portable => (4, 8),
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why `SVP_KERNEL` cannot be followed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelChoiceError {
    /// Not the name of any kernel.
    Unknown(String),
    /// A kernel this CPU lacks the instructions for.
    Unsupported(Isa),
}

impl std::fmt::Display for KernelChoiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let supported: Vec<&str> = Isa::supported().into_iter().map(Isa::name).collect();
        match self {
            KernelChoiceError::Unknown(name) => {
                write!(f, "SVP_KERNEL={name} is not a kernel; this CPU runs {}", supported.join(", "))
            }
            KernelChoiceError::Unsupported(isa) => {
                write!(f, "SVP_KERNEL={isa}: this CPU lacks its instructions; it runs {}", supported.join(", "))
            }
        }
    }
}

impl std::error::Error for KernelChoiceError {}

/// What `SVP_KERNEL` asks for: `Ok(None)` when it is unset or empty.
pub fn check_env() -> Result<Option<Isa>, KernelChoiceError> {
    let Some(name) = std::env::var_os("SVP_KERNEL") else { return Ok(None) };
    let name = name.to_string_lossy();
    let name = name.trim();
    if name.is_empty() {
        return Ok(None);
    }
    match Isa::from_name(name) {
        None => Err(KernelChoiceError::Unknown(name.to_owned())),
        Some(isa) if !isa.is_supported() => Err(KernelChoiceError::Unsupported(isa)),
        Some(isa) => Ok(Some(isa)),
    }
}

/// The kernel this process runs: `SVP_KERNEL`'s if it is one this CPU runs,
/// else the widest this CPU runs. Fixed at the first call.
pub fn selected() -> Isa {
    static SELECTED: OnceLock<Isa> = OnceLock::new();
    *SELECTED.get_or_init(|| match check_env() {
        Ok(Some(isa)) => isa,
        // A bad SVP_KERNEL is the caller's to report (`check_env`); the
        // library still runs, on the widest kernel.
        Ok(None) | Err(_) => Isa::supported()[0],
    })
}

/// Defines a function whose body is compiled for the vector instructions of
/// the kernels this process runs ([`selected`]): AVX-512F (with AVX2 and
/// FMA) or AVX2 and FMA on x86-64, and the base instruction set elsewhere
/// (aarch64's base has NEON).
///
/// For elementwise loops (an optimizer's update, a LayerNorm row): the body,
/// and what it calls with `#[inline(always)]`, is inlined into one copy per
/// instruction set, so LLVM vectorizes it at the CPU's width in a binary
/// built for any CPU of the architecture. Only the speed changes: Rust never
/// fuses `a * b + c` into one instruction on its own, so the bits are the
/// same in every copy. (A closure handed to a `#[target_feature]` function
/// would do the same only when LLVM chose to inline it, which it did not for
/// the optimizer's update: measured.) The one `unsafe` of the expansion, the
/// call into the copy for this CPU, is proven here, so crates that
/// `#![forbid(unsafe_code)]` (svp-optim) use the macro too.
///
/// ```
/// svp_tensor::multiversion! {
///     /// `y = a * x + y`.
///     pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
///         for (y, &x) in y.iter_mut().zip(x) {
///             *y += a * x;
///         }
///     }
/// }
/// let mut y = vec![1.0; 5];
/// axpy(2.0, &[1.0, 2.0, 3.0, 4.0, 5.0], &mut y);
/// assert_eq!(y, [3.0, 5.0, 7.0, 9.0, 11.0]);
/// ```
#[macro_export]
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                match $crate::cpu::selected() {
                    // SAFETY: `selected` returns only kernels whose
                    // instructions `Isa::is_supported` found: AVX-512F, AVX2
                    // and FMA here, AVX2 and FMA in the next arm.
                    $crate::cpu::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::cpu::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    _ => {}
                }
            }
            body($($arg),*)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_portable_runs_everywhere() {
        for isa in Isa::ALL {
            assert_eq!(Isa::from_name(isa.name()), Some(isa));
        }
        assert_eq!(Isa::from_name("sse9"), None);
        assert!(Isa::Portable.is_supported());
        assert_eq!(Isa::supported().last(), Some(&Isa::Portable));
        assert!(selected().is_supported());
        #[cfg(target_arch = "aarch64")]
        assert_eq!(Isa::supported(), [Isa::Neon, Isa::Portable]);
        #[cfg(target_arch = "x86_64")]
        assert!(!Isa::Neon.is_supported());
    }

    crate::multiversion! {
        /// Sums, products, square roots and divisions, as an optimizer's update has.
        fn update(x: &[f32], out: &mut Vec<f32>) {
            out.extend(x.iter().map(|&v| (v * 0.9 + 0.1 * v * v) / ((v * v).sqrt() + 1e-8)));
        }
    }

    /// The copy for this CPU gives the bits of plain code.
    #[test]
    fn multiversioned_code_gives_the_same_bits() {
        let x: Vec<f32> = (0..1037).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0).collect();
        let mut got = Vec::new();
        update(&x, &mut got);
        let want: Vec<f32> = x.iter().map(|&v| (v * 0.9 + 0.1 * v * v) / ((v * v).sqrt() + 1e-8)).collect();
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()) && got.len() == want.len());
    }
}
