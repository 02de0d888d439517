//! `seaport-service`: answers links from proxies, connects each of their
//! streams to a local TCP backend (or, with `--udp`, each of their UDP
//! flows to a local UDP backend), and keeps its role registered with every
//! registry of the set.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use seaport_net::allow::AllowList;
use seaport_net::budget::Budget;
use seaport_net::cli::{ClientArgs, Failure, HOUR, MINUTE, duration_in};
use seaport_net::control::{At, ControlHandle, ControlSet};
use seaport_net::event::{Event, emit};
use seaport_net::handshake::HandshakeError;
use seaport_net::limit::Limit;
use seaport_net::link::{self, Backend, Responder, UdpBackend};
use seaport_net::lock::lock;
use seaport_net::metrics::{Refusal, metrics, readiness};
use seaport_net::reach;
use seaport_net::serve::{accept_until, drain};
use seaport_proto::client::{ClientConfig, ServiceClient, ServiceEvent};
use seaport_proto::keys::PublicKey;
use seaport_proto::link::LinkConfig;
use seaport_proto::meet::Ticket;
use seaport_proto::registry::Source;
use seaport_proto::role::{Protocol, RESERVED_TAG_PREFIX, Role, UDP_TAG};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

/// Expose a local TCP port under a role: proxies anywhere that look the role
/// up in the registry reach it over an encrypted link.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  seaport-service 5b64a8...0d45 -p 5984 -r couchdb@3.2.2\n  seaport-service 5b64a8...0d45@registry.lan:4500 -p 8080 -r web@1.4.0 --tag eu\n  seaport-service 5b64a8...0d45 -p 53 --udp -r dns@1.0.0\n  seaport-service 5b64a8...0d45 -p 53 --udp-port 53 -r dns@1.0.0   (TCP and UDP)"
)]
pub struct Args {
    /// Registry, identity and DHT options, shared with the other client binary.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The local TCP port of the backend to expose (a UDP port with --udp).
    #[arg(short, long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// The backend is a UDP port (DNS, WireGuard, syslog, a game server):
    /// each client address at a proxy becomes a flow with its own socket
    /// toward the backend. The role is registered as UDP and is served only
    /// by proxies asked for UDP (`--udp`, `--map ROLE=PORT/udp`). A UDP
    /// backend is not checked (UDP has nothing to connect to): the role is
    /// registered at once.
    #[arg(long, conflicts_with = "udp_port")]
    pub udp: bool,
    /// Start each backend connection with a PROXY protocol header (v1 or
    /// v2, as nginx's `listen ... proxy_protocol` and HAProxy's
    /// `accept-proxy` take): the backend sees the client's address and port
    /// as the proxy saw them instead of 127.0.0.1, and with v2 the proxy's
    /// public key (TLV 0xE0, 64 hex characters). Off by default: a backend
    /// that does not expect the header would take it for data. Health
    /// checks send a LOCAL (v2) or UNKNOWN (v1) header. TCP only.
    #[arg(long, value_name = "VERSION", conflicts_with = "udp",
          value_parser = PossibleValuesParser::new(["v1", "v2"]).try_map(|s| s.parse::<seaport_net::proxy_header::Version>()))]
    pub proxy_protocol: Option<seaport_net::proxy_header::Version>,
    /// Also forward UDP datagrams of the role to this local UDP port, beside
    /// TCP connections to -p (DNS on 53/tcp and 53/udp): the role is
    /// registered for both, and a proxy's TCP and UDP ports for it share
    /// one link to this service.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub udp_port: Option<u16>,
    /// The role and exact version offered, e.g. couchdb@3.2.2.
    #[arg(short, long, value_name = "ROLE@VERSION", value_parser = |s: &str| Role::parse(s).map_err(|e| e.to_string()))]
    pub role: Role,
    /// The backend's host.
    #[arg(long, value_name = "HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// A tag shown with lookups (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// TCP address for incoming links.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:0")]
    pub listen: SocketAddr,
    /// On SIGTERM, how long open streams may take to finish (0s to 1h).
    #[arg(long, value_name = "DURATION", default_value = "10s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::ZERO, HOUR))]
    pub drain: Duration,
    /// How often the backend is checked (a TCP connect); while it is down
    /// the role is withdrawn from the registry (100ms to 1h).
    #[arg(long, value_name = "DURATION", default_value = "2s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::from_millis(100), HOUR))]
    pub check_interval: Duration,
    /// With --udp or --udp-port: how long a flow lives without a datagram either way
    /// before its socket toward the backend is closed (1s to 1h).
    #[arg(long, value_name = "DURATION", default_value = "60s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::from_secs(1), HOUR))]
    pub flow_idle: Duration,
    /// With --udp or --udp-port: most flows (each a socket toward the backend) all proxies
    /// together may hold at once (1 or more); a datagram that would open
    /// one more is dropped.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_flows: u32,
    /// With --udp or --udp-port: most flows one proxy (by key) may hold at once (1 or more).
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_flows_per_proxy: u32,
    /// Accept links only from this proxy key (repeatable; default: any
    /// proxy, since the registry tells this service's key to anyone who looks
    /// its role up). See also --allow-file.
    #[arg(long = "allow", value_name = "KEY", value_parser = |s: &str| s.parse::<PublicKey>().map_err(|e| e.to_string()))]
    pub allow: Vec<PublicKey>,
    /// Accept links only from the keys in this file (one a line, `#`
    /// comments), with any --allow keys; reread on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub allow_file: Option<std::path::PathBuf>,
    /// Most streams (client connections) all proxies together may hold open
    /// at once (1 or more); more are refused, and a proxy tries another
    /// instance. An idle stream costs about 2 KiB here.
    #[arg(long, value_name = "N", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams: u32,
    /// Most streams one proxy (by key) may hold open at once (1 or more), so
    /// that one proxy cannot take them all. A proxy also holds at most 64
    /// links to a service.
    #[arg(long, value_name = "N", default_value_t = 12_288, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_proxy: u32,
    /// Answer no meetings: proxies reach this service only at its --listen
    /// address, never by hole punching or through the registry's relay.
    /// Also the default when --listen is a loopback address.
    #[arg(long)]
    pub no_meet: bool,
    /// How long a link handshake, and a stream's backend connect, may take (100ms to 10m).
    #[arg(long, value_name = "DURATION", default_value = "10s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::from_millis(100), 10 * MINUTE))]
    pub handshake_timeout: Duration,
    /// How long a link whose path is lost (a registry relaying it died, a
    /// NAT forgot it, an address went away) waits to be resumed on another
    /// path before its streams are reset (1s to 10m). Streams ride through
    /// such a loss unharmed when a path comes back within it.
    #[arg(long, value_name = "DURATION", default_value = "10s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::from_secs(1), 10 * MINUTE))]
    pub resume_within: Duration,
}

