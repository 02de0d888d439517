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
//! [`Stamp`](crate::hello::Stamp), a random value per process and a counter
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
//! Where each concern lives:
//! - `mod.rs` (here): the machine's public face, its sessions' lifecycle
//!   (one way out: [`Registry`]'s private `close`) and the sweep;
//! - `admission.rs`: which connections are taken ([`Full`]), counted in
//!   pools for handshakes and for sessions;
//! - `replay.rs`: stamps, replays and superseding;
//! - `outbox.rs`: queues, caps, the total budget and due watch updates;
//! - `requests.rs`: each control message, under the access list;
//! - `directory.rs`: the index of registrations and watches ([`Directory`]);
//! - `meetings.rs`: tickets and pairing for hole punching and relays
//!   ([`Meetings`]; the exchange itself is [`crate::meet`]).

mod admission;
mod directory;
mod meetings;
mod outbox;
mod replay;
mod requests;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use admission::{Full, Source};
pub use directory::{Directory, OwnedId};
pub use meetings::{Arrival, ArrivalError, MeetConfig, MeetRefusal, Meetings, Party, Tickets};

use crate::acl::Acl;
use crate::hello::{Capabilities, Intent};
use crate::keys::{Keypair, PublicKey};
use crate::meet::{MeetSide, Ticket};
use crate::message::{ErrorCode, Message, MessageError};
use crate::role::Role;
use crate::session::{Session, SessionError};
use admission::Admission;
use outbox::{Outbox, PeerQueue};
use replay::{Identity, ReplayGuard};
use requests::error;

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
    /// An instance left: unregistered by its service, revoked by the
    /// access list, or gone with its session.
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
    /// The access control list refused a request, or revoked what it no
    /// longer grants ([`Registry::set_acl`]).
    Forbidden {
        /// Whose.
        peer: PublicKey,
        /// What was refused or revoked, as the peer was told.
        text: String,
    },
}

impl CloseReason {
    /// Whether what is queued for the peer still goes out before its
    /// stream is closed: not to a peer that does not read (slow, over the
    /// budget), cannot (a replayer holds no keys), or ended it itself.
    fn sends_farewell(&self) -> bool {
        !matches!(
            self,
            CloseReason::Slow(_)
                | CloseReason::Budget(_)
                | CloseReason::Replayed
                | CloseReason::PeerError { .. }
        )
    }
}

/// Where a session is in its life.
enum PeerState {
    /// Its handshake is under way: it counts in the handshake pool.
    Handshaking,
    /// Its handshake completed: it counts against `max_sessions`.
    Established {
        /// Its identity and process, once the handshake told them.
        identity: Option<Identity>,
        /// It has sent an authenticated message: only now may it supersede.
        confirmed: bool,
    },
}

struct Peer {
    session: Session,
    observed: SocketAddr,
    state: PeerState,
    last_heard: Instant,
    queue: PeerQueue,
}

impl Peer {
    /// Whether its answers may come in parts.
    fn takes_parts(&self) -> bool {
        self.session.remote_capabilities().contains(Capabilities::PARTS)
    }
}

/// The registry; see the module docs.
pub struct Registry {
    keypair: Keypair,
    config: RegistryConfig,
    next_id: u64,
    peers: HashMap<SessionId, Peer>,
    admission: Admission,
    replay: ReplayGuard,
    outbox: Outbox,
    /// Registrations and watches, owned by session.
    directory: Directory,
    /// Meetings waiting for their meet connections.
    meetings: Meetings,
    events: VecDeque<RegistryEvent>,
    next_sweep: Option<Instant>,
    /// Lookups and watches answered (for metrics).
    lookups_answered: u64,
    /// Who may do what; `None`: anyone anything.
    acl: Option<Acl>,
}

/// How often silent sessions are looked for: bounds detection to idle + this.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

impl Registry {
    /// A registry answering as `keypair`.
    pub fn new(keypair: Keypair, config: RegistryConfig) -> Registry {
        Registry {
            meetings: Meetings::new(&keypair, config.meet.clone()),
            admission: Admission::new(
                config.max_sessions,
                config.max_handshakes,
                config.max_handshakes_per_source,
            ),
            replay: ReplayGuard::new(config.max_sessions),
            keypair,
            config,
            next_id: 0,
            peers: HashMap::new(),
            outbox: Outbox::default(),
            directory: Directory::new(),
            events: VecDeque::new(),
            next_sweep: None,
            lookups_answered: 0,
            acl: None,
        }
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
        self.admission.check(observed.ip())?;
        let session =
            Session::respond(now, &self.keypair, Intent::Control, entropy, self.config.handshake_timeout)
                .map_err(|_| Full::Handshakes(self.config.max_handshakes))?;
        self.admission.start_handshake(observed.ip());
        Ok(self.insert(now, observed, session, PeerState::Handshaking))
    }

