//! The one in-memory test harness: a [`Registry`] and any number of peers
//! exchanging real bytes through a byte pump, on one virtual clock, with the
//! stream optionally cut at pseudo-random points. The registry's unit tests,
//! the model test, the world test and the `registry_ops` fuzz target all
//! drive the registry through it.
//!
//! Only with the `testing` feature (and in this crate's own tests): it panics
//! on a livelock, which is right for a test and wrong for anything else.
//!
//! Invariants: a peer attached to the registry has exactly one session id
//! until either side ends it; when the registry ends a session the peer sees
//! `handle_closed`, and when a peer ends one the registry does, so neither is
//! left holding a session the other forgot. Every registry event is kept in
//! [`Net::events`] for the test to assert on.

// Test support: a panic here is a failed test, with its message.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::client::RegistryClient;
use crate::hello::Intent;
use crate::keys::{Keypair, Seed};
use crate::message::{Message, MessageError};
use crate::registry::{Registry, RegistryEvent, SessionId};
use crate::session::Session;

/// The keypair of a small test seed (every byte `n`).
pub fn keypair(n: u8) -> Keypair {
    Keypair::from_seed(&Seed::from_bytes([n; 32]))
}

/// Cuts a byte stream into pieces: whole, or at points a seeded xorshift picks.
#[derive(Debug, Clone)]
pub struct Chunker(Option<u64>);

impl Chunker {
    /// Every write arrives as one read.
    pub fn whole() -> Chunker {
        Chunker(None)
    }

    /// Writes arrive in reads of 1 to 97 bytes, placed by `seed`.
    pub fn seeded(seed: u64) -> Chunker {
        Chunker(Some(seed | 1))
    }

    /// A pseudo-random number (for tests that need one besides the cuts).
    pub fn next_u64(&mut self) -> u64 {
        let x = self.0.get_or_insert(0x9e37_79b9_7f4a_7c15);
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// 32 pseudo-random bytes, as handshake entropy.
    pub fn entropy(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        out
    }

    fn split<'a>(&mut self, data: &'a [u8]) -> Vec<&'a [u8]> {
        if self.0.is_none() {
            return vec![data];
        }
        let mut out = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let n = 1 + (self.next_u64() % rest.len().min(97) as u64) as usize;
            let (piece, tail) = rest.split_at(n);
            out.push(piece);
            rest = tail;
        }
        out
    }
}

/// What the harness needs of a peer of the registry.
pub trait Peer {
    /// Bytes for the registry; false if none.
    fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool;
    /// Bytes from the registry.
    fn handle_input(&mut self, now: Instant, data: &[u8]);
    /// The registry closed the stream.
    fn handle_closed(&mut self);
    /// Timers; none by default.
    fn handle_timeout(&mut self, _now: Instant) {}
    /// When `handle_timeout` is due; never by default.
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
    /// Whether the peer ended its session by itself since last asked (the
    /// harness then closes the stream on the registry's side).
    fn take_ended(&mut self) -> bool;
}

/// A bare control session to the registry, sending whatever the test says
/// and keeping whatever comes back.
#[derive(Debug, Default)]
pub struct RawPeer {
    session: Option<Session>,
    /// Messages received, in order (undecodable ones as their error).
    pub inbox: VecDeque<Result<Message, MessageError>>,
    ended: bool,
}

impl RawPeer {
    /// A peer with no session.
    pub fn new() -> RawPeer {
        RawPeer::default()
    }

    /// Whether its session is open.
    pub fn is_established(&self) -> bool {
        self.session.as_ref().is_some_and(Session::is_established)
    }

    /// Whether it has a session (open or handshaking).
    pub fn is_attached(&self) -> bool {
        self.session.is_some()
    }

    /// Seals `plain` for the registry; false without an open session.
    pub fn send_plain(&mut self, plain: &[u8]) -> bool {
        self.session.as_mut().is_some_and(|s| s.send(plain).is_ok())
    }

    /// Encodes and seals `msg` for the registry.
    pub fn send(&mut self, msg: &Message) -> bool {
        let mut plain = Vec::new();
        msg.encode(&mut plain).expect("test messages encode");
        self.send_plain(&plain)
    }

