//! A simulated NOR flash chip whose power can be cut at any byte.
//!
//! The chip is a file of fixed size, created erased (every byte 0xFF). As on
//! a NOR chip, programming can only clear bits: [`Flash::write`] stores
//! `old & new`, so bytes must be erased ([`Flash::erase`], whole
//! [`SECTOR`]s, back to 0xFF) before they are written again; a store that
//! skips the erase reads back damaged data. Power can be cut at any point
//! ([`Flash::arm_power_cut`]): the bytes programmed before the cut point are
//! on the chip, the byte being programmed at the cut is torn (some of its
//! bits programmed, some not), and the rest never arrive; a sector being
//! erased at the cut is left holding garbage. After a cut, the device
//! "reboots" by opening the chip again: what was written survives.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Bytes erased at once; erases start and end on multiples of it.
pub const SECTOR: u64 = 4096;

/// Power was lost during a write or an erase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("power cut after {written} of {requested} {unit} of a flash {operation}", unit = if *erase { "sectors" } else { "bytes" }, operation = if *erase { "erase" } else { "write" })]
pub struct PowerCut {
    /// Bytes programmed (sectors erased, for an erase) before the cut.
    pub written: usize,
    /// Bytes (sectors) the operation asked for.
    pub requested: usize,
    /// Whether the cut fell in an erase.
    pub erase: bool,
}