/// Runs until SIGINT/SIGTERM; errors are one line for the user.
pub async fn run(args: Args) -> Result<(), Failure> {
    seaport_net::event::use_json(args.client.json);
    if let Some(tag) = args.tags.iter().find(|t| t.starts_with(RESERVED_TAG_PREFIX)) {
        return Err(Failure::Usage(format!(
            "tag {tag:?}: tags beginning with {RESERVED_TAG_PREFIX:?} are seaport's own (--udp sets {UDP_TAG:?})"
        )));
    }
    let tagged = args.role.clone().with_tags(args.tags.clone());
    let udp_role = tagged.clone().and_then(|r| r.with_protocol(Protocol::Udp));
    let usage = |e: seaport_proto::role::RoleError| Failure::Usage(e.to_string());
    // The role once per protocol forwarded: its TCP registration first.
    let role = if args.udp { udp_role.clone() } else { tagged }.map_err(usage)?;
    let mut roles = vec![role.clone()];
    if args.udp_port.is_some() {
        roles.push(udp_role.map_err(usage)?);
    }
    let tcp = !args.udp;
    let keypair = args.client.keypair()?;
    let allow =
        Arc::new(AllowList::new(args.allow.clone(), args.allow_file.clone()).map_err(Failure::Usage)?);
    if allow.is_open() {
        tracing::info!("any proxy that knows this service's key may connect (restrict with --allow)");
    }
    let resolve = |port: u16| {
        let host = args.host.clone();
        async move {
            tokio::net::lookup_host((host.as_str(), port))
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| format!("cannot resolve backend host {host:?}"))
        }
    };
    let backend = resolve(args.port).await?;
    let udp_backend = match (args.udp, args.udp_port) {
        (true, _) => Some(backend),
        (false, Some(port)) => Some(resolve(port).await?),
        (false, None) => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen for links on {}: {e}; choose another --listen", args.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    // Ready once the registry confirmed the role (`/ready`).
    readiness().set(READY, Some(format!("{role} is not registered yet")));
    // Lives as long as `run`: dropping it stops the HTTP server.
    let (_http_stop, http_stop) = watch::channel(false);
    seaport_net::http::start(args.client.metrics, None, http_stop).await?;
    emit(&Event::ServiceStarted { key: keypair.public() });

    let resolver = args.client.resolver();
    let reported = if local.ip().is_unspecified() { vec![] } else { vec![local] };
    // Tells this process's sessions from those of others with the same seed;
    // each registry of the set gets its own (slot added), so two names of one
    // registry do not supersede each other's session.
    let process = seaport_net::identity::random_u64();
    // A backend that does not answer yet keeps the role from being
    // registered at all, rather than registered and withdrawn at once. A
    // UDP backend cannot be asked: it counts as up.
    let backend_up = !tcp || backend_answers(backend, args.check_interval, args.proxy_protocol).await;
    if !backend_up {
        tracing::warn!(%backend, "backend does not answer: {role} is registered once it does");
        readiness().set(READY, Some(format!("not registered: backend {backend} does not answer")));
    }
    // Whether the backend answers: what a registry's client is made with,
    // also for a registry of the set followed later.
    let available = Arc::new(AtomicBool::new(backend_up));
    let make = {
        let (keypair, registry, roles, available) =
            (keypair.clone(), args.client.registry.key, roles.clone(), available.clone());
        move |slot: usize| {
            let mut config = ClientConfig::new(keypair.clone(), registry);
            config.process = process.wrapping_add(slot as u64).max(1);
            let mut service = ServiceClient::new(config, roles.clone(), local.port(), reported.clone());
            if local.ip().is_unspecified() {
                service = service.listening_on_every_interface();
            }
            service.set_available(available.load(Ordering::Relaxed));
            service
        }
    };
    // Meetings the registries offer (a proxy that cannot dial us), and the
    // punched or relayed streams they yield, which are served as links.
    let (offers_tx, offers) = mpsc::channel(reach::MAX_MEETINGS);
    let (met_tx, met) = mpsc::channel(reach::MAX_MEETINGS);
    let reporter = Arc::new(Reporter { offers: offers_tx, state: Mutex::default() });
    let on_event = {
        let reporter = reporter.clone();
        Arc::new(move |at: At<'_>, event: &ServiceEvent| reporter.on_event(at, event))
    };
    let control = ControlSet::spawn(args.client.registry.clone(), resolver, make, on_event);
    let meetings = tokio::spawn(reach::answer_meetings(offers, allow.clone(), met_tx));
    let health = tokio::spawn(watch_backend(
        Health {
            role,
            backend,
            every: args.check_interval,
            up: backend_up,
            proxy_protocol: args.proxy_protocol,
            available: available.clone(),
        },
        reporter.clone(),
        control.handle(),
        tcp,
    ));

    let timeout = args.handshake_timeout;
    let budget = Budget::new(args.max_streams as usize, args.max_streams_per_proxy as usize);
    let udp = udp_backend.map(|addr| UdpBackend {
        addr,
        idle: args.flow_idle,
        budget: Budget::new(args.max_flows as usize, args.max_flows_per_proxy as usize),
    });
    let backend = Backend {
        addr: backend,
        tcp,
        connect_timeout: timeout,
        budget,
        udp,
        proxy_protocol: args.proxy_protocol,
    };
    // Turns true on shutdown: every link goes away, its open streams finish.
    let (drain_tx, draining) = watch::channel(false);
    let reloads = tokio::spawn(seaport_net::signal::on_hangup({
        let (allow, config) = (allow.clone(), args.client.config.clone());
        move || {
            // With --config, the file says which keys and which allow file.
            let reread = match &config {
                Some(path) => match seaport_net::config::reread::<Args>(path) {
                    Ok(new) => allow.reconfigure(new.allow, new.allow_file),
                    Err(e) => Err(e),
                },
                None => allow.reload(),
            };
            match reread {
                Ok(n) => tracing::info!("allow list reread: {n} keys"),
                Err(e) => tracing::error!("allow list not reread, the old one stays: {e}"),
            }
        }
    }));
    let responder = Arc::new(Responder {
        keypair: keypair.clone(),
        allow: allow.clone(),
        timeout,
        config: LinkConfig { resume_within: args.resume_within, ..LinkConfig::default() },
        resumables: Arc::default(),
    });
    // Connections that have not proved themselves yet, capped in all and per
    // source before anything is allocated for them.
    let greetings = Limit::new(link::MAX_GREETINGS, link::MAX_GREETINGS_PER_SOURCE);
    let links = accept_until(&listener, Some(met), seaport_net::signal::shutdown_signal(), |stream, peer| {
        let (responder, draining, backend) = (responder.clone(), draining.clone(), backend.clone());
        // Only connections to the listener count: a socket it accepted has
        // its port; a meeting's punched or relayed one has another.
        let direct = stream.local_addr().is_ok_and(|a| a.port() == local.port());
        let greeting = direct.then(|| greetings.take(Source::of(peer.ip())));
        async move {
            let greeting = match greeting.transpose() {
                Ok(greeting) => greeting,
                Err(_) => {
                    tracing::debug!(%peer, "too many link handshakes under way from this source; closed");
                    metrics().refuse(Refusal::Greetings);
                    return;
                }
            };
            match link::serve(stream, &responder, backend, draining, greeting).await {
                Ok(()) => tracing::debug!(%peer, "link closed"),
                // A proxy that took another path closes the ones it did not
                // take (a meeting's relay or punched socket) without a word.
                Err(HandshakeError::ClosedEarly) => tracing::debug!(%peer, "closed before a link handshake"),
                Err(e) => tracing::info!(%peer, "link ended: {e}"),
            }
        }
    })
    .await;
    // Unregister first, so no proxy picks us while we drain.
    tracing::info!("shutting down: unregistering, then draining open links");
    emit(&Event::Draining);
    readiness().set(READY, Some("shutting down".to_owned()));
    seaport_net::notify::stopping();
    health.abort();
    reloads.abort();
    meetings.abort();
    // Also for a registry of the set followed from now on.
    available.store(false, Ordering::Relaxed);
    control.handle().change_all(|c| c.set_available(false));
    control.stop().await;
    drop(listener);
    let _ = drain_tx.send(true);
    drain(links, args.drain).await;
    emit(&Event::Stopped);
    Ok(())
}

/// The readiness condition: the role is registered.
const READY: &str = "registered";

/// Turns the clients' events (one client per registry of the set) into
/// stdout lines, logs and readiness: the role counts as registered while
/// some registry holds it, and the lines say so once, not once per registry.
struct Reporter {
    /// Where meeting offers go, with the address of the registry that
    /// arranges each.
    offers: mpsc::Sender<(Ticket, PublicKey, SocketAddr)>,
    state: Mutex<Reported>,
}

/// What the reporter knows, by registry slot.
#[derive(Default)]
struct Reported {
    /// Slots whose session is up.
    connected: BTreeSet<usize>,
    /// Slots whose registry holds the role now.
    registered: BTreeSet<usize>,
}

impl Reporter {
    fn on_event(&self, at: At<'_>, event: &ServiceEvent) {
        match event {
            ServiceEvent::MeetOffer { ticket, proxy } => match self
                .offers
                .try_send((*ticket, *proxy, at.addr))
            {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(%proxy, "too many meetings under way: this offer is let go");
                }
                // --no-meet: nobody takes offers.
                Err(mpsc::error::TrySendError::Closed(_)) => tracing::debug!(%proxy, "meeting offer ignored"),
            },
            ServiceEvent::Registered(role) => {
                let first = {
                    let mut state = lock(&self.state);
                    state.registered.insert(at.slot);
                    state.registered.len() == 1
                };
                readiness().set(READY, None);
                if first {
                    emit(&Event::Registered { role: role.clone() });
                    seaport_net::notify::ready();
                } else {
                    tracing::info!(registry = %at.addr, %role, "registered with another registry of the set");
                }
            }
            ServiceEvent::Refused { role, code, text } => {
                tracing::error!(registry = %at.addr, %role, %code, "registry refused: {text}; asking again after the next reconnect");
                // A refusal can come after a registration (an access list
                // reloaded without this key): that registry holds it no more.
                let none_left = {
                    let mut state = lock(&self.state);
                    state.registered.remove(&at.slot);
                    state.registered.is_empty()
                };
                if none_left {
                    readiness().set(READY, Some(format!("the registry refused {role}: {text}")));
                }
                emit(&Event::RegistrationRefused { role: role.clone(), text: text.clone() });
            }
            ServiceEvent::Connected => {
                lock(&self.state).connected.insert(at.slot);
                emit(&Event::Connected { addr: at.addr, member: at.slot });
            }
            ServiceEvent::Disconnected(reason) => {
                let (was_connected, none_left) = {
                    let mut state = lock(&self.state);
                    state.registered.remove(&at.slot);
                    (state.connected.remove(&at.slot), state.registered.is_empty())
                };
                if none_left {
                    readiness()
                        .set(READY, Some(format!("not registered: no session with any registry ({reason})")));
                }
                if was_connected {
                    emit(&Event::Disconnected { addr: at.addr, member: at.slot, reason: reason.to_string() });
                }
            }
            other => tracing::debug!(?other),
        }
    }

    /// The role is withdrawn everywhere (its backend is down): whether it
    /// was registered anywhere.
    fn withdraw(&self) -> bool {
        let mut state = lock(&self.state);
        let was = !state.registered.is_empty();
        state.registered.clear();
        was
    }
}

