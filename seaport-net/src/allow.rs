//! Who may open links to a service: `--allow KEY` (repeatable) and
//! `--allow-file FILE` (one key a line, `#` comments), reread on SIGHUP.
//! Without either, any peer that knows the service's key may connect, as
//! before. The check runs on the peer's first handshake message, before the
//! service answers it and before any backend is touched.
//!
//! Invariant: a reload that fails (unreadable file, a bad line) keeps the
//! list in force and says why; it never opens the service to everyone.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use seaport_proto::keys::PublicKey;

use crate::lock::{read, write};

/// The keys allowed to open links, or everyone.
#[derive(Debug)]
pub struct AllowList {
    /// The `--allow` keys and the `--allow-file`, as last configured.
    source: RwLock<(Vec<PublicKey>, Option<PathBuf>)>,
    /// `None`: anyone may connect.
    keys: RwLock<Option<HashSet<PublicKey>>>,
}

impl AllowList {
    /// The list from `--allow` keys and an `--allow-file`, read now. Open to
    /// everyone when both are empty.
    pub fn new(flags: Vec<PublicKey>, file: Option<PathBuf>) -> Result<AllowList, String> {
        let keys = load(&flags, file.as_deref())?;
        Ok(AllowList { source: RwLock::new((flags, file)), keys: RwLock::new(keys) })
    }

    /// Whether `key` may open a link.
    pub fn admits(&self, key: &PublicKey) -> bool {
        read(&self.keys).as_ref().is_none_or(|keys| keys.contains(key))
    }

    /// Whether any restriction is in force.
    pub fn is_open(&self) -> bool {
        read(&self.keys).is_none()
    }

    /// Rereads the file (SIGHUP); on an error the old list stays.
    pub fn reload(&self) -> Result<usize, String> {
        let (flags, file) = read(&self.source).clone();
        self.reconfigure(flags, file)
    }

    /// Takes new `--allow` keys and `--allow-file` (a reread config file)
    /// and reads the file; on an error the old list and source stay.
    pub fn reconfigure(&self, flags: Vec<PublicKey>, file: Option<PathBuf>) -> Result<usize, String> {
        let keys = load(&flags, file.as_deref())?;
        let count = keys.as_ref().map_or(0, HashSet::len);
        *write(&self.keys) = keys;
        *write(&self.source) = (flags, file);
        Ok(count)
    }
}

fn load(flags: &[PublicKey], file: Option<&Path>) -> Result<Option<HashSet<PublicKey>>, String> {
    let mut keys: HashSet<PublicKey> = flags.iter().copied().collect();
    let Some(path) = file else { return Ok((!keys.is_empty()).then_some(keys)) };
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    keys.extend(parse(&text).map_err(|e| format!("{}: {e}", path.display()))?);
    // A file, even an empty one, restricts: an empty list admits no one.
    Ok(Some(keys))
}

/// One key a line; `#` starts a comment; blank lines are skipped.
fn parse(text: &str) -> Result<Vec<PublicKey>, String> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        keys.push(line.parse().map_err(|e| format!("line {}: {line:?} is not a public key ({e})", n + 1))?);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use seaport_proto::keys::{Keypair, Seed};

    fn key(n: u8) -> PublicKey {
        Keypair::from_seed(&Seed::from_bytes([n; 32])).public()
    }

    #[test]
    fn files_flags_comments_and_reloads() {
        let open = AllowList::new(vec![], None).unwrap();
        assert!(open.is_open() && open.admits(&key(1)));
        let path = std::env::temp_dir().join(format!("seaport-allow-{}", std::process::id()));
        std::fs::write(&path, format!("# proxies\n{}  # the web proxy\n\n", key(1))).unwrap();
        let list = AllowList::new(vec![key(2)], Some(path.clone())).unwrap();
        assert!(list.admits(&key(1)) && list.admits(&key(2)) && !list.admits(&key(3)));
        std::fs::write(&path, format!("{}\n", key(3))).unwrap();
        assert_eq!(list.reload(), Ok(2));
        assert!(!list.admits(&key(1)) && list.admits(&key(2)) && list.admits(&key(3)));
        std::fs::write(&path, "not a key\n").unwrap();
        let err = list.reload().unwrap_err();
        assert!(err.contains("line 1"), "{err}");
        assert!(list.admits(&key(3)), "a failed reload keeps the list");
        std::fs::write(&path, "").unwrap();
        assert_eq!(list.reload(), Ok(1));
        std::fs::remove_file(&path).unwrap();
    }
}
