//! The wire's growth policy, as it appears in every handshake: the protocol
//! version (bound into the handshake by the prologue), the [`Intent`] of a
//! session, the [`Capabilities`] each side supports, and the [`Hello`] the
//! initiator opens with (with its [`Stamp`]). How they evolve is written in
//! the crate docs, "How the wire grows".
//!
//! Invariant: a hello decodes strictly in its known fields and ignores what
//! a newer peer appends; unknown capability bits are never used.

use crate::keys::PublicKey;

/// The wire protocol version, also bound into the handshake by the prologue.
/// Version 2 (2026-12): the hello carries capability bits and may grow, and
/// data sessions are links (the one-connection tunnel, intent 2, is gone).
/// Version 3 (2026-12): the transport rekeys every [`REKEY_EVERY`](crate::noise::REKEY_EVERY)
/// messages; a version 2 peer would not, and both would fail at that
/// message, so they fail the handshake instead. Additions go through
/// capabilities, not a new version.
pub const PROTOCOL_VERSION: u16 = 3;
/// The prologue: a peer speaking another protocol or version fails the handshake.
pub const PROLOGUE: &[u8] = b"seaport/3";
/// A hello's known fields did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed hello payload")]
pub struct MalformedHello;

/// What the initiator opens the session for. Non-exhaustive: a new kind of
/// session is a new intent byte, refused (as a malformed hello) by peers that
/// do not know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Intent {
    /// A control session with a registry.
    Control,
    // Intent byte 2 was the one-connection-per-stream tunnel that links
    // replaced; it is not reused, so such a peer is refused as unknown.
    /// A link to a service: many streams multiplexed on one session
    /// ([`crate::link`]).
    Link,
}

/// Optional features a peer supports, one bit each, exchanged in the
/// handshake (the initiator's in its [`Hello`], the responder's in its reply).
/// A feature is used on a session only when both sides set its bit
/// ([`Capabilities::common`]); bits a peer does not know are ignored, so a
/// newer peer can advertise more without an older one noticing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// No optional feature.
    pub const NONE: Capabilities = Capabilities(0);
    /// Bit 0: meetings ([`crate::meet`]): a registry arranges them, a
    /// service answers `MeetOffer`s.
    pub const MEET: Capabilities = Capabilities(1);
    /// Bit 1: answers in parts ([`crate::message::Message::InstancesPart`]):
    /// a client with it assembles an answer of many messages; a registry
    /// sends one only to such a client.
    pub const PARTS: Capabilities = Capabilities(1 << 1);
    /// Bit 2: resumable links ([`crate::link`]'s `resume`): both ends number
    /// their frames, acknowledge them (`ACK`) and keep what the peer has not
    /// acknowledged, so the link can continue on a new transport (`RESUME`).
    pub const RESUME: Capabilities = Capabilities(1 << 2);
    /// Bit 3: datagrams on links ([`crate::link`]'s `DATAGRAM` frame): UDP
    /// flows ride beside the streams, unnumbered and never resent.
    pub const DATAGRAM: Capabilities = Capabilities(1 << 3);
    /// Bit 4: a service takes the client's address in `OPEN` ([`crate::link`]'s
    /// wire): for the PROXY protocol header it may give its backend.
    pub const CLIENT_ADDRESS: Capabilities = Capabilities(1 << 4);
    /// Bit 5: a service takes early data ([`crate::link`]'s wire): one
    /// `DATA` of at most [`crate::link::EARLY_DATA`] bytes right after a
    /// stream's `OPEN`, before its `ACCEPT`: the client's first bytes, which
    /// then reach the backend without waiting a round trip for the `ACCEPT`.
    pub const EARLY_DATA: Capabilities = Capabilities(1 << 5);

    /// Whether every bit of `other` is set here.
    pub fn contains(self, other: Capabilities) -> bool {
        self.0 & other.0 == other.0
    }

    /// What both sides support.
    pub fn common(self, other: Capabilities) -> Capabilities {
        Capabilities(self.0 & other.0)
    }

    /// Big-endian on the wire.
    pub(crate) fn to_bytes(self) -> [u8; CAPS_LEN] {
        self.0.to_be_bytes()
    }

    /// Reads the capability word at the start of `bytes`; a payload too short
    /// to hold one (a peer from before capabilities) has none. Bytes after it
    /// are a newer peer's and are ignored.
    pub(crate) fn read(bytes: &[u8]) -> Capabilities {
        bytes.first_chunk::<CAPS_LEN>().map_or(Capabilities::NONE, |b| Capabilities(u64::from_be_bytes(*b)))
    }
}

