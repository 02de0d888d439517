//! One registry at scale: many service and proxy sessions from this one
//! process, each a real [`ServiceClient`] or [`ProxyClient`] on its own TCP
//! stream, driven by a minimal driver of its own (the binaries' loop, with
//! their jittered 250 ms → 2 s reconnect backoff), against one
//! `seaport-registry` process whose limits are raised to fit.
//!
//! The directory: `S` service sessions of 10 roles each (`10·S` instances);
//! role names `svc-0` … `svc-(S-1)`, each registered by 10 sessions
//! (versions `1.0.0` to `1.9.0`). `V` watcher sessions, each a proxy
//! client watching `svc-N@1.x`, 1,000 on each watched name: watchers 0 to
//! 999 watch `svc-0`, 1,000 to 1,999 `svc-1`, and so on (all `V` watch
//! `svc-0` when fewer than 1,000).
//!
//! Measured, in order: the registry's RSS per bare session, per instance
//! and per watcher session (VmRSS before and after each step); the time for
//! one change of `svc-0` (a probe session registering, then withdrawing, an
//! 11th instance) to reach every watcher of it, as each watcher's client
//! reports the new set; lookups/s from a few proxy sessions with a window
//! each; registration churn (register/unregister cycles from a few service
//! sessions over names spread across the directory, watchers attached);
//! and after a SIGKILL and restart of the registry on the same port, the
//! time until every session is back, every registration confirmed and
//! every watcher answered, with the clients' own backoff as the only pacing.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use seaport_proto::client::{
    Backoff, ClientConfig, ProxyClient, ProxyEvent, RegistryClient, ServiceClient, ServiceEvent,
};
use seaport_proto::keys::{Keypair, PublicKey, Seed};
use seaport_proto::role::{Role, RoleQuery};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::peers::{Peer, free_port};

/// Roles per service session.
const ROLES: usize = 10;
/// Watchers per watched role at most.
const WATCHERS_PER_ROLE: usize = 1000;
/// Source addresses the sessions are spread over (127.0.1.1 and on), as
/// sessions from many hosts would be.
const SOURCES: usize = 250;
/// First reconnect delay and cap, as the binaries (seaport-net's control.rs).
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Connects (and their handshakes) in flight while the directory is built.
const SETUP_IN_FLIGHT: usize = 256;

/// The size of one run.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// Service sessions (10 roles each).
    pub services: usize,
    /// Watcher sessions.
    pub watchers: usize,
    /// Fan-out rounds (each one change, reaching every watcher of `svc-0`).
    pub rounds: usize,
    /// Lookups in all, and the sessions they come from.
    pub lookups: usize,
    pub lookup_sessions: usize,
    /// Churn sessions, and how long churn runs.
    pub churn_sessions: usize,
    pub churn_for: Duration,
}

impl Size {
    pub fn new(quick: bool, sessions: Option<usize>) -> Size {
        let services = sessions.unwrap_or(if quick { 200 } else { 10_000 });
        Size {
            services,
            watchers: services,
            rounds: if quick { 5 } else { 20 },
            lookups: if quick { 20_000 } else { 200_000 },
            lookup_sessions: 8,
            churn_sessions: 32,
            churn_for: Duration::from_secs(if quick { 2 } else { 5 }),
        }
    }

    fn instances(&self) -> usize {
        self.services * ROLES
    }

    /// The name watcher `index` watches: 1,000 on each, in blocks.
    fn watched_name(&self, index: usize) -> usize {
        index / WATCHERS_PER_ROLE
    }

    /// Watchers of `svc-0`.
    fn probed_watchers(&self) -> usize {
        self.watchers.min(WATCHERS_PER_ROLE)
    }

    /// Every session this run opens.
    fn sessions(&self) -> usize {
        self.services + self.watchers + 1 + self.lookup_sessions + self.churn_sessions
    }
}

/// What one figure is called, its unit, whether higher is better, its value.
pub struct Figure {
    pub name: String,
    pub unit: &'static str,
    pub higher_is_better: bool,
    pub value: f64,
}

fn lower(name: impl Into<String>, unit: &'static str, value: f64) -> Figure {
    Figure { name: name.into(), unit, higher_is_better: false, value }
}

fn higher(name: impl Into<String>, unit: &'static str, value: f64) -> Figure {
    Figure { name: name.into(), unit, higher_is_better: true, value }
}

