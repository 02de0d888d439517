//! Serves the registry state machine on a TCP listener, and on the same
//! port the meet connections it arranged ([`crate::meet`]): a connection's
//! first frame says which it is.
//!
//! One task owns the [`Registry`]; each connection has a reader task feeding
//! it bytes through a bounded channel and a writer task draining its queue.
//! The writer reports what it wrote back to the registry, which alone decides
//! when a peer is too slow (bytes handed out and not yet written, capped by
//! `RegistryConfig::max_queued`): one slow-peer policy, in the state machine,
//! so the queue here holds at most that many bytes. Every connection task
//! belongs to the server's `JoinSet` and ends with it.
//!
//! The loop also keeps the registry's gauges ([`crate::metrics`]) and its
//! readiness, and, for `--http`, publishes a [`RegistryView`] snapshot
//! after changes, at most every [`VIEW_EVERY`]: the page reads snapshots,
//! never the state machine.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use seaport_proto::meet::MeetSide;
use seaport_proto::registry::Arrival;
use seaport_proto::registry::{CloseReason, Full, Registry, RegistryEvent, SessionId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tracing::Instrument;

use crate::identity::entropy;
use crate::limit::{Limit, Over, Share};
use crate::meet::{Greeting, RelayCounters, greet, pair};
use crate::metrics::{Refusal, metrics, readiness};
use crate::page::{InstanceView, RegistryView, SessionView};

/// How the registry relays for the meetings it arranged, and how long and
/// how many new connections may take to say what they are.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Splice the two sides of a meeting (`--no-relay` turns it off: then
    /// meetings only exchange addresses for punching).
    pub enabled: bool,
    /// Most relays at once (`--max-relays`); a meeting beyond it is not relayed.
    pub max: usize,
    /// Most relays at once for proxies at one address: one host cannot
    /// take every relay.
    pub per_source: usize,
    /// A relay idle this long ends.
    pub idle: Duration,
    /// How long a new connection may take to send its first frame.
    pub greeting_timeout: Duration,
    /// Most new connections from one source address waiting to send their
    /// first frame (the registry's own handshake pool has the same cap per
    /// source, `RegistryConfig::max_handshakes_per_source`).
    pub greeting_per_source: usize,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            enabled: true,
            max: 64,
            per_source: 8,
            idle: crate::meet::RELAY_IDLE,
            greeting_timeout: Duration::from_secs(10),
            greeting_per_source: 16,
        }
    }
}

/// Read size per connection.
const READ_CHUNK: usize = 8 * 1024;
/// How long a closing connection may take to write its last bytes.
const LINGER: Duration = Duration::from_secs(2);
/// A write stuck this long means the peer stopped reading: give up on it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

enum Input {
    Data(SessionId, Vec<u8>),
    Written(SessionId, usize),
    Closed(SessionId),
}

struct Connection {
    /// Unbounded in count, bounded in bytes: the registry drops a peer whose
    /// unwritten bytes pass its `max_queued`.
    queue: mpsc::UnboundedSender<Vec<u8>>,
    reader: AbortHandle,
}

/// Most new connections waiting to send their first frame; more wait in
/// the listener's backlog.
const MAX_GREETING: usize = 1024;
/// Most meetings paired at once, relayed or not (each holds two sockets).
const MAX_PAIRS: usize = 1024;
/// How long a meeting that is not relayed keeps its two connections (their
/// NAT mappings help the punch): the sides punch for 5 s.
const UNRELAYED_HOLD: Duration = Duration::from_secs(10);

/// Why a meeting is not relayed.
#[derive(Debug, thiserror::Error)]
enum RelayRefusal {
    #[error("relaying is off (--no-relay)")]
    Off,
    #[error("{0} relays open (--max-relays)")]
    Full(usize),
    #[error("{1} relays open for proxies at {0}")]
    Source(IpAddr, usize),
}

/// A relay's place among `--max-relays`, and among those of its proxy's address.
fn take_relay(relays: &Arc<Limit<IpAddr>>, source: IpAddr) -> Result<Share<IpAddr>, RelayRefusal> {
    relays.take(source).map_err(|over| match over {
        Over::All(n) => RelayRefusal::Full(n),
        Over::Key(n) => RelayRefusal::Source(source, n),
    })
}

/// Most often a new [`RegistryView`] is published.
pub const VIEW_EVERY: Duration = Duration::from_millis(250);
/// How often the gauges that change without an event (watches, lookups)
/// and the readiness are refreshed.
const GAUGES_EVERY: Duration = Duration::from_secs(1);
/// The readiness condition the registry sets.
pub const READY_SESSIONS: &str = "sessions";

