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
//!    connection** is plaintext; the ticket, handed out only over that
//!    side's authenticated control session, is what admits it, and only from
//!    the address that control session comes from.
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
//! # Bounds
//! The registry's budgets, tickets and pairing are in
//! [`crate::registry::Meetings`].
//!
//! # Telling a meet connection from a handshake
//! A [`MeetHello`] is one frame of [`HELLO_LEN`] bytes. The smallest Noise
//! `IK` first message is [`MIN_NOISE_FIRST`] bytes, so a registry can tell
//! from a connection's first frame alone which kind it is.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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
/// The smallest reply of a Noise `IK` handshake: an ephemeral key (32) and
/// an empty payload's tag (16).
pub const MIN_NOISE_REPLY: usize = 32 + 16;

/// Whether a relayed record of `len` bytes, the first from `side`, has the
/// size of that side's link handshake message: a relay carries links, and
/// its first two records say so before anything else is spliced.
pub fn is_handshake_size(side: MeetSide, len: usize) -> bool {
    let min = match side {
        MeetSide::Proxy => MIN_NOISE_FIRST,
        MeetSide::Service => MIN_NOISE_REPLY,
    };
    (min..=crate::noise::MAX_HANDSHAKE).contains(&len)
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn only_handshake_sized_records_open_a_relay() {
        use crate::hello::Intent;
        use crate::session::Session;
        use crate::testing::keypair;
        let now = std::time::Instant::now();
        let timeout = std::time::Duration::from_secs(1);
        let mut proxy =
            Session::initiate(now, &keypair(1), &keypair(2).public(), Intent::Link, [1; 32], timeout)
                .unwrap();
        let mut first = Vec::new();
        proxy.poll_transmit(&mut first);
        assert!(is_handshake_size(MeetSide::Proxy, first.len() - 2), "a real first message: {}", first.len());
        let mut service = Session::respond(now, &keypair(2), Intent::Link, [2; 32], timeout).unwrap();
        service.handle_input(now, &first).unwrap();
        let mut reply = Vec::new();
        service.poll_transmit(&mut reply);
        let reply_len = usize::from(u16::from_be_bytes([reply[0], reply[1]]));
        assert!(is_handshake_size(MeetSide::Service, reply_len), "a real reply: {reply_len}");
        // Plaintext through the relay: "GE" read as a length.
        assert!(!is_handshake_size(MeetSide::Proxy, usize::from(u16::from_be_bytes(*b"GE"))));
        assert!(!is_handshake_size(MeetSide::Proxy, MIN_NOISE_FIRST - 1));
        assert!(!is_handshake_size(MeetSide::Service, MIN_NOISE_REPLY - 1));
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
