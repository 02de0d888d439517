//! What a service lets its proxies hold at once: links and streams per
//! proxy key, and streams in all. Each link or stream holds a guard that
//! gives its share back when dropped, so every exit path, a panic
//! included, returns it.
//!
//! Invariant: the counts never exceed their caps, and a key's entry exists
//! only while it holds a link or a stream (the map is bounded by them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use seaport_proto::keys::PublicKey;

use crate::lock::lock;

/// Most links one proxy key may hold to a service: as many as a proxy opens
/// to one instance (`link::MAX_LINKS_PER_INSTANCE`).
pub const MAX_LINKS_PER_PEER: usize = 64;

/// The caps, shared by every link of a service.
#[derive(Debug)]
pub struct Budget {
    max_streams: usize,
    max_streams_per_peer: usize,
    state: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    streams: usize,
    per_peer: HashMap<PublicKey, PeerHeld>,
}

#[derive(Debug, Default, Clone, Copy)]
struct PeerHeld {
    links: usize,
    streams: usize,
}

/// A link's share; given back on drop.
#[derive(Debug)]
pub struct LinkShare {
    budget: Arc<Budget>,
    peer: PublicKey,
}

/// A stream's share; given back on drop.
#[derive(Debug)]
pub struct StreamShare {
    budget: Arc<Budget>,
    peer: PublicKey,
}

/// Why a share was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OverBudget {
    /// The service holds `--max-streams` streams.
    #[error("the service holds its limit of {0} streams (--max-streams)")]
    Streams(usize),
    /// This proxy holds `--max-streams-per-proxy` streams.
    #[error("this proxy holds its limit of {0} streams (--max-streams-per-proxy)")]
    PeerStreams(usize),
    /// The service holds `--max-flows` UDP flows.
    #[error("the service holds its limit of {0} flows (--max-flows)")]
    Flows(usize),
    /// This proxy holds `--max-flows-per-proxy` UDP flows.
    #[error("this proxy holds its limit of {0} flows (--max-flows-per-proxy)")]
    PeerFlows(usize),
    /// This proxy holds [`MAX_LINKS_PER_PEER`] links.
    #[error("this proxy holds its limit of {0} links")]
    PeerLinks(usize),
}

impl Budget {
    /// At most `max_streams` streams in all and `max_streams_per_peer` per proxy key.
    pub fn new(max_streams: usize, max_streams_per_peer: usize) -> Arc<Budget> {
        Arc::new(Budget { max_streams, max_streams_per_peer, state: Mutex::default() })
    }

    /// A link for `peer`, if it holds fewer than [`MAX_LINKS_PER_PEER`].
    pub fn link(self: &Arc<Self>, peer: PublicKey) -> Result<LinkShare, OverBudget> {
        let mut held = lock(&self.state);
        let entry = held.per_peer.entry(peer).or_default();
        if entry.links >= MAX_LINKS_PER_PEER {
            return Err(OverBudget::PeerLinks(MAX_LINKS_PER_PEER));
        }
        entry.links += 1;
        Ok(LinkShare { budget: self.clone(), peer })
    }

    /// A UDP flow for `peer`, on a service of a UDP port, whose budget
    /// counts flows (made from `--max-flows` and `--max-flows-per-proxy`).
    pub fn flow(self: &Arc<Self>, peer: PublicKey) -> Result<StreamShare, OverBudget> {
        self.stream(peer).map_err(|e| match e {
            OverBudget::Streams(n) => OverBudget::Flows(n),
            OverBudget::PeerStreams(n) => OverBudget::PeerFlows(n),
            other => other,
        })
    }

    /// Streams held now, in all.
    pub fn streams(&self) -> usize {
        lock(&self.state).streams
    }

    fn stream(self: &Arc<Self>, peer: PublicKey) -> Result<StreamShare, OverBudget> {
        let mut held = lock(&self.state);
        if held.streams >= self.max_streams {
            return Err(OverBudget::Streams(self.max_streams));
        }
        let entry = held.per_peer.entry(peer).or_default();
        if entry.streams >= self.max_streams_per_peer {
            return Err(OverBudget::PeerStreams(self.max_streams_per_peer));
        }
        entry.streams += 1;
        held.streams += 1;
        Ok(StreamShare { budget: self.clone(), peer })
    }

    fn give_back(&self, peer: &PublicKey, links: usize, streams: usize) {
        let mut held = lock(&self.state);
        held.streams = held.streams.saturating_sub(streams);
        if let Some(entry) = held.per_peer.get_mut(peer) {
            entry.links = entry.links.saturating_sub(links);
            entry.streams = entry.streams.saturating_sub(streams);
            if entry.links == 0 && entry.streams == 0 {
                held.per_peer.remove(peer);
            }
        }
    }
}

impl LinkShare {
    /// A stream on this link, within the service's and this proxy's caps.
    pub fn stream(&self) -> Result<StreamShare, OverBudget> {
        self.budget.stream(self.peer)
    }
}

impl Drop for LinkShare {
    fn drop(&mut self) {
        self.budget.give_back(&self.peer, 1, 0);
    }
}

impl Drop for StreamShare {
    fn drop(&mut self) {
        self.budget.give_back(&self.peer, 0, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seaport_proto::keys::{Keypair, Seed};

    fn key(n: u8) -> PublicKey {
        Keypair::from_seed(&Seed::from_bytes([n; 32])).public()
    }

    #[test]
    fn caps_hold_per_proxy_and_in_all_and_shares_come_back() {
        let budget = Budget::new(3, 2);
        let a = budget.link(key(1)).unwrap();
        let b = budget.link(key(2)).unwrap();
        let a1 = a.stream().unwrap();
        let a2 = a.stream().unwrap();
        assert_eq!(a.stream().unwrap_err(), OverBudget::PeerStreams(2));
        let b1 = b.stream().unwrap();
        assert_eq!(b.stream().unwrap_err(), OverBudget::Streams(3));
        drop(a1);
        assert!(b.stream().is_ok(), "a stream given back is free again");
        drop((a2, b1));
        let links: Vec<_> = (0..MAX_LINKS_PER_PEER - 1).map(|_| budget.link(key(1)).unwrap()).collect();
        assert_eq!(budget.link(key(1)).unwrap_err(), OverBudget::PeerLinks(MAX_LINKS_PER_PEER));
        drop(links);
        drop((a, b));
        assert_eq!(budget.streams(), 0);
        assert!(lock(&budget.state).per_peer.is_empty(), "nothing held, nothing kept");
    }
}
