//! The FNV-1a 64 checksum of model files and checkpoints.

/// FNV-1a 64, fed in pieces; also a [`std::io::Write`] sink that counts what
/// it hashes, so a payload can be measured and checksummed by streaming it.
#[derive(Clone, Copy, Debug)]
pub struct Fnv64 {
    hash: u64,
    len: u64,
}

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv64 {
    /// The empty hash.
    pub fn new() -> Self {
        Self { hash: 0xcbf2_9ce4_8422_2325, len: 0 }
    }

    /// Hashes `bytes` after what came before.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.hash ^= b as u64;
            self.hash = self.hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.len += bytes.len() as u64;
    }

    /// The hash so far.
    pub fn finish(&self) -> u64 {
        self.hash
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was hashed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::io::Write for Fnv64 {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// FNV-1a, 64 bits, over several pieces in order.
pub fn fnv1a64(pieces: &[&[u8]]) -> u64 {
    let mut h = Fnv64::new();
    pieces.iter().for_each(|p| h.feed(p));
    h.finish()
}
