//! A simulated flash chip whose power can be cut at any byte.
//!
//! The chip is a file of fixed size. [`Flash::write`] stores bytes in order;
//! when an armed power cut falls inside a write, the bytes before the cut
//! point are on the chip and the rest never arrive (a real chip may also
//! corrupt the page being programmed; a cut here leaves a clean prefix, and
//! the store's checksums do not rely on that). After a cut, the device
//! "reboots" by opening the chip again: what was written survives.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Power was lost during a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("power cut after {written} bytes of a {requested}-byte flash write")]
pub struct PowerCut {
    /// Bytes that reached the chip.
    pub written: usize,
    /// Bytes the write asked for.
    pub requested: usize,
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
    /// Bytes that may still be written before the power goes.
    cut_after: Option<u64>,
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
            let erased = vec![0xFFu8; 1 << 16];
            let mut left = size;
            while left > 0 {
                let n = left.min(erased.len() as u64) as usize;
                file.write_all(&erased[..n]).map_err(io)?;
                left -= n as u64;
            }
        }
        Ok(Self { file, path: path.to_owned(), size, cut_after: None, bytes_written: 0 })
    }

    /// Chip size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Cuts the power once `bytes` more bytes have been written.
    pub fn arm_power_cut(&mut self, bytes: u64) {
        self.cut_after = Some(bytes);
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), FlashError> {
        if offset.checked_add(len as u64).is_none_or(|end| end > self.size) {
            return Err(FlashError::OutOfRange { offset, len, size: self.size });
        }
        Ok(())
    }

    /// Writes `data` at `offset`, unless the power goes first.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), FlashError> {
        self.check(offset, data.len())?;
        let allowed = match self.cut_after {
            Some(left) if (left as usize) < data.len() => left as usize,
            _ => data.len(),
        };
        let io = |source| FlashError::Io { path: self.path.clone(), source };
        self.file.seek(SeekFrom::Start(offset)).map_err(io)?;
        // No fsync: the simulated power cut is this truncation, not a crash of
        // the host, so the file always holds exactly what reached the chip.
        self.file.write_all(&data[..allowed]).map_err(io)?;
        self.bytes_written += allowed as u64;
        if let Some(left) = self.cut_after.as_mut() {
            *left -= allowed as u64;
        }
        if allowed < data.len() {
            self.cut_after = Some(0);
            return Err(PowerCut { written: allowed, requested: data.len() }.into());
        }
        Ok(())
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
