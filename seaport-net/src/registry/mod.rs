//! Serves the registry state machine on a TCP listener, and on the same
//! port the meet connections it arranged ([`crate::meet`]): a connection's
//! first frame says which it is.
//!
//! [`RegistryServer`] is the driver, in the manner of quinn's
//! `EndpointDriver`: one task owns it and the [`Registry`] in it, waits for
//! the next event (a new connection, a first frame, a session's bytes, a
//! timer, a command) and hands it to one method per event; after each, it
//! sends what the registry queued and reports what it said.
//!
//! # Files
//! - `connection`: a session's reader and writer tasks.
//! - `meetings`: pairing the two sides of a meeting, and relaying them.
//! - `view`: snapshots of what the registry holds, for the page.
//!
//! # Invariants
//! - Every connection task belongs to the server's `JoinSet` and ends with it.
//! - Every queue is capped: new connections waiting to speak
//!   (`MAX_GREETING`, and per source), session input (a bounded channel),
//!   session output (the registry's `max_queued`), meetings (`MAX_PAIRS`).
//! - The registry's gauges ([`crate::metrics`]) and its readiness are kept
//!   here; the page reads snapshots, never the state machine.

mod connection;
mod meetings;
mod view;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use seaport_proto::meet::MeetHello;
use seaport_proto::registry::{Arrival, CloseReason, Full, Registry, RegistryEvent, SessionId, Source};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use self::connection::{Connection, Input};
pub use self::meetings::RelayOptions;
use self::meetings::{MAX_PAIRS, Meetings, PairsFull};
pub use self::view::VIEW_EVERY;
use self::view::{Times, ViewPublisher};
use crate::clock;
use crate::identity::entropy;
use crate::limit::{Limit, Over};
use crate::meet::{Greeting, RelayCounters, greet};
use crate::metrics::{Refusal, label, metrics, readiness};
use crate::page::RegistryView;

/// Most new connections waiting to send their first frame; more wait in
/// the listener's backlog.
const MAX_GREETING: usize = 1024;
/// How often the gauges that change without an event (watches, lookups)
/// and the readiness are refreshed.
const GAUGES_EVERY: Duration = Duration::from_secs(1);
/// The readiness condition the registry sets.
pub const READY_SESSIONS: &str = "sessions";
/// Capacity of the channel that carries every session's input to the server.
const INPUT_QUEUE: usize = 1024;

/// A change to make to the running registry from outside its task (a
/// reloaded access list, say); what it makes the registry send goes out as
/// after any input.
pub type Command = Box<dyn FnOnce(&mut Registry) + Send>;

/// What a new connection's first frame said, with the connection.
type Greeted = (std::io::Result<Greeting>, TcpStream, SocketAddr);

/// Serves a [`Registry`]: build it with [`RegistryServer::new`], add what
/// the binary needs, then [`RegistryServer::run`] it on a listener.
pub struct RegistryServer {
    registry: Registry,
    connections: HashMap<SessionId, Connection>,
    /// Every connection's and meeting's task.
    tasks: JoinSet<()>,
    input_tx: mpsc::Sender<Input>,
    input: mpsc::Receiver<Input>,
    /// New connections until their first frame tells what they are.
    greeting: JoinSet<Greeted>,
    /// Connections that have not spoken yet, per source address, to cap
    /// each source's share (their total is capped by `MAX_GREETING`).
    greeting_from: Arc<Limit<Source>>,
    greeting_timeout: Duration,
    meetings: Meetings,
    commands: Option<mpsc::UnboundedReceiver<Command>>,
    on_event: Box<dyn FnMut(&RegistryEvent) + Send>,
    view: Option<ViewPublisher>,
    times: Times,
    /// The session limit, once reached: not ready until below it again.
    full_at: Option<usize>,
    refusals: Refusals,
    /// What the registry has to send, one session's bytes at a time.
    buf: Vec<u8>,
}

