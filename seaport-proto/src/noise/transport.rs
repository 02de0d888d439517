//! The record layer after a handshake: AES-256-GCM through ring, as Noise
//! specifies it, sealing and opening records in place, rekeying every
//! [`REKEY_EVERY`] messages.
//!
//! Invariant: each direction's nonce counter only grows, and both ends
//! rekey at the same message.

use super::{MAX_PLAINTEXT, NoiseError, TAG_LEN};
use crate::keys::PublicKey;
use crate::record;

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
    /// Noise's handshake hash `h`: unique to this session and known only to
    /// its two ends (what a resumable link's token is derived from).
    handshake_hash: [u8; 32],
}

impl Transport {
    /// Builds both directions from the finished handshake's split keys.
    pub(super) fn from_handshake(
        mut state: snow::HandshakeState,
        remote: PublicKey,
    ) -> Result<Transport, NoiseError> {
        if !state.is_handshake_finished() {
            return Err(NoiseError::State("handshake not finished".into()));
        }
        let mut handshake_hash = [0u8; 32];
        let h = state.get_handshake_hash();
        handshake_hash.copy_from_slice(h.get(..32).unwrap_or(&[0; 32]));
        let (initiator_to_responder, responder_to_initiator) = state.dangerously_get_raw_split();
        let (send, receive) = if state.is_initiator() {
            (initiator_to_responder, responder_to_initiator)
        } else {
            (responder_to_initiator, initiator_to_responder)
        };
        Ok(Transport { sealer: Sealer::new(&send)?, opener: Opener::new(&receive)?, remote, handshake_hash })
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
        // The same at both ends, as a handshake's would be.
        let mut h = k1;
        h.iter_mut().zip(k2).for_each(|(a, b)| *a ^= b);
        let transport =
            |send: &[u8; 32], receive: &[u8; 32], remote: PublicKey| -> Result<Transport, NoiseError> {
                let handshake_hash = h;
                Ok(Transport {
                    sealer: Sealer::new(send)?,
                    opener: Opener::new(receive)?,
                    remote,
                    handshake_hash,
                })
            };
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

    /// The session's handshake hash (Noise's `h`): the same at both ends,
    /// different for every session, secret to anyone else.
    pub fn handshake_hash(&self) -> &[u8; 32] {
        &self.handshake_hash
    }

    /// The two directions, to be driven independently (a link driver reads and writes at once).
    pub fn split(self) -> (Sealer, Opener) {
        (self.sealer, self.opener)
    }
}

pub(super) fn aead_key(key: &[u8; 32]) -> Result<ring::aead::LessSafeKey, NoiseError> {
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
    if (*counter).is_multiple_of(REKEY_EVERY) {
        *key = rekey(key)?;
    }
    Ok(())
}

/// Noise's AESGCM nonce: 32 zero bits, then the counter big-endian.
pub(super) fn nonce(counter: u64) -> ring::aead::Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&counter.to_be_bytes());
    ring::aead::Nonce::assume_unique_for_key(bytes)
}

/// The sending half of a [`Transport`].
pub struct Sealer {
    key: ring::aead::LessSafeKey,
    pub(super) counter: u64,
}

impl Sealer {
    pub(super) fn new(key: &[u8; 32]) -> Result<Sealer, NoiseError> {
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
        let total = record::HEADER_LEN + body;
        let frame = frame.get_mut(..total).ok_or(NoiseError::TooLarge(total))?;
        let (header, rest) = frame.split_at_mut(record::HEADER_LEN);
        let (plain, tag) = rest.split_at_mut(len);
        // body <= MAX_RECORD, checked above.
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
        out.resize(start + record::HEADER_LEN, 0);
        out.extend_from_slice(plaintext);
        out.resize(start + record::HEADER_LEN + plaintext.len() + TAG_LEN, 0);
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
    pub(super) counter: u64,
}

impl Opener {
    pub(super) fn new(key: &[u8; 32]) -> Result<Opener, NoiseError> {
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

    /// Whether `body` is the next record the peer sealed, checked on a copy
    /// without moving the counter: so a responder can see that its peer
    /// holds the session's keys (which a replayer of the first handshake
    /// message does not) before it gives the session anything.
    pub fn authenticates(&self, body: &[u8]) -> bool {
        self.peek(body).is_some()
    }

    /// The plaintext of the next frame body, opened from a copy without
    /// moving the counter; `None` if it does not authenticate.
    pub fn peek(&self, body: &[u8]) -> Option<Vec<u8>> {
        let mut copy = body.to_vec();
        if body.len() < TAG_LEN {
            return None;
        }
        let len =
            self.key.open_in_place(nonce(self.counter), ring::aead::Aad::empty(), &mut copy).ok()?.len();
        copy.truncate(len);
        Some(copy)
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
