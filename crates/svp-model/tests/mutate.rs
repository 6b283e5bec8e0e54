//! Thousands of damaged model files (MLP, conv, ViT): every one is a clean error
//! (or, where the damage hit only padding, a file that still works). Half of
//! the mutants get their checksum repaired, so the decoder's own checks (the
//! metadata's lengths, shapes, offsets, values) are reached, not only the
//! checksum.

use std::path::Path;
use svp_model::{DType, InferenceModel, InferenceWorkspace, ModelFile, ModelInfo, Provenance, fnv1a64};
use svp_rng::{Purpose, Stream, StreamKey};

#[path = "common/mutate.rs"]
mod mutation;
use mutation::mutate;
use svp_net::{ModelConfig, Network, ProjectionHeads};

fn sample(dtype: DType) -> Vec<u8> {
    let cfg = ModelConfig { activation: svp_nn::Activation::Gelu, ..ModelConfig::mlp(vec![7, 5]) };
    let m = Network::new(12, 4, &cfg, 3);
    ModelFile::from_mlp(&m, info((3, 4)), dtype).to_bytes()
}

/// A small conv network and a small ViT on 4x4 images (version 2), and
/// the ViT at timm's LayerNorm epsilon, trained in SVP+ units (version 4).
fn front_sample(vit_norm_eps: Option<f32>, dtype: DType) -> Vec<u8> {
    use svp_net::{ConvItem, PoolMarker, VitConfig};
    let mut cfg = ModelConfig::mlp(vec![]);
    if let Some(norm_eps) = vit_norm_eps {
        let readout = svp_nn::vit::TokenReadout::Cls;
        cfg.vit = Some(VitConfig { patch: 2, dim: 4, depth: 1, heads: 2, mlp: 8, readout, norm_eps });
    } else {
        cfg.conv = vec![ConvItem::Channels(2), ConvItem::Pool(PoolMarker::M), ConvItem::Channels(3)];
    }
    let m = Network::try_for_images((4, 4), 4, &cfg, 3).unwrap();
    let mut info = info((4, 4));
    if vit_norm_eps == Some(1e-6) {
        // SVP+ units, the other version-4 field.
        info.units = Some(svp_net::UnitLayout { layers_per_unit: 2, head_joins_last_unit: true });
    }
    ModelFile::from_network(&m, &cfg, info, dtype).to_bytes()
}

/// What the sample files carry besides their weights, for `image_shape` images.
fn info(image_shape: (usize, usize)) -> ModelInfo {
    ModelInfo {
        heads: Some(ProjectionHeads { seed: 3, dim: 4, sigma: None, dropout: 0.0, label_classes: None }),
        units: None,
        norm: svp_net::Normalization { mean: 0.2, std: 0.3 },
        image_shape,
        class_names: vec![],
        provenance: Provenance { method: "svp".into(), epochs: 1, test_acc: 0.5, data: "fuzz".into() },
    }
}

fn repair_model_checksum(b: &mut [u8]) {
    if b.len() >= 64 {
        let sum = fnv1a64(&[&b[..48], &b[64..]]);
        b[48..56].copy_from_slice(&sum.to_le_bytes());
    }
}

/// Whether `mutant` differs from `original` anywhere outside `unchecked`
/// (the header bytes no checksum covers), a changed length included.
fn damaged_outside(mutant: &[u8], original: &[u8], unchecked: std::ops::Range<usize>) -> bool {
    mutant.len() != original.len()
        || mutant.iter().zip(original).enumerate().any(|(i, (a, b))| a != b && !unchecked.contains(&i))
}

/// Two inputs of `width` values, not all alike.
fn inputs(width: usize) -> Vec<f32> {
    (0..2 * width).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect()
}

#[test]
fn mutated_model_files_never_panic() {
    let mut s = Stream::new(StreamKey::new(11, Purpose::Shuffle, 0, 0, 0));
    let dtypes = [DType::F32, DType::F16, DType::BF16, DType::I8];
    // (file, input width)
    let originals: Vec<(Vec<u8>, usize)> = dtypes
        .into_iter()
        .map(|d| (sample(d), 12))
        .chain(dtypes.into_iter().flat_map(|d| {
            let eps = [None, Some(svp_nn::layer_norm::LAYER_NORM_EPS), Some(1e-6)];
            eps.map(|e| (front_sample(e, d), 16))
        }))
        .collect();
    // What each original predicts for the same two inputs.
    let predicted: Vec<Vec<f32>> = originals
        .iter()
        .map(|(bytes, width)| {
            let model = InferenceModel::new(ModelFile::from_bytes(bytes, Path::new("original")).unwrap());
            model.predict(&inputs(*width), 2, None, &mut InferenceWorkspace::default()).to_vec()
        })
        .collect();
    let (mut rejected, mut same, mut changed) = (0, 0, 0);
    for round in 0..9000 {
        let k = round % originals.len();
        let (original, width) = &originals[k];
        let mut b = mutate(&mut s, original);
        let repaired = s.below(2) == 0;
        if repaired {
            repair_model_checksum(&mut b);
        }
        match ModelFile::from_bytes(&b, Path::new("mutant")) {
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.starts_with("mutant is not a valid svp model file: ") && !msg.contains('\n'), "{msg}");
                rejected += 1;
            }
            Ok(file) => {
                // The checksum covers every byte but its own and the reserved
                // ones after it (48..64): damage anywhere else, with the
                // checksum left as it was, is always refused.
                assert!(repaired || !damaged_outside(&b, original, 48..64), "round {round}: damage accepted");
                let original_file = ModelFile::from_bytes(original, Path::new("original")).unwrap();
                let model = InferenceModel::new(file.clone());
                let out = model.predict(&inputs(*width), 2, None, &mut InferenceWorkspace::default()).to_vec();
                assert_eq!(out.len(), 2 * 4, "round {round}");
                if file == original_file {
                    // Damage confined to padding or reserved bytes: the same model.
                    assert!(out == predicted[k], "round {round}: the same model predicts otherwise");
                    same += 1;
                } else {
                    // A repaired checksum over changed values (a weight of
                    // 1e30, another activation: legal, if useless): another
                    // valid model, which runs.
                    assert!(repaired, "round {round}: changed values accepted without a repaired checksum");
                    changed += 1;
                }
            }
        }
    }
    eprintln!(
        "9000 mutants: {rejected} rejected, {same} the same model, {changed} other values under a repaired checksum"
    );
    assert!(rejected > 7500);
}
