//! Runs a service's or proxy's control sessions on TCP, one for each
//! registry of the set ([`ControlSet`]): find the set's members, keep a
//! client connected to each, reconnecting with jittered, capped backoff
//! after any failure (the first attempt included), until told to stop.
//!
//! - **Members.** A static set (`KEY@HOST:PORT,...`) is followed as named. A
//!   bare key's set is read from the DHT, and read again every
//!   [`REDISCOVER`] (at the reconnect pace while no member answers), so a
//!   registry added later is followed within that; a member the record no
//!   longer lists is let go once its session is down. At most
//!   [`MAX_MEMBERS`] are followed; each has a *slot* (0 to 7), its name in
//!   metrics and events, given again once the task of the member let go
//!   has ended.
//! - **Clients.** Each member has its own client, made by the caller's
//!   factory, behind a mutex shared with the rest of the process (the
//!   proxy chooses instances from them); the lock is never held across an
//!   await. A client's session is that member's business alone: one
//!   member's refusal or death changes nothing at another.
//! - **Repopulating.** A registry that comes back is found by each client's
//!   own backoff (jittered, from [`BACKOFF_BASE`] up to [`BACKOFF_MAX`]), so
//!   the reconnects of a restart are spread out, not a thundering herd.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use seaport_proto::client::{Backoff, ClientError, MAX_MEMBERS, RegistryClient};
use seaport_proto::keys::PublicKey;
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
use crate::metrics::metrics;
use crate::target::{Member, RegistryTarget, ResolveError, Resolver};

/// First reconnect delay; doubles per failure.
pub const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Longest reconnect delay: a registry that comes back is found again within it.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long one TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a bare key may stay unfound in the DHT before the user is told,
/// once, what to try instead.
pub const DHT_HINT_AFTER: Duration = Duration::from_secs(20);
/// How long stopping may wait for the sessions to send their last words.
pub const STOP_WITHIN: Duration = Duration::from_secs(3);
/// How often a bare key's set is read again from the DHT while some member
/// answers: a registry added to the set is followed within it.
pub const REDISCOVER: Duration = Duration::from_secs(30);
/// How often a discovery waiting out [`REDISCOVER`] checks that some member
/// still answers.
const LOST_CHECK: Duration = Duration::from_secs(1);

/// Where an event came from: the member's slot and name, and the address
/// its session runs to.
#[derive(Debug, Clone, Copy)]
pub struct At<'a> {
    /// The member's slot (0 to 7).
    pub slot: usize,
    /// The member.
    pub member: &'a Member,
    /// The address its session runs to.
    pub addr: SocketAddr,
}

