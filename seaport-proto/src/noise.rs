//! Noise `IK` handshakes and the transport that follows them.
//!
//! The initiator always knows the responder's public key (the registry's from
//! the user, a service's from the registry), so `IK` lets it encrypt its first
//! message: a peer that does not know the key cannot produce a message the
//! responder accepts. The first payload is a [`Hello`] naming the initiator's
//! ed25519 key, its [`Intent`] and the protocol version; the responder checks
//! that the ed25519 key maps to the Noise static key the handshake proved.
//!
//! Pure: the ephemeral key comes from entropy the caller passes in; snow's
//! own random source is never consulted. Invariant: a [`Transport`] exists only
//! after both handshake messages were verified.

use crate::frame::{self, MAX_FRAME};
use crate::keys::{Keypair, PublicKey};

/// The one cipher suite of protocol version [`PROTOCOL_VERSION`]. AES-GCM
/// through ring seals about 8x faster than snow's default ChaChaPoly here;
/// changing the suite is a protocol version change.
pub const NOISE_SUITE: &str = "Noise_IK_25519_AESGCM_SHA256";
/// The wire protocol version, also bound into the handshake by the prologue.
/// Version 2 (2026-12): the hello carries capability bits and may grow, and
/// data sessions are links (the one-connection tunnel, intent 2, is gone).
/// Version 3 (2026-12): the transport rekeys every [`REKEY_EVERY`]
/// messages; a version 2 peer would not, and both would fail at that
/// message, so they fail the handshake instead. Additions go through
/// capabilities, not a new version.
pub const PROTOCOL_VERSION: u16 = 3;
/// The prologue: a peer speaking another protocol or version fails the handshake.
pub const PROLOGUE: &[u8] = b"seaport/3";
/// Largest handshake message (either direction) and so, less its keys and
/// tags, the room a handshake payload has to grow in.
const MAX_HANDSHAKE: usize = 1024;
/// Authentication tag added to each sealed message.
pub const TAG_LEN: usize = 16;
/// Most plaintext one transport frame carries.
pub const MAX_PLAINTEXT: usize = MAX_FRAME - TAG_LEN;

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

    /// Whether every bit of `other` is set here.
    pub fn contains(self, other: Capabilities) -> bool {
        self.0 & other.0 == other.0
    }

    /// What both sides support.
    pub fn common(self, other: Capabilities) -> Capabilities {
        Capabilities(self.0 & other.0)
    }

    /// Big-endian on the wire.
    fn to_bytes(self) -> [u8; CAPS_LEN] {
        self.0.to_be_bytes()
    }

    /// Reads the capability word at the start of `bytes`; a payload too short
    /// to hold one (a peer from before capabilities) has none. Bytes after it
    /// are a newer peer's and are ignored.
    fn read(bytes: &[u8]) -> Capabilities {
        bytes.first_chunk::<CAPS_LEN>().map_or(Capabilities::NONE, |b| Capabilities(u64::from_be_bytes(*b)))
    }
}

/// What this build supports (see the crate docs, "How the wire grows").
pub const CAPABILITIES: Capabilities = Capabilities(Capabilities::MEET.0 | Capabilities::PARTS.0);

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
const HELLO_BASE_LEN: usize = 2 + 1 + 32;
const CAPS_LEN: usize = 8;
const STAMP_LEN: usize = 16;
const HELLO_LEN: usize = HELLO_BASE_LEN + CAPS_LEN + STAMP_LEN;

