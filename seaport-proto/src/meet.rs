//! Meetings: how the registry brings a proxy and a service together when
//! the proxy cannot dial the service (a NAT, a firewall), for TCP hole
//! punching and, where that fails, a relay.
//!
//! # The exchange
//! 1. The proxy asks over its control session: `Meet { id, service }`. The
//!    registry checks the asker's budget and that `service` is registered
//!    now, and answers `MeetReady { id, ticket }` to the proxy and
//!    `MeetOffer { ticket, proxy }` to the service (which may decline by
//!    doing nothing, e.g. a proxy its `--allow` list does not admit).
//! 2. Each side binds a fresh local port P (reusable: SO_REUSEADDR and
//!    SO_REUSEPORT), connects from P to the registry's own listening port
//!    and sends a [`MeetHello`] frame: the ticket and its side. This **meet
//!    connection** is plaintext; the ticket, handed out only over the two
//!    authenticated control sessions, is what admits it.
//! 3. Once both sides arrived, the registry sends each a [`MeetPeer`] frame:
//!    the address it observed for the *other* side's meet connection (its
//!    NAT's mapping of P), and whether it relays. From then on the registry
//!    splices the two meet connections byte for byte (when it relays).
//! 4. Both sides connect from P to the address they were given, repeatedly
//!    until a deadline: through endpoint-independent ("cone") NATs the two
//!    SYNs cross and a TCP simultaneous open succeeds (a **punched** path).
//!    The proxy runs the link's Noise `IK` handshake on whichever path comes
//!    up first: the punched one, or, after a short delay, the meet connection
//!    itself (a **relayed** path, end to end encrypted: the registry sees only
//!    ciphertext and holds no keys). The paths it does not take it closes.
//!
//! # Bounds (all in [`MeetConfig`])
//! Only an established control session may ask; each asker has a token
//! bucket (a burst, then one meeting per refill interval) and a cap on
//! meetings waiting at once; the registry caps waiting meetings overall. A
//! meeting waits at most `ttl` for its two sides and is forgotten once both
//! arrived, once it expires, or once either session ends. Tickets are
//! HMAC-SHA256 of a counter under a secret the registry keeps (derived from
//! its identity and the entropy its driver gives), so they cannot be guessed
//! and never repeat within a run.
//!
//! # Telling a meet connection from a handshake
//! A [`MeetHello`] is one frame of [`HELLO_LEN`] bytes. The smallest Noise
//! `IK` first message is [`MIN_NOISE_FIRST`] bytes, so a registry can tell
//! from a connection's first frame alone which kind it is.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::keys::Keypair;
use crate::registry::SessionId;

/// Bytes in a ticket.
pub const TICKET_LEN: usize = 16;
/// The magic a [`MeetHello`] starts with.
pub const MAGIC: [u8; 8] = *b"sp-meet1";
/// Bytes in a [`MeetHello`] frame body.
pub const HELLO_LEN: usize = MAGIC.len() + TICKET_LEN + 1;
/// The smallest first message of a Noise `IK` handshake: an ephemeral key
/// (32), the encrypted static key (32 + 16) and an empty payload's tag (16).
pub const MIN_NOISE_FIRST: usize = 32 + 48 + 16;
const _: () = assert!(HELLO_LEN < MIN_NOISE_FIRST);

/// What admits a meet connection: random to everyone but the registry and
/// the two peers it was given to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Ticket(pub [u8; TICKET_LEN]);

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Enough to tell tickets apart in logs, not enough to use one.
        let [a, b, ..] = self.0;
        write!(f, "Ticket({a:02x}{b:02x}…)")
    }
}

/// Which end of a meeting a meet connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MeetSide {
    /// The side that asked (and will run the handshake as initiator).
    Proxy,
    /// The side that was offered the meeting.
    Service,
}

/// The first frame of a meet connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeetHello {
    /// The meeting.
    pub ticket: Ticket,
    /// Which end this connection is.
    pub side: MeetSide,
}

