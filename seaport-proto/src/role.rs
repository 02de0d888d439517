//! Roles: what a service offers (`couchdb@3.2.2`) and what a proxy asks for
//! (`couchdb@3.x`).
//!
//! A [`Role`] is a name, an exact version and optional tags; a [`RoleQuery`] is
//! a name and an npm range (see [`crate::range`]). Names follow npm package
//! names, scoped ones (`@scope/name`) included, so the version separator is the
//! last `@` that is not the first character.
//!
//! Invariants: a `Role` or `RoleQuery` that exists has passed `parse`, also
//! when it arrives from a peer (deserialising parses again), and its size is
//! bounded by the limits below.

use std::fmt;

use semver::Version;

use crate::range::{self, RangeError, VersionRange};

/// Longest role name (npm's package-name limit).
pub const MAX_NAME_LEN: usize = 214;
/// Most tags on one role.
pub const MAX_TAGS: usize = 16;
/// Longest tag.
pub const MAX_TAG_LEN: usize = 64;

/// Why a role or query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoleError {
    /// `name@version` without the `@version`.
    #[error("{0:?} has no version: write NAME@VERSION, e.g. couchdb@3.2.2")]
    MissingVersion(String),
    /// A name that is empty, too long or has characters npm does not allow.
    #[error(
        "invalid role name {0:?}: use letters, digits, '.', '_', '-', '~' (optionally @scope/name), at most {MAX_NAME_LEN} characters"
    )]
    Name(String),
    /// The version or range part.
    #[error(transparent)]
    Version(#[from] RangeError),
    /// A tag that is empty, too long or contains white space or control characters.
    #[error("invalid tag {0:?}: 1 to {MAX_TAG_LEN} printable characters without spaces")]
    Tag(String),
    /// More than [`MAX_TAGS`] tags.
    #[error("too many tags: at most {MAX_TAGS}")]
    TooManyTags,
}

fn name_part_ok(part: &str) -> bool {
    !part.is_empty()
        && part.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~'))
        && !part.starts_with('.')
}

pub(crate) fn check_name(name: &str) -> Result<(), RoleError> {
    let ok = name.len() <= MAX_NAME_LEN
        && match name.strip_prefix('@') {
            Some(scoped) => scoped.split_once('/').is_some_and(|(s, n)| name_part_ok(s) && name_part_ok(n)),
            None => name_part_ok(name),
        };
    if ok { Ok(()) } else { Err(RoleError::Name(name.to_owned())) }
}

/// Splits `name@rest` at the last `@` that does not start the text.
fn split_role(text: &str) -> (&str, Option<&str>) {
    match text.rfind('@') {
        Some(at) if at > 0 => (&text[..at], Some(&text[at + 1..])),
        _ => (text, None),
    }
}

/// A service's role: name, exact version and tags.
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "RoleWire", into = "RoleWire")]
pub struct Role {
    name: String,
    version: Version,
    tags: Vec<String>,
}

impl Role {
    /// Parses `NAME@VERSION`; the version is exact and normalised as npm does
    /// (`v3.2.2+build` registers as `3.2.2`).
    pub fn parse(text: &str) -> Result<Role, RoleError> {
        let text = text.trim();
        let (name, version) = split_role(text);
        let version = version.ok_or_else(|| RoleError::MissingVersion(text.to_owned()))?;
        check_name(name)?;
        Ok(Role { name: name.to_owned(), version: range::parse_version(version)?, tags: Vec::new() })
    }

    /// Adds tags (free-form labels shown with lookups).
    pub fn with_tags<I, S>(mut self, tags: I) -> Result<Role, RoleError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        for tag in tags {
            let tag = tag.into();
            let ok = !tag.is_empty()
                && tag.len() <= MAX_TAG_LEN
                && tag.chars().all(|c| !c.is_whitespace() && !c.is_control());
            if !ok {
                return Err(RoleError::Tag(tag));
            }
            if self.tags.len() == MAX_TAGS {
                return Err(RoleError::TooManyTags);
            }
            self.tags.push(tag);
        }
        Ok(self)
    }

    /// The role's name (`couchdb`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exact version.
    pub fn version(&self) -> &Version {
        &self.version
    }

    /// The tags, in the order given.
    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    /// The protocol its service forwards: a service of a UDP port registers
    /// its role with the tag [`UDP_TAG`], so registries of any version
    /// carry it and proxies of any version see it.
    pub fn protocol(&self) -> Protocol {
        if self.tags.iter().any(|t| t == UDP_TAG) { Protocol::Udp } else { Protocol::Tcp }
    }

    /// The role marked as forwarded over `protocol` (the tag added or
    /// left out); fails only when it already has [`MAX_TAGS`] tags.
    pub fn with_protocol(self, protocol: Protocol) -> Result<Role, RoleError> {
        match (protocol, self.protocol()) {
            (Protocol::Udp, Protocol::Tcp) => self.with_tags([UDP_TAG]),
            _ => Ok(self),
        }
    }
}

/// Tags beginning so are seaport's own; a user may not set them.
pub const RESERVED_TAG_PREFIX: &str = "seaport:";
/// The tag that marks a role whose service forwards UDP datagrams.
pub const UDP_TAG: &str = "seaport:udp";

/// What a service forwards: TCP connections (streams) or UDP datagrams
/// (flows). A proxy serves a role only over the protocol its instances
/// forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// TCP connections: a proxy port is a TCP listener.
    #[default]
    Tcp,
    /// UDP datagrams: a proxy port is a UDP socket.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

