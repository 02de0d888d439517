//! `seaport-proxy`: serves a role found in the registry on a local port. Each
//! client connection is a stream on the link to one instance (one link per
//! instance, opened on first need and reused), chosen by the balance
//! strategy, failing over to the next instance until one's service has
//! reached its backend. A UDP port's client addresses are flows on the same
//! links (`udp`).

mod client;
mod gateway;
mod ports;
mod udp;

pub use client::{Client, ClientOptions, LookupError, MAX_ROUTES, MAX_WATCHES, Stream, Watch};

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use seaport_net::allow::AllowList;
use seaport_net::cli::{ClientArgs, Failure, HOUR, MINUTE, duration_in};
use seaport_net::control::{At, ControlHandle};
use seaport_net::event::{Event, emit};
use seaport_net::identity::random_u64;
use seaport_net::lock::lock;
use seaport_net::metrics::readiness;
use seaport_net::pool::Links;
use seaport_net::reach::MeetAnswer;
use seaport_net::serve::drain;
use seaport_proto::client::proxy::{free_slot, take_slot, watch_slot};
use seaport_proto::client::set::is_same_instance;
use seaport_proto::client::{ProxyClient, ProxyEvent, RegistryClient, SetView, Strategy};
use seaport_proto::keys::PublicKey;
use seaport_proto::message::Instance;
use seaport_proto::role::{Protocol, RoleQuery};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

