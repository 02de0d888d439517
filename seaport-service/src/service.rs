//! The service as a library: a [`Service`] keeps its role registered with
//! every registry of a set and answers proxies' links, handing each stream
//! to a TCP backend or to the program itself ([`Service::accept`]). The
//! `seaport-service` binary is a `Service` with flags, signals and a
//! metrics port around it; a Rust program uses the same one (the `seaport`
//! crate re-exports it).
//!
//! Invariants: the role is registered only while the backend answers (a
//! TCP backend is checked every `check_interval`; an in-process one counts
//! as up while the [`Service`] lives); streams wait in a queue of at most
//! [`ACCEPT_QUEUE`] for [`Service::accept`], and one that finds it full is
//! refused, so its proxy tries another instance; [`Service::shutdown`]
//! withdraws the role before it lets open streams finish.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use seaport_net::allow::AllowList;
use seaport_net::budget::Budget;
use seaport_net::cli::Failure;
use seaport_net::control::{At, ControlHandle, ControlSet};
use seaport_net::event::{Event, emit};
use seaport_net::handshake::HandshakeError;
use seaport_net::limit::Limit;
use seaport_net::link::{self, Accepted, Backend, Responder, StreamBackend, UdpBackend};
use seaport_net::lock::lock;
use seaport_net::metrics::{Refusal, metrics, readiness};
use seaport_net::proxy_header::Version;
use seaport_net::reach;
use seaport_net::serve::{accept_until, drain};
use seaport_net::target::{RegistryTarget, Resolver};
use seaport_proto::client::{ClientConfig, ServiceClient, ServiceEvent};
use seaport_proto::keys::{Keypair, PublicKey};
use seaport_proto::link::LinkConfig;
use seaport_proto::meet::Ticket;
use seaport_proto::registry::Source;
use seaport_proto::role::{Protocol, RESERVED_TAG_PREFIX, Role, UDP_TAG};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Most streams waiting for [`Service::accept`]; one more is refused.
pub const ACCEPT_QUEUE: usize = 128;

/// Where a service's streams go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Streams {
    /// One TCP connection per stream to this address: a backend such as
    /// CouchDB, or a `TcpListener` of this program.
    Tcp(SocketAddr),
    /// To this program: [`Service::accept`].
    InProcess,
    /// No streams: the service forwards UDP only ([`ServiceOptions::udp`]).
    None,
}

/// What a [`Service`] offers and how. [`ServiceOptions::new`] has
/// `seaport-service`'s defaults; change a field to change one.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServiceOptions {
    /// The registry set: `KEY` (found in the DHT) or `KEY@HOST:PORT[,...]`.
    pub registry: RegistryTarget,
    /// This service's identity: what proxies' `--service-key` and a
    /// registry's `--acl` name it by.
    pub keypair: Keypair,
    /// The role and exact version offered, with its tags (`couchdb@3.2.2`).
    pub role: Role,
    /// Where streams go.
    pub streams: Streams,
    /// Where UDP datagrams go, if the role is also (or, with
    /// [`Streams::None`], only) served over UDP (`--udp`, `--udp-port`).
    pub udp: Option<SocketAddr>,
    /// DHT nodes to start from (`HOST:PORT`), for a bare `KEY`; empty:
    /// the public DHT's.
    pub bootstrap: Vec<String>,
    /// Start each TCP backend connection with a PROXY protocol header (`--proxy-protocol`).
    pub proxy_protocol: Option<Version>,
    /// The TCP address proxies' links come to (`--listen`).
    pub listen: SocketAddr,
    /// Answer no meetings (`--no-meet`): proxies reach this service only
    /// at `listen`. Meetings are off anyway when `listen` is a loopback address.
    pub no_meet: bool,
    /// How often a TCP backend is checked (`--check-interval`).
    pub check_interval: Duration,
    /// How long a UDP flow lives without a datagram (`--flow-idle`).
    pub flow_idle: Duration,
    /// Most UDP flows in all (`--max-flows`).
    pub max_flows: u32,
    /// Most UDP flows per proxy (`--max-flows-per-proxy`).
    pub max_flows_per_proxy: u32,
    /// Accept links only from these proxy keys, with those of `allow_file`;
    /// both empty: any proxy (`--allow`).
    pub allow: Vec<PublicKey>,
    /// A file of proxy keys, one a line (`--allow-file`).
    pub allow_file: Option<PathBuf>,
    /// Most streams in all (`--max-streams`).
    pub max_streams: u32,
    /// Most streams per proxy (`--max-streams-per-proxy`).
    pub max_streams_per_proxy: u32,
    /// How long a link handshake, and a backend connect, may take (`--handshake-timeout`).
    pub handshake_timeout: Duration,
    /// How long a link whose path is lost waits to be resumed (`--resume-within`).
    pub resume_within: Duration,
}