/// What this build supports (see the crate docs, "How the wire grows").
pub const CAPABILITIES: Capabilities = Capabilities(
    Capabilities::MEET.0
        | Capabilities::PARTS.0
        | Capabilities::RESUME.0
        | Capabilities::DATAGRAM.0
        | Capabilities::CLIENT_ADDRESS.0
        | Capabilities::EARLY_DATA.0,
);

/// The initiator's first handshake payload.
///
/// Layout: version (u16 BE), intent (u8), ed25519 key (32 bytes),
/// capabilities (u64 BE), a [`Stamp`] (two u64 BE, optional), then anything
/// a newer peer adds, which is ignored. A hello of exactly the first three
/// fields (a build from before capabilities) is read as having none, and
/// one without the stamp as unstamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version the initiator speaks.
    pub version: u16,
    /// What the session is for.
    pub intent: Intent,
    /// The initiator's ed25519 identity.
    pub key: PublicKey,
    /// The initiator's optional features.
    pub capabilities: Capabilities,
    /// Which process of that identity sent it, and its how-many-th session.
    pub stamp: Option<Stamp>,
}

/// Tells a registry which process of an identity a control session comes
/// from, and in which order that process opened its sessions: one
/// identity may run in several processes (one seed per host), each with
/// sessions of its own, and a captured first message replayed later is not
/// newer than the session it was captured from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// Random per process, chosen once at its start.
    pub process: u64,
    /// Grows with every session the process opens.
    pub counter: u64,
}

/// The fields every hello has: version, intent, key.
pub(crate) const HELLO_BASE_LEN: usize = 2 + 1 + 32;
const CAPS_LEN: usize = 8;
const STAMP_LEN: usize = 16;
const HELLO_LEN: usize = HELLO_BASE_LEN + CAPS_LEN + STAMP_LEN;

impl Hello {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; HELLO_LEN];
        let (version, rest) = out.split_at_mut(2);
        version.copy_from_slice(&self.version.to_be_bytes());
        let (intent, rest) = rest.split_at_mut(1);
        intent.copy_from_slice(&[match self.intent {
            Intent::Control => 1,
            Intent::Link => 3,
        }]);
        let (key, rest) = rest.split_at_mut(32);
        key.copy_from_slice(self.key.as_bytes());
        let (caps, stamp) = rest.split_at_mut(CAPS_LEN);
        caps.copy_from_slice(&self.capabilities.to_bytes());
        match self.stamp {
            Some(Stamp { process, counter }) => {
                let (p, c) = stamp.split_at_mut(8);
                p.copy_from_slice(&process.to_be_bytes());
                c.copy_from_slice(&counter.to_be_bytes());
            }
            None => out.truncate(HELLO_LEN - STAMP_LEN),
        }
        out
    }

    /// Decodes the known fields strictly; what follows them is a newer
    /// peer's business and is skipped.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Hello, MalformedHello> {
        let (version, rest) = bytes.split_first_chunk::<2>().ok_or(MalformedHello)?;
        let (intent, rest) = rest.split_first().ok_or(MalformedHello)?;
        let (key, rest) = rest.split_first_chunk::<32>().ok_or(MalformedHello)?;
        let version = u16::from_be_bytes(*version);
        let intent = match intent {
            1 => Intent::Control,
            3 => Intent::Link,
            _ => return Err(MalformedHello),
        };
        // Not checked here: the responder compares its X25519 form with the
        // handshake's static key, which a non-point can never match.
        let key = PublicKey::from_bytes_unchecked(*key);
        let capabilities = Capabilities::read(rest);
        let stamp = rest.get(CAPS_LEN..).and_then(|r| r.split_first_chunk::<8>()).and_then(|(p, r)| {
            let (c, _) = r.split_first_chunk::<8>()?;
            Some(Stamp { process: u64::from_be_bytes(*p), counter: u64::from_be_bytes(*c) })
        });
        Ok(Hello { version, intent, key, capabilities, stamp })
    }
}