/// Look a role up in the registry and serve it on a local port, as if the
/// service ran here.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples (REGKEY: the 64-character key the registry printed):\n  seaport-proxy REGKEY -p 6000 -r couchdb@3.x\n  curl http://127.0.0.1:6000/\n  seaport-proxy REGKEY --map couchdb@3.x=6000 --map redis@7=6379\n  seaport-proxy REGKEY --map dns@1=5353/udp --map web@1=8080\n  dig @127.0.0.1 -p 5353 example.lan"
)]
pub struct Args {
    /// Registry, identity and DHT options, shared with the other client binary.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The local port to serve on (0: any free port, printed on stdout).
    #[arg(short, long, value_name = "PORT", requires = "role")]
    pub port: Option<u16>,
    /// The role and npm version range wanted, e.g. couchdb@3.x or couchdb@^3.2.0.
    #[arg(short, long, value_name = "ROLE@RANGE", requires = "port", value_parser = |s: &str| RoleQuery::parse(s).map_err(|e| e.to_string()))]
    pub role: Option<RoleQuery>,
    /// The -p/-r port is UDP: each client address is a flow to one instance
    /// of a role whose services forward UDP (`seaport-service --udp`).
    #[arg(long, requires = "port")]
    pub udp: bool,
    /// Serve a role on a local port, e.g. couchdb@3.x=6000, or a UDP port
    /// with /udp, e.g. dns@1=5353/udp (repeatable; beside or instead of
    /// -p/-r): one process, one registry session and one link per service
    /// instance, whatever the number of roles.
    #[arg(long = "map", value_name = "ROLE@RANGE=PORT[/udp]", value_parser = parse_mapping)]
    pub map: Vec<Mapping>,
    /// Serve HTTP/1.1 for every role on this address (e.g. 127.0.0.1:8000):
    /// /role/ROLE@RANGE/PATH to an instance, /instance/KEY/PATH to one
    /// service, /list/ROLE@RANGE the instances as JSON. Bodies stream both
    /// ways, WebSocket upgrades pass through.
    #[arg(long, value_name = "ADDR")]
    pub gateway: Option<SocketAddr>,
    /// With --gateway, also route by Host: ROLE.DOMAIN goes to an instance
    /// of ROLE (any version), the path unchanged (e.g. --gateway-domain
    /// seaport.localhost: then couchdb.seaport.localhost:8000 reaches couchdb).
    #[arg(long, value_name = "DOMAIN", requires = "gateway",
          value_parser = |s: &str| Ok::<_, String>(s.trim_matches('.').to_ascii_lowercase()))]
    pub gateway_domain: Option<String>,
    /// The local address to bind the port on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
    /// How to spread connections over instances: first, round-robin, random or hash.
    #[arg(long, value_name = "STRATEGY", default_value = "round-robin",
          value_parser = PossibleValuesParser::new(["first", "round-robin", "random", "hash"])
              .try_map(|s| s.parse::<Strategy>()))]
    pub balance: Strategy,
    /// How long a client waits for a first instance before it is closed (0s to 1h).
    #[arg(long, value_name = "DURATION", default_value = "10s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::ZERO, HOUR))]
    pub connect_timeout: Duration,
    /// Use only instances whose key is one of these (repeatable), whatever
    /// the registry answers: pins the services this proxy trusts.
    #[arg(long = "service-key", value_name = "KEY", value_parser = |s: &str| s.parse::<PublicKey>().map_err(|e| e.to_string()))]
    pub service_keys: Vec<PublicKey>,
    /// How long one attempt to reach an instance (TCP connect and handshake)
    /// may take before the next instance is tried (100ms to 1m). A frozen
    /// instance costs a new client this long, once per --ban.
    #[arg(long, value_name = "DURATION", default_value = "3s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::from_millis(100), MINUTE))]
    pub dial_timeout: Duration,
    /// How long a link whose path is lost (a registry relaying it died, a
    /// NAT forgot it, an address went away) waits to be resumed on another
    /// path before its streams are reset (1s to 10m). Streams ride through
    /// such a loss unharmed when a path comes back within it.
    #[arg(long, value_name = "DURATION", default_value = "10s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::from_secs(1), 10 * MINUTE))]
    pub resume_within: Duration,
    /// After a meeting, wait this long before punching (0s to 1m; default:
    /// at once). The relay starts at its usual time, so a link starts
    /// relayed and moves, with its streams, to the punched path once that is
    /// up: for trying that move, or to keep punching out of the first
    /// moment of a connection.
    #[arg(long, value_name = "DURATION", default_value = "0s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::ZERO, MINUTE))]
    pub punch_after: Duration,
    /// How long a failed instance is avoided (0s to 1h).
    #[arg(long, value_name = "DURATION", default_value = "30s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::ZERO, HOUR))]
    pub ban: Duration,
    /// On SIGTERM, how long open connections may take to finish (0s to 1h).
    #[arg(long, value_name = "DURATION", default_value = "10s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::ZERO, HOUR))]
    pub drain: Duration,
    /// Do not tell services where clients connect from. A service started
    /// with --proxy-protocol then gives its backend `PROXY UNKNOWN` (v1) or
    /// no address (v2; the proxy's key is still given, the link proves it).
    #[arg(long)]
    pub hide_client_address: bool,
    /// Send what a client has sent when its connection opens (a request, a
    /// command, a TLS ClientHello: up to 16 KiB) with the stream's open, so
    /// the backend has it a round trip sooner. The trade: a client whose
    /// service dies or does not answer in --dial-timeout after those bytes
    /// went is disconnected rather than sent to another instance (the bytes
    /// may have reached the backend). A refused stream still fails over.
    #[arg(long)]
    pub early_data: bool,
    /// UDP ports: how long a client address's flow lives without a datagram
    /// either way (1s to 1h); its next datagram then starts a new flow.
    #[arg(long, value_name = "DURATION", default_value = "60s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::from_secs(1), HOUR))]
    pub flow_idle: Duration,
    /// UDP ports: most flows (client addresses) all of them together serve
    /// at once (1 or more); a datagram from one more client is dropped.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_flows: u32,
}

/// One role served on one local port.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// What is looked up.
    pub query: RoleQuery,
    /// Where it is served (0: any free port).
    pub port: u16,
    /// A TCP listener or a UDP socket; only instances forwarding the same
    /// protocol serve it.
    pub protocol: Protocol,
}

