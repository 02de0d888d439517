//! The proxy as a library: a [`Client`] keeps a session with every registry
//! of a set, looks ranges up, watches them, and opens streams to the
//! instances it finds, over one link per instance. The `seaport-proxy`
//! binary is a `Client` with ports and an HTTP gateway on top; a Rust
//! program uses the same one (the `seaport` crate re-exports it).
//!
//! Invariants: every range asked about holds one query slot of the
//! registry sessions while it is in use: a [`Watch`] until it is dropped;
//! a range named to [`Client::connect`] or [`Client::instances`] as a
//! *route*, of which at most [`MAX_ROUTES`] are kept (the least recently
//! used given up first), so a program that names ranges without end holds
//! a bounded number of them. A stream's bytes never pass through anything
//! but its link: [`Stream`] is the in-process end of the link's stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use seaport_net::allow::AllowList;
use seaport_net::cli::Failure;
use seaport_net::control::{At, ControlSet};
use seaport_net::identity::random_u64;
use seaport_net::link::{LocalStream, StreamSocket};
use seaport_net::lock::lock;
use seaport_net::pool::Links;
use seaport_net::reach::Introducer;
use seaport_net::target::{RegistryTarget, Resolver};
use seaport_proto::client::{ClientConfig, ProxyClient, ProxyEvent, SetView, Strategy};
use seaport_proto::keys::{Keypair, PublicKey};
use seaport_proto::link::LinkConfig;
use seaport_proto::message::Instance;
use seaport_proto::role::{Protocol, RoleQuery};
use tokio::sync::{mpsc, watch};

use crate::{AbortOnDrop, Reaching, Served, Watched, Watcher, is_current, query_slots};

/// Most ranges [`Client::connect`] and [`Client::instances`] (and so the
/// gateway) keep watching at once, below a registry's default of 64 per
/// session so that a proxy's ports keep theirs.
pub const MAX_ROUTES: usize = 32;

/// Most [`Watch`]es of one client at once: with the routes, below a
/// registry's default of 64 watched ranges per session.
pub const MAX_WATCHES: usize = 16;

/// How a [`Client`] finds and reaches services. [`ClientOptions::new`] has
/// `seaport-proxy`'s defaults; change a field to change one.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientOptions {
    /// The registry set: `KEY` (found in the DHT) or `KEY@HOST:PORT[,...]`.
    pub registry: RegistryTarget,
    /// This client's identity: what services' `--allow` and a registry's
    /// `--acl` name it by.
    pub keypair: Keypair,
    /// DHT nodes to start from (`HOST:PORT`), for a bare `KEY`; empty:
    /// the public DHT's.
    pub bootstrap: Vec<String>,
    /// How to spread streams over instances (`--balance`).
    pub balance: Strategy,
    /// How long [`Client::connect`] waits for an instance to be known
    /// (`--connect-timeout`).
    pub connect_timeout: Duration,
    /// How long one attempt to reach an instance may take before the next
    /// is tried (`--dial-timeout`).
    pub dial_timeout: Duration,
    /// Use only instances with one of these keys; empty: any (`--service-key`).
    pub service_keys: Vec<PublicKey>,
    /// How long a failed instance is avoided (`--ban`).
    pub ban: Duration,
    /// After a meeting, how long to wait before punching (`--punch-after`).
    pub punch_after: Duration,
    /// How long a link whose path is lost waits to be resumed on another
    /// (`--resume-within`).
    pub resume_within: Duration,
    /// Do not tell services where clients connect from (`--hide-client-address`).
    pub hide_client_address: bool,
    /// Streams opened for TCP clients carry their first bytes (`--early-data`).
    pub early_data: bool,
}

impl ClientOptions {
    /// The options of `seaport-proxy REGISTRY` with no other flag, with
    /// `keypair` as its identity.
    pub fn new(registry: RegistryTarget, keypair: Keypair) -> ClientOptions {
        ClientOptions {
            registry,
            keypair,
            bootstrap: Vec::new(),
            balance: Strategy::RoundRobin,
            connect_timeout: Duration::from_secs(10),
            dial_timeout: Duration::from_secs(3),
            service_keys: Vec::new(),
            ban: Duration::from_secs(30),
            punch_after: Duration::ZERO,
            resume_within: Duration::from_secs(10),
            hide_client_address: false,
            early_data: false,
        }
    }
}

