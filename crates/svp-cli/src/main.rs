//! `svp`: train, evaluate and inspect SVP models from the command line.
//!
//! Every failure ends as one line on stderr and a non-zero exit code:
//! 1 for a run that could not start or finish, 2 for bad usage (clap),
//! 3 for a run that diverged (its last good weights are still saved).

mod cli;
mod error;
mod eval_cmd;
mod finetune_cmd;
mod import_cmd;
mod mem;
mod memory_cmd;
mod plot;
mod progress;
mod train_cmd;

use clap::Parser;
use std::process::ExitCode;

/// Every allocation of the process is counted: `svp train` and `svp memory`
/// report the heap's peak, and tests prove a training step allocates nothing.
#[global_allocator]
pub static ALLOC: svp_alloc::CountingAlloc = svp_alloc::CountingAlloc::new();

fn main() -> ExitCode {
    let args = cli::Cli::parse();
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