fn parse_mapping(text: &str) -> Result<Mapping, String> {
    let (query, port) = text.rsplit_once('=').ok_or_else(|| {
        format!("{text:?} is not ROLE@RANGE=PORT[/udp], e.g. couchdb@3.x=6000 or dns@1=5353/udp")
    })?;
    let query = RoleQuery::parse(query).map_err(|e| e.to_string())?;
    let (port, protocol) = match port.split_once('/') {
        None => (port, Protocol::Tcp),
        Some((port, "tcp")) => (port, Protocol::Tcp),
        Some((port, "udp")) => (port, Protocol::Udp),
        Some((_, other)) => {
            return Err(format!("{other:?} is not a protocol: write PORT/udp, or PORT for TCP"));
        }
    };
    let port = port.parse().map_err(|_| format!("{port:?} is not a port (0 to 65535)"))?;
    Ok(Mapping { query, port, protocol })
}

impl Args {
    /// The client these flags ask for.
    pub fn client_options(&self) -> Result<ClientOptions, Failure> {
        let mut options = ClientOptions::new(self.client.registry.clone(), self.client.keypair()?);
        options.bootstrap = self.client.bootstrap.clone().unwrap_or_default().0;
        options.balance = self.balance;
        options.connect_timeout = self.connect_timeout;
        options.dial_timeout = self.dial_timeout;
        options.service_keys = self.service_keys.clone();
        options.ban = self.ban;
        options.punch_after = self.punch_after;
        options.resume_within = self.resume_within;
        options.hide_client_address = self.hide_client_address;
        options.early_data = self.early_data;
        Ok(options)
    }

    /// What to serve on ports: -p/-r first, then each --map.
    fn mappings(&self) -> Vec<Mapping> {
        let mut mappings = self.map.clone();
        if let (Some(port), Some(query)) = (self.port, self.role.clone()) {
            let protocol = if self.udp { Protocol::Udp } else { Protocol::Tcp };
            mappings.insert(0, Mapping { query, port, protocol });
        }
        mappings
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs until SIGINT/SIGTERM; errors are one line for the user.
pub async fn run(args: Args) -> Result<(), Failure> {
    seaport_net::event::print_events(args.client.json);
    let mappings = args.mappings();
    if mappings.is_empty() && args.gateway.is_none() {
        return Err(Failure::Usage(
            "nothing to serve: give -p PORT -r ROLE@RANGE, --map ROLE@RANGE=PORT or --gateway ADDR".into(),
        ));
    }
    let options = args.client_options()?;
    let gateway_listener = match args.gateway {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            format!("cannot listen on {addr} for the gateway: {e}; choose another port or address")
        })?),
        None => None,
    };
    let mut listeners = Vec::new();
    for mapping in &mappings {
        // With port 0 the kernel picks the port: report that one, not 0.
        listeners.push(ports::bind(mapping, args.bind).await?);
    }
    // Ready while an instance of every role served is known (`/ready`).
    for mapping in &mappings {
        let query = &mapping.query;
        readiness().set(&format!("role {query}"), Some(format!("no instance of {query} known")));
    }
    // Lives as long as `run`: dropping it stops the HTTP server.
    let (_http_stop, http_stop) = watch::channel(false);
    seaport_net::http::start(args.client.metrics, None, http_stop).await?;
    // What a service's --allow and a registry's --acl name this proxy by.
    tracing::info!(key = %options.keypair.public(), "this proxy's key (for services' --allow lists and the registry's --acl)");
    let client = Arc::new(Client::start(options)?);
    // The ports' queries take the first slots, the gateway's routes the
    // next as its requests name them.
    let mut slots = Vec::new();
    for (mapping, (_, port)) in mappings.iter().zip(&listeners) {
        let served = Served::new(mapping.query.clone(), Some(*port), mapping.protocol);
        slots.push(
            client.watcher.add(served).ok_or_else(|| Failure::Usage("too many roles to serve".into()))?,
        );
    }

    // One accept loop per mapping, all stopped by the one shutdown signal.
    let (stop_tx, stop) = watch::channel(false);
    let mut gateway_task = None;
    if let Some(listener) = gateway_listener {
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        tracing::info!(
            "HTTP gateway on http://{addr}/ (/role/ROLE@RANGE/, /instance/KEY/, /list/ROLE@RANGE)"
        );
        let gateway = Arc::new(gateway::Gateway {
            client: client.clone(),
            domain: args.gateway_domain.clone(),
            idle: Arc::default(),
        });
        gateway_task = Some(tokio::spawn(gateway.serve(listener, stop.clone())));
    }
    let reach = &client.reach;
    let mut served = ports::Ports::new(ports::PortContext {
        bind: args.bind,
        watcher: client.watcher.clone(),
        tcp: ServedPort {
            query: 0,
            generation: 0,
            slots: client.watcher.slots.clone(),
            reach: reach.clone(),
        },
        udp: udp::UdpPort {
            query: 0,
            name: String::new(),
            view: reach.view.clone(),
            links: reach.links.clone(),
            pinned: reach.pinned.clone(),
            idle: args.flow_idle,
            cap: udp::FlowCap::new(args.max_flows as usize),
            warned: Arc::default(),
        },
        drain: args.drain,
    });
    for ((mapping, (listener, port)), slot) in mappings.iter().zip(listeners).zip(slots) {
        served.serve(mapping.clone(), listener, port, slot);
    }
    // With --config, SIGHUP rereads the file: its mappings are served.
    let (reload_tx, mut reloads) = mpsc::unbounded_channel();
    let _hangups = AbortOnDrop(tokio::spawn(seaport_net::signal::on_hangup(move || {
        let _ = reload_tx.send(());
    })));
    let shutdown = seaport_net::signal::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(()) = reloads.recv() => match &args.client.config {
                Some(path) => match seaport_net::config::reread::<Args>(path) {
                    Ok(new) => served.reconcile(&new.mappings()).await,
                    Err(e) => tracing::error!("config not reread, the one in force stays: {e}"),
                },
                None => tracing::info!("SIGHUP: no --config file to reread"),
            },
        }
    }
    tracing::info!("shutting down: draining open connections");
    emit(&Event::Draining);
    readiness().set("shutdown", Some("shutting down".to_owned()));
    seaport_net::notify::stopping();
    let _ = stop_tx.send(true);
    let mut conns = served.stop_all().await;
    if let Some(Ok(open)) = match gateway_task {
        Some(task) => Some(task.await),
        None => None,
    } {
        conns.push(open);
    }
    client.close().await;
    let limit = args.drain;
    let deadline = tokio::time::Instant::now() + limit;
    for open in conns {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        drain(open, left).await;
    }
    emit(&Event::Stopped);
    Ok(())
}

