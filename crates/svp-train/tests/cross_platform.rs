//! Model files mean the same on every CPU: a model trained and saved on
//! x86-64 (a committed fixture) gives the same logits, bit for bit, wherever
//! it is loaded, and training it again from the same config writes the same
//! bytes. `.ci/aarch64` runs this file on aarch64 under emulation, so a model
//! trained on a workstation is the one a board runs, and the reverse.
//!
//! The fixtures were written on x86-64 (AVX2) by this file itself:
//! `SVP_WRITE_FIXTURES=1 cargo test -p svp-train --test cross_platform`.

use serde_json::Value;
use std::path::Path;
use svp_data::DataSplit;
use svp_model::{DType, InferenceModel, InferenceWorkspace, ModelFile, ModelInfo, Provenance};
use svp_optim::Optimizer;
use svp_train::config::{ModelConfig, SvpConfig, TrainConfig};
use svp_train::{Config, Method, fit};

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/x86-mlp.svpm");
const LOGITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/x86-mlp-logits.json");

/// Test images whose logits the fixture holds.
const ROWS: usize = 200;

fn writing_fixtures() -> bool {
    std::env::var_os("SVP_WRITE_FIXTURES").is_some()
}

/// The first 512 embedded training samples: eight SVP steps at batch 64.
fn data() -> DataSplit {
    let mut data = DataSplit::embedded();
    let f = data.train.features();
    data.train.labels.truncate(512);
    data.train.images.truncate(512 * f);
    data
}

/// Trains a 784-64-32-10 MLP (LayerNorm + ReLU) with SVP and Adam and saves it to `out`.
fn train_and_save(out: &Path) {
    let data = data();
    let config = Config {
        model: ModelConfig::mlp(vec![64, 32]),
        svp: SvpConfig::default(),
        train: TrainConfig { method: Method::Svp, epochs: 1, batch_size: 64, ..TrainConfig::default() },
        optimizer: Optimizer::adam(1e-3),
        schedule: Default::default(),
    };
    config.validate_for_data(&data).unwrap();
    let outcome = fit(&config, &data, &mut ());
    let last = outcome.epochs.last().unwrap();
    let info = ModelInfo {
        heads: outcome.heads,
        units: outcome.units,
        norm: outcome.norm,
        image_shape: data.train.image_shape,
        class_names: data.class_names(),
        provenance: Provenance { method: "svp".into(), epochs: last.epoch, test_acc: last.test_acc, data: data.origin },
    };
    ModelFile::save_network(out, &outcome.model, &config.model, info, DType::F32).unwrap();
}

/// The logits of the first [`ROWS`] embedded test images, as bits.
fn logit_bits(model: &InferenceModel) -> Vec<u32> {
    let test = DataSplit::embedded().test;
    let norm = model.meta().norm;
    let x: Vec<f32> =
        test.images[..ROWS * test.features()].iter().map(|&p| (p as f32 / 255.0 - norm.mean) / norm.std).collect();
    let mut ws = InferenceWorkspace::default();
    model.predict(&x, ROWS, None, &mut ws).iter().map(|v| v.to_bits()).collect()
}

#[test]
fn a_model_trained_on_x86_gives_the_same_logits_here() {
    if writing_fixtures() {
        train_and_save(Path::new(MODEL));
        let bits = logit_bits(&InferenceModel::load(Path::new(MODEL)).unwrap());
        let json = serde_json::json!({ "rows": ROWS, "written_on": std::env::consts::ARCH, "logit_bits": bits });
        std::fs::write(LOGITS, serde_json::to_string(&json).unwrap() + "\n").unwrap();
    }
    let want: Value = serde_json::from_str(&std::fs::read_to_string(LOGITS).unwrap()).unwrap();
    let want: Vec<u32> = want["logit_bits"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let model = InferenceModel::load(Path::new(MODEL)).unwrap();
    let got = logit_bits(&model);
    assert_eq!(got.len(), want.len());
    let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{differ} of {} logits differ from x86-64's on {}", want.len(), std::env::consts::ARCH);
}

#[test]
fn training_it_again_writes_the_same_bytes() {
    if writing_fixtures() {
        return; // the other test is writing the fixture it compares with
    }
    let out = std::env::temp_dir().join(format!("svp-cross-platform-{}.svpm", std::process::id()));
    train_and_save(&out);
    let got = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    let want = std::fs::read(MODEL).unwrap();
    assert!(got == want, "training on {} wrote other bytes than x86-64 did", std::env::consts::ARCH);
}
