//! Model files: round trips in every dtype, streaming, damage, bounds.

use super::*;
use std::path::Path;
use svp_net::{ConvItem, MobileItem, ModelConfig, Network, PoolMarker, VitConfig};
use svp_nn::vit::TokenReadout;

pub(crate) fn sample(dtype: DType) -> ModelFile {
    let cfg = sample_cfg();
    let m = Network::new(6, 3, &cfg, 9);
    let info = ModelInfo {
        heads: Some(ProjectionHeads { seed: 9, dim: 3, sigma: None, dropout: 0.0, label_classes: None }),
        units: None,
        norm: Normalization { mean: 0.3, std: 0.4 },
        image_shape: (2, 3),
        class_names: vec!["a".into(), "b".into(), "c".into()],
        provenance: Provenance { method: "svp".into(), epochs: 1, test_acc: 0.5, data: "test".into() },
    };
    ModelFile::from_mlp(&m, info, dtype)
}

#[test]
fn round_trip_every_dtype_with_aligned_tensors() {
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::I8] {
        let f = sample(dtype);
        let bytes = f.to_bytes();
        let back = ModelFile::from_bytes(&bytes, Path::new("m")).unwrap();
        assert_eq!(back, f);
        let data_offset = u64::from_le_bytes(bytes[32..40].try_into().unwrap()) as usize;
        assert_eq!(data_offset % ALIGN, 0);
        for t in &back.meta.tensors {
            assert_eq!((data_offset + t.offset as usize) % ALIGN, 0, "{t:?}");
        }
        assert_eq!(back.meta.weight_dtype(), dtype);
    }
    let f32_file = sample(DType::F32);
    assert_eq!(f32_file.to_network().params(), Network::new(6, 3, &sample_cfg(), 9).params());
}

fn sample_cfg() -> ModelConfig {
    ModelConfig::mlp(vec![5, 4])
}

