//! The registry state machine: control sessions, registrations, lookups and
//! watches, for any number of peers.
//!
//! Registrations are soft state owned by the session that made them: they
//! vanish when it ends, whether it closed, failed, went silent past the idle
//! timeout, or was superseded by a newer session of the same process of the
//! same identity (a service that reconnects before its old session was
//! noticed dead). Every change to the registered set is pushed to each watch
//! whose query it matches.
//!
//! Identity and replay: a control session's hello carries a
//! [`Stamp`](crate::noise::Stamp), a random value per process and a counter
//! per session. Sessions of different processes under one key (one seed per
//! host, several units) coexist, each owning its registrations. A first
//! message whose counter is not above the last one accepted from that
//! process is a replay and is dropped without a word; and a new session
//! supersedes the old one only once it has sent an authenticated message,
//! which a replayer cannot.
//!
//! Driving it (sans-io; see the crate docs for the general contract):
//! - a new TCP connection: [`Registry::accept`], which may refuse when full;
//! - bytes read: [`Registry::handle_input`]; the stream closed: [`Registry::handle_closed`];
//! - a timer at [`Registry::poll_timeout`]: [`Registry::handle_timeout`];
//! - after each of those: drain [`Registry::poll_transmit`] (bytes for one
//!   session per call), then [`Registry::poll_event`]. A
//!   [`RegistryEvent::SessionClosed`] tells the driver to close that stream
//!   after writing what `poll_transmit` gave it.
//!
//! Bounds: sessions, registrations and watches per session, registrations
//! in all, bytes queued for one peer and bytes queued for all peers together
//! are all capped by [`RegistryConfig`].
//!
//! Queues: a request's answer (a lookup's, an error, a pong) is checked
//! against the peer's cap *before* it is queued, and a peer it would take
//! past `max_queued` is dropped as slow, so no peer ever has more than that
//! queued. A watch's updates are not queued at each change: a change marks
//! the watch as due, and its answer is made from the directory as it is
//! then, once everything handed out for that peer before was written, and
//! when it fits the peer's cap and the registry's total budget. A watch thus
//! has at most one update waiting, always the latest set, however fast the
//! registered set churns; a watcher is dropped only for not reading what it
//! asked for itself.
//!
//! Access: with an [`Acl`] ([`Registry::set_acl`]), a key may register,
//! look up and watch only the role names a grant gives it; anything else is
//! refused with [`ErrorCode::FORBIDDEN`] and the session goes on. Setting a
//! new list withdraws the registrations and ends the watches it no longer
//! grants, at once. Without one, any key may do anything.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::acl::{Acl, Action};
use crate::directory::Directory;
use crate::frame::HEADER_LEN;
use crate::keys::{Keypair, PublicKey};
use crate::meet::{Arrival, ArrivalError, MeetConfig, MeetSide, Meetings, Party, Ticket};
use crate::message::{ErrorCode, Instance, MAX_ADDRS, Message, MessageError};
use crate::noise::{Capabilities, Intent, Stamp, TAG_LEN};
use crate::role::Role;
use crate::session::{Session, SessionError};

/// Limits and timers of a registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// How long a peer may take to complete its handshake.
    pub handshake_timeout: Duration,
    /// A session silent this long is dead (clients ping well within it).
    pub idle_timeout: Duration,
    /// Most concurrent established sessions.
    pub max_sessions: usize,
    /// Most handshakes under way at once, in a pool of their own: a flood of
    /// silent connections cannot take an established session's slot.
    pub max_handshakes: usize,
    /// Most handshakes under way from one source address.
    pub max_handshakes_per_source: usize,
    /// Most registrations one session may hold.
    pub max_registrations: usize,
    /// Most watches one session may hold.
    pub max_watches: usize,
    /// Most bytes queued for a peer before it is dropped as too slow. Keep
    /// it at least twice [`crate::message::MAX_ANSWER_BYTES`], so that a
    /// whole answer fits beside what is under way (below that, a watch
    /// update that does not fit an empty queue goes as one message, cut).
    pub max_queued: usize,
    /// Most registrations held at once, all sessions together; more are
    /// refused with [`ErrorCode::LIMIT`].
    pub max_total_registrations: usize,
    /// Most bytes queued for all peers together. Past it, lookups are
    /// refused with [`ErrorCode::LIMIT`], watch updates wait, and a peer
    /// that is behind with its reading is dropped rather than sent more;
    /// only a peer with nothing queued still gets a small message (at most
    /// one control message over the budget per such peer).
    pub max_total_queued: usize,
    /// Bounds on meetings (hole punching and relays, [`crate::meet`]).
    pub meet: MeetConfig,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(15),
            max_sessions: 10_000,
            max_handshakes: 1024,
            max_handshakes_per_source: 16,
            max_registrations: 64,
            max_watches: 64,
            max_queued: 1 << 20,
            max_total_registrations: 100_000,
            max_total_queued: 256 << 20,
            meet: MeetConfig::default(),
        }
    }
}

/// One process of an identity: what a session may supersede.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Identity {
    key: PublicKey,
    process: u64,
}