impl Hello {
    fn encode(&self) -> Vec<u8> {
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
    fn decode(bytes: &[u8]) -> Result<Hello, NoiseError> {
        let (version, rest) = bytes.split_first_chunk::<2>().ok_or(NoiseError::BadHello)?;
        let (intent, rest) = rest.split_first().ok_or(NoiseError::BadHello)?;
        let (key, rest) = rest.split_first_chunk::<32>().ok_or(NoiseError::BadHello)?;
        let version = u16::from_be_bytes(*version);
        let intent = match intent {
            1 => Intent::Control,
            3 => Intent::Link,
            _ => return Err(NoiseError::BadHello),
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

/// Why a handshake or transport message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NoiseError {
    /// The message did not decrypt: wrong key, other protocol version, or tampering.
    #[error("message failed to authenticate (wrong key, incompatible version, or corrupted)")]
    Decrypt,
    /// The first payload was not a well-formed hello.
    #[error("malformed hello payload")]
    BadHello,
    /// The hello names an ed25519 key that does not match the Noise static key.
    #[error("peer's claimed identity does not match its handshake key")]
    IdentityMismatch,
    /// The initiator asked for a kind of session this responder does not
    /// serve; refused before any reply was written.
    #[error("peer asked for a {got:?} session, this endpoint serves {expected:?}")]
    WrongIntent {
        /// What it asked for.
        got: Intent,
        /// What is served here.
        expected: Intent,
    },
    /// The peer speaks a protocol version we do not.
    #[error("peer speaks protocol version {0}, this build speaks {PROTOCOL_VERSION}")]
    Version(u16),
    /// Too much plaintext for one frame.
    #[error("plaintext of {0} bytes exceeds one frame")]
    TooLarge(usize),
    /// snow refused for another reason (a bug on our side, never peer data).
    #[error("noise state error: {0}")]
    State(String),
}

/// A snow resolver: X25519 from x25519-dalek, AES-GCM and SHA-256 from ring,
/// and as random source only the 32 bytes the caller gave us.
struct Resolver {
    entropy: [u8; 32],
    /// The local static key pair, already derived, so snow's `set` need not
    /// recompute the public half on every handshake.
    local: ([u8; 32], [u8; 32]),
}

struct OneShotRandom(Option<[u8; 32]>);

impl snow::types::Random for OneShotRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        // IK asks for exactly one ephemeral key per side.
        let bytes = self.0.take().ok_or(snow::Error::Rng)?;
        if dest.len() != bytes.len() {
            return Err(snow::Error::Rng);
        }
        dest.copy_from_slice(&bytes);
        Ok(())
    }
}

/// X25519 for snow over x25519-dalek; refuses low-order peer keys.
struct X25519 {
    secret: [u8; 32],
    public: [u8; 32],
    /// A key pair whose public half is known already (the local static key).
    known: ([u8; 32], [u8; 32]),
}

impl X25519 {
    fn set_secret(&mut self, secret: [u8; 32]) {
        self.secret = secret;
        self.public = if secret == self.known.0 {
            self.known.1
        } else {
            x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret)).to_bytes()
        };
    }
}

impl snow::types::Dh for X25519 {
    fn name(&self) -> &'static str {
        "25519"
    }
    fn pub_len(&self) -> usize {
        32
    }
    fn priv_len(&self) -> usize {
        32
    }
    fn set(&mut self, privkey: &[u8]) {
        let mut secret = [0u8; 32];
        if let Some(src) = privkey.get(..32) {
            secret.copy_from_slice(src);
        }
        self.set_secret(secret);
    }
    fn generate(&mut self, rng: &mut dyn snow::types::Random) -> Result<(), snow::Error> {
        let mut secret = [0u8; 32];
        rng.try_fill_bytes(&mut secret)?;
        self.set_secret(secret);
        Ok(())
    }
    fn pubkey(&self) -> &[u8] {
        &self.public
    }
    fn privkey(&self) -> &[u8] {
        &self.secret
    }
    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let peer: [u8; 32] = pubkey.get(..32).and_then(|p| p.try_into().ok()).ok_or(snow::Error::Dh)?;
        let shared = x25519_dalek::StaticSecret::from(self.secret)
            .diffie_hellman(&x25519_dalek::PublicKey::from(peer));
        // A low-order point gives an all-zero secret an attacker can predict.
        if !shared.was_contributory() {
            return Err(snow::Error::Dh);
        }
        out.get_mut(..32).ok_or(snow::Error::Dh)?.copy_from_slice(shared.as_bytes());
        Ok(())
    }
}

impl snow::resolvers::CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        Some(Box::new(OneShotRandom(Some(self.entropy))))
    }
    fn resolve_dh(&self, choice: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        match choice {
            snow::params::DHChoice::Curve25519 => {
                Some(Box::new(X25519 { secret: [0; 32], public: [0; 32], known: self.local }))
            }
            _ => None,
        }
    }
    fn resolve_hash(&self, choice: &snow::params::HashChoice) -> Option<Box<dyn snow::types::Hash>> {
        snow::resolvers::RingResolver.resolve_hash(choice)
    }
    fn resolve_cipher(&self, choice: &snow::params::CipherChoice) -> Option<Box<dyn snow::types::Cipher>> {
        snow::resolvers::RingResolver.resolve_cipher(choice)
    }
}

fn state_err(e: snow::Error) -> NoiseError {
    NoiseError::State(e.to_string())
}

fn builder<'a>(
    local_secret: &'a [u8; 32],
    local_public: [u8; 32],
    entropy: [u8; 32],
) -> Result<snow::Builder<'a>, NoiseError> {
    let params: snow::params::NoiseParams = NOISE_SUITE.parse().map_err(state_err)?;
    let resolver = Resolver { entropy, local: (*local_secret, local_public) };
    snow::Builder::with_resolver(params, Box::new(resolver))
        .local_private_key(local_secret)
        .and_then(|b| b.prologue(PROLOGUE))
        .map_err(state_err)
}

