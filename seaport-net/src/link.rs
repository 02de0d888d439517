//! Links on tokio: one Noise session per proxy–service pair carrying many
//! streams, driven by [`seaport_proto::link::Link`]. Every protocol decision
//! (credit, fairness, stream lifecycle, keepalive, go-away) is the state
//! machine's; this module moves bytes between sockets and fires its timer.
//!
//! # Tasks
//! A link runs in one driver task ([`LinkHandle::start`] spawns it on the
//! proxy, [`serve`] is it on the service) that joins a **reader** (link socket
//! → frames → stream sockets) and a **writer** (frames and stream bytes →
//! link socket). Each stream has a task of its own that only waits: for its
//! socket to become readable (then asks the link for a turn to send), for
//! its socket to take bytes it could not take at once, or for the link's
//! word (end, reset, credit). The proxy's stream tasks are its client
//! connections; the service's are spawned by the driver and owned by it.
//!
//! # No copies, bounded buffers
//! - Receive: a frame is opened in place in the reader's decoder buffer and
//!   its payload written straight to the stream's socket (non-blocking).
//!   Only what the socket does not take is copied, into that stream's
//!   `pending` buffer, which the stream's credit window bounds; it is freed
//!   once written.
//! - Send: the writer reads a stream's socket straight into the frame slot
//!   of its batch buffer, after room for the headers, and seals in place. The
//!   batch stops growing once it holds [`BATCH`] bytes (so it holds less than
//!   `BATCH` plus one frame) and is freed while the link is idle.
//!
//! The state lock is a `std` mutex, held only for non-blocking work (socket
//! `try_read`/`try_write`, state machine calls), never across an await.
//!
//! # Invariants
//! - Frames are sealed in exactly the order they are written: only the
//!   writer seals, one batch at a time.
//! - A stream whose link is lost is reset (its socket closed with RST), never
//!   ended cleanly, so a client sees a cut transfer as cut.
//! - A service connects its backend before it accepts a stream, so a proxy
//!   can fail over before its client saw a byte.
//! - Open links and streams are counted in [`crate::metrics`] by guards that
//!   live exactly as long as the link's driver and the stream's task, so an
//!   aborted task cannot leave a gauge behind.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use seaport_proto::frame::{self, FrameDecoder, MAX_WIRE_FRAME};
use seaport_proto::keys::{Keypair, PublicKey};
use seaport_proto::link::{self as proto, Incoming, Link, LinkConfig, LinkEvent, Reason, Side, StreamId};
use seaport_proto::message::Instance;
use seaport_proto::noise::{Intent, Opener, Sealer, TAG_LEN};
use seaport_proto::session::Session;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::allow::AllowList;
use crate::budget::{Budget, LinkShare, OverBudget, StreamShare};
use crate::clock;
use crate::dial;
use crate::event::{Event, emit};
use crate::handshake::{HandshakeError, handshake};
use crate::identity::entropy;
use crate::lock::lock;
use crate::metrics::{Refusal, metrics};
use crate::reach::{self, Introducer, Path, PathMemo};

/// Most bytes the writer gathers before one write to the link socket.
const BATCH: usize = 4 * MAX_WIRE_FRAME;
/// Most unsent bytes the kernel queues on a link socket (`TCP_NOTSENT_LOWAT`,
/// as HTTP/2 servers set it). Every stream shares the link's one TCP
/// connection, so a byte written behind a bulk transfer waits for all the
/// unsent bytes ahead of it: send-buffer autotuning lets that queue reach
/// megabytes (milliseconds at loopback speed). Capping the unsent part keeps
/// the writer's round robin, not the kernel's FIFO, in charge of who goes
/// next, while bytes in flight still grow to the path's bandwidth-delay
/// product. Two frames' worth keeps the socket from running dry between
/// writer wake-ups (Linux reports it writable again below half of it).
/// So a frame that becomes ready behind a bulk transfer waits for at most
/// the writer's batch in flight ([`BATCH`]) and this much in the kernel,
/// plus what the receiver has not read yet. Linux and Android only; a
/// relayed link's bytes also cross the registry's relay sockets, which keep
/// the kernel's default.
const NOTSENT_LOWAT: u32 = 2 * MAX_WIRE_FRAME as u32;
/// How long the reader and the writer keep their buffers while idle.
const IDLE_RELEASE: Duration = Duration::from_millis(100);