/// Identifies one control session (one TCP connection) for the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// The stream was closed by the peer or the driver.
    #[error("connection closed")]
    Closed,
    /// The session failed at the Noise layer (handshake, decryption, timeout).
    #[error(transparent)]
    Session(#[from] SessionError),
    /// Nothing heard within the idle timeout.
    #[error("peer silent for {0:?}")]
    Idle(Duration),
    /// The peer sent a control message that does not decode.
    #[error("peer sent a malformed message: {0}")]
    Malformed(#[source] MessageError),
    /// The peer sent a kind of message that only a registry sends (named).
    #[error("peer sent a {0} message, which only a registry sends")]
    WrongDirection(&'static str),
    /// The peer ended the session with an error of its own.
    #[error("peer reported an error: {code}: {text}")]
    PeerError {
        /// Its code.
        code: ErrorCode,
        /// Its text.
        text: String,
    },
    /// The peer did not read what it was sent.
    #[error("peer not reading: {0} bytes queued")]
    Slow(usize),
    /// A newer session of the same process of this identity replaced this one.
    #[error("superseded by a newer session of the same process")]
    Superseded,
    /// The registry's total queue budget was spent while this peer had
    /// bytes it had not read yet.
    #[error("peer behind with its reading while the registry is at its queue budget: {0} bytes queued")]
    Budget(usize),
    /// Under an access list, the key is in no grant.
    #[error("key in no grant of the access list")]
    Forbidden,
    /// The handshake completed while `max_sessions` sessions were open.
    #[error("registry is at its limit of {0} sessions")]
    Full(usize),
    /// The handshake was not newer than one already accepted from the same
    /// process of that identity: a replayed first message.
    #[error("handshake replayed (not newer than one already accepted from that process)")]
    Replayed,
}

/// What happened, for the driver's logs and stream management.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryEvent {
    /// A peer completed its handshake.
    SessionOpened {
        /// The session.
        id: SessionId,
        /// Its authenticated identity.
        peer: PublicKey,
    },
    /// A session ended: close its stream once its last bytes are written.
    SessionClosed {
        /// The session.
        id: SessionId,
        /// Its identity, if the handshake completed.
        peer: Option<PublicKey>,
        /// Why.
        reason: CloseReason,
    },
    /// An instance was registered (or re-registered).
    Registered {
        /// The service's identity.
        peer: PublicKey,
        /// Its role.
        role: Role,
    },
    /// An instance was withdrawn, explicitly or with its session.
    Unregistered {
        /// The service's identity.
        peer: PublicKey,
        /// Its role.
        role: Role,
    },
    /// A meeting was arranged: both sides have the ticket.
    MeetArranged {
        /// Who asked.
        proxy: PublicKey,
        /// Whom it wants to reach.
        service: PublicKey,
    },
    /// The access control list refused a request, or withdrew what it no
    /// longer grants ([`Registry::set_acl`]).
    Forbidden {
        /// Whose.
        peer: PublicKey,
        /// What was refused or withdrawn, as the peer was told.
        text: String,
    },
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
    /// `max_handshakes_per_source` handshakes under way from this address.
    #[error("{0} already has {1} handshakes under way")]
    Source(std::net::IpAddr, usize),
}

struct Peer {
    session: Session,
    observed: SocketAddr,
    /// Its identity and process, once the handshake told them.
    identity: Option<Identity>,
    /// It has sent an authenticated message: only now may it supersede.
    confirmed: bool,
    /// It counts in the handshake pool (until its handshake completes).
    handshaking: bool,
    /// It counts against `max_sessions` (from its handshake's completion,
    /// unless it was refused then). Exactly one of the two, or neither.
    established: bool,
    last_heard: Instant,
    /// Already in `Registry::dirty`.
    dirty: bool,
    /// Bytes handed to the driver by `poll_transmit` and not yet reported
    /// written ([`Registry::handle_written`]): with what the session still
    /// holds, what this peer has not read. The one slow-peer measure.
    unwritten: usize,
    /// This peer's share of `Registry::queued`, as last counted.
    counted: usize,
    /// Watches whose update is due and not made yet (see the module docs).
    due: BTreeSet<u32>,
}

impl Peer {
    /// Bytes queued for this peer and not yet written.
    fn queued(&self) -> usize {
        self.session.pending_transmit().saturating_add(self.unwritten)
    }

    /// Whether its answers may come in parts.
    fn takes_parts(&self) -> bool {
        self.session.remote_capabilities().contains(Capabilities::PARTS)
    }
}

/// Whether more bytes can be queued for a peer.
enum Room {
    Fits,
    /// Past the peer's own cap: it asks faster than it reads.
    PeerFull(usize),
    /// Past the registry's total budget.
    RegistryFull,
}

/// The bytes `plain` takes once sealed and framed.
fn sealed_len(plain: &[u8]) -> usize {
    plain.len() + TAG_LEN + HEADER_LEN
}

/// The registry; see the module docs.
pub struct Registry {
    keypair: Keypair,
    config: RegistryConfig,
    next_id: u64,
    peers: HashMap<SessionId, Peer>,
    /// Confirmed sessions by identity and process, to supersede stale ones.
    by_identity: HashMap<Identity, SessionId>,
    /// The last stamp counter accepted per identity and process (bounded:
    /// the oldest entries go first), so a replayed first message is refused.
    counters: HashMap<Identity, u64>,
    counter_order: VecDeque<Identity>,
    /// Registrations and watches, owned by session.
    directory: Directory,
    /// Meetings waiting for their meet connections.
    meetings: Meetings,
    /// Handshakes under way, per source address.
    handshakes: HashMap<std::net::IpAddr, usize>,
    /// Handshakes under way, in all.
    handshaking: usize,
    /// Sessions whose handshake completed.
    established: usize,
    /// Sessions with bytes to send, in the order they got them.
    dirty: VecDeque<SessionId>,
    /// Final bytes of sessions that were closed.
    farewells: VecDeque<(SessionId, Vec<u8>)>,
    events: VecDeque<RegistryEvent>,
    next_sweep: Option<Instant>,
    /// Lookups and watches answered (for metrics).
    lookups_answered: u64,
    /// Who may do what; `None`: anyone anything.
    acl: Option<Acl>,
    /// Bytes queued for all peers together (the sum of their `counted`).
    queued: usize,
    /// Peers with due watch updates that wait for the total budget.
    starved: BTreeSet<SessionId>,
}

/// How often silent sessions are looked for: bounds detection to idle + this.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

impl Registry {
    /// A registry answering as `keypair`.
    pub fn new(keypair: Keypair, config: RegistryConfig) -> Registry {
        Registry {
            meetings: Meetings::new(&keypair, config.meet.clone()),
            keypair,
            config,
            next_id: 0,
            peers: HashMap::new(),
            by_identity: HashMap::new(),
            counters: HashMap::new(),
            counter_order: VecDeque::new(),
            directory: Directory::new(),
            handshakes: HashMap::new(),
            handshaking: 0,
            established: 0,
            dirty: VecDeque::new(),
            farewells: VecDeque::new(),
            events: VecDeque::new(),
            next_sweep: None,
            lookups_answered: 0,
            acl: None,
            queued: 0,
            starved: BTreeSet::new(),
        }
    }

    /// Bytes queued for all peers together, not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

    /// The access control list in force; `None`: anyone may do anything.
    pub fn acl(&self) -> Option<&Acl> {
        self.acl.as_ref()
    }

    /// Puts `acl` in force (`None`: anyone may do anything). What it no
    /// longer grants ends at once: such a registration is withdrawn (its
    /// watchers hear of it) and its service gets an [`ErrorCode::FORBIDDEN`]
    /// error naming it; such a watch is dropped with the same error.
    pub fn set_acl(&mut self, acl: Option<Acl>) {
        self.acl = acl;
        let mut sessions: Vec<(SessionId, PublicKey)> =
            self.peers.iter().filter_map(|(id, p)| Some((*id, p.session.remote()?))).collect();
        sessions.sort_unstable();
        for (id, key) in sessions {
            let regs: Vec<(u32, String)> = self
                .directory
                .registrations_of(id)
                .into_iter()
                .filter(|(_, i)| !self.allows(&key, Action::Register, i.role.name()))
                .map(|(reg, i)| (reg, i.role.to_string()))
                .collect();
            for (reg, role) in regs {
                self.unregister(id, reg);
                self.forbid(id, key, reg, &format!("registration of {role} withdrawn: {}", Action::Register));
            }
            let watches: Vec<(u32, String)> = self
                .directory
                .watches_of(id)
                .into_iter()
                .filter(|(_, q)| !self.allows(&key, Action::Lookup, q.name()))
                .map(|(watch, q)| (watch, q.name().to_owned()))
                .collect();
            for (watch, name) in watches {
                self.directory.unwatch((id, watch));
                if let Some(peer) = self.peers.get_mut(&id) {
                    peer.due.remove(&watch);
                }
                self.forbid(id, key, watch, &format!("watch of {name} ended: {}", Action::Lookup));
            }
        }
    }

    fn allows(&self, key: &PublicKey, action: Action, name: &str) -> bool {
        self.acl.as_ref().is_none_or(|acl| acl.allows(key, action, name))
    }

    /// Refuses request `req` of `key` (session `id`) with FORBIDDEN. `what`
    /// says what was refused; the text adds that the key is not granted it.
    fn forbid(&mut self, id: SessionId, key: PublicKey, req: u32, what: &str) {
        let text = format!("{what}: key {key} is not granted this by the registry's access list");
        self.send(id, &error(Some(req), ErrorCode::FORBIDDEN, &text));
        self.events.push_back(RegistryEvent::Forbidden { peer: key, text });
    }

    /// The registry's identity.
    pub fn public_key(&self) -> PublicKey {
        self.keypair.public()
    }

    /// Sessions open now, handshaking ones included.
    pub fn session_count(&self) -> usize {
        self.peers.len()
    }

    /// Registered instances now.
    pub fn instance_count(&self) -> usize {
        self.directory.instance_count()
    }

    /// Every session now (read-only; for a status page): its id, its
    /// identity once the handshake completed, and the address it came from.
    pub fn sessions(&self) -> impl Iterator<Item = (SessionId, Option<PublicKey>, SocketAddr)> + '_ {
        self.peers.iter().map(|(id, peer)| (*id, peer.session.remote(), peer.observed))
    }

    /// Lookups and watches answered since start.
    pub fn lookups_answered(&self) -> u64 {
        self.lookups_answered
    }

    /// What is registered and watched now.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Mixes fresh randomness into meeting tickets (once, at start), so they
    /// differ from one run to the next.
    pub fn mix_entropy(&mut self, entropy: [u8; 32]) {
        self.meetings.mix_entropy(entropy);
    }

    /// A meet connection from `from` arrived with `ticket` as `side` (its
    /// first frame was a [`crate::meet::MeetHello`]); see [`Meetings::arrive`].
    pub fn arrive(
        &mut self,
        now: Instant,
        ticket: Ticket,
        side: MeetSide,
        from: std::net::IpAddr,
    ) -> Result<Arrival, ArrivalError> {
        self.meetings.arrive(now, ticket, side, from)
    }

    /// A new connection from `observed`; `entropy` seeds its handshake.
    pub fn accept(
        &mut self,
        now: Instant,
        observed: SocketAddr,
        entropy: [u8; 32],
    ) -> Result<SessionId, Full> {
        let config = &self.config;
        if self.established >= config.max_sessions {
            return Err(Full::Sessions(config.max_sessions));
        }
        if self.handshaking >= config.max_handshakes {
            return Err(Full::Handshakes(config.max_handshakes));
        }
        let from = self.handshakes.get(&observed.ip()).copied().unwrap_or(0);
        if from >= config.max_handshakes_per_source {
            return Err(Full::Source(observed.ip(), from));
        }
        let session =
            Session::respond(now, &self.keypair, Intent::Control, entropy, config.handshake_timeout)
                .map_err(|_| Full::Handshakes(config.max_handshakes))?;
        let id = self.insert(now, observed, session);
        *self.handshakes.entry(observed.ip()).or_default() += 1;
        self.handshaking += 1;
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.handshaking = true;
        }
        Ok(id)
    }

    fn insert(&mut self, now: Instant, observed: SocketAddr, session: Session) -> SessionId {
        let id = SessionId(self.next_id);
        self.next_id += 1;
        let peer = Peer {
            session,
            observed,
            identity: None,
            confirmed: false,
            handshaking: false,
            established: false,
            last_heard: now,
            dirty: false,
            unwritten: 0,
            counted: 0,
            due: BTreeSet::new(),
        };
        self.peers.insert(id, peer);
        self.next_sweep.get_or_insert(now + SWEEP_INTERVAL);
        id
    }

    /// Bytes read from session `id`'s stream.
    pub fn handle_input(&mut self, now: Instant, id: SessionId, data: &[u8]) {
        let Some(peer) = self.peers.get_mut(&id) else { return };
        peer.last_heard = now;
        let was_open = peer.session.is_established();
        if let Err(e) = peer.session.handle_input(now, data) {
            self.close(id, CloseReason::Session(e));
            return;
        }
        if !was_open && peer.session.is_established() {
            // Out of the handshake pool, into the sessions'.
            let (key, stamp) = (peer.session.remote(), peer.session.remote_stamp());
            self.leave_handshake_pool(id);
            if self.established >= self.config.max_sessions {
                self.send(id, &error(None, ErrorCode::LIMIT, "the registry is at its session limit"));
                self.close(id, CloseReason::Full(self.config.max_sessions));
                return;
            }
            // Under an access list, a key no grant names may do nothing: it
            // gets no session slot to sit on.
            if let Some(key) = key.filter(|k| self.acl.as_ref().is_some_and(|acl| !acl.names(k))) {
                self.send(
                    id,
                    &error(None, ErrorCode::FORBIDDEN, &format!("{key} is in no grant of this registry")),
                );
                self.close(id, CloseReason::Forbidden);
                return;
            }
            self.established += 1;
            if let Some(peer) = self.peers.get_mut(&id) {
                peer.established = true;
            }
            if let Some(key) = key {
                if !self.opened(id, key, stamp) {
                    return;
                }
            }
        }
        self.mark_dirty(id);
        while let Some(plain) = self.peers.get_mut(&id).and_then(|p| p.session.poll_event()) {
            self.confirm(id);
            match Message::decode(&plain) {
                Ok(msg) => self.handle_message(now, id, msg),
                // A newer peer's request: refuse that one, keep the session.
                // Without a readable id it cannot be a request; ignore it.
                Err(MessageError::UnknownKind { kind, id: Some(req) }) => {
                    let text = format!("this registry does not know message kind {kind}");
                    self.send(id, &error(Some(req), ErrorCode::UNSUPPORTED, &text));
                }
                Err(MessageError::UnknownKind { id: None, .. }) => {}
                Err(e) => {
                    self.send(id, &error(None, ErrorCode::MALFORMED, &e.to_string()));
                    self.close(id, CloseReason::Malformed(e));
                }
            }
        }
        self.recount(id);
        self.check_queue(id);
    }

    /// Session `id` no longer counts as a handshake under way.
    fn leave_handshake_pool(&mut self, id: SessionId) {
        let Some(peer) = self.peers.get_mut(&id) else { return };
        if !std::mem::replace(&mut peer.handshaking, false) {
            return;
        }
        self.handshaking = self.handshaking.saturating_sub(1);
        let ip = peer.observed.ip();
        if let Some(n) = self.handshakes.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.handshakes.remove(&ip);
            }
        }
    }

    /// Session `id` completed its handshake as `key` with `stamp`; false if
    /// it was refused as a replay (and dropped without a word: a replayer
    /// cannot read one). It supersedes nothing yet: see [`Registry::confirm`].
    fn opened(&mut self, id: SessionId, key: PublicKey, stamp: Option<Stamp>) -> bool {
        // An unstamped peer (a build from before stamps) is process 0.
        let identity = Identity { key, process: stamp.map_or(0, |s| s.process) };
        if let Some(stamp) = stamp {
            if self.counters.get(&identity).is_some_and(|last| stamp.counter <= *last) {
                self.drop_silently(id, CloseReason::Replayed);
                return false;
            }
            if self.counters.insert(identity, stamp.counter).is_none() {
                self.counter_order.push_back(identity);
                // Twice the sessions allowed: every live process, and as
                // many that went away, are remembered.
                // The oldest first, but never one with a live session: a
                // long-lived process keeps its counter however many come
                // and go (at most max_sessions are live, so this ends).
                let mut turns = self.counter_order.len();
                while self.counter_order.len() > self.config.max_sessions.saturating_mul(2) && turns > 0 {
                    turns -= 1;
                    let Some(old) = self.counter_order.pop_front() else { break };
                    if self.by_identity.contains_key(&old) {
                        self.counter_order.push_back(old);
                    } else {
                        self.counters.remove(&old);
                    }
                }
            }
        }
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.identity = Some(identity);
        }
        self.events.push_back(RegistryEvent::SessionOpened { id, peer: key });
        true
    }

    /// Session `id` sent an authenticated message: the first one proves it
    /// is no replay, so only now does it supersede an older session of the
    /// same identity and process (one that died without the registry
    /// noticing). Sessions of other processes of that identity stay.
    fn confirm(&mut self, id: SessionId) {
        let Some(peer) = self.peers.get_mut(&id) else { return };
        if std::mem::replace(&mut peer.confirmed, true) {
            return;
        }
        let Some(identity) = peer.identity else { return };
        if let Some(old) = self.by_identity.insert(identity, id).filter(|old| *old != id) {
            self.send(old, &error(None, ErrorCode::SUPERSEDED, "a newer session of this identity took over"));
            self.close(old, CloseReason::Superseded);
        }
    }

    /// Test and fuzz shortcut: a new connection whose session is open at
    /// once, as `peer`, with no handshake (no X25519 at all). Returns the
    /// peer's end of the session. The peer's identity is taken on trust, so
    /// this exists only with the `testing` feature, never in a real build.
    #[cfg(feature = "testing")]
    pub fn accept_established(
        &mut self,
        now: Instant,
        observed: SocketAddr,
        peer: &Keypair,
        entropy: [u8; 32],
    ) -> Result<(SessionId, Session), Full> {
        if self.established >= self.config.max_sessions {
            return Err(Full::Sessions(self.config.max_sessions));
        }
        let (ours, theirs) = Session::established_pair(&self.keypair, peer, Intent::Control, entropy);
        let id = self.insert(now, observed, ours);
        self.established += 1;
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.established = true;
        }
        self.opened(id, peer.public(), None);
        Ok((id, theirs))
    }

    /// Test shortcut: session `id`'s peer is taken to have advertised
    /// `capabilities` (an older build's, say).
    #[cfg(feature = "testing")]
    pub fn set_remote_capabilities(&mut self, id: SessionId, capabilities: Capabilities) {
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.session.set_remote_capabilities(capabilities);
        }
    }

    /// Session `id`'s stream closed.
    pub fn handle_closed(&mut self, id: SessionId) {
        self.close(id, CloseReason::Closed);
    }

    /// Ends handshakes that took too long and sessions that went silent.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_sweep.is_some_and(|t| now < t) {
            return;
        }
        let mut expired = Vec::new();
        for (id, peer) in &mut self.peers {
            if let Err(e) = peer.session.handle_timeout(now) {
                expired.push((*id, CloseReason::Session(e)));
            } else if now.saturating_duration_since(peer.last_heard) >= self.config.idle_timeout {
                expired.push((*id, CloseReason::Idle(self.config.idle_timeout)));
            }
        }
        expired.sort_by_key(|(id, _)| *id);
        for (id, reason) in expired {
            self.close(id, reason);
        }
        self.meetings.expire(now);
        self.next_sweep = (!self.peers.is_empty()).then_some(now + SWEEP_INTERVAL);
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    /// Moves bytes for one session into `buf` and says which; `None` when
    /// nothing is waiting.
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<SessionId> {
        if let Some((id, bytes)) = self.farewells.pop_front() {
            buf.extend_from_slice(&bytes);
            return Some(id);
        }
        while let Some(id) = self.dirty.pop_front() {
            // While the peer is still marked dirty, so that what this sends
            // does not queue it again.
            self.make_due_updates(id);
            if let Some(peer) = self.peers.get_mut(&id) {
                peer.dirty = false;
                let before = buf.len();
                if peer.session.poll_transmit(buf) {
                    peer.unwritten = peer.unwritten.saturating_add(buf.len().saturating_sub(before));
                    return Some(id);
                }
            }
        }
        None
    }

    /// Makes the answers of session `id`'s due watches from the directory
    /// as it is now, as many as fit, once everything handed out for it
    /// before was written (see the module docs). The rest stay due: a
    /// written report or freed budget brings them back here.
    fn make_due_updates(&mut self, id: SessionId) {
        let Some(peer) = self.peers.get(&id) else { return };
        if peer.unwritten > 0 || peer.due.is_empty() {
            return;
        }
        let parts = peer.takes_parts();
        let due: Vec<u32> = peer.due.iter().copied().collect();
        for watch in due {
            let Some(query) = self.directory.watch_query((id, watch)) else {
                if let Some(peer) = self.peers.get_mut(&id) {
                    peer.due.remove(&watch);
                }
                continue;
            };
            let mut answer = self.directory.answer(watch, query, parts);
            let empty = self.peers.get(&id).is_some_and(|p| p.queued() == 0);
            match self.room(id, &answer) {
                Room::Fits => {}
                // An answer bigger than the whole queue cap would never go:
                // one message of it, marked truncated, does.
                Room::PeerFull(_) if empty && parts => {
                    answer = self.directory.answer(watch, query, false);
                    if !matches!(self.room(id, &answer), Room::Fits) {
                        return;
                    }
                }
                Room::PeerFull(_) => return,
                Room::RegistryFull => {
                    self.starved.insert(id);
                    return;
                }
            }
            if let Some(peer) = self.peers.get_mut(&id) {
                peer.due.remove(&watch);
            }
            self.send_all(id, &answer);
        }
    }

    /// Whether `plains` can be queued for session `id` now.
    fn room(&self, id: SessionId, plains: &[Vec<u8>]) -> Room {
        let Some(peer) = self.peers.get(&id) else { return Room::Fits };
        let size: usize = plains.iter().map(|p| sealed_len(p)).sum();
        let queued = peer.queued();
        if queued.saturating_add(size) > self.config.max_queued {
            Room::PeerFull(queued)
        } else if self.queued.saturating_add(size) > self.config.max_total_queued {
            Room::RegistryFull
        } else {
            Room::Fits
        }
    }

    /// Brings `Registry::queued` up to date with session `id`'s queue.
    fn recount(&mut self, id: SessionId) {
        let Some(peer) = self.peers.get_mut(&id) else { return };
        let now = peer.queued();
        self.queued = self.queued.saturating_sub(peer.counted).saturating_add(now);
        peer.counted = now;
    }

    /// The driver wrote `n` bytes of what [`Registry::poll_transmit`] gave for
    /// session `id` to its stream. A driver that never calls this makes every
    /// peer look slow once `max_queued` bytes went out; one that calls it
    /// when the bytes were handed to the kernel gets the intended measure.
    pub fn handle_written(&mut self, id: SessionId, n: usize) {
        let Some(peer) = self.peers.get_mut(&id) else { return };
        peer.unwritten = peer.unwritten.saturating_sub(n);
        let due = peer.unwritten == 0 && !peer.due.is_empty();
        self.recount(id);
        if due {
            self.mark_dirty(id);
        }
        self.retry_starved();
    }

    /// Budget freed: peers whose updates waited for it try again, once the
    /// total is back to half the budget. Not at every byte written: each
    /// retry builds a whole answer, and with many peers waiting near the
    /// limit most would be built only to be thrown away.
    fn retry_starved(&mut self) {
        if !self.starved.is_empty() && self.queued <= self.config.max_total_queued / 2 {
            for starved in std::mem::take(&mut self.starved) {
                self.mark_dirty(starved);
            }
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<RegistryEvent> {
        self.events.pop_front()
    }

    fn handle_message(&mut self, now: Instant, id: SessionId, msg: Message) {
        let Some(peer) = self.peers.get(&id) else { return };
        let Some(key) = peer.session.remote() else { return };
        match msg {
            Message::Register { id: reg, role, port, addrs } => {
                // The access list first: a key that may not register learns
                // nothing of the limits.
                if !self.allows(&key, Action::Register, role.name()) {
                    self.forbid(id, key, reg, &format!("{} {role} refused", Action::Register));
                    return;
                }
                let replacing = self.directory.has_registration((id, reg));
                if !replacing && self.directory.registration_count(id) >= self.config.max_registrations {
                    let text = format!("at most {} registrations per session", self.config.max_registrations);
                    self.send(id, &error(Some(reg), ErrorCode::LIMIT, &text));
                    return;
                }
                if !replacing && self.directory.instance_count() >= self.config.max_total_registrations {
                    let text = format!(
                        "the registry holds its maximum of {} registrations",
                        self.config.max_total_registrations
                    );
                    self.send(id, &error(Some(reg), ErrorCode::LIMIT, &text));
                    return;
                }
                let mut dialable = vec![SocketAddr::new(peer.observed.ip(), port)];
                for addr in addrs {
                    if plausible(addr, peer.observed)
                        && !dialable.contains(&addr)
                        && dialable.len() <= MAX_ADDRS
                    {
                        dialable.push(addr);
                    }
                }
                // The old registration goes first, so its watchers hear of both changes.
                self.unregister(id, reg);
                self.directory.register((id, reg), Instance { key, role: role.clone(), addrs: dialable });
                self.send(id, &Message::Registered { id: reg });
                self.events.push_back(RegistryEvent::Registered { peer: key, role: role.clone() });
                self.notify(&role);
            }
            Message::Unregister { id: reg } => {
                if !self.unregister(id, reg) {
                    self.send(id, &error(Some(reg), ErrorCode::UNKNOWN, "no such registration"));
                }
            }
            Message::Lookup { id: req, query } => {
                if !self.allows(&key, Action::Lookup, query.name()) {
                    self.forbid(id, key, req, &format!("{} {query} refused", Action::Lookup));
                    return;
                }
                let answer = self.directory.answer(req, &query, peer.takes_parts());
                match self.room(id, &answer) {
                    Room::Fits => {
                        self.send_all(id, &answer);
                        self.lookups_answered += 1;
                    }
                    Room::PeerFull(queued) => self.drop_silently(id, CloseReason::Slow(queued)),
                    Room::RegistryFull => {
                        let text = "the registry is at its queue budget: ask again later";
                        self.send(id, &error(Some(req), ErrorCode::LIMIT, text));
                    }
                }
            }
            Message::Watch { id: watch, query } => {
                if !self.allows(&key, Action::Lookup, query.name()) {
                    self.forbid(id, key, watch, &format!("watch of {query} refused"));
                    return;
                }
                let replacing = self.directory.has_watch((id, watch));
                if !replacing && self.directory.watch_count(id) >= self.config.max_watches {
                    let text = format!("at most {} watches per session", self.config.max_watches);
                    self.send(id, &error(Some(watch), ErrorCode::LIMIT, &text));
                    return;
                }
                self.directory.watch((id, watch), query);
                self.make_due(id, watch);
                self.lookups_answered += 1;
            }
            Message::Unwatch { id: watch } => {
                if !self.directory.unwatch((id, watch)) {
                    self.send(id, &error(Some(watch), ErrorCode::UNKNOWN, "no such watch"));
                }
            }
            Message::Meet { id: req, service, role } => self.meet(now, id, key, req, service, &role),
            Message::Ping { nonce } => self.send(id, &Message::Pong { nonce }),
            Message::Pong { .. } => {}
            Message::Error { code, text, .. } => {
                // A peer's complaint is worth a log line, not a reply.
                self.events.push_back(RegistryEvent::SessionClosed {
                    id,
                    peer: Some(key),
                    reason: CloseReason::PeerError { code, text },
                });
                self.drop_session(id);
            }
            other @ (Message::Registered { .. }
            | Message::Instances { .. }
            | Message::InstancesPart { .. }
            | Message::MeetReady { .. }
            | Message::MeetOffer { .. }) => {
                let text = format!("a registry does not accept {}", other.kind());
                self.send(id, &error(None, ErrorCode::MALFORMED, &text));
                self.close(id, CloseReason::WrongDirection(other.kind()));
            }
        }
    }

    /// Proxy `key` (session `id`) asks, as request `req`, to meet the process
    /// of `service` that registered `role`: only one registered now, whose
    /// build can meet, within the asker's budget ([`Meetings::open`]).
    fn meet(
        &mut self,
        now: Instant,
        id: SessionId,
        key: PublicKey,
        req: u32,
        service: PublicKey,
        role: &Role,
    ) {
        // With an access list, only for a role the proxy may look up; to a
        // proxy that may not, the service is unknown, as if not registered,
        // so the answer tells nothing it may not know.
        let owner = self.directory.owner_of(&service, role);
        let Some(target) = owner.filter(|_| self.allows(&key, Action::Lookup, role.name())) else {
            let text = format!("no service {service} has registered {role}");
            self.send(id, &error(Some(req), ErrorCode::UNKNOWN, &text));
            return;
        };
        let can_meet = self
            .peers
            .get(&target)
            .is_some_and(|p| p.session.remote_capabilities().contains(Capabilities::MEET));
        if !can_meet {
            let text = format!("service {service} runs a build that cannot meet");
            self.send(id, &error(Some(req), ErrorCode::UNSUPPORTED, &text));
            return;
        }
        let party = |session: SessionId, peers: &HashMap<SessionId, Peer>| {
            peers.get(&session).map(|p| Party { session, ip: p.observed.ip() })
        };
        let (Some(asker), Some(met)) = (party(id, &self.peers), party(target, &self.peers)) else { return };
        match self.meetings.open(now, asker, met) {
            Ok(tickets) => {
                self.send(id, &Message::MeetReady { id: req, ticket: tickets.proxy });
                self.send(target, &Message::MeetOffer { ticket: tickets.service, proxy: key });
                self.check_queue(target);
                self.events.push_back(RegistryEvent::MeetArranged { proxy: key, service });
            }
            Err(refusal) => self.send(id, &error(Some(req), ErrorCode::LIMIT, &refusal.to_string())),
        }
    }

    /// Withdraws registration `reg` of session `id` and tells its watchers;
    /// false if there was none.
    fn unregister(&mut self, id: SessionId, reg: u32) -> bool {
        let Some(instance) = self.directory.unregister((id, reg)) else { return false };
        self.events
            .push_back(RegistryEvent::Unregistered { peer: instance.key, role: instance.role.clone() });
        self.notify(&instance.role);
        true
    }

    /// Marks every watch that `changed` matches as due for an update.
    fn notify(&mut self, changed: &Role) {
        let watches: Vec<(SessionId, u32)> =
            self.directory.watchers_of(changed).into_iter().map(|(key, _)| key).collect();
        for (session, watch) in watches {
            self.make_due(session, watch);
        }
    }

    /// Watch `watch` of session `id` is due for an update (see the module
    /// docs): made at the next `poll_transmit` that has room for it.
    fn make_due(&mut self, id: SessionId, watch: u32) {
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.due.insert(watch);
            self.mark_dirty(id);
        }
    }

    /// Queues a small message for session `id`, within the peer's cap and
    /// the registry's budget: a peer it does not fit is dropped as slow.
    fn send(&mut self, id: SessionId, msg: &Message) {
        let mut plain = Vec::new();
        // Our own messages are within limits by construction; one that is
        // not is dropped rather than sent half-formed.
        if msg.encode(&mut plain).is_err() {
            return;
        }
        let plains = [plain];
        match self.room(id, &plains) {
            Room::Fits => self.send_all(id, &plains),
            Room::PeerFull(queued) => self.drop_silently(id, CloseReason::Slow(queued)),
            Room::RegistryFull => match self.peers.get(&id).map(Peer::queued) {
                // Over the budget by one small message, for a peer that
                // reads: the bound the config documents.
                Some(0) => self.send_all(id, &plains),
                Some(queued) => self.drop_silently(id, CloseReason::Budget(queued)),
                None => {}
            },
        }
    }

    /// Seals encoded messages for session `id`, in order; the caller
    /// checked the room for them.
    fn send_all(&mut self, id: SessionId, plains: &[Vec<u8>]) {
        let Some(peer) = self.peers.get_mut(&id) else { return };
        let mut sent = false;
        for plain in plains {
            sent |= !plain.is_empty() && peer.session.send(plain).is_ok();
        }
        if sent {
            self.recount(id);
            self.mark_dirty(id);
        }
    }

    fn mark_dirty(&mut self, id: SessionId) {
        if let Some(peer) = self.peers.get_mut(&id) {
            if !std::mem::replace(&mut peer.dirty, true) {
                self.dirty.push_back(id);
            }
        }
    }

    fn check_queue(&mut self, id: SessionId) {
        let queued =
            self.peers.get(&id).map_or(0, |p| p.session.pending_transmit().saturating_add(p.unwritten));
        if queued > self.config.max_queued {
            self.drop_silently(id, CloseReason::Slow(queued));
        }
    }

    /// Ends a session, keeping its last bytes (an error message) for the driver.
    fn close(&mut self, id: SessionId, reason: CloseReason) {
        let Some(peer) = self.peers.get_mut(&id) else { return };
        let mut last = Vec::new();
        if peer.session.poll_transmit(&mut last) {
            self.farewells.push_back((id, last));
        }
        self.events.push_back(RegistryEvent::SessionClosed { id, peer: peer.session.remote(), reason });
        self.drop_session(id);
    }

    /// Ends a session without sending what is queued (it is not being read).
    fn drop_silently(&mut self, id: SessionId, reason: CloseReason) {
        let Some(peer) = self.peers.get(&id) else { return };
        self.events.push_back(RegistryEvent::SessionClosed { id, peer: peer.session.remote(), reason });
        self.drop_session(id);
    }

    fn drop_session(&mut self, id: SessionId) {
        self.leave_handshake_pool(id);
        if self.peers.get(&id).is_some_and(|p| p.established) {
            self.established = self.established.saturating_sub(1);
        }
        let Some(peer) = self.peers.remove(&id) else { return };
        self.queued = self.queued.saturating_sub(peer.counted);
        self.starved.remove(&id);
        self.retry_starved();
        if let Some(identity) = peer.identity {
            if self.by_identity.get(&identity) == Some(&id) {
                self.by_identity.remove(&identity);
            }
        }
        for reg in self.directory.release(id) {
            self.unregister(id, reg);
        }
        self.meetings.release(id);
    }
}