    fn insert(
        &mut self,
        now: Instant,
        observed: SocketAddr,
        session: Session,
        state: PeerState,
    ) -> SessionId {
        let id = SessionId(self.next_id);
        self.next_id += 1;
        let peer = Peer { session, observed, state, last_heard: now, queue: PeerQueue::default() };
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
        if !was_open && peer.session.is_established() && !self.established(id) {
            return;
        }
        self.mark_dirty(id);
        while let Some(plain) = self.peers.get_mut(&id).and_then(|p| p.session.poll_message()) {
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

    /// Session `id` completed its handshake: out of the handshake pool,
    /// into the sessions' (or refused, when full, when the access list
    /// names no grant for its key, or as a replay). False if it was closed.
    fn established(&mut self, id: SessionId) -> bool {
        let Some(peer) = self.peers.get(&id) else { return false };
        let (key, stamp) = (peer.session.remote(), peer.session.remote_stamp());
        if self.admission.check_sessions().is_err() {
            self.send(id, &error(None, ErrorCode::LIMIT, "the registry is at its session limit"));
            self.close(id, CloseReason::Full(self.config.max_sessions));
            return false;
        }
        // Under an access list, a key no grant names may do nothing: it
        // gets no session slot to sit on.
        if let Some(key) = key.filter(|k| self.acl.as_ref().is_some_and(|acl| !acl.names(k))) {
            let text = format!("{key} is in no grant of this registry");
            self.send(id, &error(None, ErrorCode::FORBIDDEN, &text));
            self.close(id, CloseReason::Forbidden);
            return false;
        }
        let Some(peer) = self.peers.get_mut(&id) else { return false };
        if matches!(peer.state, PeerState::Handshaking) {
            self.admission.end_handshake(peer.observed.ip());
        }
        peer.state = PeerState::Established { identity: None, confirmed: false };
        self.admission.establish();
        let Some(key) = key else { return true };
        // An unstamped peer (a build from before stamps) is process 0.
        let identity = Identity::of(key, stamp);
        if self.replay.admit(identity, stamp).is_err() {
            // Dropped without a word: a replayer cannot read one.
            self.close(id, CloseReason::Replayed);
            return false;
        }
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.state = PeerState::Established { identity: Some(identity), confirmed: false };
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
        let PeerState::Established { identity, confirmed } = &mut peer.state else { return };
        if std::mem::replace(confirmed, true) {
            return;
        }
        let Some(identity) = *identity else { return };
        if let Some(old) = self.replay.confirm(identity, id) {
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
        self.admission.check_sessions()?;
        let (ours, theirs) = Session::established_pair(&self.keypair, peer, Intent::Control, entropy);
        let identity = Identity::of(peer.public(), None);
        let state = PeerState::Established { identity: Some(identity), confirmed: false };
        let id = self.insert(now, observed, ours, state);
        self.admission.establish();
        self.events.push_back(RegistryEvent::SessionOpened { id, peer: peer.public() });
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

    /// The next event.
    pub fn poll_event(&mut self) -> Option<RegistryEvent> {
        self.events.pop_front()
    }

    /// The one way a session ends: its last bytes (an error message) are
    /// kept for the driver when `reason` lets them go
    /// ([`CloseReason::sends_farewell`]), the driver hears of it, and
    /// everything it held is released: its pool's count, its share of the
    /// outbox, its registrations (watchers hear of them), its meetings.
    fn close(&mut self, id: SessionId, reason: CloseReason) {
        let Some(mut peer) = self.peers.remove(&id) else { return };
        if reason.sends_farewell() {
            let mut last = Vec::new();
            if peer.session.poll_transmit(&mut last) {
                self.outbox.farewell(id, last);
            }
        }
        self.events.push_back(RegistryEvent::SessionClosed { id, peer: peer.session.remote(), reason });
        match peer.state {
            PeerState::Handshaking => self.admission.end_handshake(peer.observed.ip()),
            PeerState::Established { identity, .. } => {
                self.admission.release();
                if let Some(identity) = identity {
                    self.replay.release(identity, id);
                }
            }
        }
        self.release_queue(id, &peer.queue);
        for reg in self.directory.release(id) {
            self.unregister(id, reg);
        }
        self.meetings.release(id);
    }
}