    /// Everything received so far, decoded (panics on an undecodable one).
    pub fn take_messages(&mut self) -> Vec<Message> {
        self.inbox.drain(..).map(|m| m.expect("registry sent a decodable message")).collect()
    }
}

impl Peer for RawPeer {
    fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool {
        self.session.as_mut().is_some_and(|s| s.poll_transmit(buf))
    }
    fn handle_input(&mut self, now: Instant, data: &[u8]) {
        let Some(session) = &mut self.session else { return };
        let fed = session.handle_input(now, data);
        while let Some(plain) = session.poll_message() {
            self.inbox.push_back(Message::decode(&plain));
        }
        if fed.is_err() {
            self.session = None;
            self.ended = true;
        }
    }
    fn handle_closed(&mut self) {
        self.session = None;
    }
    fn take_ended(&mut self) -> bool {
        std::mem::take(&mut self.ended)
    }
}

/// A registry client (service or proxy) as a peer, with its events kept.
pub struct Client<C: RegistryClient> {
    /// The client.
    pub client: C,
    /// Its events, in order, until the test takes them.
    pub events: Vec<C::Event>,
    ended: bool,
}

impl<C: RegistryClient> Client<C> {
    /// Wraps `client`.
    pub fn new(client: C) -> Client<C> {
        Client { client, events: Vec::new(), ended: false }
    }

    fn drain(&mut self) {
        while let Some(event) = self.client.poll_event() {
            self.ended |= C::disconnect_reason(&event).is_some();
            self.events.push(event);
        }
    }
}

impl<C: RegistryClient> Peer for Client<C> {
    fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool {
        self.client.poll_transmit(buf)
    }
    fn handle_input(&mut self, now: Instant, data: &[u8]) {
        self.client.handle_input(now, data);
        self.drain();
    }
    fn handle_closed(&mut self) {
        self.client.handle_closed();
        self.drain();
        // The registry closed it: nothing for the harness to close in turn.
        self.ended = false;
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.client.handle_timeout(now);
        self.drain();
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.client.poll_timeout()
    }
    fn take_ended(&mut self) -> bool {
        std::mem::take(&mut self.ended)
    }
}

/// One peer and its place on the wire.
pub struct Attached<P> {
    /// The peer.
    pub peer: P,
    /// Its session at the registry, while it has one.
    pub session: Option<SessionId>,
    /// A frozen peer neither sends nor receives (a process under SIGSTOP).
    pub frozen: bool,
}

/// The registry and its peers on one virtual clock; see the module docs.
pub struct Net<P> {
    /// The virtual clock.
    pub now: Instant,
    /// The registry.
    pub registry: Registry,
    /// The peers, by index.
    pub peers: Vec<Attached<P>>,
    /// Every registry event so far.
    pub events: Vec<RegistryEvent>,
    /// Cuts the streams, and makes entropy.
    pub chunker: Chunker,
}

impl<P: Peer> Net<P> {
    /// A registry with no peers yet.
    pub fn new(registry: Registry, chunker: Chunker) -> Net<P> {
        Net { now: Instant::now(), registry, peers: Vec::new(), events: Vec::new(), chunker }
    }

    /// Adds a peer (not yet connected); returns its index.
    pub fn add(&mut self, peer: P) -> usize {
        self.peers.push(Attached { peer, session: None, frozen: false });
        self.peers.len() - 1
    }

    /// Opens a stream from peer `i` at the registry (its handshake is the
    /// peer's business); `None` if the registry is full.
    pub fn accept(&mut self, i: usize) -> Option<SessionId> {
        let entropy = self.chunker.entropy();
        let id = self.registry.accept(self.now, observed(i), entropy).ok()?;
        self.peers[i].session = Some(id);
        Some(id)
    }

    /// Closes peer `i`'s stream from its side: the registry hears of it.
    pub fn close(&mut self, i: usize) {
        if let Some(id) = self.peers[i].session.take() {
            self.registry.handle_closed(id);
            self.peers[i].peer.handle_closed();
        }
    }

    /// Moves bytes both ways and handles registry events until nothing moves.
    pub fn pump(&mut self) {
        for _ in 0..1000 {
            if !self.step() {
                return;
            }
        }
        panic!("livelock: bytes still moving after 1000 rounds");
    }

