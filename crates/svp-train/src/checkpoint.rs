//! Checkpoint files: everything needed to continue a training run exactly.
//!
//! Layout (little-endian): magic `SVPCKPT\0` (8 bytes), version (u32), payload
//! length (u64), FNV-1a 64 checksum of the payload (u64), then the postcard
//! payload ([`Checkpoint`]). Written with [`svp_model::atomic::write_with`], so a crash
//! leaves the previous checkpoint intact.

use crate::{FitState, FitStateRef};
use serde::{Deserialize, Serialize};
use std::path::Path;
use svp_model::{ModelError, fnv1a64};

pub use svp_model::CHECKPOINT_MAGIC;
/// Version written by this build. Version 2 added bf16 optimizer moments
/// (each layer's moments carry their kind); version 1 files still load.
pub const CHECKPOINT_VERSION: u32 = 2;
const HEADER: usize = 28;

/// A resumable training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The run's config, as JSON (the CLI's own encoding of it).
    pub config_json: String,
    /// Where the training data came from.
    pub data_origin: String,
    /// Training samples.
    pub train_len: u64,
    /// Position, weights, optimizer state.
    pub state: FitState,
}

/// A checkpoint borrowed from a running trainer; encodes to the same bytes
/// as the [`Checkpoint`] it decodes to, without copying weights or moments.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CheckpointRef<'a> {
    /// The run's config, as JSON.
    pub config_json: &'a str,
    /// Where the training data came from.
    pub data_origin: &'a str,
    /// Training samples.
    pub train_len: u64,
    /// Position, weights, optimizer state.
    pub state: FitStateRef<'a>,
}

impl CheckpointRef<'_> {
    /// Streams the postcard payload into `w`, without building it in memory.
    pub fn write_payload(&self, w: impl std::io::Write) -> std::io::Result<()> {
        encode(self, w)
    }

    /// Length and FNV-1a 64 of the payload, computed by streaming it.
    pub fn payload_len_and_checksum(&self) -> (u64, u64) {
        len_and_checksum(self)
    }

    /// The file's bytes (header and payload).
    pub fn to_bytes(&self) -> Vec<u8> {
        file_bytes(self)
    }

    /// Writes the file atomically, streaming the payload into it (the
    /// weights and moments are never copied into one buffer).
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        save_file(self, path)
    }
}

/// Streams `payload`'s postcard encoding into `w`. A failure of `w` (a full
/// disk) comes back as itself: postcard alone would report it as its own
/// "serialize buffer is full".
fn encode(payload: &impl Serialize, w: impl std::io::Write) -> std::io::Result<()> {
    /// Keeps the first error of the writer it wraps.
    struct Keep<W> {
        inner: W,
        error: Option<std::io::Error>,
    }
    impl<W: std::io::Write> std::io::Write for Keep<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.inner.write(buf).map_err(|e| {
                let kind = e.kind();
                self.error.get_or_insert(e);
                kind.into()
            })
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
    let mut w = Keep { inner: w, error: None };
    match postcard::to_io(payload, &mut w) {
        Ok(_) => Ok(()),
        Err(e) => Err(w.error.take().unwrap_or_else(|| std::io::Error::other(e.to_string()))),
    }
}

/// Length and FNV-1a 64 of `payload`'s encoding, by streaming it into the hash.
fn len_and_checksum(payload: &impl Serialize) -> (u64, u64) {
    let mut h = svp_model::Fnv64::new();
    encode(payload, &mut h).expect("hashing never fails");
    (h.len(), h.finish())
}

/// A checkpoint file's bytes: header and payload.
fn file_bytes(payload: &impl Serialize) -> Vec<u8> {
    let (len, sum) = len_and_checksum(payload);
    let mut out = Vec::with_capacity(HEADER + len as usize);
    out.extend_from_slice(&header(len, sum));
    encode(payload, &mut out).expect("writing to memory never fails");
    out
}

