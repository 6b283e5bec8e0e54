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
