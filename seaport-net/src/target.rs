//! The `REGISTRY` argument: `KEY` (the registry set is found through the
//! DHT) or `KEY@HOST:PORT[,HOST:PORT...]` (a static set, dialed directly; the
//! key is still checked by every handshake). Each `HOST:PORT`, or each
//! registry the DHT record lists, is a [`Member`] of the set.
//!
//! Invariants: a `KEY@HOST:PORT,...` never touches the DHT, and a bare `KEY`
//! is dialed only at addresses its DHT record lists ([`crate::dht`]); a
//! static set names at most [`MAX_MEMBERS`] registries, each once.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use seaport_proto::client::MAX_MEMBERS;
use seaport_proto::keys::PublicKey;

use crate::dht::{DhtError, DhtNode, Starting};

/// A registry set as the user names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryTarget {
    /// The registries' public key, one for the whole set.
    pub key: PublicKey,
    /// `HOST:PORT`s to dial instead of asking the DHT (empty: ask it).
    pub members: Vec<String>,
}

impl RegistryTarget {
    /// Whether the set is found through the DHT (a bare key).
    pub fn in_dht(&self) -> bool {
        self.members.is_empty()
    }
}

impl FromStr for RegistryTarget {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (key, members) = match text.split_once('@') {
            Some((key, list)) => {
                let mut members: Vec<String> = Vec::new();
                for addr in list.split(',').map(str::trim) {
                    if addr
                        .rsplit_once(':')
                        .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
                    {
                        return Err(format!(
                            "{addr:?} is not HOST:PORT (e.g. 192.0.2.7:4500; several registries: \
                             KEY@HOST:PORT,HOST:PORT)"
                        ));
                    }
                    if !members.iter().any(|m| m == addr) {
                        members.push(addr.to_owned());
                    }
                }
                if members.len() > MAX_MEMBERS {
                    return Err(format!(
                        "{} registries named: a client follows at most {MAX_MEMBERS} of a set",
                        members.len()
                    ));
                }
                (key, members)
            }
            None => (text, Vec::new()),
        };
        let key = key.parse::<PublicKey>().map_err(|e| {
            format!(
                "registry key {key:?} is not valid ({e}); copy the 64-character pubkey the registry printed"
            )
        })?;
        Ok(RegistryTarget { key, members })
    }
}

impl fmt::Display for RegistryTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.members.is_empty() {
            write!(f, "{}", self.key)
        } else {
            write!(f, "{}@{}", self.key, self.members.join(","))
        }
    }
}

/// One registry of a set, as it is dialed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    /// A `HOST:PORT` the user gave: resolved at each dial.
    Named(String),
    /// The addresses the DHT record lists for it.
    Found(Vec<SocketAddr>),
}

impl Member {
    /// Whether `self` and `other` are the same registry: the same name, or
    /// addresses in common.
    pub fn is(&self, other: &Member) -> bool {
        match (self, other) {
            (Member::Named(a), Member::Named(b)) => a == b,
            (Member::Found(a), Member::Found(b)) => a.iter().any(|x| b.contains(x)),
            _ => false,
        }
    }

    /// The addresses at which it may be dialed now.
    pub async fn addrs(&self) -> Result<Vec<SocketAddr>, ResolveError> {
        match self {
            Member::Named(host) => {
                let addrs: Vec<SocketAddr> = tokio::net::lookup_host(host)
                    .await
                    .map_err(|error| ResolveError::Lookup { host: host.clone(), error })?
                    .collect();
                if addrs.is_empty() { Err(ResolveError::NoAddress(host.clone())) } else { Ok(addrs) }
            }
            Member::Found(addrs) if addrs.is_empty() => Err(ResolveError::NoAddress(self.to_string())),
            Member::Found(addrs) => Ok(addrs.clone()),
        }
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Member::Named(host) => f.write_str(host),
            Member::Found(addrs) => match addrs.as_slice() {
                [] => f.write_str("(no address)"),
                [one] => write!(f, "{one}"),
                [first, rest @ ..] => write!(f, "{first} (+{} more)", rest.len()),
            },
        }
    }
}

