//! Who may do what at a registry: the parsed form of `seaport-registry
//! --acl FILE`. The file's syntax is read elsewhere (`seaport-net`); this is
//! the model the [`crate::registry::Registry`] consults on every register,
//! lookup and watch, and re-applies to what it holds when a new one is set
//! ([`crate::registry::Registry::set_acl`]).
//!
//! An [`Acl`] is a list of [`Grant`]s. A grant names keys (or any key) and
//! the role names those keys may register and may look up (lookups and
//! watches alike). A key may do what any grant that names it allows, and
//! nothing else: grants only ever add, there is no deny. Role names are
//! matched by [`Pattern`]: an exact name, `*` for any name, or a scope
//! wildcard `@scope/*` for every name in that npm scope.
//!
//! Invariants: every pattern that exists was checked by [`Pattern::parse`]
//! (an exact name is a valid role name, a scope a valid scope), so a typo
//! in the file is refused at start or on reload instead of silently matching
//! nothing; checks are a walk over the grants, no allocation.

use std::collections::HashSet;
use std::fmt;

use crate::keys::PublicKey;
use crate::role::check_name;

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid role pattern {0:?}: use an exact role name (couchdb, @acme/db), \"*\" for any name, or \"@scope/*\" for every name in a scope"
)]
pub struct PatternError(pub String);

/// A set of role names: see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// `*`: every name.
    Any,
    /// One exact name.
    Exact(String),
    /// `@scope/*`: every name that starts with `@scope/` (kept with the
    /// slash, so `@acme/*` never matches `@acmeco/db`).
    Scope(String),
}

impl Pattern {
    /// Parses `*`, `@scope/*` or an exact role name.
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        let refused = || PatternError(text.to_owned());
        if text == "*" {
            return Ok(Pattern::Any);
        }
        if let Some(scope) = text.strip_suffix("/*") {
            // A scope is valid when `@scope/x` is a valid name.
            if !scope.starts_with('@') || check_name(&format!("{scope}/x")).is_err() {
                return Err(refused());
            }
            return Ok(Pattern::Scope(format!("{scope}/")));
        }
        check_name(text).map_err(|_| refused())?;
        Ok(Pattern::Exact(text.to_owned()))
    }

    /// Whether the role name `name` is in this set.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(exact) => exact == name,
            Pattern::Scope(prefix) => name.starts_with(prefix.as_str()),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Exact(name) => f.write_str(name),
            Pattern::Scope(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// Whom a grant is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grantees {
    /// `"*"`: any key that completes a handshake with the registry.
    Anyone,
    /// These keys.
    Keys(HashSet<PublicKey>),
}

/// One `[[grant]]`: what its keys may register and look up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Whom it is for.
    pub keys: Grantees,
    /// Role names they may register.
    pub register: Vec<Pattern>,
    /// Role names they may look up and watch.
    pub lookup: Vec<Pattern>,
}

impl Grant {
    fn names(&self, key: &PublicKey) -> bool {
        match &self.keys {
            Grantees::Anyone => true,
            Grantees::Keys(keys) => keys.contains(key),
        }
    }
}

/// What a key asks to do with a role name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Register an instance under it.
    Register,
    /// Look it up or watch it.
    Lookup,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Register => "register",
            Action::Lookup => "look up",
        })
    }
}

/// A registry's access control list; see the module docs. An empty list
/// allows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    grants: Vec<Grant>,
}

impl Acl {
    /// The list made of `grants`.
    pub fn new(grants: Vec<Grant>) -> Acl {
        Acl { grants }
    }

    /// The grants, in the order given.
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// Whether any grant names `key` (or anyone): a key named nowhere may do
    /// nothing, so it need not hold a session either.
    pub fn names(&self, key: &PublicKey) -> bool {
        self.grants.iter().any(|g| g.names(key))
    }

    /// Whether `key` may do `action` with the role name `name`.
    pub fn allows(&self, key: &PublicKey, action: Action, name: &str) -> bool {
        self.grants.iter().filter(|g| g.names(key)).any(|g| {
            let patterns = match action {
                Action::Register => &g.register,
                Action::Lookup => &g.lookup,
            };
            patterns.iter().any(|p| p.matches(name))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::keypair;

    fn key(n: u8) -> PublicKey {
        keypair(n).public()
    }

    fn patterns(texts: &[&str]) -> Vec<Pattern> {
        texts.iter().map(|t| Pattern::parse(t).unwrap()).collect()
    }

    #[test]
    fn patterns_match_exact_names_any_name_and_scopes() {
        let exact = Pattern::parse("couchdb").unwrap();
        assert!(exact.matches("couchdb"));
        assert!(!exact.matches("couchdb2") && !exact.matches("couch") && !exact.matches("@x/couchdb"));
        assert!(Pattern::parse("*").unwrap().matches("@any/thing"));
        let scope = Pattern::parse("@acme/*").unwrap();
        assert!(scope.matches("@acme/db") && scope.matches("@acme/web"));
        assert!(!scope.matches("@acmeco/db"), "a scope is matched with its slash");
        assert!(!scope.matches("acme") && !scope.matches("@acme"));
        let scoped_exact = Pattern::parse("@acme/db").unwrap();
        assert!(scoped_exact.matches("@acme/db") && !scoped_exact.matches("@acme/dbx"));
        assert_eq!(scope.to_string(), "@acme/*");
    }

    #[test]
    fn bad_patterns_are_refused_with_the_text() {
        for bad in ["", "couch*", "*db", "acme/*", "@/*", "@acme/*/x", "Couch DB", "@acme", "**"] {
            let e = Pattern::parse(bad).unwrap_err();
            assert_eq!(e.0, bad);
            assert!(e.to_string().contains("@scope/*"), "{e}");
        }
    }

    #[test]
    fn a_key_may_do_what_some_grant_allows_and_nothing_else() {
        let acl = Acl::new(vec![
            Grant {
                keys: Grantees::Keys([key(1), key(2)].into_iter().collect()),
                register: patterns(&["couchdb", "@acme/*"]),
                lookup: patterns(&["couchdb"]),
            },
            Grant { keys: Grantees::Anyone, register: vec![], lookup: patterns(&["public"]) },
            Grant {
                keys: Grantees::Keys([key(3)].into_iter().collect()),
                register: vec![],
                lookup: patterns(&["*"]),
            },
        ]);
        assert!(acl.allows(&key(1), Action::Register, "couchdb"));
        assert!(acl.allows(&key(2), Action::Register, "@acme/web"));
        assert!(!acl.allows(&key(1), Action::Register, "redis"));
        assert!(!acl.allows(&key(4), Action::Register, "couchdb"), "a key in no grant registers nothing");
        assert!(acl.allows(&key(1), Action::Lookup, "couchdb"));
        assert!(!acl.allows(&key(1), Action::Lookup, "@acme/web"), "register does not imply lookup");
        assert!(acl.allows(&key(4), Action::Lookup, "public"), "\"*\" names every key");
        assert!(acl.allows(&key(1), Action::Lookup, "public"), "grants add up");
        assert!(acl.allows(&key(3), Action::Lookup, "anything"));
        assert!(!acl.allows(&key(3), Action::Register, "anything"));
        let empty = Acl::default();
        assert!(!empty.allows(&key(1), Action::Lookup, "couchdb"), "an empty list allows nothing");
    }
}