impl RegistryServer {
    /// A server for `registry`, relaying as `relay` says, the relays' byte
    /// counts going to `counters`.
    pub fn new(mut registry: Registry, relay: RelayOptions, counters: Arc<RelayCounters>) -> RegistryServer {
        registry.mix_entropy(entropy());
        let (input_tx, input) = mpsc::channel(INPUT_QUEUE);
        RegistryServer {
            registry,
            connections: HashMap::new(),
            tasks: JoinSet::new(),
            input_tx,
            input,
            greeting: JoinSet::new(),
            greeting_from: Limit::new(usize::MAX, relay.greeting_per_source),
            greeting_timeout: relay.greeting_timeout,
            meetings: Meetings::new(&relay, counters),
            commands: None,
            on_event: Box::new(|_| {}),
            view: None,
            times: Times::default(),
            full_at: None,
            refusals: Refusals::default(),
            buf: Vec::new(),
        }
    }

    /// Also applies each of `commands` as it comes.
    pub fn with_commands(mut self, commands: mpsc::UnboundedReceiver<Command>) -> RegistryServer {
        self.commands = Some(commands);
        self
    }

    /// Also publishes snapshots of what the registry holds, for the page.
    pub fn with_view(mut self, view: watch::Sender<Arc<RegistryView>>) -> RegistryServer {
        self.view = Some(ViewPublisher::new(view));
        self
    }

    /// `on_event` sees every registry event (for logs).
    pub fn on_event(mut self, on_event: impl FnMut(&RegistryEvent) + Send + 'static) -> RegistryServer {
        self.on_event = Box::new(on_event);
        self
    }

