//! Carrying a running link over to a new transport (the sans-io side is
//! `seaport_proto::link`'s `resume`): what a transport is to the driver
//! ([`Carrier`]), how a new one reaches a running link ([`Handover`]), the
//! service's table of links that may be resumed ([`Resumables`]), and the
//! exchange that starts each new transport (the proxy's `RESUME`, the
//! service's `RESUMED`).
//!
//! Invariants:
//! - The first frame either end sends on a new transport is its `RESUME` or
//!   `RESUMED`; nothing of the link (not even a resent frame) goes before
//!   it, and the link is attached only once the peer's count is known.
//! - A `RESUME` is honoured only for a token in the table whose link runs
//!   with the same proxy key the new session authenticated; the table holds
//!   a link exactly while its driver runs (a guard removes it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use seaport_proto::keys::PublicKey;
use seaport_proto::link::{Frame, RESUME_TOKEN_LEN, Reason};
use seaport_proto::noise::{Opener, Sealer};
use seaport_proto::record::{self, RecordDecoder};
use seaport_proto::session::Session;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::state::{Shared, changed};
use crate::clock;
use crate::handshake::HandshakeError;
use crate::lock::lock;
use crate::reach::{Path, Reached, Search};

/// How long the proxy waits for the service's `RESUMED`.
pub const RESUME_ANSWER_WAIT: Duration = Duration::from_secs(5);
/// The pause before a proxy looks for a path again after a search failed.
pub const SEARCH_AGAIN_AFTER: Duration = Duration::from_millis(500);

/// One transport of a link: its socket, both directions of its Noise
/// session, and whatever arrived after the handshake.
pub(super) struct Carrier {
    pub(super) stream: TcpStream,
    pub(super) sealer: Sealer,
    pub(super) opener: Opener,
    pub(super) decoder: RecordDecoder,
}

impl Carrier {
    /// The transport of an established session on `stream`, with the bytes
    /// that came after its handshake.
    pub(super) fn new(stream: TcpStream, sealer: Sealer, opener: Opener, leftover: &[u8]) -> Carrier {
        let mut decoder = RecordDecoder::new();
        let mut rest = leftover;
        while !rest.is_empty() {
            let taken = decoder.push(rest);
            if taken == 0 {
                break;
            }
            rest = rest.get(taken..).unwrap_or_default();
        }
        Carrier { stream, sealer, opener, decoder }
    }

    /// Seals and writes one frame.
    pub(super) async fn send(&mut self, frame: Frame<'_>) -> std::io::Result<()> {
        let mut plain = Vec::new();
        frame.encode(&mut plain);
        let mut sealed = Vec::new();
        self.sealer.seal(&plain, &mut sealed).map_err(std::io::Error::other)?;
        self.stream.write_all(&sealed).await
    }

    /// Reads and opens the next frame's plaintext.
    pub(super) async fn receive(&mut self) -> Result<Vec<u8>, HandshakeError> {
        loop {
            if let Some(body) = self.decoder.next_record() {
                let plain = self.opener.open_in_place(body).map_err(|_| HandshakeError::Unauthenticated)?;
                return Ok(plain.to_vec());
            }
            let n = self.stream.read(self.decoder.spare_mut()).await?;
            if n == 0 {
                return Err(HandshakeError::ClosedEarly);
            }
            self.decoder.commit(n);
        }
    }
}

/// A new transport for a running link, sent to its driver.
pub(super) enum Handover {
    /// Proxy: a path whose handshake completed; `RESUME` goes first on it.
    Proxy {
        /// The transport.
        carrier: Carrier,
        /// How it reaches the service.
        path: Path,
        /// Over which address.
        addr: SocketAddr,
    },
    /// Service: a `RESUME` came on this transport (and was consumed).
    Service {
        /// The transport.
        carrier: Carrier,
        /// Numbered frames the proxy said it received.
        peer_received: u64,
    },
}

impl Handover {
    /// A proxy's handover from a path that `reach` found.
    pub(super) fn from_reached(reached: Reached) -> Result<Handover, HandshakeError> {
        let (transport, leftover) = reached.session.into_transport().ok_or(HandshakeError::ClosedEarly)?;
        let (sealer, opener) = transport.split();
        let carrier = Carrier::new(reached.stream, sealer, opener, &leftover);
        Ok(Handover::Proxy { carrier, path: reached.path, addr: reached.addr })
    }
}

/// What a proxy's driver calls to find a new path when its link lost one:
/// the pool's search, for this link's instance.
pub type Repath = Arc<dyn Fn() -> Search + Send + Sync>;

/// A service's resumable links by token, for a `RESUME` to find its link.
#[derive(Default)]
pub struct Resumables(Mutex<HashMap<[u8; RESUME_TOKEN_LEN], Entry>>);

struct Entry {
    proxy: PublicKey,
    handovers: mpsc::Sender<Handover>,
}

/// Keeps a link in the table while its driver runs.
pub(super) struct Listed {
    table: Arc<Resumables>,
    token: [u8; RESUME_TOKEN_LEN],
}

impl Drop for Listed {
    fn drop(&mut self) {
        lock(&self.table.0).remove(&self.token);
    }
}

