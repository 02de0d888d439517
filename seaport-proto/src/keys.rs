//! Identities: seeds, key pairs and public keys.
//!
//! A [`Seed`] is 32 secret bytes, written as 64 lowercase hex characters. It
//! determines an ed25519 [`Keypair`]; the 32-byte ed25519 verifying key is the
//! [`PublicKey`] users copy around. The Noise static key of the same identity is
//! the X25519 form of that key pair, so whoever knows a `PublicKey` can open a
//! Noise session to its holder without any other exchange.
//!
//! Invariants: a `PublicKey` parsed from text or built with `from_bytes` is a
//! valid (decompressible) ed25519 point. One decoded from a control message
//! is not checked there, since decompression costs about 20 µs and a lookup
//! answer carries many keys: a key that is not a point can never complete a
//! Noise handshake ([`PublicKey::to_x25519`] maps it to a low-order point the
//! handshake refuses). Secret material is never printed by `Debug`.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{SigningKey, VerifyingKey};

/// Why a seed or public key could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The text was not 64 characters long.
    #[error("expected 64 hex characters, got {0}")]
    Length(usize),
    /// A character outside `0-9a-fA-F`.
    #[error("invalid hex character {0:?} at position {1}")]
    NotHex(char, usize),
    /// 32 bytes that are not an ed25519 public key.
    #[error("not a valid ed25519 public key")]
    NotAPoint,
}

/// Decodes exactly 32 bytes from 64 hex characters.
fn hex32(text: &str) -> Result<[u8; 32], KeyError> {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() != 64 {
        return Err(KeyError::Length(chars.len()));
    }
    let mut out = [0u8; 32];
    for (i, (byte, pair)) in out.iter_mut().zip(chars.chunks_exact(2)).enumerate() {
        let mut value = 0u8;
        for (j, c) in pair.iter().enumerate() {
            let digit = c.to_digit(16).ok_or(KeyError::NotHex(*c, 2 * i + j))?;
            // to_digit(16) is < 16, so this fits in a u8.
            value = (value << 4) | digit as u8;
        }
        *byte = value;
    }
    Ok(out)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// 32 secret bytes from which an identity is derived. Wiped from memory
/// when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Seed([u8; 32]);

impl Drop for Seed {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl Seed {
    /// Wraps bytes the caller got from a random source (or a file).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Seed(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The seed as 64 lowercase hex characters (secret: print only on request).
    pub fn to_hex(&self) -> String {
        struct Hex<'a>(&'a [u8]);
        impl fmt::Display for Hex<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, self.0)
            }
        }
        Hex(&self.0).to_string()
    }
}

impl fmt::Debug for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Seed(..)")
    }
}

impl FromStr for Seed {
    type Err = KeyError;
    /// Accepts 64 hex characters, either case, surrounding white space ignored
    /// (seed files usually end in a newline).
    fn from_str(s: &str) -> Result<Self, KeyError> {
        hex32(s.trim()).map(Seed)
    }
}

/// An ed25519 public key: the name of a registry, service or proxy.
///
/// Compared, hashed and ordered in one canonical form: without the sign bit
/// of its x coordinate (the top bit of the last byte). A key and its twin
/// with that bit flipped (the negated point) have the same X25519 form, so
/// the holder of one secret passes the Noise handshake as either; counting
/// them as one identity keeps one secret from registering as two, or from
/// slipping past an allow list, an ACL or a pin under its twin. Displayed
/// as given.
#[derive(Clone, Copy)]
pub struct PublicKey([u8; 32]);

/// The sign bit of an ed25519 key's x coordinate.
const SIGN_BIT: u8 = 0x80;

impl PublicKey {
    /// The canonical form: the bytes with the sign bit cleared.
    fn canonical(&self) -> [u8; 32] {
        let mut bytes = self.0;
        if let Some(last) = bytes.last_mut() {
            *last &= !SIGN_BIT;
        }
        bytes
    }

    /// Checks that the bytes are an ed25519 point.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, KeyError> {
        VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::NotAPoint)?;
        Ok(PublicKey(bytes))
    }

    /// Wraps bytes without checking they are a point (see the module docs).
    pub(crate) fn from_bytes_unchecked(bytes: [u8; 32]) -> Self {
        PublicKey(bytes)
    }

    /// The 32 bytes of the ed25519 verifying key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The X25519 (Montgomery) form: the Noise static public key of this
    /// identity. Bytes that are not a point give the all-zero (low-order) key,
    /// which no handshake accepts.
    pub fn to_x25519(&self) -> [u8; 32] {
        match VerifyingKey::from_bytes(&self.0) {
            Ok(key) => key.to_montgomery().to_bytes(),
            Err(_) => [0; 32],
        }
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.canonical() == other.canonical()
    }
}

impl Eq for PublicKey {}