/// What can go wrong on the flash.
#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    /// Power was lost.
    #[error(transparent)]
    PowerCut(#[from] PowerCut),
    /// The write or read falls outside the chip.
    #[error("flash access of {len} bytes at {offset} is outside the {size}-byte chip")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        len: usize,
        /// Chip size.
        size: u64,
    },
    /// An erase that does not cover whole sectors.
    #[error("flash erase of {len} bytes at {offset} does not cover whole {SECTOR}-byte sectors")]
    Unaligned {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// The backing file failed.
    #[error("flash file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A file-backed flash chip.
pub struct Flash {
    file: File,
    path: PathBuf,
    size: u64,
    /// Units of work (see [`Flash::arm_power_cut`]) before the power goes.
    cut_after: Option<u64>,
    /// The power went: nothing reaches the chip until it is opened again.
    powered_off: bool,
    /// Bytes written since the chip was opened.
    pub bytes_written: u64,
}

impl Flash {
    /// Opens (or creates, erased to 0xFF) a chip of `size` bytes at `path`.
    pub fn open(path: &Path, size: u64) -> Result<Self, FlashError> {
        let io = |source| FlashError::Io { path: path.to_owned(), source };
        let fresh = !path.exists();
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
        if fresh || file.metadata().map_err(io)?.len() != size {
            file.set_len(0).map_err(io)?;
            // Bounded by the chip's size whatever goes wrong (no counter to
            // run away with: a mutation test once filled a disk here).
            let erased = vec![0xFFu8; 1 << 16];
            for start in (0..size).step_by(erased.len()) {
                let n = (size - start).min(erased.len() as u64) as usize;
                file.write_all(&erased[..n]).map_err(io)?;
            }
        }
        Ok(Self { file, path: path.to_owned(), size, cut_after: None, powered_off: false, bytes_written: 0 })
    }

    /// Chip size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Cuts the power after `units` more units of work: a byte programmed
    /// is one unit, a sector erased is one unit. At 0 the next operation is
    /// cut at its start.
    pub fn arm_power_cut(&mut self, units: u64) {
        self.cut_after = Some(units);
    }

    /// How much of an operation of `requested` units runs before the power
    /// goes (all of it if no cut falls inside it); spends the budget.
    /// `Err` if the power is already gone: nothing reaches the chip.
    fn allowance(&mut self, requested: usize, erase: bool) -> Result<usize, FlashError> {
        if self.powered_off {
            return Err(PowerCut { written: 0, requested, erase }.into());
        }
        Ok(match self.cut_after.as_mut() {
            Some(left) if (*left as usize) < requested => {
                let allowed = *left as usize;
                self.powered_off = true;
                allowed
            }
            Some(left) => {
                *left -= requested as u64;
                requested
            }
            None => requested,
        })
    }

    /// Erases the sectors of `len` bytes at `offset` (both multiples of
    /// [`SECTOR`]) to 0xFF, unless the power goes first.
    pub fn erase(&mut self, offset: u64, len: u64) -> Result<(), FlashError> {
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(FlashError::Unaligned { offset, len });
        }
        self.check(offset, len as usize)?;
        let sectors = (len / SECTOR) as usize;
        let allowed = self.allowance(sectors, true)?;
        let erased = vec![0xFFu8; SECTOR as usize];
        for s in 0..allowed {
            self.store(offset + s as u64 * SECTOR, &erased)?;
        }
        if allowed < sectors {
            // The sector under erase when the power went: neither its old
            // bytes nor erased.
            let at = offset + allowed as u64 * SECTOR;
            let garbage: Vec<u8> = (0..SECTOR).map(|i| noise(at + i)).collect();
            self.store(at, &garbage)?;
            return Err(PowerCut { written: allowed, requested: sectors, erase: true }.into());
        }
        Ok(())
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), FlashError> {
        if offset.checked_add(len as u64).is_none_or(|end| end > self.size) {
            return Err(FlashError::OutOfRange { offset, len, size: self.size });
        }
        Ok(())
    }

    /// Programs `data` at `offset` (each byte becomes `old & new`: only an
    /// erased byte takes any value), unless the power goes first.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), FlashError> {
        self.check(offset, data.len())?;
        let allowed = self.allowance(data.len(), false)?;
        let torn = usize::from(allowed < data.len());
        let mut cells = self.read(offset, allowed + torn)?;
        for (cell, &new) in cells.iter_mut().zip(&data[..allowed]) {
            *cell &= new;
        }
        if torn == 1 {
            // Some bits of the byte being programmed got there, some did not.
            cells[allowed] &= data[allowed] | noise(offset + allowed as u64);
        }
        self.store(offset, &cells)?;
        self.bytes_written += allowed as u64;
        if allowed < data.len() {
            return Err(PowerCut { written: allowed, requested: data.len(), erase: false }.into());
        }
        Ok(())
    }

    /// Puts `bytes` in the backing file at `offset`. No fsync: the simulated
    /// power cut is what the chip gets, not a crash of the host, so the file
    /// always holds exactly what reached the chip.
    fn store(&mut self, offset: u64, bytes: &[u8]) -> Result<(), FlashError> {
        let io = |source| FlashError::Io { path: self.path.clone(), source };
        self.file.seek(SeekFrom::Start(offset)).map_err(io)?;
        self.file.write_all(bytes).map_err(io)
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, FlashError> {
        self.check(offset, len)?;
        let io = |source| FlashError::Io { path: self.path.clone(), source };
        let mut out = vec![0u8; len];
        self.file.seek(SeekFrom::Start(offset)).map_err(io)?;
        self.file.read_exact(&mut out).map_err(io)?;
        Ok(out)
    }
}

