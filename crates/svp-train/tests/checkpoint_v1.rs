//! Checkpoints written before bf16 moments (format version 1) still load.
//!
//! The fixture was written by the build before version 2 (commit 5769686):
//! `svp train` with `hidden = [8]`, Adam (lr 1e-3), batch 64, a constant
//! schedule, `--data embedded --limit-train 1000 --epochs 1 --checkpoint`.

use std::path::Path;
use svp_optim::Moments;
use svp_train::Checkpoint;

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
    // The values are the run's: the same run today (training is bit-exact,
    // and has not changed for this network since) gives every weight and
    // both moments of every layer bit for bit, so a decoder that swapped the
    // moments, mixed up layers or misread a value would fail here.
    let fresh = retrain_the_fixtures_run();
    assert_eq!(bits(&s.params), bits(&fresh.params), "weights");
    assert_eq!(s.trainer.step, fresh.trainer.step);
    for (l, (old, new)) in s.trainer.optimizer.iter().zip(&fresh.trainer.optimizer).enumerate() {
        let (Moments::F32 { m: m0, v: v0 }, Moments::F32 { m: m1, v: v1 }) = (&old.moments, &new.moments) else {
            panic!("layer {l}: f32 moments expected")
        };
        assert_eq!(bits(m0), bits(m1), "layer {l}: first moment");
        assert_eq!(bits(v0), bits(v1), "layer {l}: second moment");
        assert_eq!(old.steps, new.steps);
    }
    assert_eq!(s.history, fresh.history, "epoch 1's loss and accuracy");
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

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The fixture's run, with the checkpoint it wrote after its epoch.
fn retrain_the_fixtures_run() -> svp_train::FitState {
    struct Last(Option<svp_train::FitState>);
    impl svp_train::FitObserver for Last {
        fn on_checkpoint(&mut self, state: &svp_train::FitStateRef<'_>) -> Result<(), String> {
            self.0 = Some(state.to_owned_state());
            Ok(())
        }
    }
    let config: svp_train::Config = toml::from_str(
        "[model]\nhidden = [8]\n[train]\nepochs = 1\nbatch_size = 64\n[optimizer]\nkind = \"adam\"\nlr = 0.001\n\
         [schedule]\nkind = \"constant\"\n",
    )
    .unwrap();
    let mut data = svp_data::DataSplit::embedded();
    data.train.labels.truncate(1000);
    data.train.images.truncate(1000 * data.features());
    let mut last = Last(None);
    let options = svp_train::FitOptions { checkpoint_every: Some(0), ..Default::default() };
    let out = svp_train::fit_with(&config, &data, &mut last, options);
    assert!(out.diverged.is_none());
    last.0.expect("a checkpoint after the epoch")
}