/// Times the registry learned of things, for the page.
#[derive(Default)]
struct Times {
    /// When each session connected.
    sessions: HashMap<SessionId, SystemTime>,
    /// When each registration was first seen.
    registrations: HashMap<(SessionId, u32), SystemTime>,
}

/// A change to make to the running registry from outside its task (a
/// reloaded access list, say); what it makes the registry send goes out as
/// after any input.
pub type Command = Box<dyn FnOnce(&mut Registry) + Send>;

/// Serves `registry` on `listener` until `stop` turns true, relaying as
/// `relay` says and applying each of `commands` as it comes; `on_event`
/// sees every registry event (for logs). The relays' byte counts go to
/// `counters`. With `view`, publishes snapshots of what the registry holds
/// for the page.
#[allow(clippy::too_many_arguments)] // each is one distinct channel to the outside
pub async fn serve(
    listener: TcpListener,
    mut registry: Registry,
    relay: RelayOptions,
    counters: Arc<RelayCounters>,
    mut stop: watch::Receiver<bool>,
    view: Option<watch::Sender<Arc<RegistryView>>>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut on_event: impl FnMut(&RegistryEvent),
) {
    let m = metrics();
    let mut times = Times::default();
    // Whether the view is behind the registry, and when it may be next published.
    let mut stale = view.is_some();
    let mut next_view = tokio::time::Instant::now();
    let mut gauges = tokio::time::interval(GAUGES_EVERY);
    gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The session limit, once reached: not ready until below it again.
    let mut full_at: Option<usize> = None;
    registry.mix_entropy(entropy());
    let (input_tx, mut input_rx) = mpsc::channel::<Input>(1024);
    let mut connections: HashMap<SessionId, Connection> = HashMap::new();
    let mut tasks = JoinSet::new();
    // New connections until their first frame tells what they are.
    let mut greeting = JoinSet::new();
    // First sides of meetings, waiting for the second.
    let mut waiting: HashMap<u64, oneshot::Sender<(TcpStream, SocketAddr)>> = HashMap::new();
    let relays = Limit::new(relay.max, relay.per_source);
    let pairs = Arc::new(Semaphore::new(MAX_PAIRS));
    // Connections that have not spoken yet, per source address, to cap each
    // source's share (their total is capped by MAX_GREETING).
    let greeting_from = Limit::new(usize::MAX, relay.greeting_per_source);
    let mut refusals = Refusals::default();
    let mut buf = Vec::new();
    loop {
        let deadline = registry.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            accepted = listener.accept(), if greeting.len() < MAX_GREETING => match accepted {
                Ok((mut stream, peer)) => {
                    let share = match greeting_from.take(source(peer.ip())) {
                        Ok(share) => share,
                        Err(Over::All(from) | Over::Key(from)) => {
                            // "Busy", as a full registry says: not a wrong key.
                            let _ = stream.try_write(&[0, 0]);
                            refusals.note(&format!("{} has {from} connections that said nothing yet", peer.ip()));
                            m.refuse(Refusal::HandshakesFull);
                            continue;
                        }
                    };
                    let timeout = relay.greeting_timeout;
                    greeting.spawn(async move {
                        let greeted = greet(&mut stream, timeout).await;
                        drop(share);
                        (greeted, stream, peer)
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(Ok((greeted, stream, peer))) = greeting.join_next(), if !greeting.is_empty() => {
                match greeted {
                Ok(Greeting::Session(first)) => match registry.accept(crate::clock::now(), peer, entropy()) {
                    Ok(id) => {
                        times.sessions.insert(id, SystemTime::now());
                        stale = view.is_some();
                        let _ = stream.set_nodelay(true);
                        let (rd, wr) = stream.into_split();
                        let (queue, rx) = mpsc::unbounded_channel();
                        let span = tracing::info_span!("session", id = id.0, %peer);
                        let reader =
                            tasks.spawn(read_loop(id, rd, input_tx.clone()).instrument(span.clone()));
                        tasks.spawn(write_loop(id, wr, rx, input_tx.clone()).instrument(span));
                        connections.insert(id, Connection { queue, reader });
                        registry.handle_input(crate::clock::now(), id, &first);
                    }
                    Err(full) => {
                        // An empty frame tells the client "full, not a wrong
                        // key" (no Noise message is empty); best effort only.
                        let _ = stream.try_write(&[0, 0]);
                        refusals.note(&full.to_string());
                        // Only the session limit makes the registry unready:
                        // the handshake limits refuse a flood, not everyone.
                        if let Full::Sessions(n) = full {
                            m.refuse(Refusal::SessionsFull);
                            full_at = Some(n);
                            readiness().set(READY_SESSIONS, Some(format!("{full} (--max-sessions): refusing new ones")));
                        } else {
                            m.refuse(Refusal::HandshakesFull);
                        }
                    }
                },
                Ok(Greeting::Meet(hello)) => {
                // A relay forwards small frames (link handshakes, stream
                // opens) at once: Nagle would hold them for a delayed ACK.
                let _ = stream.set_nodelay(true);
                match registry.arrive(crate::clock::now(), hello.ticket, hello.side, peer.ip()) {
                    Ok(Arrival::First { meeting, until }) => {
                        // Every pair, relayed or not, holds two sockets: all
                        // of them together are capped.
                        let Ok(slot) = pairs.clone().try_acquire_owned() else {
                            refusals.note(&format!("{MAX_PAIRS} meetings are under way"));
                            metrics().refuse(Refusal::MeetingsFull);
                            continue;
                        };
                        let (tx, rx) = oneshot::channel();
                        waiting.retain(|_, tx| !tx.is_closed());
                        waiting.insert(meeting, tx);
                        let (relay, relays, counters) = (relay.clone(), relays.clone(), counters.clone());
                        let span = tracing::info_span!("meeting", meeting);
                        tasks.spawn(async move {
                            let _slot = slot;
                            let until = tokio::time::Instant::from_std(until);
                            let Ok(Ok(other)) = tokio::time::timeout_at(until, rx).await else {
                                tracing::debug!("the other side did not come");
                                return;
                            };
                            let (proxy, service) = match hello.side {
                                MeetSide::Proxy => ((stream, peer), other),
                                MeetSide::Service => (other, (stream, peer)),
                            };
                            let share = if relay.enabled { take_relay(&relays, proxy.1.ip()) } else { Err(RelayRefusal::Off) };
                            if let Err(why) = &share {
                                tracing::info!("meeting not relayed: {why}");
                                if !matches!(why, RelayRefusal::Off) {
                                    metrics().refuse(Refusal::RelaysFull);
                                }
                            }
                            let hold = if share.is_ok() { relay.idle } else { UNRELAYED_HOLD };
                            if let Err(e) = pair(proxy, service, share.is_ok(), hold, counters).await {
                                tracing::debug!("meeting ended: {e}");
                            }
                            drop(share);
                        }.instrument(span));
                    }
                    Ok(Arrival::Second { meeting }) => {
                        if let Some(tx) = waiting.remove(&meeting) {
                            let _ = tx.send((stream, peer));
                        }
                    }
                    Err(e) => tracing::debug!(%peer, "meet connection refused: {e}"),
                }
                }
                Err(e) => tracing::debug!(%peer, "connection closed before its first frame: {e}"),
                }
            },
            Some(input) = input_rx.recv() => match input {
                Input::Data(id, bytes) => registry.handle_input(crate::clock::now(), id, &bytes),
                Input::Written(id, n) => registry.handle_written(id, n),
                Input::Closed(id) => registry.handle_closed(id),
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            Some(command) = commands.recv() => command(&mut registry),
            () = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                registry.handle_timeout(crate::clock::now());
            }
            _ = gauges.tick() => {
                // Every closed session should have said so; this bounds the
                // map even if one did not.
                if times.sessions.len() > registry.session_count() {
                    let live: HashSet<SessionId> = registry.sessions().map(|(id, _, _)| id).collect();
                    times.sessions.retain(|id, _| live.contains(id));
                }
                m.watches.set(gauge(registry.directory().watch_total()));
                let lookups = registry.lookups_answered();
                m.lookups.inc_by(lookups.saturating_sub(m.lookups.get()));
                let established = || registry.sessions().filter(|(_, key, _)| key.is_some()).count();
                if full_at.is_some_and(|n| established() < n) {
                    full_at = None;
                    readiness().set(READY_SESSIONS, None);
                }
            }
            () = tokio::time::sleep_until(next_view), if stale => {
                if let Some(view) = &view {
                    // Read apart: a borrow held across send_replace would deadlock.
                    let started = view.borrow().started;
                    view.send_replace(Arc::new(snapshot(&registry, &mut times, started)));
                }
                stale = false;
                next_view = tokio::time::Instant::now() + VIEW_EVERY;
            }
            _ = stop.changed() => return,
        }
        loop {
            let mut progressed = false;
            while let Some(id) = registry.poll_transmit(&mut buf) {
                progressed = true;
                let bytes = std::mem::take(&mut buf);
                if let Some(conn) = connections.get(&id) {
                    // A send fails only once the writer gave up, which it reports.
                    let _ = conn.queue.send(bytes);
                }
            }
            while let Some(event) = registry.poll_event() {
                progressed = true;
                if let RegistryEvent::SessionClosed { id, .. } = &event {
                    // Dropping the queue lets the writer finish what is queued, then close.
                    if let Some(conn) = connections.remove(id) {
                        conn.reader.abort();
                    }
                    times.sessions.remove(id);
                }
                count(&event);
                stale = view.is_some();
                on_event(&event);
            }
            if !progressed {
                break;
            }
        }
        m.sessions.set(gauge(registry.session_count()));
        m.instances.set(gauge(registry.instance_count()));
    }
}

/// Who a connection counts against: its IPv4 address, or its IPv6 /64 (one
/// host or site is usually given a whole /64).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let [a, b, c, d, ..] = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
        }
    }
}