impl Resumables {
    /// Lists a running link; it is unlisted when the guard drops.
    pub(super) fn list(
        table: &Arc<Resumables>,
        token: [u8; RESUME_TOKEN_LEN],
        proxy: PublicKey,
        handovers: mpsc::Sender<Handover>,
    ) -> Listed {
        lock(&table.0).insert(token, Entry { proxy, handovers });
        Listed { table: table.clone(), token }
    }

    /// Where a `RESUME` for `token` from `proxy` goes, if such a link runs.
    pub(super) fn find(
        &self,
        token: &[u8; RESUME_TOKEN_LEN],
        proxy: &PublicKey,
    ) -> Option<mpsc::Sender<Handover>> {
        lock(&self.0).get(token).filter(|e| e.proxy == *proxy).map(|e| e.handovers.clone())
    }

    /// The tokens listed now.
    #[cfg(test)]
    pub(super) fn tokens(&self) -> Vec<[u8; RESUME_TOKEN_LEN]> {
        lock(&self.0).keys().copied().collect()
    }

    /// Links listed now.
    pub fn len(&self) -> usize {
        lock(&self.0).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The first frame on a service's new link connection, if it is a
/// `RESUME`: the proxy's count and the token. Does not consume it.
pub(super) fn peek_resume(opener: &Opener, record_body: &[u8]) -> Option<(u64, [u8; RESUME_TOKEN_LEN])> {
    let plain = opener.peek(record_body)?;
    match Frame::decode(&plain) {
        Ok(Frame::Resume { received, token }) => Some((received, token)),
        _ => None,
    }
}

/// Service: tells a proxy whose `RESUME` names no link here that it does
/// not (a `GOAWAY`), so it gives up at once instead of waiting.
pub(super) async fn refuse_resume(carrier: &mut Carrier) {
    let _ = carrier.send(Frame::GoAway { reason: Reason::UNKNOWN_LINK }).await;
    let _ = carrier.stream.shutdown().await;
}

/// Proxy: starts `carrier` for the link: detaches the link from its old
/// transport (if it still had one), sends `RESUME`, waits for `RESUMED` and
/// attaches. On an error the link stays detached (or closed, if the service
/// no longer knows it).
pub(super) async fn resume_as_proxy(shared: &Shared, carrier: &mut Carrier) -> Result<(), HandshakeError> {
    carrier.send(leave_transport(shared)?).await?;
    let answer = tokio::time::timeout(RESUME_ANSWER_WAIT, carrier.receive())
        .await
        .map_err(|_| HandshakeError::Timeout(RESUME_ANSWER_WAIT))??;
    let mut state = shared.lock();
    let attached = match Frame::decode(&answer) {
        Ok(Frame::Resumed { received }) => {
            state.link.attach(clock::now(), received).map_err(|e| e.to_string())
        }
        Ok(Frame::GoAway { reason }) => {
            // The service does not know the link (it restarted): nothing
            // can be resumed, the streams are reset.
            state.link.handle_closed();
            Err(format!("the service no longer has the link: {reason}"))
        }
        Ok(other) => Err(format!("{:?} instead of RESUMED", other.kind())),
        Err(e) => Err(e.to_string()),
    };
    changed(&mut state, shared);
    attached.map_err(HandshakeError::NotResumed)
}

/// Service: starts `carrier` for the link, whose proxy said it received
/// `peer_received` frames: detaches from the old transport (if any), sends
/// `RESUMED` and attaches.
pub(super) async fn resume_as_service(
    shared: &Shared,
    carrier: &mut Carrier,
    peer_received: u64,
) -> Result<(), HandshakeError> {
    carrier.send(leave_transport(shared)?).await?;
    let mut state = shared.lock();
    let attached = state.link.attach(clock::now(), peer_received);
    changed(&mut state, shared);
    attached.map_err(|e| HandshakeError::NotResumed(e.to_string()))
}

/// Detaches the link from the transport it had (if it still had one) and
/// returns this end's first frame for the new one (`RESUME` or `RESUMED`):
/// what it received is frozen from here until it attaches again.
fn leave_transport(shared: &Shared) -> Result<Frame<'static>, HandshakeError> {
    let mut state = shared.lock();
    state.link.detach(clock::now());
    changed(&mut state, shared);
    state.link.handover().ok_or(HandshakeError::ClosedEarly)
}

/// The length of the whole record at the start of `buf`, header included.
pub(super) fn first_record_len(buf: &[u8]) -> usize {
    buf.first_chunk::<{ record::HEADER_LEN }>()
        .map_or(0, |len| record::HEADER_LEN + usize::from(u16::from_be_bytes(*len)))
}

/// Splits a finished session for a [`Carrier`].
pub(super) fn split_session(session: Session) -> Result<(Sealer, Opener, Vec<u8>, [u8; 32]), HandshakeError> {
    let (transport, leftover) = session.into_transport().ok_or(HandshakeError::ClosedEarly)?;
    let hash = *transport.handshake_hash();
    let (sealer, opener) = transport.split();
    Ok((sealer, opener, leftover, hash))
}
