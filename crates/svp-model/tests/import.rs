//! PyTorch models imported from safetensors give PyTorch's logits and
//! accuracy, export back to the same tensors, and bad files are one-line
//! errors. The fixtures come from `tools/golden/import_models.py`: an MLP and
//! a CNN of svp's layer kinds, and timm's ViT, trained one epoch on the
//! embedded subset.

use serde_json::Value;
use std::path::Path;
use svp_model::pytorch::{ImportOptions, export, import};
use svp_model::{InferenceModel, InferenceWorkspace, ModelFile};
use svp_net::{ConvItem, ModelConfig, PoolMarker, VitConfig};
use svp_nn::vit::TokenReadout;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn golden() -> Value {
    let text = std::fs::read_to_string(format!("{FIXTURES}/torch-import.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn config(name: &str) -> ModelConfig {
    match name {
        "mlp" => ModelConfig::mlp(vec![64, 32]),
        "vit" => ModelConfig {
            // timm's ViT as timm makes it: LayerNorm epsilon 1e-6.
            vit: Some(VitConfig {
                patch: 7,
                dim: 32,
                depth: 2,
                heads: 2,
                mlp: 64,
                readout: TokenReadout::Cls,
                norm_eps: 1e-6,
            }),
            ..ModelConfig::mlp(vec![])
        },
        _ => ModelConfig {
            conv: vec![
                ConvItem::Channels(4),
                ConvItem::Pool(PoolMarker::M),
                ConvItem::Channels(8),
                ConvItem::Pool(PoolMarker::M),
            ],
            ..ModelConfig::mlp(vec![])
        },
    }
}

fn options(g: &Value) -> ImportOptions {
    ImportOptions {
        image_shape: (28, 28),
        norm: svp_net::Normalization {
            mean: g["mean"].as_f64().unwrap() as f32,
            std: g["std"].as_f64().unwrap() as f32,
        },
        class_names: vec![],
        rename: vec![],
        heads: None,
        source: "torch".into(),
    }
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/torch-{name}.safetensors")).unwrap()
}

fn imported(name: &str) -> ModelFile {
    let g = golden();
    import(&fixture(name), Path::new(name), &config(name), 10, options(&g)).unwrap()
}

/// The embedded test images, preprocessed as the model file says.
fn test_images(model: &InferenceModel) -> (Vec<f32>, Vec<u8>) {
    let data = svp_data::DataSplit::embedded();
    let norm = model.meta().norm;
    let x = data.test.images.iter().map(|&p| (p as f32 / 255.0 - norm.mean) / norm.std).collect();
    (x, data.test.labels)
}

#[test]
fn imported_models_give_pytorchs_logits_and_accuracy() {
    let g = golden();
    for name in ["mlp", "cnn", "vit"] {
        let model = InferenceModel::new(imported(name));
        let (x, labels) = test_images(&model);
        let mut ws = InferenceWorkspace::default();
        let logits = model.predict(&x, labels.len(), None, &mut ws).to_vec();
        let mut worst = 0.0f64;
        for (row, want) in g[name]["logits"].as_array().unwrap().iter().enumerate() {
            let want: Vec<f64> = want.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let got = &logits[row * 10..(row + 1) * 10];
            for (a, b) in got.iter().zip(&want) {
                worst = worst.max((*a as f64 - b).abs());
            }
            let argmax = |v: &[f64]| (0..10).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap();
            assert_eq!(argmax(&got.iter().map(|&v| v as f64).collect::<Vec<_>>()), argmax(&want), "{name} image {row}");
        }
        eprintln!("{name}: worst logit difference from PyTorch {worst:.2e}");
        assert!(worst < 1e-4, "{name}: logits {worst} away from PyTorch's");
        let correct = logits
            .chunks(10)
            .zip(&labels)
            .filter(|(row, y)| (0..10).max_by(|&i, &j| row[i].total_cmp(&row[j])).unwrap() == **y as usize);
        let accuracy = correct.count() as f64 / labels.len() as f64;
        let want = g[name]["test_acc"].as_f64().unwrap();
        eprintln!("{name}: test accuracy {accuracy:.4} in svp, {want:.4} in PyTorch");
        assert!((accuracy - want).abs() <= 0.001, "{name}: {accuracy} against PyTorch's {want}");
    }
}

/// The LayerNorm epsilon matters: timm's ViT read with PyTorch's default
/// `1e-5` in place of its `1e-6` is far off PyTorch's logits (its class
/// token starts at a small variance, where the epsilon weighs).
#[test]
fn a_vit_at_the_wrong_layer_norm_epsilon_is_off() {
    let g = golden();
    let mut config = config("vit");
    config.vit.as_mut().unwrap().norm_eps = svp_nn::layer_norm::LAYER_NORM_EPS;
    let file = import(&fixture("vit"), Path::new("vit"), &config, 10, options(&g)).unwrap();
    let model = InferenceModel::new(file);
    let (x, labels) = test_images(&model);
    let logits = model.predict(&x, labels.len(), None, &mut InferenceWorkspace::default()).to_vec();
    let want: Vec<f64> = g["vit"]["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().clone())
        .map(|v| v.as_f64().unwrap())
        .collect();
    let worst = logits.iter().zip(&want).map(|(&a, b)| (a as f64 - b).abs()).fold(0.0, f64::max);
    eprintln!("vit at eps 1e-5: worst logit difference {worst:.2e}");
    assert!(worst > 1e-3, "{worst}");
}

/// Import, then export: the same tensors under the same names, byte for byte
/// (PyTorch's `num_batches_tracked` counts are not weights and are not written).
#[test]
fn export_gives_back_the_imported_tensors() {
    for name in ["mlp", "cnn", "vit"] {
        let original = fixture(name);
        let exported = export(&imported(name)).unwrap();
        let (a, b) = (
            safetensors::SafeTensors::deserialize(&original).unwrap(),
            safetensors::SafeTensors::deserialize(&exported).unwrap(),
        );
        let mut names: Vec<&str> = a.names().into_iter().filter(|n| !n.ends_with("num_batches_tracked")).collect();
        names.sort();
        let mut back = b.names();
        back.sort();
        assert_eq!(names, back, "{name}");
        for n in names {
            let (x, y) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
            assert_eq!((x.shape(), x.data()), (y.shape(), y.data()), "{name}: tensor {n}");
        }
        // The metadata carries what svp needs to read the weights back.
        let (_, meta) = safetensors::SafeTensors::read_metadata(&exported).unwrap();
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta["svp.image_shape"], "28x28");
        assert_eq!(meta["svp.input_mean"], "0.286");
    }
}

/// Other layouts: without the leading Flatten (indices shifted by one) the
/// modules match by their order; torchvision-style names match after a rename.
#[test]
fn other_layouts_match_by_order_or_by_rename() {
    let g = golden();
    let bytes = fixture("mlp");
    let original = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let reference = imported("mlp");
    let relabel = |f: &dyn Fn(&str) -> String| {
        let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> =
            original.tensors().into_iter().map(|(n, v)| (f(&n), v)).collect();
        safetensors::serialize(tensors, None).unwrap()
    };
    let shifted = relabel(&|n| {
        let (i, rest) = n.split_once('.').unwrap();
        format!("model.{}.{rest}", i.parse::<usize>().unwrap() - 1)
    });
    let file = import(&shifted, Path::new("shifted"), &config("mlp"), 10, options(&g)).unwrap();
    assert_eq!(file, reference);
    let torchvision = relabel(&|n| {
        let (i, rest) = n.split_once('.').unwrap();
        let i: usize = i.parse().unwrap();
        if i < 7 { format!("features.{i}.{rest}") } else { format!("classifier.{}.{rest}", i - 7) }
    });
    // By order alone "classifier" sorts before "features": the head would be
    // read first, and its shape says so.
    let err = import(&torchvision, Path::new("tv"), &config("mlp"), 10, options(&g)).unwrap_err().to_string();
    assert!(err.contains("has shape [10, 32], layer 1's Linear weight needs [64, 784]"), "{err}");
    let rename = vec![("features.".to_string(), String::new()), ("classifier.0".to_string(), "7".to_string())];
    let file =
        import(&torchvision, Path::new("tv"), &config("mlp"), 10, ImportOptions { rename, ..options(&g) }).unwrap();
    assert_eq!(file, reference);
}

/// Each bad file is one line naming what is wrong.
#[test]
fn bad_files_are_one_line_errors() {
    let g = golden();
    let bytes = fixture("mlp");
    let try_import = |b: &[u8], cfg: &ModelConfig| {
        import(b, Path::new("w.safetensors"), cfg, 10, options(&g)).unwrap_err().to_string()
    };
    let mlp = config("mlp");
    let cases: Vec<(String, String)> = vec![
        (try_import(&bytes[..bytes.len() - 10], &mlp), "not a readable safetensors file".into()),
        (try_import(&bytes[..5], &mlp), "not a readable safetensors file".into()),
        (try_import(b"\xff\xff\xff\xff\xff\xff\xff\x7f{}", &mlp), "not a readable safetensors file".into()),
        (
            try_import(&bytes, &ModelConfig::mlp(vec![64, 16])),
            "tensor `4.weight` has shape [32, 64], layer 2's Linear weight needs [16, 64]".into(),
        ),
        (try_import(&bytes, &ModelConfig::mlp(vec![64])), "the file has 5 modules with parameters".into()),
        (try_import(&bytes, &ModelConfig { norm: svp_nn::Norm::None, ..mlp.clone() }), "the file has 5 modules".into()),
    ];
    for (err, needle) in cases {
        assert!(err.starts_with("cannot import w.safetensors: ") && err.contains(&needle), "{err}\nwanted: {needle}");
        assert!(!err.contains('\n'));
    }
    // A header that lies about an offset.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let lying = header.replacen("\"data_offsets\":[0,", "\"data_offsets\":[4,", 1);
    assert_ne!(lying, header);
    let mut bad = bytes.clone();
    bad[8..8 + n].copy_from_slice(lying.as_bytes());
    assert!(try_import(&bad, &mlp).contains("not a readable safetensors file"));
    // A dtype svp does not take, a missing tensor, an extra one.
    let original = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ints = vec![0u8; 10 * 8];
    let rebuilt = |skip: &str, extra: bool, int_bias: bool| {
        let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = original
            .tensors()
            .into_iter()
            .filter(|(n, _)| n != skip)
            .map(|(n, v)| {
                if int_bias && n == "7.bias" {
                    (n, safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![10], &ints).unwrap())
                } else {
                    (n, v)
                }
            })
            .collect();
        if extra {
            tensors.push(("7.scale".into(), original.tensor("7.bias").unwrap()));
        }
        safetensors::serialize(tensors, None).unwrap()
    };
    assert!(
        try_import(&rebuilt("", false, true), &mlp).contains("tensor `7.bias`: dtype I64; svp takes F32, F16 and BF16")
    );
    assert!(
        try_import(&rebuilt("2.bias", false, false), &mlp).contains("no tensor `2.bias` for layer 1's LayerNorm bias")
    );
    assert!(try_import(&rebuilt("", true, false), &mlp).contains("tensors the architecture has no place for: 7.scale"));
    // f16 and bf16 weights are widened.
    for dtype in [safetensors::Dtype::F16, safetensors::Dtype::BF16] {
        let narrow: Vec<(String, Vec<u8>, Vec<usize>)> = original
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                let bytes = v
                    .data()
                    .chunks_exact(4)
                    .flat_map(|b| {
                        let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        if dtype == safetensors::Dtype::F16 {
                            half::f16::from_f32(x).to_le_bytes()
                        } else {
                            half::bf16::from_f32(x).to_le_bytes()
                        }
                    })
                    .collect();
                (n, bytes, v.shape().to_vec())
            })
            .collect();
        let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = narrow
            .iter()
            .map(|(n, b, s)| (n.as_str(), safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap()))
            .collect();
        let file =
            import(&safetensors::serialize(views, None).unwrap(), Path::new("h"), &mlp, 10, options(&g)).unwrap();
        let (a, b) = (file.to_network(), imported("mlp").to_network());
        let worst =
            a.params().iter().zip(b.params()).map(|(x, y)| (x - y).abs() / (1e-3 + y.abs())).fold(0.0, f32::max);
        assert!(worst < 8e-3, "{dtype:?}: {worst}");
    }
}