/// What sees every client event: shared by the members' tasks.
pub type OnEvent<E> = Arc<dyn Fn(At<'_>, &E) + Send + Sync>;

/// One member followed: its client and the task that keeps it connected.
struct Followed<C> {
    view: MemberView<C>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// A member as the rest of the process uses it.
pub struct MemberView<C> {
    /// Its slot (0 to 7).
    pub slot: usize,
    /// The registry.
    pub member: Member,
    /// Its client.
    pub client: Arc<Mutex<C>>,
    /// What to notify after changing the client from outside, so that
    /// what it queued is sent.
    pub poke: Arc<Notify>,
    /// The registry's address while a session with it is open, `None`
    /// between sessions: where meet connections go.
    pub registry: watch::Receiver<Option<SocketAddr>>,
}

impl<C> Clone for MemberView<C> {
    fn clone(&self) -> Self {
        MemberView {
            slot: self.slot,
            member: self.member.clone(),
            client: self.client.clone(),
            poke: self.poke.clone(),
            registry: self.registry.clone(),
        }
    }
}

impl<C> MemberView<C> {
    /// Whether a session with it is open now.
    pub fn is_connected(&self) -> bool {
        self.registry.borrow().is_some()
    }
}

/// What the members' tasks and the discovery share.
struct Shared<C: RegistryClient> {
    key: PublicKey,
    /// Makes the client of a new member, given its slot.
    make: Box<dyn Fn(usize) -> C + Send + Sync>,
    on_event: OnEvent<C::Event>,
    members: Mutex<Vec<Followed<C>>>,
    /// Tasks of members let go that may still be finishing, by slot: their
    /// slots are not given again before they end.
    retiring: Mutex<Vec<(usize, tokio::task::JoinHandle<()>)>>,
    /// Bumped whenever a member is followed or let go.
    changed: watch::Sender<u64>,
}

/// The control sessions of one process, one per member of the registry set;
/// see the module docs.
pub struct ControlSet<C: RegistryClient> {
    shared: Arc<Shared<C>>,
    stop: watch::Sender<bool>,
    discovery: tokio::task::JoinHandle<()>,
}

impl<C> ControlSet<C>
where
    C: RegistryClient + Send + 'static,
    C::Event: Send,
{
    /// Says `connecting to registry KEY` and starts following `target`'s
    /// set: each member gets a client from `make` (given its slot), kept
    /// connected; `on_event` sees every event of every member.
    pub fn spawn(
        target: RegistryTarget,
        resolver: Resolver,
        make: impl Fn(usize) -> C + Send + Sync + 'static,
        on_event: OnEvent<C::Event>,
    ) -> ControlSet<C> {
        emit(&Event::Connecting { registry: target.key });
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            key: target.key,
            make: Box::new(make),
            on_event,
            members: Mutex::new(Vec::new()),
            retiring: Mutex::new(Vec::new()),
            changed,
        });
        let (stop, stopped) = watch::channel(false);
        let span = tracing::info_span!("registry", key = %target.key);
        let discovery = tokio::spawn(discover(shared.clone(), target, resolver, stopped).instrument(span));
        ControlSet { shared, stop, discovery }
    }

    /// What the rest of the process holds to reach the members' clients.
    pub fn handle(&self) -> ControlHandle<C> {
        ControlHandle(self.shared.clone())
    }

    /// Sends what each client queued last, closes the sessions and waits for
    /// the tasks, at most [`STOP_WITHIN`] (a registry that reads nothing
    /// cannot hold the process).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let followed: Vec<Followed<C>> = std::mem::take(&mut *lock(&self.shared.members));
        for f in &followed {
            let _ = f.stop.send(true);
        }
        let mut tasks: Vec<tokio::task::JoinHandle<()>> = followed.into_iter().map(|f| f.task).collect();
        tasks.extend(std::mem::take(&mut *lock(&self.shared.retiring)).into_iter().map(|(_, task)| task));
        tasks.push(self.discovery);
        let aborts: Vec<tokio::task::AbortHandle> = tasks.iter().map(|t| t.abort_handle()).collect();
        let all = async {
            for task in tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(STOP_WITHIN, all).await.is_err() {
            tracing::warn!("a registry session did not close within {STOP_WITHIN:?}: dropped");
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
        }
    }
}

/// The members' clients, for the rest of the process: cloned freely,
/// outlived by nothing it starts.
pub struct ControlHandle<C: RegistryClient>(Arc<Shared<C>>);

impl<C: RegistryClient> Clone for ControlHandle<C> {
    fn clone(&self) -> Self {
        ControlHandle(self.0.clone())
    }
}

impl<C: RegistryClient> ControlHandle<C> {
    /// The members followed now, by slot.
    pub fn members(&self) -> Vec<MemberView<C>> {
        lock(&self.0.members).iter().map(|f| f.view.clone()).collect()
    }

    /// Changes when a member is followed or let go.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.0.changed.subscribe()
    }

    /// Applies `change` to every member's client and wakes their sessions
    /// to send what it queued. Members followed later get their client from
    /// the factory, which must see the same state (the caller's job).
    pub fn change_all(&self, mut change: impl FnMut(&mut C)) {
        let members = lock(&self.0.members);
        for followed in members.iter() {
            change(&mut lock(&followed.view.client));
            followed.view.poke.notify_one();
        }
    }
}