/// What the proxy does with its clients' events (one client per registry
/// of the set): their union is what connections choose from, and what the
/// stdout lines report.
struct Watcher {
    view: Arc<Mutex<SetView>>,
    /// Set once the control set exists (its events come after).
    control: std::sync::OnceLock<ControlHandle<ProxyClient>>,
    /// Set once the links exist.
    links: std::sync::OnceLock<Arc<Links>>,
    /// The service keys this proxy trusts (`--service-key`).
    pinned: Arc<AllowList>,
    /// What each query slot is for (`None`: a query dropped).
    slots: Arc<Mutex<Vec<Option<Served>>>>,
    answers: mpsc::UnboundedSender<MeetAnswer>,
    /// Bumped on every change of the union.
    changed: watch::Sender<u64>,
    state: Mutex<Watched>,
}

/// What one query slot is asked for and where it is served.
#[derive(Debug, Clone)]
struct Served {
    query: RoleQuery,
    /// The local port serving it; `None` for a gateway route.
    port: Option<u16>,
    protocol: Protocol,
    /// Tells this use of its slot from an earlier or later one (a slot is
    /// reused once freed): whoever chose the slot checks it is still theirs.
    generation: u64,
}

impl Served {
    fn new(query: RoleQuery, port: Option<u16>, protocol: Protocol) -> Served {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let generation = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Served { query, port, protocol, generation }
    }
}

/// Whether slot `index` of `slots` still holds generation `generation`.
fn is_current(slots: &Mutex<Vec<Option<Served>>>, index: usize, generation: u64) -> bool {
    lock(slots).get(index).and_then(Option::as_ref).is_some_and(|s| s.generation == generation)
}

/// The queries of `slots`, for the registries' clients.
fn query_slots(slots: &[Option<Served>]) -> Vec<Option<RoleQuery>> {
    slots.iter().map(|s| s.as_ref().map(|s| s.query.clone())).collect()
}

