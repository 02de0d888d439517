//! Noise `IK` handshakes and the transport that follows them.
//!
//! The initiator always knows the responder's public key (the registry's from
//! the user, a service's from the registry), so `IK` lets it encrypt its first
//! message: a peer that does not know the key cannot produce a message the
//! responder accepts. The first payload is a [`Hello`](crate::hello::Hello) naming the initiator's
//! ed25519 key, its [`Intent`] and the protocol version; the responder checks
//! that the ed25519 key maps to the Noise static key the handshake proved.
//!
//! Pure: the ephemeral key comes from entropy the caller passes in; snow's
//! own random source is never consulted. Invariant: a [`Transport`] exists only
//! after both handshake messages were verified.
//!
//! `handshake.rs` holds both handshakes and the snow glue (X25519 from
//! x25519-dalek, AES-GCM and SHA-256 from ring); `transport.rs` the record
//! layer that follows (AES-256-GCM through ring, in place, with rekeying);
//! the hello the handshake carries is [`crate::hello`].

mod handshake;
#[cfg(test)]
mod tests;
mod transport;

pub use handshake::{Initiator, Responder};
pub use transport::{Opener, REKEY_EVERY, Sealer, Transport};

use crate::hello::{Intent, MalformedHello, PROTOCOL_VERSION};
use crate::record::MAX_RECORD;

/// The one cipher suite of protocol version [`PROTOCOL_VERSION`]. AES-GCM
/// through ring seals about 8x faster than snow's default ChaChaPoly here;
/// changing the suite is a protocol version change.
pub const NOISE_SUITE: &str = "Noise_IK_25519_AESGCM_SHA256";
/// Largest handshake message (either direction) and so, less its keys and
/// tags, the room a handshake payload has to grow in.
pub const MAX_HANDSHAKE: usize = 1024;
/// Authentication tag added to each sealed message.
pub const TAG_LEN: usize = 16;
/// Most plaintext one transport frame carries.
pub const MAX_PLAINTEXT: usize = MAX_RECORD - TAG_LEN;

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

impl From<MalformedHello> for NoiseError {
    fn from(_: MalformedHello) -> NoiseError {
        NoiseError::BadHello
    }
}
