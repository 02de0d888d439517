//! Admission: which connections a registry takes, and how many sessions
//! and handshakes it holds.
//!
//! Handshakes under way have a pool of their own (in all and per source),
//! so a flood of silent connections cannot take an established session's
//! slot; an established session counts against `max_sessions` from its
//! handshake's completion until it ends. A source is an IPv4 address or an
//! IPv6 /64 ([`Source`]): one host or site is usually given a whole /64, so
//! counting its addresses one by one would let it take the whole pool.
//!
//! Invariants: the counts equal the peers in each state (the registry moves
//! a peer between them only through [`Admission`]); no zero count is kept
//! per source.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// Who a connection counts against: its IPv4 address (an IPv4-mapped IPv6
/// address counts as the IPv4 one), or its IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// The source `ip` belongs to.
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(_) => Source(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => Source(IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !((1u128 << 64) - 1)))),
            },
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(ip) => write!(f, "{ip}"),
            IpAddr::V6(ip) => write!(f, "{ip}/64"),
        }
    }
}

/// The registry cannot take this connection; close it at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Full {
    /// `max_sessions` established sessions.
    #[error("registry is at its limit of {0} sessions")]
    Sessions(usize),
    /// `max_handshakes` handshakes under way.
    #[error("registry is at its limit of {0} handshakes under way")]
    Handshakes(usize),
    /// `max_handshakes_per_source` handshakes under way from this source.
    #[error("{0} already has {1} handshakes under way")]
    Source(Source, usize),
}

/// The counts; see the module docs.
pub(super) struct Admission {
    max_sessions: usize,
    max_handshakes: usize,
    max_handshakes_per_source: usize,
    /// Handshakes under way, per source.
    per_source: HashMap<Source, usize>,
    /// Handshakes under way, in all.
    handshaking: usize,
    /// Sessions whose handshake completed.
    established: usize,
}

impl Admission {
    pub(super) fn new(
        max_sessions: usize,
        max_handshakes: usize,
        max_handshakes_per_source: usize,
    ) -> Admission {
        Admission {
            max_sessions,
            max_handshakes,
            max_handshakes_per_source,
            per_source: HashMap::new(),
            handshaking: 0,
            established: 0,
        }
    }

    /// Whether a new connection from `ip` may start a handshake.
    pub(super) fn check(&self, ip: IpAddr) -> Result<(), Full> {
        self.check_sessions()?;
        if self.handshaking >= self.max_handshakes {
            return Err(Full::Handshakes(self.max_handshakes));
        }
        let source = Source::of(ip);
        let from = self.per_source.get(&source).copied().unwrap_or(0);
        if from >= self.max_handshakes_per_source {
            return Err(Full::Source(source, from));
        }
        Ok(())
    }

    /// Whether one more session fits.
    pub(super) fn check_sessions(&self) -> Result<(), Full> {
        if self.established >= self.max_sessions {
            return Err(Full::Sessions(self.max_sessions));
        }
        Ok(())
    }

    /// A handshake from `ip` starts (after [`Admission::check`]).
    pub(super) fn start_handshake(&mut self, ip: IpAddr) {
        *self.per_source.entry(Source::of(ip)).or_default() += 1;
        self.handshaking += 1;
    }

    /// A handshake from `ip` completed or failed.
    pub(super) fn end_handshake(&mut self, ip: IpAddr) {
        self.handshaking = self.handshaking.saturating_sub(1);
        let source = Source::of(ip);
        if let Some(n) = self.per_source.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
    }

    /// A session is established (after [`Admission::check_sessions`]).
    pub(super) fn establish(&mut self) {
        self.established += 1;
    }

    /// An established session ended.
    pub(super) fn release(&mut self) {
        self.established = self.established.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let of = |s: &str| Source::of(s.parse().unwrap());
        assert_eq!(of("2001:db8:1:2::1"), of("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_ne!(of("2001:db8:1:2::1"), of("2001:db8:1:3::1"));
        assert_eq!(of("::ffff:192.0.2.7"), of("192.0.2.7"));
        assert_ne!(of("192.0.2.7"), of("192.0.2.8"));
        assert_eq!(of("2001:db8:1:2:3:4:5:6").to_string(), "2001:db8:1:2::/64");
        assert_eq!(of("192.0.2.7").to_string(), "192.0.2.7");
    }
}