/// What the watcher reported so far.
#[derive(Default)]
struct Watched {
    /// Per query: the instances reported found (to report departures).
    known: Vec<Vec<Instance>>,
    /// Slots whose session is up.
    connected: BTreeSet<usize>,
    /// Every role served has had an instance (systemd was told).
    ready: bool,
}

impl Watcher {
    /// Asks every registry of the set for `served` too; returns its slot
    /// (`None` when no slot is left). A port's role is not ready until an
    /// instance is known.
    fn add(&self, served: Served) -> Option<usize> {
        if served.port.is_some() {
            let query = &served.query;
            readiness().set(&format!("role {query}"), Some(format!("no instance of {query} known")));
        }
        let queries = {
            let mut slots = lock(&self.slots);
            let index = take_slot(&mut slots, served)?;
            (index, query_slots(&slots))
        };
        self.tell_members(&queries.1);
        Some(queries.0)
    }

    /// Stops asking for slot `index`; what it found is forgotten (also
    /// while no registry is connected), and nothing waits for it to be ready.
    fn remove(&self, index: usize) {
        let (queries, gone) = {
            let mut slots = lock(&self.slots);
            let gone = free_slot(&mut slots, index);
            (query_slots(&slots), gone)
        };
        self.tell_members(&queries);
        if let Some(Served { query, port: Some(_), .. }) = &gone
            && !lock(&self.slots)
                .iter()
                .flatten()
                .any(|s| s.port.is_some() && s.query.to_string() == query.to_string())
        {
            readiness().set(&format!("role {query}"), None);
        }
        if let Some(known) = lock(&self.state).known.get_mut(index) {
            known.clear();
        }
        lock(&self.view).clear(index);
        self.update();
    }

    /// Gives each member the queries `queries`.
    fn tell_members(&self, queries: &[Option<RoleQuery>]) {
        if let Some(control) = self.control.get() {
            control.change_all(|client| client.set_slots(queries));
        }
    }

    /// Whether some registry of the set answered slot `index` (or refused it).
    fn answered(&self, index: usize) -> bool {
        let Some(control) = self.control.get() else { return false };
        control.members().iter().any(|m| lock(&m.client).is_answered(index))
    }

    /// Why the registries refused slot `index`, if every connected one did.
    fn refusal(&self, index: usize) -> Option<String> {
        let control = self.control.get()?;
        let members = control.members();
        let clients: Vec<_> = members.iter().map(|m| lock(&m.client)).collect();
        let connected: Vec<_> = clients.iter().filter(|c| c.is_connected()).collect();
        let refusals: Vec<&str> = connected.iter().filter_map(|c| c.refusal(index)).collect();
        (!refusals.is_empty() && refusals.len() == connected.len()).then(|| refusals.join("; "))
    }

    fn on_event(&self, at: At<'_>, event: &ProxyEvent) {
        match event {
            ProxyEvent::Connected => {
                lock(&self.state).connected.insert(at.slot);
                emit(&Event::Connected { addr: at.addr, member: at.slot });
                self.update();
            }
            ProxyEvent::Disconnected(reason) => {
                if lock(&self.state).connected.remove(&at.slot) {
                    emit(&Event::Disconnected { addr: at.addr, member: at.slot, reason: reason.to_string() });
                }
                self.update();
            }
            ProxyEvent::Instances { truncated, .. } => {
                if *truncated {
                    tracing::warn!(registry = %at.addr, "more instances match than the registry sent");
                }
                self.update();
            }
            ProxyEvent::MeetReady { id, ticket } => {
                let _ = self.answers.send((at.slot, *id, Ok(*ticket)));
            }
            ProxyEvent::MeetRefused { id, text } => {
                let _ = self.answers.send((at.slot, *id, Err(text.clone())));
            }
            ProxyEvent::Refused { id, code, text } => {
                let served = watch_slot(*id).and_then(|(i, _)| lock(&self.slots).get(i).cloned().flatten());
                let Some(Served { query, .. }) = &served else { return };
                // Another registry of the set may answer: what it answers is acted on.
                tracing::error!(registry = %at.addr, %code, %query, "registry refused the lookup: {text}; asking again after the next reconnect");
                emit(&Event::WatchRefused { query: query.clone(), text: text.clone() });
            }
            other => tracing::debug!(?other),
        }
    }