/// Bytes one stream moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// From the stream's socket into the link.
    pub sent: u64,
    /// From the link to the stream's socket.
    pub received: u64,
}

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
}

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

/// One stream as the driver sees it.
struct Slot {
    socket: Arc<TcpStream>,
    wake: Arc<Notify>,
    /// Proxy: where the service's answer to `OPEN` goes.
    answer: Option<oneshot::Sender<Result<(), Reason>>>,
    /// Received bytes the socket has not taken yet.
    pending: Vec<u8>,
    /// The stream asked for a turn to send and the writer has not read yet.
    read_requested: bool,
    /// The socket reached EOF and `END` was sent.
    sent_end: bool,
    /// The peer's `END` arrived.
    recv_end: bool,
    /// The stream was reset; the task closes its socket with RST.
    reset: Option<Reason>,
    moved: Moved,
}

impl Slot {
    fn new(socket: Arc<TcpStream>) -> Slot {
        Slot {
            socket,
            wake: Arc::new(Notify::new()),
            answer: None,
            pending: Vec::new(),
            read_requested: false,
            sent_end: false,
            recv_end: false,
            reset: None,
            moved: Moved::default(),
        }
    }
}

struct State {
    link: Link,
    streams: HashMap<StreamId, Slot>,
    /// Service: streams opened by the proxy, for the driver to connect.
    opened: Vec<StreamId>,
    /// The link ended; no stream can be opened.
    closed: bool,
    /// A `GOAWAY` went either way: no new streams.
    going_away: bool,
    /// Why the link ended, once it has.
    close_reason: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer: frames to send, or streams waiting for a turn.
    work: Notify,
    /// Wakes the service driver: streams were opened.
    opened: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

/// After a change from outside the writer: react to the link's events and
/// wake the writer for the frames the change queued.
fn changed(state: &mut State, shared: &Shared) {
    dispatch(state, shared);
    shared.work.notify_one();
}

/// Reacts to what the link says: wakes streams and answers opens. Called
/// with the lock held. The writer calls this directly (waking itself would spin).
fn dispatch(state: &mut State, shared: &Shared) {
    while let Some(event) = state.link.poll_event() {
        match event {
            LinkEvent::Opened { id } => {
                state.opened.push(id);
                shared.opened.notify_one();
            }
            LinkEvent::Accepted { id } => {
                if let Some(answer) = state.streams.get_mut(&id).and_then(|s| s.answer.take()) {
                    let _ = answer.send(Ok(()));
                }
            }
            LinkEvent::Refused { id, reason } => {
                if let Some(mut slot) = state.streams.remove(&id)
                    && let Some(answer) = slot.answer.take()
                {
                    let _ = answer.send(Err(reason));
                }
            }
            LinkEvent::End { id } => {
                if let Some(slot) = state.streams.get_mut(&id) {
                    slot.recv_end = true;
                    slot.wake.notify_one();
                }
            }
            LinkEvent::Reset { id, reason } => {
                let unanswered = state.streams.get(&id).is_some_and(|s| s.answer.is_some());
                if unanswered {
                    // No task carries it yet: the opener hears "lost" as its
                    // answer's sender drops with the slot.
                    state.streams.remove(&id);
                } else if let Some(slot) = state.streams.get_mut(&id) {
                    slot.reset = Some(reason);
                    slot.pending = Vec::new();
                    slot.wake.notify_one();
                }
            }
            LinkEvent::Writable { id } => {
                if let Some(slot) = state.streams.get(&id) {
                    slot.wake.notify_one();
                }
            }
            LinkEvent::GoAway => state.going_away = true,
            // Nothing left to carry: the writer closes its side, the peer
            // answers with its own end, and the reader ends on it.
            LinkEvent::Drained => state.closed = true,
            LinkEvent::Closed { error } => {
                tracing::debug!("link closed: {error}");
                state.close_reason = Some(error.to_string());
                state.closed = true;
            }
            other => tracing::debug!(?other, "link event"),
        }
    }
}

/// A live link seen from the proxy: open streams on it while it is usable.
#[derive(Clone)]
pub struct LinkHandle {
    shared: Arc<Shared>,
    /// The service's key.
    pub remote: PublicKey,
    /// The address the link runs over (the registry's, for a relayed link).
    pub addr: SocketAddr,
    /// How the link reached the service.
    pub path: Path,
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
    /// `remote`) completed on `stream`, which runs over `addr` by `path`.
    pub fn start(
        stream: TcpStream,
        session: Session,
        remote: PublicKey,
        addr: SocketAddr,
        path: Path,
        config: LinkConfig,
    ) -> Result<LinkHandle, HandshakeError> {
        let (transport, leftover) = session.into_transport().ok_or(HandshakeError::ClosedEarly)?;
        let (sealer, opener) = transport.split();
        let shared = new_shared(Side::Proxy, config);
        let span = tracing::info_span!("link", service = %remote, %path, %addr);
        let ended = shared.clone();
        let driver = tokio::spawn(
            async move {
                // Counted while the driver lives, however it ends (an abort too).
                let _open = metrics().link_guard();
                drive(ended.clone(), stream, sealer, opener, leftover, None).await;
                let reason = ended.lock().close_reason.take().unwrap_or_else(|| "closed".into());
                emit(&Event::LinkDown { key: remote, reason });
            }
            .instrument(span),
        );
        Ok(LinkHandle { shared, remote, addr, path, _driver: Arc::new(AbortOnDrop(driver.abort_handle())) })
    }