/// Why a registry's addresses could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// `HOST` of `KEY@HOST:PORT` did not resolve.
    #[error("cannot resolve {host}: {error}")]
    Lookup {
        /// The `HOST:PORT` given.
        host: String,
        /// The resolver's error.
        error: std::io::Error,
    },
    /// `HOST` resolved to nothing.
    #[error("{0} resolves to no address")]
    NoAddress(String),
    /// The DHT has no usable record for the key (yet).
    #[error(transparent)]
    Dht(#[from] DhtError),
    /// A bare key, but no DHT node was started.
    #[error("no DHT to resolve a bare key; use KEY@HOST:PORT")]
    NoDht,
    /// The DHT node is still starting (resolving its bootstrap hosts).
    #[error("the DHT node is still starting (resolving its bootstrap hosts)")]
    DhtStarting,
    /// The DHT node could not start.
    #[error("the DHT node could not start: {0}")]
    DhtFailed(String),
}

/// Turns a target into the members of its set.
#[derive(Clone)]
pub struct Resolver {
    dht: Option<Starting>,
}

impl Resolver {
    /// A resolver for `target`: it starts a DHT node, in the background,
    /// only when the set must be looked up (a bare `KEY`), bootstrapping
    /// from `bootstrap` if given.
    pub fn for_target(target: &RegistryTarget, bootstrap: &[String]) -> Resolver {
        if !target.in_dht() {
            return Resolver { dht: None };
        }
        let bootstrap = bootstrap.to_vec();
        Resolver { dht: Some(Starting::spawn(async move { DhtNode::client(&bootstrap).await })) }
    }

    /// The members of the set as known now: the ones named, or the ones the
    /// DHT record lists.
    pub async fn members(&self, target: &RegistryTarget) -> Result<Vec<Member>, ResolveError> {
        if !target.in_dht() {
            return Ok(target.members.iter().cloned().map(Member::Named).collect());
        }
        match self.dht.as_ref().map(Starting::node) {
            Some(Some(Ok(dht))) => {
                Ok(dht.resolve(&target.key).await?.into_iter().map(Member::Found).collect())
            }
            Some(Some(Err(e))) => Err(ResolveError::DhtFailed(e)),
            Some(None) => Err(ResolveError::DhtStarting),
            None => Err(ResolveError::NoDht),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "5b64a8956d8f2404c4f4b4e6f402ef439f610f7fe297718093641359130b0d45";

    #[test]
    fn parses_a_key_and_a_static_set() {
        let bare: RegistryTarget = KEY.parse().unwrap();
        assert!(bare.in_dht());
        let direct: RegistryTarget = format!("{KEY}@127.0.0.1:4500").parse().unwrap();
        assert_eq!(direct.members, ["127.0.0.1:4500"]);
        assert_eq!(direct.to_string(), format!("{KEY}@127.0.0.1:4500"));
        let set: RegistryTarget = format!("{KEY}@[::1]:4500, reg2.example:4500,[::1]:4500").parse().unwrap();
        assert_eq!(set.members, ["[::1]:4500", "reg2.example:4500"], "trimmed, each once");
        assert_eq!(set.to_string(), format!("{KEY}@[::1]:4500,reg2.example:4500"));
    }

    #[test]
    fn errors_name_the_problem() {
        assert!("abc".parse::<RegistryTarget>().unwrap_err().contains("64-character"));
        assert!(format!("{KEY}@host").parse::<RegistryTarget>().unwrap_err().contains("HOST:PORT"));
        assert!(format!("{KEY}@a:1,").parse::<RegistryTarget>().unwrap_err().contains("HOST:PORT"));
        let nine: Vec<String> = (1..=9).map(|i| format!("10.0.0.{i}:4500")).collect();
        let err = format!("{KEY}@{}", nine.join(",")).parse::<RegistryTarget>().unwrap_err();
        assert!(err.contains("at most 8"), "{err}");
    }

    #[test]
    fn a_member_is_known_by_its_name_or_any_of_its_addresses() {
        let found = |a: &[&str]| Member::Found(a.iter().map(|a| a.parse().unwrap()).collect());
        assert!(found(&["10.0.0.1:1", "[::1]:1"]).is(&found(&["[::1]:1"])));
        assert!(!found(&["10.0.0.1:1"]).is(&found(&["10.0.0.1:2"])));
        assert!(Member::Named("a:1".into()).is(&Member::Named("a:1".into())));
        assert_eq!(found(&["10.0.0.1:1", "[::1]:1"]).to_string(), "10.0.0.1:1 (+1 more)");
    }
}
