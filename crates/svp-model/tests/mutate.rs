//! Thousands of damaged model (MLP, conv, ViT) and checkpoint files: every one is a clean error
//! (or, where the damage hit only padding, a file that still works). Half of
//! the mutants get their checksum repaired, so the decoder's own checks (the
//! metadata's lengths, shapes, offsets, values) are reached, not only the
//! checksum.

use std::path::Path;
use svp_model::{Checkpoint, DType, InferenceModel, InferenceWorkspace, ModelFile, ModelInfo, Provenance, fnv1a64};
use svp_rng::{Purpose, Stream, StreamKey};
use svp_train::config::ModelConfig;
use svp_train::{Network, ProjectionHeads};

fn sample(dtype: DType) -> Vec<u8> {
    let cfg = ModelConfig { activation: svp_nn::Activation::Gelu, ..ModelConfig::mlp(vec![7, 5]) };
    let m = Network::new(12, 4, &cfg, 3);
    ModelFile::from_mlp(&m, info((3, 4)), dtype).to_bytes()
}

/// Version-2 files: a small conv network and a small ViT on 4x4 images.
fn front_sample(vit: bool, dtype: DType) -> Vec<u8> {
    use svp_train::config::{ConvItem, PoolMarker, VitConfig};
    let mut cfg = ModelConfig::mlp(vec![]);
    if vit {
        let readout = svp_nn::vit::TokenReadout::Cls;
        cfg.vit = Some(VitConfig { patch: 2, dim: 4, depth: 1, heads: 2, mlp: 8, readout });
    } else {
        cfg.conv = vec![ConvItem::Channels(2), ConvItem::Pool(PoolMarker::M), ConvItem::Channels(3)];
    }
    let m = Network::try_for_images((4, 4), 4, &cfg, 3).unwrap();
    ModelFile::from_network(&m, &cfg, info((4, 4)), dtype).to_bytes()
}

/// What the sample files carry besides their weights, for `image_shape` images.
fn info(image_shape: (usize, usize)) -> ModelInfo {
    ModelInfo {
        heads: Some(ProjectionHeads { seed: 3, dim: 4, sigma: None, dropout: 0.0, label_classes: None }),
        norm: svp_data::Normalization { mean: 0.2, std: 0.3 },
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

fn mutate(s: &mut Stream, original: &[u8]) -> Vec<u8> {
    let mut b = original.to_vec();
    match s.below(6) {
        0 => {
            for _ in 0..1 + s.below(8) {
                let i = s.below(b.len() as u64) as usize;
                b[i] ^= 1 << s.below(8);
            }
        }
        1 => b.truncate(s.below(b.len() as u64) as usize),
        2 => {
            // An absurd length or offset in the header or the metadata.
            let i = s.below(b.len().saturating_sub(8) as u64) as usize;
            let v = [u64::MAX, u32::MAX as u64, 1 << 40, 0, s.next_u64()][s.below(5) as usize];
            b[i..i + 8].copy_from_slice(&v.to_le_bytes());
        }
        3 => {
            let i = s.below(b.len() as u64) as usize;
            let n = 1 + s.below(64) as usize;
            b.splice(i..i, std::iter::repeat_n(0xAB, n));
        }
        4 => {
            let i = s.below(b.len() as u64) as usize;
            let n = (1 + s.below(16) as usize).min(b.len() - i);
            b.drain(i..i + n);
        }
        _ => {
            // Metadata bytes only: postcard's varints and lengths.
            let i = 64 + s.below(200.min(b.len().saturating_sub(64)) as u64) as usize;
            if i < b.len() {
                b[i] = s.next_u64() as u8;
            }
        }
    }
    b
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
        .chain(dtypes.into_iter().flat_map(|d| [(front_sample(false, d), 16), (front_sample(true, d), 16)]))
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

#[test]
fn mutated_checkpoints_never_panic() {
    let state = svp_train::FitState {
        epoch: 3,
        next_batch: 1,
        loss_sum: 2.0,
        samples: 64,
        history: vec![(1, 0.7, 0.8), (2, 0.5, 0.85)],
        params: (0..300).map(|i| i as f32 * 0.01).collect(),
        trainer: svp_train::TrainerState {
            step: 40,
            optimizer: vec![
                svp_optim::LayerState {
                    steps: 40,
                    moments: svp_optim::Moments::F32 { m: vec![0.1; 100], v: vec![0.2; 100] },
                },
                svp_optim::LayerState {
                    steps: 40,
                    moments: svp_optim::Moments::Bf16 { m: vec![0x3dcc; 50], v: vec![0x3e4c; 50] },
                },
            ],
        },
    };
    let c = Checkpoint { config_json: "{\"a\":1}".into(), data_origin: "d".into(), train_len: 64, state };
    let original = c.to_bytes();
    let mut s = Stream::new(StreamKey::new(12, Purpose::Shuffle, 0, 0, 0));
    let (mut rejected, mut same, mut changed) = (0, 0, 0);
    for round in 0..3000 {
        let mut b = mutate(&mut s, &original);
        let repaired = s.below(2) == 0 && b.len() >= 28;
        if repaired {
            let sum = fnv1a64(&[&b[28..]]);
            b[20..28].copy_from_slice(&sum.to_le_bytes());
            let len = (b.len() - 28) as u64;
            b[12..20].copy_from_slice(&len.to_le_bytes());
        }
        match Checkpoint::from_bytes(&b, Path::new("ck")) {
            Err(e) => {
                assert!(!e.to_string().contains('\n'));
                rejected += 1;
            }
            Ok(back) => {
                // The header's magic, version and length are checked and the
                // checksum covers the payload: with the checksum as it was,
                // nothing but the original comes back.
                assert!(repaired || back == c, "round {round}: damage accepted");
                assert!(back.state.params.iter().all(|v| v.is_finite()), "round {round}");
                if back == c {
                    same += 1;
                } else {
                    changed += 1;
                }
            }
        }
    }
    eprintln!(
        "3000 mutants: {rejected} rejected, {same} the same checkpoint, {changed} other values under a repaired checksum"
    );
    assert!(rejected > 2000);
}