impl<C> Shared<C>
where
    C: RegistryClient + Send + 'static,
    C::Event: Send,
{
    /// Follows the members of `found` not followed yet (up to
    /// [`MAX_MEMBERS`]), and lets go of those it no longer lists whose
    /// session is down. Returns whether anything changed, and how many
    /// members found were left out for the cap.
    fn adopt(self: &Arc<Self>, found: &[Member]) -> (bool, usize) {
        let mut members = lock(&self.members);
        let before = members.len();
        let mut gone = Vec::new();
        let mut retiring = lock(&self.retiring);
        retiring.retain(|(_, task)| !task.is_finished());
        let (kept, left): (Vec<Followed<C>>, Vec<Followed<C>>) = std::mem::take(&mut *members)
            .into_iter()
            .partition(|f| f.view.is_connected() || found.iter().any(|m| m.is(&f.view.member)));
        *members = kept;
        for f in left {
            let _ = f.stop.send(true);
            gone.push(f.view.member.to_string());
            retiring.push((f.view.slot, f.task));
        }
        let mut left_out = 0;
        for member in found {
            if members.iter().any(|f| f.view.member.is(member)) {
                continue;
            }
            let taken =
                |s: &usize| members.iter().any(|f| f.view.slot == *s) || retiring.iter().any(|r| r.0 == *s);
            let Some(slot) = (0..MAX_MEMBERS).find(|s| !taken(s)) else {
                left_out += 1;
                continue;
            };
            members.push(self.follow(slot, member.clone()));
        }
        for name in &gone {
            tracing::info!(registry = %name, "the set no longer lists this registry: let go");
        }
        let changed = members.len() != before || !gone.is_empty();
        if changed {
            members.sort_by_key(|f| f.view.slot);
            let names: Vec<String> =
                members.iter().map(|f| format!("{}={}", f.view.slot, f.view.member)).collect();
            tracing::info!("following {} registries of the set: {}", members.len(), names.join(", "));
            self.changed.send_modify(|n| *n += 1);
        }
        (changed, left_out)
    }

    /// Starts the task that keeps `member`'s client connected.
    fn follow(self: &Arc<Self>, slot: usize, member: Member) -> Followed<C> {
        let client = Arc::new(Mutex::new((self.make)(slot)));
        let (stop, stopped) = watch::channel(false);
        let (registry_tx, registry) = watch::channel(None);
        let poke = Arc::new(Notify::new());
        let view =
            MemberView { slot, member: member.clone(), client: client.clone(), poke: poke.clone(), registry };
        let channels = ControlChannels { stop: stopped, poke, registry: registry_tx };
        let span = tracing::info_span!("member", slot, registry = %member);
        let on_event = self.on_event.clone();
        let task = tokio::spawn(run_member(client, slot, member, on_event, channels).instrument(span));
        Followed { view, stop, task }
    }

    fn is_any_connected(&self) -> bool {
        lock(&self.members).iter().any(|f| f.view.is_connected())
    }
}