/// Refused connections, logged at most once per [`REFUSAL_LOG_EVERY`]: a
/// flood must not turn into a flood of log lines.
#[derive(Default)]
struct Refusals {
    last_log: Option<tokio::time::Instant>,
    since: usize,
}

/// How often refusals are logged, at most.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl Refusals {
    fn note(&mut self, why: &str) {
        self.since += 1;
        let now = tokio::time::Instant::now();
        if self.last_log.is_none_or(|at| now.duration_since(at) >= REFUSAL_LOG_EVERY) {
            tracing::warn!(
                "refused {} connection(s) in the last {REFUSAL_LOG_EVERY:?}, the last because {why}",
                self.since
            );
            self.last_log = Some(now);
            self.since = 0;
        }
    }
}

/// A count as a gauge value.
fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Counts a registry event in the metrics.
fn count(event: &RegistryEvent) {
    let m = metrics();
    let registrations = |what| m.registrations.get_or_create(&crate::metrics::label("event", what)).inc();
    match event {
        RegistryEvent::SessionOpened { .. } => {
            m.sessions_opened.inc();
            m.handshake(true);
        }
        RegistryEvent::SessionClosed { peer, reason, .. } => {
            m.sessions_closed.inc();
            if peer.is_none() {
                m.handshake(false);
            }
            // Refused once its handshake was done: the limit was reached
            // between its accept and its completion.
            if matches!(reason, CloseReason::Full(_)) {
                m.refuse(Refusal::SessionsFull);
            }
        }
        RegistryEvent::Registered { .. } => {
            registrations("registered");
        }
        RegistryEvent::Unregistered { .. } => {
            registrations("unregistered");
        }
        _ => {}
    }
}

