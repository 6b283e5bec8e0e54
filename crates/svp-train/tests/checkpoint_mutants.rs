//! Thousands of damaged checkpoint files: every one is a clean error, or,
//! under a repaired checksum, finite values. Half of the mutants get their
//! checksum repaired, so the decoder's own checks are reached.

use std::path::Path;
use svp_model::fnv1a64;
use svp_rng::{Purpose, Stream, StreamKey};
use svp_train::Checkpoint;

#[path = "../../svp-model/tests/common/mutate.rs"]
mod mutation;
use mutation::mutate;

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