/// Whether a service seen at `observed` may name `addr` as one of its own:
/// its observed address, a private one (its LAN, behind a NAT: RFC 1918,
/// shared CGNAT space, IPv6 unique-local), or loopback when it is on this
/// host. Never another public address: proxies dial what the registry hands
/// them, and a registrant must not be able to aim them at a third party.
fn plausible(addr: SocketAddr, observed: SocketAddr) -> bool {
    use std::net::IpAddr;
    let private = match addr.ip() {
        IpAddr::V4(ip) => ip.is_private() || (ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64),
        IpAddr::V6(ip) => (ip.segments()[0] & 0xfe00) == 0xfc00,
    };
    let loopback = addr.ip().is_loopback() && observed.ip().is_loopback();
    addr.ip() == observed.ip() || private || loopback
}

fn error(id: Option<u32>, code: ErrorCode, text: &str) -> Message {
    let mut text = text.to_owned();
    if text.len() > crate::message::MAX_ERROR_TEXT {
        let mut cut = crate::message::MAX_ERROR_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    Message::Error { id, code, text }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::RoleQuery;
    use crate::testing::{Chunker, Net, Peer as _, RawPeer, keypair};

    /// A registry and one raw peer with an established session to it.
    fn connected(config: RegistryConfig) -> Net<RawPeer> {
        let mut net = Net::new(Registry::new(keypair(1), config), Chunker::whole());
        net.add(RawPeer::new());
        net.connect(0, &keypair(2));
        assert!(net.peers[0].peer.is_established());
        net
    }

    /// Sends `msgs` from the peer, pumps, and returns what came back.
    fn exchange(net: &mut Net<RawPeer>, msgs: &[Message]) -> Vec<Message> {
        for msg in msgs {
            assert!(net.peers[0].peer.send(msg));
        }
        net.pump();
        net.peers[0].peer.take_messages()
    }

    /// Why the registry closed the last session it closed.
    fn close_reason(net: &Net<RawPeer>) -> Option<CloseReason> {
        net.events.iter().rev().find_map(|e| match e {
            RegistryEvent::SessionClosed { reason, .. } => Some(reason.clone()),
            _ => None,
        })
    }

    /// Roles `NAME@1.0.N` for N in `range`, each with 16 tags of 64
    /// characters (about 1.1 KB an instance), as registrations `N`.
    fn big_registrations(name: &str, range: std::ops::Range<u32>) -> Vec<Message> {
        let tags: Vec<String> = (0..16).map(|i| format!("{i:02}{}", "t".repeat(62))).collect();
        range
            .map(|reg| {
                let role =
                    Role::parse(&format!("{name}@1.0.{reg}")).unwrap().with_tags(tags.clone()).unwrap();
                Message::Register { id: reg, role, port: 1, addrs: vec![] }
            })
            .collect()
    }

    /// The instances of one whole answer to `id` at the front of `got`
    /// (parts, then the last `Instances`), its `truncated`, and how many
    /// messages it took; the messages are removed.
    fn whole_answer(got: &mut Vec<Message>, id: u32) -> (Vec<Instance>, bool, usize) {
        let mut instances = Vec::new();
        let mut messages = 0;
        while !got.is_empty() {
            messages += 1;
            match got.remove(0) {
                Message::InstancesPart { id: got_id, instances: part } if got_id == id => {
                    instances.extend(part)
                }
                Message::Instances { id: got_id, instances: last, truncated } if got_id == id => {
                    instances.extend(last);
                    return (instances, truncated, messages);
                }
                other => panic!("expected a part of answer {id}, got {other:?}"),
            }
        }
        panic!("answer {id} never ended")
    }

    #[test]
    fn a_large_answer_comes_whole_in_parts_and_an_older_peer_gets_it_cut_and_flagged() {
        let config = RegistryConfig { max_registrations: 300, ..RegistryConfig::default() };
        let mut net = connected(config);
        assert_eq!(exchange(&mut net, &big_registrations("big", 0..300)).len(), 300);
        let query = RoleQuery::parse("big").unwrap();
        let mut answer = exchange(&mut net, &[Message::Lookup { id: 7, query: query.clone() }]);
        let (instances, truncated, messages) = whole_answer(&mut answer, 7);
        assert!(answer.is_empty(), "{answer:?}");
        assert!(messages > 1, "300 big instances do not fit one frame");
        assert!(!truncated);
        let versions: Vec<String> = instances.iter().map(|i| i.role.to_string()).collect();
        let expected: Vec<String> = (0..300).map(|n| format!("big@1.0.{n}")).collect();
        assert_eq!(versions, expected, "all of them, oldest first");

        // A peer from before parts: one message, cut, and flagged.
        let id = net.peers[0].session.unwrap();
        net.registry.set_remote_capabilities(id, Capabilities::MEET);
        let answer = exchange(&mut net, &[Message::Lookup { id: 8, query }]);
        let [Message::Instances { id: 8, instances, truncated: true }] = answer.as_slice() else {
            panic!("expected one truncated answer, got {answer:?}");
        };
        assert!(!instances.is_empty() && instances.len() < 300, "{}", instances.len());
    }

    /// Sends `msgs` from raw peer `i` in one read, and takes whatever the
    /// registry queues without ever reporting it written: a peer that asks
    /// and does not read. Returns the registry's events.
    fn ask_without_reading(net: &mut Net<RawPeer>, i: usize, msgs: &[Message]) -> Vec<RegistryEvent> {
        for msg in msgs {
            assert!(net.peers[i].peer.send(msg));
        }
        let mut wire = Vec::new();
        net.peers[i].peer.poll_transmit(&mut wire);
        let id = net.peers[i].session.unwrap();
        let now = net.now;
        net.registry.handle_input(now, id, &wire);
        let mut sink = Vec::new();
        while net.registry.poll_transmit(&mut sink).is_some() {}
        std::iter::from_fn(|| net.registry.poll_event()).collect()
    }

    #[test]
    fn a_peer_that_asks_faster_than_it_reads_is_dropped_at_its_cap_not_after_it() {
        let max_queued = 256 * 1024;
        let config = RegistryConfig { max_queued, max_registrations: 50, ..RegistryConfig::default() };
        let mut net = connected(config);
        exchange(&mut net, &big_registrations("big", 0..50));
        // About 55 KB an answer; 400 lookups would queue 22 MB.
        let lookups: Vec<Message> =
            (0..400).map(|id| Message::Lookup { id, query: RoleQuery::parse("big").unwrap() }).collect();
        let events = ask_without_reading(&mut net, 0, &lookups);
        let slow = events.iter().find_map(|e| match e {
            RegistryEvent::SessionClosed { reason: CloseReason::Slow(queued), .. } => Some(*queued),
            _ => None,
        });
        let queued = slow.expect("the peer is dropped as slow");
        assert!(queued <= max_queued, "{queued} bytes were queued for it, over the cap of {max_queued}");
        assert!(queued > max_queued / 2, "what fitted was queued: {queued}");
        assert_eq!(net.registry.session_count(), 0);
        assert_eq!(net.registry.queued_bytes(), 0, "nothing is counted for a dropped peer");
    }

    #[test]
    fn churn_gives_each_watch_one_latest_update_and_drops_no_honest_watcher() {
        let config = RegistryConfig { max_registrations: 64, ..RegistryConfig::default() };
        let mut net = connected(config);
        exchange(&mut net, &big_registrations("big", 0..50));
        let query = RoleQuery::parse("big").unwrap();
        for w in 1..=10 {
            net.add(RawPeer::new());
            net.connect_established(w, &keypair(10 + w as u8));
            let mut got = net.exchange(w, &Message::Watch { id: 1, query: query.clone() });
            assert_eq!(whole_answer(&mut got, 1).0.len(), 50);
        }
        // 20 register/unregister pairs in one go: 40 changes of a 55 KB set,
        // 2.2 MB for each watcher if each change were queued.
        let mut churn = Vec::new();
        for _ in 0..20 {
            churn.extend(big_registrations("big", 50..51));
            churn.push(Message::Unregister { id: 50 });
        }
        exchange(&mut net, &churn);
        assert_eq!(net.registry.session_count(), 11, "{:?}", close_reason(&net));
        for w in 1..=10 {
            let mut got = net.peers[w].peer.take_messages();
            let (instances, truncated, _) = whole_answer(&mut got, 1);
            assert!(got.is_empty(), "watcher {w} got one update, not {}", got.len() + 1);
            assert_eq!((instances.len(), truncated), (50, false), "the latest set");
        }
    }

    #[test]
    fn total_registrations_and_queued_bytes_are_capped_across_sessions() {
        let config = RegistryConfig {
            max_total_registrations: 3,
            max_queued: 200 * 1024,
            max_total_queued: 300 * 1024,
            ..RegistryConfig::default()
        };
        let mut net = connected(config);
        net.add(RawPeer::new());
        net.connect_established(1, &keypair(3));
        exchange(&mut net, &big_registrations("big", 0..2));
        let got = net.exchange(1, &big_registrations("big", 2..4)[0]);
        assert_eq!(got, vec![Message::Registered { id: 2 }]);
        let got = net.exchange(1, &big_registrations("big", 3..4)[0]);
        assert!(matches!(&got[..], [Message::Error { id: Some(3), code: ErrorCode::LIMIT, .. }]), "{got:?}");
        assert_eq!(net.registry.instance_count(), 3);

        // Make the answer about 40 KB: replace the three with 36 of one owner.
        net.close(1);
        let config = RegistryConfig { max_total_registrations: 100, ..net.registry.config.clone() };
        net.registry.config = config;
        exchange(&mut net, &big_registrations("big", 2..36));
        let lookup = |id| Message::Lookup { id, query: RoleQuery::parse("big").unwrap() };
        // Two peers that ask and never read fill the budget between them.
        for (i, n) in [(1, 11u8), (2, 12)] {
            net.add(RawPeer::new());
            net.connect_established(i, &keypair(n));
            let lookups: Vec<Message> = (0..4).map(lookup).collect();
            ask_without_reading(&mut net, i, &lookups);
            assert!(net.registry.queued_bytes() <= 300 * 1024, "{}", net.registry.queued_bytes());
        }
        assert!(net.registry.queued_bytes() > 200 * 1024);
        // A peer that reads is refused for now, and keeps its session.
        let got = exchange(&mut net, &[lookup(9)]);
        assert!(matches!(&got[..], [Message::Error { id: Some(9), code: ErrorCode::LIMIT, .. }]), "{got:?}");
        assert!(net.registry.session_count() >= 2);
        // Once the others are gone, there is room again.
        net.close(1);
        net.close(2);
        let mut got = exchange(&mut net, &[lookup(10)]);
        assert_eq!(whole_answer(&mut got, 10).0.len(), 36);
    }

    #[test]
    fn a_watch_update_waits_for_the_total_budget_and_goes_once_there_is_room() {
        let config = RegistryConfig {
            max_registrations: 100,
            max_queued: 200 * 1024,
            max_total_queued: 300 * 1024,
            ..RegistryConfig::default()
        };
        let mut net = connected(config);
        exchange(&mut net, &big_registrations("big", 0..36));
        // Peer 1 watches (and reads); peers 2 and 3 ask and never read.
        net.add(RawPeer::new());
        net.connect_established(1, &keypair(11));
        let query = RoleQuery::parse("big").unwrap();
        let mut got = net.exchange(1, &Message::Watch { id: 1, query: query.clone() });
        assert_eq!(whole_answer(&mut got, 1).0.len(), 36);
        for (i, n) in [(2, 12u8), (3, 13)] {
            net.add(RawPeer::new());
            net.connect_established(i, &keypair(n));
            let lookups: Vec<Message> =
                (0..4).map(|id| Message::Lookup { id, query: query.clone() }).collect();
            ask_without_reading(&mut net, i, &lookups);
        }
        let full = net.registry.queued_bytes();
        assert!(full > 250 * 1024 && full <= 300 * 1024, "{full}");
        // A change: the watcher's update does not fit the budget, so it waits.
        exchange(&mut net, &[Message::Unregister { id: 0 }]);
        assert_eq!(net.peers[1].peer.take_messages(), vec![], "no room yet");
        assert_eq!(net.registry.session_count(), 4, "no one dropped for it");
        // The non-readers leave: the update goes, with the set as it is now.
        net.close(2);
        net.close(3);
        net.pump();
        let mut got = net.peers[1].peer.take_messages();
        assert_eq!(whole_answer(&mut got, 1).0.len(), 35);
        assert!(got.is_empty(), "{got:?}");
    }

    /// An ACL of grants given as (keys, register, lookup); a key `0` is "*".
    fn acl(grants: &[(&[u8], &[&str], &[&str])]) -> Acl {
        use crate::acl::{Grant, Grantees, Pattern};
        let patterns = |ps: &[&str]| ps.iter().map(|p| Pattern::parse(p).unwrap()).collect();
        Acl::new(
            grants
                .iter()
                .map(|(keys, register, lookup)| Grant {
                    keys: if keys.contains(&0) {
                        Grantees::Anyone
                    } else {
                        Grantees::Keys(keys.iter().map(|n| keypair(*n).public()).collect())
                    },
                    register: patterns(register),
                    lookup: patterns(lookup),
                })
                .collect(),
        )
    }

    #[test]
    fn under_an_acl_a_key_in_no_grant_holds_no_session() {
        let now = Instant::now();
        let mut registry =
            Registry::new(keypair(1), RegistryConfig { max_sessions: 2, ..RegistryConfig::default() });
        registry.set_acl(Some(acl(&[(&[2], &["db"], &[])])));
        // Strangers (keys 3..8) complete handshakes: each is told and closed.
        for n in 3..8u8 {
            let (mut hand, hello) = Hand::start(&mut registry, now, n, Stamp { process: 1, counter: 1 });
            let got = hand.feed(&mut registry, now, &hello);
            assert!(
                matches!(&got[..], [Message::Error { id: None, code: ErrorCode::FORBIDDEN, .. }]),
                "{got:?}"
            );
        }
        let closed_forbidden =
            closed(&mut registry).iter().filter(|(_, r)| *r == CloseReason::Forbidden).count();
        assert_eq!(closed_forbidden, 5);
        assert_eq!(registry.session_count(), 0);
        // The granted key still gets in, slots untouched.
        let (mut granted, hello) = Hand::start(&mut registry, now, 2, Stamp { process: 1, counter: 1 });
        granted.feed(&mut registry, now, &hello);
        assert_eq!(
            granted.send(&mut registry, now, &register(1, "db@1.0.0")),
            vec![Message::Registered { id: 1 }]
        );
    }

    fn register(id: u32, role: &str) -> Message {
        Message::Register { id, role: Role::parse(role).unwrap(), port: 1, addrs: vec![] }
    }

    fn forbidden(got: &[Message], id: u32) -> bool {
        matches!(got, [Message::Error { id: Some(got_id), code: ErrorCode::FORBIDDEN, .. }] if *got_id == id)
    }

    #[test]
    fn the_acl_lets_a_key_register_and_look_up_only_what_it_is_granted() {
        // Peer 0 is key 2, the real service; peer 1 is key 3, an attacker;
        // peer 2 is key 4, a proxy that may look up couchdb only.
        let mut net = connected(RegistryConfig::default());
        net.registry.set_acl(Some(acl(&[
            (&[2], &["couchdb", "@acme/*"], &[]),
            (&[4], &[], &["couchdb"]),
            (&[0], &[], &["public"]),
        ])));
        net.add(RawPeer::new());
        net.connect_established(1, &keypair(3));
        net.add(RawPeer::new());
        net.connect_established(2, &keypair(4));

        let got = net.exchange(1, &register(1, "couchdb@3.2.2"));
        assert!(forbidden(&got, 1), "{got:?}");
        let Message::Error { text, .. } = &got[0] else { unreachable!() };
        assert!(text.contains("couchdb@3.2.2") && text.contains(&keypair(3).public().to_string()), "{text}");
        assert!(net.events.iter().any(|e| matches!(e, RegistryEvent::Forbidden { .. })));
        let got = exchange(&mut net, &[register(1, "couchdb@3.2.2"), register(2, "@acme/web@1.0.0")]);
        assert_eq!(got, vec![Message::Registered { id: 1 }, Message::Registered { id: 2 }]);
        assert!(forbidden(&exchange(&mut net, &[register(3, "redis@7.0.0")]), 3));
        assert_eq!(net.registry.instance_count(), 2);
        assert_eq!(net.registry.session_count(), 3, "refusals keep sessions");

        // Lookups and watches: only granted names; the watch sees couchdb alone.
        let query = |q: &str| RoleQuery::parse(q).unwrap();
        assert!(forbidden(&net.exchange(2, &Message::Lookup { id: 5, query: query("@acme/web") }), 5));
        assert!(forbidden(&net.exchange(2, &Message::Watch { id: 6, query: query("@acme/web") }), 6));
        assert!(forbidden(&net.exchange(1, &Message::Watch { id: 6, query: query("couchdb") }), 6));
        let mut got = net.exchange(2, &Message::Watch { id: 7, query: query("couchdb") });
        let (instances, _, _) = whole_answer(&mut got, 7);
        assert_eq!(instances.len(), 1);
        assert_eq!(instances[0].key, keypair(2).public());
        // "*" names any key, for what it grants.
        let got = net.exchange(1, &Message::Lookup { id: 8, query: query("public") });
        assert!(matches!(&got[..], [Message::Instances { id: 8, .. }]), "{got:?}");
        // A meeting only with a service the asker may look up; to others it is
        // unknown, exactly as one that is not registered.
        let service = keypair(2).public();
        let got =
            net.exchange(1, &Message::Meet { id: 9, service, role: Role::parse("couchdb@3.2.2").unwrap() });
        assert!(
            matches!(&got[..], [Message::Error { id: Some(9), code: ErrorCode::UNKNOWN, .. }]),
            "{got:?}"
        );
        let got =
            net.exchange(2, &Message::Meet { id: 10, service, role: Role::parse("couchdb@3.2.2").unwrap() });
        assert!(matches!(&got[..], [Message::MeetReady { id: 10, .. }]), "{got:?}");
    }

    #[test]
    fn a_new_acl_withdraws_what_it_no_longer_grants_and_tells_everyone() {
        let mut net = connected(RegistryConfig::default());
        net.registry
            .set_acl(Some(acl(&[(&[2], &["couchdb", "web"], &[]), (&[4], &[], &["couchdb", "web"])])));
        let got = exchange(&mut net, &[register(1, "couchdb@3.2.2"), register(2, "web@1.0.0")]);
        assert_eq!(got.len(), 2);
        net.add(RawPeer::new());
        net.connect_established(1, &keypair(4));
        let query = |q: &str| RoleQuery::parse(q).unwrap();
        assert_eq!(net.exchange(1, &Message::Watch { id: 1, query: query("couchdb") }).len(), 1);
        assert_eq!(net.exchange(1, &Message::Watch { id: 2, query: query("web") }).len(), 1);

        // Key 2 may no longer register couchdb; key 4 may no longer watch web.
        net.registry.set_acl(Some(acl(&[(&[2], &["web"], &[]), (&[4], &[], &["couchdb"])])));
        net.pump();
        let service = net.peers[0].peer.take_messages();
        assert!(forbidden(&service, 1), "the service hears its registration was withdrawn: {service:?}");
        let proxy = net.peers[1].peer.take_messages();
        assert!(
            proxy.iter().any(|m| matches!(m, Message::Error { id: Some(2), code: ErrorCode::FORBIDDEN, .. })),
            "the web watch ends with an error: {proxy:?}"
        );
        assert!(
            proxy.contains(&Message::Instances { id: 1, instances: vec![], truncated: false }),
            "the couchdb watcher is told its instance left: {proxy:?}"
        );
        assert_eq!(net.registry.instance_count(), 1);
        assert_eq!(net.registry.directory().watch_count(net.peers[1].session.unwrap()), 1);
        assert!(net.events.iter().any(|e| matches!(e, RegistryEvent::Unregistered { .. })));
        assert_eq!(net.registry.session_count(), 2, "sessions go on");

        // No list at all: anyone may do anything again.
        net.registry.set_acl(None);
        assert_eq!(exchange(&mut net, &[register(1, "couchdb@3.2.2")]), vec![Message::Registered { id: 1 }]);
    }

    #[test]
    fn a_service_may_name_its_own_and_private_addresses_but_no_third_party() {
        let public: SocketAddr = "203.0.113.21:4000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let yes = |a: &str, o| assert!(plausible(a.parse().unwrap(), o), "{a} from {o}");
        let no = |a: &str, o| assert!(!plausible(a.parse().unwrap(), o), "{a} from {o}");
        yes("203.0.113.21:7000", public);
        yes("192.168.1.2:7000", public);
        yes("10.1.2.3:7000", public);
        yes("172.16.0.9:7000", public);
        yes("100.64.0.1:7000", public);
        yes("[fd00::1]:7000", public);
        yes("127.0.0.1:7000", local);
        no("198.51.100.7:443", public);
        no("127.0.0.1:22", public);
        no("[2001:db8::1]:80", public);
        no("100.128.0.1:7000", public);

        let mut net = connected(RegistryConfig::default());
        let role = Role::parse("db@1.0.0").unwrap();
        let addrs = vec!["192.168.1.2:7000".parse().unwrap(), "198.51.100.7:443".parse().unwrap()];
        exchange(&mut net, &[Message::Register { id: 1, role, port: 7000, addrs }]);
        let got = exchange(&mut net, &[Message::Lookup { id: 2, query: RoleQuery::parse("db").unwrap() }]);
        let [Message::Instances { instances, .. }] = &got[..] else { panic!("{got:?}") };
        let expected: Vec<SocketAddr> = vec![
            SocketAddr::new(crate::testing::observed(0).ip(), 7000),
            "192.168.1.2:7000".parse().unwrap(),
        ];
        assert_eq!(instances[0].addrs, expected);
    }

    #[test]
    fn silent_connections_from_one_source_cannot_keep_a_service_out() {
        let config = RegistryConfig {
            max_sessions: 2,
            max_handshakes: 8,
            max_handshakes_per_source: 3,
            ..RegistryConfig::default()
        };
        let mut net = connected(config.clone());
        let now = net.now;
        let attacker: SocketAddr = "198.51.100.9:1".parse().unwrap();
        for n in 0..3u8 {
            net.registry.accept(now, SocketAddr::new(attacker.ip(), u16::from(n)), [n; 32]).unwrap();
        }
        assert_eq!(net.registry.accept(now, attacker, [9; 32]), Err(Full::Source(attacker.ip(), 3)));
        // A service from elsewhere still gets in and registers.
        net.add(RawPeer::new());
        net.connect(1, &keypair(3));
        let role = Role::parse("db@1.0.0").unwrap();
        let got = net.exchange(1, &Message::Register { id: 1, role, port: 1, addrs: vec![] });
        assert_eq!(got, vec![Message::Registered { id: 1 }]);
        // Two sessions are the limit: a third is refused, handshakes or not.
        assert_eq!(net.registry.accept(now, "192.0.2.1:1".parse().unwrap(), [1; 32]), Err(Full::Sessions(2)));
        // The silent ones time out and free their source's slots.
        net.advance(now + config.handshake_timeout + Duration::from_secs(2));
        net.close(1);
        assert!(net.registry.accept(net.now, attacker, [9; 32]).is_ok());
    }

    #[test]
    fn a_newer_peers_unknown_request_is_refused_and_the_session_goes_on() {
        let mut net = connected(RegistryConfig::default());
        // Kind 40, request id 9, then fields this build cannot read.
        let mut newer = postcard::to_allocvec(&(40u32, 9u32)).unwrap();
        newer.extend_from_slice(b"\x03new");
        assert!(net.peers[0].peer.send_plain(&newer));
        let role = Role::parse("db@1.0.0").unwrap();
        let got = exchange(&mut net, &[Message::Register { id: 1, role, port: 1, addrs: vec![] }]);
        assert!(
            matches!(
                &got[..],
                [
                    Message::Error { id: Some(9), code: ErrorCode::UNSUPPORTED, .. },
                    Message::Registered { id: 1 }
                ]
            ),
            "{got:?}"
        );
        assert_eq!(net.registry.session_count(), 1);
        assert_eq!(net.registry.instance_count(), 1);
        // A known kind that is malformed still ends the session.
        assert!(net.peers[0].peer.send_plain(&[3, 1]));
        let got = exchange(&mut net, &[]);
        assert!(matches!(&got[..], [Message::Error { id: None, code: ErrorCode::MALFORMED, .. }]), "{got:?}");
        assert_eq!(net.registry.session_count(), 0);
    }

    #[test]
    fn close_reasons_say_what_the_peer_did() {
        let mut net = connected(RegistryConfig::default());
        assert!(net.peers[0].peer.send_plain(&[3, 1]));
        exchange(&mut net, &[]);
        assert!(matches!(close_reason(&net), Some(CloseReason::Malformed(MessageError::Malformed(_)))));

        let mut net = connected(RegistryConfig::default());
        exchange(&mut net, &[Message::Registered { id: 1 }]);
        let reason = close_reason(&net).unwrap();
        assert_eq!(reason, CloseReason::WrongDirection("Registered"));
        assert_eq!(reason.to_string(), "peer sent a Registered message, which only a registry sends");

        let mut net = connected(RegistryConfig::default());
        exchange(&mut net, &[Message::Error { id: None, code: ErrorCode::LIMIT, text: "bye".into() }]);
        let reason = close_reason(&net).unwrap();
        assert_eq!(reason, CloseReason::PeerError { code: ErrorCode::LIMIT, text: "bye".into() });
        assert_eq!(reason.to_string(), "peer reported an error: limit: bye");
    }

    #[test]
    fn limits_refuse_without_ending_the_session() {
        let config = RegistryConfig { max_registrations: 1, max_watches: 1, ..RegistryConfig::default() };
        let mut net = connected(config);
        let role = Role::parse("db@1.0.0").unwrap();
        let query = RoleQuery::parse("db").unwrap();
        let got = exchange(
            &mut net,
            &[
                Message::Register { id: 1, role: role.clone(), port: 1, addrs: vec![] },
                Message::Register { id: 2, role, port: 1, addrs: vec![] },
                Message::Watch { id: 1, query: query.clone() },
                Message::Watch { id: 2, query },
            ],
        );
        let limits =
            got.iter().filter(|m| matches!(m, Message::Error { code: ErrorCode::LIMIT, .. })).count();
        assert_eq!(limits, 2, "{got:?}");
        assert_eq!(net.registry.instance_count(), 1);
        assert_eq!(net.registry.session_count(), 1);
    }

    #[test]
    fn the_testing_shortcut_opens_a_session_like_a_handshake_does() {
        let mut net = connected(RegistryConfig::default());
        net.add(RawPeer::new());
        net.connect_established(1, &keypair(3));
        let opened = net.events.iter().filter(|e| matches!(e, RegistryEvent::SessionOpened { .. })).count();
        assert_eq!(opened, 2);
        let got = net.exchange(1, &Message::Ping { nonce: 5 });
        assert_eq!(got, vec![Message::Pong { nonce: 5 }]);
        // Same identity as peer 0 (both unstamped: one process): it
        // supersedes that session, once it has said something.
        net.exchange(0, &Message::Ping { nonce: 4 });
        net.connect_established(1, &keypair(2));
        assert_eq!(net.registry.session_count(), 2, "no supersede on the handshake alone");
        net.exchange(1, &Message::Ping { nonce: 6 });
        assert_eq!(close_reason(&net), Some(CloseReason::Superseded));
        assert_eq!(net.registry.session_count(), 1);
    }

    /// A stamped session of `who` driven by hand: its first message, and a
    /// way to feed it the registry's answers.
    struct Hand {
        session: Session,
        id: SessionId,
    }

    impl Hand {
        fn start(registry: &mut Registry, now: Instant, who: u8, stamp: Stamp) -> (Hand, Vec<u8>) {
            let id = registry.accept(now, crate::testing::observed(usize::from(who)), [who; 32]).unwrap();
            let mut session = Session::initiate_stamped(
                now,
                &keypair(who),
                &registry.public_key(),
                Intent::Control,
                [who ^ 0x55; 32],
                Duration::from_secs(10),
                Some(stamp),
            )
            .unwrap();
            let mut first = Vec::new();
            session.poll_transmit(&mut first);
            (Hand { session, id }, first)
        }

        /// Feeds `bytes` to the registry as this session's, then everything
        /// the registry sends back to the session.
        fn feed(&mut self, registry: &mut Registry, now: Instant, bytes: &[u8]) -> Vec<Message> {
            registry.handle_input(now, self.id, bytes);
            let mut buf = Vec::new();
            while let Some(to) = registry.poll_transmit(&mut buf) {
                if to == self.id {
                    let _ = self.session.handle_input(now, &buf);
                }
                buf.clear();
            }
            std::iter::from_fn(|| self.session.poll_event()).map(|p| Message::decode(&p).unwrap()).collect()
        }

        fn send(&mut self, registry: &mut Registry, now: Instant, msg: &Message) -> Vec<Message> {
            let mut plain = Vec::new();
            msg.encode(&mut plain).unwrap();
            self.session.send(&plain).unwrap();
            let mut wire = Vec::new();
            self.session.poll_transmit(&mut wire);
            self.feed(registry, now, &wire)
        }
    }

    fn closed(registry: &mut Registry) -> Vec<(SessionId, CloseReason)> {
        std::iter::from_fn(|| registry.poll_event())
            .filter_map(|e| match e {
                RegistryEvent::SessionClosed { id, reason, .. } => Some((id, reason)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_replayed_first_message_is_refused_and_leaves_the_real_session_alone() {
        let now = Instant::now();
        let mut registry = Registry::new(keypair(1), RegistryConfig::default());
        let stamp = Stamp { process: 7, counter: 1 };
        let (mut real, first) = Hand::start(&mut registry, now, 2, stamp);
        real.feed(&mut registry, now, &first);
        let role = Role::parse("db@1.0.0").unwrap();
        let got = real.send(&mut registry, now, &Message::Register { id: 1, role, port: 1, addrs: vec![] });
        assert_eq!(got, vec![Message::Registered { id: 1 }]);
        closed(&mut registry);

        // The captured first message, replayed on new connections.
        for n in 0..5u8 {
            let replay =
                registry.accept(now, crate::testing::observed(50 + usize::from(n)), [n; 32]).unwrap();
            registry.handle_input(now, replay, &first);
            assert_eq!(closed(&mut registry), vec![(replay, CloseReason::Replayed)]);
            let mut buf = Vec::new();
            assert_ne!(registry.poll_transmit(&mut buf), Some(replay), "a replayer is told nothing");
        }
        assert_eq!(registry.session_count(), 1);
        assert_eq!(registry.instance_count(), 1);
        assert_eq!(
            real.send(&mut registry, now, &Message::Ping { nonce: 1 }),
            vec![Message::Pong { nonce: 1 }]
        );

        // The same process's next session is newer: it takes over once it speaks.
        let (mut next, first) = Hand::start(&mut registry, now, 2, Stamp { process: 7, counter: 2 });
        next.feed(&mut registry, now, &first);
        assert!(closed(&mut registry).is_empty(), "not on the handshake alone");
        next.send(&mut registry, now, &Message::Ping { nonce: 2 });
        assert_eq!(closed(&mut registry), vec![(real.id, CloseReason::Superseded)]);
        assert_eq!(registry.session_count(), 1);
    }

    #[test]
    fn handshakes_completing_past_the_session_limit_never_free_a_slot() {
        let now = Instant::now();
        let config = RegistryConfig { max_sessions: 2, ..RegistryConfig::default() };
        let mut registry = Registry::new(keypair(1), config);
        let (mut first, hello) = Hand::start(&mut registry, now, 2, Stamp { process: 1, counter: 1 });
        first.feed(&mut registry, now, &hello);
        // Three handshakes start while a slot is free; all complete.
        let started: Vec<_> =
            (3..6u8).map(|n| Hand::start(&mut registry, now, n, Stamp { process: 1, counter: 1 })).collect();
        for (mut hand, hello) in started {
            hand.feed(&mut registry, now, &hello);
        }
        let refused = closed(&mut registry).iter().filter(|(_, r)| *r == CloseReason::Full(2)).count();
        assert_eq!(refused, 2, "one took the last slot, two were refused");
        assert_eq!(registry.session_count(), 2);
        // Still full: the refused ones gave back nothing they did not hold.
        let again = registry.accept(now, crate::testing::observed(9), [9; 32]);
        assert_eq!(again, Err(Full::Sessions(2)));
    }

    #[test]
    fn two_processes_of_one_identity_keep_their_own_sessions_and_registrations() {
        let now = Instant::now();
        let mut registry = Registry::new(keypair(1), RegistryConfig::default());
        let mut hands = Vec::new();
        for (process, role) in [(1, "couchdb@3.2.2"), (2, "redis@7.0.0")] {
            let (mut hand, first) = Hand::start(&mut registry, now, 2, Stamp { process, counter: 1 });
            hand.feed(&mut registry, now, &first);
            let role = Role::parse(role).unwrap();
            let got =
                hand.send(&mut registry, now, &Message::Register { id: 0, role, port: 1, addrs: vec![] });
            assert_eq!(got, vec![Message::Registered { id: 0 }]);
            hands.push(hand);
        }
        // Again and again, as two supervised units would: nothing is superseded.
        for hand in &mut hands {
            assert_eq!(
                hand.send(&mut registry, now, &Message::Ping { nonce: 3 }),
                vec![Message::Pong { nonce: 3 }]
            );
        }
        assert!(closed(&mut registry).is_empty());
        assert_eq!(registry.session_count(), 2);
        assert_eq!(registry.instance_count(), 2);
    }

    #[test]
    fn a_meeting_is_arranged_only_with_a_registered_service_and_within_budget() {
        let config = RegistryConfig {
            meet: MeetConfig { burst: 2, per_session: 2, ..MeetConfig::default() },
            ..RegistryConfig::default()
        };
        let mut net = connected(config);
        let service = keypair(2);
        net.add(RawPeer::new());
        net.connect(1, &keypair(3));
        let proxy = keypair(3).public();
        // Not registered yet: unknown.
        let role = Role::parse("db@1.0.0").unwrap();
        let got = net.exchange(1, &Message::Meet { id: 1, service: service.public(), role: role.clone() });
        assert!(
            matches!(&got[..], [Message::Error { id: Some(1), code: ErrorCode::UNKNOWN, .. }]),
            "{got:?}"
        );
        exchange(&mut net, &[Message::Register { id: 1, role: role.clone(), port: 1, addrs: vec![] }]);

        let got = net.exchange(1, &Message::Meet { id: 2, service: service.public(), role: role.clone() });
        let [Message::MeetReady { id: 2, ticket }] = got[..] else { panic!("{got:?}") };
        let offered = net.peers[0].peer.take_messages();
        let [Message::MeetOffer { ticket: offered, proxy: asker }] = offered[..] else {
            panic!("{offered:?}")
        };
        assert_eq!(asker, proxy, "the service hears who asked");
        let (at_service, at_proxy) = (crate::testing::observed(0).ip(), crate::testing::observed(1).ip());
        assert!(net.events.iter().any(|e| matches!(e, RegistryEvent::MeetArranged { .. })));

        // Both sides arrive; the meeting is then used up.
        let now = net.now;
        let first = net.registry.arrive(now, ticket, MeetSide::Proxy, at_proxy);
        assert!(matches!(first, Ok(Arrival::First { .. })), "{first:?}");
        let second = net.registry.arrive(now, offered, MeetSide::Service, at_service);
        assert!(matches!(second, Ok(Arrival::Second { .. })), "{second:?}");
        assert_eq!(
            net.registry.arrive(now, offered, MeetSide::Service, at_service),
            Err(ArrivalError::Unknown)
        );

        // The budget: one more, then refused, and the session goes on.
        let got = net.exchange(1, &Message::Meet { id: 3, service: service.public(), role: role.clone() });
        let [Message::MeetReady { id: 3, ticket: waiting }] = got[..] else { panic!("{got:?}") };
        let got = net.exchange(1, &Message::Meet { id: 4, service: service.public(), role });
        assert!(matches!(&got[..], [Message::Error { id: Some(4), code: ErrorCode::LIMIT, .. }]), "{got:?}");
        assert_eq!(net.registry.session_count(), 2);

        // A meeting goes with the service's session.
        net.close(0);
        assert_eq!(net.registry.arrive(now, waiting, MeetSide::Proxy, at_proxy), Err(ArrivalError::Unknown));
    }

    #[test]
    fn only_a_registry_sends_meeting_answers_and_offers() {
        let mut net = connected(RegistryConfig::default());
        exchange(&mut net, &[Message::MeetOffer { ticket: Ticket([1; 16]), proxy: keypair(9).public() }]);
        assert_eq!(close_reason(&net), Some(CloseReason::WrongDirection("MeetOffer")));
    }
}