/// Counters every session task updates.
#[derive(Default)]
struct Stats {
    /// Established sessions now, by kind.
    services_up: AtomicUsize,
    watchers_up: AtomicUsize,
    extras_up: AtomicUsize,
    /// Registrations confirmed in the current sessions of the base services.
    registered: AtomicUsize,
    /// Watchers that got an answer in their current session.
    answered: AtomicUsize,
    /// Registrations refused (should stay 0).
    refused: AtomicUsize,
    /// TCP connects tried, refused or failed, and streams that ended before
    /// their session was established.
    dials: AtomicU64,
    dial_failures: AtomicU64,
    no_session: AtomicU64,
    /// Why streams ended before their session was established.
    failures: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Sessions of the base services and watchers established so far.
    connects: AtomicU64,
    /// Watch updates the watchers received.
    pushes: AtomicU64,
    /// Lookups answered, and lookups still to send.
    lookups_done: AtomicU64,
    lookups_left: AtomicU64,
    /// Churn: whether it runs, and changes (register or unregister) confirmed.
    churning: AtomicBool,
    changes: AtomicU64,
    /// Whether watchers of `svc-0` report their sets (to `probe_tx`).
    probing: AtomicBool,
}

/// A watcher of `svc-0` saw a set of `count` instances at this time.
type Seen = (usize, Instant, usize);

struct Shared {
    registry: SocketAddr,
    registry_key: PublicKey,
    /// Pacing of connects while the directory is built; opened wide before
    /// the restart, so that only the clients' backoff paces it.
    dial: Arc<Semaphore>,
    stats: Stats,
    probe_tx: tokio::sync::mpsc::UnboundedSender<Seen>,
    /// Makes every run's stamps and entropy differ.
    salt: u64,
}

/// splitmix64: entropy for handshakes and jitter (a benchmark's, not a key's).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        out
    }
}

fn lock<C>(m: &Mutex<C>) -> MutexGuard<'_, C> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Session `index` of `kind`'s identity.
fn keypair(kind: u8, index: usize) -> Keypair {
    let mut seed = [0x5cu8; 32];
    seed[0] = kind;
    seed[1..9].copy_from_slice(&(index as u64).to_le_bytes());
    Keypair::from_seed(&Seed::from_bytes(seed))
}

fn config(shared: &Shared, kind: u8, index: usize) -> ClientConfig {
    let mut config = ClientConfig::new(keypair(kind, index), shared.registry_key);
    let mut rng = Rng(shared.salt ^ ((kind as u64) << 56) ^ index as u64);
    config.process = rng.next() | 1;
    config
}