/// Initiator side of a handshake, waiting for the responder's reply.
pub struct Initiator {
    state: snow::HandshakeState,
    remote: PublicKey,
}

impl Initiator {
    /// Starts a handshake to `remote` and appends the framed first message to `out`.
    pub fn start(
        local: &Keypair,
        remote: &PublicKey,
        intent: Intent,
        entropy: [u8; 32],
        out: &mut Vec<u8>,
    ) -> Result<Initiator, NoiseError> {
        Initiator::start_stamped(local, remote, intent, entropy, None, out)
    }

    /// `start`, with a [`Stamp`] in the hello.
    pub fn start_stamped(
        local: &Keypair,
        remote: &PublicKey,
        intent: Intent,
        entropy: [u8; 32],
        stamp: Option<Stamp>,
        out: &mut Vec<u8>,
    ) -> Result<Initiator, NoiseError> {
        let secret = local.x25519_secret();
        let remote_x = remote.to_x25519();
        let state = builder(&secret, local.x25519_public(), entropy)?
            .remote_public_key(&remote_x)
            .and_then(|b| b.build_initiator())
            .map_err(state_err)?;
        let hello = Hello {
            version: PROTOCOL_VERSION,
            intent,
            key: local.public(),
            capabilities: CAPABILITIES,
            stamp,
        };
        Initiator::start_with_payload(state, *remote, &hello.encode(), out)
    }

    /// Writes `payload` as the first message; `start` passes our hello, tests a newer peer's.
    fn start_with_payload(
        mut state: snow::HandshakeState,
        remote: PublicKey,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Initiator, NoiseError> {
        let mut msg = [0u8; MAX_HANDSHAKE];
        let len = state.write_message(payload, &mut msg).map_err(state_err)?;
        frame::encode(msg.get(..len).unwrap_or_default(), out).map_err(|e| NoiseError::TooLarge(e.0))?;
        Ok(Initiator { state, remote })
    }

    /// Reads the responder's reply (a frame body) and completes the handshake.
    /// The reply's payload carries the responder's [`Capabilities`] (none if
    /// it is empty, as from a build before capabilities; anything after them
    /// is ignored).
    pub fn finish(mut self, reply: &[u8]) -> Result<(Capabilities, Transport), NoiseError> {
        let mut payload = [0u8; MAX_HANDSHAKE];
        let len = self.state.read_message(reply, &mut payload).map_err(|_| NoiseError::Decrypt)?;
        let capabilities = Capabilities::read(payload.get(..len).unwrap_or_default());
        Ok((capabilities, Transport::from_handshake(self.state, self.remote)?))
    }
}

/// Responder side of a handshake, before the first message has arrived.
pub struct Responder {
    state: snow::HandshakeState,
}

impl Responder {
    /// Prepares to answer a handshake as `local`.
    pub fn new(local: &Keypair, entropy: [u8; 32]) -> Result<Responder, NoiseError> {
        let secret = local.x25519_secret();
        let state = builder(&secret, local.x25519_public(), entropy)?.build_responder().map_err(state_err)?;
        Ok(Responder { state })
    }

    /// Reads the initiator's first message (a frame body), checks who sent it,
    /// appends the framed reply to `out` and completes the handshake.
    pub fn accept(self, first: &[u8], out: &mut Vec<u8>) -> Result<(Hello, Transport), NoiseError> {
        self.accept_with_payload(first, out, &CAPABILITIES.to_bytes(), None)
    }