    /// One round of the pump; true if anything moved.
    fn step(&mut self) -> bool {
        let mut moved = false;
        let mut buf = Vec::new();
        for i in 0..self.peers.len() {
            let Attached { peer, session: Some(id), frozen: false } = &mut self.peers[i] else { continue };
            let id = *id;
            buf.clear();
            if peer.poll_transmit(&mut buf) {
                moved = true;
                for piece in self.chunker.split(&buf) {
                    self.registry.handle_input(self.now, id, piece);
                }
            }
        }
        buf.clear();
        while let Some(id) = self.registry.poll_transmit(&mut buf) {
            moved = true;
            if let Some(i) = self.index_of(id).filter(|i| !self.peers[*i].frozen) {
                // A frozen peer reads nothing: its bytes stay unwritten, as
                // they would in a full socket buffer.
                self.registry.handle_written(id, buf.len());
                for piece in self.chunker.split(&buf) {
                    self.peers[i].peer.handle_input(self.now, piece);
                }
            }
            buf.clear();
        }
        while let Some(event) = self.registry.poll_event() {
            if let RegistryEvent::SessionClosed { id, .. } = &event {
                // The driver closes the stream; the peer sees EOF.
                if let Some(i) = self.index_of(*id) {
                    self.peers[i].session = None;
                    self.peers[i].peer.handle_closed();
                }
            }
            self.events.push(event);
        }
        for i in 0..self.peers.len() {
            if self.peers[i].peer.take_ended() {
                moved = true;
                if let Some(id) = self.peers[i].session.take() {
                    self.registry.handle_closed(id);
                }
            }
        }
        moved
    }

    /// The peer holding session `id`.
    pub fn index_of(&self, id: SessionId) -> Option<usize> {
        self.peers.iter().position(|p| p.session == Some(id))
    }

    /// The earliest timer of the registry and the peers that are not frozen.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let peers = self.peers.iter().filter(|p| !p.frozen).filter_map(|p| p.peer.poll_timeout());
        peers.chain(self.registry.poll_timeout()).min()
    }

    /// Moves the clock to `now` and fires every timer that is due, then pumps.
    pub fn advance(&mut self, now: Instant) {
        self.now = self.now.max(now);
        self.registry.handle_timeout(self.now);
        for p in self.peers.iter_mut().filter(|p| !p.frozen) {
            p.peer.handle_timeout(self.now);
        }
        self.pump();
    }
}

impl Net<RawPeer> {
    /// Connects raw peer `i` with a real handshake as `keypair`.
    pub fn connect(&mut self, i: usize, keypair: &Keypair) {
        self.close(i);
        let Some(_) = self.accept(i) else { return };
        let key = self.registry.public_key();
        let entropy = self.chunker.entropy();
        let session = Session::initiate(self.now, keypair, &key, Intent::Control, entropy, HANDSHAKE)
            .expect("a session starts");
        self.peers[i].peer = RawPeer { session: Some(session), ..RawPeer::new() };
        self.pump();
    }

    /// Connects raw peer `i` as `keypair` without a handshake (no X25519):
    /// the fast path for tests that are not about the handshake.
    pub fn connect_established(&mut self, i: usize, keypair: &Keypair) {
        self.close(i);
        let entropy = self.chunker.entropy();
        let Ok((id, session)) = self.registry.accept_established(self.now, observed(i), keypair, entropy)
        else {
            return;
        };
        self.peers[i].session = Some(id);
        self.peers[i].peer = RawPeer { session: Some(session), ..RawPeer::new() };
        self.pump();
    }

    /// Sends `msg` from raw peer `i` and pumps; returns what it got back.
    pub fn exchange(&mut self, i: usize, msg: &Message) -> Vec<Message> {
        self.peers[i].peer.send(msg);
        self.pump();
        self.peers[i].peer.take_messages()
    }
}

/// The address the registry observes for peer `i`.
pub fn observed(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, (i % 250) as u8 + 2], 4000))
}

/// Handshake timeout of the harness's raw sessions.
const HANDSHAKE: Duration = Duration::from_secs(10);
