//! A stream's side of a link: the task that carries one stream between its
//! socket and the link, the service's backend connect before it, and the
//! reader's delivery of received bytes to the stream's socket.
//!
//! A stream task only waits: for its socket to become readable (then it asks
//! the link for a turn to send; the writer reads the socket), for its socket
//! to take bytes it could not take at once, or for the link's word (end,
//! reset, credit).
//!
//! Invariants:
//! - Received bytes go straight to the socket; only what it does not take
//!   is kept (`Slot::pending`), bounded by the stream's credit window and
//!   freed once written.
//! - A reset stream's socket is closed with RST, never ended cleanly, so a
//!   client sees a cut transfer as cut.
//! - A service connects its backend before it accepts a stream, so a proxy
//!   can fail over before its client saw a byte.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use seaport_proto::keys::PublicKey;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use seaport_proto::link::{Link, Reason, StreamId};

use super::datagram::UdpBackend;
use super::socket::{LocalStream, StreamSocket};
use super::state::{Half, Moved, Shared, Slot, State, changed};
use crate::budget::{Budget, StreamShare};
use crate::clock;
use crate::dial;
use crate::metrics::{Refusal, metrics};

/// What a service needs to connect the streams (and flows) of its links.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Where streams go.
    pub streams: StreamBackend,
    /// How long connecting to the TCP backend may take before the stream is refused.
    pub connect_timeout: Duration,
    /// The streams the service's proxies may hold at once, shared by every link.
    pub budget: Arc<Budget>,
    /// Where UDP flows go, if the service forwards UDP.
    pub udp: Option<UdpBackend>,
    /// The PROXY protocol header each TCP backend connection starts with, if any.
    pub proxy_protocol: Option<crate::proxy_header::Version>,
}

/// Where a service's streams go.
#[derive(Debug, Clone)]
pub enum StreamBackend {
    /// One TCP connection to this address per stream.
    Tcp(SocketAddr),
    /// Handed to the program in this process, through a bounded queue: a
    /// stream that finds it full (or closed) is refused, so the proxy tries
    /// another instance.
    InProcess(mpsc::Sender<Accepted>),
    /// None: a service of a UDP port only refuses them
    /// ([`Reason::WRONG_PROTOCOL`]).
    Refused,
}

/// A stream a proxy opened, handed to the program (a service whose streams
/// are [`StreamBackend::InProcess`]): the program's end of it, which reads
/// what the proxy's client sends and writes what it receives. Dropping it
/// without `shutdown` resets the stream, as a TCP abort does.
#[derive(Debug)]
pub struct Accepted {
    stream: LocalStream,
    proxy: PublicKey,
    client: Option<SocketAddr>,
}

impl Accepted {
    /// The key of the proxy whose link carries the stream (the link's
    /// handshake proved it).
    pub fn proxy(&self) -> PublicKey {
        self.proxy
    }

    /// The client's address as the proxy saw it, if the proxy told it: the
    /// proxy's word (its key is proved, the address is not), as in a PROXY
    /// protocol header.
    pub fn client(&self) -> Option<SocketAddr> {
        self.client
    }
}

crate::local_stream_io!(Accepted, stream);

/// How a stream ended badly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamEnd {
    /// Reset by the peer, or because the link was lost.
    #[error("stream reset: {0}")]
    Reset(Reason),
    /// Our own socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Service: connects the backend for stream `id`, accepts or refuses it, and
