//! `seaport-seed`: makes a random seed and prints it with the public key it
//! gives, as text for people or `--json` for scripts; with `--seed-file` the
//! seed goes into a new file readable by its owner alone, and never to stdout.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Parser;
use seaport_proto::keys::{Keypair, Seed};

/// Make a random seed for a registry (or a service or proxy that wants a
/// stable identity), and print the public key others connect with.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  seaport-seed --seed-file registry.seed\n  seaport-registry --seed-file registry.seed\n  seaport-seed --show web.seed    # the pubkey of an existing seed file\n\nGive the printed pubkey to services and proxies; keep the seed secret."
)]
pub struct Args {
    /// Print {"seed": ..., "pubkey": ...} (or {"seed_file": ..., "pubkey": ...}) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write the seed to this new file (mode 0600; an existing file is never
    /// overwritten) instead of printing it.
    #[arg(long, value_name = "PATH", conflicts_with = "show")]
    pub seed_file: Option<PathBuf>,
    /// Make no seed: print the pubkey of the seed in this existing file (for
    /// a service's `--allow` or a registry's `--acl`).
    #[arg(long, value_name = "PATH")]
    pub show: Option<PathBuf>,
    /// Print a completion script for this shell (bash, zsh, fish, elvish,
    /// powershell) and exit.
    #[arg(long, value_name = "SHELL", exclusive = true)]
    pub completions: Option<clap_complete::Shell>,
    /// Read settings from this TOML file (json = true, seed-file = "...");
    /// flags given here override the file's.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
}

/// The lines to print for `seed`; `file` is where it was written, if it was.
pub fn render(seed: &Seed, file: Option<&Path>, json: bool) -> String {
    let pubkey = Keypair::from_seed(seed).public();
    match (file, json) {
        (None, true) => format!("{{\"seed\": \"{}\", \"pubkey\": \"{pubkey}\"}}", seed.to_hex()),
        (None, false) => format!(
            "Generated a random seed for you!\n--seed {}\nservices and proxies will connect with pubkey {pubkey}",
            seed.to_hex()
        ),
        (Some(path), true) => {
            let path = serde_json::to_string(&path.to_string_lossy()).unwrap_or_default();
            format!("{{\"seed_file\": {path}, \"pubkey\": \"{pubkey}\"}}")
        }
        (Some(path), false) => format!(
            "Generated a random seed for you!\n--seed-file {}\nservices and proxies will connect with pubkey {pubkey}",
            path.display()
        ),
    }
}

/// The lines to print for `--show`: the pubkey of the seed in `file`.
pub fn render_shown(seed: &Seed, file: &Path, json: bool) -> String {
    let pubkey = Keypair::from_seed(seed).public();
    if json {
        let path = serde_json::to_string(&file.to_string_lossy()).unwrap_or_default();
        format!("{{\"seed_file\": {path}, \"pubkey\": \"{pubkey}\"}}")
    } else {
        format!("{} holds the seed of pubkey {pubkey}", file.display())
    }
}

/// Writes `seed` as 64 hex characters and a newline to a new file at `path`,
/// readable and writable by its owner only. Refuses to replace a file: a seed
/// is an identity, and losing one loses the registry's name.
pub fn write_seed_file(path: &Path, seed: &Seed) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            format!(
                "{} already exists: a seed file is never overwritten (choose another path)",
                path.display()
            )
        }
        _ => format!("cannot create {}: {e}", path.display()),
    })?;
    file.write_all(format!("{}\n", seed.to_hex()).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json_name_the_same_key() {
        let seed = Seed::from_bytes([3; 32]);
        let key = Keypair::from_seed(&seed).public().to_string();
        let text = render(&seed, None, false);
        assert_eq!(text.lines().count(), 3);
        assert!(text.lines().nth(1).is_some_and(|l| l == format!("--seed {}", "03".repeat(32))));
        assert!(text.ends_with(&format!("pubkey {key}")));
        let json = render(&seed, None, true);
        assert!(json.contains(&format!("\"pubkey\": \"{key}\"")), "{json}");
    }

    #[test]
    fn a_seed_file_holds_the_seed_alone_and_is_never_replaced() {
        let dir = std::env::temp_dir().join(format!("seaport-seed-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("registry.seed");
        let _ = std::fs::remove_file(&path);
        let seed = Seed::from_bytes([5; 32]);
        write_seed_file(&path, &seed).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().parse::<Seed>().unwrap().to_hex(), seed.to_hex());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let err = write_seed_file(&path, &Seed::from_bytes([6; 32])).unwrap_err();
        assert!(err.contains("never overwritten"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "the first seed is kept");
        let shown = render(&seed, Some(&path), false);
        assert!(!shown.contains(&seed.to_hex()), "the seed stays out of stdout");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
