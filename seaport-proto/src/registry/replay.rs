//! Replay protection and superseding for control sessions.
//!
//! A control hello carries a [`Stamp`]: a random value per process and a
//! counter per session. [`ReplayGuard`] remembers the last counter accepted
//! from each process of each identity, so a replayed first message (not
//! newer than one already accepted) is refused; and it knows which session
//! is the confirmed one of each process, so a newer session supersedes an
//! older one only after it has sent an authenticated message, which a
//! replayer cannot.
//!
//! Invariants: at most twice the registry's session limit of counters are
//! remembered, the oldest forgotten first, but never the counter of a
//! process with a confirmed session; one confirmed session per process.

use std::collections::{HashMap, VecDeque};

use super::SessionId;
use crate::hello::Stamp;
use crate::keys::PublicKey;

/// One process of an identity: what a session may supersede.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Identity {
    pub(super) key: PublicKey,
    pub(super) process: u64,
}

impl Identity {
    /// The identity a hello names: an unstamped peer (a build from before
    /// stamps) is process 0.
    pub(super) fn of(key: PublicKey, stamp: Option<Stamp>) -> Identity {
        Identity { key, process: stamp.map_or(0, |s| s.process) }
    }
}

/// The hello was not newer than one already accepted from its process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Replayed;

/// See the module docs.
pub(super) struct ReplayGuard {
    /// Confirmed sessions by identity and process, to supersede stale ones.
    confirmed: HashMap<Identity, SessionId>,
    /// The last stamp counter accepted per identity and process.
    counters: HashMap<Identity, u64>,
    /// `counters`' keys, oldest first.
    order: VecDeque<Identity>,
    /// Most counters remembered.
    capacity: usize,
}

impl ReplayGuard {
    /// A guard for a registry of at most `max_sessions` sessions: every
    /// live process, and as many that went away, are remembered.
    pub(super) fn new(max_sessions: usize) -> ReplayGuard {
        ReplayGuard {
            confirmed: HashMap::new(),
            counters: HashMap::new(),
            order: VecDeque::new(),
            capacity: max_sessions.saturating_mul(2),
        }
    }

    /// A handshake of `identity` completed with `stamp`: refused if it is
    /// not newer than the last one accepted from that process, else
    /// remembered. Unstamped hellos cannot be told apart and pass.
    pub(super) fn admit(&mut self, identity: Identity, stamp: Option<Stamp>) -> Result<(), Replayed> {
        let Some(stamp) = stamp else { return Ok(()) };
        if self.counters.get(&identity).is_some_and(|last| stamp.counter <= *last) {
            return Err(Replayed);
        }
        if self.counters.insert(identity, stamp.counter).is_none() {
            self.order.push_back(identity);
            // The oldest first, but never one with a live session: a
            // long-lived process keeps its counter however many come
            // and go (at most max_sessions are live, so this ends).
            let mut turns = self.order.len();
            while self.order.len() > self.capacity && turns > 0 {
                turns -= 1;
                let Some(old) = self.order.pop_front() else { break };
                if self.confirmed.contains_key(&old) {
                    self.order.push_back(old);
                } else {
                    self.counters.remove(&old);
                }
            }
        }
        Ok(())
    }

    /// Session `id` of `identity` sent its first authenticated message: it
    /// is the process's session now. Returns the older one it supersedes.
    pub(super) fn confirm(&mut self, identity: Identity, id: SessionId) -> Option<SessionId> {
        self.confirmed.insert(identity, id).filter(|old| *old != id)
    }

    /// Session `id` of `identity` ended.
    pub(super) fn release(&mut self, identity: Identity, id: SessionId) {
        if self.confirmed.get(&identity) == Some(&id) {
            self.confirmed.remove(&identity);
        }
    }
}