/// `save` streams the file; it must be `to_bytes` exactly.
#[test]
fn a_saved_file_is_its_bytes() {
    let dir = std::env::temp_dir().join(format!("svp-model-save-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for dtype in [DType::F32, DType::I8] {
        let f = sample(dtype);
        let path = dir.join("m.svpm");
        f.save(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), f.to_bytes(), "{dtype:?}");
        assert_eq!(ModelFile::load(&path).unwrap(), f);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A network streamed to a file (as training saves each epoch) gives the
/// bytes of the file built in memory: MLP, conv and ViT, every dtype.
#[test]
fn a_streamed_network_is_the_file_built_in_memory() {
    let dir = std::env::temp_dir().join(format!("svp-model-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.svpm");
    let mut cases = front_configs();
    cases.push(("mlp", sample_cfg()));
    for (name, config) in cases {
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::I8] {
            let (net, file) = front_file(&config, dtype);
            let info = ModelInfo { class_names: file.meta.class_names.clone(), ..front_info() };
            ModelFile::save_network(&path, &net, &config, info, dtype).unwrap();
            let (a, b) = (std::fs::read(&path).unwrap(), file.to_bytes());
            let first = a.iter().zip(&b).position(|(x, y)| x != y);
            assert!(a == b, "{name} {dtype:?}: {} vs {} bytes, first difference at {first:?}", a.len(), b.len());
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn damaged_files_are_errors() {
    let bytes = sample(DType::I8).to_bytes();
    let p = Path::new("m");
    for cut in [0, 7, 63, 64, 100, bytes.len() - 1] {
        assert!(ModelFile::from_bytes(&bytes[..cut], p).is_err(), "truncated at {cut}");
    }
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x40;
        assert!(ModelFile::from_bytes(&b, p).is_err(), "flip at {i}");
    }
    let mut nan = sample(DType::F32);
    let t = nan.meta.tensors[0].clone();
    nan.data[t.offset as usize..t.offset as usize + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let err = ModelFile::from_bytes(&nan.to_bytes(), p).unwrap_err().to_string();
    assert!(err.contains("not finite"), "{err}");
    let mut wrong_shape = sample(DType::F32);
    wrong_shape.meta.tensors[0].shape = vec![4, 6];
    let err = ModelFile::from_bytes(&wrong_shape.to_bytes(), p).unwrap_err().to_string();
    assert!(err.contains("architecture needs"), "{err}");
    let mut v5 = bytes.clone();
    v5[8] = 5;
    let err = ModelFile::from_bytes(&v5, p).unwrap_err().to_string();
    assert!(err.contains("format version 5"), "{err}");
}

pub(crate) fn front_configs() -> Vec<(&'static str, ModelConfig)> {
    let mut cnn = ModelConfig::mlp(vec![6]);
    cnn.conv = vec![ConvItem::Channels(3), ConvItem::Pool(PoolMarker::M), ConvItem::Channels(4)];
    let mut vit = ModelConfig::mlp(vec![]);
    vit.vit = Some(VitConfig {
        patch: 4,
        dim: 8,
        depth: 2,
        heads: 2,
        mlp: 16,
        readout: TokenReadout::Mean,
        norm_eps: svp_nn::layer_norm::LAYER_NORM_EPS,
    });
    // A conv stem, a stride-2 expanding block, a residual one.
    let mut mobile = ModelConfig::mlp(vec![]);
    mobile.conv = vec![ConvItem::Channels(3)];
    mobile.mobile =
        vec![MobileItem { channels: 4, expansion: 2, stride: 2 }, MobileItem { channels: 4, expansion: 3, stride: 1 }];
    // timm's LayerNorm epsilon and the class token (format version 4).
    let mut timm_vit = vit.clone();
    timm_vit.vit = timm_vit.vit.map(|v| VitConfig { norm_eps: 1e-6, readout: TokenReadout::Cls, ..v });
    vec![("cnn", cnn), ("vit", vit), ("mobile", mobile), ("timm-vit", timm_vit)]
}

pub(crate) fn front_file(config: &ModelConfig, dtype: DType) -> (Network, ModelFile) {
    let mut net = Network::try_for_images((8, 8), 3, config, 4).unwrap();
    // Non-trivial BatchNorm running statistics and LayerNorm gains.
    for (i, p) in net.params_mut().iter_mut().enumerate() {
        *p += 0.01 * (i % 7) as f32;
    }
    let file = ModelFile::from_network(&net, config, front_info(), dtype);
    (net, file)
}

fn front_info() -> ModelInfo {
    ModelInfo {
        heads: Some(ProjectionHeads { seed: 4, dim: 5, sigma: None, dropout: 0.0, label_classes: None }),
        units: None,
        norm: Normalization { mean: 0.2, std: 0.5 },
        image_shape: (8, 8),
        class_names: vec![],
        provenance: Provenance { method: "svp".into(), epochs: 1, test_acc: 0.5, data: "test".into() },
    }
}

/// SVP+'s unit layout is kept (format version 4, for any network); plain
/// SVP's is what a file without one implies, so it is not stored and the
/// file keeps its old version.
#[test]
fn unit_layouts_round_trip() {
    let plain = sample(DType::F32);
    let mut info = plain.meta.info();
    for (units, version, stored) in [
        (UnitLayout { layers_per_unit: 2, head_joins_last_unit: true }, 4, true),
        (UnitLayout { layers_per_unit: 1, head_joins_last_unit: true }, 4, true),
        (UnitLayout::PLAIN, 1, false),
    ] {
        info.units = Some(units);
        let file = ModelFile::from_mlp(&plain.to_network(), info.clone(), DType::F32);
        let bytes = file.to_bytes();
        assert_eq!(bytes[8], version, "{units:?}");
        let back = ModelFile::from_bytes(&bytes, Path::new("m")).unwrap();
        assert_eq!(back.meta.units, stored.then_some(units), "{units:?}");
        assert_eq!(back, file);
    }
}

/// A conv network, a ViT and a mobile network survive the trip to bytes
/// and back in every dtype, as version-2 files (version 3 with mobile
/// blocks, 4 for a ViT with timm's LayerNorm epsilon) that rebuild the same
/// network; an MLP stays version 1.
#[test]
fn conv_and_vit_files_round_trip() {
    for (name, config) in front_configs() {
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::I8] {
            let (net, file) = front_file(&config, dtype);
            let bytes = file.to_bytes();
            let version = match name {
                "mobile" => 3,
                "timm-vit" => 4,
                _ => 2,
            };
            assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), version, "{name}");
            let back = ModelFile::from_bytes(&bytes, Path::new("m")).unwrap();
            assert_eq!(back, file, "{name} {dtype:?}");
            assert_eq!(back.model_config(), config, "{name} {dtype:?}");
            let rebuilt = back.to_network();
            assert_eq!(rebuilt.n_layers(), net.n_layers(), "{name}");
            if dtype == DType::F32 {
                assert_eq!(rebuilt.params(), net.params(), "{name}: f32 keeps every bit");
            } else {
                // Each dtype's own rounding: half an ulp of f16 (11
                // significant bits) or bf16 (8), relative to the value;
                // int8 half a step of its row's scale (at most the
                // largest weight / 254), and f16 for the front it keeps.
                let largest = net.params().iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let bound = |b: f32| match dtype {
                    DType::F16 => b.abs() * 2f32.powi(-11) + 2f32.powi(-25),
                    DType::BF16 => b.abs() * 2f32.powi(-8),
                    _ => (largest / 254.0).max(b.abs() * 2f32.powi(-11) + 2f32.powi(-25)) * 1.0001,
                };
                for (i, (a, b)) in rebuilt.params().iter().zip(net.params()).enumerate() {
                    assert!((a - b).abs() <= bound(*b), "{name} {dtype:?}: parameter {i} is {a}, was {b}");
                }
            }
        }
    }
    assert_eq!(sample(DType::F32).to_bytes()[8], 1, "an MLP is still written as version 1");
}

/// Damaged version-2 files are errors: a front that does not match the
/// tensors, and a front too large for the file (refused before anything
/// is allocated for it); and version-4 ones: a ViT epsilon that is not a
/// positive number, or one in a file without a ViT.
#[test]
fn damaged_front_files_are_errors() {
    let timm = &front_configs()[3].1;
    let (_, mut file) = front_file(timm, DType::F32);
    file.meta.vit_norm_eps = Some(-1e-6);
    let err = ModelFile::from_bytes(&file.to_bytes(), Path::new("m")).unwrap_err().to_string();
    assert!(err.contains("ViT LayerNorm epsilon -0.000001"), "{err}");
    let (_, mut cnn) = front_file(&front_configs()[0].1, DType::F32);
    cnn.meta.vit_norm_eps = Some(1e-6);
    let err = ModelFile::from_bytes(&cnn.to_bytes(), Path::new("m")).unwrap_err().to_string();
    assert!(err.contains("a LayerNorm epsilon for a ViT, in a file without one"), "{err}");
    let p = Path::new("m");
    let (_, file) = front_file(&front_configs()[0].1, DType::F32);
    let mut wider = file.clone();
    wider.meta.front = Some(Front::Conv { blocks: vec![(5, true), (4, false)], readout: 2 });
    let err = ModelFile::from_bytes(&wider.to_bytes(), p).unwrap_err().to_string();
    assert!(err.contains("architecture needs"), "{err}");
    let mut huge = file.clone();
    huge.meta.front = Some(Front::Conv { blocks: vec![(60_000, false); 40], readout: 2 });
    let err = ModelFile::from_bytes(&huge.to_bytes(), p).unwrap_err().to_string();
    assert!(err.contains("far fewer"), "{err}");
    let mut bad_patch = file.clone();
    bad_patch.meta.front = Some(Front::Vit { patch: 3, dim: 8, depth: 1, heads: 2, mlp: 8, mean_readout: false });
    let err = ModelFile::from_bytes(&bad_patch.to_bytes(), p).unwrap_err().to_string();
    assert!(err.contains("does not divide"), "{err}");
    let mut no_front = file.to_bytes();
    no_front[8] = 1; // a version-1 header on a file with a front
    assert!(ModelFile::from_bytes(&no_front, p).is_err());
    // Each bound of the front's numbers, just past it (the largest legal
    // values are far too large to build in a test).
    let vit = |patch, dim, depth, heads, mlp| Front::Vit { patch, dim, depth, heads, mlp, mean_readout: false };
    let cases = [
        (Front::Conv { blocks: vec![(0, false)], readout: 2 }, "front: conv channels = 0"),
        (Front::Conv { blocks: vec![(4, false), (65_537, false)], readout: 2 }, "front: conv channels = 65537"),
        (Front::Conv { blocks: vec![(4, false)], readout: 0 }, "front: conv readout = 0"),
        (Front::Conv { blocks: vec![(4, false)], readout: 65_537 }, "front: conv readout = 65537"),
        (Front::Conv { blocks: vec![], readout: 2 }, "front: 0 conv blocks"),
        (Front::Conv { blocks: vec![(1, false); 4097], readout: 2 }, "front: 4097 conv blocks"),
        (vit(0, 8, 1, 2, 8), "front: patch = 0"),
        (vit(4, 8, 65_537, 2, 8), "front: depth = 65537"),
        (vit(4, 8, 1, 0, 8), "front: heads = 0"),
        (vit(4, 65_537, 1, 1, 8), "front: dim = 65537"),
        (vit(4, 8, 1, 3, 8), "front: dim 8 is not a multiple of 3 heads"),
        (vit(4, 8, 1, 2, 0), "front: mlp = 0"),
        (Front::Mobile { conv: vec![], blocks: vec![(4, 2, 3)], readout: 2 }, "front: mobile stride = 3"),
        (Front::Mobile { conv: vec![], blocks: vec![(0, 2, 1)], readout: 2 }, "front: mobile channels = 0"),
        (Front::Mobile { conv: vec![(3, false)], blocks: vec![], readout: 2 }, "front: 1 conv and 0 mobile blocks"),
    ];
    for (front, want) in cases {
        let mut damaged = file.clone();
        damaged.meta.front = Some(front);
        let err = ModelFile::from_bytes(&damaged.to_bytes(), p).unwrap_err().to_string();
        assert!(err.ends_with(want), "{err}\nwanted: {want}");
    }
}

/// Each check of the metadata against itself and the data section, hit
/// on its own: a file damaged there (with its checksum made whole again)
/// is refused with that check's message.
#[test]
fn every_metadata_check_refuses_by_name() {
    let original = sample(DType::I8);
    let p = Path::new("m");
    let refuse = |edit: &dyn Fn(&mut ModelFile), want: &str| {
        let mut f = original.clone();
        edit(&mut f);
        let err = ModelFile::from_bytes(&f.to_bytes(), p).unwrap_err().to_string();
        assert!(err.contains(want), "{err}\nwanted: {want}");
    };
    refuse(&|f| f.meta.layers.clear(), "0 layers");
    refuse(&|f| f.meta.layers[0].in_dim = 0, "layer 1 has width 0 -> 5");
    refuse(&|f| f.meta.layers[1].out_dim = 0, "layer 2 has width 5 -> 0");
    refuse(&|f| f.meta.layers[0].in_dim = (1 << 24) + 1, "layer 1 has width 16777217 -> 5");
    refuse(&|f| f.meta.layers[2].out_dim = (1 << 24) + 1, "layer 3 has width 4 -> 16777217");
    refuse(&|f| f.meta.layers[0].dropout = 1.0, "layer 1 has dropout 1");
    refuse(&|f| f.meta.layers[1].in_dim = 6, "layer 1 outputs 5 values but layer 2 takes 6");
    refuse(&|f| f.meta.image_shape = (3, 3), "image shape 3x3 does not match input width 6");
    refuse(&|f| f.meta.class_names.pop().map_or((), drop), "2 class names for 3 classes");
    refuse(&|f| f.meta.norm.std = 0.0, "input normalization is not finite and positive");
    refuse(&|f| f.meta.norm.mean = f32::NAN, "input normalization is not finite and positive");
    refuse(&|f| f.meta.generator = "another".into(), "projections were made by generator \"another\"");
    refuse(&|f| f.meta.heads.as_mut().unwrap().dim = 0, "projection width 0");
    refuse(&|f| f.meta.heads.as_mut().unwrap().dim = (1 << 20) + 1, "projection width 1048577");
    refuse(&|f| f.meta.tensors.pop().map_or((), drop), "tensors listed, the architecture has");
    refuse(&|f| f.meta.tensors[1].shape = vec![4], "layer 1 Bias: shape [4] where the architecture needs [5]");
    refuse(&|f| f.meta.tensors[0].offset += 1, "layer 1 Weight: 30 bytes at offset 1 overrun the data section");
    refuse(&|f| f.meta.tensors[0].offset = f.data.len() as u64, "overrun the data section");
    refuse(&|f| f.meta.tensors[0].scale_offset = None, "layer 1 Weight: int8 without scales");
    refuse(&|f| f.meta.tensors[0].scale_offset = Some(f.data.len() as u64), "layer 1 Weight: scales overrun");
    refuse(&|f| f.meta.tensors[0].scale_offset = Some(1), "layer 1 Weight: scales overrun");
    refuse(&|f| f.meta.tensors[1].scale_offset = Some(0), "layer 1 Bias: scales on a f32 tensor");
    refuse(
        &|f| {
            let at = f.meta.tensors[1].offset as usize;
            f.data[at..at + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
        },
        "layer 1 Bias: value 0 is not finite",
    );
}

/// Each header bound, one past it: a declared length or offset beyond
/// the file, or metadata beyond its limit, is refused by name.
#[test]
fn header_bounds_are_checked_one_by_one() {
    let bytes = sample(DType::F32).to_bytes();
    let p = Path::new("m");
    let set = |at: usize, v: u64| {
        let mut b = bytes.clone();
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        ModelFile::from_bytes(&b, p).unwrap_err().to_string()
    };
    let len = bytes.len() as u64;
    let (meta_len, data_offset) =
        (u64::from_le_bytes(bytes[24..32].try_into().unwrap()), u64::from_le_bytes(bytes[32..40].try_into().unwrap()));
    let meta_end = HEADER_LEN as u64 + meta_len;
    for (at, v, want) in [
        (16, HEADER_LEN as u64 + 1, "metadata at"),       // not right after the header
        (24, MAX_META + 1, "metadata at"),                // over its limit
        (24, len - HEADER_LEN as u64 + 1, "metadata at"), // past the end
        (24, len - HEADER_LEN as u64, "is misplaced"),    // up to the end: the data then overlaps it
        (32, data_offset + 1, "is misplaced"),            // data not aligned
        (32, meta_end.next_multiple_of(ALIGN as u64) - ALIGN as u64, "is misplaced"), // data over the metadata
        (32, len.next_multiple_of(ALIGN as u64) + ALIGN as u64, "is misplaced"), // data past the end
        (40, len - data_offset + 1, "does not end"),      // data longer than the file
    ] {
        let err = set(at, v);
        assert!(err.contains(want), "field at {at} = {v}: {err}\nwanted: {want}");
    }
}
