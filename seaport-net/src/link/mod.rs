//! Links on tokio: one Noise session per proxy–service pair carrying many
//! streams, driven by [`seaport_proto::link::Link`]. Every protocol decision
//! (credit, fairness, stream lifecycle, keepalive, go-away) is the state
//! machine's; this module moves bytes between sockets and fires its timer.
//! Here is the public face: [`LinkHandle`], the proxy's side of a running
//! link, and [`serve`], the service's side. A proxy's pool of links is the
//! `pool` module's, which uses this one; the handshakes are
//! [`crate::handshake`]'s.
//!
//! # Files
//! - `state`: what the link's tasks share (the machine, each stream's slot)
//!   and how the machine's events reach them.
//! - `driver`: the task that owns the link socket (reader and writer).
//! - `stream`: a stream's task, the service's backend connect, delivery.
//! - `resume`: carrying a resumable link over to a new transport (a path
//!   lost, or a better one found), and the service's table of such links.
//! - `datagram`: UDP flows beside the streams, and a service's socket per
//!   flow toward its UDP backend.
//!
//! # Invariants
//! - A link runs in one driver task ([`LinkHandle::start`] spawns it on the
//!   proxy, [`serve`] is it on the service); each stream has a task of its
//!   own. The proxy's stream tasks are its client connections; the
//!   service's are spawned by the driver and owned by it.
//! - The shared state's lock is a `std` mutex, held only for non-blocking
//!   work, never across an await.
//! - Open links and streams are counted in [`crate::metrics`] by guards that
//!   live exactly as long as the link's driver and the stream's task, so an
//!   aborted task cannot leave a gauge behind.

mod datagram;
mod driver;
mod resume;
mod socket;
mod state;
mod stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use seaport_proto::hello::Capabilities;
use seaport_proto::keys::{Keypair, PublicKey};
use seaport_proto::link::{self as proto, FlowId, LinkConfig, Reason, Side, StreamId, resume_token};
use seaport_proto::record;
use seaport_proto::registry::Source;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

pub use self::datagram::{QUEUE_BYTES, QUEUE_DATAGRAMS, UdpBackend, recv_with};
use self::driver::{ServiceSide, drive};
use self::resume::{Carrier, Handover, first_record_len, peek_resume, refuse_resume, split_session};
pub use self::resume::{Repath, Resumables};
pub use self::socket::{LocalStream, PIPE_BYTES, StreamSocket};
pub use self::state::Moved;
use self::state::{Shared, Slot, changed, new_shared};
use self::stream::run_stream;
pub use self::stream::{Accepted, Backend, StreamBackend, StreamEnd};
use crate::allow::AllowList;
use crate::clock;
use crate::event::{Event, emit};
use crate::handshake::{HandshakeError, respond};
use crate::limit::Share;
use crate::lock::lock;
use crate::metrics::{DatagramDrop, Refusal, metrics};
use crate::reach::{Path, Reached};

