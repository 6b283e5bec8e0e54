//! `svp import` and `svp export --format safetensors` end to end: PyTorch's
//! models evaluate in svp to PyTorch's accuracy, and svp's models load in
//! PyTorch with svp's predictions (where PyTorch is installed).

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{Scratch, scratch, svp};

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../svp-model/tests/fixtures");
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn path(d: &Scratch, name: &str) -> String {
    d.join(name).display().to_string()
}

const MLP: &str = "[model]\nhidden = [64, 32]\n[import]\ninput_mean = 0.2860\ninput_std = 0.3530\n";
const CNN: &str = "[model]\nhidden = []\nconv = [4, \"M\", 8, \"M\"]\n[import]\nimage = [28, 28]\ninput_mean = 0.2860\ninput_std = 0.3530\n";
const VIT: &str = "[model]\nhidden = []\n[model.vit]\npatch = 7\ndim = 32\ndepth = 2\nheads = 2\nmlp = 64\nnorm_eps = 1e-6\n[import]\nimage = [28, 28]\ninput_mean = 0.2860\ninput_std = 0.3530\n";

fn eval_accuracy(model: &str) -> f64 {
    let out = ok(&svp(&["eval", model, "--data", "embedded", "--json"]));
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["test_acc"].as_f64().unwrap()
}

#[test]
fn imported_pytorch_models_evaluate_to_pytorchs_accuracy() {
    let d = scratch("import");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}/torch-import.json")).unwrap()).unwrap();
    for (name, config) in [("mlp", MLP), ("cnn", CNN), ("vit", VIT)] {
        let cfg = path(&d, &format!("{name}.toml"));
        std::fs::write(&cfg, config).unwrap();
        let model = path(&d, &format!("{name}.svpm"));
        let weights = format!("{FIXTURES}/torch-{name}.safetensors");
        let out = svp(&["import", &weights, "--config", &cfg, "--out", &model]);
        ok(&out);
        assert!(String::from_utf8_lossy(&out.stderr).contains("28x28 images, input (pixel/255 - 0.286) / 0.353"));
        let want = golden[name]["test_acc"].as_f64().unwrap();
        assert!((eval_accuracy(&model) - want).abs() <= 0.001, "{name}: svp against PyTorch's {want}");
        let info = ok(&svp(&["info", &model]));
        assert!(info.contains("trained      elsewhere: imported from"), "{info}");
        if name == "vit" {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("vit(patch 7, dim 32, 2 blocks, 2 heads, mlp 64, cls), then 32-10"), "{stderr}");
            assert!(info.contains("LayerNorm eps 1e-6"), "{info}");
        }
    }
}