    /// Whether new streams may go on this link.
    pub fn is_usable(&self) -> bool {
        let state = self.shared.lock();
        !state.closed && !state.going_away
    }

    /// Streams open on the link.
    pub fn stream_count(&self) -> usize {
        self.shared.lock().link.stream_count()
    }

    /// Opens a stream for `client` and waits (at most `timeout`) until the
    /// service reached its backend. Nothing of the client's is read before.
    pub async fn open(&self, client: Arc<TcpStream>, timeout: Duration) -> Result<StreamId, OpenError> {
        let started = tokio::time::Instant::now();
        let opened = self.open_stream(client, timeout).await;
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

    async fn open_stream(&self, client: Arc<TcpStream>, timeout: Duration) -> Result<StreamId, OpenError> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(OpenError::Lost);
            }
            let id = state.link.open(clock::now())?;
            let mut slot = Slot::new(client);
            slot.answer = Some(tx);
            state.streams.insert(id, slot);
            changed(&mut state, &self.shared);
            id
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(()))) => Ok(id),
            Ok(Ok(Err(reason))) => Err(OpenError::Refused(reason)),
            Ok(Err(_)) => Err(OpenError::Lost),
            Err(_) => {
                let mut state = self.shared.lock();
                let _ = state.link.reset(id, Reason::CANCELLED);
                state.streams.remove(&id);
                changed(&mut state, &self.shared);
                Err(OpenError::Timeout(timeout))
            }
        }
    }

    /// Carries the accepted stream `id` until both directions ended or it
    /// was reset.
    pub async fn run(&self, id: StreamId) -> Result<Moved, StreamEnd> {
        let _open = metrics().stream_guard();
        run_stream(&self.shared, id).await
    }

    /// No new streams; open ones finish (link rotation, drain).
    pub fn go_away(&self) {
        let mut state = self.shared.lock();
        state.link.go_away();
        state.going_away = true;
        changed(&mut state, &self.shared);
    }
}

/// When a relayed link first tries for a better path.
pub const UPGRADE_FIRST: Duration = Duration::from_secs(30);
/// The longest pause between such tries.
pub const UPGRADE_MAX: Duration = Duration::from_secs(300);

/// Most links a proxy keeps to one instance; each carries up to
/// `LinkConfig::max_streams` streams, so this bounds the streams too.
pub const MAX_LINKS_PER_INSTANCE: usize = 64;

/// A proxy's links: one per service instance, opened on first need and
/// reused by every stream; another only while every one is at its stream
/// limit; replaced once dead or going away.
pub struct Links {
    keypair: Keypair,
    config: LinkConfig,
    dial_timeout: Duration,
    /// Meetings through the registry, for services no direct path reaches.
    introducer: Option<Arc<Introducer>>,
    /// What path worked last, per service.
    memo: Arc<PathMemo>,
    /// Per instance, its links; the async lock makes concurrent first
    /// connections wait for one dial instead of dialing each.
    links: Mutex<HashMap<InstanceId, Arc<tokio::sync::Mutex<Vec<LinkHandle>>>>>,
}

/// Tells service processes apart: one identity may run as several processes
/// (one seed per host), each with its own link port and backend, so a link
/// belongs to a key *and* the addresses that process reported.
pub type InstanceId = (PublicKey, Vec<SocketAddr>);

fn instance_id(instance: &Instance) -> InstanceId {
    (instance.key, instance.addrs.clone())
}