/// Why a stream could not be opened on a link.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The service could not reach its backend, or refused for another reason
    /// before anything reached a backend: another instance may be tried.
    #[error("the service refused the stream: {0}")]
    Refused(Reason),
    /// The link cannot open streams (closed, going away, at its stream limit).
    #[error("the link cannot open a stream: {0}")]
    Link(#[from] proto::StreamError),
    /// The link ended while the stream was being opened.
    #[error("the link ended before the service answered")]
    Lost,
    /// No answer in time.
    #[error("no answer from the service in {0:?}")]
    Timeout(Duration),
    /// No link to the service could be opened.
    #[error(transparent)]
    Dial(#[from] HandshakeError),
    /// The client's own connection failed while its stream opened.
    #[error("the client's connection failed: {0}")]
    Client(std::io::Error),
    /// The stream failed after its early data went out, without a refusal:
    /// the service may have handed it to its backend, so it must not be
    /// sent to another instance.
    #[error("{0}, after the client's first bytes went out: not tried elsewhere")]
    MaybeDelivered(String),
}

impl OpenError {
    /// Whether another instance may be tried for the same client: not when
    /// its first bytes may have reached a backend, nor when the client
    /// itself failed.
    pub fn may_try_another(&self) -> bool {
        !matches!(self, OpenError::MaybeDelivered(_) | OpenError::Client(_))
    }
}

/// Reads and drops `n` bytes of `client`: early data that went with the
/// `OPEN` and still waits in the socket, peeked.
async fn skip(client: &StreamSocket, mut n: usize) -> std::io::Result<()> {
    let mut scratch = vec![0; n];
    while n > 0 {
        match client.try_read(scratch.get_mut(..n).unwrap_or_default()) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(read) => n -= read,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => client.readable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A live link seen from the proxy: open streams on it while it is usable.
#[derive(Clone)]
pub struct LinkHandle {
    shared: Arc<Shared>,
    /// The service's key.
    pub remote: PublicKey,
    /// New transports for the driver (a better path).
    handovers: mpsc::Sender<Handover>,
    /// Aborts the driver when the last handle goes.
    _driver: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl LinkHandle {
    /// Starts the driver of a link whose handshake (as initiator, with
    /// the instance's key) completed on the path `reached`. A link the
    /// service can resume looks for a new path with `repath` when it loses
    /// its own.
    pub fn start(reached: Reached, config: LinkConfig, repath: Repath) -> Result<LinkHandle, HandshakeError> {
        let Reached { stream, session, path, addr, .. } = reached;
        let remote = session.remote().ok_or(HandshakeError::ClosedEarly)?;
        let resumable = session.remote_capabilities().contains(Capabilities::RESUME);
        let datagrams = session.remote_capabilities().contains(Capabilities::DATAGRAM);
        let client_addresses = session.remote_capabilities().contains(Capabilities::CLIENT_ADDRESS);
        let early_data = session.remote_capabilities().contains(Capabilities::EARLY_DATA);
        let (sealer, opener, leftover, hash) = split_session(session)?;
        let token = resumable.then(|| resume_token(&hash));
        let shared = new_shared(Side::Proxy, config, remote, token, Some((path, addr)));
        if datagrams {
            shared.lock().link.allow_datagrams();
        }
        if client_addresses {
            shared.lock().link.allow_client_addresses();
        }
        if early_data {
            shared.lock().link.allow_early_data();
        }
        let span = tracing::info_span!("link", service = %remote);
        let ended = shared.clone();
        let (handovers, moves) = mpsc::channel(1);
        let carrier = Carrier::new(stream, sealer, opener, &leftover);
        let repath = resumable.then_some(repath);
        let driver = tokio::spawn(
            async move {
                // Counted while the driver lives, however it ends (an abort too).
                let _open = metrics().link_guard();
                drive(ended.clone(), carrier, None, moves, repath).await;
                let reason = ended.lock().close_reason.take().unwrap_or_else(|| "closed".into());
                tracing::info!("link to {remote} ended: {reason}");
                emit(&Event::LinkDown { key: remote, reason });
            }
            .instrument(span),
        );
        Ok(LinkHandle { shared, remote, handovers, _driver: Arc::new(AbortOnDrop(driver.abort_handle())) })
    }

    /// How the link reaches the service now.
    pub fn path(&self) -> Path {
        lock(&self.shared.route).map_or(Path::Direct, |(path, _)| path)
    }

    /// The address the link runs over now (the registry's, when relayed).
    pub fn addr(&self) -> Option<SocketAddr> {
        lock(&self.shared.route).map(|(_, addr)| addr)
    }

    /// Whether the link can move to another path with its streams.
    pub fn is_resumable(&self) -> bool {
        self.shared.lock().link.is_resumable()
    }

    /// Moves the link, open streams and all, onto `reached` (a better path
    /// to the same service); the old transport is closed once the new one
    /// took over. Returns once the driver has the new path; the move itself
    /// is logged (`link to KEY moved to PATH ADDR`).
    pub async fn move_to(&self, reached: Reached) -> Result<(), HandshakeError> {
        if !self.is_resumable() {
            return Err(HandshakeError::NotResumed("the service cannot resume links".into()));
        }
        // The service lists a link for resuming before its end sends a
        // frame: a move before the first frame came could reach it before
        // the link does, and be told there is no such link.
        let deadline = tokio::time::Instant::now() + resume::RESUME_ANSWER_WAIT;
        while self.shared.lock().link.frames_received() == 0 {
            if tokio::time::Instant::now() >= deadline || !self.is_usable() {
                return Err(HandshakeError::NotResumed("the service has not spoken on the link yet".into()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let handover = Handover::from_reached(reached)?;
        self.handovers
            .send(handover)
            .await
            .map_err(|_| HandshakeError::NotResumed("the link has ended".into()))
    }

    /// New streams carry what their client sent already as early data, when
    /// the service takes it. A trade: a new connection's first byte comes a
    /// round trip sooner, but a stream whose service dies (or does not
    /// answer) after the early data went is not tried on another instance
    /// ([`OpenError::MaybeDelivered`]): the bytes may have reached a backend.
    pub fn send_early_data(&self) {
        self.shared.send_early.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether new streams may go on this link.
    pub fn is_usable(&self) -> bool {
        self.shared.lock().link.can_open()
    }

    /// Streams open on the link.
    pub fn stream_count(&self) -> usize {
        self.shared.lock().link.stream_count()
    }

    /// Opens a stream for `client` and waits (at most `timeout`) until the
    /// service reached its backend. Nothing of the client's is read before:
    /// what it sent already goes with the `OPEN` as early data (to a
    /// service that takes it), peeked, and is read from the socket only once
    /// the stream is accepted, so a refused stream leaves it for the next
    /// instance.
    /// `from` is where the client connected from, for the service's PROXY
    /// protocol header (`None`: not shared).
    pub async fn open(
        &self,
        client: Arc<StreamSocket>,
        from: Option<SocketAddr>,
        timeout: Duration,
    ) -> Result<StreamId, OpenError> {
        let started = tokio::time::Instant::now();
        let opened = self.open_stream(client, from, timeout).await;
        let m = metrics();
        match &opened {
            Ok(_) => {
                m.stream_opened("accepted");
                m.stream_open_took(started.elapsed());
            }
            Err(OpenError::Refused(_)) => {
                m.stream_opened("refused");
                m.stream_open_took(started.elapsed());
            }
            // A full link is retried on another before anything is counted.
            Err(OpenError::Link(proto::StreamError::StreamLimit)) => {}
            Err(_) => m.stream_opened("failed"),
        }
        opened
    }

    async fn open_stream(
        &self,
        client: Arc<StreamSocket>,
        from: Option<SocketAddr>,
        timeout: Duration,
    ) -> Result<StreamId, OpenError> {
        let (tx, rx) = oneshot::channel();
        let takes_early = self.shared.send_early.load(std::sync::atomic::Ordering::Relaxed)
            && self.shared.lock().link.takes_early_data();
        let early = if takes_early { client.peek_waiting(proto::EARLY_DATA) } else { Vec::new() };
        let (id, taken) = {
            let mut state = self.shared.lock();
            if state.link.is_ended() {
                return Err(OpenError::Lost);
            }
            let (id, taken) = state.link.open_early(clock::now(), from, &early)?;
            let mut slot = Slot::new(client.clone());
            slot.answer = Some(tx);
            state.streams.insert(id, slot);
            changed(&mut state, &self.shared);
            (id, taken)
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(()))) => {
                // The early bytes went: take them off the socket (they wait
                // there, peeked), before the stream reads on after them.
                if let Err(e) = skip(&client, early.len().min(taken)).await {
                    let mut state = self.shared.lock();
                    let _ = state.link.reset(id, Reason::CANCELLED);
                    state.streams.remove(&id);
                    changed(&mut state, &self.shared);
                    return Err(OpenError::Client(e));
                }
                if taken > 0
                    && let Some(slot) = self.shared.lock().streams.get_mut(&id)
                {
                    slot.moved.sent += taken as u64;
                    metrics().stream_sent.inc_by(taken as u64);
                }
                Ok(id)
            }
            // A refusal is the one answer that says the early data reached
            // no backend: the service refuses before it writes any.
            Ok(Ok(Err(reason))) => Err(OpenError::Refused(reason)),
            Ok(Err(_)) if taken > 0 => Err(OpenError::MaybeDelivered(OpenError::Lost.to_string())),
            Ok(Err(_)) => Err(OpenError::Lost),
            Err(_) => {
                let mut state = self.shared.lock();
                let _ = state.link.reset(id, Reason::CANCELLED);
                state.streams.remove(&id);
                changed(&mut state, &self.shared);
                let timed_out = OpenError::Timeout(timeout);
                if taken > 0 { Err(OpenError::MaybeDelivered(timed_out.to_string())) } else { Err(timed_out) }
            }
        }
    }

    /// Carries the accepted stream `id` until both directions ended or it
    /// was reset.
    pub async fn run(&self, id: StreamId) -> Result<Moved, StreamEnd> {
        let _open = metrics().stream_guard();
        run_stream(&self.shared, id).await
    }

    /// The service is gone (the registries no longer list it): a link
    /// waiting for a new path gives up now, resetting its streams, rather
    /// than search for the rest of its resume window.
    pub fn abandon_if_detached(&self) {
        let mut state = self.shared.lock();
        if state.link.is_detached() {
            state.close_reason = Some("the service is gone".into());
            state.link.handle_closed();
            changed(&mut state, &self.shared);
        }
    }

    /// A new UDP flow on this link for the client at `client` of the port
    /// `socket`: the service's datagrams on it go to `client` through
    /// `socket`. `None` when the link carries no new flows (it is ending,
    /// or the service is too old for datagrams).
    pub fn open_flow(&self, socket: Arc<tokio::net::UdpSocket>, client: SocketAddr) -> Option<FlowId> {
        let mut state = self.shared.lock();
        if !state.link.can_open() || !state.link.takes_datagrams() {
            return None;
        }
        datagram::open_flow(&mut state, socket, client)
    }

    /// Whether the link can carry datagrams, now or once it has a path
    /// again: a flow on a link that cannot moves to another.
    pub fn carries_flows(&self) -> bool {
        let state = self.shared.lock();
        state.link.takes_datagrams() && !state.link.is_ended()
    }

    /// Sends one datagram of `flow` (queued for the writer; dropped and
    /// counted when the link cannot carry it now).
    pub fn send_datagram(&self, flow: FlowId, bytes: &[u8]) -> Result<(), DatagramDrop> {
        let mut state = self.shared.lock();
        datagram::send(&mut state, &self.shared, flow, bytes)
    }

    /// When `flow` last carried a datagram either way; `None` once closed.
    pub fn flow_active_at(&self, flow: FlowId) -> Option<std::time::Instant> {
        datagram::last_active(&self.shared.lock(), flow)
    }

    /// The flow is over: datagrams still coming for it are dropped.
    pub fn close_flow(&self, flow: FlowId) {
        datagram::close_flow(&mut self.shared.lock(), flow);
    }

    /// No new streams; open ones finish (link rotation, drain).
    pub fn go_away(&self) {
        let mut state = self.shared.lock();
        state.link.go_away();
        changed(&mut state, &self.shared);
    }
}

/// Most link connections a service holds that have not proved themselves
/// yet (handshake and first record), in all: a flood of silent connections
/// costs a few KiB each (at most [`MAX_FIRST_RECORD`] and a read buffered)
/// and is refused past this, before any allocation.
pub const MAX_GREETINGS: usize = 1024;
/// Of those, most from one source (an IPv4 address or an IPv6 /64).
pub const MAX_GREETINGS_PER_SOURCE: usize = 16;

/// A place in a service's pool of link connections that have not proved
/// themselves yet; given back once the first record authenticates. Links
/// that come through meetings (punched, relayed) have none: meetings are
/// capped on their own, and relayed ones all come from the registry's
/// address.
pub type Greeting = Option<Share<Source>>;

/// How a service answers links: who it is, whom it admits (`--allow`), how
/// long a handshake (and the first record after it) may take, each link's
/// limits, and the links running now (for a `RESUME` to find).
pub struct Responder {
    /// The service's identity.
    pub keypair: Keypair,
    /// The proxies it admits.
    pub allow: Arc<AllowList>,
    /// How long the handshake and the first record may take.
    pub timeout: Duration,
    /// Each link's limits.
    pub config: LinkConfig,
    /// The resumable links running now.
    pub resumables: Arc<Resumables>,
}

/// Serves one link on the service side: the handshake (the proxy must ask
/// for a link, with a key the allow list admits), then streams to `backend`
/// until the link ends or `drain` fires, after which no new stream is
/// accepted and open ones finish. `greeting` is held until the proxy proved
/// itself.
pub async fn serve(
    mut stream: TcpStream,
    responder: &Responder,
    backend: Backend,
    drain: watch::Receiver<bool>,
    greeting: Greeting,
) -> Result<(), HandshakeError> {
    let Responder { keypair, allow, timeout, config, resumables } = responder;
    let timeout = *timeout;
    // One deadline for the handshake and the first record together: an
    // unproved connection holds its greeting for one timeout, not two.
    let deadline = tokio::time::Instant::now() + timeout;
    let (session, key) = respond(&mut stream, keypair, timeout, allow).await?;
    crate::serve::record_peer_key(&key);
    let resumable = session.remote_capabilities().contains(Capabilities::RESUME);
    let datagrams = session.remote_capabilities().contains(Capabilities::DATAGRAM);
    let (sealer, mut opener, leftover, hash) = split_session(session)?;
    // Nothing is charged to the proxy's key until it proves it holds the
    // session's keys with its first record (a link opens with a window
    // raise and a ping): a replayed first handshake message is answered,
    // but its sender cannot follow it with a record, so it takes no link.
    let leftover = tokio::time::timeout_at(deadline, first_record(&mut stream, leftover))
        .await
        .map_err(|_| HandshakeError::Timeout(timeout))??;
    if !opener.authenticates(record_body(&leftover)) {
        metrics().refuse(Refusal::Unauthenticated);
        return Err(HandshakeError::Unauthenticated);
    }
    drop(greeting);
    if resumable && let Some((peer_received, token)) = peek_resume(&opener, record_body(&leftover)) {
        // A link resumed on a new path: it keeps the budget share it has.
        let mut resume = Vec::new();
        opener.open(record_body(&leftover), &mut resume).map_err(|_| HandshakeError::Unauthenticated)?;
        let rest = leftover.get(first_record_len(&leftover)..).unwrap_or_default();
        let carrier = Carrier::new(stream, sealer, opener, rest);
        let Some(running) = resumables.find(&token, &key) else {
            tracing::info!(proxy = %key, "a proxy asked to resume a link this service does not have");
            let mut carrier = carrier;
            refuse_resume(&mut carrier).await;
            return Err(HandshakeError::NotResumed("no such link".into()));
        };
        if let Err(mpsc::error::SendError(Handover::Service { mut carrier, .. })) =
            running.send(Handover::Service { carrier, peer_received }).await
        {
            refuse_resume(&mut carrier).await;
        }
        return Ok(());
    }
    let share = backend.budget.link(key).inspect_err(|_| metrics().refuse(Refusal::Link))?;
    let token = resumable.then(|| resume_token(&hash));
    let shared = new_shared(Side::Service, config.clone(), key, token, None);
    {
        let mut state = shared.lock();
        if datagrams {
            state.link.allow_datagrams();
        }
        // This build advertises taking early data to every proxy; a proxy
        // from before it sends none.
        state.link.allow_early_data();
        state.datagrams.backend.clone_from(&backend.udp);
    }
    let (handovers, resumed) = mpsc::channel(1);
    // Findable by a RESUME exactly while the driver runs.
    let _listed = token.map(|token| Resumables::list(resumables, token, key, handovers));
    let carrier = Carrier::new(stream, sealer, opener, &leftover);
    drive(shared, carrier, Some(ServiceSide { backend, drain, share }), resumed, None).await;
    Ok(())
}

/// Largest first record a proxy may open its link with: its first frames
/// are a window raise and a ping, tens of bytes; a connection that has not
/// proved itself gets no more buffer than this.
pub const MAX_FIRST_RECORD: usize = 1024;

/// Reads until `buf` (what came after the handshake so far) holds at least
/// one whole record of at most [`MAX_FIRST_RECORD`] bytes; at most that and
/// a read more.
async fn first_record(stream: &mut TcpStream, mut buf: Vec<u8>) -> Result<Vec<u8>, HandshakeError> {
    let mut chunk = [0u8; 4096];
    loop {
        if record_body_len(&buf) > MAX_FIRST_RECORD {
            return Err(HandshakeError::Unauthenticated);
        }
        if buf.len() >= record::HEADER_LEN + record_body_len(&buf) {
            return Ok(buf);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HandshakeError::ClosedEarly);
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

/// The length a record at the start of `buf` announces (0 until its header
/// is there, which `first_record` then waits for).
fn record_body_len(buf: &[u8]) -> usize {
    buf.first_chunk::<{ record::HEADER_LEN }>().map_or(0, |len| usize::from(u16::from_be_bytes(*len)))
}

/// The body of the whole record at the start of `buf`.
fn record_body(buf: &[u8]) -> &[u8] {
    buf.get(record::HEADER_LEN..record::HEADER_LEN + record_body_len(buf)).unwrap_or_default()
}

#[cfg(test)]
mod tests;
