//! Any bytes given to the checkpoint decoder: an error or a checkpoint, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = svp_train::Checkpoint::from_bytes(data, Path::new("fuzz"));
});
