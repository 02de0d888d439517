//! The Noise handshakes of a link on a TCP stream, both sides of it
//! ([`initiate`] for the proxy, whatever the path; [`respond`] for the
//! service, which admits only the keys its allow list names), with their
//! deadline, and the errors of opening a link.
//!
//! Every outcome of a handshake is counted here, once, in the `handshakes`
//! metric family.
//!
//! The handshake reads in small pieces and stops as soon as the session is
//! established; whatever arrived after it stays sealed in the session
//! (`Session::into_transport`) for the link driver, so no frame is lost
//! between the two owners of the stream.

use std::time::Duration;

use seaport_proto::hello::Intent;
use seaport_proto::keys::{Keypair, PublicKey};
use seaport_proto::session::{Session, SessionError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::allow::AllowList;
use crate::clock;
use crate::dial::{DialError, Unreachable};
use crate::identity::entropy;
use crate::metrics::{Refusal, metrics};

/// Why a link could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// Socket-level failure.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The handshake failed (wrong key, version, intent, corruption).
    #[error("handshake failed: {0}")]
    Session(#[from] SessionError),
    /// The handshake did not finish in time.
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    /// The peer's key is not allowed here (`--allow`).
    #[error("{0} is not allowed to connect (--allow)")]
    NotAllowed(PublicKey),
    /// The peer closed before the handshake finished.
    #[error("peer closed the connection during the handshake")]
    ClosedEarly,
    /// The proxy's first record after the handshake did not authenticate:
    /// a replayed first handshake message, or a peer that does not speak
    /// the protocol.
    #[error("the peer's first record did not authenticate (a replayed handshake?)")]
    Unauthenticated,
    /// The service closed a link handshake this proxy began, without a
    /// word: what a service with `--allow` does to keys not on its list.
    #[error(
        "the service closed the connection during the handshake: if it runs with --allow, this proxy's key {0} must be on its list (else it was busy, its handshake slots were full, or it was shutting down)"
    )]
    ClosedByService(PublicKey),
    /// The TCP connect failed.
    #[error("{0}")]
    Dial(#[from] DialError),
    /// No address of the instance could be reached, each for its own cause.
    #[error("no address reachable: {0}")]
    Unreachable(Unreachable<HandshakeError>),
    /// The proxy holds as many links or streams as this service allows it.
    #[error(transparent)]
    OverBudget(#[from] crate::budget::OverBudget),
    /// No meeting through the registry (refused, not connected, timed out).
    #[error("no meeting: {0}")]
    NoMeeting(String),
    /// The meeting's connection failed.
    #[error(transparent)]
    Meet(#[from] crate::meet::MeetError),
    /// A meeting came together but neither punching nor relaying worked.
    #[error("punching: {punch}; relaying: {relay}")]
    Meeting {
        /// Why punching failed.
        punch: Box<HandshakeError>,
        /// Why relaying failed.
        relay: Box<HandshakeError>,
    },
    /// A new transport could not continue the link.
    #[error("the link could not be resumed: {0}")]
    NotResumed(String),
    /// No path at all: neither directly nor through the registry.
    #[error("{direct}; through the registry: {meeting}")]
    NoPath {
        /// Why the direct addresses failed.
        direct: Box<HandshakeError>,
        /// Why the meeting failed.
        meeting: Box<HandshakeError>,
    },
}

/// Runs `session`'s handshake on `stream` within `timeout`, writing what the
/// session has to say (the first message, or the responder's reply). A
/// responder answers only a peer that `admit` accepts, once the peer's first
/// message has told who it is.
pub async fn handshake(
    stream: &mut TcpStream,
    session: &mut Session,
    timeout: Duration,
    admit: &(dyn Fn(&PublicKey) -> bool + Sync),
) -> Result<(), HandshakeError> {
    let work = async {
        let mut buf = [0u8; 1024];
        let mut out = Vec::new();
        loop {
            if session.poll_transmit(&mut out) {
                stream.write_all(&out).await?;
                out.clear();
            }
            if session.is_established() {
                return Ok(());
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(HandshakeError::ClosedEarly);
            }
            session.handle_input(clock::now(), buf.get(..n).unwrap_or_default())?;
            if let Some(key) = session.remote().filter(|key| !admit(key)) {
                return Err(HandshakeError::NotAllowed(key));
            }
        }
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| HandshakeError::Timeout(timeout))?
}

/// Runs a link handshake as initiator, with `remote`, on `stream` (dialed
/// directly, punched or relayed: each path is authenticated alike).
pub async fn initiate(
    mut stream: TcpStream,
    local: &Keypair,
    remote: PublicKey,
    timeout: Duration,
) -> Result<(TcpStream, Session), HandshakeError> {
    let _ = stream.set_nodelay(true);
    let mut session = Session::initiate(clock::now(), local, &remote, Intent::Link, entropy(), timeout)?;
    // The service's key was checked by the handshake itself.
    let done = handshake(&mut stream, &mut session, timeout, &|_| true).await;
    metrics().handshake(done.is_ok());
    done.map_err(|e| match e {
        HandshakeError::ClosedEarly => HandshakeError::ClosedByService(local.public()),
        other => other,
    })?;
    Ok((stream, session))
}

/// Runs a link handshake as responder (the service) on `stream`: the proxy
/// must ask for a link, with a key `allow` admits. Returns the session, ready
/// for the link driver, and the proxy's key.
pub async fn respond(
    stream: &mut TcpStream,
    local: &Keypair,
    timeout: Duration,
    allow: &AllowList,
) -> Result<(Session, PublicKey), HandshakeError> {
    let _ = stream.set_nodelay(true);
    let mut session = Session::respond(clock::now(), local, Intent::Link, entropy(), timeout)?;
    let done = handshake(stream, &mut session, timeout, &|key| allow.admits(key)).await;
    match &done {
        // A proxy that took another path closes the candidates it did not
        // take before a word: no handshake was tried.
        Err(HandshakeError::ClosedEarly) => {}
        Err(HandshakeError::NotAllowed(_)) => {
            metrics().handshake(false);
            metrics().refuse(Refusal::NotAllowed);
        }
        other => metrics().handshake(other.is_ok()),
    }
    done?;
    let key = session.remote().ok_or(HandshakeError::ClosedEarly)?;
    Ok((session, key))
}
