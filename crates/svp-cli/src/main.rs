//! `svp`: train, evaluate and inspect SVP models from the command line.
//!
//! Every failure ends as one line on stderr and a non-zero exit code:
//! 1 for a run that could not start or finish, 2 for bad usage (clap),
//! 3 for a run that diverged (its last good weights are still saved).

#![forbid(unsafe_code)]

mod cli;
mod devices_cmd;
mod error;
mod eval_cmd;
mod finetune_cmd;
mod import_cmd;
mod mem;
mod memory_cmd;
mod plot;
mod progress;
mod train_cmd;

use clap::{CommandFactory, FromArgMatches};
use std::process::ExitCode;

/// Every allocation of the process is counted: `svp train` and `svp memory`
/// report the heap's peak, and tests prove a training step allocates nothing.
#[global_allocator]
pub static ALLOC: svp_alloc::CountingAlloc = svp_alloc::CountingAlloc::new();

fn main() -> ExitCode {
    let matches = cli::Cli::command().version(version()).get_matches();
    let args = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Err(e) = svp_tensor::cpu::check_env() {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    if let Some(n) = args.threads
        && let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global()
    {
        eprintln!("error: cannot start {n} threads: {e}");
        return ExitCode::from(1);
    }
    let result = match args.command {
        cli::Command::Train(a) => train_cmd::run(a),
        cli::Command::Eval(a) => eval_cmd::run(a),
        cli::Command::Predict(a) => eval_cmd::predict(a),
        cli::Command::Export(a) => eval_cmd::export(a),
        cli::Command::Import(a) => import_cmd::run(a),
        cli::Command::Finetune(a) => finetune_cmd::run(a),
        cli::Command::Info(a) => eval_cmd::info(a),
        cli::Command::Memory(a) => memory_cmd::run(a),
        cli::Command::Devices => devices_cmd::run(),
        cli::Command::MemoryChild(a) => memory_cmd::run_child(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `svp --version`: the release, and the kernels this CPU got.
fn version() -> &'static str {
    use svp_tensor::cpu::{self, Isa};
    let supported: Vec<&str> = Isa::supported().into_iter().map(Isa::name).collect();
    let text = format!(
        "{} ({} kernels on {}; this CPU runs {}; SVP_KERNEL picks one; {})",
        env!("CARGO_PKG_VERSION"),
        cpu::selected(),
        std::env::consts::ARCH,
        supported.join(", "),
        if svp_cuda::BUILT_WITH_CUDA { "built with CUDA" } else { "built without CUDA" }
    );
    // Once per process, before the command runs; clap keeps `&'static str`s.
    Box::leak(text.into_boxed_str())
}