/// carries it.
pub(super) async fn connect_stream(
    shared: Arc<Shared>,
    id: StreamId,
    client: Option<SocketAddr>,
    backend: Backend,
    _share: StreamShare,
) {
    // An in-process stream holds a place in the program's queue first, and
    // is handed over only once accepted: a stream the proxy cancels before
    // that never reaches the program (nor takes its queue).
    let mut handover = None;
    let connected = match &backend.streams {
        StreamBackend::Tcp(addr) => {
            connect_tcp(*addr, &shared, client, &backend).await.map(StreamSocket::Tcp)
        }
        StreamBackend::InProcess(queue) => match queue.try_reserve() {
            Ok(place) => {
                let (ours, theirs) = StreamSocket::pair();
                handover = Some((place, Accepted { stream: theirs, proxy: shared.remote, client }));
                Ok(ours)
            }
            Err(mpsc::error::TrySendError::Full(())) => {
                Err("the program's queue of new streams is full".to_owned())
            }
            Err(mpsc::error::TrySendError::Closed(())) => Err("the program takes no more streams".to_owned()),
        },
        StreamBackend::Refused => Err("this service takes no streams".to_owned()),
    };
    let socket = {
        let mut state = shared.lock();
        let socket = match connected {
            Ok(socket) => match state.link.accept(id) {
                Ok(()) => {
                    metrics().stream_opened("accepted");
                    let socket = Arc::new(socket);
                    let mut slot = Slot::new(socket.clone());
                    // Its early data goes to the backend first.
                    slot.pending = state.early.remove(&id).unwrap_or_default();
                    state.streams.insert(id, slot);
                    if let Some((place, accepted)) = handover.take() {
                        place.send(accepted);
                    }
                    Some(socket)
                }
                Err(e) => {
                    tracing::debug!("stream gone before its backend answered: {e}");
                    None
                }
            },
            Err(e) => {
                tracing::info!("cannot reach the backend: {e}");
                refuse(&mut state, id, Reason::REFUSED);
                metrics().stream_opened("refused");
                metrics().refuse(Refusal::Stream);
                None
            }
        };
        changed(&mut state, &shared);
        socket
    };
    if socket.is_some() {
        let _open = metrics().stream_guard();
        match run_stream(&shared, id).await {
            Ok(moved) => tracing::debug!(sent = moved.sent, received = moved.received, "stream closed"),
            Err(e) => tracing::debug!("stream ended: {e}"),
        }
    }
}

/// Service: refuses stream `id` with `reason`, dropping the early data it
/// brought (every refusal goes through here, so none is kept).
pub(super) fn refuse(state: &mut State, id: StreamId, reason: Reason) {
    state.early.remove(&id);
    let _ = state.link.refuse(id, reason);
}

/// A connection to the TCP backend at `addr`, with its PROXY protocol
/// header written if the service sends one.
async fn connect_tcp(
    addr: SocketAddr,
    shared: &Shared,
    client: Option<SocketAddr>,
    backend: &Backend,
) -> Result<TcpStream, String> {
    let mut socket =
        dial::connect(addr, backend.connect_timeout).await.map_err(|e| format!("{addr}: {e}"))?;
    // The header goes before the stream is accepted: no byte of the
    // client's can reach the backend ahead of it, and a backend that
    // cannot take it is a refusal the proxy can fail over from.
    if let Some(version) = backend.proxy_protocol {
        let header = crate::proxy_header::header(version, client, addr, &shared.remote);
        let write = tokio::io::AsyncWriteExt::write_all(&mut socket, &header);
        match tokio::time::timeout(backend.connect_timeout, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("{addr}: writing the PROXY header: {e}")),
            Err(_) => return Err(format!("{addr} did not take the PROXY header in time")),
        }
    }
    Ok(socket)
}

