//! The fine-tuning scenario end to end, two epochs instead of 30 (the same
//! data, so the same memory): on the 32 MiB device SVP fits and gains
//! accuracy, and BP fails cleanly with an out-of-device-memory line.

use std::process::Command;

/// The percentages in a line, in order.
fn percentages(line: &str) -> Vec<f64> {
    line.split_whitespace().filter_map(|w| w.strip_suffix('%')).filter_map(|w| w.parse().ok()).collect()
}

#[test]
fn svp_fits_the_32_mib_device_and_backprop_does_not() {
    let chip = std::env::temp_dir().join(format!("svp-sim-chip-{}.bin", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
        .args(["--profile", "board-32m", "--epochs", "2", "--flash", chip.to_str().unwrap()])
        .output()
        .expect("run firmware-sim");
    // The chip was written (checkpoints) and is gone after the run.
    assert!(!chip.exists(), "the simulated chip {} was left behind", chip.display());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stdout.contains("svp: fine-tuned 2 epochs over 6000 shifted samples"), "{stdout}");
    assert!(stdout.contains("bp: out of device memory: need"), "{stdout}");
    assert!(stdout.contains("budget 32 MiB"), "{stdout}");
    // The shift costs accuracy: the camera line reports both numbers.
    let line = stdout.lines().find(|l| l.starts_with("camera shift")).expect("camera line");
    let nums = percentages(line);
    assert_eq!(nums.len(), 2, "{line}");
    // Measured (bit-exact): 90.00 % clean, 46.90 % shifted.
    assert!(nums[0] >= 89.0 && nums[1] <= 47.9, "{line}");
    // Two epochs (24 steps) already pay: 46.90 % -> 60.10 % measured (+13.2
    // points, bit-exact); the floor is a point under. With projections other
    // than the model's own they cost accuracy (36.2 %).
    let line = stdout.lines().find(|l| l.starts_with("svp: fine-tuned")).expect("svp line");
    let [before, after] = percentages(line)[..] else { panic!("{line}") };
    assert!(after >= 59.1 && after - before >= 12.2, "{line}");
}

#[test]
fn bad_arguments_are_one_line_errors() {
    // Exit 1 for a run that cannot start (one line), 2 for bad usage (clap's
    // message, as `svp` gives it).
    for (args, code) in [
        (&["--profile", "toaster"][..], 1),
        (&["--profile", "board-32m", "--model", "/nonexistent.svpm"][..], 1),
        (&["--epochs", "3"][..], 2),
        (&["--profile", "board-32m", "--epochs", "0"][..], 2),
        (&["--profile", "board-32m", "--method", "sgd"][..], 2),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_firmware-sim")).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: ") && !stderr.contains("panicked"), "{args:?}: {stderr}");
        if code == 1 {
            assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        }
    }
}

/// `--flash` names where the simulated chip is created; a file already there
/// is refused and left as it was.
#[test]
fn an_existing_flash_file_is_refused_and_kept() {
    let path = std::env::temp_dir().join(format!("svp-sim-existing-{}.bin", std::process::id()));
    std::fs::write(&path, b"somebody's data").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
        .args(["--profile", "board-32m", "--flash", path.to_str().unwrap()])
        .output()
        .unwrap();
    let kept = std::fs::read(&path);
    std::fs::remove_file(&path).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: --flash ") && stderr.contains("the file exists"), "{stderr}");
    assert_eq!(kept.unwrap(), b"somebody's data");
}
