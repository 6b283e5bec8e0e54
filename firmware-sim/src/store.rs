//! Crash-safe checkpoints on raw flash: two slots, written alternately.
//!
//! A flash chip has no rename, so the atomic-file trick does not apply.
//! Instead the chip is split into slots A and B. Each holds
//! `magic (8) | sequence (u64) | length (u64) | FNV-1a 64 of sequence, length and payload (u64) | payload`.
//! A save goes to the slot that does not hold the newest valid checkpoint, so
//! whatever a power cut destroys, the other slot still holds the previous
//! complete checkpoint. Boot reads both and takes the valid one with the
//! higher sequence number.

use crate::flash::{Flash, FlashError};

const SLOT_MAGIC: [u8; 8] = *b"SVPSLOT\0";
const SLOT_HEADER: usize = 32;

/// FNV-1a 64 over the sequence number, the length and the payload: a power cut
/// inside the header cannot leave an old payload under a new sequence number.
fn slot_checksum(sequence: u64, len: u64, payload: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in sequence.to_le_bytes().iter().chain(&len.to_le_bytes()).chain(payload) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// What can go wrong storing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The flash failed (or lost power).
    #[error(transparent)]
    Flash(#[from] FlashError),
    /// The checkpoint does not fit a slot.
    #[error("checkpoint of {need} bytes does not fit a {slot}-byte flash slot (flash {flash} bytes)")]
    TooBig {
        /// Bytes needed (payload and slot header).
        need: usize,
        /// Slot capacity.
        slot: u64,
        /// Chip size.
        flash: u64,
    },
}

/// A found checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its sequence number (1 for the first save).
    pub sequence: u64,
    /// Which slot (0 = A, 1 = B).
    pub slot: usize,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Two checkpoint slots on a flash chip.
pub struct CheckpointStore {
    flash: Flash,
    newest: Option<(u64, usize)>,
}

impl CheckpointStore {
    /// Reads both slots of `flash` (boot).
    pub fn open(mut flash: Flash) -> Result<(Self, Option<Stored>), FlashError> {
        let mut best: Option<Stored> = None;
        for slot in 0..2 {
            if let Some(found) = Self::read_slot(&mut flash, slot)?
                && best.as_ref().is_none_or(|b| found.sequence > b.sequence)
            {
                best = Some(found);
            }
        }
        let newest = best.as_ref().map(|b| (b.sequence, b.slot));
        Ok((Self { flash, newest }, best))
    }

    fn slot_size(flash: &Flash) -> u64 {
        flash.size() / 2
    }

    fn read_slot(flash: &mut Flash, slot: usize) -> Result<Option<Stored>, FlashError> {
        let base = slot as u64 * Self::slot_size(flash);
        let h = flash.read(base, SLOT_HEADER)?;
        if h[..8] != SLOT_MAGIC {
            return Ok(None);
        }
        let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        let (sequence, len, sum) = (word(8), word(16), word(24));
        if len > Self::slot_size(flash) - SLOT_HEADER as u64 {
            return Ok(None);
        }
        let payload = flash.read(base + SLOT_HEADER as u64, len as usize)?;
        Ok((slot_checksum(sequence, len, &payload) == sum).then_some(Stored { sequence, slot, payload }))
    }

    /// Saves `payload` as the newest checkpoint. On a power cut the previous
    /// checkpoint stays readable.
    pub fn save(&mut self, payload: &[u8]) -> Result<u64, StoreError> {
        let slot_size = Self::slot_size(&self.flash);
        let need = SLOT_HEADER + payload.len();
        if need as u64 > slot_size {
            return Err(StoreError::TooBig { need, slot: slot_size, flash: self.flash.size() });
        }
        let (sequence, slot) = match self.newest {
            Some((seq, s)) => (seq + 1, 1 - s),
            None => (1, 0),
        };
        let mut bytes = Vec::with_capacity(need);
        bytes.extend_from_slice(&SLOT_MAGIC);
        bytes.extend_from_slice(&sequence.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&slot_checksum(sequence, payload.len() as u64, payload).to_le_bytes());
        bytes.extend_from_slice(payload);
        self.flash.write(slot as u64 * slot_size, &bytes)?;
        self.newest = Some((sequence, slot));
        Ok(sequence)
    }

    /// The chip, to arm power cuts.
    pub fn flash_mut(&mut self) -> &mut Flash {
        &mut self.flash
    }
}