/// Why a range could not be looked up or reached.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LookupError {
    /// Too many ranges are in use at once (see [`MAX_ROUTES`] and
    /// [`MAX_WATCHES`]), or this range's route was given up to a newer one
    /// while it waited.
    Busy,
    /// Every registry that answered refused the lookup (its ACL, say).
    Refused {
        /// The range.
        query: RoleQuery,
        /// What the registries said.
        why: String,
    },
    /// No registry answered within the connect timeout.
    NoAnswer {
        /// The range.
        query: RoleQuery,
        /// How long it waited.
        waited: Duration,
    },
    /// No instance of the range was known within the connect timeout.
    NotFound(RoleQuery),
    /// Instances were known, and each failed to take a stream.
    Unreachable(String),
    /// The client was closed (or dropped).
    Closed,
}

impl std::fmt::Display for LookupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LookupError::Busy => {
                write!(f, "too many ranges in use at once (at most {MAX_ROUTES}); try again")
            }
            LookupError::Refused { query, why } => write!(f, "the registry refused {query}: {why}"),
            LookupError::NoAnswer { query, waited } => {
                write!(f, "no registry answered for {query} within {waited:?}")
            }
            LookupError::NotFound(query) => write!(f, "no instance of {query} is registered"),
            LookupError::Unreachable(why) => write!(f, "every instance failed: {why}"),
            LookupError::Closed => f.write_str("the client was closed"),
        }
    }
}

impl std::error::Error for LookupError {}

/// A range's route: its query slot, and which use of the slot is the route's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) index: usize,
    pub(crate) generation: u64,
}

/// Sessions with a registry set, and links to the instances found there.
/// Dropping it closes the sessions (without waiting; [`Client::close`]
/// waits), ends its [`Watch`]es, and closes each link once its streams
/// are gone.
pub struct Client {
    pub(crate) watcher: Arc<Watcher>,
    /// The instances, how to choose, the links and their limits.
    pub(crate) reach: Reaching,
    /// `None` once closed.
    control: Mutex<Option<ControlSet<ProxyClient>>>,
    /// Range → its slot and last use.
    routes: Mutex<HashMap<String, (Slot, Instant)>>,
    /// Watches live now (at most [`MAX_WATCHES`]).
    watches: Arc<AtomicUsize>,
    /// True once closed; its drop (the client's) ends every [`Watch`] too.
    closed: watch::Sender<bool>,
    key: PublicKey,
    _following: AbortOnDrop,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("key", &self.key).finish_non_exhaustive()
    }
}