impl fmt::Debug for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Role({self}")?;
        for tag in &self.tags {
            write!(f, " #{tag}")?;
        }
        f.write_str(")")
    }
}

/// The wire form of a [`Role`]; decoding goes through `Role::parse` again.
#[derive(serde::Serialize, serde::Deserialize)]
struct RoleWire {
    name: String,
    version: String,
    tags: Vec<String>,
}

impl From<Role> for RoleWire {
    fn from(role: Role) -> Self {
        RoleWire { version: role.version.to_string(), name: role.name, tags: role.tags }
    }
}

impl TryFrom<RoleWire> for Role {
    type Error = RoleError;
    fn try_from(wire: RoleWire) -> Result<Self, RoleError> {
        if wire.tags.len() > MAX_TAGS {
            return Err(RoleError::TooManyTags);
        }
        check_name(&wire.name)?;
        let role = Role { name: wire.name, version: range::parse_version(&wire.version)?, tags: Vec::new() };
        role.with_tags(wire.tags)
    }
}

/// What a proxy looks for: a role name and an npm range.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RoleQuery {
    name: String,
    /// `None`: every version matches, prereleases included.
    range: Option<VersionRange>,
}

impl RoleQuery {
    /// Parses `NAME@RANGE` or a bare `NAME` (any version).
    pub fn parse(text: &str) -> Result<RoleQuery, RoleError> {
        let text = text.trim();
        let (name, range) = split_role(text);
        check_name(name)?;
        let range = range.map(VersionRange::parse).transpose()?;
        Ok(RoleQuery { name: name.to_owned(), range })
    }

    /// The role name asked for.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `role` answers this query: same name, version in range.
    pub fn matches(&self, role: &Role) -> bool {
        role.name == self.name && self.range.as_ref().is_none_or(|r| r.matches(&role.version))
    }
}

impl fmt::Display for RoleQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.range {
            Some(range) => write!(f, "{}@{}", self.name, range),
            None => f.write_str(&self.name),
        }
    }
}

impl fmt::Debug for RoleQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoleQuery({self})")
    }
}

impl From<RoleQuery> for String {
    fn from(q: RoleQuery) -> String {
        q.to_string()
    }
}

impl TryFrom<String> for RoleQuery {
    type Error = RoleError;
    fn try_from(text: String) -> Result<Self, RoleError> {
        RoleQuery::parse(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walkthrough_roles() {
        let role = Role::parse("couchdb@3.2.2").unwrap();
        assert_eq!(role.name(), "couchdb");
        assert_eq!(role.to_string(), "couchdb@3.2.2");
        assert!(RoleQuery::parse("couchdb@3.x").unwrap().matches(&role));
        assert!(!RoleQuery::parse("couchdb@4.x").unwrap().matches(&role));
        assert!(!RoleQuery::parse("redis@3.x").unwrap().matches(&role));
        assert!(RoleQuery::parse("couchdb").unwrap().matches(&role));
        let pre = Role::parse("couchdb@4.0.0-rc.1").unwrap();
        assert!(RoleQuery::parse("couchdb").unwrap().matches(&pre));
    }

    #[test]
    fn scoped_names_and_normalised_versions() {
        let role = Role::parse("@acme/db@v1.2.3+build.7").unwrap();
        assert_eq!(role.name(), "@acme/db");
        assert_eq!(role.to_string(), "@acme/db@1.2.3");
        let query = RoleQuery::parse("@acme/db").unwrap();
        assert_eq!(query.name(), "@acme/db");
        assert!(query.matches(&role));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = Role::parse("couchdb").unwrap_err();
        assert!(e.to_string().contains("NAME@VERSION"), "{e}");
        assert!(matches!(Role::parse("couchdb@3.x"), Err(RoleError::Version(_))));
        assert!(matches!(Role::parse("couch db@3.2.2"), Err(RoleError::Name(_))));
        assert!(matches!(RoleQuery::parse("db@latest-ish"), Err(RoleError::Version(_))));
        let role = Role::parse("db@1.0.0").unwrap();
        assert!(matches!(role.clone().with_tags(["a b"]), Err(RoleError::Tag(_))));
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| i.to_string()).collect();
        assert_eq!(role.with_tags(many).unwrap_err(), RoleError::TooManyTags);
    }
}

#[cfg(test)]
mod protocol_tests {
    use super::*;

    #[test]
    fn a_role_carries_its_protocol_in_a_reserved_tag() {
        let role = Role::parse("dns@1.0.0").unwrap().with_tags(["eu"]).unwrap();
        assert_eq!(role.protocol(), Protocol::Tcp);
        let udp = role.clone().with_protocol(Protocol::Udp).unwrap();
        assert_eq!(udp.protocol(), Protocol::Udp);
        assert_eq!(udp.tags(), ["eu", UDP_TAG]);
        // Marking twice adds nothing; TCP adds nothing.
        assert_eq!(udp.clone().with_protocol(Protocol::Udp).unwrap(), udp);
        assert_eq!(role.clone().with_protocol(Protocol::Tcp).unwrap(), role);
        assert!(UDP_TAG.starts_with(RESERVED_TAG_PREFIX));
        // It survives the wire as any tag does.
        let wire = postcard::to_allocvec(&udp).unwrap();
        assert_eq!(postcard::from_bytes::<Role>(&wire).unwrap().protocol(), Protocol::Udp);
    }
}