/// A client shared between its session task and the measurement.
struct Handle<C> {
    client: Arc<Mutex<C>>,
    poke: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl<C> Handle<C> {
    /// Changes the client, then wakes its task to send what it queued.
    fn with(&self, f: impl FnOnce(&mut C)) {
        f(&mut lock(&self.client));
        self.poke.notify_one();
    }
}

/// What a session task does with its client's events (under the client's lock).
type OnEvent<C> = Box<dyn FnMut(&mut C, &<C as RegistryClient>::Event) + Send>;

fn spawn_session<C>(shared: &Arc<Shared>, index: usize, client: C, on_event: OnEvent<C>) -> Handle<C>
where
    C: RegistryClient + Send + 'static,
    C::Event: Send,
{
    let client = Arc::new(Mutex::new(client));
    let poke = Arc::new(Notify::new());
    let task = tokio::spawn(keep_connected(shared.clone(), index, client.clone(), poke.clone(), on_event));
    Handle { client, poke, task }
}

/// Keeps one client connected, reconnecting after the binaries' backoff.
async fn keep_connected<C>(
    shared: Arc<Shared>,
    index: usize,
    client: Arc<Mutex<C>>,
    poke: Arc<Notify>,
    mut on_event: OnEvent<C>,
) where
    C: RegistryClient + Send + 'static,
    C::Event: Send,
{
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    let mut rng = Rng(shared.salt.rotate_left(17) ^ index as u64);
    let source = Ipv4Addr::new(127, 0, 1, 1 + (index % SOURCES) as u8);
    loop {
        let permit = shared.dial.clone().acquire_owned().await.expect("semaphore open");
        shared.stats.dials.fetch_add(1, Ordering::Relaxed);
        match dial(source, shared.registry).await {
            Ok(stream) => {
                let established =
                    session(&shared.stats, &client, &poke, stream, permit, &mut on_event, &mut rng).await;
                if established {
                    backoff.reset();
                } else {
                    shared.stats.no_session.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                drop(permit);
                shared.stats.dial_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(backoff.next_delay(rng.next())).await;
    }
}

async fn dial(source: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.into(), 0))?;
    let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(to))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Drives one session until it ends; whether it got established. The
/// permit is held until then (it paces handshakes, not sessions).
async fn session<C: RegistryClient>(
    stats: &Stats,
    client: &Mutex<C>,
    poke: &Notify,
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    on_event: &mut OnEvent<C>,
    rng: &mut Rng,
) -> bool {
    let mut permit = Some(permit);
    if let Ok(local) = stream.local_addr() {
        lock(client).handle_local_addr(local);
    }
    if lock(client).connect(Instant::now(), rng.bytes()).is_err() {
        return false;
    }
    let (mut reader, mut writer) = stream.into_split();
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::new();
    let mut established = false;
    loop {
        let (deadline, ended) = {
            let mut c = lock(client);
            let mut ended = false;
            while let Some(event) = c.poll_event() {
                if C::is_connected_event(&event) {
                    established = true;
                    drop(permit.take());
                }
                if let Some(reason) = C::disconnect_reason(&event) {
                    ended = true;
                    if !established {
                        *lock(&stats.failures).entry(reason.to_string()).or_default() += 1;
                    }
                }
                on_event(&mut c, &event);
            }
            while c.poll_transmit(&mut out) {}
            (c.poll_timeout(), ended)
        };
        if !out.is_empty() {
            let written = writer.write_all(&out).await;
            out.clear();
            if written.is_err() {
                lock(client).handle_closed();
                continue;
            }
        }
        if ended {
            return established;
        }
        let sleep = deadline.map(|d| tokio::time::sleep_until(tokio::time::Instant::from_std(d)));
        tokio::select! {
            read = reader.read(&mut buf) => {
                let mut c = lock(client);
                match read {
                    Ok(n) if n > 0 => c.handle_input(Instant::now(), &buf[..n]),
                    _ => c.handle_closed(),
                }
            }
            () = async { match sleep { Some(s) => s.await, None => std::future::pending().await } } => {
                lock(client).handle_timeout(Instant::now());
            }
            () = poke.notified() => {}
        }
    }
}

/// A base service session: its 10 roles, spread so that each name has 10
/// instances from 10 sessions; unavailable at first (RSS of a bare session).
fn service(shared: &Arc<Shared>, size: &Size, index: usize) -> Handle<ServiceClient> {
    let roles = (0..ROLES)
        .map(|k| Role::parse(&format!("svc-{}@1.{k}.0", (index * ROLES + k) % size.services)).unwrap())
        .collect();
    let mut client = ServiceClient::new(config(shared, 1, index), roles, 1, vec![]);
    client.set_available(false);
    let shared2 = shared.clone();
    let (mut up, mut confirmed) = (false, 0usize);
    let on_event: OnEvent<ServiceClient> = Box::new(move |_, event| {
        let s = &shared2.stats;
        match event {
            ServiceEvent::Connected => {
                up = true;
                s.services_up.fetch_add(1, Ordering::Relaxed);
                s.connects.fetch_add(1, Ordering::Relaxed);
            }
            ServiceEvent::Registered(_) => {
                confirmed += 1;
                s.registered.fetch_add(1, Ordering::Relaxed);
            }
            ServiceEvent::Refused { .. } => {
                s.refused.fetch_add(1, Ordering::Relaxed);
            }
            ServiceEvent::Disconnected(_) => {
                if std::mem::take(&mut up) {
                    s.services_up.fetch_sub(1, Ordering::Relaxed);
                }
                s.registered.fetch_sub(std::mem::take(&mut confirmed), Ordering::Relaxed);
            }
            _ => {}
        }
    });
    spawn_session(shared, index, client, on_event)
}

/// A watcher session: a proxy client watching `svc-N@1.x`.
fn watcher(shared: &Arc<Shared>, size: &Size, index: usize) -> Handle<ProxyClient> {
    let name = size.watched_name(index);
    let query = RoleQuery::parse(&format!("svc-{name}@1.x")).unwrap();
    let client = ProxyClient::new(config(shared, 2, index), query);
    let shared2 = shared.clone();
    let (mut up, mut answered) = (false, false);
    let on_event: OnEvent<ProxyClient> = Box::new(move |_, event| {
        let s = &shared2.stats;
        match event {
            ProxyEvent::Connected => {
                up = true;
                s.watchers_up.fetch_add(1, Ordering::Relaxed);
                s.connects.fetch_add(1, Ordering::Relaxed);
            }
            ProxyEvent::Instances { instances, .. } => {
                s.pushes.fetch_add(1, Ordering::Relaxed);
                if up && !std::mem::replace(&mut answered, true) {
                    s.answered.fetch_add(1, Ordering::Relaxed);
                }
                if name == 0 && s.probing.load(Ordering::Relaxed) {
                    let _ = shared2.probe_tx.send((index, Instant::now(), instances.len()));
                }
            }
            ProxyEvent::Disconnected(_) => {
                if std::mem::take(&mut up) {
                    s.watchers_up.fetch_sub(1, Ordering::Relaxed);
                }
                if std::mem::take(&mut answered) {
                    s.answered.fetch_sub(1, Ordering::Relaxed);
                }
            }
            _ => {}
        }
    });
    spawn_session(shared, size.services + index, client, on_event)
}

/// The extra sessions (probe, lookups, churn) count their ups here.
fn count_ups(stats: &Stats, up: &mut bool, connected: bool, disconnected: bool) {
    if connected {
        *up = true;
        stats.extras_up.fetch_add(1, Ordering::Relaxed);
    }
    if disconnected && std::mem::take(up) {
        stats.extras_up.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The probe: a service session of one role, an 11th instance of `svc-0`.
fn probe(shared: &Arc<Shared>, index: usize) -> Handle<ServiceClient> {
    let role = Role::parse("svc-0@1.99.0").unwrap();
    let mut client = ServiceClient::new(config(shared, 3, 0), vec![role], 1, vec![]);
    client.set_available(false);
    let shared2 = shared.clone();
    let mut up = false;
    let on_event: OnEvent<ServiceClient> = Box::new(move |_, event| {
        let connected = matches!(event, ServiceEvent::Connected);
        let gone = matches!(event, ServiceEvent::Disconnected(_));
        count_ups(&shared2.stats, &mut up, connected, gone);
    });
    spawn_session(shared, index, client, on_event)
}

/// A lookup session: a proxy client of no watch that sends a lookup for
/// each answer while lookups are left.
fn looker(shared: &Arc<Shared>, size: &Size, n: usize, index: usize) -> Handle<ProxyClient> {
    let queries: Vec<RoleQuery> =
        (0..size.services.min(1000)).map(|i| RoleQuery::parse(&format!("svc-{i}@1.x")).unwrap()).collect();
    let client = ProxyClient::with_queries(config(shared, 4, n), vec![]);
    let shared2 = shared.clone();
    let (mut up, mut next) = (false, n);
    let on_event: OnEvent<ProxyClient> = Box::new(move |c, event| {
        let s = &shared2.stats;
        let connected = matches!(event, ProxyEvent::Connected);
        let gone = matches!(event, ProxyEvent::Disconnected(_));
        count_ups(s, &mut up, connected, gone);
        if let ProxyEvent::LookupResult { instances, .. } = event {
            if !instances.is_empty() {
                s.lookups_done.fetch_add(1, Ordering::Relaxed);
            }
            if s.lookups_left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1)).is_ok()
            {
                next = (next + 7) % queries.len();
                c.lookup(queries[next].clone());
            }
        }
    });
    spawn_session(shared, index, client, on_event)
}

/// A churn session: 10 roles over names spread across the directory; while
/// churn runs, withdraws and registers them again each time all are confirmed.
fn churner(shared: &Arc<Shared>, size: &Size, n: usize, index: usize) -> Handle<ServiceClient> {
    let roles = (0..ROLES)
        .map(|k| {
            let name = (n * ROLES + k).wrapping_mul(7919) % size.services;
            Role::parse(&format!("svc-{name}@1.50.{n}")).unwrap()
        })
        .collect();
    let client = ServiceClient::new(config(shared, 5, n), roles, 1, vec![]);
    let shared2 = shared.clone();
    let (mut up, mut confirmed) = (false, 0usize);
    let on_event: OnEvent<ServiceClient> = Box::new(move |c, event| {
        let s = &shared2.stats;
        let connected = matches!(event, ServiceEvent::Connected);
        let gone = matches!(event, ServiceEvent::Disconnected(_));
        count_ups(s, &mut up, connected, gone);
        if connected || gone {
            confirmed = 0;
        }
        if let ServiceEvent::Registered(_) = event {
            confirmed += 1;
            if s.churning.load(Ordering::Relaxed) {
                // This registration and the withdrawal before it.
                s.changes.fetch_add(2, Ordering::Relaxed);
            }
            // Every 10th confirmation closes a cycle of this session's roles.
            if confirmed % ROLES == 0 && s.churning.load(Ordering::Relaxed) {
                c.set_available(false);
                c.set_available(true);
            }
        }
    });
    spawn_session(shared, index, client, on_event)
}

/// Waits until `done()` holds, at most `within`; how long it took.
async fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < within, "scale: {what}: not done within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

fn registry_args(size: &Size, seed: &str, listen: &str) -> Vec<String> {
    let sessions = size.sessions() + 100;
    let registrations = size.instances() + size.churn_sessions * ROLES + 1000;
    [
        "--seed",
        seed,
        "--listen",
        listen,
        "--no-dht",
        "--max-sessions",
        &sessions.to_string(),
        "--max-total-registrations",
        &registrations.to_string(),
        // Sessions come from 250 loopback addresses here, from many hosts in
        // life: one address's handshakes are not what is measured.
        "--max-handshakes-per-source",
        "1024",
    ]
    .map(String::from)
    .to_vec()
}

fn start_registry(bin: &std::path::Path, args: &[String]) -> (Peer, PublicKey) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut registry = Peer::start("scale registry", &bin.join("seaport-registry"), &args);
    let line = registry.wait_line("Connect with pubkey");
    let key = line.rsplit(' ').next().unwrap().parse().unwrap();
    (registry, key)
}

/// CPU seconds (user and system) process `pid` has used.
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<f64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0.0)).collect();
    let ticks = fields.get(11).copied().unwrap_or(0.0) + fields.get(12).copied().unwrap_or(0.0);
    ticks / 100.0
}