#[test]
fn import_errors_are_one_line() {
    let d = scratch("import-errors");
    let cnn = format!("{FIXTURES}/torch-cnn.safetensors");
    let vit = format!("{FIXTURES}/torch-vit.safetensors");
    let cases = [
        (
            &cnn,
            CNN.replace("image = [28, 28]\n", ""),
            "a conv network's input size is not in its weights: give the input image size",
        ),
        (
            &cnn,
            CNN.replace("conv = [4, \"M\", 8, \"M\"]", "conv = [4, \"M\", 16, \"M\"]"),
            "has shape [8, 4, 3, 3], layer 2's Conv2d weight needs [16, 4, 3, 3]",
        ),
        (
            &cnn,
            format!("{CNN}class_names = [\"a\", \"b\"]\n"),
            "[import] class_names lists 2, the model has 10 classes",
        ),
        (&cnn, CNN.replace("input_std = 0.3530", "input_std = 0.0"), "the std must be a positive number"),
        (&cnn, CNN.replace("[import]", "[import]\nmean = 1"), "unknown field `mean`"),
        (
            &vit,
            VIT.replace("dim = 32", "dim = 16"),
            "tensor `cls_token` has shape [1, 1, 32], layer 1's token embedding cls_token needs [1, 1, 16]",
        ),
        (&vit, VIT.replace("depth = 2", "depth = 1"), "tensors the architecture has no place for: blocks.1."),
        (
            &vit,
            VIT.replace("depth = 2", "depth = 3"),
            "no tensor `blocks.2.norm1.weight` for layer 4's LayerNorm weight",
        ),
        (
            &vit,
            VIT.replace("mlp = 64", "mlp = 64\nreadout = \"mean\""),
            "import and export take ViTs with readout = \"cls\"",
        ),
        (&vit, VIT.replace("norm_eps = 1e-6", "norm_eps = 0.0"), "model.vit.norm_eps = 0 must be a positive number"),
    ];
    for (weights, config, needle) in cases {
        let cfg = path(&d, "c.toml");
        std::fs::write(&cfg, config).unwrap();
        let out = svp(&["import", weights, "--config", &cfg, "--out", &path(&d, "m.svpm")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.lines().count() == 1 && stderr.contains(needle), "{stderr}\nwanted: {needle}");
        assert!(!d.join("m.svpm").exists());
    }
    let cfg = path(&d, "c.toml");
    std::fs::write(&cfg, CNN).unwrap();
    let out = svp(&["import", &cfg, "--config", &cfg, "--out", &path(&d, "m.svpm")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a readable safetensors file"));
    let out = svp(&["import", &cnn, "--config", &cfg, "--image", "28", "--out", &path(&d, "m.svpm")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be HEIGHTxWIDTH"));
}

/// The Python that runs `tools/load_in_pytorch.py`: `SVP_PYTHON`, else
/// `python3`, if it has PyTorch and safetensors.
fn python_with_torch() -> Option<String> {
    let python = std::env::var("SVP_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python).args(["-c", "import torch, safetensors"]).output().ok()?;
    probe.status.success().then_some(python)
}

/// svp-trained models (an MLP, a CNN, a ViT) exported for PyTorch: PyTorch
/// predicts what svp predicts, image by image. Skipped without PyTorch.
#[test]
fn svp_models_predict_the_same_in_pytorch() {
    let d = scratch("export");
    let configs = [
        ("mlp", "[model]\nhidden = [32]\n[train]\nepochs = 1\n[optimizer]\nkind = \"adam\"\nlr = 0.002\n"),
        (
            "cnn",
            "[model]\nhidden = []\nconv = [4, \"M\"]\n[train]\nepochs = 1\n[optimizer]\nkind = \"adam\"\nlr = 0.002\n",
        ),
        (
            "vit",
            "[model]\nhidden = []\n[model.vit]\npatch = 7\ndim = 16\ndepth = 2\nheads = 2\nmlp = 32\nnorm_eps = 1e-6\n\
             [train]\nepochs = 1\n\
             [optimizer]\nkind = \"adam\"\nlr = 0.002\n",
        ),
    ];
    let python = python_with_torch();
    for (name, config) in configs {
        let cfg = path(&d, &format!("{name}.toml"));
        std::fs::write(&cfg, config).unwrap();
        let model = path(&d, &format!("{name}.svpm"));
        ok(&svp(&["train", "--config", &cfg, "--data", "embedded", "--limit-train", "1024", "--out", &model]));
        let weights = path(&d, &format!("{name}.safetensors"));
        ok(&svp(&["export", &model, "--format", "safetensors", "--out", &weights]));
        let predict = |m: &str| ok(&svp(&["predict", m, "--data", "embedded"]));
        let classes = |text: &str| text.lines().map(|l| l.split('\t').nth(1).unwrap().to_string()).collect::<Vec<_>>();
        let svp_classes = classes(&predict(&model));
        // Back through import, with the image shape, preprocessing and class
        // names from the file's metadata: the same predictions.
        let back = path(&d, &format!("{name}-back.svpm"));
        ok(&svp(&["import", &weights, "--config", &cfg, "--out", &back]));
        assert_eq!(predict(&back), predict(&model), "{name}: the model back from safetensors predicts otherwise");
        let Some(python) = &python else {
            eprintln!("skipped the PyTorch half: no python3 with torch and safetensors (set SVP_PYTHON)");
            continue;
        };
        let script = Path::new(ROOT).join("tools/load_in_pytorch.py");
        let out = Command::new(python).arg(script).arg(&weights).output().unwrap();
        let torch_classes = classes(&ok(&out));
        assert_eq!(svp_classes.len(), 1000);
        assert!(svp_classes == torch_classes, "{name}: PyTorch predicts otherwise than svp");
    }
}
