//! The IDX file format (<http://yann.lecun.com/exdb/mnist/>): a big-endian
//! header `0 0 type ndim`, `ndim` u32 dimensions, then the data. svp reads the
//! unsigned-byte type (0x08), which MNIST-format data sets use.

use crate::DataError;
use std::io::Read;
use std::path::Path;

/// Data type code for unsigned bytes.
const TYPE_U8: u8 = 0x08;

/// An IDX array of bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimensions, outermost first (items, then rows, cols for images).
    pub dims: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<u8>,
}

/// Reads an IDX file, gunzipping it if it starts with the gzip magic.
pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    let io = |source| DataError::Io { path: path.to_owned(), source };
    let raw = std::fs::read(path).map_err(io)?;
    parse_idx(&raw, path)
}

/// Parses IDX bytes (raw or gzipped); `path` only names the source in errors.
pub fn parse_idx(raw: &[u8], path: &Path) -> Result<IdxArray, DataError> {
    let corrupt = |what: String| DataError::Corrupt { path: path.to_owned(), what };
    if raw.starts_with(&[0x1f, 0x8b]) {
        // Read the header first, then exactly the bytes it promises: a gzip bomb
        // or a lying header cannot make us allocate more than it declares + 1.
        let mut gz = flate2::read::GzDecoder::new(raw);
        let mut head = [0u8; 4];
        gz.read_exact(&mut head).map_err(|e| corrupt(format!("gzip stream: {e}")))?;
        let ndim = check_magic(head, path)?;
        let mut dim_bytes = vec![0u8; 4 * ndim];
        gz.read_exact(&mut dim_bytes).map_err(|_| corrupt("truncated header".into()))?;
        let dims = parse_dims(&dim_bytes);
        let expected = element_count(&dims, path)?;
        let mut data = Vec::new();
        (&mut gz).take(expected as u64 + 1).read_to_end(&mut data).map_err(|e| corrupt(format!("gzip stream: {e}")))?;
        return finish(dims, data, expected, path);
    }
    if raw.len() < 4 {
        return Err(corrupt(format!("{} bytes, shorter than an IDX header", raw.len())));
    }
    let ndim = check_magic([raw[0], raw[1], raw[2], raw[3]], path)?;
    let header = 4 + 4 * ndim;
    if raw.len() < header {
        return Err(corrupt("truncated header".into()));
    }
    let dims = parse_dims(&raw[4..header]);
    let expected = element_count(&dims, path)?;
    finish(dims, raw[header..].to_vec(), expected, path)
}

fn check_magic(head: [u8; 4], path: &Path) -> Result<usize, DataError> {
    if head[0] != 0 || head[1] != 0 || head[2] != TYPE_U8 || head[3] == 0 || head[3] > 4 {
        return Err(DataError::BadMagic { path: path.to_owned(), found: u32::from_be_bytes(head) });
    }
    Ok(head[3] as usize)
}

fn parse_dims(bytes: &[u8]) -> Vec<usize> {
    bytes.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize).collect()
}

fn element_count(dims: &[usize], path: &Path) -> Result<usize, DataError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= 1 << 34)
        .ok_or_else(|| DataError::Corrupt { path: path.to_owned(), what: format!("absurd dimensions {dims:?}") })
}

fn finish(dims: Vec<usize>, data: Vec<u8>, expected: usize, path: &Path) -> Result<IdxArray, DataError> {
    if data.len() < expected {
        return Err(DataError::Truncated { path: path.to_owned(), expected, found: data.len() });
    }
    if data.len() > expected {
        return Err(DataError::Corrupt {
            path: path.to_owned(),
            what: format!("trailing bytes after the {expected} the header declares"),
        });
    }
    Ok(IdxArray { dims, data })
}

/// Encodes an IDX byte array (used by tests and tools).
pub fn encode_idx(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, TYPE_U8, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn p() -> &'static Path {
        Path::new("test.idx")
    }

    #[test]
    fn round_trip_raw_and_gzip() {
        let data: Vec<u8> = (0..24).collect();
        let raw = encode_idx(&[2, 3, 4], &data);
        let a = parse_idx(&raw, p()).unwrap();
        assert_eq!(a.dims, vec![2, 3, 4]);
        assert_eq!(a.data, data);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        let b = parse_idx(&gz.finish().unwrap(), p()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn rejects_bad_files() {
        let raw = encode_idx(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let mut bad_magic = raw.clone();
        bad_magic[2] = 0x0D;
        assert!(matches!(parse_idx(&bad_magic, p()), Err(DataError::BadMagic { .. })));
        assert!(matches!(parse_idx(&raw[..raw.len() - 1], p()), Err(DataError::Truncated { .. })));
        assert!(matches!(parse_idx(&raw[..6], p()), Err(DataError::Corrupt { .. })));
        assert!(matches!(parse_idx(&[0, 0], p()), Err(DataError::Corrupt { .. })));
        let mut long = raw.clone();
        long.push(0);
        assert!(matches!(parse_idx(&long, p()), Err(DataError::Corrupt { .. })));
        let absurd = encode_idx(&[u32::MAX as usize, u32::MAX as usize], &[]);
        assert!(matches!(parse_idx(&absurd, p()), Err(DataError::Corrupt { .. })));
        // A truncated gzip stream.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        let z = gz.finish().unwrap();
        assert!(parse_idx(&z[..z.len() / 2], p()).is_err());
    }
}