/// Finds the members of `target`'s set and follows them: a static set once,
/// a bare key's again and again (module docs), until `stop`.
async fn discover<C>(
    shared: Arc<Shared<C>>,
    target: RegistryTarget,
    resolver: Resolver,
    mut stop: watch::Receiver<bool>,
) where
    C: RegistryClient + Send + 'static,
    C::Event: Send,
{
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    let mut failures: u32 = 0;
    // Since when the set has not been found in the DHT, and whether the
    // user was told what to try: a walkthrough offline must not hang quietly.
    let mut unresolved_since: Option<Instant> = None;
    let mut hinted = false;
    let mut told_left_out = 0;
    loop {
        let found = tokio::select! {
            found = resolver.members(&target) => found,
            _ = stop.changed() => return,
        };
        match found {
            Ok(found) => {
                unresolved_since = None;
                failures = 0;
                let (_, left_out) = shared.adopt(&found);
                if left_out > 0 && left_out != told_left_out {
                    tracing::warn!(
                        "the set lists {} registries: {left_out} are not followed (a client follows at most {MAX_MEMBERS})",
                        found.len()
                    );
                }
                told_left_out = left_out;
                if !target.in_dht() {
                    return;
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures.is_power_of_two() {
                    tracing::warn!(registry = %shared.key, "registry set not found: {e}; retrying (attempt {failures})");
                } else {
                    tracing::debug!("registry set not found: {e}; retrying");
                }
                let since = *unresolved_since.get_or_insert_with(Instant::now);
                let in_dht = matches!(e, ResolveError::Dht(_) | ResolveError::DhtStarting);
                if in_dht && !hinted && since.elapsed() >= DHT_HINT_AFTER {
                    hinted = true;
                    tracing::error!(
                        "registry {} still not found in the DHT after {}s: is this host online (the DHT needs UDP)? \
                         Is the registry running, and with DHT? Without the public DHT, dial it directly as \
                         {}@HOST:PORT, or use a private DHT with --bootstrap HOST:PORT",
                        shared.key,
                        DHT_HINT_AFTER.as_secs(),
                        shared.key
                    );
                }
            }
        }
        // While no member answers, the set may have moved: read it at the
        // reconnect pace; else now and then, for members added later.
        let connected = shared.is_any_connected();
        let pause = if connected {
            backoff.reset();
            REDISCOVER
        } else {
            backoff.next_delay(random_u64())
        };
        // A long pause is cut short when the last member stops answering
        // (checked each second): the set may have moved, and waiting out the
        // rest of REDISCOVER would keep the client away from it that long.
        let until = Instant::now() + pause;
        loop {
            let step = until.saturating_duration_since(Instant::now()).min(LOST_CHECK);
            tokio::select! {
                _ = tokio::time::sleep(step) => {}
                _ = stop.changed() => return,
            }
            if Instant::now() >= until || (connected && !shared.is_any_connected()) {
                break;
            }
        }
    }
}

/// The channels that steer [`run_member`] and carry what it reports besides
/// events.
struct ControlChannels {
    /// Turns true to stop.
    stop: watch::Receiver<bool>,
    /// Whoever changes the client from outside (a service's backend health
    /// check) notifies this so that what it queued is sent.
    poke: Arc<Notify>,
    /// Set to the registry's address while a session is open.
    registry: watch::Sender<Option<SocketAddr>>,
}

/// Keeps `client` connected to `member` until `channels.stop` turns true;
/// `on_event` sees every event. On stop, whatever the client queued last (a
/// service's unregistrations) is written before the stream is closed.
async fn run_member<C>(
    client: Arc<Mutex<C>>,
    slot: usize,
    member: Member,
    on_event: OnEvent<C::Event>,
    channels: ControlChannels,
) where
    C: RegistryClient + Send + 'static,
{
    let ControlChannels { mut stop, poke, registry } = channels;
    let mut pacing = Pacing::new();
    let connected = metrics().registry_connected(slot);
    loop {
        if *stop.borrow() {
            return;
        }
        match dial_member(&member).await {
            Ok((addr, stream)) => {
                let at = At { slot, member: &member, addr };
                let signals = Signals { registry: &registry, at, poke: &poke, connected: &connected };
                let end = drive(&client, stream, &on_event, &mut pacing, &mut stop, signals).await;
                registry.send_replace(None);
                connected.set(0);
                if let SessionEnd::Stopped = end {
                    return;
                }
            }
            Err(e) => pacing.unreachable(&member, &e),
        }
        let delay = pacing.backoff.next_delay(random_u64());
        tracing::debug!(?delay, "reconnecting after a pause");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Why no stream to a registry could be had.
#[derive(Debug, thiserror::Error)]
enum DialFailure {
    /// Its addresses could not be had.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// None of them answered.
    #[error("{0}")]
    Unreachable(String),
}

/// A stream to `member`: the first of its addresses that connects. The
/// handshake then checks the key, wherever the address came from.
async fn dial_member(member: &Member) -> Result<(SocketAddr, TcpStream), DialFailure> {
    let addrs = member.addrs().await?;
    race(&addrs, |addr| dial::connect(addr, CONNECT_TIMEOUT))
        .await
        .map_err(|e| DialFailure::Unreachable(e.to_string()))
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
    fn unreachable(&mut self, member: &Member, e: &DialFailure) {
        self.failures = self.failures.saturating_add(1);
        if self.failures.is_power_of_two() {
            tracing::warn!(
                registry = %member,
                "registry not reachable: {e}; retrying (attempt {}, told again at attempt {})",
                self.failures,
                self.failures.saturating_mul(2)
            );
        } else {
            tracing::debug!(registry = %member, "registry not reachable: {e}; retrying");
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
    /// The session ended (reconnect).
    Ended,
}

/// What one session reports besides events: the registry's address, while
/// it is open, and the poke that wakes it.
struct Signals<'a> {
    registry: &'a watch::Sender<Option<SocketAddr>>,
    at: At<'a>,
    poke: &'a Notify,
    /// The member's `seaport_registry_connected` gauge.
    connected: &'a prometheus_client::metrics::gauge::Gauge,
}

/// Drives one session until it ends or the task is told to stop.
async fn drive<C: RegistryClient>(
    client: &Mutex<C>,
    stream: TcpStream,
    on_event: &OnEvent<C::Event>,
    pacing: &mut Pacing,
    stop: &mut watch::Receiver<bool>,
    signals: Signals<'_>,
) -> SessionEnd {
    if let Ok(local) = stream.local_addr() {
        lock(client).handle_local_addr(local);
    }
    let (mut reader, mut writer) = stream.into_split();
    let started = lock(client).connect(crate::clock::now(), entropy());
    let Signals { registry, at, poke, connected } = signals;
    if let Err(e) = started {
        tracing::warn!("cannot start a session: {e}");
        return SessionEnd::Ended;
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
                registry.send_replace(Some(at.addr));
                connected.set(1);
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
            on_event(at, event);
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
            return SessionEnd::Ended;
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
