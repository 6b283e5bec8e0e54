//! Bad input ends in one clear line and a non-zero exit, never a panic.

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{scratch, svp};

/// Asserts a failure with `code` whose stderr is one `error:` line containing `needle`.
fn assert_fails(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    assert!(errors[0].contains(needle), "expected {needle:?} in {:?}", errors[0]);
}

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// A tiny valid IDX data folder (2x2 images, 3 classes).
fn write_dataset(dir: &Path, train: usize, test: usize) {
    let images = |n: usize| idx(&[n as u32, 2, 2], &(0..n * 4).map(|i| (i * 37 % 256) as u8).collect::<Vec<_>>());
    let labels = |n: usize| idx(&[n as u32], &(0..n).map(|i| (i % 3) as u8).collect::<Vec<_>>());
    std::fs::write(dir.join("train-images-idx3-ubyte"), images(train)).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), labels(train)).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), images(test)).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), labels(test)).unwrap();
}

fn write_config(dir: &Path, body: &str) -> String {
    let p = dir.join("run.toml");
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

const TINY: &str =
    "[model]\nhidden = [8]\n[train]\nepochs = 1\nbatch_size = 4\n[optimizer]\nkind = \"adam\"\nlr = 0.01\n";

#[test]
fn missing_data_folder() {
    assert_fails(&svp(&["train", "--data", "/nonexistent/svp-data", "--epochs", "1"]), 1, "/nonexistent/svp-data");
}

#[test]
fn missing_file_in_data_folder() {
    let d = scratch("missing-file");
    write_dataset(&d, 8, 4);
    std::fs::remove_file(d.join("t10k-labels-idx1-ubyte")).unwrap();
    let cfg = write_config(&d, TINY);
    assert_fails(&svp(&["train", "--config", &cfg, "--data", d.to_str().unwrap()]), 1, "no test labels file");
}

#[test]
fn bad_magic() {
    let d = scratch("bad-magic");
    write_dataset(&d, 8, 4);
    std::fs::write(d.join("train-images-idx3-ubyte"), b"GIF89a not an idx file").unwrap();
    let cfg = write_config(&d, TINY);
    assert_fails(&svp(&["train", "--config", &cfg, "--data", d.to_str().unwrap()]), 1, "is not an IDX file");
}

#[test]
fn truncated_file() {
    let d = scratch("truncated");
    write_dataset(&d, 8, 4);
    let p = d.join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
    let cfg = write_config(&d, TINY);
    assert_fails(&svp(&["train", "--config", &cfg, "--data", d.to_str().unwrap()]), 1, "truncated");
}

#[test]
fn images_and_labels_disagree() {
    let d = scratch("count");
    write_dataset(&d, 8, 4);
    std::fs::write(d.join("train-labels-idx1-ubyte"), idx(&[7], &[0, 1, 2, 0, 1, 2, 0])).unwrap();
    let cfg = write_config(&d, TINY);
    assert_fails(&svp(&["train", "--config", &cfg, "--data", d.to_str().unwrap()]), 1, "8 images but 7 labels");
}

#[test]
fn config_errors() {
    let d = scratch("config");
    write_dataset(&d, 8, 4);
    let data = d.to_str().unwrap().to_string();
    let cases = [
        // Each error names the line it is on (here the third, and the fifth).
        (TINY.replace("hidden = [8]", "hidden = [8]\nwidht = 3"), "line 3: unknown field `widht`"),
        (TINY.replace("epochs = 1", "epochs = 1\nepoch = 3"), "line 5: unknown field `epoch`"),
        (TINY.replace("hidden = [8]", "hidden = [8, 0]"), "model.hidden[1] is 0"),
        (format!("{TINY}[svp]\nprojection_dim = 0\n"), "svp.projection_dim = 0"),
        (TINY.replace("hidden = [8]", "hidden = [8]\ninput = 784"), "model.input = 784 but the data has 4"),
        (TINY.replace("lr = 0.01", "lr = -1.0"), "optimizer.lr"),
        ("[model\nhidden = [8]".to_string(), "line 1"),
        (TINY.replace("hidden = [8]", "hidden = [8]\nconv = [0]"), "model.conv[0] is 0"),
        (TINY.replace("hidden = [8]", "hidden = [8]\nconv = [\"M\", 4]"), "no conv block before it"),
        // The test images are 2x2: a second pooling leaves nothing.
        (TINY.replace("hidden = [8]", "hidden = [8]\nconv = [4, \"M\", 4, \"M\"]"), "shrink to nothing"),
        (format!("{TINY}[svp]\nlayers_per_unit = 0\n"), "svp.layers_per_unit"),
        (format!("{TINY}[svp]\nhead_lr_scale = 0.0\n"), "svp.head_lr_scale"),
    ];
    for (body, needle) in cases {
        let cfg = write_config(&d, &body);
        assert_fails(&svp(&["train", "--config", &cfg, "--data", &data]), 1, needle);
    }
    assert_fails(&svp(&["train", "--config", "/nonexistent/run.toml"]), 1, "cannot read config");
}

#[test]
fn unwritable_output_fails_before_training() {
    let d = scratch("out");
    write_dataset(&d, 8, 4);
    let cfg = write_config(&d, TINY);
    let data = d.to_str().unwrap();
    let out = svp(&["train", "--config", &cfg, "--data", data, "--out", "/nonexistent/dir/model.svpm"]);
    assert_fails(&out, 1, "does not exist");
    assert!(String::from_utf8_lossy(&out.stdout).is_empty(), "no epoch ran");
    assert_fails(&svp(&["train", "--config", &cfg, "--data", data, "--out", data]), 1, "is a folder");
}

/// A run that does not fit the memory it may take stops before its first
/// step with one line, naming what did not fit (here the reference MLP's
/// 11 MiB of weights and 22 MiB of Adam state against a 20 MiB allowance),
/// and writes no model.
#[test]
fn training_past_its_memory_is_one_line() {
    let d = scratch("max-memory");
    let model = d.join("m.svpm");
    let out = svp(&["train", "--data", "embedded", "--max-memory", "20", "--out", model.to_str().unwrap()]);
    assert_fails(&out, 1, "not enough memory to train: could not get");
    assert!(String::from_utf8_lossy(&out.stderr).contains("for optimizer state"));
    assert!(String::from_utf8_lossy(&out.stdout).is_empty(), "no epoch ran");
    assert!(!model.exists());
}

/// A batch larger than the training set is one batch of all of it: the same
/// run as that batch size, without buffers for the size asked (a 100,000-row
/// batch would want 40 GB of similarity matrices).
#[test]
fn a_batch_larger_than_the_data_is_the_whole_set() {
    let d = scratch("whole");
    write_dataset(&d, 40, 8);
    let cfg = write_config(&d, TINY);
    let data = d.to_str().unwrap();
    let run = |batch: &str| {
        let out = svp(&["train", "--config", &cfg, "--data", data, "--batch-size", batch, "--epochs", "2", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let losses: Vec<f64> = stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["train_loss"].as_f64())
            .collect();
        (losses, String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (asked, stderr) = run("100000");
    assert!(stderr.contains("batch 40 (all of the training set; 100000 asked)"), "{stderr}");
    let (whole, _) = run("40");
    assert_eq!(asked.len(), 2);
    assert_eq!(asked, whole);
}

/// A run that diverges before its first epoch ends writes nothing, and
/// leaves a file already at `--out` as it was (the issue's own command: the
/// reference MLP at lr 1e30, which overflows at step 1).
#[test]
fn divergence_in_the_first_epoch_writes_nothing() {
    let d = scratch("diverge");
    let model = d.join("d.svpm");
    std::fs::write(&model, b"the user's older file").unwrap();
    let args = ["train", "--data", "embedded", "--epochs", "2", "--lr", "1e30", "--out", model.to_str().unwrap()];
    let out = svp(&args);
    assert_fails(&out, 3, "training diverged: non-finite loss");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at layer") && stderr.contains("step 1;"), "{stderr}");
    assert!(stderr.contains("no epoch of this run finished with finite weights, so nothing was written"), "{stderr}");
    assert!(stderr.contains("no epoch finished;") && !stderr.contains("accuracy 0.00%"), "{stderr}");
    assert_eq!(std::fs::read(&model).unwrap(), b"the user's older file");
}

/// A run that diverges later keeps the model of its last epoch with finite
/// weights: the file loads, evaluates, and says how many epochs it had
/// (backprop with SGD at lr 8 and no normalization overflows at step 42 of
/// this run, in epoch 5: training is bit-exact, so that is where it always
/// does).
#[test]
fn divergence_keeps_the_last_finite_epoch() {
    let d = scratch("diverge-late");
    let body = "[model]\nhidden = [32]\nnorm = \"none\"\n[train]\nepochs = 8\nbatch_size = 32\nmethod = \"bp\"\n\
                [optimizer]\nkind = \"sgd\"\nlr = 8.0\n";
    let cfg = write_config(&d, body);
    let model = d.join("m.svpm");
    let m = model.to_str().unwrap();
    let out = svp(&["train", "--config", &cfg, "--data", "embedded", "--limit-train", "320", "--out", m]);
    assert_fails(&out, 3, "training diverged: non-finite loss");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("step 42;"), "{stderr}");
    assert!(stderr.contains(&format!("the model after epoch 4, the last with finite weights, is in {m}")), "{stderr}");
    let info = svp(&["info", m, "--json"]);
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["epochs"], 4, "{info}");
    let eval = svp(&["eval", m, "--data", "embedded", "--json"]);
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let acc = serde_json::from_slice::<serde_json::Value>(&eval.stdout).unwrap()["test_acc"].as_f64().unwrap();
    assert_eq!(acc, info["test_acc"].as_f64().unwrap(), "the file is epoch 4's model");
}

/// `--threads` takes 1 to 256 (the pool starts them all before the command
/// runs: 100,000 hung).
#[test]
fn thread_counts_out_of_range_are_refused() {
    for n in ["0", "257", "100000", "many"] {
        assert_fails(&svp(&["--threads", n, "info", "m.svpm"]), 2, "must be a whole number from 1 to 256");
    }
}

/// `--max-memory 0` is a budget like any other that cannot hold the run (it
/// aborted in the allocator, exit 134).
#[test]
fn a_zero_memory_budget_is_the_usual_error() {
    let out = svp(&["train", "--data", "embedded", "--epochs", "1", "--max-memory", "0"]);
    assert_fails(&out, 1, "not enough memory to train: could not get 11.1 MiB more for the network's weights");
    assert!(String::from_utf8_lossy(&out.stderr).contains("within --max-memory 0 MiB"));
}

/// A damaged label byte (a 200 among 0-2) is refused, naming the file and
/// the sample, instead of training a 201-class network; a config that says
/// the data has 201 classes trains, and one that says 3 refuses it too.
#[test]
fn a_damaged_label_does_not_add_classes() {
    let d = scratch("label");
    write_dataset(&d, 12, 4);
    let labels = d.join("train-labels-idx1-ubyte");
    let mut bytes = std::fs::read(&labels).unwrap();
    bytes[8 + 5] = 200; // the header is 8 bytes
    std::fs::write(&labels, bytes).unwrap();
    let data = d.to_str().unwrap();
    let file = labels.display().to_string();
    let out = svp(&["train", "--config", &write_config(&d, TINY), "--data", data]);
    assert_fails(&out, 1, &format!("{file}: label 200 at index 5 is beyond the others"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("state `classes = 201` under [model]"));
    let stated = TINY.replace("hidden = [8]", "hidden = [8]\nclasses = 201");
    let out = svp(&["train", "--config", &write_config(&d, &stated), "--data", data]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("network 4-8-201"));
    let three = TINY.replace("hidden = [8]", "hidden = [8]\nclasses = 3");
    let out = svp(&["train", "--config", &write_config(&d, &three), "--data", data]);
    assert_fails(
        &out,
        1,
        &format!("{file}: label 200 at index 5 is not one of the 3 classes expected (labels 0 to 2)"),
    );
}

/// A temporary left next to `--out` by a writer that was killed (as large
/// as the model) is removed by the next write of that file.
#[test]
fn a_killed_writers_temporary_is_cleaned_up() {
    let d = scratch("stale-tmp");
    write_dataset(&d, 8, 4);
    // A process id that was just in use and is gone now.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = d.join(format!(".m.svpm.tmp-{dead}"));
    std::fs::write(&stale, vec![0u8; 4096]).unwrap();
    let model = d.join("m.svpm");
    let out = svp(&[
        "train",
        "--config",
        &write_config(&d, TINY),
        "--data",
        d.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(model.exists() && !stale.exists(), "the stale temporary is still there");
}

/// What a log of a short run holds: the run line, one line per epoch, the
/// final line (saying the model was not saved without `--out`); no progress
/// line for an epoch shorter than the log interval (it showed an empty bar
/// and the rate of one step).
#[test]
fn a_log_gets_one_line_per_epoch_and_the_outcome() {
    let d = scratch("log");
    write_dataset(&d, 8, 4);
    let out = svp(&["train", "--config", &write_config(&d, TINY), "--data", d.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines[0].contains(", 1 epoch, "), "not '1 epochs': {}", lines[0]);
    assert!(lines[1].ends_with("the model was not saved (give --out FILE to save it)"), "{}", lines[1]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("epoch   1  train_loss"), "{stdout}");
}

#[test]
fn garbage_model_file() {
    let d = scratch("model");
    let p = d.join("junk.svpm");
    std::fs::write(&p, b"SVPM but not really").unwrap();
    assert_fails(&svp(&["eval", p.to_str().unwrap(), "--data", "embedded"]), 1, "not a valid svp model file");
    assert_fails(&svp(&["eval", "/nonexistent.svpm", "--data", "embedded"]), 1, "/nonexistent.svpm");
}

/// A model meets data or requests it cannot serve: one line that says how.
#[test]
fn a_model_and_data_that_do_not_fit() {
    let d = scratch("misfit");
    write_dataset(&d, 8, 4);
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/device-mlp.svpm");
    let data = d.to_str().unwrap();
    assert_fails(&svp(&["eval", model, "--data", data]), 1, "the model takes 28x28 images, the data has 2x2");
    let images = d.join("t10k-images-idx3-ubyte");
    let predict = svp(&["predict", model, "--input", images.to_str().unwrap()]);
    assert_fails(&predict, 1, "holds 2x2 images; the model takes 28x28");
    // A labels file where images belong: what it is, not an empty shape.
    let labels = d.join("t10k-labels-idx1-ubyte");
    let predict = svp(&["predict", model, "--input", labels.to_str().unwrap()]);
    assert_fails(&predict, 1, "is not an IDX file of images (count x rows x cols) but an array of 1 dimension(s) (4)");
    let exit = svp(&["predict", model, "--data", "embedded", "--exit-layer", "99"]);
    assert_fails(&exit, 1, "--exit-layer 99: the model has hidden layers 1..=12");
}

/// A CNN and a ViT written with `--out` are model files (format version 2)
/// that `svp eval` reads back to the training-time accuracy, early exits
/// included, and that `svp export` converts to f16.
#[test]
fn conv_and_vit_models_train_save_eval_and_export() {
    let d = scratch("front-models");
    let fronts = [
        ("cnn", "hidden = []\nconv = [4, \"M\", 8]\n", "conv(4-M-8, readout 2x2)"),
        ("vit", "hidden = []\n[model.vit]\npatch = 7\ndim = 16\ndepth = 2\nheads = 2\nmlp = 32\n", "vit(patch 7"),
    ];
    for (name, model_table, described) in fronts {
        let body = format!(
            "[model]\n{model_table}[train]\nepochs = 1\nbatch_size = 64\n[optimizer]\nkind = \"adam\"\nlr = 0.002\n"
        );
        let cfg = write_config(&d, &body);
        let model = d.join(format!("{name}.svpm"));
        let model = model.to_str().unwrap();
        let out =
            svp(&["train", "--config", &cfg, "--data", "embedded", "--limit-train", "1024", "--json", "--out", model]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let last = String::from_utf8_lossy(&out.stdout).lines().last().unwrap().to_string();
        let trained = serde_json::from_str::<serde_json::Value>(&last).unwrap()["test_acc"].as_f64().unwrap();
        let eval = svp(&["eval", model, "--data", "embedded", "--json", "--exits"]);
        assert!(eval.status.success(), "{name}: {}", String::from_utf8_lossy(&eval.stderr));
        let report: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
        assert_eq!(report["test_acc"].as_f64().unwrap(), trained, "{name}: eval reproduces the training accuracy");
        assert!(!report["exit_test_acc"].as_array().unwrap().is_empty(), "{name}: early exits");
        let info = svp(&["info", model]);
        let text = String::from_utf8_lossy(&info.stdout);
        assert!(text.contains("format version 2") && text.contains(described), "{name}: {text}");
        let half = d.join(format!("{name}-f16.svpm"));
        let export = svp(&["export", model, "--dtype", "f16", "--out", half.to_str().unwrap()]);
        assert!(export.status.success(), "{name}: {}", String::from_utf8_lossy(&export.stderr));
        let eval16 = svp(&["eval", half.to_str().unwrap(), "--data", "embedded", "--json"]);
        let acc16 = serde_json::from_slice::<serde_json::Value>(&eval16.stdout).unwrap()["test_acc"].as_f64().unwrap();
        assert!((acc16 - trained).abs() <= 0.01, "{name}: f16 {acc16} against f32 {trained}");
    }
}

#[test]
fn train_save_eval_round_trip_on_embedded_data() {
    let d = scratch("roundtrip");
    let body =
        "[model]\nhidden = [64]\n[train]\nepochs = 1\nbatch_size = 64\n[optimizer]\nkind = \"adam\"\nlr = 0.001\n";
    let cfg = write_config(&d, body);
    let model = d.join("m.svpm");
    let out = svp(&["train", "--config", &cfg, "--data", "embedded", "--json", "--out", model.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.len(), 2, "one epoch line and a final line");
    for key in ["epoch", "train_loss", "test_acc", "seconds", "samples_per_s"] {
        assert!(lines[0].get(key).is_some(), "missing {key}");
    }
    assert!(lines[1]["peak_rss_kib"].as_u64().unwrap() > 0);
    let trained = lines[1]["test_acc"].as_f64().unwrap();
    assert!(trained > 0.5, "one epoch on 6k samples, chance is 0.1: {trained}");
    let eval = svp(&["eval", model.to_str().unwrap(), "--data", "embedded", "--json", "--exits"]);
    assert!(eval.status.success());
    let report: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(report["test_acc"].as_f64().unwrap(), trained, "eval reproduces the training-time accuracy");
    assert_eq!(report["exit_test_acc"].as_array().unwrap().len(), 1);
}

#[test]
fn memory_sweep_runs_children_and_shows_flat_svp_and_growing_bp() {
    let d = scratch("memory");
    let (csv, plot) = (d.join("m.csv"), d.join("m.svg"));
    let out = svp(&[
        "memory",
        "--depths",
        "2,8",
        "--steps",
        "2",
        "--csv",
        csv.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<Vec<String>> = text.lines().skip(1).map(|l| l.split(',').map(str::to_string).collect()).collect();
    assert_eq!(rows.len(), 4, "{text}");
    let non_weight = |method: &str, depth: &str| -> f64 {
        let r = rows.iter().find(|r| r[0] == method && r[1] == depth).expect("row");
        r[5].parse::<f64>().unwrap() / 1024.0
    };
    let svp_growth = non_weight("svp", "8") - non_weight("svp", "2");
    let bp_growth = non_weight("bp", "8") - non_weight("bp", "2");
    // BP keeps 6 more layers of 128 x 1024 activations and caches (~9 MiB);
    // SVP reuses one layer's buffers.
    assert!(svp_growth.abs() < 4.0, "SVP non-weight memory grew {svp_growth:.1} MiB");
    assert!(bp_growth > 6.0, "BP non-weight memory grew only {bp_growth:.1} MiB");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 4);
    // Bad input is one line, as everywhere; so is a measurement that does
    // not fit the machine (a million-row batch: 4 TB of similarity matrices).
    assert_fails(&svp(&["memory", "--depths", "0"]), 1, "--depths");
    let csv = d.join("big.csv");
    let out =
        svp(&["memory", "--depths", "1", "--methods", "svp", "--batch", "1000000", "--csv", csv.to_str().unwrap()]);
    assert_fails(&out, 1, "measuring svp at depth 1: not enough memory to train");
    assert!(!csv.exists());
    // Usage errors come before the table's header line: nothing else printed.
    for (flag, value, needle) in [
        ("--steps", "0", "at least 2"),
        ("--steps", "1", "at least 2"),
        ("--data", "nope", "possible values: random, embedded"),
    ] {
        let out = svp(&["memory", flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("error: invalid value") && stderr.contains(needle), "{stderr}");
        assert!(out.stdout.is_empty() && !stderr.contains("svp memory:"), "{stderr}");
    }
}

const CONSTANT: &str = "[model]\nhidden = [64, 64]\n[train]\nepochs = 2\nbatch_size = 64\n[optimizer]\nkind = \"adam\"\nlr = 0.001\n[schedule]\nkind = \"constant\"\n";

#[test]
fn resume_from_a_checkpoint_file_reproduces_the_uninterrupted_model() {
    let d = scratch("resume");
    let cfg = write_config(&d, CONSTANT);
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let common = ["--data", "embedded", "--limit-train", "1000"];
    let run = |extra: &[&str]| {
        let mut args = vec!["train", "--config", &cfg];
        args.extend_from_slice(&common);
        args.extend_from_slice(extra);
        let out = svp(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["--out", &p("straight.svpm")]);
    // The same run stopped after epoch 1 (constant schedule: epoch 1 is the same),
    // then resumed from its checkpoint for the second epoch.
    run(&["--epochs", "1", "--checkpoint", &p("run.ckpt"), "--checkpoint-every", "5"]);
    let (ck, r) = (p("run.ckpt"), p("resumed.svpm"));
    let mut args = vec!["train", "--resume", &ck];
    args.extend_from_slice(&common);
    args.extend_from_slice(&["--epochs", "2", "--out", &r]);
    let out = svp(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming at epoch 2, batch 0"));
    let (a, b) = (std::fs::read(p("straight.svpm")).unwrap(), std::fs::read(&r).unwrap());
    assert!(a == b, "resumed model file differs from the uninterrupted one");
    // A checkpoint from other data is refused.
    let out = svp(&["train", "--resume", &ck, "--data", "embedded", "--epochs", "2"]);
    assert_fails(&out, 1, "the checkpoint was trained on");
    // A finished run has nothing to resume (it wrote a model saying 0 epochs
    // and 0.00 %): refused, and nothing written.
    let done = p("done.svpm");
    let mut args = vec!["train", "--resume", &ck, "--out", &done];
    args.extend_from_slice(&common);
    assert_fails(&svp(&args), 1, "nothing to resume: its run has already trained its 1 epoch; give --epochs 2 or more");
    args.extend_from_slice(&["--epochs", "1"]);
    assert_fails(&svp(&args), 1, "--epochs 1 asks for no more than the 1 epoch it has already trained");
    assert!(!Path::new(&done).exists());
    // A model file where a checkpoint belongs, and the other way round: each says what it is.
    assert_fails(&svp(&["train", "--resume", &p("straight.svpm")]), 1, "is an svp model file, not a checkpoint");
    assert_fails(&svp(&["eval", &ck, "--data", "embedded"]), 1, "is an svp checkpoint, not a model file");
}

/// A checkpoint in the format before bf16 moments (version 1) resumes.
#[test]
fn a_version_1_checkpoint_resumes() {
    let d = scratch("resume-v1");
    let ck = d.join("v1.ckpt");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/../svp-train/tests/fixtures/v1-adam.ckpt"), &ck).unwrap();
    let ck = ck.to_str().unwrap();
    let out = svp(&["train", "--resume", ck, "--data", "embedded", "--limit-train", "1000", "--epochs", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("resuming at epoch 2, batch 0 (step 16)"), "{err}");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("epoch   2") && !report.contains("epoch   1"), "{report}");
}

#[test]
fn killing_the_writer_never_leaves_a_corrupt_checkpoint() {
    let d = scratch("kill");
    let cfg = write_config(&d, CONSTANT);
    let ckpt = d.join("k.ckpt");
    let mut survived = 0;
    for delay_ms in [150u64, 400, 650, 900, 1200, 1500] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_svp"))
            .args(["train", "--config", &cfg, "--data", "embedded", "--epochs", "50", "--checkpoint"])
            .arg(&ckpt)
            .args(["--checkpoint-every", "1"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        if ckpt.exists() {
            let info = svp(&["info", ckpt.to_str().unwrap()]);
            assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
            survived += 1;
        }
        // No temporary file is ever taken for the checkpoint itself.
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            assert!(!name.ends_with(".ckpt") || name == "k.ckpt", "{name}");
        }
    }
    assert!(survived >= 3, "the writer was killed before any checkpoint {survived} times of 6");
}