/// What the backend check watches, and what it knows of the role.
struct Health {
    role: Role,
    backend: SocketAddr,
    every: Duration,
    /// Whether it answered the last check.
    up: bool,
    /// The PROXY protocol the backend expects, if any.
    proxy_protocol: Option<seaport_net::proxy_header::Version>,
    /// Shared with the factory of the registries' clients.
    available: Arc<AtomicBool>,
}

/// Checks the backend every `every` with a TCP connect; withdraws the role
/// while it is down and registers it again when it is back, so no proxy is
/// sent to a service that cannot answer. A backend that is not up yet keeps
/// the role from being registered, and says so; only a role that was
/// registered is reported withdrawn.
async fn watch_backend(
    health: Health,
    reporter: Arc<Reporter>,
    control: ControlHandle<ServiceClient>,
    tcp: bool,
) {
    // Nothing to connect to on a UDP port.
    if !tcp {
        return std::future::pending().await;
    }
    let Health { role, backend, every, mut up, proxy_protocol, available } = health;
    loop {
        tokio::time::sleep(every).await;
        let now_up = backend_answers(backend, every, proxy_protocol).await;
        if now_up == up {
            continue;
        }
        up = now_up;
        if up {
            tracing::info!(%backend, "backend is back: registering again");
        } else if reporter.withdraw() {
            tracing::warn!(%backend, "backend is down: withdrawing the registration");
            let reason = format!("backend {backend} is down");
            readiness().set(READY, Some(format!("{role} withdrawn: {reason}")));
            emit(&Event::Withdrawn { role: role.clone(), reason });
        } else {
            tracing::warn!(%backend, "backend does not answer: {role} is registered once it does");
            readiness().set(READY, Some(format!("not registered: backend {backend} does not answer")));
        }
        // Before the clients: a registry followed from now on starts right.
        available.store(up, Ordering::Relaxed);
        control.change_all(|c| c.set_available(up));
    }
}

/// Whether the backend accepts a TCP connection within `every` (at least
/// 1 s), and the PROXY header it expects if any.
async fn backend_answers(
    backend: SocketAddr,
    every: Duration,
    proxy_protocol: Option<seaport_net::proxy_header::Version>,
) -> bool {
    let check = async {
        let mut socket = TcpStream::connect(backend).await?;
        if let Some(version) = proxy_protocol {
            socket.write_all(&seaport_net::proxy_header::local(version)).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    matches!(tokio::time::timeout(every.max(Duration::from_secs(1)), check).await, Ok(Ok(())))
}
