//! The kernels chosen at run time: every kernel this CPU runs trains the
//! reference MLP to the same bits, `svp --version` and `svp train` name the
//! kernel in use, and an `SVP_KERNEL` this CPU cannot follow is one line.

mod common;

use common::scratch;
use std::process::{Command, Output};

/// The reference MLP's config (784-1024-1024-1024-10, LayerNorm + ReLU, Adam).
const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/mlp-fmnist.toml");

/// `svp` with `SVP_KERNEL=kernel`.
fn svp_on(kernel: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_svp")).env("SVP_KERNEL", kernel).args(args).output().expect("run svp")
}

/// The kernels `svp --version` says this CPU runs, widest first.
fn kernels() -> Vec<String> {
    let o = Command::new(env!("CARGO_BIN_EXE_svp")).env_remove("SVP_KERNEL").arg("--version").output().unwrap();
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    let runs = text.split("this CPU runs ").nth(1).unwrap_or_else(|| panic!("no kernel list in {text:?}"));
    let runs = runs.split(';').next().unwrap();
    let kernels: Vec<String> = runs.split(", ").map(str::to_owned).collect();
    assert!(text.starts_with(&format!("svp {} ({} kernels on", env!("CARGO_PKG_VERSION"), kernels[0])), "{text}");
    kernels
}

/// Three SVP steps and three BP steps of the reference MLP at batch 128 on
/// each kernel, then a pass over the embedded test set: the model files are
/// the same bytes whatever the kernel.
#[test]
fn every_kernel_trains_the_reference_mlp_to_the_same_bits() {
    let kernels = kernels();
    assert_eq!(kernels.last().map(String::as_str), Some("portable"), "{kernels:?}");
    if cfg!(target_arch = "aarch64") {
        assert_eq!(kernels, ["neon", "portable"]);
    }
    let d = scratch("kernels");
    for method in ["svp", "bp"] {
        let mut first: Option<(String, Vec<u8>)> = None;
        for kernel in &kernels {
            let out = d.join(format!("{method}-{kernel}.svpm")).display().to_string();
            let args = [
                "train",
                "--config",
                REFERENCE,
                "--method",
                method,
                "--data",
                "embedded",
                "--limit-train",
                "384",
                "--epochs",
                "1",
                "--out",
                &out,
            ];
            let o = svp_on(kernel, &args);
            assert!(o.status.success(), "{kernel}: {}", String::from_utf8_lossy(&o.stderr));
            let log = String::from_utf8_lossy(&o.stderr) + String::from_utf8_lossy(&o.stdout);
            assert!(log.contains(&format!(", {kernel} kernels\n")), "the header names {kernel}: {log}");
            let bytes = std::fs::read(&out).unwrap();
            match &first {
                None => first = Some((kernel.clone(), bytes)),
                Some((widest, want)) => {
                    assert!(&bytes == want, "{method}: the {kernel} kernel trains other bits than {widest}")
                }
            }
        }
    }
}

/// Small conv, MobileNet and ViT networks on every kernel (BatchNorm's,
/// the depthwise convolution's and the other vision passes are compiled once
/// per instruction set): two SVP+ steps at batch 128 give the same model file
/// bytes.
#[test]
fn every_kernel_trains_a_cnn_a_mobilenet_and_a_vit_to_the_same_bits() {
    let kernels = kernels();
    let d = scratch("kernels-vision");
    let nets = [
        (
            "cnn",
            "[model]\nhidden = []\nconv = [8, 8, \"M\", 16, \"M\"]\n[svp]\nlayers_per_unit = 2\n[train]\n[optimizer]\nkind = \"adam\"\nlr = 1e-3\n",
        ),
        (
            "mobilenet",
            "[model]\nhidden = []\nconv = [8]\nmobile = [{ channels = 8, expansion = 1 }, { channels = 12, expansion = 2, stride = 2 }, { channels = 12, expansion = 2 }]\n[svp]\nlayers_per_unit = 2\n[train]\n[optimizer]\nkind = \"adam\"\nlr = 1e-3\n",
        ),
        (
            "vit",
            "[model]\nhidden = []\n[model.vit]\npatch = 7\ndim = 16\ndepth = 2\nheads = 2\nmlp = 32\n[svp]\nlayers_per_unit = 2\n[train]\n[optimizer]\nkind = \"adamw\"\nlr = 1e-3\n",
        ),
    ];
    for (net, toml) in nets {
        let config = d.join(format!("{net}.toml"));
        std::fs::write(&config, toml).unwrap();
        let config = config.display().to_string();
        let mut first: Option<(String, Vec<u8>)> = None;
        for kernel in &kernels {
            let out = d.join(format!("{net}-{kernel}.svpm")).display().to_string();
            let args = ["train", "--config", &config, "--data", "embedded", "--limit-train", "256", "--epochs", "1"];
            let o = svp_on(kernel, &[&args[..], &["--out", &out]].concat());
            assert!(o.status.success(), "{net} {kernel}: {}", String::from_utf8_lossy(&o.stderr));
            let bytes = std::fs::read(&out).unwrap();
            match &first {
                None => first = Some((kernel.clone(), bytes)),
                Some((widest, want)) => {
                    assert!(&bytes == want, "{net}: the {kernel} kernel trains other bits than {widest}")
                }
            }
        }
    }
}

#[test]
fn a_kernel_this_cpu_cannot_run_is_one_line() {
    let foreign = if cfg!(target_arch = "aarch64") { "avx2" } else { "neon" };
    for (kernel, says) in
        [("sse9", "SVP_KERNEL=sse9 is not a kernel; this CPU runs "), (foreign, "lacks its instructions")]
    {
        let o = svp_on(kernel, &["info", "no-such-model.svpm"]);
        assert_eq!(o.status.code(), Some(1), "{kernel}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(says), "{stderr}");
    }
    // Empty means unset.
    let o = svp_on("", &["--version"]);
    assert!(o.status.success());
}
