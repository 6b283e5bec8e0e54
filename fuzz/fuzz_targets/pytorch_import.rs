//! Any bytes given to `svp import`'s reader as a safetensors file: an error
//! or a model, never a panic (a small MLP and a small conv network).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use svp_model::pytorch::{ImportOptions, head_outputs, import};
use svp_train::config::{ConvItem, ModelConfig, PoolMarker};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz");
    let _ = head_outputs(data, path, &[]);
    let mlp = ModelConfig::mlp(vec![4]);
    let cnn = ModelConfig { conv: vec![ConvItem::Channels(2), ConvItem::Pool(PoolMarker::M)], ..ModelConfig::mlp(vec![]) };
    for config in [mlp, cnn] {
        let options = ImportOptions {
            image_shape: (4, 4),
            norm: svp_train::Normalization { mean: 0.0, std: 1.0 },
            class_names: vec![],
            rename: vec![],
            heads: None,
            source: "fuzz".into(),
        };
        let _ = import(data, path, &config, 3, options);
    }
});
