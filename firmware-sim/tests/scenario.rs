//! The fine-tuning scenario end to end, two epochs instead of 30 (the same
//! data, so the same memory): on the 32 MiB device SVP fits and BP fails
//! cleanly with an out-of-device-memory line.

use std::process::Command;

#[test]
fn svp_fits_the_32_mib_device_and_backprop_does_not() {
    let out = Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
        .args(["--profile", "board-32m", "--epochs", "2"])
        .output()
        .expect("run firmware-sim");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stdout.contains("svp: fine-tuned 2 epochs over 6000 shifted samples"), "{stdout}");
    assert!(stdout.contains("bp: out of device memory: need"), "{stdout}");
    assert!(stdout.contains("budget 32 MiB"), "{stdout}");
    // The shift costs accuracy: the camera line reports both numbers.
    let line = stdout.lines().find(|l| l.starts_with("camera shift")).expect("camera line");
    let nums: Vec<f64> =
        line.split_whitespace().filter_map(|w| w.strip_suffix('%')).filter_map(|w| w.parse().ok()).collect();
    assert_eq!(nums.len(), 2, "{line}");
    assert!(nums[0] > 85.0 && nums[1] < nums[0] - 20.0, "{line}");
}

#[test]
fn bad_arguments_are_one_line_errors() {
    for args in [
        &["--profile", "toaster"][..],
        &["--epochs", "3"][..],
        &["--profile", "board-32m", "--model", "/nonexistent.svpm"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_firmware-sim")).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: ") && !stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