    /// `accept`, refusing (before a byte of reply is written) a hello that
    /// asks for another intent than `intent`.
    pub fn accept_for(
        self,
        intent: Intent,
        first: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(Hello, Transport), NoiseError> {
        self.accept_with_payload(first, out, &CAPABILITIES.to_bytes(), Some(intent))
    }

    /// `accept` answering with `reply` as payload; tests pass a newer peer's.
    fn accept_with_payload(
        mut self,
        first: &[u8],
        out: &mut Vec<u8>,
        reply: &[u8],
        intent: Option<Intent>,
    ) -> Result<(Hello, Transport), NoiseError> {
        let mut payload = [0u8; MAX_HANDSHAKE];
        let len = self.state.read_message(first, &mut payload).map_err(|_| NoiseError::Decrypt)?;
        let hello = Hello::decode(payload.get(..len).unwrap_or_default())?;
        if hello.version != PROTOCOL_VERSION {
            return Err(NoiseError::Version(hello.version));
        }
        let remote_static = self.state.get_remote_static().ok_or(NoiseError::BadHello)?;
        if remote_static != hello.key.to_x25519() {
            return Err(NoiseError::IdentityMismatch);
        }
        if let Some(expected) = intent.filter(|i| *i != hello.intent) {
            return Err(NoiseError::WrongIntent { got: hello.intent, expected });
        }
        let mut msg = [0u8; MAX_HANDSHAKE];
        let len = self.state.write_message(reply, &mut msg).map_err(state_err)?;
        frame::encode(msg.get(..len).unwrap_or_default(), out).map_err(|e| NoiseError::TooLarge(e.0))?;
        Ok((hello, Transport::from_handshake(self.state, hello.key)?))
    }
}

/// An established session: seals and opens frames in order.
///
/// Snow runs the handshake; the transport that follows is AES-256-GCM through
/// ring directly, as Noise specifies it (key from the handshake's split, nonce
/// 32 zero bits then the 64-bit big-endian message counter, empty associated
/// data), so frames can be sealed and opened in place without the copies
/// snow's API needs. A test checks it against snow's own transport.
pub struct Transport {
    sealer: Sealer,
    opener: Opener,
    remote: PublicKey,
}

impl Transport {
    /// Builds both directions from the finished handshake's split keys.
    fn from_handshake(mut state: snow::HandshakeState, remote: PublicKey) -> Result<Transport, NoiseError> {
        if !state.is_handshake_finished() {
            return Err(NoiseError::State("handshake not finished".into()));
        }
        let (initiator_to_responder, responder_to_initiator) = state.dangerously_get_raw_split();
        let (send, receive) = if state.is_initiator() {
            (initiator_to_responder, responder_to_initiator)
        } else {
            (responder_to_initiator, initiator_to_responder)
        };
        Ok(Transport { sealer: Sealer::new(&send)?, opener: Opener::new(&receive)?, remote })
    }

    /// Both ends of a transport keyed by `k1` one way and `k2` the other,
    /// without a handshake: for the `testing` feature's shortcut only.
    #[cfg(feature = "testing")]
    pub(crate) fn pair_for_testing(
        a: PublicKey,
        b: PublicKey,
        k1: [u8; 32],
        k2: [u8; 32],
    ) -> (Transport, Transport) {
        fn transport(
            send: &[u8; 32],
            receive: &[u8; 32],
            remote: PublicKey,
        ) -> Result<Transport, NoiseError> {
            Ok(Transport { sealer: Sealer::new(send)?, opener: Opener::new(receive)?, remote })
        }
        let pair = transport(&k1, &k2, b).and_then(|ta| Ok((ta, transport(&k2, &k1, a)?)));
        // AES-256-GCM accepts any 32-byte key, so this cannot fail.
        #[allow(clippy::expect_used)]
        pair.expect("AES-256-GCM takes any 32-byte key")
    }

    /// The authenticated identity of the other end.
    pub fn remote(&self) -> PublicKey {
        self.remote
    }

    /// Seals `plaintext` (at most [`MAX_PLAINTEXT`] bytes) and appends it to
    /// `out` as one frame.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), NoiseError> {
        self.sealer.seal(plaintext, out)
    }

    /// Opens one frame body, appending its plaintext to `out`.
    pub fn open(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), NoiseError> {
        self.opener.open(body, out)
    }

    /// The two directions, to be driven independently (a link driver reads and writes at once).
    pub fn split(self) -> (Sealer, Opener) {
        (self.sealer, self.opener)
    }
}

fn aead_key(key: &[u8; 32]) -> Result<ring::aead::LessSafeKey, NoiseError> {
    let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key)
        .map_err(|_| NoiseError::State("AES-256-GCM key rejected".into()))?;
    Ok(ring::aead::LessSafeKey::new(key))
}

/// Messages each direction carries under one key before both ends replace
/// it, as the Noise spec's `Rekey()` does (frames are at most 64 KiB, so at
/// most 64 GiB go under one key). Both ends count the same messages, so
/// they rekey at the same one without a word on the wire.
pub const REKEY_EVERY: u64 = 1 << 20;

/// Noise's `REKEY(k)`: the first 32 bytes of `ENCRYPT(k, 2^64 - 1, "", zeros)`.
fn rekey(key: &ring::aead::LessSafeKey) -> Result<ring::aead::LessSafeKey, NoiseError> {
    let mut next = [0u8; 32];
    // The ciphertext is the new key; the tag is not part of it.
    let _tag = key
        .seal_in_place_separate_tag(nonce(u64::MAX), ring::aead::Aad::empty(), &mut next)
        .map_err(|_| NoiseError::State("rekeying failed".into()))?;
    aead_key(&next)
}

/// Counts one message under `key` and rekeys after every [`REKEY_EVERY`]th.
fn advance(key: &mut ring::aead::LessSafeKey, counter: &mut u64) -> Result<(), NoiseError> {
    // 2^64 - 1 is reserved for rekeying; no session gets near it.
    *counter = counter
        .checked_add(1)
        .filter(|c| *c < u64::MAX)
        .ok_or(NoiseError::State("nonce exhausted".into()))?;
    if *counter % REKEY_EVERY == 0 {
        *key = rekey(key)?;
    }
    Ok(())
}

