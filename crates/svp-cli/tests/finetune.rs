//! `svp finetune`: a model file trained on, with its own projections and
//! preprocessing, and the errors of data that does not fit it.

use std::process::Output;

mod common;
use common::{scratch, svp};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// (test accuracy before, after) from the last line of a fine-tuning run.
fn before_after(err: &str) -> (f64, f64) {
    let line = err.lines().last().unwrap();
    let pcts: Vec<f64> = line.split_whitespace().filter_map(|w| w.strip_suffix('%')?.parse().ok()).collect();
    (pcts[0], pcts[1])
}

#[test]
fn an_svp_model_fine_tunes_with_its_own_projections() {
    let d = scratch("svp");
    let p = |n: &str| d.join(n).display().to_string();
    let cfg = p("c.toml");
    std::fs::write(&cfg, "[model]\nhidden = [64]\n[train]\nepochs = 1\n[optimizer]\nkind = \"adam\"\nlr = 0.002\n")
        .unwrap();
    let base = p("base.svpm");
    let out = svp(&["train", "--config", &cfg, "--data", "embedded", "--limit-train", "1000", "--out", &base]);
    assert!(out.status.success(), "{}", stderr(&out));
    // More of the same data: SVP by default (the model was trained with it),
    // the accuracy before is the model's own, and training goes on from it.
    let tuned = p("tuned.svpm");
    let out = svp(&["finetune", &base, "--data", "embedded", "--epochs", "2", "--out", &tuned]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("svp train: method svp, network 784-64-10"), "{err}");
    let eval = svp(&["eval", &base, "--data", "embedded", "--json"]);
    let base_acc = serde_json::from_slice::<serde_json::Value>(&eval.stdout).unwrap()["test_acc"].as_f64().unwrap();
    let (before, after) = before_after(&err);
    assert!((before - 100.0 * base_acc).abs() < 0.005, "{err}");
    assert!(after > before + 1.0, "two epochs on 6x the data should gain: {err}");
    let info = String::from_utf8_lossy(&svp(&["info", &tuned]).stdout).into_owned();
    assert!(info.contains("projections  seed 1,"), "the model's own projections: {info}");
    // Fine-tuned in place: the file is read whole first, written atomically.
    let out =
        svp(&["finetune", &tuned, "--data", "embedded", "--epochs", "1", "--limit-train", "256", "--out", &tuned]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(svp(&["eval", &tuned, "--data", "embedded"]).status.success());
}

#[test]
fn data_that_does_not_fit_the_model_is_one_line() {
    let d = scratch("misfit");
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/device-mlp.svpm");
    // 2x2 images, 3 classes.
    let idx = |dims: &[u32], data: &[u8]| {
        let mut out = vec![0, 0, 8, dims.len() as u8];
        dims.iter().for_each(|v| out.extend_from_slice(&v.to_be_bytes()));
        out.extend_from_slice(data);
        out
    };
    for (stem, bytes) in [
        ("train-images-idx3-ubyte", idx(&[8, 2, 2], &[7; 32])),
        ("t10k-images-idx3-ubyte", idx(&[4, 2, 2], &[7; 16])),
        ("train-labels-idx1-ubyte", idx(&[8], &[0, 1, 2, 0, 1, 2, 0, 1])),
        ("t10k-labels-idx1-ubyte", idx(&[4], &[0, 1, 2, 0])),
    ] {
        std::fs::write(d.join(stem), bytes).unwrap();
    }
    let data = d.display().to_string();
    let out = svp(&["finetune", model, "--data", &data]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).trim() == "error: the model takes 28x28 images, the data has 2x2", "{}", stderr(&out));
    // A label beyond the model's classes.
    let mut labels = idx(&[4], &[0, 1, 2, 0]);
    labels[8 + 3] = 12;
    std::fs::write(d.join("t10k-labels-idx1-ubyte"), labels).unwrap();
    let out = svp(&["finetune", model, "--data", &data]);
    assert!(stderr(&out).contains("label 12 at index 3 is not one of the 10 classes expected"), "{}", stderr(&out));
}

#[test]
fn frozen_layers_come_out_of_fine_tuning_as_they_went_in() {
    let d = scratch("frozen");
    let p = |n: &str| d.join(n).display().to_string();
    let cfg = p("c.toml");
    let toml = "[model]\nhidden = [64, 32]\n[train]\nepochs = 1\n[optimizer]\nkind = \"adam\"\nlr = 0.002\n";
    std::fs::write(&cfg, toml).unwrap();
    let (base, tuned) = (p("base.svpm"), p("tuned.svpm"));
    let out = svp(&["train", "--config", &cfg, "--data", "embedded", "--limit-train", "1000", "--out", &base]);
    assert!(out.status.success(), "{}", stderr(&out));
    for method in ["svp", "bp"] {
        let args = ["--data", "embedded", "--epochs", "1", "--method", method, "--train-from-layer", "2"];
        let out = svp(&[&["finetune", &base, "--out", &tuned][..], &args].concat());
        let err = stderr(&out);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("network 784-64-32-10 (layer 1 frozen)"), "{err}");
        let net = |path: &str| svp_model::ModelFile::load(std::path::Path::new(path)).unwrap().to_network();
        let (a, b) = (net(&base), net(&tuned));
        assert_eq!(a.layer_params(0), b.layer_params(0), "{method}: the frozen layer");
        for l in 1..3 {
            assert_ne!(a.layer_params(l), b.layer_params(l), "{method}: layer {} is trained", l + 1);
        }
    }
    for bad in ["0", "4"] {
        let out = svp(&["finetune", &base, "--data", "embedded", "--train-from-layer", bad]);
        assert_eq!(out.status.code(), Some(1));
        let want = format!("error: --train-from-layer {bad}: the model has layers 1 to 3 (the head is layer 3)");
        assert_eq!(stderr(&out).trim(), want);
    }
}