impl MeetHello {
    /// The frame body ([`HELLO_LEN`] bytes).
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        let (magic, rest) = out.split_at_mut(MAGIC.len());
        magic.copy_from_slice(&MAGIC);
        let (ticket, side) = rest.split_at_mut(TICKET_LEN);
        ticket.copy_from_slice(&self.ticket.0);
        if let Some(s) = side.first_mut() {
            *s = match self.side {
                MeetSide::Proxy => 0,
                MeetSide::Service => 1,
            };
        }
        out
    }

    /// Reads a frame body; `None` if it is not a meet hello (a handshake).
    pub fn decode(body: &[u8]) -> Option<MeetHello> {
        let body: &[u8; HELLO_LEN] = body.try_into().ok()?;
        let (magic, rest) = body.split_first_chunk::<8>()?;
        let (ticket, side) = rest.split_first_chunk::<TICKET_LEN>()?;
        let side = match side {
            [0] => MeetSide::Proxy,
            [1] => MeetSide::Service,
            _ => return None,
        };
        (*magic == MAGIC).then_some(MeetHello { ticket: Ticket(*ticket), side })
    }
}

/// The registry's answer on a meet connection once both sides arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeetPeer {
    /// The other side's meet connection as the registry saw it.
    pub addr: SocketAddr,
    /// Whether the registry now splices the two meet connections.
    pub relaying: bool,
}

/// Most bytes of a [`MeetPeer`] frame body.
pub const PEER_MAX_LEN: usize = 1 + 1 + 16 + 2;

impl MeetPeer {
    /// The frame body: flags (bit 0: relaying), family (4 or 6), the
    /// address's bytes, the port (big-endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(PEER_MAX_LEN);
        out.push(u8::from(self.relaying));
        match self.addr.ip() {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(6);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&self.addr.port().to_be_bytes());
        out
    }

    /// Reads a frame body, strictly.
    pub fn decode(body: &[u8]) -> Option<MeetPeer> {
        let (&[flags, family], rest) = body.split_first_chunk::<2>()?;
        if flags > 1 {
            return None;
        }
        let (ip, port) = match family {
            4 => {
                let (ip, port) = rest.split_first_chunk::<4>()?;
                (IpAddr::V4(Ipv4Addr::from(*ip)), port)
            }
            6 => {
                let (ip, port) = rest.split_first_chunk::<16>()?;
                (IpAddr::V6(Ipv6Addr::from(*ip)), port)
            }
            _ => return None,
        };
        let port: &[u8; 2] = port.try_into().ok()?;
        Some(MeetPeer { addr: SocketAddr::new(ip, u16::from_be_bytes(*port)), relaying: flags == 1 })
    }
}

/// Limits on meetings.
#[derive(Debug, Clone)]
pub struct MeetConfig {
    /// How long a meeting waits for its two sides.
    pub ttl: Duration,
    /// Most meetings waiting at once, all askers together.
    pub max_waiting: usize,
    /// Most meetings one session may have waiting at once.
    pub per_session: usize,
    /// How many meetings a session may ask for in a burst.
    pub burst: u32,
    /// How often a session earns one more (up to `burst`).
    pub refill: Duration,
}

impl Default for MeetConfig {
    /// 10 s to arrive; 4,096 waiting; 16 per session; a burst of 16, then 4 a second.
    fn default() -> Self {
        MeetConfig {
            ttl: Duration::from_secs(10),
            max_waiting: 4096,
            per_session: 16,
            burst: 16,
            refill: Duration::from_millis(250),
        }
    }
}

/// Why a meeting was not arranged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MeetRefusal {
    /// The asker used up its budget for now.
    #[error("too many meetings asked for; try again shortly")]
    Rate,
    /// The asker, or the registry, has as many meetings waiting as allowed.
    #[error("too many meetings waiting")]
    Busy,
}

/// A meet connection arrived: what the registry's driver does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The first side: hold the connection until the other comes (or `until`).
    First {
        /// When the meeting expires.
        until: Instant,
    },
    /// The second side: pair it with the first, tell both, relay.
    Second,
}

/// A meet connection that must be closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArrivalError {
    /// No such meeting (never was, expired, or already complete).
    #[error("unknown or expired ticket")]
    Unknown,
    /// This side of the meeting already arrived.
    #[error("this side of the meeting already arrived")]
    Duplicate,
}

struct Meeting {
    proxy: SessionId,
    service: SessionId,
    expires: Instant,
    arrived: Option<MeetSide>,
}

struct Bucket {
    tokens: u32,
    updated: Instant,
}

/// The registry's meetings; see the module docs.
pub struct Meetings {
    config: MeetConfig,
    key: ring::hmac::Key,
    counter: u64,
    waiting: HashMap<Ticket, Meeting>,
    buckets: HashMap<SessionId, Bucket>,
}