fn kib(peer: &Peer) -> f64 {
    peer.memory_kib().0 as f64
}

/// p-th percentile of `values` (sorted here), 0–100.
fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

/// Runs the scale scenario; its figures.
pub async fn run(bin: &std::path::Path, size: Size, fd_limit: u64) -> Vec<Figure> {
    let mut size = size;
    // This process holds every session's socket; the registry (a child,
    // with the same limit) as many.
    let room = fd_limit.saturating_sub(128) as usize;
    if size.sessions() > room {
        let services = room.saturating_sub(1 + size.lookup_sessions + size.churn_sessions) / 2;
        eprintln!("scale: open-file limit {fd_limit}: {services} service and watcher sessions each");
        size.services = services;
        size.watchers = services;
    }
    let begun = Instant::now();
    let seed = "22".repeat(32);
    let listen = format!("127.0.0.1:{}", free_port());
    let args = registry_args(&size, &seed, &listen);
    let (mut registry, registry_key) = start_registry(bin, &args);
    let (probe_tx, mut probe_rx) = tokio::sync::mpsc::unbounded_channel();
    let salt = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let shared = Arc::new(Shared {
        registry: listen.parse().unwrap(),
        registry_key,
        dial: Arc::new(Semaphore::new(SETUP_IN_FLIGHT)),
        stats: Stats::default(),
        probe_tx,
        salt,
    });
    let s = &shared.stats;
    let (services, watchers, instances) = (size.services, size.watchers, size.instances());
    let mut figures = Vec::new();
    let label = format!("{services} services × {ROLES} roles, {watchers} watchers");
    eprintln!("scale: {label}");

    // (a) RSS: bare sessions, then their registrations, then watchers.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_idle = kib(&registry);
    let started = Instant::now();
    let service_handles: Vec<_> = (0..services).map(|i| service(&shared, &size, i)).collect();
    let long = Duration::from_secs(60 + size.sessions() as u64 / 50);
    until("service sessions up", long, || s.services_up.load(Ordering::Relaxed) == services).await;
    let connect_rate = services as f64 / started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_sessions = kib(&registry);
    let started = Instant::now();
    for h in &service_handles {
        h.with(|c| c.set_available(true));
    }
    until("registrations", long, || s.registered.load(Ordering::Relaxed) == instances).await;
    let register_rate = instances as f64 / started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_instances = kib(&registry);
    let watcher_handles: Vec<_> = (0..watchers).map(|i| watcher(&shared, &size, i)).collect();
    until("watchers answered", long, || s.answered.load(Ordering::Relaxed) == watchers).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_watchers = kib(&registry);
    let per_session = (rss_sessions - rss_idle) / services as f64;
    let per_instance = (rss_instances - rss_sessions) / instances as f64;
    let per_watcher = (rss_watchers - rss_instances) / watchers as f64;
    figures.push(lower(format!("scale: {services}+{watchers} sessions, RSS"), "MB", rss_watchers / 1024.0));
    figures.push(lower("  RSS per bare service session", "KiB", per_session));
    figures.push(lower("  RSS per instance", "KiB", per_instance));
    figures.push(lower("  RSS per watcher session (1 watch)", "KiB", per_watcher));
    figures.push(higher("  sessions connected/s (256 at once)", "/s", connect_rate));
    figures.push(higher("  registrations confirmed/s", "/s", register_rate));

    // (b) Fan-out: one change of svc-0 to each of its watchers.
    let extra = services + watchers;
    let probe = probe(&shared, extra);
    until("probe up", long, || s.extras_up.load(Ordering::Relaxed) == 1).await;
    let probed = size.probed_watchers();
    let mut times = Vec::new();
    let mut lasts = Vec::new();
    for round in 0..size.rounds {
        tokio::time::sleep(Duration::from_millis(200)).await;
        while probe_rx.try_recv().is_ok() {}
        let registering = round % 2 == 0;
        let want = if registering { ROLES + 1 } else { ROLES };
        s.probing.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        probe.with(|c| c.set_available(registering));
        let mut seen = vec![false; watchers];
        let mut reached = 0;
        let mut last = 0.0;
        while reached < probed {
            let (index, at, count) = tokio::time::timeout(Duration::from_secs(60), probe_rx.recv())
                .await
                .expect("scale: fan-out: watchers not reached within 60 s")
                .unwrap();
            if count == want && !std::mem::replace(&mut seen[index], true) {
                reached += 1;
                last = at.duration_since(t0).as_secs_f64() * 1e3;
                times.push(last);
            }
        }
        s.probing.store(false, Ordering::Relaxed);
        lasts.push(last);
    }
    eprintln!("scale: fan-out: {} rounds of one change to {probed} watchers", size.rounds);
    figures.push(lower(format!("  a change to {probed} watchers: p50"), "ms", percentile(&mut times, 50.0)));
    figures.push(lower("  a change to its watchers: p99", "ms", percentile(&mut times, 99.0)));
    figures.push(lower("  a change to its watchers: last, median", "ms", percentile(&mut lasts, 50.0)));
    figures.push(lower("  a change to its watchers: last, worst", "ms", percentile(&mut lasts, 100.0)));

    // (d) Lookups/s from a few sessions, 64 in flight each.
    let lookers: Vec<_> =
        (0..size.lookup_sessions).map(|n| looker(&shared, &size, n, extra + 1 + n)).collect();
    let want_up = 1 + size.lookup_sessions;
    until("lookup sessions up", long, || s.extras_up.load(Ordering::Relaxed) == want_up).await;
    let window = 64;
    let first = (size.lookup_sessions * window) as u64;
    s.lookups_left.store(size.lookups as u64 - first, Ordering::Relaxed);
    let started = Instant::now();
    for (n, h) in lookers.iter().enumerate() {
        h.with(|c| {
            for i in 0..window {
                c.lookup(
                    RoleQuery::parse(&format!("svc-{}@1.x", (n * window + i) % services.min(1000))).unwrap(),
                );
            }
        });
    }
    until("lookups", long, || s.lookups_done.load(Ordering::Relaxed) == size.lookups as u64).await;
    let lookup_rate = size.lookups as f64 / started.elapsed().as_secs_f64();
    figures.push(higher(
        format!("  lookups/s ({} sessions × {window} at once)", size.lookup_sessions),
        "/s",
        lookup_rate,
    ));

    // (e) Churn: register/unregister cycles, watchers attached.
    let churn_base = extra + 1 + size.lookup_sessions;
    let churners: Vec<_> =
        (0..size.churn_sessions).map(|n| churner(&shared, &size, n, churn_base + n)).collect();
    let want_up = want_up + size.churn_sessions;
    until("churn sessions up", long, || s.extras_up.load(Ordering::Relaxed) == want_up).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pushes_before = s.pushes.load(Ordering::Relaxed);
    s.churning.store(true, Ordering::Relaxed);
    let started = Instant::now();
    for h in &churners {
        h.with(|c| {
            c.set_available(false);
            c.set_available(true);
        });
    }
    tokio::time::sleep(size.churn_for).await;
    let changes = s.changes.load(Ordering::Relaxed);
    let churn_secs = started.elapsed().as_secs_f64();
    s.churning.store(false, Ordering::Relaxed);
    let pushes = s.pushes.load(Ordering::Relaxed) - pushes_before;
    figures.push(higher(
        format!("  churn: changes/s ({} sessions)", size.churn_sessions),
        "/s",
        changes as f64 / churn_secs,
    ));
    figures.push(higher("  churn: watch updates received/s", "/s", pushes as f64 / churn_secs));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for h in lookers.iter().map(|h| &h.task).chain(churners.iter().map(|h| &h.task)) {
        h.abort();
    }

    // (c) Restart: SIGKILL, start again on the same port; the clients' own
    // backoff is the only pacing from here on.
    shared.dial.add_permits(Semaphore::MAX_PERMITS - SETUP_IN_FLIGHT);
    let base = services + watchers;
    let dials_before = s.dials.load(Ordering::Relaxed);
    let connects_before = s.connects.load(Ordering::Relaxed);
    lock(&s.failures).clear();
    let refused_before = s.dial_failures.load(Ordering::Relaxed);
    let failed_before = s.no_session.load(Ordering::Relaxed);
    let own_cpu_before = cpu_secs("self");
    let killed = Instant::now();
    drop(registry);
    registry = start_registry(bin, &args).0;
    let restarted = killed.elapsed();
    let sessions_up = || s.services_up.load(Ordering::Relaxed) + s.watchers_up.load(Ordering::Relaxed);
    // Sessions established since the kill (each base session once, unless
    // one failed again), and established now.
    let back = || (s.connects.load(Ordering::Relaxed) - connects_before) as usize;
    until("half the sessions back", long, || back() >= base / 2).await;
    let half = killed.elapsed();
    until("all sessions back", long, || back() >= base && sessions_up() == base).await;
    let all_up = killed.elapsed();
    until("all registrations and watches back", long, || {
        s.registered.load(Ordering::Relaxed) == instances && s.answered.load(Ordering::Relaxed) == watchers
    })
    .await;
    let everything = killed.elapsed();
    let registry_cpu = cpu_secs(&registry.pid().to_string());
    let own_cpu = cpu_secs("self") - own_cpu_before;
    let dials = s.dials.load(Ordering::Relaxed) - dials_before;
    let refused = s.dial_failures.load(Ordering::Relaxed) - refused_before;
    let failed = s.no_session.load(Ordering::Relaxed) - failed_before;
    figures.push(lower("  restart (SIGKILL): registry up again", "s", restarted.as_secs_f64()));
    figures.push(lower("  restart: half the sessions back", "s", half.as_secs_f64()));
    figures.push(lower("  restart: all sessions back", "s", all_up.as_secs_f64()));
    figures.push(lower("  restart: all registrations, watches back", "s", everything.as_secs_f64()));
    figures.push(lower("  restart: connects per session", "×", dials as f64 / base as f64));
    figures.push(lower("  restart: CPU used, registry", "s", registry_cpu));
    figures.push(lower("  restart: CPU used, bench clients", "s", own_cpu));
    figures.push(lower("  restart: connects refused (registry down)", "", refused as f64));
    figures.push(lower("  restart: streams refused before session", "", failed as f64));
    figures.push(lower("  restart: registry RSS after", "MB", kib(&registry) / 1024.0));
    for (why, count) in lock(&s.failures).iter() {
        eprintln!("scale: restart: {count} streams ended before a session: {why}");
    }
    assert_eq!(s.refused.load(Ordering::Relaxed), 0, "scale: the registry refused registrations");

    for h in service_handles.iter().map(|h| &h.task).chain(watcher_handles.iter().map(|h| &h.task)) {
        h.abort();
    }
    probe.task.abort();
    drop(registry);
    eprintln!("scale: done in {:.1} s", begun.elapsed().as_secs_f64());
    figures
}