/// Noise's AESGCM nonce: 32 zero bits, then the counter big-endian.
fn nonce(counter: u64) -> ring::aead::Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&counter.to_be_bytes());
    ring::aead::Nonce::assume_unique_for_key(bytes)
}

/// The sending half of a [`Transport`].
pub struct Sealer {
    key: ring::aead::LessSafeKey,
    counter: u64,
}

impl Sealer {
    fn new(key: &[u8; 32]) -> Result<Sealer, NoiseError> {
        Ok(Sealer { key: aead_key(key)?, counter: 0 })
    }

    /// Seals in place the `len` plaintext bytes the caller put at
    /// `frame[HEADER_LEN..]`, writing the length prefix and tag around them.
    /// `frame` must hold `HEADER_LEN + len + TAG_LEN` bytes; returns that
    /// length, the bytes to write.
    pub fn seal_frame(&mut self, frame: &mut [u8], len: usize) -> Result<usize, NoiseError> {
        if len > MAX_PLAINTEXT {
            return Err(NoiseError::TooLarge(len));
        }
        let body = len + TAG_LEN;
        let total = frame::HEADER_LEN + body;
        let frame = frame.get_mut(..total).ok_or(NoiseError::TooLarge(total))?;
        let (header, rest) = frame.split_at_mut(frame::HEADER_LEN);
        let (plain, tag) = rest.split_at_mut(len);
        // body <= MAX_FRAME, checked above.
        header.copy_from_slice(&(body as u16).to_be_bytes());
        let sealed = self
            .key
            .seal_in_place_separate_tag(nonce(self.counter), ring::aead::Aad::empty(), plain)
            .map_err(|_| NoiseError::State("sealing failed".into()))?;
        tag.copy_from_slice(sealed.as_ref());
        advance(&mut self.key, &mut self.counter)?;
        Ok(total)
    }

    /// Seals `plaintext` (at most [`MAX_PLAINTEXT`] bytes) and appends it to
    /// `out` as one frame.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), NoiseError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(NoiseError::TooLarge(plaintext.len()));
        }
        let start = out.len();
        out.resize(start + frame::HEADER_LEN, 0);
        out.extend_from_slice(plaintext);
        out.resize(start + frame::HEADER_LEN + plaintext.len() + TAG_LEN, 0);
        let frame = out.get_mut(start..).unwrap_or_default();
        if let Err(e) = self.seal_frame(frame, plaintext.len()) {
            out.truncate(start);
            return Err(e);
        }
        Ok(())
    }
}

/// The receiving half of a [`Transport`].
pub struct Opener {
    key: ring::aead::LessSafeKey,
    counter: u64,
}

impl Opener {
    fn new(key: &[u8; 32]) -> Result<Opener, NoiseError> {
        Ok(Opener { key: aead_key(key)?, counter: 0 })
    }

