//! What the CLI tests share: running `svp`, and scratch folders.

#![allow(dead_code)] // each test binary uses what it needs

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the `svp` binary with `args`.
pub fn svp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_svp")).args(args).output().expect("run svp")
}

/// A fresh scratch folder for one test, removed when the test ends (a
/// failing one included: the guard drops while the panic unwinds).
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A scratch folder named for the test (unique per test process).
pub fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("svp-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}
