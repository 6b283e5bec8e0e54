//! The IDX file format (<http://yann.lecun.com/exdb/mnist/>): a big-endian
//! header `0 0 type ndim`, `ndim` u32 dimensions, then the data. svp reads the
//! unsigned-byte type (0x08), which MNIST-format data sets use.

use crate::DataError;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// Data type code for unsigned bytes.
const TYPE_U8: u8 = 0x08;

/// Most dimensions an IDX header may declare here.
const MAX_DIMS: usize = 4;

/// An IDX array of bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimensions, outermost first (items, then rows, cols for images).
    pub dims: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<u8>,
}

/// The first two bytes of a gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Deflate expands at most about 1032 to 1, so a gzip stream of `n` bytes
/// decodes to at most `n` times this: the most a header can make us reserve.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// Reads an IDX file, gunzipping it if it starts with the gzip magic. The
/// file is streamed: only the decoded data is held, reserved once at the size
/// the header declares (bounded by what the file could hold).
pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    let io = |source| DataError::Io { path: path.to_owned(), source };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut reader = BufReader::new(file);
    if reader.fill_buf().map_err(io)?.starts_with(&GZIP_MAGIC) {
        parse_stream(flate2::read::GzDecoder::new(reader), len.saturating_mul(MAX_DEFLATE_RATIO), true, path)
    } else {
        parse_stream(reader, len, false, path)
    }
}

/// Parses IDX bytes (raw or gzipped); `path` only names the source in errors.
pub fn parse_idx(raw: &[u8], path: &Path) -> Result<IdxArray, DataError> {
    let len = raw.len() as u64;
    if raw.starts_with(&GZIP_MAGIC) {
        parse_stream(flate2::read::GzDecoder::new(raw), len.saturating_mul(MAX_DEFLATE_RATIO), true, path)
    } else {
        parse_stream(raw, len, false, path)
    }
}

/// Reads the header, then exactly the bytes it promises (and one more, to
/// catch trailing data) from `source`, which holds at most `max_len` bytes:
/// a gzip bomb or a lying header cannot make us allocate more than the
/// header declares + 1, nor more than the source can hold.
fn parse_stream(mut source: impl Read, max_len: u64, gzip: bool, path: &Path) -> Result<IdxArray, DataError> {
    let corrupt = |what: String| DataError::Corrupt { path: path.to_owned(), what };
    let stream = |e: std::io::Error| {
        if gzip { corrupt(format!("gzip stream: {e}")) } else { DataError::Io { path: path.to_owned(), source: e } }
    };
    if !gzip && max_len < 4 {
        return Err(corrupt(format!("{max_len} bytes, shorter than an IDX header")));
    }
    let mut head = [0u8; 4];
    source.read_exact(&mut head).map_err(stream)?;
    let ndim = check_magic(head, path)?;
    let mut dim_bytes = [0u8; 4 * MAX_DIMS];
    let dim_bytes = &mut dim_bytes[..4 * ndim];
    source.read_exact(dim_bytes).map_err(|_| corrupt("truncated header".into()))?;
    let dims = parse_dims(dim_bytes);
    let expected = element_count(&dims, path)?;
    let reserve = (expected as u64 + 1).min(max_len) as usize;
    let mut data = Vec::new();
    data.try_reserve_exact(reserve).map_err(|_| corrupt(format!("no memory for the {expected} bytes it declares")))?;
    source.take(expected as u64 + 1).read_to_end(&mut data).map_err(stream)?;
    finish(dims, data, expected, path)
}

fn check_magic(head: [u8; 4], path: &Path) -> Result<usize, DataError> {
    if head[0] != 0 || head[1] != 0 || head[2] != TYPE_U8 || head[3] == 0 || head[3] as usize > MAX_DIMS {
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

    /// Files are streamed, and the data is reserved once at its declared size
    /// (no doubling growth); a header declaring more than the file could
    /// hold is an error, without reserving what it declares.
    #[test]
    fn files_stream_into_one_exact_buffer() {
        let dir = std::env::temp_dir().join(format!("svp-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let raw = encode_idx(&[100, 1000], &data);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        let zipped = gz.finish().unwrap();
        for (name, bytes) in [("a.idx", &raw), ("a.idx.gz", &zipped)] {
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            let a = read_idx(&path).unwrap();
            assert_eq!(a, parse_idx(bytes, p()).unwrap());
            assert_eq!((a.dims.clone(), &a.data), (vec![100, 1000], &data));
            assert!(a.data.capacity() <= data.len() + 1, "{name}: reserved {}", a.data.capacity());
        }
        // 2^34 bytes declared, 12 bytes of file.
        let liar = encode_idx(&[1 << 17, 1 << 17], &[]);
        let path = dir.join("liar.idx");
        std::fs::write(&path, &liar).unwrap();
        assert!(matches!(read_idx(&path), Err(DataError::Truncated { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