impl Meetings {
    /// Meetings whose tickets derive from `identity` (so they cannot be
    /// guessed even before [`Meetings::mix_entropy`]).
    pub fn new(identity: &Keypair, config: MeetConfig) -> Meetings {
        let seed = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, identity.signing_key().as_bytes());
        let secret = ring::hmac::sign(&seed, b"seaport meet tickets");
        Meetings {
            config,
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref()),
            counter: 0,
            waiting: HashMap::new(),
            buckets: HashMap::new(),
        }
    }

    /// Mixes fresh randomness into the ticket secret, so tickets differ
    /// from one run of the same registry to the next.
    pub fn mix_entropy(&mut self, entropy: [u8; 32]) {
        let secret = ring::hmac::sign(&self.key, &entropy);
        self.key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref());
    }

    /// Meetings waiting for their sides now.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Arranges a meeting between `proxy` (the asker) and `service`, both
    /// sessions; the ticket goes to both.
    pub fn open(
        &mut self,
        now: Instant,
        proxy: SessionId,
        service: SessionId,
    ) -> Result<Ticket, MeetRefusal> {
        self.expire(now);
        let config = &self.config;
        let bucket = self.buckets.entry(proxy).or_insert(Bucket { tokens: config.burst, updated: now });
        let earned =
            now.saturating_duration_since(bucket.updated).as_nanos() / config.refill.as_nanos().max(1);
        if earned > 0 {
            bucket.tokens =
                u32::try_from(earned).unwrap_or(u32::MAX).saturating_add(bucket.tokens).min(config.burst);
            bucket.updated = now;
        }
        if bucket.tokens == 0 {
            return Err(MeetRefusal::Rate);
        }
        let mine = self.waiting.values().filter(|m| m.proxy == proxy).count();
        if mine >= config.per_session || self.waiting.len() >= config.max_waiting {
            return Err(MeetRefusal::Busy);
        }
        bucket.tokens -= 1;
        self.counter += 1;
        let tag = ring::hmac::sign(&self.key, &self.counter.to_be_bytes());
        let mut ticket = [0u8; TICKET_LEN];
        if let Some(bytes) = tag.as_ref().first_chunk::<TICKET_LEN>() {
            ticket = *bytes;
        }
        let ticket = Ticket(ticket);
        let expires = now + self.config.ttl;
        self.waiting.insert(ticket, Meeting { proxy, service, expires, arrived: None });
        Ok(ticket)
    }

    /// A meet connection for `ticket` arrived as `side`.
    pub fn arrive(&mut self, now: Instant, ticket: Ticket, side: MeetSide) -> Result<Arrival, ArrivalError> {
        self.expire(now);
        let meeting = self.waiting.get_mut(&ticket).ok_or(ArrivalError::Unknown)?;
        match meeting.arrived {
            None => {
                meeting.arrived = Some(side);
                Ok(Arrival::First { until: meeting.expires })
            }
            Some(first) if first == side => Err(ArrivalError::Duplicate),
            Some(_) => {
                self.waiting.remove(&ticket);
                Ok(Arrival::Second)
            }
        }
    }

    /// Session `id` ended: its meetings and its budget go.
    pub fn release(&mut self, id: SessionId) {
        self.waiting.retain(|_, m| m.proxy != id && m.service != id);
        self.buckets.remove(&id);
    }

    /// Forgets meetings past their time, and buckets that are full again.
    pub fn expire(&mut self, now: Instant) {
        self.waiting.retain(|_, m| m.expires > now);
        let full = self.config.refill.saturating_mul(self.config.burst);
        self.buckets.retain(|_, b| now.saturating_duration_since(b.updated) < full);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::keypair;

    #[test]
    fn a_hello_and_a_peer_frame_read_back_and_nothing_else_reads_as_one() {
        let hello = MeetHello { ticket: Ticket([7; TICKET_LEN]), side: MeetSide::Service };
        assert_eq!(MeetHello::decode(&hello.encode()), Some(hello));
        let mut bad = hello.encode();
        bad[HELLO_LEN - 1] = 2;
        assert_eq!(MeetHello::decode(&bad), None, "unknown side");
        bad = hello.encode();
        bad[0] ^= 1;
        assert_eq!(MeetHello::decode(&bad), None, "wrong magic");
        assert_eq!(MeetHello::decode(&[0; MIN_NOISE_FIRST]), None, "a handshake is never a hello");
        for addr in ["203.0.113.21:4000", "[2001:db8::1]:65535"] {
            let peer = MeetPeer { addr: addr.parse().unwrap(), relaying: true };
            let bytes = peer.encode();
            assert!(bytes.len() <= PEER_MAX_LEN);
            assert_eq!(MeetPeer::decode(&bytes), Some(peer));
            assert_eq!(MeetPeer::decode(&bytes[..bytes.len() - 1]), None, "cut short");
            let mut long = bytes.clone();
            long.push(0);
            assert_eq!(MeetPeer::decode(&long), None, "trailing byte");
        }
        assert_eq!(MeetPeer::decode(&[2, 4, 1, 2, 3, 4, 0, 1]), None, "unknown flag");
    }

    #[test]
    fn a_meeting_pairs_one_proxy_and_one_service_once() {
        let now = Instant::now();
        let mut meetings = Meetings::new(&keypair(1), MeetConfig::default());
        let (p, s) = (SessionId(1), SessionId(2));
        let ticket = meetings.open(now, p, s).unwrap();
        assert_eq!(
            meetings.arrive(now, Ticket([0; TICKET_LEN]), MeetSide::Proxy),
            Err(ArrivalError::Unknown)
        );
        assert!(matches!(meetings.arrive(now, ticket, MeetSide::Service), Ok(Arrival::First { .. })));
        assert_eq!(meetings.arrive(now, ticket, MeetSide::Service), Err(ArrivalError::Duplicate));
        assert_eq!(meetings.arrive(now, ticket, MeetSide::Proxy), Ok(Arrival::Second));
        assert_eq!(meetings.arrive(now, ticket, MeetSide::Proxy), Err(ArrivalError::Unknown), "used up");
        assert_eq!(meetings.waiting(), 0);
    }

    #[test]
    fn meetings_expire_and_go_with_their_sessions() {
        let now = Instant::now();
        let config = MeetConfig::default();
        let mut meetings = Meetings::new(&keypair(1), config.clone());
        let first = meetings.open(now, SessionId(1), SessionId(2)).unwrap();
        let later = now + config.ttl;
        assert_eq!(meetings.arrive(later, first, MeetSide::Proxy), Err(ArrivalError::Unknown));
        let second = meetings.open(later, SessionId(1), SessionId(2)).unwrap();
        assert_ne!(first, second, "tickets never repeat");
        meetings.release(SessionId(2));
        assert_eq!(meetings.arrive(later, second, MeetSide::Proxy), Err(ArrivalError::Unknown));
    }

    #[test]
    fn an_asker_gets_a_burst_then_a_steady_rate_and_a_cap_on_waiting() {
        let now = Instant::now();
        let config = MeetConfig { per_session: 100, ..MeetConfig::default() };
        let mut meetings = Meetings::new(&keypair(1), config.clone());
        let asker = SessionId(1);
        for _ in 0..config.burst {
            meetings.open(now, asker, SessionId(2)).unwrap();
        }
        assert_eq!(meetings.open(now, asker, SessionId(2)), Err(MeetRefusal::Rate));
        // Another asker has a budget of its own.
        assert!(meetings.open(now, SessionId(3), SessionId(2)).is_ok());
        let then = now + config.refill;
        assert!(meetings.open(then, asker, SessionId(2)).is_ok());
        assert_eq!(meetings.open(then, asker, SessionId(2)), Err(MeetRefusal::Rate));

        let config = MeetConfig { per_session: 2, ..MeetConfig::default() };
        let mut meetings = Meetings::new(&keypair(1), config);
        meetings.open(now, asker, SessionId(2)).unwrap();
        meetings.open(now, asker, SessionId(2)).unwrap();
        assert_eq!(meetings.open(now, asker, SessionId(2)), Err(MeetRefusal::Busy));
    }

    #[test]
    fn tickets_depend_on_the_identity_and_on_the_entropy_mixed_in() {
        let now = Instant::now();
        let ticket = |n: u8, entropy: Option<[u8; 32]>| {
            let mut m = Meetings::new(&keypair(n), MeetConfig::default());
            if let Some(e) = entropy {
                m.mix_entropy(e);
            }
            m.open(now, SessionId(1), SessionId(2)).unwrap()
        };
        assert_eq!(ticket(1, None), ticket(1, None));
        assert_ne!(ticket(1, None), ticket(2, None));
        assert_ne!(ticket(1, None), ticket(1, Some([9; 32])));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_frames_never_panic_and_what_reads_writes_back(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)) {
            if let Some(hello) = MeetHello::decode(&bytes) {
                proptest::prop_assert_eq!(&hello.encode()[..], &bytes[..]);
            }
            if let Some(peer) = MeetPeer::decode(&bytes) {
                proptest::prop_assert_eq!(peer.encode(), bytes);
            }
        }
    }
}
