//! `--device` and `svp devices` on a machine without a usable GPU: one line
//! saying what is missing (the feature, the driver, the device), never a
//! panic. With a GPU (tools/gpu-check.sh) the device line is checked instead.

mod common;
use common::svp;

#[test]
fn train_on_cuda_without_a_gpu_fails_with_one_line() {
    let usable = svp_cuda::devices().is_ok_and(|d| !d.is_empty());
    for device in ["cuda", "cuda:7"] {
        let o = svp(&["train", "--data", "embedded", "--epochs", "1", "--device", device]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!err.contains("panicked"), "{err}");
        if !svp_cuda::BUILT_WITH_CUDA {
            assert_eq!(err, "error: svp was built without CUDA support; rebuild with `--features cuda`\n");
        } else if !usable {
            assert!(err.contains("library") || err.contains("no CUDA device"), "{err}");
        }
    }
}

/// `finetune`, `eval` and `memory` probe the device the same way, before
/// loading anything: one line, exit 1, and nothing written.
#[test]
fn finetune_eval_and_memory_on_cuda_without_a_gpu_fail_with_one_line() {
    if svp_cuda::devices().is_ok_and(|d| !d.is_empty()) {
        eprintln!("skipped: this machine has a GPU");
        return;
    }
    let dir = std::env::temp_dir().join(format!("svp-devices-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (csv, plot) = (dir.join("m.csv"), dir.join("m.svg"));
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/device-mlp.svpm");
    let runs: [Vec<&str>; 3] = [
        vec!["finetune", model, "--data", "embedded", "--device", "cuda"],
        vec!["eval", model, "--data", "embedded", "--device", "cuda"],
        vec!["memory", "--device", "cuda:0", "--csv", csv.to_str().unwrap(), "--plot", plot.to_str().unwrap()],
    ];
    for args in runs {
        let o = svp(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        if !svp_cuda::BUILT_WITH_CUDA {
            assert_eq!(err, "error: svp was built without CUDA support; rebuild with `--features cuda`\n");
        }
    }
    assert!(!csv.exists() && !plot.exists(), "a refused sweep wrote its outputs");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn devices_lists_the_cpu_and_says_why_there_is_no_gpu() {
    let o = svp(&["devices"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("cpu ") && lines[0].contains(" kernels on "), "{out}");
    match svp_cuda::devices() {
        Ok(list) if !list.is_empty() => assert_eq!(lines.len(), 1 + list.len(), "{out}"),
        Ok(_) => assert_eq!(lines[1], "cuda    none: the NVIDIA driver sees no device"),
        Err(e) => assert_eq!(lines[1], format!("cuda    none: {e}")),
    }
}

#[test]
fn a_device_that_is_not_one_is_a_usage_error() {
    let o = svp(&["train", "--device", "gpu"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("`gpu` is not a device: use cpu, cuda or cuda:N"));
}
