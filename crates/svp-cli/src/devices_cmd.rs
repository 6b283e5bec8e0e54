//! `svp devices`: what this binary can compute on, here.

use crate::error::CliError;
use svp_tensor::cpu::{self, Isa};

/// Prints one line for the CPU (its kernels and threads) and one per CUDA
/// device, or the one line saying why there are none.
pub fn run() -> Result<(), CliError> {
    let supported: Vec<&str> = Isa::supported().into_iter().map(Isa::name).collect();
    println!(
        "cpu     {} kernels on {}, {} threads (this CPU runs {})",
        cpu::selected(),
        std::env::consts::ARCH,
        rayon::current_num_threads(),
        supported.join(", ")
    );
    match svp_cuda::devices() {
        Ok(list) if list.is_empty() => println!("cuda    none: the NVIDIA driver sees no device"),
        Ok(list) => list.iter().for_each(|d| println!("{d}")),
        Err(e) => println!("cuda    none: {e}"),
    }
    Ok(())
}