/// Writes a checkpoint file atomically, the payload streamed into it twice
/// (into the checksum, then into the file) and never held whole.
fn save_file(payload: &impl Serialize, path: &Path) -> Result<(), ModelError> {
    let (len, sum) = len_and_checksum(payload);
    svp_model::atomic::write_with(path, |w| {
        w.write_all(&header(len, sum))?;
        encode(payload, w)
    })
    .map_err(|source| ModelError::Io { path: path.to_owned(), source })
}

/// A checkpoint's header for a payload of `len` bytes with checksum `sum`.
fn header(len: u64, sum: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&CHECKPOINT_MAGIC);
    h[8..12].copy_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&len.to_le_bytes());
    h[20..28].copy_from_slice(&sum.to_le_bytes());
    h
}

impl Checkpoint {
    /// Decodes a bare payload (as a device stores it inside its own framing).
    pub fn from_payload(payload: &[u8], path: &Path) -> Result<Self, ModelError> {
        let c: Checkpoint = postcard::from_bytes(payload)
            .map_err(|e| ModelError::InvalidCheckpoint { path: path.to_owned(), what: format!("payload: {e}") })?;
        Self::checked(c, path)
    }

    fn checked(c: Checkpoint, path: &Path) -> Result<Self, ModelError> {
        if c.state.params.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::InvalidCheckpoint { path: path.to_owned(), what: "non-finite weights".into() });
        }
        Ok(c)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        file_bytes(self)
    }

    /// Decodes and checks a checkpoint's bytes.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, ModelError> {
        let invalid = |what: String| ModelError::InvalidCheckpoint { path: path.to_owned(), what };
        if bytes.starts_with(&svp_model::MAGIC) {
            return Err(invalid("it is an svp model file, not a checkpoint".into()));
        }
        if bytes.len() < HEADER || bytes[..8] != CHECKPOINT_MAGIC {
            return Err(invalid("not an svp checkpoint (wrong magic number or too short)".into()));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != CHECKPOINT_VERSION && version != 1 {
            return Err(invalid(format!("checkpoint version {version}; this build reads 1 and {CHECKPOINT_VERSION}")));
        }
        let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        let payload = &bytes[HEADER..];
        if len != payload.len() as u64 {
            return Err(invalid(format!("header says {len} payload bytes, file has {} (truncated?)", payload.len())));
        }
        if u64::from_le_bytes(bytes[20..28].try_into().expect("8 bytes")) != fnv1a64(&[payload]) {
            return Err(invalid("checksum mismatch (the checkpoint is damaged)".into()));
        }
        if version == 1 {
            let c: v1::Checkpoint = postcard::from_bytes(payload)
                .map_err(|e| ModelError::InvalidCheckpoint { path: path.to_owned(), what: format!("payload: {e}") })?;
            return Self::checked(c.into(), path);
        }
        Self::from_payload(payload, path)
    }

    /// Writes atomically, streaming the payload into the file.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        save_file(self, path)
    }

    /// Reads and checks.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io { path: path.to_owned(), source })?;
        Self::from_bytes(&bytes, path)
    }
}

/// Version 1's payload: moments were two f32 vectors per layer, `m` empty
/// for plain SGD, `v` empty for SGD with momentum.
mod v1 {
    use serde::Deserialize;
    use svp_optim::Moments;

    #[derive(Deserialize)]
    pub(super) struct Checkpoint {
        config_json: String,
        data_origin: String,
        train_len: u64,
        state: FitState,
    }

    #[derive(Deserialize)]
    struct FitState {
        epoch: usize,
        next_batch: usize,
        loss_sum: f64,
        samples: usize,
        history: Vec<(usize, f64, f64)>,
        params: Vec<f32>,
        trainer: TrainerState,
    }

    #[derive(Deserialize)]
    struct TrainerState {
        step: u64,
        optimizer: Vec<LayerState>,
    }

