//! Both `IK` handshakes (the initiator's and the responder's) and the snow
//! glue under them. Snow gets X25519 from x25519-dalek, AES-GCM and SHA-256
//! from ring, and as its only random source the 32 bytes the caller gave.
//!
//! Invariant: a handshake's result is a [`Transport`] only once both
//! messages were verified and the hello's ed25519 key matches the Noise
//! static key the handshake proved.

use super::transport::Transport;
use super::{MAX_HANDSHAKE, NOISE_SUITE, NoiseError};
use crate::hello::{CAPABILITIES, Capabilities, Hello, Intent, PROLOGUE, PROTOCOL_VERSION, Stamp};
use crate::keys::{Keypair, PublicKey};
use crate::record;

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

pub(super) fn builder<'a>(
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
    pub(super) fn start_with_payload(
        mut state: snow::HandshakeState,
        remote: PublicKey,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Initiator, NoiseError> {
        let mut msg = [0u8; MAX_HANDSHAKE];
        let len = state.write_message(payload, &mut msg).map_err(state_err)?;
        record::encode(msg.get(..len).unwrap_or_default(), out).map_err(|e| NoiseError::TooLarge(e.0))?;
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
    pub(super) fn accept_with_payload(
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
        record::encode(msg.get(..len).unwrap_or_default(), out).map_err(|e| NoiseError::TooLarge(e.0))?;
        Ok((hello, Transport::from_handshake(self.state, hello.key)?))
    }
}
