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
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    // Since when a bare key has not been found in the DHT, and whether the
    // user was told what to try: a walkthrough offline must not hang quietly.
    let mut unresolved_since: Option<Instant> = None;
    let mut hinted = false;
    loop {
        if *stop.borrow() {
            return;
        }
        match resolver.resolve(&target).await {
            Ok(addrs) => {
                unresolved_since = None;
                match race(&addrs, |addr| dial::connect(addr, CONNECT_TIMEOUT)).await {
                    Ok((addr, stream)) => {
                        let ends = drive(
                            &client,
                            stream,
                            &mut on_event,
                            &mut backoff,
                            &mut stop,
                            &poke,
                            (&registry, addr),
                        );
                        let stopped = ends.await;
                        registry.send_replace(None);
                        if stopped {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(registry = %target, "registry not reachable: {e}; retrying"),
                }
            }
            Err(e) => {
                tracing::warn!(registry = %target, "registry not reachable: {e}; retrying");
                let since = *unresolved_since.get_or_insert_with(Instant::now);
                let in_dht = matches!(e, ResolveError::Dht(_));
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
        let delay = backoff.next_delay(random_u64());
        tracing::debug!(?delay, "reconnecting after a pause");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Drives one session; true if told to stop, false if the session ended.
async fn drive<C, F>(
    client: &Mutex<C>,
    stream: TcpStream,
    on_event: &mut F,
    backoff: &mut Backoff,
    stop: &mut watch::Receiver<bool>,
    poke: &Notify,
    (registry, addr): (&watch::Sender<Option<SocketAddr>>, SocketAddr),
) -> bool
where
    C: RegistryClient,
    F: FnMut(&C::Event),
{
    if let Ok(local) = stream.local_addr() {
        lock(client).handle_local_addr(local);
    }
    let (mut reader, mut writer) = stream.into_split();
    let started = lock(client).connect(crate::clock::now(), entropy());
    if let Err(e) = started {
        tracing::warn!("cannot start a session: {e}");
        return false;
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
                backoff.reset();
                established = true;
                registry.send_replace(Some(addr));
            }
            if let Some(reason) = C::disconnect_reason(event) {
                match reason {
                    ClientError::Closed if !established => tracing::error!(
                        "the registry closed the connection during the handshake: the registry key is probably \
                         wrong (a registry drops handshakes meant for another key); check the pubkey it printed"
                    ),
                    ClientError::Session(SessionError::Busy) => tracing::warn!(
                        "the registry is at its session limit, or busy with handshakes from this address (its --max-sessions, --max-handshakes-per-source), and refused us; retrying"
                    ),
                    _ => tracing::warn!("registry session ended: {reason}"),
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
            return false;
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
                return true;
            }
        }
    }
}