/// The stream's waiting: asks for turns to send when its socket is readable,
/// writes what its socket could not take at once, half-closes after the
/// peer's end, and closes with RST on a reset.
pub(super) async fn run_stream(shared: &Shared, id: StreamId) -> Result<Moved, StreamEnd> {
    let (socket, wake) = match shared.lock().streams.get(&id) {
        Some(slot) => (slot.socket.clone(), slot.wake.clone()),
        None => return Err(StreamEnd::Reset(Reason::CANCELLED)),
    };
    let mut shut_write = false;
    loop {
        let (want_read, has_pending) = {
            let mut state = shared.lock();
            let State { link, streams, .. } = &mut *state;
            let Some(slot) = streams.get_mut(&id) else { return Err(StreamEnd::Reset(Reason::CANCELLED)) };
            if let Some(reason) = slot.reset {
                streams.remove(&id);
                drop(state);
                socket.reset();
                return Err(StreamEnd::Reset(reason));
            }
            if slot.received == Half::Ended && slot.pending.is_empty() && !shut_write {
                shut_write = true;
                socket.shutdown_write();
            }
            if slot.sent == Half::Ended && shut_write {
                let moved = slot.moved;
                streams.remove(&id);
                return Ok(moved);
            }
            let want_read = !slot.read_requested && slot.sent == Half::Open && link.send_credit(id) > 0;
            (want_read, !slot.pending.is_empty())
        };
        tokio::select! {
            ready = socket.readable(), if want_read => {
                if let Err(e) = ready {
                    abandon(shared, id);
                    return Err(e.into());
                }
                let mut state = shared.lock();
                // Refused while the stream cannot send yet (its ACCEPT not
                // out): it is told `Writable` when it can.
                let queued = state.link.want_send(id).is_ok();
                if let Some(slot) = state.streams.get_mut(&id) {
                    slot.read_requested = queued;
                }
                drop(state);
                shared.work.notify_one();
            }
            ready = socket.writable(), if has_pending => {
                if let Err(e) = ready {
                    abandon(shared, id);
                    return Err(e.into());
                }
                let mut state = shared.lock();
                let State { link, streams, .. } = &mut *state;
                if let Some(slot) = streams.get_mut(&id) {
                    match slot.socket.try_write(&slot.pending) {
                        Ok(n) => {
                            slot.pending.drain(..n);
                            if slot.pending.is_empty() {
                                slot.pending = Vec::new();
                            }
                            slot.moved.received += n as u64;
                            metrics().stream_received.inc_by(n as u64);
                            let _ = link.consumed(clock::now(), id, n);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            let _ = link.reset(id, Reason::CANCELLED);
                            streams.remove(&id);
                            changed(&mut state, shared);
                            return Err(e.into());
                        }
                    }
                }
                changed(&mut state, shared);
            }
            () = wake.notified() => {}
        }
    }
}

/// Our side of stream `id` failed: reset it and forget its slot, so it holds
/// neither a stream slot nor credit.
fn abandon(shared: &Shared, id: StreamId) {
    let mut state = shared.lock();
    let _ = state.link.reset(id, Reason::CANCELLED);
    state.streams.remove(&id);
    changed(&mut state, shared);
}

/// Bytes for stream `id`: straight to its socket if it takes them, the rest
/// kept (bounded by the stream's window) for the stream task to write.
pub(super) fn deliver(
    link: &mut Link,
    streams: &mut HashMap<StreamId, Slot>,
    early: &mut HashMap<StreamId, Vec<u8>>,
    id: StreamId,
    bytes: &[u8],
) {
    // Service: early data waits for its backend (the machine bounds it).
    if link.is_opening(id) {
        early.entry(id).or_default().extend_from_slice(bytes);
        return;
    }
    let Some(slot) = streams.get_mut(&id) else {
        // A stream we already dropped: its credit goes back at once.
        let _ = link.consumed(clock::now(), id, bytes.len());
        return;
    };
    let written = if slot.pending.is_empty() {
        match slot.socket.try_write(bytes) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(_) => {
                let _ = link.reset(id, Reason::CANCELLED);
                slot.reset = Some(Reason::CANCELLED);
                slot.wake.notify_one();
                return;
            }
        }
    } else {
        0
    };
    if written > 0 {
        slot.moved.received += written as u64;
        metrics().stream_received.inc_by(written as u64);
        let _ = link.consumed(clock::now(), id, written);
    }
    if let Some(rest) = bytes.get(written..).filter(|r| !r.is_empty()) {
        slot.pending.extend_from_slice(rest);
        slot.wake.notify_one();
    }
}