impl Links {
    /// No links yet; each will be dialed as `keypair` within `dial_timeout`.
    pub fn new(keypair: Keypair, config: LinkConfig, dial_timeout: Duration) -> Links {
        Links {
            keypair,
            config,
            dial_timeout,
            introducer: None,
            memo: Arc::default(),
            links: Mutex::new(HashMap::new()),
        }
    }

    /// Also reaches services through meetings (punched or relayed paths).
    pub fn with_introducer(mut self, introducer: Introducer) -> Links {
        self.introducer = Some(Arc::new(introducer));
        self
    }

    /// Opens a stream for `client` on a link to `instance` and waits (at most
    /// `timeout`) for the service to accept it.
    pub async fn open(
        &self,
        instance: &Instance,
        client: Arc<TcpStream>,
        timeout: Duration,
    ) -> Result<(LinkHandle, StreamId), OpenError> {
        // A link found with room can fill up before our open lands: try once more.
        for _ in 0..2 {
            let link = self.get(instance).await?;
            match link.open(client.clone(), timeout).await {
                Err(OpenError::Link(proto::StreamError::StreamLimit)) => continue,
                opened => return opened.map(|id| (link, id)),
            }
        }
        Err(OpenError::Link(proto::StreamError::StreamLimit))
    }

    /// The least loaded usable link to `instance` with room for a stream,
    /// dialed now if there is none.
    async fn get(&self, instance: &Instance) -> Result<LinkHandle, HandshakeError> {
        let cell = lock(&self.links).entry(instance_id(instance)).or_default().clone();
        let mut links = cell.lock().await;
        // A dead or departing link keeps running for its streams, which hold it.
        links.retain(LinkHandle::is_usable);
        let least = links.iter().min_by_key(|l| l.stream_count());
        if let Some(link) = least.filter(|l| l.stream_count() < self.config.max_streams) {
            return Ok(link.clone());
        }
        if let Some(link) = least.filter(|_| links.len() >= MAX_LINKS_PER_INSTANCE) {
            return Ok(link.clone());
        }
        let last = self.memo.get(&instance.key);
        let introducer = self.introducer.as_deref();
        // Boxed: the path search is a large future, and every client
        // connection's task would otherwise carry its size for its whole
        // life (tens of KiB each with thousands of idle connections).
        let establish = reach::establish(instance, &self.keypair, self.dial_timeout, introducer, last, true);
        let reached = Box::pin(establish).await?;
        let link = announce(&self.memo, &self.config, instance, reached)?;
        links.push(link.clone());
        if link.path == Path::Relayed {
            self.upgrade_later(instance.clone(), link.clone(), cell.clone());
        }
        Ok(link)
    }

    /// A relayed link costs the registry and a detour: now and then (after
    /// [`UPGRADE_FIRST`], doubling to [`UPGRADE_MAX`]) a direct or punched
    /// path to the same instance is tried; once one is up, new streams take
    /// it and the relayed link goes away (its open streams finish on it).
    /// Stops once the relayed link is no longer usable.
    fn upgrade_later(
        &self,
        instance: Instance,
        relayed: LinkHandle,
        cell: Arc<tokio::sync::Mutex<Vec<LinkHandle>>>,
    ) {
        let (keypair, config, timeout) = (self.keypair.clone(), self.config.clone(), self.dial_timeout);
        let (introducer, memo) = (self.introducer.clone(), self.memo.clone());
        tokio::spawn(async move {
            let mut pause = UPGRADE_FIRST;
            loop {
                tokio::time::sleep(pause).await;
                if !relayed.is_usable() {
                    return;
                }
                let hint = Some(Path::Punched);
                match reach::establish(&instance, &keypair, timeout, introducer.as_deref(), hint, false).await
                {
                    Ok(reached) => {
                        let mut links = cell.lock().await;
                        if links.len() >= MAX_LINKS_PER_INSTANCE {
                            return;
                        }
                        let Ok(link) = announce(&memo, &config, &instance, reached) else { continue };
                        links.push(link);
                        relayed.go_away();
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(service = %instance.key, "still no path but the relay: {e}");
                        pause = (pause * 2).min(UPGRADE_MAX);
                    }
                }
            }
        });
    }