impl std::hash::Hash for PublicKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.canonical().hash(state);
    }
}

impl PartialOrd for PublicKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for PublicKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.canonical().cmp(&other.canonical())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        PublicKey::from_bytes(hex32(s)?)
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    /// Not checked for being a point: see the module docs.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <[u8; 32]>::deserialize(d).map(PublicKey::from_bytes_unchecked)
    }
}

/// An identity's secret and public halves, in ed25519 and X25519 form. The
/// secrets are wiped from memory when dropped (the signing key by
/// ed25519-dalek, the X25519 scalar here).
#[derive(Clone)]
pub struct Keypair {
    signing: SigningKey,
    public: PublicKey,
    /// The X25519 secret and public key, derived once: every handshake needs them.
    x25519: ([u8; 32], [u8; 32]),
}

impl Drop for Keypair {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.x25519.0);
    }
}

impl Keypair {
    /// Derives the key pair of a seed.
    pub fn from_seed(seed: &Seed) -> Self {
        let signing = SigningKey::from_bytes(seed.as_bytes());
        let public = PublicKey(signing.verifying_key().to_bytes());
        let x25519 = (signing.to_scalar_bytes(), signing.verifying_key().to_montgomery().to_bytes());
        Keypair { signing, public, x25519 }
    }

    /// The public name of this identity.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The ed25519 signing key (for BEP44 records).
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The X25519 private scalar: this identity's Noise static secret.
    pub(crate) fn x25519_secret(&self) -> [u8; 32] {
        self.x25519.0
    }

    /// The X25519 public key: this identity's Noise static public key.
    pub(crate) fn x25519_public(&self) -> [u8; 32] {
        self.x25519.1
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({})", self.public)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_wiped_on_drop() {
        // Plain byte arrays need no drop: these types do only because they
        // zeroize what they hold.
        assert!(std::mem::needs_drop::<Seed>());
        assert!(std::mem::needs_drop::<Keypair>());
    }

    #[test]
    fn a_key_and_its_sign_flipped_twin_are_one_identity() {
        let key = Keypair::from_seed(&Seed::from_bytes([7; 32])).public();
        let mut twin_bytes = *key.as_bytes();
        twin_bytes[31] ^= SIGN_BIT;
        let twin = PublicKey::from_bytes(twin_bytes).expect("the negated point is a point");
        // Why it matters: the handshake sees only the X25519 form, which is the same.
        assert_eq!(key.to_x25519(), twin.to_x25519());
        assert_eq!(key, twin);
        let set = std::collections::HashSet::from([key]);
        assert!(set.contains(&twin), "hashes alike");
        assert_eq!(key.cmp(&twin), std::cmp::Ordering::Equal);
        assert_ne!(key.to_string(), twin.to_string(), "each is shown as given");
        let other = Keypair::from_seed(&Seed::from_bytes([8; 32])).public();
        assert_ne!(key, other);
    }

    #[test]
    fn seed_round_trips_through_hex() {
        let seed = Seed::from_bytes([0xab; 32]);
        let text = seed.to_hex();
        assert_eq!(text.len(), 64);
        assert_eq!(text, "ab".repeat(32));
        assert_eq!(text.parse::<Seed>(), Ok(seed));
        assert_eq!(format!("{:?}", Seed::from_bytes([1; 32])), "Seed(..)");
    }

    #[test]
    fn bad_hex_says_what_is_wrong() {
        assert_eq!("abc".parse::<Seed>(), Err(KeyError::Length(3)));
        let mut text = "0".repeat(64);
        text.replace_range(5..6, "g");
        assert_eq!(text.parse::<Seed>(), Err(KeyError::NotHex('g', 5)));
        let err = "é".repeat(64).parse::<PublicKey>().unwrap_err();
        assert_eq!(err, KeyError::NotHex('é', 0));
    }

    #[test]
    fn noise_key_is_the_montgomery_form_of_the_public_key() {
        let pair = Keypair::from_seed(&Seed::from_bytes([7; 32]));
        let secret = x25519_dalek::StaticSecret::from(pair.x25519_secret());
        let derived = x25519_dalek::PublicKey::from(&secret);
        assert_eq!(derived.to_bytes(), pair.public().to_x25519());
        assert_eq!(derived.to_bytes(), pair.x25519_public());
        let shown = pair.public().to_string();
        assert_eq!(shown.parse::<PublicKey>(), Ok(pair.public()));
    }

    #[test]
    fn a_key_that_is_not_a_point_maps_to_no_usable_noise_key() {
        // y = 2 is not the y-coordinate of any point on the curve.
        let mut bytes = [0u8; 32];
        bytes[0] = 2;
        assert_eq!(PublicKey::from_bytes(bytes), Err(KeyError::NotAPoint));
        let decoded: PublicKey = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded.to_x25519(), [0; 32]);
    }
}