/// A fixed pseudo-random byte for chip address `at` (torn bits, garbage).
fn noise(at: u64) -> u8 {
    (at.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chip(name: &str) -> (PathBuf, Flash) {
        let path = std::env::temp_dir().join(format!("svp-nor-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let flash = Flash::open(&path, 4 * SECTOR).unwrap();
        (path, flash)
    }

    /// Programming only clears bits; an erase sets a sector back to 0xFF.
    #[test]
    fn behaves_as_nor() {
        let (path, mut f) = chip("nor");
        assert!(f.read(0, 4 * SECTOR as usize).unwrap().iter().all(|&b| b == 0xFF), "created erased");
        f.write(10, &[0b1010_1010, 0x0F]).unwrap();
        assert_eq!(f.read(10, 2).unwrap(), [0b1010_1010, 0x0F]);
        // Over programmed bytes without an erase: old & new.
        f.write(10, &[0b0101_0101, 0xF0]).unwrap();
        assert_eq!(f.read(10, 2).unwrap(), [0, 0]);
        assert!(matches!(f.erase(1, SECTOR), Err(FlashError::Unaligned { .. })));
        f.erase(0, SECTOR).unwrap();
        f.write(10, &[0b0101_0101, 0xF0]).unwrap();
        assert_eq!(f.read(10, 2).unwrap(), [0b0101_0101, 0xF0]);
        std::fs::remove_file(path).unwrap();
    }

    /// A cut programs the bytes before it, tears the one at it and leaves
    /// the rest erased; a cut in an erase leaves its sector garbage.
    #[test]
    fn power_cuts_tear_a_byte_or_a_sector() {
        let (path, mut f) = chip("cut");
        f.arm_power_cut(3);
        let err = f.write(100, &[0x0F; 8]).unwrap_err();
        assert!(matches!(err, FlashError::PowerCut(PowerCut { written: 3, requested: 8, erase: false })));
        assert_eq!(f.bytes_written, 3);
        let after = f.read(100, 8).unwrap();
        assert_eq!(after[..3], [0x0F; 3]);
        // The torn byte: the bits the write cleared, less some that did not get there.
        assert_eq!(after[3], 0x0F | noise(103), "the torn byte");
        assert!(after[4..].iter().all(|&b| b == 0xFF));
        // Nothing reaches the chip until it boots again.
        assert!(f.write(200, &[0]).is_err() && f.erase(0, SECTOR).is_err());
        assert_eq!(f.read(200, 1).unwrap(), [0xFF]);
        assert_eq!(f.read(100, 8).unwrap(), after);
        let mut f = Flash::open(&path, 4 * SECTOR).unwrap();
        assert_eq!(f.read(100, 8).unwrap(), after, "what was written survives the reboot");
        f.write(SECTOR, &[0x11; 16]).unwrap();
        f.write(0, &[0x22; 16]).unwrap();
        f.write(2 * SECTOR, &[0x33; 16]).unwrap();
        f.arm_power_cut(1);
        let err = f.erase(0, 2 * SECTOR).unwrap_err();
        assert!(matches!(err, FlashError::PowerCut(PowerCut { written: 1, requested: 2, erase: true })));
        assert!(f.read(0, SECTOR as usize).unwrap().iter().all(|&b| b == 0xFF), "the first sector was erased");
        let second = f.read(SECTOR, SECTOR as usize).unwrap();
        let garbage: Vec<u8> = (SECTOR..2 * SECTOR).map(noise).collect();
        assert!(second == garbage, "the second sector holds the garbage of an interrupted erase");
        assert_eq!(
            f.read(2 * SECTOR, 17).unwrap(),
            [[0x33; 16].as_slice(), &[0xFF]].concat(),
            "the third is untouched"
        );
        std::fs::remove_file(path).unwrap();
    }

    /// Every operation stays on the chip; opening a chip at another size
    /// makes a fresh (erased) one of that size.
    #[test]
    fn accesses_stay_on_the_chip() {
        let (path, mut f) = chip("range");
        let size = 4 * SECTOR;
        assert!(matches!(f.write(size - 2, &[0; 3]), Err(FlashError::OutOfRange { .. })));
        assert!(matches!(f.read(size, 1), Err(FlashError::OutOfRange { .. })));
        assert!(matches!(f.erase(size, SECTOR), Err(FlashError::OutOfRange { .. })));
        assert!(matches!(f.write(u64::MAX, &[0]), Err(FlashError::OutOfRange { .. })));
        f.write(size - 2, &[0; 2]).unwrap();
        assert_eq!(f.bytes_written, 2);
        let mut bigger = Flash::open(&path, 2 * size).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * size);
        assert!(bigger.read(0, 2 * size as usize).unwrap().iter().all(|&b| b == 0xFF), "a fresh chip");
        std::fs::remove_file(path).unwrap();
    }
}