    /// Opens one frame body in place and returns its plaintext, a prefix of
    /// `body`. Frames must be opened in the order they were sealed; a frame
    /// that fails leaves the counter where it was.
    pub fn open_in_place<'a>(&mut self, body: &'a mut [u8]) -> Result<&'a mut [u8], NoiseError> {
        if body.len() < TAG_LEN {
            return Err(NoiseError::Decrypt);
        }
        let plain = self
            .key
            .open_in_place(nonce(self.counter), ring::aead::Aad::empty(), body)
            .map_err(|_| NoiseError::Decrypt)?;
        advance(&mut self.key, &mut self.counter)?;
        Ok(plain)
    }

    /// Opens one frame body, appending its plaintext to `out`.
    pub fn open(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), NoiseError> {
        let start = out.len();
        out.extend_from_slice(body);
        let opened = self.open_in_place(out.get_mut(start..).unwrap_or_default()).map(|p| p.len());
        match opened {
            Ok(len) => {
                out.truncate(start + len);
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Transport({})", self.remote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;
    use crate::keys::Seed;
    use proptest::prelude::*;

    fn pair(n: u8) -> Keypair {
        Keypair::from_seed(&Seed::from_bytes([n; 32]))
    }

    fn body(wire: &[u8]) -> Vec<u8> {
        let mut decoder = FrameDecoder::new();
        assert_eq!(decoder.push(wire), wire.len());
        decoder.next_frame().unwrap().to_vec()
    }

    fn handshake(e1: [u8; 32], e2: [u8; 32]) -> (Transport, Transport, Hello) {
        let (client, server) = (pair(1), pair(2));
        let mut wire = Vec::new();
        let init = Initiator::start(&client, &server.public(), Intent::Link, e1, &mut wire).unwrap();
        let resp = Responder::new(&server, e2).unwrap();
        let mut reply = Vec::new();
        let (hello, server_t) = resp.accept(&body(&wire), &mut reply).unwrap();
        let (caps, client_t) = init.finish(&body(&reply)).unwrap();
        assert_eq!(caps, CAPABILITIES);
        (client_t, server_t, hello)
    }

    /// The first message of an initiator that sends `payload` as its hello.
    fn first_message_with(client: &Keypair, server: &PublicKey, payload: &[u8]) -> (Initiator, Vec<u8>) {
        let secret = client.x25519_secret();
        let state = builder(&secret, client.x25519_public(), [7; 32])
            .unwrap()
            .remote_public_key(&server.to_x25519())
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut wire = Vec::new();
        let init = Initiator::start_with_payload(state, *server, payload, &mut wire).unwrap();
        (init, body(&wire))
    }

    /// A hello as a peer encodes it: the known fields, then whatever `extra` it adds.
    fn hello_bytes(client: &Keypair, caps: Option<u64>, extra: &[u8]) -> Vec<u8> {
        let mut payload = PROTOCOL_VERSION.to_be_bytes().to_vec();
        payload.push(1);
        payload.extend_from_slice(client.public().as_bytes());
        if let Some(caps) = caps {
            payload.extend_from_slice(&caps.to_be_bytes());
        }
        payload.extend_from_slice(extra);
        payload
    }

    #[test]
    fn a_newer_initiator_with_unknown_capabilities_and_fields_is_accepted() {
        let (client, server) = (pair(1), pair(2));
        // Capabilities, a stamp, then a field this build does not know.
        let mut after_caps = [5u64.to_be_bytes(), 9u64.to_be_bytes()].concat();
        after_caps.extend_from_slice(b"a field from the future");
        let newer = hello_bytes(&client, Some(1 << 63 | 1 << 5 | CAPABILITIES.0), &after_caps);
        let (init, first) = first_message_with(&client, &server.public(), &newer);
        let mut reply = Vec::new();
        let (hello, _) = Responder::new(&server, [4; 32]).unwrap().accept(&first, &mut reply).unwrap();
        assert_eq!(hello.intent, Intent::Control);
        assert_eq!(hello.capabilities, Capabilities(1 << 63 | 1 << 5 | CAPABILITIES.0));
        assert_eq!(hello.stamp, Some(Stamp { process: 5, counter: 9 }));
        assert_eq!(hello.capabilities.common(CAPABILITIES), CAPABILITIES, "unknown bits are not used");
        assert_eq!(init.finish(&body(&reply)).unwrap().0, CAPABILITIES);
    }

    #[test]
    fn every_intent_survives_the_hello() {
        for intent in [Intent::Control, Intent::Link] {
            for stamp in [None, Some(Stamp { process: u64::MAX, counter: 1 })] {
                let hello = Hello {
                    version: PROTOCOL_VERSION,
                    intent,
                    key: pair(1).public(),
                    capabilities: CAPABILITIES,
                    stamp,
                };
                assert_eq!(Hello::decode(&hello.encode()), Ok(hello));
            }
        }
    }

    #[test]
    fn a_hello_from_before_capabilities_has_none() {
        let (client, server) = (pair(1), pair(2));
        let (_, first) = first_message_with(&client, &server.public(), &hello_bytes(&client, None, b""));
        let (hello, _) = Responder::new(&server, [4; 32]).unwrap().accept(&first, &mut Vec::new()).unwrap();
        assert_eq!(hello.capabilities, Capabilities::NONE);
    }

    #[test]
    fn a_hello_cut_short_or_of_another_version_is_refused() {
        let (client, server) = (pair(1), pair(2));
        let full = hello_bytes(&client, Some(0), b"");
        let (_, first) = first_message_with(&client, &server.public(), &full[..HELLO_BASE_LEN - 1]);
        let refused = Responder::new(&server, [4; 32]).unwrap().accept(&first, &mut Vec::new());
        assert_eq!(refused.unwrap_err(), NoiseError::BadHello);
        let mut other = full;
        other[..2].copy_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());
        let (_, first) = first_message_with(&client, &server.public(), &other);
        let refused = Responder::new(&server, [4; 32]).unwrap().accept(&first, &mut Vec::new());
        assert_eq!(refused.unwrap_err(), NoiseError::Version(PROTOCOL_VERSION + 1));
    }

    #[test]
    fn a_newer_responder_with_unknown_capabilities_and_fields_is_accepted() {
        let (client, server) = (pair(1), pair(2));
        let mut wire = Vec::new();
        let init = Initiator::start(&client, &server.public(), Intent::Control, [3; 32], &mut wire).unwrap();
        let mut newer = (1u64 << 62).to_be_bytes().to_vec();
        newer.extend_from_slice(b"more from the future");
        let mut reply = Vec::new();
        let resp = Responder::new(&server, [4; 32]).unwrap();
        let (hello, mut server_t) = resp.accept_with_payload(&body(&wire), &mut reply, &newer, None).unwrap();
        assert_eq!(hello.capabilities, CAPABILITIES);
        let (caps, mut client_t) = init.finish(&body(&reply)).unwrap();
        assert_eq!(caps, Capabilities(1 << 62));
        // And from a responder before capabilities: an empty reply, no capabilities.
        let mut wire = Vec::new();
        let init = Initiator::start(&client, &server.public(), Intent::Control, [3; 32], &mut wire).unwrap();
        let mut reply = Vec::new();
        let resp = Responder::new(&server, [4; 32]).unwrap();
        resp.accept_with_payload(&body(&wire), &mut reply, &[], None).unwrap();
        assert_eq!(init.finish(&body(&reply)).unwrap().0, Capabilities::NONE);
        // The first session still carries data.
        let mut sealed = Vec::new();
        server_t.seal(b"ok", &mut sealed).unwrap();
        let mut plain = Vec::new();
        client_t.open(&body(&sealed), &mut plain).unwrap();
        assert_eq!(plain, b"ok");
    }

    proptest! {
        #[test]
        fn pairs_agree(e1 in any::<[u8; 32]>(), e2 in any::<[u8; 32]>(),
                       msgs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 1..8)) {
            let (mut c, mut s, hello) = handshake(e1, e2);
            prop_assert_eq!(hello.key, pair(1).public());
            prop_assert_eq!(hello.intent, Intent::Link);
            prop_assert_eq!(c.remote(), pair(2).public());
            prop_assert_eq!(s.remote(), pair(1).public());
            for m in &msgs {
                let mut wire = Vec::new();
                c.seal(m, &mut wire).unwrap();
                let mut plain = Vec::new();
                s.open(&body(&wire), &mut plain).unwrap();
                prop_assert_eq!(&plain, m);
                let mut wire = Vec::new();
                s.seal(m, &mut wire).unwrap();
                let mut plain = Vec::new();
                c.open(&body(&wire), &mut plain).unwrap();
                prop_assert_eq!(&plain, m);
            }
        }

        #[test]
        fn flipped_handshake_byte_fails_cleanly(index in any::<prop::sample::Index>(), bit in 0u8..8) {
            let (client, server) = (pair(1), pair(2));
            let mut wire = Vec::new();
            Initiator::start(&client, &server.public(), Intent::Control, [3; 32], &mut wire).unwrap();
            let mut first = body(&wire);
            let i = index.index(first.len());
            first[i] ^= 1 << bit;
            let resp = Responder::new(&server, [4; 32]).unwrap();
            prop_assert!(resp.accept(&first, &mut Vec::new()).is_err());
        }

        #[test]
        fn flipped_reply_byte_fails_cleanly(index in any::<prop::sample::Index>(), bit in 0u8..8) {
            let (client, server) = (pair(1), pair(2));
            let mut wire = Vec::new();
            let init = Initiator::start(&client, &server.public(), Intent::Control, [3; 32], &mut wire).unwrap();
            let mut reply = Vec::new();
            Responder::new(&server, [4; 32]).unwrap().accept(&body(&wire), &mut reply).unwrap();
            let mut reply = body(&reply);
            let i = index.index(reply.len());
            reply[i] ^= 1 << bit;
            prop_assert_eq!(init.finish(&reply).unwrap_err(), NoiseError::Decrypt);
        }

        #[test]
        fn flipped_transport_byte_fails_cleanly(msg in prop::collection::vec(any::<u8>(), 0..100),
                                                index in any::<prop::sample::Index>(), bit in 0u8..8) {
            let (mut c, mut s, _) = handshake([5; 32], [6; 32]);
            let mut wire = Vec::new();
            c.seal(&msg, &mut wire).unwrap();
            let mut sealed = body(&wire);
            let i = index.index(sealed.len());
            sealed[i] ^= 1 << bit;
            let mut out = Vec::new();
            prop_assert_eq!(s.open(&sealed, &mut out).unwrap_err(), NoiseError::Decrypt);
            prop_assert!(out.is_empty());
        }

        #[test]
        fn arbitrary_first_message_is_refused(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let resp = Responder::new(&pair(2), [4; 32]).unwrap();
            prop_assert!(resp.accept(&bytes, &mut Vec::new()).is_err());
        }
    }

    #[test]
    fn both_ends_rekey_at_the_same_message_as_the_noise_spec_says() {
        let k = [9u8; 32];
        let (mut sealer, mut opener) = (Sealer::new(&k).unwrap(), Opener::new(&k).unwrap());
        sealer.counter = REKEY_EVERY - 2;
        opener.counter = REKEY_EVERY - 2;
        let mut old = Sealer::new(&k).unwrap();
        old.counter = REKEY_EVERY;
        for n in 0..4u8 {
            let mut wire = Vec::new();
            sealer.seal(&[n; 40], &mut wire).unwrap();
            let mut plain = Vec::new();
            opener.open(&wire[frame::HEADER_LEN..], &mut plain).unwrap();
            assert_eq!(plain, vec![n; 40]);
            if n == 2 {
                // Message REKEY_EVERY went under the new key: the old one cannot have sealed it.
                let mut stale = Vec::new();
                old.seal(&[n; 40], &mut stale).unwrap();
                assert_ne!(stale, wire);
            }
        }
        // The new key is REKEY(k) = ENCRYPT(k, 2^64-1, "", zeros)[..32], computed here apart.
        let mut expected = [0u8; 32];
        let _tag = aead_key(&k)
            .unwrap()
            .seal_in_place_separate_tag(nonce(u64::MAX), ring::aead::Aad::empty(), &mut expected)
            .unwrap();
        let (mut a, mut b) = (Sealer::new(&expected).unwrap(), Sealer::new(&k).unwrap());
        a.counter = REKEY_EVERY + 5;
        b.counter = REKEY_EVERY - 1;
        let mut skip = Vec::new();
        b.seal(b"x", &mut skip).unwrap();
        b.counter = REKEY_EVERY + 5;
        let (mut wa, mut wb) = (Vec::new(), Vec::new());
        a.seal(b"same", &mut wa).unwrap();
        b.seal(b"same", &mut wb).unwrap();
        assert_eq!(wa, wb, "the rekeyed key is the spec's");
    }

    #[test]
    fn transport_matches_snows_own() {
        // A handshake in plain snow; one side then uses snow's transport, the
        // other ours: each must read what the other sealed.
        let (client, server) = (pair(1), pair(2));
        let (cs, ss) = (client.x25519_secret(), server.x25519_secret());
        let server_x = server.public().to_x25519();
        let mut init = builder(&cs, client.x25519_public(), [1; 32])
            .unwrap()
            .remote_public_key(&server_x)
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut resp = builder(&ss, server.x25519_public(), [2; 32]).unwrap().build_responder().unwrap();
        let (mut m1, mut m2, mut scratch) = ([0u8; 256], [0u8; 256], [0u8; 256]);
        let n = init.write_message(b"", &mut m1).unwrap();
        resp.read_message(&m1[..n], &mut scratch).unwrap();
        let n = resp.write_message(b"", &mut m2).unwrap();
        init.read_message(&m2[..n], &mut scratch).unwrap();
        let mut ours = Transport::from_handshake(init, server.public()).unwrap();
        let mut theirs = resp.into_transport_mode().unwrap();
        for round in 0..3u8 {
            let msg = vec![round; 100 + usize::from(round)];
            let mut wire = Vec::new();
            ours.seal(&msg, &mut wire).unwrap();
            let mut plain = [0u8; 512];
            let n = theirs.read_message(&wire[2..], &mut plain).unwrap();
            assert_eq!(&plain[..n], &msg[..]);
            let mut sealed = [0u8; 512];
            let n = theirs.write_message(&msg, &mut sealed).unwrap();
            let mut out = Vec::new();
            ours.open(&sealed[..n], &mut out).unwrap();
            assert_eq!(out, msg);
        }
    }

    #[test]
    fn wrong_responder_key_is_refused() {
        let mut wire = Vec::new();
        Initiator::start(&pair(1), &pair(3).public(), Intent::Control, [3; 32], &mut wire).unwrap();
        let resp = Responder::new(&pair(2), [4; 32]).unwrap();
        assert_eq!(resp.accept(&body(&wire), &mut Vec::new()).unwrap_err(), NoiseError::Decrypt);
    }

    #[test]
    fn largest_plaintext_fills_a_frame() {
        let (mut c, mut s, _) = handshake([5; 32], [6; 32]);
        let mut wire = Vec::new();
        c.seal(&vec![9; MAX_PLAINTEXT], &mut wire).unwrap();
        assert_eq!(wire.len(), frame::MAX_WIRE_FRAME);
        assert_eq!(
            c.seal(&vec![9; MAX_PLAINTEXT + 1], &mut wire),
            Err(NoiseError::TooLarge(MAX_PLAINTEXT + 1))
        );
        let mut out = Vec::new();
        s.open(&body(&wire), &mut out).unwrap();
        assert_eq!(out.len(), MAX_PLAINTEXT);
    }
}
