//! Power cuts at hundreds of random points of a fine-tuning run's checkpoint
//! writes: after every reboot a complete checkpoint is found, and no step
//! older than the checkpoint interval is lost.

use firmware_sim::flash::{Flash, FlashError};
use firmware_sim::store::{CheckpointStore, StoreError};
use svp_rng::{Purpose, Stream, StreamKey};

/// A stand-in training state: the step and a body whose bytes depend on it,
/// so a mixed-up or torn checkpoint cannot pass for a good one.
fn payload(step: u64, len: usize) -> Vec<u8> {
    let mut s = Stream::new(StreamKey::new(step, Purpose::Shuffle, 1, 0, 0));
    let mut p = step.to_le_bytes().to_vec();
    p.extend((0..len).map(|_| s.next_u64() as u8));
    p
}

fn step_of(p: &[u8]) -> u64 {
    u64::from_le_bytes(p[..8].try_into().unwrap())
}

#[test]
fn random_power_cuts_never_lose_a_checkpoint() {
    let dir = std::env::temp_dir().join(format!("svp-flash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let chip = dir.join("flash.bin");
    let _ = std::fs::remove_file(&chip);
    let (interval, len, flash_size) = (5u64, 3000usize, 16 * 1024u64);
    let mut rng = Stream::new(StreamKey::new(99, Purpose::Shuffle, 2, 0, 0));
    let (mut step, mut cuts, mut last_saved) = (0u64, 0, 0u64);
    while cuts < 300 {
        // Boot.
        let (mut store, found) = CheckpointStore::open(Flash::open(&chip, flash_size).unwrap()).unwrap();
        if let Some(f) = &found {
            assert_eq!(f.payload, payload(step_of(&f.payload), len), "a checkpoint came back damaged");
            let resumed = step_of(&f.payload);
            assert!(resumed >= last_saved, "lost checkpoint {last_saved}, resumed from {resumed}");
            assert!(step - resumed <= interval, "lost {} steps", step - resumed);
            step = resumed;
        } else {
            assert_eq!(last_saved, 0, "no checkpoint found after {last_saved} was saved");
            step = 0;
        }
        // Run until the power goes, somewhere in the next few checkpoint writes.
        store.flash_mut().arm_power_cut(rng.below(4 * (len as u64 + 40)));
        loop {
            step += 1;
            if step % interval == 0 {
                match store.save(&payload(step, len)) {
                    Ok(_) => last_saved = step,
                    Err(StoreError::Flash(FlashError::PowerCut(_))) => break,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        cuts += 1;
    }
    assert!(last_saved > 100, "the run made progress across {cuts} power cuts: {last_saved}");
    // A checkpoint larger than a slot is refused, not written.
    let (mut store, _) = CheckpointStore::open(Flash::open(&chip, flash_size).unwrap()).unwrap();
    assert!(matches!(store.save(&vec![0; 9000]), Err(StoreError::TooBig { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Where in a save the power goes, in the flash's units of work (a sector
/// erased, a byte programmed).
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// At the save's first operation (the erase of its slot).
    BeforeTheSave,
    /// After this many header bytes, the next one torn.
    HeaderByte(u64),
    /// With every byte but the payload's last programmed, that one torn.
    LastPayloadByte,
    /// Right after the save completed (it was acknowledged), before any
    /// other operation.
    AfterTheSave,
}

/// Power cut at each boundary of a save, save after save, so that each
/// slot is the one being written: every boot finds exactly the last
/// acknowledged save (its sequence and step, whole). A store that booted
/// from the older slot, or skipped erasing before it programs, fails here.
#[test]
fn cuts_at_the_boundaries_of_a_save_boot_the_last_acknowledged_save() {
    let dir = std::env::temp_dir().join(format!("svp-flash-edges-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let chip = dir.join("flash.bin");
    let _ = std::fs::remove_file(&chip);
    let (len, flash_size) = (3000usize, 16 * 1024u64);
    let sectors = (32 + 8 + len as u64).div_ceil(firmware_sim::flash::SECTOR);
    let cuts = [
        Cut::BeforeTheSave,
        Cut::HeaderByte(1),
        Cut::HeaderByte(31),
        Cut::HeaderByte(32),
        Cut::LastPayloadByte,
        Cut::AfterTheSave,
    ];
    let (mut acknowledged, mut step) = (None::<(u64, u64)>, 0u64);
    for round in 0..3 {
        for cut in cuts {
            let (mut store, found) = CheckpointStore::open(Flash::open(&chip, flash_size).unwrap()).unwrap();
            let booted = found.as_ref().map(|f| (f.sequence, step_of(&f.payload)));
            assert_eq!(booted, acknowledged, "round {round}, boot before {cut:?}");
            if let Some(f) = &found {
                assert_eq!(f.payload, payload(step_of(&f.payload), len), "the booted checkpoint is whole");
            }
            let units = match cut {
                Cut::BeforeTheSave => 0,
                Cut::HeaderByte(k) => sectors + k,
                Cut::LastPayloadByte => sectors + 32 + 8 + len as u64 - 1,
                Cut::AfterTheSave => sectors + 32 + 8 + len as u64,
            };
            store.flash_mut().arm_power_cut(units);
            step += 1;
            match store.save(&payload(step, len)) {
                Ok(sequence) => {
                    assert!(matches!(cut, Cut::AfterTheSave), "{cut:?}: the save should have been cut");
                    // The power goes now, before anything else reaches the
                    // chip: both slots hold a whole checkpoint at the reboot.
                    acknowledged = Some((sequence, step));
                }
                Err(StoreError::Flash(FlashError::PowerCut(_))) => {
                    assert!(!matches!(cut, Cut::AfterTheSave), "the save had all it needed");
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert_eq!(acknowledged.map(|(sequence, _)| sequence), Some(3), "one acknowledged save per round");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Real training state through real power cuts: a small SVP fine-tuning run
/// checkpoints to the flash every 2 steps; the power is cut at random bytes of
/// those writes; each reboot resumes from the newest checkpoint on the chip.
/// The run that finishes, after all the cuts, has bit-identical weights to one
/// that never lost power.
#[test]
fn a_run_interrupted_by_power_cuts_ends_bit_identical() {
    use svp_train::{Checkpoint, CheckpointRef};
    use svp_train::{FitObserver, FitOptions, FitStateRef, fit_with};

    struct Device<'a> {
        store: &'a mut CheckpointStore,
        cut: bool,
        /// Step of the last checkpoint the store acknowledged.
        acknowledged: &'a mut Option<u64>,
    }
    impl FitObserver for Device<'_> {
        fn on_checkpoint(&mut self, state: &FitStateRef<'_>) -> Result<(), String> {
            let c = CheckpointRef { config_json: "", data_origin: "", train_len: 0, state: *state };
            match self.store.save_streamed(|w| c.write_payload(w)) {
                Ok(_) => {
                    *self.acknowledged = Some(state.trainer.step);
                    Ok(())
                }
                Err(StoreError::Flash(FlashError::PowerCut(_))) => {
                    self.cut = true;
                    Err("power cut".into())
                }
                Err(e) => Err(e.to_string()),
            }
        }
    }

    let mut data = svp_data::DataSplit::embedded();
    data.train.labels.truncate(256);
    data.train.images.truncate(256 * 784);
    let mut config = svp_train::Config {
        model: svp_train::config::ModelConfig::mlp(vec![32, 32]),
        svp: svp_train::config::SvpConfig { projection_dropout: 0.1, ..Default::default() },
        train: svp_train::config::TrainConfig { epochs: 3, batch_size: 32, seed: 5, ..Default::default() },
        optimizer: svp_optim::Optimizer::adam(1e-3),
        schedule: svp_train::Schedule::Cosine { warmup_steps: 0, min_factor: 0.0 },
    };
    config.svp.lambda = 1.0;
    let straight = svp_train::fit(&config, &data, &mut ());

    let dir = std::env::temp_dir().join(format!("svp-flash-real-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let chip = dir.join("flash.bin");
    let mut rng = Stream::new(StreamKey::new(7, Purpose::Shuffle, 3, 0, 0));
    let (mut cuts, mut rounds) = (0, 0);
    // Rounds of a whole run on a fresh chip, each with power cuts until the
    // run gets through; at least 40 cuts in all.
    while cuts < 40 {
        rounds += 1;
        let _ = std::fs::remove_file(&chip);
        let mut acknowledged = None;
        let finished = loop {
            let (mut store, found) = CheckpointStore::open(Flash::open(&chip, 2 << 20).unwrap()).unwrap();
            let resume = found.map(|f| Checkpoint::from_payload(&f.payload, &chip).expect("a whole checkpoint").state);
            // The reboot resumes from the last checkpoint the store acknowledged.
            assert_eq!(resume.as_ref().map(|r| r.trainer.step), acknowledged, "round {rounds}: resume point");
            assert!(cuts < 400, "no run got through 400 power cuts: the checkpoints do not survive them");
            // Somewhere within the next three checkpoints (each is ~320 KB:
            // 26,634 weights and two Adam moments).
            store.flash_mut().arm_power_cut(rng.below(1_000_000));
            let mut device = Device { store: &mut store, cut: false, acknowledged: &mut acknowledged };
            let options = FitOptions { resume, checkpoint_every: Some(2), ..Default::default() };
            let out = fit_with(&config, &data, &mut device, options);
            if device.cut {
                cuts += 1;
                continue;
            }
            assert!(out.interrupted.is_none(), "{:?}", out.interrupted);
            break out;
        };
        let same = finished.model.params().iter().zip(straight.model.params()).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "round {rounds}: after power cuts the weights differ from the uninterrupted run");
    }
    eprintln!("{cuts} power cuts over {rounds} runs, every run bit-identical to the uninterrupted one");
    std::fs::remove_dir_all(&dir).unwrap();
}
