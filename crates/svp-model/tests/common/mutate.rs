//! Random damage to a file's bytes, shared by the model file mutants here and
//! the checkpoint mutants of svp-train (`#[path]`-included there).

use svp_rng::Stream;

/// A copy of `original` with one kind of damage drawn from `s`: flipped
/// bits, a cut, an absurd length or offset, inserted or removed bytes, or
/// changed metadata bytes.
pub fn mutate(s: &mut Stream, original: &[u8]) -> Vec<u8> {
    let mut b = original.to_vec();
    match s.below(6) {
        0 => {
            for _ in 0..1 + s.below(8) {
                let i = s.below(b.len() as u64) as usize;
                b[i] ^= 1 << s.below(8);
            }
        }
        1 => b.truncate(s.below(b.len() as u64) as usize),
        2 => {
            // An absurd length or offset in the header or the metadata.
            let i = s.below(b.len().saturating_sub(8) as u64) as usize;
            let v = [u64::MAX, u32::MAX as u64, 1 << 40, 0, s.next_u64()][s.below(5) as usize];
            b[i..i + 8].copy_from_slice(&v.to_le_bytes());
        }
        3 => {
            let i = s.below(b.len() as u64) as usize;
            let n = 1 + s.below(64) as usize;
            b.splice(i..i, std::iter::repeat_n(0xAB, n));
        }
        4 => {
            let i = s.below(b.len() as u64) as usize;
            let n = (1 + s.below(16) as usize).min(b.len() - i);
            b.drain(i..i + n);
        }
        _ => {
            // Metadata bytes only: postcard's varints and lengths.
            let i = 64 + s.below(200.min(b.len().saturating_sub(64)) as u64) as usize;
            if i < b.len() {
                b[i] = s.next_u64() as u8;
            }
        }
    }
    b
}