    /// Takes the union of the registries' answers anew, and reports what
    /// it changed. One update at a time, reported before the next is taken:
    /// the lines, `/ready` and the links follow the unions in order.
    fn update(&self) {
        let Some(control) = self.control.get() else { return };
        // The order of locks: the reports, the view, then each client in
        // slot order; only here are several held at once.
        let mut state = lock(&self.state);
        let mut view = lock(&self.view);
        let members = control.members();
        let slots = lock(&self.slots).clone();
        let changed = {
            let mut guards: Vec<_> = members.iter().map(|m| lock(&m.client)).collect();
            // A member made while a query came or went may have missed it.
            let queries = query_slots(&slots);
            for client in &mut guards {
                if !client.slots().eq(queries.iter().map(Option::as_ref)) {
                    client.set_slots(&queries);
                }
            }
            let clients: Vec<&ProxyClient> = guards.iter().map(|g| &**g).collect();
            view.update(&clients)
        };
        if changed.is_empty() {
            return;
        }
        for query in changed {
            let Some(Some(served)) = slots.get(query) else { continue };
            self.report(&mut state, query, served, view.instances_of(query));
        }
        // Links of instances that left go away: their streams finish.
        if let Some(links) = self.links.get() {
            links.retain(&view.all_instances());
        }
        drop((view, state));
        self.changed.send_modify(|n| *n += 1);
    }

    /// Says which instances of query `query` appeared and left. A gateway
    /// route (no port) is reported as found and lost, but nothing waits for it.
    fn report(&self, state: &mut Watched, query: usize, served: &Served, instances: &[Instance]) {
        let Served { query: wanted, port, protocol, .. } = served;
        let protocol = *protocol;
        // With --service-key, the others do not exist for this proxy.
        let admitted = instances.iter().filter(|i| self.pinned.admits(&i.key));
        // Nor do those of the other protocol, but they are worth a word:
        // the user probably mixed them up.
        let (now, other): (Vec<Instance>, Vec<Instance>) =
            admitted.cloned().partition(|i| i.role.protocol() == protocol);
        if let Some(port) = port
            && now.is_empty()
            && !other.is_empty()
        {
            let fix = match protocol {
                Protocol::Tcp => format!("serve it on a UDP port: --map {wanted}=PORT/udp, or -p PORT --udp"),
                Protocol::Udp => format!("serve it on a TCP port: --map {wanted}=PORT, without /udp"),
            };
            let theirs = other.first().map(|i| i.role.protocol()).unwrap_or_default();
            tracing::warn!(query = %wanted, "its instances forward {theirs}, but port {port} serves {protocol}: {fix}");
        }
        let before = state.known.get(query).cloned().unwrap_or_default();
        for gone in before.iter().filter(|b| !now.iter().any(|n| is_same_instance(b, n))) {
            tracing::info!(service = %gone.key, "service gone from the registry set");
            emit(&Event::Lost { key: gone.key, role: gone.role.clone() });
        }
        for found in now.iter().filter(|n| !before.iter().any(|b| is_same_instance(b, n))) {
            emit(&Event::Found { key: found.key, role: found.role.clone() });
            if let Some(port) = port {
                emit(&Event::Serving { port: *port, key: found.key });
            }
        }
        if state.known.len() <= query {
            state.known.resize(query + 1, Vec::new());
        }
        let empty = now.is_empty();
        if let Some(slot) = state.known.get_mut(query) {
            *slot = now;
        }
        if port.is_none() {
            return;
        }
        if empty && other.is_empty() {
            tracing::warn!(query = %wanted, "no instance matches the query right now");
        }
        let ready = format!("role {wanted}");
        readiness().set(&ready, empty.then(|| format!("no {protocol} instance of {wanted} known")));
        // Ready once every port's role has an instance (systemd's After=).
        if !state.ready {
            let slots = lock(&self.slots);
            let ports =
                slots.iter().enumerate().filter(|(_, s)| s.as_ref().is_some_and(|s| s.port.is_some()));
            if ports.map(|(i, _)| state.known.get(i)).all(|k| k.is_some_and(|k| !k.is_empty())) {
                state.ready = true;
                seaport_net::notify::ready();
            }
        }
    }
}

