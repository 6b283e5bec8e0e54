//! Crash-safe checkpoints on raw flash: two slots, written alternately.
//!
//! A flash chip has no rename, so the atomic-file trick does not apply.
//! Instead the chip is split into slots A and B (each a whole number of
//! erase sectors). Each holds
//! `magic (8) | sequence (u64) | length (u64) | FNV-1a 64 of sequence, length and payload (u64) | payload`.
//! A save goes to the slot that does not hold the newest valid checkpoint
//! (erasing the sectors it needs first: NOR programming only clears bits), so
//! whatever a power cut destroys, the other slot still holds the previous
//! complete checkpoint. Boot reads both and takes the valid one with the
//! higher sequence number.

use crate::flash::{Flash, FlashError, SECTOR};
use svp_model::Fnv64;

const SLOT_MAGIC: [u8; 8] = *b"SVPSLOT\0";
const SLOT_HEADER: usize = 32;

/// The slot checksum: FNV-1a 64 over the payload, then the sequence number and
/// the length, so a power cut inside the header cannot leave an old payload
/// under a new sequence number, and one streaming pass computes it.
fn slot_checksum(payload_hash: Fnv64, sequence: u64, len: u64) -> u64 {
    let mut h = payload_hash;
    h.feed(&sequence.to_le_bytes());
    h.feed(&len.to_le_bytes());
    h.finish()
}

/// Writes a payload to consecutive flash bytes, in chunks of `CHUNK`.
struct FlashWriter<'a> {
    flash: &'a mut Flash,
    at: u64,
    end: u64,
    buf: Vec<u8>,
    failed: Option<FlashError>,
}

/// Bytes programmed per flash write while streaming.
const CHUNK: usize = 4096;

impl FlashWriter<'_> {
    fn drain(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.at + self.buf.len() as u64 > self.end {
            return Err(std::io::Error::other("payload grew past its measured length"));
        }
        match self.flash.write(self.at, &self.buf) {
            Ok(()) => {
                self.at += self.buf.len() as u64;
                self.buf.clear();
                Ok(())
            }
            Err(e) => {
                self.failed = Some(e);
                Err(std::io::Error::other("flash write failed"))
            }
        }
    }
}

impl std::io::Write for FlashWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.drain()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.drain()
    }
}

/// What can go wrong storing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The flash failed (or lost power).
    #[error(transparent)]
    Flash(#[from] FlashError),
    /// The payload could not be produced.
    #[error("cannot encode the checkpoint: {0}")]
    Produce(String),
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
        flash.size() / 2 / SECTOR * SECTOR
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
        let mut hash = Fnv64::new();
        hash.feed(&payload);
        Ok((slot_checksum(hash, sequence, len) == sum).then_some(Stored { sequence, slot, payload }))
    }

    /// Saves `payload` as the newest checkpoint. On a power cut the previous
    /// checkpoint stays readable.
    pub fn save(&mut self, payload: &[u8]) -> Result<u64, StoreError> {
        self.save_streamed(|w| w.write_all(payload))
    }

    /// Saves a payload that `produce` writes (called twice: once to measure
    /// and hash it, once to program it), so a checkpoint of any size reaches
    /// the flash through a 4 KiB buffer, never whole in RAM.
    pub fn save_streamed(
        &mut self,
        mut produce: impl FnMut(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<u64, StoreError> {
        let mut measure = Fnv64::new();
        produce(&mut measure).map_err(|e| StoreError::Produce(e.to_string()))?;
        let payload_len = measure.len();
        let slot_size = Self::slot_size(&self.flash);
        let need = SLOT_HEADER as u64 + payload_len;
        if need > slot_size {
            return Err(StoreError::TooBig { need: need as usize, slot: slot_size, flash: self.flash.size() });
        }
        let (sequence, slot) = match self.newest {
            Some((seq, s)) => (seq + 1, 1 - s),
            None => (1, 0),
        };
        let base = slot as u64 * slot_size;
        self.flash.erase(base, need.next_multiple_of(SECTOR))?;
        let mut header = Vec::with_capacity(SLOT_HEADER);
        header.extend_from_slice(&SLOT_MAGIC);
        header.extend_from_slice(&sequence.to_le_bytes());
        header.extend_from_slice(&payload_len.to_le_bytes());
        header.extend_from_slice(&slot_checksum(measure, sequence, payload_len).to_le_bytes());
        self.flash.write(base, &header)?;
        let mut w = FlashWriter {
            flash: &mut self.flash,
            at: base + SLOT_HEADER as u64,
            end: base + need,
            buf: Vec::with_capacity(CHUNK),
            failed: None,
        };
        let written = produce(&mut w).and_then(|_| std::io::Write::flush(&mut w));
        if let Some(e) = w.failed.take() {
            return Err(e.into());
        }
        written.map_err(|e| StoreError::Produce(e.to_string()))?;
        self.newest = Some((sequence, slot));
        Ok(sequence)
    }

    /// The chip, to arm power cuts.
    pub fn flash_mut(&mut self) -> &mut Flash {
        &mut self.flash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh_chip(name: &str, size: u64) -> (std::path::PathBuf, Flash) {
        let path = std::env::temp_dir().join(format!("svp-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let flash = Flash::open(&path, size).unwrap();
        (path, flash)
    }

    /// A checkpoint that fills its slot exactly is stored and found; one
    /// byte more is refused before anything is written.
    #[test]
    fn a_slot_holds_exactly_its_size() {
        let (path, flash) = fresh_chip("exact", 4 * SECTOR);
        let (mut store, found) = CheckpointStore::open(flash).unwrap();
        assert!(found.is_none());
        let room = (2 * SECTOR) as usize - SLOT_HEADER;
        let payload: Vec<u8> = (0..room).map(|i| (i * 31 % 251) as u8).collect();
        assert_eq!(store.save(&payload).unwrap(), 1);
        assert!(
            matches!(store.save(&vec![1; room + 1]), Err(StoreError::TooBig { need, .. }) if need == room + 1 + SLOT_HEADER)
        );
        let (_, found) = CheckpointStore::open(Flash::open(&path, 4 * SECTOR).unwrap()).unwrap();
        let found = found.expect("the full slot is found");
        assert_eq!((found.sequence, found.slot), (1, 0));
        assert!(found.payload == payload);
        std::fs::remove_file(path).unwrap();
    }

    /// A header whose length runs past its slot (into the next one) is not a
    /// checkpoint, even with a checksum that matches the bytes it claims.
    #[test]
    fn a_length_past_the_slot_is_refused() {
        let (path, mut flash) = fresh_chip("past", 4 * SECTOR);
        let len = 2 * SECTOR; // the slot's room is 2 sectors less the header
        let payload = flash.read(SLOT_HEADER as u64, len as usize).unwrap();
        let mut hash = Fnv64::new();
        hash.feed(&payload);
        let mut header = SLOT_MAGIC.to_vec();
        header.extend_from_slice(&1u64.to_le_bytes());
        header.extend_from_slice(&len.to_le_bytes());
        header.extend_from_slice(&slot_checksum(hash, 1, len).to_le_bytes());
        flash.write(0, &header).unwrap();
        let (_, found) = CheckpointStore::open(flash).unwrap();
        assert!(found.is_none(), "a slot claimed bytes past its end");
        std::fs::remove_file(path).unwrap();
    }
}
