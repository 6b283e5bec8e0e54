//! firmware-sim: an edge device without the hardware.
//!
//! * [`Profile`]: a device (RAM budget, flash size, cores) from a TOML file
//!   under `firmware-sim/profiles/`.
//! * [`flash::Flash`]: a file-backed flash chip whose power can be cut at any
//!   byte of any write.
//! * [`store::CheckpointStore`]: two alternating checkpoint slots on that
//!   flash, so a power cut never costs more than the checkpoint in progress.
//! * [`fine_tune_config`]: svp-model's fine-tuning config, the same library
//!   path as `svp finetune`.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod camera;
pub mod flash;
pub mod store;

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A simulated device.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Its name (the file's stem).
    pub name: String,
    /// RAM the process may use, MiB.
    pub ram_mib: u64,
    /// Flash capacity, MiB.
    pub flash_mib: u64,
    /// CPU cores (the compute pool's size).
    pub cores: usize,
}

/// Why a profile could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// No such profile.
    #[error("no device profile {name:?} (known: {known})")]
    Unknown {
        /// Asked for.
        name: String,
        /// Available names.
        known: String,
    },
    /// The file is not a valid profile.
    #[error("profile {}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The profiles folder of this crate.
pub fn profiles_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles")
}

impl Profile {
    /// RAM budget in bytes.
    pub fn ram_bytes(&self) -> usize {
        (self.ram_mib as usize) << 20
    }

    /// Loads the profile `name` from `dir` (`dir/name.toml`).
    pub fn load(dir: &Path, name: &str) -> Result<Self, ProfileError> {
        let path = dir.join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&path)
            .map_err(|_| ProfileError::Unknown { name: name.to_string(), known: Self::names(dir).join(", ") })?;
        let p: Profile = toml::from_str(&text)
            .map_err(|e| ProfileError::Invalid { path: path.clone(), message: e.message().to_string() })?;
        if p.ram_mib == 0 || p.flash_mib == 0 || p.cores == 0 {
            return Err(ProfileError::Invalid {
                path,
                message: "ram_mib, flash_mib and cores must be positive".into(),
            });
        }
        Ok(p)
    }

    /// Names of the profiles in `dir`.
    pub fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".toml").map(str::to_string))
            .collect();
        names.sort();
        names
    }
}

pub use svp_train::finetune::{FineTuning, config as fine_tune_config};

#[cfg(test)]
mod tests {
    use super::*;
    use svp_optim::MomentDtype;
    use svp_train::Method;

    #[test]
    fn every_shipped_profile_loads() {
        let names = Profile::names(&profiles_dir());
        assert!(names.len() >= 3, "{names:?}");
        for n in &names {
            let p = Profile::load(&profiles_dir(), n).unwrap();
            assert_eq!(&p.name, n);
        }
        let err = Profile::load(&profiles_dir(), "toaster").unwrap_err().to_string();
        assert!(err.contains("board-128m"), "{err}");
    }

    #[test]
    fn fine_tuning_regenerates_the_shipped_models_projections() {
        let file = svp_model::ModelFile::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/device-mlp.svpm"))
            .unwrap();
        let heads = file.meta.heads.clone().expect("the shipped model was trained with SVP");
        let classes = file.meta.layers.last().unwrap().out_dim;
        for method in [Method::Svp, Method::Bp] {
            let run = FineTuning {
                method,
                epochs: 2,
                batch_size: 64,
                lr: 1e-3,
                moments: MomentDtype::F32,
                augment: Default::default(),
                train_from_layer: 1,
            };
            let config = fine_tune_config(&file.meta, run);
            assert_eq!(config.projection_heads(classes), heads);
            let widths: Vec<usize> = file.meta.layers.iter().map(|l| l.out_dim).collect();
            assert_eq!(config.model.hidden, widths[..widths.len() - 1]);
            assert_eq!(config.model.input, Some(file.meta.layers[0].in_dim));
            assert_eq!((config.train.method, config.train.epochs, config.train.batch_size), (method, 2, 64));
        }
    }
}
