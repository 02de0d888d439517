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

/// A random u64 from the OS, each call: for a value that leaves the
/// process (a process's stamp in its registry sessions), where the
/// generator of [`random_u64`] would give its state away.
pub fn entropy_u64() -> u64 {
    let e = entropy();
    let mut eight = [0u8; 8];
    eight.copy_from_slice(e.get(..8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(eight)
}

/// A random u64 for jitter and instance choice; never for a value that
/// leaves the process or that anyone must not guess. SplitMix64 on a
/// per-thread state seeded once from the OS: a proxy asks for one per new
/// connection (its balance order), which needs no system call of its own.
pub fn random_u64() -> u64 {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(entropy_u64());
    }
    STATE.with(|state| {
        let next = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
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

#[cfg(test)]
mod tests {
    use super::random_u64;

    #[test]
    fn random_u64_spreads_evenly_and_differs_between_threads() {
        // Instance choice takes it modulo the instance count: every
        // remainder must come up about as often as the others.
        let mut buckets = [0u32; 4];
        for _ in 0..10_000 {
            let bucket = (random_u64() % 4) as usize;
            if let Some(b) = buckets.get_mut(bucket) {
                *b += 1;
            }
        }
        assert!(buckets.iter().all(|&b| (2_200..=2_800).contains(&b)), "{buckets:?}");
        // Each thread seeds its own state from the OS.
        let here: Vec<u64> = (0..4).map(|_| random_u64()).collect();
        let there = std::thread::spawn(|| (0..4).map(|_| random_u64()).collect::<Vec<u64>>()).join();
        assert_ne!(Some(here), there.ok());
    }
}