    /// Serves on `listener` until `stop` turns true.
    pub async fn run(mut self, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        let mut gauges = tokio::time::interval(GAUGES_EVERY);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.registry.poll_timeout().map(tokio::time::Instant::from_std);
            let view_due = self.view.as_ref().and_then(ViewPublisher::due);
            tokio::select! {
                accepted = listener.accept(), if self.greeting.len() < MAX_GREETING => {
                    self.handle_accept(accepted).await;
                }
                Some(Ok(greeted)) = self.greeting.join_next(), if !self.greeting.is_empty() => {
                    self.handle_greeting(greeted);
                }
                Some(input) = self.input.recv() => self.handle_input(input),
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
                Some(command) = next_command(&mut self.commands) => self.handle_command(command),
                () = sleep_until(deadline) => self.registry.handle_timeout(clock::now()),
                _ = gauges.tick() => self.refresh_gauges(),
                () = sleep_until(view_due) => self.publish_view(),
                _ = stop.changed() => return,
            }
            self.flush();
        }
    }

    /// A connection came in: it has [`RelayOptions::greeting_timeout`] to say
    /// what it is, if its source may have another such connection.
    async fn handle_accept(&mut self, accepted: std::io::Result<(TcpStream, SocketAddr)>) {
        let (mut stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
        };
        let share = match self.greeting_from.take(Source::of(peer.ip())) {
            Ok(share) => share,
            Err(Over::All(from) | Over::Key(from)) => {
                // "Busy", as a full registry says: not a wrong key.
                let _ = stream.try_write(&[0, 0]);
                self.refusals.note(&format!("{} has {from} connections that said nothing yet", peer.ip()));
                metrics().refuse(Refusal::HandshakesFull);
                return;
            }
        };
        let timeout = self.greeting_timeout;
        self.greeting.spawn(async move {
            let greeted = greet(&mut stream, timeout).await;
            drop(share);
            (greeted, stream, peer)
        });
    }

    /// A new connection's first frame arrived (or did not, in time).
    fn handle_greeting(&mut self, (greeted, stream, peer): Greeted) {
        match greeted {
            Ok(Greeting::Session(first)) => self.handle_session(&first, stream, peer),
            Ok(Greeting::Meet(hello)) => self.handle_meet(hello, stream, peer),
            Err(e) => tracing::debug!(%peer, "connection closed before its first frame: {e}"),
        }
    }

    /// A control session's handshake began with `first`.
    fn handle_session(&mut self, first: &[u8], stream: TcpStream, peer: SocketAddr) {
        match self.registry.accept(clock::now(), peer, entropy()) {
            Ok(id) => {
                self.times.sessions.insert(id, SystemTime::now());
                self.view_stale();
                let connection = Connection::start(id, stream, peer, &self.input_tx, &mut self.tasks);
                self.connections.insert(id, connection);
                self.registry.handle_input(clock::now(), id, first);
            }
            Err(full) => {
                // An empty frame tells the client "full, not a wrong
                // key" (no Noise message is empty); best effort only.
                let _ = stream.try_write(&[0, 0]);
                self.refusals.note(&full.to_string());
                // Only the session limit makes the registry unready:
                // the handshake limits refuse a flood, not everyone.
                if let Full::Sessions(n) = full {
                    metrics().refuse(Refusal::SessionsFull);
                    self.full_at = Some(n);
                    readiness()
                        .set(READY_SESSIONS, Some(format!("{full} (--max-sessions): refusing new ones")));
                } else {
                    metrics().refuse(Refusal::HandshakesFull);
                }
            }
        }
    }

    /// A meet connection said `hello`: the first side of its meeting waits,
    /// the second joins it.
    fn handle_meet(&mut self, hello: MeetHello, stream: TcpStream, peer: SocketAddr) {
        // A relay forwards small frames (link handshakes, stream
        // opens) at once: Nagle would hold them for a delayed ACK.
        let _ = stream.set_nodelay(true);
        match self.registry.arrive(clock::now(), hello.ticket, hello.side, peer.ip()) {
            Ok(Arrival::First { meeting, until, proxy }) => {
                match self.meetings.first((meeting, until, proxy), hello.side, (stream, peer)) {
                    Ok(meet) => {
                        self.tasks.spawn(meet);
                    }
                    Err(PairsFull) => {
                        self.refusals.note(&format!("{MAX_PAIRS} meetings are under way"));
                        metrics().refuse(Refusal::MeetingsFull);
                    }
                }
            }
            Ok(Arrival::Second { meeting }) => self.meetings.second(meeting, (stream, peer)),
            Err(e) => tracing::debug!(%peer, "meet connection refused: {e}"),
        }
    }

    /// A session's connection said something.
    fn handle_input(&mut self, input: Input) {
        match input {
            Input::Data(id, bytes) => self.registry.handle_input(clock::now(), id, &bytes),
            Input::Written(id, n) => self.registry.handle_written(id, n),
            Input::Closed(id) => self.registry.handle_closed(id),
        }
    }

    /// A change from outside the registry's task.
    fn handle_command(&mut self, command: Command) {
        command(&mut self.registry);
    }

    /// The gauges that change without an event, and the readiness.
    fn refresh_gauges(&mut self) {
        let m = metrics();
        self.times.keep_live(&self.registry);
        m.watches.set(gauge(self.registry.directory().watch_total()));
        let lookups = self.registry.lookups_answered();
        m.lookups.inc_by(lookups.saturating_sub(m.lookups.get()));
        let established = || self.registry.sessions().filter(|(_, key, _)| key.is_some()).count();
        if self.full_at.is_some_and(|n| established() < n) {
            self.full_at = None;
            readiness().set(READY_SESSIONS, None);
        }
    }

    fn publish_view(&mut self) {
        if let Some(view) = &mut self.view {
            view.publish(&self.registry, &mut self.times);
        }
    }

    fn view_stale(&mut self) {
        if let Some(view) = &mut self.view {
            view.stale();
        }
    }

    /// After every event: sends what the registry queued, reports what it
    /// said, and updates the gauges that follow them.
    fn flush(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(id) = self.registry.poll_transmit(&mut self.buf) {
                progressed = true;
                let bytes = std::mem::take(&mut self.buf);
                if let Some(connection) = self.connections.get(&id) {
                    connection.send(bytes);
                }
            }
            while let Some(event) = self.registry.poll_event() {
                progressed = true;
                if let RegistryEvent::SessionClosed { id, .. } = &event {
                    if let Some(connection) = self.connections.remove(id) {
                        connection.close();
                    }
                    self.times.sessions.remove(id);
                }
                count(&event);
                self.view_stale();
                (self.on_event)(&event);
            }
            if !progressed {
                break;
            }
        }
        let m = metrics();
        m.sessions.set(gauge(self.registry.session_count()));
        m.instances.set(gauge(self.registry.instance_count()));
    }
}

/// The next command, or never without a channel.
async fn next_command(commands: &mut Option<mpsc::UnboundedReceiver<Command>>) -> Option<Command> {
    match commands {
        Some(commands) => commands.recv().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`, or for ever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
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
    let registrations = |what| m.registrations.get_or_create(&label("event", what)).inc();
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