impl Client {
    /// Starts following the registry set of `options` (in the background:
    /// this returns at once). Must be called within a tokio runtime.
    ///
    /// # Errors
    /// A [`Failure::Usage`] for options that cannot work.
    pub fn start(options: ClientOptions) -> Result<Client, Failure> {
        let ClientOptions { registry, keypair, bootstrap, .. } = &options;
        let resolver = Resolver::for_target(registry, bootstrap);
        // Tells this process's sessions from those of others with the same
        // seed; each registry of the set gets its own (slot added).
        let process = seaport_net::identity::entropy_u64();
        let slots: Arc<Mutex<Vec<Option<Served>>>> = Arc::default();
        let make = {
            let (keypair, registry, slots) = (keypair.clone(), registry.key, slots.clone());
            move |slot: usize| {
                let mut config = ClientConfig::new(keypair.clone(), registry);
                config.process = process.wrapping_add(slot as u64).max(1);
                ProxyClient::with_slots(config, query_slots(&lock(&slots)))
            }
        };
        let view = Arc::new(Mutex::new(SetView::new(0, options.balance, keypair.public(), options.ban)));
        // Bumped on every instance-set change, so waiting streams wake up.
        let (changed_tx, changed) = watch::channel(0u64);
        // The registries' answers to meeting requests, for the introducer below.
        let (answers_tx, answers) = mpsc::unbounded_channel();
        let pinned = Arc::new(AllowList::new(options.service_keys.clone(), None).map_err(Failure::Usage)?);
        let watcher = Arc::new(Watcher {
            view: view.clone(),
            control: std::sync::OnceLock::new(),
            links: std::sync::OnceLock::new(),
            pinned: pinned.clone(),
            slots,
            answers: answers_tx,
            changed: changed_tx,
            state: Mutex::new(Watched::default()),
        });
        // Weak: the sessions' shared state outlives nothing of the client's
        // (the watcher holds the sessions, not the other way round).
        let on_event = {
            let watcher = Arc::downgrade(&watcher);
            Arc::new(move |at: At<'_>, event: &ProxyEvent| {
                if let Some(watcher) = watcher.upgrade() {
                    watcher.on_event(at, event);
                }
            })
        };
        let control = ControlSet::spawn(registry.clone(), resolver, make, on_event);
        let _ = watcher.control.set(control.handle());
        // A registry let go of (the set no longer lists it) counts no more.
        let mut members_changed = control.handle().changes();
        let following = watcher.clone();
        let following = AbortOnDrop(tokio::spawn(async move {
            while members_changed.changed().await.is_ok() {
                following.update();
            }
        }));
        let introducer = Introducer::new(control.handle(), answers).with_punch_after(options.punch_after);
        let link_config = LinkConfig { resume_within: options.resume_within, ..LinkConfig::default() };
        let links = Arc::new(
            Links::new(keypair.clone(), link_config, options.dial_timeout)
                .with_introducer(introducer)
                .hiding_client_addresses(options.hide_client_address)
                .sending_early_data(options.early_data),
        );
        let _ = watcher.links.set(links.clone());
        let reach = Reaching {
            view,
            links,
            pinned,
            changed,
            wait: options.connect_timeout,
            dial: options.dial_timeout,
        };
        Ok(Client {
            watcher,
            reach,
            control: Mutex::new(Some(control)),
            routes: Mutex::default(),
            watches: Arc::default(),
            closed: watch::channel(false).0,
            key: keypair.public(),
            _following: following,
        })
    }

    /// This client's public key.
    pub fn key(&self) -> PublicKey {
        self.key
    }

    /// The TCP instances of `query` that a registry of the set knows now
    /// (empty if none), once one has answered. The range stays watched as
    /// a route, so asking again is answered at once.
    ///
    /// # Errors
    /// When no registry answered within the connect timeout, or every one
    /// refused, or the routes are all in use.
    pub async fn instances(&self, query: &RoleQuery) -> Result<Vec<Instance>, LookupError> {
        self.route(query).await.map(|(instances, _)| instances)
    }

    /// A stream to an instance of `query` (TCP): the instances are tried in
    /// the balance strategy's order until one's service has connected its
    /// backend. Waits up to the connect timeout for a first instance.
    ///
    /// # Errors
    /// As [`Client::instances`]; [`LookupError::NotFound`] when no instance
    /// was known in time; [`LookupError::Unreachable`] when every one failed.
    pub async fn connect(&self, query: &RoleQuery) -> Result<Stream, LookupError> {
        let deadline = tokio::time::Instant::now() + self.reach.wait;
        let mut changed = self.reach.changed.clone();
        let (instances, slot) = loop {
            let (instances, slot) = self.route(query).await?;
            if !instances.is_empty() {
                break (instances, slot);
            }
            if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                return Err(LookupError::NotFound(query.clone()));
            }
        };
        let mut failures = Vec::new();
        for instance in self.order(slot, &instances) {
            match self.open(&instance, None).await {
                Ok(local) => {
                    seaport_net::serve::record_peer_key(&instance.key);
                    return Ok(Stream { local, instance });
                }
                Err(e) => {
                    tracing::warn!(service = %instance.key, "instance failed, trying the next: {e}");
                    lock(&self.reach.view).report_failure(seaport_net::clock::now(), instance.key);
                    failures.push(e);
                }
            }
        }
        Err(LookupError::Unreachable(failures.join("; ")))
    }

    /// Watches `query`: its instances (TCP and UDP) as they change, until
    /// the [`Watch`] is dropped.
    ///
    /// # Errors
    /// [`LookupError::Busy`] with [`MAX_WATCHES`] watches already;
    /// [`LookupError::Closed`] once closed.
    pub fn watch(&self, query: &RoleQuery) -> Result<Watch, LookupError> {
        self.check_open()?;
        let taken = self
            .watches
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_WATCHES).then_some(n + 1));
        if taken.is_err() {
            return Err(LookupError::Busy);
        }
        let count = WatchCount(self.watches.clone());
        let served = Served::new(query.clone(), None, Protocol::Tcp);
        let generation = served.generation;
        let index = self.watcher.add(served).ok_or(LookupError::Busy)?;
        Ok(Watch {
            watcher: self.watcher.clone(),
            slot: Slot { index, generation },
            query: query.clone(),
            changed: self.reach.changed.clone(),
            closed: self.closed.subscribe(),
            last: None,
            _count: count,
        })
    }

    /// [`LookupError::Closed`] once closed.
    fn check_open(&self) -> Result<(), LookupError> {
        if *self.closed.borrow() { Err(LookupError::Closed) } else { Ok(()) }
    }

    /// Closes the registry sessions (each sends what it queued last) and
    /// asks every link to go away once its streams finish. Streams open now
    /// keep working until they end.
    pub async fn close(&self) {
        self.closed.send_replace(true);
        self.reach.links.go_away_all();
        let control = lock(&self.control).take();
        if let Some(control) = control {
            control.stop().await;
        }
    }

    /// A new stream on `instance`'s link (its service connects the backend
    /// first), its in-process end; `from` is the client's address, if any.
    pub(crate) async fn open(
        &self,
        instance: &Instance,
        from: Option<std::net::SocketAddr>,
    ) -> Result<LocalStream, String> {
        let (ours, theirs) = StreamSocket::pair();
        let (link, id) = self
            .reach
            .links
            .open(instance, Arc::new(ours), from, self.reach.dial)
            .await
            .map_err(|e| format!("{}: {e}", instance.key))?;
        tokio::spawn(async move {
            if let Err(e) = link.run(id).await {
                tracing::debug!("stream ended: {e}");
            }
        });
        Ok(theirs)
    }

    /// The TCP instances of `query` once a registry answered (watching it
    /// from now on), with its route.
    pub(crate) async fn route(&self, query: &RoleQuery) -> Result<(Vec<Instance>, Slot), LookupError> {
        self.check_open()?;
        let slot = self.slot_for(query).ok_or(LookupError::Busy)?;
        let deadline = tokio::time::Instant::now() + self.reach.wait;
        let mut changed = self.reach.changed.clone();
        loop {
            // Given up meanwhile: its slot may be another range's now.
            if !is_current(&self.watcher.slots, slot.index, slot.generation) {
                return Err(LookupError::Busy);
            }
            let known: Vec<Instance> = lock(&self.reach.view)
                .instances_of(slot.index)
                .iter()
                .filter(|i| self.reach.pinned.admits(&i.key) && i.role.protocol() == Protocol::Tcp)
                .cloned()
                .collect();
            if known.is_empty()
                && let Some(why) = self.watcher.refusal(slot.index)
            {
                // Not watched, then: the next lookup asks again.
                self.drop_route(query, slot);
                return Err(LookupError::Refused { query: query.clone(), why });
            }
            if !known.is_empty() || self.watcher.answered(slot.index) {
                return Ok((known, slot));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LookupError::NoAnswer { query: query.clone(), waited: self.reach.wait });
            }
            // An empty answer changes no union: look again shortly too.
            let pause = tokio::time::sleep(Duration::from_millis(20));
            tokio::select! {
                _ = changed.changed() => {}
                () = pause => {}
            }
        }
    }

    /// The route of `query`, added now if new (the least recently used one
    /// given up when all are taken).
    fn slot_for(&self, query: &RoleQuery) -> Option<Slot> {
        let mut routes = lock(&self.routes);
        let now = Instant::now();
        let name = query.to_string();
        if let Some((slot, used)) = routes.get_mut(&name) {
            *used = now;
            return Some(*slot);
        }
        if routes.len() >= MAX_ROUTES {
            let oldest = routes.iter().min_by_key(|(_, (_, used))| *used).map(|(q, _)| q.clone());
            if let Some((slot, _)) = oldest.and_then(|q| routes.remove(&q)) {
                self.watcher.remove(slot.index);
            }
        }
        let served = Served::new(query.clone(), None, Protocol::Tcp);
        let generation = served.generation;
        let index = self.watcher.add(served)?;
        let slot = Slot { index, generation };
        routes.insert(name, (slot, now));
        Some(slot)
    }

    /// Stops watching `query` if `slot` is still its route.
    fn drop_route(&self, query: &RoleQuery, slot: Slot) {
        let mut routes = lock(&self.routes);
        let name = query.to_string();
        if routes.get(&name).is_some_and(|(s, _)| *s == slot) {
            routes.remove(&name);
            self.watcher.remove(slot.index);
        }
    }

    /// `instances` in the balance strategy's order for the route `slot`.
    pub(crate) fn order(&self, slot: Slot, instances: &[Instance]) -> Vec<Instance> {
        let mut order =
            lock(&self.reach.view).choose_for(slot.index, seaport_net::clock::now(), random_u64());
        order.retain(|i| instances.contains(i));
        order
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Each link closes once its streams are gone.
        self.reach.links.go_away_all();
        // Not closed: the sessions are told to stop; nobody waits for them.
        if let Some(control) = lock(&self.control).take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(control.stop());
        }
    }
}

