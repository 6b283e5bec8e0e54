//! Checkpoints written before bf16 moments (format version 1) still load.
//!
//! The fixture was written by the build before version 2 (commit 5769686):
//! `svp train` with `hidden = [8]`, Adam (lr 1e-3), batch 64, a constant
//! schedule, `--data embedded --limit-train 1000 --epochs 1 --checkpoint`.

use std::path::Path;
use svp_model::Checkpoint;
use svp_optim::Moments;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1-adam.ckpt");

#[test]
fn a_version_1_checkpoint_loads_with_its_adam_moments() {
    let bytes = std::fs::read(FIXTURE).unwrap();
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1, "the fixture is a version-1 file");
    let c = Checkpoint::from_bytes(&bytes, Path::new(FIXTURE)).unwrap();
    let s = &c.state;
    assert_eq!((s.epoch, s.next_batch, s.trainer.step), (2, 0, 16), "after one epoch of 1000 samples in batches of 64");
    // 784-8-10 with LayerNorm: hidden block W, b, gamma, beta; then the head.
    let lens = [784 * 8 + 3 * 8, 8 * 10 + 10];
    assert_eq!(s.params.len(), lens.iter().sum::<usize>());
    assert_eq!(s.trainer.optimizer.len(), 2);
    for (layer, len) in s.trainer.optimizer.iter().zip(lens) {
        assert_eq!(layer.steps, 16);
        let Moments::F32 { m, v } = &layer.moments else { panic!("Adam's moments, as f32: {:?}", layer.moments) };
        assert!(m.len() == len && v.len() == len);
        assert!(v.iter().all(|&x| x >= 0.0) && v.iter().any(|&x| x > 0.0), "a trained second moment");
        assert!(m.iter().any(|&x| x != 0.0), "a trained first moment");
    }
    // Saved again, it is a version-2 file with the same content.
    let again = c.to_bytes();
    assert_eq!(u32::from_le_bytes(again[8..12].try_into().unwrap()), 2);
    assert_eq!(Checkpoint::from_bytes(&again, Path::new("again")).unwrap(), c);
    // `save` streams the payload into the file: the same bytes.
    let path = std::env::temp_dir().join(format!("svp-ckpt-save-{}.ckpt", std::process::id()));
    c.save(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), again);
    std::fs::remove_file(&path).unwrap();
}