impl ServiceOptions {
    /// The options of `seaport-service REGISTRY -r ROLE` with no other flag
    /// (links on any address, any port), `keypair` as its identity and
    /// `streams` as its backend.
    pub fn new(registry: RegistryTarget, keypair: Keypair, role: Role, streams: Streams) -> ServiceOptions {
        ServiceOptions {
            registry,
            keypair,
            role,
            streams,
            udp: None,
            bootstrap: Vec::new(),
            proxy_protocol: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            no_meet: false,
            check_interval: Duration::from_secs(2),
            flow_idle: Duration::from_secs(60),
            max_flows: 4096,
            max_flows_per_proxy: 1024,
            allow: Vec::new(),
            allow_file: None,
            max_streams: 16_384,
            max_streams_per_proxy: 12_288,
            handshake_timeout: Duration::from_secs(10),
            resume_within: Duration::from_secs(10),
        }
    }
}

/// A role registered with a registry set, and the links of the proxies
/// that reach it. Dropping it stops everything at once, open streams too;
/// [`Service::shutdown`] withdraws the role first and lets them finish.
pub struct Service {
    key: PublicKey,
    link_addr: SocketAddr,
    allow: Arc<AllowList>,
    incoming: Option<Incoming>,
    /// `None` once shut down.
    control: Option<ControlSet<ServiceClient>>,
    available: Arc<AtomicBool>,
    /// The backend check and the meetings' answers.
    helpers: Vec<JoinHandle<()>>,
    /// Turns true to stop taking links, then to end them.
    stop: watch::Sender<bool>,
    draining: watch::Sender<bool>,
    /// Ends with the links open then, and the listener (closed by its drop).
    accepting: Option<JoinHandle<(JoinSet<()>, TcpListener)>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("key", &self.key)
            .field("link_addr", &self.link_addr)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// Opens the link port, starts registering the role (in the
    /// background: it is registered once a registry confirms, which
    /// [`seaport_net::event::subscribe`] reports as [`Event::Registered`]),
    /// and starts answering links. Must be called within a tokio runtime.
    ///
    /// A TCP backend is checked once first (waiting up to `check_interval`,
    /// at least 1 s): one that does not answer yet is registered once it
    /// does. Readiness (`/ready`) and systemd's notification are the
    /// process's, as for the binary: several services in one process share
    /// them.
    ///
    /// # Errors
    /// [`Failure::Usage`] for options that cannot work (a reserved tag, a
    /// bad allow file, nothing to serve); [`Failure::Runtime`] when the
    /// link port cannot be opened.
    pub async fn start(options: ServiceOptions) -> Result<Service, Failure> {
        if let Some(tag) = options.role.tags().iter().find(|t| t.starts_with(RESERVED_TAG_PREFIX)) {
            return Err(Failure::Usage(format!(
                "tag {tag:?}: tags beginning with {RESERVED_TAG_PREFIX:?} are seaport's own (--udp sets {UDP_TAG:?})"
            )));
        }
        let usage = |e: seaport_proto::role::RoleError| Failure::Usage(e.to_string());
        let udp_role = || options.role.clone().with_protocol(Protocol::Udp).map_err(usage);
        // The role once per protocol forwarded: its TCP registration first.
        let mut roles = Vec::new();
        if options.streams != Streams::None {
            roles.push(options.role.clone());
        }
        if options.udp.is_some() {
            roles.push(udp_role()?);
        }
        let Some(role) = roles.first().cloned() else {
            return Err(Failure::Usage("nothing to serve: no stream backend and no UDP backend".into()));
        };
        let keypair = options.keypair.clone();
        let allow = Arc::new(
            AllowList::new(options.allow.clone(), options.allow_file.clone()).map_err(Failure::Usage)?,
        );
        if allow.is_open() {
            tracing::info!("any proxy that knows this service's key may connect (restrict with --allow)");
        }
        let listener = TcpListener::bind(options.listen).await.map_err(|e| {
            format!("cannot listen for links on {}: {e}; choose another --listen", options.listen)
        })?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        readiness().set(READY, Some(format!("{role} is not registered yet")));
        emit(&Event::ServiceStarted { key: keypair.public() });

        let resolver = Resolver::for_target(&options.registry, &options.bootstrap);
        let reported = if local.ip().is_unspecified() { vec![] } else { vec![local] };
        // Tells this process's sessions from those of others with the same seed;
        // each registry of the set gets its own (slot added), so two names of one
        // registry do not supersede each other's session.
        let process = seaport_net::identity::entropy_u64();
        // A backend that does not answer yet keeps the role from being
        // registered at all, rather than registered and withdrawn at once. A
        // UDP backend cannot be asked, and the program is up while it runs:
        // both count as up.
        let backend_up = match options.streams {
            Streams::Tcp(backend) => {
                let up = backend_answers(backend, options.check_interval, options.proxy_protocol).await;
                if !up {
                    tracing::warn!(%backend, "backend does not answer: {role} is registered once it does");
                    readiness()
                        .set(READY, Some(format!("not registered: backend {backend} does not answer")));
                }
                up
            }
            Streams::InProcess | Streams::None => true,
        };
        // Whether the backend answers: what a registry's client is made with,
        // also for a registry of the set followed later.
        let available = Arc::new(AtomicBool::new(backend_up));
        let make = {
            let (keypair, registry, roles, available) =
                (keypair.clone(), options.registry.key, roles.clone(), available.clone());
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
        // A service on loopback answers none: a meeting would carry what only
        // this host may reach to anyone the registry introduces.
        let (offers_tx, offers) = mpsc::channel(reach::MAX_MEETINGS);
        let (met_tx, met) = mpsc::channel(reach::MAX_MEETINGS);
        let reporter = Arc::new(Reporter { offers: offers_tx, state: Mutex::default() });
        let on_event = {
            let reporter = reporter.clone();
            Arc::new(move |at: At<'_>, event: &ServiceEvent| reporter.on_event(at, event))
        };
        let control = ControlSet::spawn(options.registry.clone(), resolver, make, on_event);
        let mut helpers = Vec::new();
        if !options.no_meet && !local.ip().is_loopback() {
            helpers.push(tokio::spawn(reach::answer_meetings(offers, allow.clone(), met_tx)));
        }
        if let Streams::Tcp(backend) = options.streams {
            let health = Health {
                role,
                backend,
                every: options.check_interval,
                up: backend_up,
                proxy_protocol: options.proxy_protocol,
                available: available.clone(),
            };
            helpers.push(tokio::spawn(watch_backend(health, reporter.clone(), control.handle())));
        }

        let timeout = options.handshake_timeout;
        let (queue, incoming) = match options.streams {
            Streams::InProcess => {
                let (queue, incoming) = mpsc::channel(ACCEPT_QUEUE);
                (Some(queue), Some(Incoming(incoming)))
            }
            Streams::Tcp(_) | Streams::None => (None, None),
        };
        let streams = match (options.streams, queue) {
            (Streams::Tcp(addr), _) => StreamBackend::Tcp(addr),
            (Streams::InProcess, Some(queue)) => StreamBackend::InProcess(queue),
            _ => StreamBackend::Refused,
        };
        let backend = Backend {
            streams,
            connect_timeout: timeout,
            budget: Budget::new(options.max_streams as usize, options.max_streams_per_proxy as usize),
            udp: options.udp.map(|addr| UdpBackend {
                addr,
                idle: options.flow_idle,
                budget: Budget::new(options.max_flows as usize, options.max_flows_per_proxy as usize),
            }),
            proxy_protocol: options.proxy_protocol,
        };
        let responder = Arc::new(Responder {
            keypair: keypair.clone(),
            allow: allow.clone(),
            timeout,
            config: LinkConfig { resume_within: options.resume_within, ..LinkConfig::default() },
            resumables: Arc::default(),
        });
        // Turns true on shutdown: every link goes away, its open streams finish.
        let (draining_tx, draining) = watch::channel(false);
        let (stop, mut stopped) = watch::channel(false);
        let accepting = tokio::spawn(async move {
            let stopped = async move {
                let _ = stopped.wait_for(|stopped| *stopped).await;
            };
            // Connections that have not proved themselves yet, capped in all and per
            // source before anything is allocated for them.
            let greetings = Limit::new(link::MAX_GREETINGS, link::MAX_GREETINGS_PER_SOURCE);
            let links = accept_until(&listener, Some(met), stopped, |stream, peer| {
                let (responder, draining, backend) = (responder.clone(), draining.clone(), backend.clone());
                // Only connections to the listener count: a socket it accepted has
                // its port; a meeting's punched or relayed one has another.
                let direct = stream.local_addr().is_ok_and(|a| a.port() == local.port());
                let greeting = direct.then(|| greetings.take(Source::of(peer.ip())));
                serve_link(stream, peer, greeting, responder, backend, draining)
            })
            .await;
            (links, listener)
        });
        Ok(Service {
            key: keypair.public(),
            link_addr: local,
            allow,
            incoming,
            control: Some(control),
            available,
            helpers,
            stop,
            draining: draining_tx,
            accepting: Some(accepting),
        })
    }

    /// This service's public key: what proxies' `--service-key` name it by.
    pub fn key(&self) -> PublicKey {
        self.key
    }

    /// Where proxies' links come to (the port chosen for port 0).
    pub fn link_addr(&self) -> SocketAddr {
        self.link_addr
    }

    /// The proxy keys links are accepted from: reread or replace them while
    /// the service runs (`SIGHUP`).
    pub fn allow_list(&self) -> Arc<AllowList> {
        self.allow.clone()
    }

    /// The next stream a proxy opened, with [`Streams::InProcess`]; `None`
    /// with another backend, or once [`Service::incoming`] took the queue.
    pub async fn accept(&mut self) -> Option<Accepted> {
        self.incoming.as_mut()?.accept().await
    }

    /// The queue of new streams ([`Streams::InProcess`]) as a handle of its
    /// own, to accept from another task while this one keeps the service
    /// (to shut it down). `None` with another backend, or if taken already.
    pub fn incoming(&mut self) -> Option<Incoming> {
        self.incoming.take()
    }

    /// Stops taking links, withdraws the role from every registry, and
    /// lets the streams open now finish within `drain_within` before it
    /// ends them. Streams still queued for [`Service::accept`] are taken
    /// until then too; an [`Incoming`] handle yields `None` once every link
    /// is gone.
    pub async fn shutdown(mut self, drain_within: Duration) {
        tracing::info!("shutting down: unregistering, then draining open links");
        emit(&Event::Draining);
        readiness().set(READY, Some("shutting down".to_owned()));
        // No new link from here on; the listener stays open (a proxy that
        // dials now waits, rather than being refused) until unregistered.
        let _ = self.stop.send(true);
        let accepted = match self.accepting.take() {
            Some(task) => task.await.ok(),
            None => None,
        };
        for helper in self.helpers.drain(..) {
            helper.abort();
        }
        // Unregister first, so no proxy picks us while we drain. Also for
        // a registry of the set followed from now on.
        self.available.store(false, Ordering::Relaxed);
        if let Some(control) = self.control.take() {
            control.handle().change_all(|c| c.set_available(false));
            control.stop().await;
        }
        let _ = self.draining.send(true);
        if let Some((open, listener)) = accepted {
            drop(listener);
            drain(open, drain_within).await;
        }
        emit(&Event::Stopped);
    }
}

/// The queue of new in-process streams ([`Service::incoming`]).
#[derive(Debug)]
pub struct Incoming(mpsc::Receiver<Accepted>);

impl Incoming {
    /// The next stream a proxy opened; `None` once the service is shut
    /// down (or dropped) and every link is gone.
    pub async fn accept(&mut self) -> Option<Accepted> {
        self.0.recv().await
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        for helper in &self.helpers {
            helper.abort();
        }
        if let Some(task) = &self.accepting {
            task.abort();
        }
        if let Some(control) = self.control.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(control.stop());
        }
    }
}

/// One link: its handshake, then its streams until it ends.
async fn serve_link(
    stream: TcpStream,
    peer: SocketAddr,
    greeting: Option<Result<seaport_net::limit::Share<Source>, seaport_net::limit::Over>>,
    responder: Arc<Responder>,
    backend: Backend,
    draining: watch::Receiver<bool>,
) {
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

/// The readiness condition: the role is registered.
pub(crate) const READY: &str = "registered";

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
async fn watch_backend(health: Health, reporter: Arc<Reporter>, control: ControlHandle<ServiceClient>) {
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
