//! Training on little data: augmentation (`--augment-shift`, `--augment-flip`)
//! and a validation split that picks the epoch to keep (`--val-split`,
//! `--keep best`), on `svp train` and `svp finetune`.

use serde_json::Value;

mod common;
use common::{scratch, svp};

const CONFIG: &str = "[model]\nhidden = [64]\n[train]\nbatch_size = 64\n[optimizer]\nkind = \"adam\"\nlr = 0.003\n";

fn json_lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout).lines().map(|l| serde_json::from_str(l).expect("one JSON object a line")).collect()
}

fn test_acc_of(model: &str) -> f64 {
    let eval = svp(&["eval", model, "--data", "embedded", "--json"]);
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    serde_json::from_slice::<Value>(&eval.stdout).unwrap()["test_acc"].as_f64().unwrap()
}

/// `--keep best` leaves in `--out` the epoch whose validation accuracy was
/// highest (the first of equals), and says which.
#[test]
fn keep_best_keeps_the_epoch_best_on_validation() {
    let d = scratch("keep-best");
    let p = |n: &str| d.join(n).display().to_string();
    std::fs::write(p("c.toml"), CONFIG).unwrap();
    let (cfg, model) = (p("c.toml"), p("best.svpm"));
    // With BP at this learning rate epoch 4 is best on validation, not the
    // last (runs are deterministic): the file must hold epoch 4.
    let mut args = vec!["train", "--config", &cfg, "--method", "bp", "--lr", "0.01", "--data", "embedded"];
    args.extend(["--limit-train", "1500", "--epochs", "5", "--val-split", "0.2", "--keep", "best", "--json"]);
    args.extend(["--out", &model]);
    let out = svp(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out.stdout);
    let epochs: Vec<&Value> = lines.iter().filter(|l| l.get("val_acc").is_some()).collect();
    assert_eq!(epochs.len(), 5, "{lines:?}");
    let val: Vec<f64> = epochs.iter().map(|l| l["val_acc"].as_f64().unwrap()).collect();
    assert!(val.iter().all(|&v| v > 0.3 && v <= 1.0), "validation accuracies {val:?}");
    let best = val.iter().enumerate().fold(0, |b, (i, &v)| if v > val[b] { i } else { b });
    assert!(best < 4, "the last epoch was best ({val:?}): the run no longer tests keeping an earlier one");
    let done = lines.last().unwrap();
    assert_eq!(done["model_epoch"].as_u64(), Some(best as u64 + 1), "{done}");
    // The file holds that epoch's network: its test accuracy is that epoch's.
    let kept = epochs[best]["test_acc"].as_f64().unwrap();
    assert!((test_acc_of(&model) - kept).abs() < 1e-9, "the file is not epoch {}'s model", best + 1);
    // 300 of 1,500 were held out, and said so.
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("300 held out for validation"), "{err}");
}

/// Augmentation is drawn from the seed: the same run gives the same bytes,
/// on any number of threads; without it the run differs.
#[test]
fn augmented_runs_are_deterministic() {
    let d = scratch("augment");
    let p = |n: &str| d.join(n).display().to_string();
    std::fs::write(p("c.toml"), CONFIG).unwrap();
    let cfg = p("c.toml");
    let run = |out: &str, threads: &str, augment: bool| {
        let mut args = vec![
            "train",
            "--config",
            &cfg,
            "--data",
            "embedded",
            "--limit-train",
            "512",
            "--epochs",
            "2",
            "--threads",
            threads,
            "--out",
            out,
        ];
        if augment {
            args.extend(["--augment-shift", "2", "--augment-flip"]);
        }
        let o = svp(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(out).unwrap()
    };
    let one = run(&p("a1.svpm"), "1", true);
    let two = run(&p("a2.svpm"), "2", true);
    let plain = run(&p("plain.svpm"), "2", false);
    assert!(one == two, "augmented runs on 1 and 2 threads differ");
    assert!(one != plain, "augmentation changed nothing");
    // The same from the config file as from the flags.
    let with_augment = CONFIG.replace("batch_size = 64\n", "batch_size = 64\naugment = { shift = 2, flip = true }\n");
    std::fs::write(p("aug.toml"), with_augment).unwrap();
    let from_config = {
        let (cfg, out) = (p("aug.toml"), p("c.svpm"));
        let args =
            ["train", "--config", &cfg, "--data", "embedded", "--limit-train", "512", "--epochs", "2", "--out", &out];
        let o = svp(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(&out).unwrap()
    };
    assert!(from_config == one, "[train.augment] in the config and the flags train differently");
}

/// Fine-tuning takes the same flags.
#[test]
fn finetune_augments_and_keeps_the_best() {
    let d = scratch("ft-small");
    let base = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/device-mlp.svpm");
    let out = d.join("t.svpm").display().to_string();
    let o = svp(&[
        "finetune",
        base,
        "--data",
        "embedded",
        "--limit-train",
        "600",
        "--epochs",
        "3",
        "--augment-shift",
        "1",
        "--augment-flip",
        "--val-split",
        "0.25",
        "--keep",
        "best",
        "--json",
        "--out",
        &out,
    ]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    let lines = json_lines(&o.stdout);
    let val: Vec<f64> = lines.iter().filter_map(|l| l.get("val_acc")?.as_f64()).collect();
    assert_eq!(val.len(), 3, "{lines:?}");
    assert!(err.contains("150 held out for validation"), "{err}");
    let best = val.iter().enumerate().fold(0, |b, (i, &v)| if v > val[b] { i } else { b });
    let kept = lines.iter().filter(|l| l.get("val_acc").is_some()).nth(best).unwrap()["test_acc"].as_f64().unwrap();
    assert!((test_acc_of(&out) - kept).abs() < 1e-9);
}

/// Flags that cannot work are one line and a non-zero exit, before training.
#[test]
fn bad_small_data_flags_are_one_line() {
    let d = scratch("bad-small");
    let out = d.join("m.svpm").display().to_string();
    let cases: [(&[&str], &str); 5] = [
        (&["--keep", "best", "--out", &out], "--keep best needs --val-split"),
        (&["--val-split", "0.2", "--keep", "best"], "--keep best needs --val-split (what is best) and --out"),
        (&["--val-split", "1.5"], "--val-split 1.5: give a fraction between 0 and 1"),
        (&["--val-split", "0.00001"], "holds out no sample"),
        (&["--augment-shift", "28"], "train.augment.shift = 28 would move a 28x28 image out of sight"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["train", "--data", "embedded", "--epochs", "1"];
        args.extend_from_slice(extra);
        let o = svp(&args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success(), "{extra:?} was accepted");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{extra:?}: {err}");
        assert!(!std::path::Path::new(&out).exists(), "{extra:?} wrote a model");
    }
}

/// `models/mlp-small-data.toml` on the embedded 6,000 images: SVP with
/// shifts and flips reaches 87.5 % (issue 20's small-data target), within
/// the reference config's time (docs/RESULTS.md). Runs are bit-exact; the
/// floor is the target, half a point under the measured 88.0 %.
#[test]
fn the_small_data_config_reaches_its_target() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/mlp-small-data.toml");
    let out = svp(&["train", "--config", config, "--data", "embedded", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out.stdout);
    let acc = lines.iter().rev().find_map(|l| l.get("test_acc")).and_then(Value::as_f64).expect("a test accuracy");
    assert!(acc >= 0.875, "test accuracy {acc} (measured 0.880)");
}