    /// Lets the links of instances not in `instances` go away: their open
    /// streams finish, new ones go elsewhere.
    pub fn retain(&self, instances: &[Instance]) {
        let gone: Vec<_> = {
            let keys: Vec<PublicKey> = instances.iter().map(|i| i.key).collect();
            self.memo.retain(&keys);
            let ids: Vec<InstanceId> = instances.iter().map(instance_id).collect();
            let mut links = lock(&self.links);
            let gone = links.keys().filter(|k| !ids.contains(k)).cloned().collect::<Vec<_>>();
            gone.iter().filter_map(|k| links.remove(k)).collect()
        };
        for cell in gone {
            // A dial in progress holds the lock; its link goes when its streams end.
            if let Ok(links) = cell.try_lock() {
                links.iter().for_each(LinkHandle::go_away);
            }
        }
    }

    /// Every link goes away (shutdown): open streams finish.
    pub fn go_away_all(&self) {
        self.retain(&[]);
    }
}

/// Starts the driver of a link that reached `instance`, remembers its path
/// and says which it took.
fn announce(
    memo: &PathMemo,
    config: &LinkConfig,
    instance: &Instance,
    reached: reach::Reached,
) -> Result<LinkHandle, HandshakeError> {
    let (path, addr) = (reached.path, reached.addr);
    let link = LinkHandle::start(reached.stream, reached.session, instance.key, addr, path, config.clone())?;
    memo.set(instance.key, path);
    tracing::info!(service = %instance.key, "link to {} via {path} {addr}", instance.key);
    emit(&Event::LinkUp { key: instance.key, path: path.name(), addr });
    Ok(link)
}

fn new_shared(side: Side, config: LinkConfig) -> Arc<Shared> {
    let state = State {
        link: Link::new(side, config, clock::now()),
        streams: HashMap::new(),
        opened: Vec::new(),
        closed: false,
        going_away: false,
        close_reason: None,
    };
    Arc::new(Shared { state: Mutex::new(state), work: Notify::new(), opened: Notify::new() })
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
    done?;
    Ok((stream, session))
}

/// What a service needs to connect the streams of its links.
#[derive(Debug, Clone)]
pub struct Backend {
    /// The backend's address.
    pub addr: SocketAddr,
    /// How long connecting to it may take before the stream is refused.
    pub connect_timeout: Duration,
    /// What the service's proxies may hold at once, shared by every link.
    pub budget: Arc<Budget>,
}

/// A service's side of a link: where streams go, when to stop taking them,
/// and the link's share of the budget.
struct ServiceSide {
    backend: Backend,
    drain: watch::Receiver<bool>,
    share: LinkShare,
}

/// Serves one link on the service side: the handshake (the proxy must ask for
/// a link, with a key `allow` admits), then streams to `backend` until the link ends or `drain` fires,
/// after which no new stream is accepted and open ones finish.
pub async fn serve(
    mut stream: TcpStream,
    local: &Keypair,
    backend: Backend,
    timeout: Duration,
    config: LinkConfig,
    drain: watch::Receiver<bool>,
    allow: &AllowList,
) -> Result<(), HandshakeError> {
    let _ = stream.set_nodelay(true);
    let mut session = Session::respond(clock::now(), local, Intent::Link, entropy(), timeout)?;
    let done = handshake(&mut stream, &mut session, timeout, &|key| allow.admits(key)).await;
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
    crate::serve::record_peer_key(&key);
    let share = backend.budget.link(key).inspect_err(|_| metrics().refuse(Refusal::Link))?;
    let (transport, leftover) = session.into_transport().ok_or(HandshakeError::ClosedEarly)?;
    let (sealer, opener) = transport.split();
    let shared = new_shared(Side::Service, config);
    drive(shared, stream, sealer, opener, leftover, Some(ServiceSide { backend, drain, share })).await;
    Ok(())
}

