//! Runs a service's or proxy's control session on TCP: resolve, dial, drive
//! the state machine, and reconnect with jittered, capped backoff after any
//! failure (the first attempt included), until told to stop.
//!
//! The client sits behind a mutex shared with the rest of the process (the
//! proxy chooses instances from it); the lock is never held across an await.
//! [`ControlTask`] is what the binaries start; [`ControlChannels`] are the
//! channels that steer [`run_client`] and carry what it reports.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use seaport_proto::client::{Backoff, ClientError, RegistryClient};
use seaport_proto::message::ErrorCode;
use seaport_proto::session::SessionError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::dial::{self, race};
use crate::event::{Event, emit};
use crate::identity::{entropy, random_u64};
use crate::lock::lock;
use crate::target::{RegistryTarget, ResolveError, Resolver};

/// First reconnect delay; doubles per failure.
pub const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Longest reconnect delay: a registry that comes back is found again within it.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long one TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a bare key may stay unfound in the DHT before the user is told,
/// once, what to try instead.
pub const DHT_HINT_AFTER: Duration = Duration::from_secs(20);

/// A control session in a task of its own: what a service and a proxy both
/// start, and stop last (after their own listeners), so that whatever the
/// client queued on the way out (a service's unregistrations) is sent.
pub struct ControlTask {
    stop: watch::Sender<bool>,
    poke: Arc<Notify>,
    registry: watch::Receiver<Option<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl ControlTask {
    /// Says `connecting to registry KEY` and starts keeping `client`
    /// connected to `target` (see [`run_client`]).
    pub fn spawn<C, F>(
        client: Arc<Mutex<C>>,
        target: RegistryTarget,
        resolver: Resolver,
        on_event: F,
    ) -> ControlTask
    where
        C: RegistryClient + Send + 'static,
        C::Event: Send,
        F: FnMut(&C::Event) + Send + 'static,
    {
        emit(&Event::Connecting { registry: target.key });
        let (stop, stopped) = watch::channel(false);
        let (registry_tx, registry) = watch::channel(None);
        let poke = Arc::new(Notify::new());
        let span = tracing::info_span!("registry", key = %target.key);
        let channels = ControlChannels { stop: stopped, poke: poke.clone(), registry: registry_tx };
        let task = tokio::spawn(run_client(client, target, resolver, on_event, channels).instrument(span));
        ControlTask { stop, poke, registry, task }
    }

    /// The registry's address while a session with it is open, `None`
    /// between sessions: where meet connections go.
    pub fn registry_addr(&self) -> watch::Receiver<Option<SocketAddr>> {
        self.registry.clone()
    }

    /// What to notify after changing the client from outside, so that what
    /// it queued is sent.
    pub fn poke(&self) -> Arc<Notify> {
        self.poke.clone()
    }

    /// Sends what the client queued last, closes the session and waits for the task.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The channels that steer [`run_client`] and carry what it reports besides
/// events.
pub struct ControlChannels {
    /// Turns true to stop.
    pub stop: watch::Receiver<bool>,
    /// Whoever changes the client from outside (a service's backend health
    /// check) notifies this so that what it queued is sent.
    pub poke: Arc<Notify>,
    /// Set to the registry's address while a session is open.
    pub registry: watch::Sender<Option<SocketAddr>>,
}

/// Keeps `client` connected to `target` until `channels.stop` turns true;
/// `on_event` sees every event. On stop, whatever the client queued last (a
/// service's unregistrations) is written before the stream is closed.
pub async fn run_client<C, F>(
    client: Arc<Mutex<C>>,
    target: RegistryTarget,
    resolver: Resolver,
    mut on_event: F,
    channels: ControlChannels,
) where
    C: RegistryClient + Send + 'static,
    F: FnMut(&C::Event) + Send,
{
    let ControlChannels { mut stop, poke, registry } = channels;
    let mut pacing = Pacing::new();
    // Since when a bare key has not been found in the DHT, and whether the
    // user was told what to try: a walkthrough offline must not hang quietly.
    let mut unresolved_since: Option<Instant> = None;
    let mut hinted = false;
    // Where the last session that got established was: dialled at once on
    // a reconnect while the DHT is asked again, since a registry that
    // restarted is usually where it was.
    let mut last_seen: Option<SocketAddr> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        match dial_registry(&resolver, &target, last_seen).await {
            Ok((addr, stream)) => {
                unresolved_since = None;
                let signals = Signals { registry: &registry, addr, poke: &poke };
                let end = drive(&client, stream, &mut on_event, &mut pacing, &mut stop, signals).await;
                registry.send_replace(None);
                match end {
                    SessionEnd::Stopped => return,
                    SessionEnd::Ended { established } => {
                        // A handshake that fails there (another registry took
                        // the address) must not be tried first again.
                        last_seen = established.then_some(addr);
                    }
                }
            }
            Err(e) => {
                pacing.unreachable(&target, &e);
                let since = *unresolved_since.get_or_insert_with(Instant::now);
                let in_dht =
                    matches!(e, DialFailure::Resolve(ResolveError::Dht(_) | ResolveError::DhtStarting));
                if in_dht && !hinted && since.elapsed() >= DHT_HINT_AFTER {
                    hinted = true;
                    tracing::error!(
                        "registry {} still not found in the DHT after {}s: is this host online (the DHT needs UDP)? \
                         Is the registry running, and with DHT? Without the public DHT, dial it directly as \
                         {}@HOST:PORT, or use a private DHT with --bootstrap HOST:PORT",
                        target.key,
                        DHT_HINT_AFTER.as_secs(),
                        target.key
                    );
                }
            }
        }
        let delay = pacing.backoff.next_delay(random_u64());
        tracing::debug!(?delay, "reconnecting after a pause");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Why no stream to the registry could be had.
#[derive(Debug, thiserror::Error)]
enum DialFailure {
    /// Its addresses could not be had.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// None of them answered.
    #[error("{0}")]
    Unreachable(String),
}

/// A stream to the registry: to the addresses `target` resolves to, and,
/// for a bare key, at the same time to `last_seen` (the DHT can take
/// seconds; the registry is usually where it was). The first that connects
/// wins; the handshake then checks the key, wherever it came from.
async fn dial_registry(
    resolver: &Resolver,
    target: &RegistryTarget,
    last_seen: Option<SocketAddr>,
) -> Result<(SocketAddr, TcpStream), DialFailure> {
    let fresh = async {
        let addrs = resolver.resolve(target).await?;
        race(&addrs, |addr| dial::connect(addr, CONNECT_TIMEOUT))
            .await
            .map_err(|e| DialFailure::Unreachable(e.to_string()))
    };
    let Some(seen) = last_seen.filter(|_| target.direct.is_none()) else { return fresh.await };
    let cached = dial::connect(seen, CONNECT_TIMEOUT);
    tokio::pin!(fresh, cached);
    let mut cached_failed = false;
    loop {
        tokio::select! {
            dialled = &mut cached, if !cached_failed => match dialled {
                Ok(stream) => return Ok((seen, stream)),
                Err(e) => {
                    tracing::debug!(%seen, "the registry's last address did not answer: {e}");
                    cached_failed = true;
                }
            },
            result = &mut fresh => {
                if result.is_ok() || cached_failed {
                    return result;
                }
                // The DHT failed; the last address may still answer.
                return match (&mut cached).await {
                    Ok(stream) => Ok((seen, stream)),
                    Err(_) => result,
                };
            }
        }
    }
}

/// How reconnects are paced and how often their failures are told: the
/// backoff starts over only after a session that got established and was
/// not refused, so a key the registry refuses backs off like any failure;
/// a registry that stays unreachable is reported at the 1st, 2nd, 4th, 8th…
/// attempt, not at every one; the advice for a refused key is given once.
struct Pacing {
    backoff: Backoff,
    /// Failed attempts in a row to reach the registry.
    failures: u32,
    /// The user was told what to do about a key the registry refuses.
    told_refused: bool,
}

impl Pacing {
    fn new() -> Pacing {
        Pacing { backoff: Backoff::new(BACKOFF_BASE, BACKOFF_MAX), failures: 0, told_refused: false }
    }

    /// A stream to the registry is up.
    fn reachable(&mut self) {
        if self.failures > 1 {
            tracing::info!("registry reachable again after {} attempts", self.failures);
        }
        self.failures = 0;
    }

    /// An attempt to reach the registry failed.
    fn unreachable(&mut self, target: &RegistryTarget, e: &DialFailure) {
        self.failures = self.failures.saturating_add(1);
        if self.failures.is_power_of_two() {
            tracing::warn!(
                registry = %target,
                "registry not reachable: {e}; retrying (attempt {}, told again at attempt {})",
                self.failures,
                self.failures.saturating_mul(2)
            );
        } else {
            tracing::debug!(registry = %target, "registry not reachable: {e}; retrying");
        }
    }

    /// A stream to the registry was up but no session came of it: told
    /// as often as an unreachable registry is.
    fn no_session(&mut self, reason: &ClientError) {
        self.failures = self.failures.saturating_add(1);
        if !self.failures.is_power_of_two() {
            tracing::debug!("no session with the registry: {reason}; retrying");
            return;
        }
        let attempt = self.failures;
        match reason {
            ClientError::Closed => tracing::error!(
                "the registry closed the connection during the handshake: the registry key is probably wrong (a \
                 registry drops handshakes meant for another key); check the pubkey it printed (attempt {attempt})"
            ),
            ClientError::Session(SessionError::Busy) => tracing::warn!(
                "the registry is at its session limit, or busy with handshakes from this address (its \
                 --max-sessions, --max-handshakes-per-source), and refused us; retrying (attempt {attempt})"
            ),
            _ => tracing::warn!("no session with the registry: {reason}; retrying (attempt {attempt})"),
        }
    }

    /// The registry refused this key itself (an access list with no grant
    /// for it): what to do, once; later refusals are logged at debug.
    fn refused(&mut self, why: &ClientError) {
        if std::mem::replace(&mut self.told_refused, true) {
            tracing::debug!("the registry refused this key again: {why}");
        } else {
            tracing::error!(
                "the registry refuses this key: {why}. Add it to a grant in the registry's --acl file and reload \
                 the registry (systemctl reload seaport-registry, or kill -HUP), or start with a seed the access \
                 list names; retrying with backoff"
            );
        }
    }
}

/// How a session ended, for the reconnect loop.
enum SessionEnd {
    /// Told to stop.
    Stopped,
    /// The session ended; whether its handshake had completed.
    Ended {
        /// The handshake completed.
        established: bool,
    },
}

/// What one session reports besides events: the registry's address, while
/// it is open, and the poke that wakes it.
struct Signals<'a> {
    registry: &'a watch::Sender<Option<SocketAddr>>,
    addr: SocketAddr,
    poke: &'a Notify,
}

/// Drives one session until it ends or the task is told to stop.
async fn drive<C, F>(
    client: &Mutex<C>,
    stream: TcpStream,
    on_event: &mut F,
    pacing: &mut Pacing,
    stop: &mut watch::Receiver<bool>,
    signals: Signals<'_>,
) -> SessionEnd
where
    C: RegistryClient,
    F: FnMut(&C::Event),
{
    if let Ok(local) = stream.local_addr() {
        lock(client).handle_local_addr(local);
    }
    let (mut reader, mut writer) = stream.into_split();
    let started = lock(client).connect(crate::clock::now(), entropy());
    let Signals { registry, addr, poke } = signals;
    if let Err(e) = started {
        tracing::warn!("cannot start a session: {e}");
        return SessionEnd::Ended { established: false };
    }
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = Vec::new();
    let mut established = false;
    loop {
        let (deadline, events) = {
            let mut c = lock(client);
            while c.poll_transmit(&mut out) {}
            let events: Vec<C::Event> = std::iter::from_fn(|| c.poll_event()).collect();
            (c.poll_timeout(), events)
        };
        let mut ended = false;
        for event in &events {
            if C::is_connected_event(event) {
                established = true;
                pacing.reachable();
                registry.send_replace(Some(addr));
            }
            if let Some(reason) = C::disconnect_reason(event) {
                match reason {
                    ClientError::Refused { code, .. } if *code == ErrorCode::FORBIDDEN => {
                        pacing.refused(reason)
                    }
                    _ if established => tracing::warn!("registry session ended: {reason}"),
                    // No session: a failed attempt like an unreachable one.
                    _ => pacing.no_session(reason),
                }
                // Only a session that held starts the backoff over: one the
                // registry refused (this key, or at its session limit) backs
                // off like any failure.
                let refused = matches!(reason, ClientError::Refused { code, .. }
                    if *code == ErrorCode::FORBIDDEN || *code == ErrorCode::LIMIT);
                if established && !refused {
                    pacing.backoff.reset();
                }
                ended = true;
            }
            on_event(event);
        }
        if !out.is_empty() {
            let written = writer.write_all(&out).await;
            out.clear();
            if written.is_err() {
                lock(client).handle_closed();
                continue;
            }
        }
        if ended {
            return SessionEnd::Ended { established };
        }
        let sleep = deadline.map(|d| tokio::time::sleep_until(Instant::from_std(d)));
        tokio::select! {
            read = reader.read(&mut buf) => {
                let mut c = lock(client);
                match read {
                    Ok(n) if n > 0 => c.handle_input(crate::clock::now(), buf.get(..n).unwrap_or_default()),
                    _ => c.handle_closed(),
                }
            }
            () = async { match sleep { Some(s) => s.await, None => std::future::pending().await } } => {
                lock(client).handle_timeout(crate::clock::now());
            }
            () = poke.notified() => {}
            _ = stop.changed() => {
                {
                    let mut c = lock(client);
                    while c.poll_transmit(&mut out) {}
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = writer.write_all(&out).await;
                    let _ = writer.shutdown().await;
                }).await;
                return SessionEnd::Stopped;
            }
        }
    }
}
