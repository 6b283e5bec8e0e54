//! Tensor element types of a model file and their conversions.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// How a tensor's values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    /// IEEE binary32, little-endian.
    F32,
    /// IEEE binary16, little-endian.
    F16,
    /// bfloat16 (the top half of a binary32), little-endian.
    BF16,
    /// Signed bytes, with one f32 scale per output channel (row):
    /// `value = q * scale[row]`, `scale = max |w_row| / 127`.
    I8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 => 1,
        }
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "int8",
        }
    }

    /// Parses a command-line name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(DType::F32),
            "f16" => Some(DType::F16),
            "bf16" => Some(DType::BF16),
            "int8" | "i8" => Some(DType::I8),
            _ => None,
        }
    }
}

/// Where encoded bytes go, in order: a buffer, a checksum, a file.
pub trait ByteSink {
    /// Appends `bytes`.
    fn put(&mut self, bytes: &[u8]);
    /// Bytes appended so far.
    fn written(&self) -> u64;
}

impl ByteSink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
    fn written(&self) -> u64 {
        self.len() as u64
    }
}

/// Encodes `values` (a `rows x cols` row-major matrix) as `dtype`, appending
/// the bytes to `out`; for int8 also returns the per-row scales.
pub fn encode(dtype: DType, values: &[f32], cols: usize, out: &mut (impl ByteSink + ?Sized)) -> Option<Vec<f32>> {
    match dtype {
        DType::F32 => values.iter().for_each(|v| out.put(&v.to_le_bytes())),
        DType::F16 => values.iter().for_each(|v| out.put(&f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => values.iter().for_each(|v| out.put(&bf16::from_f32(*v).to_le_bytes())),
        DType::I8 => {
            let mut scales = Vec::with_capacity(values.len() / cols.max(1));
            for row in values.chunks(cols.max(1)) {
                let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
                scales.push(scale);
                row.iter().for_each(|v| out.put(&[(v / scale).round().clamp(-127.0, 127.0) as i8 as u8]));
            }
            return Some(scales);
        }
    }
    None
}

/// Decodes `bytes` of `dtype` into `out` (its length is the element count);
/// `scales` (one per row of `cols` values) is required for int8.
///
/// # Panics
/// If the byte count does not match (the file loader checks it first).
pub fn decode(dtype: DType, bytes: &[u8], scales: Option<&[f32]>, cols: usize, out: &mut [f32]) {
    assert_eq!(bytes.len(), out.len() * dtype.size(), "decode: byte count");
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        DType::I8 => {
            let scales = scales.expect("int8 tensors carry scales");
            for ((orow, brow), &s) in out.chunks_mut(cols).zip(bytes.chunks(cols)).zip(scales) {
                for (o, &q) in orow.iter_mut().zip(brow) {
                    *o = q as i8 as f32 * s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_within_each_dtype_precision() {
        let values: Vec<f32> = (0..600).map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0).collect();
        for (dtype, tol) in [(DType::F32, 0.0), (DType::F16, 1e-3), (DType::BF16, 8e-3), (DType::I8, 0.5 / 127.0)] {
            let mut bytes = Vec::new();
            let scales = encode(dtype, &values, 60, &mut bytes);
            assert_eq!(bytes.len(), values.len() * dtype.size());
            let mut back = vec![0.0; values.len()];
            decode(dtype, &bytes, scales.as_deref(), 60, &mut back);
            for (row, (vr, br)) in values.chunks(60).zip(back.chunks(60)).enumerate() {
                let max = vr.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (v, b) in vr.iter().zip(br) {
                    let bound = if dtype == DType::I8 { tol * max * 1.0001 } else { tol * v.abs().max(1e-3) };
                    assert!((v - b).abs() <= bound, "{dtype:?} row {row}: {v} -> {b}");
                }
            }
        }
        assert_eq!(DType::parse("int8"), Some(DType::I8));
        assert_eq!(DType::parse("f64"), None);
    }
}