/// One local port's mapping: what each of its client connections needs.
#[derive(Clone)]
struct ServedPort {
    /// Which of the proxy's queries the port serves.
    query: usize,
    /// The slot's generation when the port took it.
    generation: u64,
    /// Every slot's use, to check the port's is still its own.
    slots: Arc<Mutex<Vec<Option<Served>>>>,
    reach: Reaching,
}

/// What a TCP port's connections and the gateway's requests share to reach
/// an instance: the instances known, how to choose, the links, the limits.
#[derive(Clone)]
struct Reaching {
    /// The union of the registries' answers, and how to choose from it.
    view: Arc<Mutex<SetView>>,
    links: Arc<Links>,
    /// The service keys this proxy trusts (`--service-key`).
    pinned: Arc<AllowList>,
    /// Bumped on every instance-set change.
    changed: watch::Receiver<u64>,
    /// How long a connection waits for an instance to be known.
    wait: Duration,
    /// How long opening a stream on an instance may take.
    dial: Duration,
}

impl ServedPort {
    /// One client connection: wait for an instance if none is known yet, then
    /// try instances in the strategy's order until one accepts a stream on
    /// its link (the service has reached its backend), and carry it. Nothing
    /// of the client's is read before that, so any instance may fail without
    /// the client seeing it.
    /// `peer` is the client's address as `accept` gave it.
    async fn serve_client(mut self, stream: TcpStream, peer: std::net::SocketAddr) -> Result<(), String> {
        let _ = stream.set_nodelay(true);
        let deadline = tokio::time::Instant::now() + self.reach.wait;
        let order = loop {
            // A port closed by a config reload gives its slot to another
            // query: its waiting clients are not served that one.
            if !is_current(&self.slots, self.query, self.generation) {
                return Err("the port was closed (config reread)".into());
            }
            let mut order =
                lock(&self.reach.view).choose_for(self.query, seaport_net::clock::now(), random_u64());
            order.retain(|i| self.reach.pinned.admits(&i.key));
            let any = !order.is_empty();
            order.retain(|i| i.role.protocol() == Protocol::Tcp);
            if !order.is_empty() {
                break order;
            }
            if any {
                return Err(
                    "the role's instances forward UDP: serve it on a UDP port (--map ROLE=PORT/udp)".into()
                );
            }
            match tokio::time::timeout_at(deadline, self.reach.changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(format!("no instance found within {:?}", self.reach.wait)),
            }
        };
        let from = Some(peer);
        let socket = Arc::new(seaport_net::link::StreamSocket::Tcp(stream));
        let mut failures = Vec::new();
        let mut opened = None;
        for instance in order {
            match self.reach.links.open(&instance, socket.clone(), from, self.reach.dial).await {
                Ok(stream) => {
                    seaport_net::serve::record_peer_key(&instance.key);
                    opened = Some(stream);
                    break;
                }
                Err(failure) if !failure.may_try_another() => {
                    lock(&self.reach.view).report_failure(seaport_net::clock::now(), instance.key);
                    return Err(format!("service {}: {failure}", instance.key));
                }
                Err(failure) => {
                    tracing::warn!(service = %instance.key, "instance failed, trying the next: {failure}");
                    lock(&self.reach.view).report_failure(seaport_net::clock::now(), instance.key);
                    failures.push(failure.to_string());
                }
            }
        }
        // The candidates and their failures are gone before the stream runs:
        // an idle connection holds only what it needs.
        let Some((link, id)) = opened else {
            return Err(format!("every instance failed: {}", failures.join("; ")));
        };
        drop(failures);
        let moved = link.run(id).await.map_err(|e| e.to_string())?;
        tracing::debug!(sent = moved.sent, received = moved.received, "connection closed");
        Ok(())
    }
}