/// A stream to one instance: the program's end of a stream on the link to
/// its service, whose other end is the service's backend connection. Reads
/// and writes are the backend's bytes; `shutdown` ends this direction (the
/// backend reads end of file); dropping it without `shutdown` resets the
/// stream, as a TCP abort does.
#[derive(Debug)]
pub struct Stream {
    local: LocalStream,
    instance: Instance,
}

impl Stream {
    /// The instance this stream reaches.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }
}

seaport_net::local_stream_io!(Stream, local);

/// A range watched: [`Watch::changed`] yields its instances each time they
/// change. Dropping it stops watching.
pub struct Watch {
    watcher: Arc<Watcher>,
    slot: Slot,
    query: RoleQuery,
    changed: watch::Receiver<u64>,
    closed: watch::Receiver<bool>,
    /// What was yielded last.
    last: Option<Vec<Instance>>,
    _count: WatchCount,
}

/// Counts a live watch against [`MAX_WATCHES`] until dropped.
struct WatchCount(Arc<AtomicUsize>);

impl Drop for WatchCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("query", &self.query).field("last", &self.last).finish_non_exhaustive()
    }
}

impl Watch {
    /// The instances once they differ from those yielded last (the first
    /// call: once a registry answered, even with none).
    ///
    /// # Errors
    /// [`LookupError::Refused`] when every registry refused the range (it
    /// is asked again after the next reconnect: call again to wait for
    /// that); [`LookupError::Closed`] once the client is closed or dropped.
    pub async fn changed(&mut self) -> Result<Vec<Instance>, LookupError> {
        loop {
            if *self.closed.borrow()
                || !is_current(&self.watcher.slots, self.slot.index, self.slot.generation)
            {
                return Err(LookupError::Closed);
            }
            let now: Vec<Instance> = lock(&self.watcher.view)
                .instances_of(self.slot.index)
                .iter()
                .filter(|i| self.watcher.pinned.admits(&i.key))
                .cloned()
                .collect();
            if now.is_empty()
                && let Some(why) = self.watcher.refusal(self.slot.index)
                && self.last.is_none()
            {
                // Reported once; then it waits as for any change.
                self.last = Some(Vec::new());
                return Err(LookupError::Refused { query: self.query.clone(), why });
            }
            let answered = !now.is_empty() || self.watcher.answered(self.slot.index);
            if answered && self.last.as_ref() != Some(&now) {
                self.last = Some(now.clone());
                return Ok(now);
            }
            // Before the first answer an empty one changes no union: look
            // again shortly too.
            let first = self.last.is_none();
            let pause = async {
                if first {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                changed = self.changed.changed() => if changed.is_err() { return Err(LookupError::Closed) },
                closed = self.closed.changed() => if closed.is_err() { return Err(LookupError::Closed) },
                () = pause => {}
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if is_current(&self.watcher.slots, self.slot.index, self.slot.generation) {
            self.watcher.remove(self.slot.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn new_options_are_the_binarys_defaults() {
        let key =
            seaport_proto::keys::Keypair::from_seed(&seaport_proto::keys::Seed::from_bytes([7; 32])).public();
        let target = format!("{key}@127.0.0.1:4500");
        let args =
            crate::Args::try_parse_from(["seaport-proxy", &target, "--gateway", "127.0.0.1:0"]).unwrap();
        let flags = args.client_options().unwrap();
        let new = ClientOptions::new(flags.registry.clone(), flags.keypair.clone());
        assert_eq!(format!("{new:?}"), format!("{flags:?}"));
        // And a flag changes its field.
        let args =
            crate::Args::try_parse_from(["seaport-proxy", &target, "-p", "1", "-r", "a@1", "--ban", "5s"])
                .unwrap();
        assert_eq!(args.client_options().unwrap().ban, Duration::from_secs(5));
    }
}
