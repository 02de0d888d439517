//! Admission: which connections a registry takes, and how many sessions
//! and handshakes it holds.
//!
//! Handshakes under way have a pool of their own (in all and per source),
//! so a flood of silent connections cannot take an established session's
//! slot; an established session counts against `max_sessions` from its
//! handshake's completion until it ends.
//!
//! Invariants: the counts equal the peers in each state (the registry moves
//! a peer between them only through [`Admission`]); no zero count is kept
//! per source.

use std::collections::HashMap;
use std::net::IpAddr;

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
    /// `max_handshakes_per_source` handshakes under way from this address.
    #[error("{0} already has {1} handshakes under way")]
    Source(IpAddr, usize),
}

/// The counts; see the module docs.
pub(super) struct Admission {
    max_sessions: usize,
    max_handshakes: usize,
    max_handshakes_per_source: usize,
    /// Handshakes under way, per source.
    per_source: HashMap<IpAddr, usize>,
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
        let from = self.per_source.get(&ip).copied().unwrap_or(0);
        if from >= self.max_handshakes_per_source {
            return Err(Full::Source(ip, from));
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
        *self.per_source.entry(ip).or_default() += 1;
        self.handshaking += 1;
    }

    /// A handshake from `ip` completed or failed.
    pub(super) fn end_handshake(&mut self, ip: IpAddr) {
        self.handshaking = self.handshaking.saturating_sub(1);
        if let Some(n) = self.per_source.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_source.remove(&ip);
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