/// One link's driver: reader and writer, and on a service the stream tasks.
async fn drive(
    shared: Arc<Shared>,
    stream: TcpStream,
    sealer: Sealer,
    opener: Opener,
    leftover: Vec<u8>,
    mut service: Option<ServiceSide>,
) {
    cap_unsent(&stream);
    let (rd, wr) = stream.into_split();
    let mut streams = JoinSet::new();
    let reader = read_loop(&shared, rd, opener, leftover);
    let writer = write_loop(&shared, wr, sealer);
    tokio::pin!(reader, writer);
    let (mut reading, mut writing) = (true, true);
    while reading || writing {
        tokio::select! {
            () = &mut reader, if reading => reading = false,
            () = &mut writer, if writing => writing = false,
            () = shared.opened.notified(), if service.is_some() => {
                let opened = std::mem::take(&mut shared.lock().opened);
                if let Some(side) = &service {
                    for id in opened {
                        // A stream reset while its backend connect is under way
                        // leaves the link's count but not this task's: cap the
                        // tasks too, or OPEN+RESET floods would pile up connects.
                        let share = if streams.len() >= shared.lock().link.config().max_streams {
                            Err(OverBudget::Streams(streams.len()))
                        } else {
                            side.share.stream()
                        };
                        let share = match share {
                            Ok(share) => share,
                            Err(e) => {
                                tracing::debug!("stream refused: {e}");
                                let mut state = shared.lock();
                                let _ = state.link.refuse(id, Reason::STREAM_LIMIT);
                                changed(&mut state, &shared);
                                metrics().stream_opened("refused");
                                metrics().refuse(Refusal::Stream);
                                continue;
                            }
                        };
                        let span = tracing::info_span!("stream", id = id.get());
                        let work = connect_stream(shared.clone(), id, side.backend.clone(), share);
                        streams.spawn(work.instrument(span));
                    }
                }
            }
            () = draining(&mut service) => {
                let mut state = shared.lock();
                state.link.go_away();
                state.going_away = true;
                changed(&mut state, &shared);
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
    // The link is gone: its streams were reset and finish at once.
    while streams.join_next().await.is_some() {}
}

/// Sets [`NOTSENT_LOWAT`] on a link socket. Best effort: where the option is
/// missing the link still works, with more head-of-line delay.
fn cap_unsent(stream: &TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        tracing::debug!("TCP_NOTSENT_LOWAT not set on the link socket: {e}");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stream;
}

/// Resolves once the service starts to drain, then never again (the link
/// goes away once).
async fn draining(service: &mut Option<ServiceSide>) {
    match service {
        Some(ServiceSide { drain, .. }) if !*drain.borrow() => {
            if drain.wait_for(|d| *d).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        _ => std::future::pending().await,
    }
}

/// Service: connects the backend for stream `id`, accepts or refuses it, and
/// carries it.
async fn connect_stream(shared: Arc<Shared>, id: StreamId, backend: Backend, _share: StreamShare) {
    let connected = dial::connect(backend.addr, backend.connect_timeout).await;
    let socket = {
        let mut state = shared.lock();
        let socket = match connected {
            Ok(socket) => match state.link.accept(id) {
                Ok(()) => {
                    metrics().stream_opened("accepted");
                    let socket = Arc::new(socket);
                    state.streams.insert(id, Slot::new(socket.clone()));
                    Some(socket)
                }
                Err(e) => {
                    tracing::debug!("stream gone before its backend answered: {e}");
                    None
                }
            },
            Err(e) => {
                tracing::info!(backend = %backend.addr, "cannot reach the backend: {e}");
                let _ = state.link.refuse(id, Reason::REFUSED);
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

/// The stream's waiting: asks for turns to send when its socket is readable,
/// writes what its socket could not take at once, half-closes after the
/// peer's end, and closes with RST on a reset.
async fn run_stream(shared: &Shared, id: StreamId) -> Result<Moved, StreamEnd> {
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
                let _ = socket.set_zero_linger();
                return Err(StreamEnd::Reset(reason));
            }
            if slot.recv_end && slot.pending.is_empty() && !shut_write {
                shut_write = true;
                let _ = socket2::SockRef::from(&*socket).shutdown(std::net::Shutdown::Write);
            }
            if slot.sent_end && shut_write {
                let moved = slot.moved;
                streams.remove(&id);
                return Ok(moved);
            }
            let want_read = !slot.read_requested && !slot.sent_end && link.send_credit(id) > 0;
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

/// Link socket in, frames to the state machine, data to stream sockets.
async fn read_loop(shared: &Shared, rd: OwnedReadHalf, mut opener: Opener, leftover: Vec<u8>) {
    let mut decoder = FrameDecoder::new();
    let mut pending = leftover.as_slice();
    loop {
        while let Some(body) = decoder.next_frame() {
            let Ok(plain) = opener.open_in_place(body) else {
                tracing::info!("link data failed to authenticate");
                close(shared);
                return;
            };
            let mut state = shared.lock();
            let State { link, streams, .. } = &mut *state;
            match link.handle_frame(clock::now(), plain) {
                Ok(Some(Incoming::Data { id, bytes })) => deliver(link, streams, id, bytes),
                Ok(_) => {}
                Err(e) => tracing::info!("link ended: {e}"),
            }
            changed(&mut state, shared);
            if state.closed {
                return;
            }
        }
        if !pending.is_empty() {
            let taken = decoder.push(pending);
            pending = pending.get(taken..).unwrap_or_default();
            continue;
        }
        let deadline = shared.lock().link.poll_timeout().map(tokio::time::Instant::from_std);
        // An idle link holds no read buffer (a partial frame must stay).
        let releasable = decoder.holds_buffer() && decoder.buffered() == 0;
        tokio::select! {
            () = tokio::time::sleep(IDLE_RELEASE), if releasable => decoder.release(),
            ready = rd.readable() => {
                if ready.is_err() {
                    close(shared);
                    return;
                }
                match rd.try_read(decoder.spare_mut()) {
                    Ok(0) => {
                        close(shared);
                        return;
                    }
                    Ok(n) => decoder.commit(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        close(shared);
                        return;
                    }
                }
            }
            () = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                let mut state = shared.lock();
                state.link.handle_timeout(clock::now());
                changed(&mut state, shared);
                if state.closed {
                    return;
                }
            }
        }
    }
}

/// Tells the link its transport is gone; every stream is reset.
fn close(shared: &Shared) {
    let mut state = shared.lock();
    state.link.handle_closed();
    changed(&mut state, shared);
    state.closed = true;
}

/// Bytes for stream `id`: straight to its socket if it takes them, the rest
/// kept (bounded by the stream's window) for the stream task to write.
fn deliver(link: &mut Link, streams: &mut HashMap<StreamId, Slot>, id: StreamId, bytes: &[u8]) {
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

/// The writer's sealed frames waiting for one write. Its buffer is zero-filled
/// only when it grows and is reused after that: zero-filling each frame's
/// slot before reading a socket into it was a pass over every byte sent, 7 %
/// of a proxy's CPU during an upload.
struct Batch {
    buf: Vec<u8>,
    /// Bytes of `buf` in use.
    len: usize,
}

impl Batch {
    const fn new() -> Batch {
        Batch { buf: Vec::new(), len: 0 }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }

    /// `n` more bytes at the end, for the caller to fill (they hold whatever
    /// an earlier frame left there).
    fn extend(&mut self, n: usize) -> &mut [u8] {
        let (start, end) = (self.len, self.len + n);
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.len = end;
        self.buf.get_mut(start..end).unwrap_or_default()
    }

    /// The bytes from `start` on, e.g. the frame whose room `extend` made.
    fn from(&mut self, start: usize) -> &mut [u8] {
        self.buf.get_mut(start..self.len).unwrap_or_default()
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Gives the memory back (an idle link holds none).
    fn release(&mut self) {
        *self = Batch::new();
    }

    fn holds_buffer(&self) -> bool {
        self.buf.capacity() > 0
    }
}

/// Frames out: control frames from the state machine, and data read from the
/// streams whose turn it is, sealed in place and written in batches.
async fn write_loop(shared: &Shared, mut wr: OwnedWriteHalf, mut sealer: Sealer) {
    use tokio::io::AsyncWriteExt;
    let mut batch = Batch::new();
    let mut plain = Vec::new();
    // A peer that stops reading must not hold the link for ever.
    let stuck_after = shared.lock().link.config().dead_after;
    loop {
        let closed = fill(shared, &mut sealer, &mut batch, &mut plain);
        if batch.len() > 0 {
            let written = tokio::time::timeout(stuck_after, wr.write_all(batch.bytes())).await;
            if !matches!(written, Ok(Ok(()))) {
                close(shared);
                return;
            }
            batch.truncate(0);
            continue;
        }
        if closed {
            let _ = wr.shutdown().await;
            return;
        }
        if batch.holds_buffer() {
            if tokio::time::timeout(IDLE_RELEASE, shared.work.notified()).await.is_err() {
                batch.release();
            }
        } else {
            shared.work.notified().await;
        }
    }
}

/// Gathers what is ready to send into `batch`, sealed. Returns whether the
/// link is closed (nothing more will come).
fn fill(shared: &Shared, sealer: &mut Sealer, batch: &mut Batch, plain: &mut Vec<u8>) -> bool {
    let mut state = shared.lock();
    let State { link, streams, closed, .. } = &mut *state;
    let mut wakes = Vec::new();
    loop {
        let mut progressed = false;
        while batch.len() < BATCH && link.poll_transmit(plain) {
            let start = batch.len();
            let frame = batch.extend(frame::HEADER_LEN + plain.len() + TAG_LEN);
            if let Some(room) = frame.get_mut(frame::HEADER_LEN..frame::HEADER_LEN + plain.len()) {
                room.copy_from_slice(plain);
            }
            if sealer.seal_frame(frame, plain.len()).is_err() {
                // A control frame lost (a credit update, an end, a reset)
                // would leave the peer waiting for ever: end the link.
                batch.truncate(start);
                tracing::error!("cannot seal a link frame: closing the link");
                link.handle_closed();
                *closed = true;
                plain.clear();
                break;
            }
            plain.clear();
            progressed = true;
        }
        while batch.len() < BATCH {
            let Some((id, credit)) = link.next_send() else { break };
            progressed = true;
            let Some(slot) = streams.get_mut(&id) else { continue };
            let start = batch.len();
            let body = frame::HEADER_LEN + proto::HEADER_LEN;
            let frame = batch.extend(body + credit + TAG_LEN);
            let read = slot.socket.try_read(frame.get_mut(body..body + credit).unwrap_or_default());
            match read {
                Ok(0) => {
                    batch.truncate(start);
                    slot.read_requested = false;
                    slot.sent_end = true;
                    let _ = link.end(id);
                    wakes.push(slot.wake.clone());
                }
                Ok(n) => {
                    let frame = batch.from(start);
                    let header = frame.get_mut(frame::HEADER_LEN..).unwrap_or_default();
                    let sealed = link
                        .data_header(id, n, header)
                        .ok()
                        .and_then(|_| sealer.seal_frame(frame, proto::HEADER_LEN + n).ok());
                    match sealed {
                        Some(len) => {
                            batch.truncate(start + len);
                            slot.moved.sent += n as u64;
                            metrics().stream_sent.inc_by(n as u64);
                            // The socket may hold more: back of the queue.
                            let _ = link.want_send(id);
                        }
                        None => {
                            // The bytes left the socket and cannot be sent:
                            // the stream is cut, and says so with a reset.
                            batch.truncate(start);
                            tracing::error!("cannot frame data for stream {id}: resetting it");
                            let _ = link.reset(id, Reason::CANCELLED);
                            slot.reset = Some(Reason::CANCELLED);
                            wakes.push(slot.wake.clone());
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    batch.truncate(start);
                    slot.read_requested = false;
                    wakes.push(slot.wake.clone());
                }
                Err(_) => {
                    batch.truncate(start);
                    let _ = link.reset(id, Reason::CANCELLED);
                    slot.reset = Some(Reason::CANCELLED);
                    wakes.push(slot.wake.clone());
                }
            }
        }
        if !progressed || batch.len() >= BATCH {
            break;
        }
    }
    let closed = *closed;
    dispatch(&mut state, shared);
    drop(state);
    for wake in wakes {
        wake.notify_one();
    }
    closed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_sends_only_what_it_was_given_and_reuses_its_memory() {
        let mut batch = Batch::new();
        batch.extend(3).copy_from_slice(b"abc");
        let big = batch.extend(1000);
        big.fill(7);
        assert_eq!(batch.len(), 1003);
        // A frame given up (a read that would block) leaves nothing behind.
        batch.truncate(3);
        assert_eq!(batch.bytes(), b"abc");
        // Room made again holds the old bytes, but only what is filled and
        // kept is sent.
        let room = batch.extend(10);
        room.get_mut(..2).unwrap().copy_from_slice(b"de");
        batch.truncate(5);
        assert_eq!(batch.bytes(), b"abcde");
        assert_eq!(batch.from(3), b"de");
        let capacity = batch.buf.capacity();
        batch.truncate(0);
        batch.extend(500);
        assert_eq!(batch.buf.capacity(), capacity, "no new allocation");
        batch.release();
        assert!(!batch.holds_buffer());
        assert!(batch.bytes().is_empty());
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[tokio::test]
    async fn link_sockets_cap_their_unsent_bytes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let before = socket2::SockRef::from(&stream).tcp_notsent_lowat().unwrap();
        cap_unsent(&stream);
        let after = socket2::SockRef::from(&stream).tcp_notsent_lowat().unwrap();
        assert_ne!(before, NOTSENT_LOWAT, "the kernel's default is not the cap");
        assert_eq!(after, NOTSENT_LOWAT);
    }
}
