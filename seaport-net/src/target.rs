//! The `REGISTRY` argument: `KEY` (found through the DHT) or `KEY@HOST:PORT`
//! (dialed directly; the key is still checked by the handshake).
//!
//! Invariant: a `KEY@HOST:PORT` never touches the DHT, and a bare `KEY` is
//! dialed only at addresses its DHT record lists ([`crate::dht`]).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use seaport_proto::keys::PublicKey;

use crate::dht::{DhtError, DhtNode, Starting};

/// A registry as the user names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryTarget {
    /// The registry's public key.
    pub key: PublicKey,
    /// `HOST:PORT` to dial instead of asking the DHT.
    pub direct: Option<String>,
}

impl FromStr for RegistryTarget {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (key, direct) = match text.split_once('@') {
            Some((key, addr)) => {
                if addr
                    .rsplit_once(':')
                    .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
                {
                    return Err(format!("{addr:?} is not HOST:PORT (e.g. 192.0.2.7:4500)"));
                }
                (key, Some(addr.to_owned()))
            }
            None => (text, None),
        };
        let key = key.parse::<PublicKey>().map_err(|e| {
            format!(
                "registry key {key:?} is not valid ({e}); copy the 64-character pubkey the registry printed"
            )
        })?;
        Ok(RegistryTarget { key, direct })
    }
}

impl fmt::Display for RegistryTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.direct {
            Some(addr) => write!(f, "{}@{addr}", self.key),
            None => write!(f, "{}", self.key),
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

/// Turns a target into addresses to dial.
#[derive(Clone)]
pub struct Resolver {
    dht: Option<Starting>,
}

impl Resolver {
    /// A resolver for `target`: it starts a DHT node, in the background,
    /// only when the key must be looked up (a bare `KEY`), bootstrapping
    /// from `bootstrap` if given.
    pub fn for_target(target: &RegistryTarget, bootstrap: &[String]) -> Resolver {
        if target.direct.is_some() {
            return Resolver { dht: None };
        }
        let bootstrap = bootstrap.to_vec();
        Resolver { dht: Some(Starting::spawn(async move { DhtNode::client(&bootstrap).await })) }
    }

    /// The addresses at which the registry may be dialed now.
    pub async fn resolve(&self, target: &RegistryTarget) -> Result<Vec<SocketAddr>, ResolveError> {
        match &target.direct {
            Some(host) => {
                let addrs: Vec<SocketAddr> = tokio::net::lookup_host(host)
                    .await
                    .map_err(|error| ResolveError::Lookup { host: host.clone(), error })?
                    .collect();
                if addrs.is_empty() { Err(ResolveError::NoAddress(host.clone())) } else { Ok(addrs) }
            }
            None => match self.dht.as_ref().map(Starting::node) {
                Some(Some(Ok(dht))) => Ok(dht.resolve(&target.key).await?.concat()),
                Some(Some(Err(e))) => Err(ResolveError::DhtFailed(e)),
                Some(None) => Err(ResolveError::DhtStarting),
                None => Err(ResolveError::NoDht),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "5b64a8956d8f2404c4f4b4e6f402ef439f610f7fe297718093641359130b0d45";

    #[test]
    fn parses_both_forms() {
        let bare: RegistryTarget = KEY.parse().unwrap();
        assert_eq!(bare.direct, None);
        let direct: RegistryTarget = format!("{KEY}@127.0.0.1:4500").parse().unwrap();
        assert_eq!(direct.direct.as_deref(), Some("127.0.0.1:4500"));
        assert_eq!(direct.to_string(), format!("{KEY}@127.0.0.1:4500"));
        let v6: RegistryTarget = format!("{KEY}@[::1]:4500").parse().unwrap();
        assert_eq!(v6.direct.as_deref(), Some("[::1]:4500"));
    }

    #[test]
    fn errors_name_the_problem() {
        assert!("abc".parse::<RegistryTarget>().unwrap_err().contains("64-character"));
        assert!(format!("{KEY}@host").parse::<RegistryTarget>().unwrap_err().contains("HOST:PORT"));
    }
}