    #[derive(Deserialize)]
    pub(super) struct LayerState {
        pub(super) steps: u64,
        pub(super) m: Vec<f32>,
        pub(super) v: Vec<f32>,
    }

    impl From<LayerState> for svp_optim::LayerState {
        fn from(s: LayerState) -> Self {
            let moments = match (s.m.is_empty(), s.v.is_empty()) {
                (true, true) => Moments::None,
                (false, true) => Moments::Momentum(s.m),
                _ => Moments::F32 { m: s.m, v: s.v },
            };
            svp_optim::LayerState { steps: s.steps, moments }
        }
    }

    impl From<Checkpoint> for super::Checkpoint {
        fn from(c: Checkpoint) -> Self {
            let s = c.state;
            super::Checkpoint {
                config_json: c.config_json,
                data_origin: c.data_origin,
                train_len: c.train_len,
                state: crate::FitState {
                    epoch: s.epoch,
                    next_batch: s.next_batch,
                    loss_sum: s.loss_sum,
                    samples: s.samples,
                    history: s.history,
                    params: s.params,
                    trainer: crate::TrainerState {
                        step: s.trainer.step,
                        optimizer: s.trainer.optimizer.into_iter().map(Into::into).collect(),
                    },
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let c = Checkpoint {
            config_json: "{}".into(),
            data_origin: "x".into(),
            train_len: 10,
            state: FitState {
                epoch: 2,
                next_batch: 3,
                loss_sum: 1.5,
                samples: 7,
                history: vec![(1, 0.5, 0.8)],
                params: vec![1.0, -2.0],
                trainer: crate::TrainerState { step: 9, optimizer: vec![] },
            },
        };
        let b = c.to_bytes();
        let p = Path::new("c");
        assert_eq!(Checkpoint::from_bytes(&b, p).unwrap(), c);
        // The borrowed form encodes to the very same bytes.
        let s = &c.state;
        let borrowed = CheckpointRef {
            config_json: &c.config_json,
            data_origin: &c.data_origin,
            train_len: c.train_len,
            state: FitStateRef {
                epoch: s.epoch,
                next_batch: s.next_batch,
                loss_sum: s.loss_sum,
                samples: s.samples,
                history: &s.history,
                params: &s.params,
                trainer: crate::TrainerStateRef { step: s.trainer.step, optimizer: &s.trainer.optimizer },
            },
        };
        assert_eq!(borrowed.to_bytes(), b);
        for cut in [0, 10, 27, b.len() - 1] {
            assert!(Checkpoint::from_bytes(&b[..cut], p).is_err());
        }
        for i in 0..b.len() {
            let mut m = b.clone();
            m[i] ^= 1;
            assert!(Checkpoint::from_bytes(&m, p).is_err(), "flip at {i}");
        }
    }

    /// A disk that fills while a checkpoint streams into it: the error is the
    /// disk's ("No space left on device"), not the encoder's.
    #[test]
    fn a_full_disk_is_reported_as_such() {
        /// Takes `room` bytes, then fails as a full disk does (ENOSPC).
        struct Disk {
            room: usize,
        }
        impl std::io::Write for Disk {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                if self.room == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
                }
                let n = buf.len().min(self.room);
                self.room -= n;
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let state = FitState {
            epoch: 1,
            next_batch: 0,
            loss_sum: 0.0,
            samples: 0,
            history: vec![],
            params: vec![0.5; 1000],
            trainer: crate::TrainerState { step: 0, optimizer: vec![] },
        };
        let c = Checkpoint { config_json: "{}".into(), data_origin: "x".into(), train_len: 1, state };
        let err = encode(&c, Disk { room: 100 }).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::StorageFull, "{err}");
        assert!(!err.to_string().contains("serialize"), "{err}");
        encode(&c, Disk { room: usize::MAX }).expect("room for all of it");
    }
}
