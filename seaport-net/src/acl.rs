//! The registry's `--acl FILE`: TOML, a list of grants, read into the
//! [`Acl`] that the registry state machine consults.
//!
//! ```toml
//! [[grant]]
//! keys = ["abe213…260f", "5b64a8…0d45"]   # ed25519 public keys (64 hex), or "*" for any key
//! register = ["couchdb", "@acme/*"]       # role names these keys may register; "*" = any
//! lookup = ["couchdb"]                    # role names they may look up and watch; "*" = any
//! ```
//!
//! `register` and `lookup` may be left out (nothing). Anything else (an
//! unknown field, a key that is not 64 hex characters, a pattern that is
//! not a role name, `*` or `@scope/*`, a grant without keys) is an error
//! naming the file, the line and what is wrong, so a typo is never read as
//! "nobody" or "everybody".
//!
//! Invariant: [`load`] returns a whole list or an error, never part of one;
//! the caller keeps the list in force when a reload fails.

use std::collections::HashSet;
use std::path::Path;

use seaport_proto::acl::{Acl, Grant, Grantees, Pattern};
use seaport_proto::keys::PublicKey;
use toml::Spanned;

/// The file: `[[grant]]` tables and nothing else.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    grant: Vec<Spanned<GrantFile>>,
}

/// One `[[grant]]`, its strings with their places in the file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantFile {
    keys: Vec<Spanned<String>>,
    #[serde(default)]
    register: Vec<Spanned<String>>,
    #[serde(default)]
    lookup: Vec<Spanned<String>>,
}

/// Reads and checks the ACL file at `path`. The error is one line:
/// `FILE: line N: what is wrong`.
pub fn load(path: &Path) -> Result<Acl, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses the text of an ACL file; errors say `line N: what is wrong`.
pub fn parse(text: &str) -> Result<Acl, String> {
    let line = |at: usize| text.get(..at).unwrap_or(text).matches('\n').count() + 1;
    let file: File = toml::from_str(text).map_err(|e| {
        let place = e.span().map_or_else(String::new, |span| format!("line {}: ", line(span.start)));
        format!("{place}{}", e.message().trim_end())
    })?;
    let mut grants = Vec::with_capacity(file.grant.len());
    for grant in file.grant {
        let at = line(grant.span().start);
        let grant = grant.into_inner();
        if grant.keys.is_empty() {
            return Err(format!("line {at}: a grant with no keys (list public keys, or \"*\" for any key)"));
        }
        let mut keys = HashSet::new();
        let mut anyone = false;
        for key in &grant.keys {
            if key.get_ref() == "*" {
                anyone = true;
                continue;
            }
            let parsed: PublicKey = key.get_ref().parse().map_err(|e| {
                format!("line {}: {:?} is not a public key ({e})", line(key.span().start), key.get_ref())
            })?;
            keys.insert(parsed);
        }
        let patterns = |list: &[Spanned<String>]| -> Result<Vec<Pattern>, String> {
            list.iter()
                .map(|p| {
                    Pattern::parse(p.get_ref()).map_err(|e| format!("line {}: {e}", line(p.span().start)))
                })
                .collect()
        };
        grants.push(Grant {
            keys: if anyone { Grantees::Anyone } else { Grantees::Keys(keys) },
            register: patterns(&grant.register)?,
            lookup: patterns(&grant.lookup)?,
        });
    }
    Ok(Acl::new(grants))
}

#[cfg(test)]
mod tests {
    use super::*;
    use seaport_proto::acl::Action;
    use seaport_proto::keys::{Keypair, Seed};

    fn key(n: u8) -> PublicKey {
        Keypair::from_seed(&Seed::from_bytes([n; 32])).public()
    }

    #[test]
    fn grants_read_with_comments_defaults_and_any_key() {
        let text = format!(
            "# the couchdb team\n[[grant]]\nkeys = [\"{}\", \"{}\"]  # two services\nregister = [\"couchdb\", \"@acme/*\"]\nlookup = [\"couchdb\"]\n\n[[grant]]\nkeys = [\"*\"]\nlookup = [\"public\"]\n",
            key(1),
            key(2)
        );
        let acl = parse(&text).unwrap();
        assert_eq!(acl.grants().len(), 2);
        assert!(acl.allows(&key(2), Action::Register, "@acme/web"));
        assert!(!acl.allows(&key(3), Action::Register, "couchdb"));
        assert!(acl.allows(&key(3), Action::Lookup, "public"));
        assert!(!acl.allows(&key(1), Action::Register, "public"), "register left out is nothing");
        assert_eq!(parse("").unwrap(), Acl::default(), "an empty file allows nothing");
    }

    #[test]
    fn errors_name_the_line_and_what_is_wrong() {
        let good = key(1).to_string();
        let cases = [
            (
                format!("[[grant]]\nkeys = [\"{good}\"]\nregister = [\"couch*\"]\n"),
                "line 3: invalid role pattern \"couch*\"",
            ),
            (
                format!("[[grant]]\nkeys = [\n  \"{good}\",\n  \"abc\",\n]\n"),
                "line 4: \"abc\" is not a public key",
            ),
            (
                format!("[[grant]]\nkeys = [\"{good}\"]\nregistr = [\"db\"]\n"),
                "line 3: unknown field `registr`",
            ),
            ("[[grant]]\nregister = [\"db\"]\n".to_owned(), "missing field `keys`"),
            ("\n\n[[grant]]\nkeys = []\n".to_owned(), "line 3: a grant with no keys"),
            ("[[grant]\nkeys = 1\n".to_owned(), "line 1: "),
            ("[[grant]]\nkeys = \"*\"\n".to_owned(), "line 2: "),
            ("[[grants]]\nkeys = [\"*\"]\n".to_owned(), "unknown field `grants`"),
        ];
        for (text, expected) in cases {
            let e = parse(&text).unwrap_err();
            assert!(e.contains(expected), "{text:?}: {e:?} lacks {expected:?}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
        let e = load(Path::new("/nonexistent/seaport.acl")).unwrap_err();
        assert!(e.starts_with("cannot read /nonexistent/seaport.acl"), "{e}");
    }
}
