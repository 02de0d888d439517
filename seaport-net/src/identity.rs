//! Where identities come from: `--seed`, `--seed-file`, an environment
//! variable, or fresh OS randomness; and entropy for handshakes.
//!
//! Secrets should not have to sit in argv (where `ps` shows them), so every
//! binary also takes a file or an environment variable.

use std::path::Path;

use seaport_proto::keys::{KeyError, Seed};

/// Why a seed could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SeedError {
    /// The seed text is not 64 hex characters.
    #[error("invalid seed from {source_name}: {error}")]
    Invalid {
        /// Where it came from (`--seed`, a file name, an env variable).
        source_name: String,
        /// What is wrong with it.
        error: KeyError,
    },
    /// The seed file could not be read.
    #[error("cannot read seed file {path}: {error}")]
    File {
        /// The file.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// More than one of `--seed` and `--seed-file` given.
    #[error("give either --seed or --seed-file, not both")]
    Conflict,
}

/// 32 bytes from the OS random source.
pub fn entropy() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    // The OS random source failing is not something to carry on from.
    if getrandom::fill(&mut bytes).is_err() {
        tracing::error!("the operating system's random source failed");
        std::process::exit(1);
    }
    bytes
}

/// A random u64 (jitter, random instance choice).
pub fn random_u64() -> u64 {
    let e = entropy();
    let mut eight = [0u8; 8];
    eight.copy_from_slice(e.get(..8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(eight)
}

/// A fresh random seed.
pub fn random_seed() -> Seed {
    Seed::from_bytes(entropy())
}

/// Warns, as ssh does for private keys, when others may read a seed file:
/// the seed is the identity.
fn warn_if_exposed(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Only a file holds a seed: anything else is reported by the read.
        if let Ok(meta) = std::fs::metadata(path)
            && meta.is_file()
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                "seed file {} can be read by others (mode {:o}); make it private: chmod 600 {}",
                path.display(),
                meta.permissions().mode() & 0o777,
                path.display()
            );
        }
    }
}

/// The seed given by `--seed` (already including its env fallback, via clap)
/// or `--seed-file`; `None` if neither.
pub fn load_seed(seed: Option<&str>, seed_file: Option<&Path>) -> Result<Option<Seed>, SeedError> {
    match (seed, seed_file) {
        (Some(_), Some(_)) => Err(SeedError::Conflict),
        (Some(text), None) => {
            text.parse().map(Some).map_err(|error| SeedError::Invalid { source_name: "--seed".into(), error })
        }
        (None, Some(path)) => {
            warn_if_exposed(path);
            let text = std::fs::read_to_string(path)
                .map_err(|error| SeedError::File { path: path.display().to_string(), error })?;
            text.parse()
                .map(Some)
                .map_err(|error| SeedError::Invalid { source_name: path.display().to_string(), error })
        }
        (None, None) => Ok(None),
    }
}