/// What `registry` holds now, with the times `times` remembers (and keeps
/// to what still exists).
fn snapshot(registry: &Registry, times: &mut Times, started: SystemTime) -> RegistryView {
    let now = SystemTime::now();
    let directory = registry.directory();
    let mut seen = HashSet::new();
    let instances = directory
        .instances()
        .map(|(owned, instance)| {
            seen.insert(owned);
            InstanceView {
                key: instance.key,
                role: instance.role.clone(),
                addrs: instance.addrs.clone(),
                connected: times.sessions.get(&owned.0).copied(),
                registered: *times.registrations.entry(owned).or_insert(now),
            }
        })
        .collect();
    times.registrations.retain(|owned, _| seen.contains(owned));
    let mut sessions: Vec<SessionView> = registry
        .sessions()
        .map(|(id, key, addr)| SessionView {
            key,
            addr,
            since: times.sessions.get(&id).copied(),
            registrations: directory.registration_count(id),
            watches: directory.watch_count(id),
        })
        .collect();
    sessions.sort_by_key(|s| s.since);
    RegistryView { key: registry.public_key(), started, instances, sessions }
}

async fn read_loop(id: SessionId, mut rd: OwnedReadHalf, tx: mpsc::Sender<Input>) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match rd.read(&mut buf).await {
            Ok(n) if n > 0 => {
                if tx.send(Input::Data(id, buf.get(..n).unwrap_or_default().to_vec())).await.is_err() {
                    return;
                }
            }
            _ => {
                let _ = tx.send(Input::Closed(id)).await;
                return;
            }
        }
    }
}

/// Writes what the registry queued and reports each write, so the registry
/// can tell a slow peer; a write stuck for [`WRITE_TIMEOUT`] ends the session.
async fn write_loop(
    id: SessionId,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    tx: mpsc::Sender<Input>,
) {
    while let Some(bytes) = rx.recv().await {
        if !matches!(tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&bytes)).await, Ok(Ok(()))) {
            tracing::info!("peer stopped reading; closing");
            let _ = tx.send(Input::Closed(id)).await;
            return;
        }
        if tx.send(Input::Written(id, bytes.len())).await.is_err() {
            return;
        }
    }
    let _ = tokio::time::timeout(LINGER, wr.shutdown()).await;
}
