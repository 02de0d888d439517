//! `seaport-registry`: serves the registry on TCP and, unless `--no-dht`,
//! publishes its addresses in the DHT under its key, in the one record of
//! all registries started with the same seed (its set), which it leaves
//! when it stops. With `--acl FILE`, only what the file grants each key is
//! allowed; the file is reread on SIGHUP (a bad file keeps the list in
//! force).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use seaport_net::cli::{Bootstrap, Failure, HOUR, MINUTE, duration_in};
use seaport_net::dht::{DhtNode, LEAVE_TIMEOUT, SetMember, Starting, publish_loop};
use seaport_net::event::{Event, emit};
use seaport_net::http::Page;
use seaport_net::identity::{load_seed, random_seed};
use seaport_net::meet::{RelayCounters, RelayLimits};
use seaport_net::metrics::readiness;
use seaport_net::page::{RegistryPage, RegistryView};
use seaport_net::registry::{Command, READY_SESSIONS, RegistryServer, RelayOptions};
use seaport_proto::keys::Keypair;
use seaport_proto::registry::{CloseReason, Registry, RegistryConfig, RegistryEvent};
use tokio::sync::{mpsc, watch};

/// Run a seaport registry. Services register roles with it; proxies look
/// roles up. Everyone finds it by its public key alone.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  seaport-registry --seed-file registry.seed\n  seaport-registry --seed-file registry.seed --listen 0.0.0.0:4500 --dht-port 6881\n  seaport-registry --seed-file registry.seed --acl /etc/seaport/registry.acl\n\nWithout a seed the registry makes an ephemeral key, new on every start.\n\nAn --acl file is TOML, one [[grant]] table per group of keys:\n  [[grant]]\n  keys = [\"abe213...260f\"]        # public keys (64 hex), or \"*\" for any key\n  register = [\"couchdb\", \"@acme/*\"] # role names they may register; \"*\" = any\n  lookup = [\"couchdb\"]              # role names they may look up and watch\nA key may do only what some grant allows. kill -HUP rereads the file: what it\nno longer grants is withdrawn at once; a bad file keeps the old list."
)]
pub struct Args {
    /// The registry's seed (64 hex characters), from `seaport-seed`.
    #[arg(long, env = "SEAPORT_REGISTRY_SEED", hide_env_values = true, conflicts_with = "seed_file")]
    pub seed: Option<String>,
    /// Read the seed from this file instead (keeps it out of `ps`).
    #[arg(long, value_name = "FILE")]
    pub seed_file: Option<PathBuf>,
    /// TCP address to listen on for services and proxies.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:0")]
    pub listen: SocketAddr,
    /// Print events as JSON objects, one a line (`ts`, `event`, fields; see
    /// README), instead of the text lines.
    #[arg(long)]
    pub json: bool,
    /// Print a completion script for this shell (bash, zsh, fish, elvish,
    /// powershell) and exit.
    #[arg(long, value_name = "SHELL", exclusive = true)]
    pub completions: Option<clap_complete::Shell>,
    /// Read settings from this TOML file: a setting is a flag's long name
    /// (listen = "0.0.0.0:4500", seed-file = "...", acl = "..."); flags
    /// given here override the file's. kill -HUP rereads it, and the --acl
    /// file it names (which may have changed).
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Do not publish in the DHT (clients then need KEY@HOST:PORT); any
    /// --bootstrap / SEAPORT_BOOTSTRAP is then unused.
    #[arg(long, conflicts_with = "dht_port")]
    pub no_dht: bool,
    /// Also run a DHT server node on this UDP port, for a private DHT
    /// (clients use --bootstrap THISHOST:PORT). The registry then runs a
    /// second node on a random UDP port, bootstrapped from the first, that
    /// publishes its record: a lone DHT node answers queries only after
    /// 2-second timeouts, two that know each other answer at once.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub dht_port: Option<u16>,
    /// Private DHT bootstrap nodes, HOST:PORT,... (default: the public DHT).
    #[arg(long, env = "SEAPORT_BOOTSTRAP", hide_env_values = true, value_name = "LIST")]
    pub bootstrap: Option<Bootstrap>,
    /// How long a peer may take to complete its handshake (100ms to 10m).
    #[arg(long, value_name = "DURATION", default_value = "10s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::from_millis(100), 10 * MINUTE))]
    pub handshake_timeout: Duration,
    /// A session silent this long is dropped with its registrations (10s to
    /// 1h: services and proxies ping every 5s, so less would drop live ones).
    #[arg(long, value_name = "DURATION", default_value = "15s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::from_secs(10), HOUR))]
    pub idle_timeout: Duration,
    /// Most concurrent sessions (1 or more). Handshakes under way have a
    /// pool of their own (--max-handshakes), so they never take these.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sessions: u32,
    /// Most handshakes under way at once (1 or more).
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_handshakes: u32,
    /// Most handshakes under way from one source address (1 or more): one
    /// host's silent connections cannot keep others out.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_handshakes_per_source: u32,
    /// Most registrations per session (1 or more).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_registrations: u32,
    /// Most watches per session (1 or more).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_watches: u32,
    /// Most links relayed at once (1 or more). When a proxy and a service
    /// reach each other neither directly nor by hole punching (a symmetric
    /// NAT, a strict firewall), this registry splices their link: both dial
    /// out to it, and it carries their end-to-end encrypted bytes, which it
    /// cannot read. Each relay holds 128 KiB of buffers.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_relays: u32,
    /// Most links relayed at once for one proxy key (1 or more), whatever
    /// addresses it comes from (each address, or IPv6 /64, has 8 at most).
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_relays_per_key: u32,
    /// How long one relay may last (1s to 30d): a relay is a path of last
    /// resort; at the end its link's streams are reset, and the next
    /// connection makes a new link.
    #[arg(long, value_name = "DURATION", default_value = "24h", allow_hyphen_values = true,
          value_parser = duration_in(Duration::from_secs(1), 720 * HOUR))]
    pub max_relay_time: Duration,
    /// Most MiB one relay may carry, both ways together (1 to 16777216);
    /// at the end its link's streams are reset.
    #[arg(long, value_name = "MIB", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub max_relay_mib: u32,
    /// Never relay links; meetings then only help proxies and services punch
    /// through their NATs, and a pair that cannot punch cannot connect.
    #[arg(long, conflicts_with = "max_relays")]
    pub no_relay: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics, with /ready and
    /// /healthz (off by default; e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Serve a live read-only page of roles, instances and sessions at
    /// http://ADDR/, and its data at /api/instances (off by default; the
    /// same ADDR as --metrics shares one listener).
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// Who may register and look up which roles (TOML, see below). Without
    /// it, any key that knows the registry's public key may do anything.
    /// Reread on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub acl: Option<PathBuf>,
    /// Most registrations held at once, all sessions together (1 or more);
    /// more are refused until some leave.
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_total_registrations: u32,
    /// Most MiB queued for all peers together, answers not yet written (1
    /// to 65536; each peer also has its own cap, --max-queued-per-peer).
    /// Past it, lookups are refused for a moment, watch updates wait, and
    /// peers that are behind with their reading are dropped.
    #[arg(long, value_name = "MIB", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_total_queued: u32,
    /// Most MiB queued for one peer (1 to 1024, at most --max-total-queued).
    /// A peer whose next answer would pass it is dropped as too slow: raise
    /// it for watchers of large answers over slow, long paths; 1 MiB holds
    /// two of the largest answers.
    #[arg(long, value_name = "MIB", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_queued_per_peer: u32,
}

/// Runs until SIGINT/SIGTERM; errors are one line for the user.
pub async fn run(args: Args) -> Result<(), Failure> {
    seaport_net::event::print_events(args.json);
    let seed = load_seed(args.seed.as_deref(), args.seed_file.as_deref())
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let seed = seed.unwrap_or_else(|| {
        eprintln!(
            "seaport-registry: no --seed given: using an ephemeral key that changes on every start (make a lasting one with seaport-seed)"
        );
        random_seed()
    });
    let keypair = Keypair::from_seed(&seed);
    if args.max_queued_per_peer > args.max_total_queued {
        return Err(Failure::Usage(format!(
            "--max-queued-per-peer {} is above --max-total-queued {}: one peer could never use it; lower the first or raise the second",
            args.max_queued_per_peer, args.max_total_queued
        )));
    }
    let acl = match &args.acl {
        Some(path) => Some(seaport_net::acl::load(path).map_err(Failure::Usage)?),
        None => {
            eprintln!(
                "seaport-registry: no --acl given: any key that knows this registry's public key may register and look up any role"
            );
            None
        }
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}; choose another --listen address", args.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%local, "listening");

    let (stop_tx, stop) = watch::channel(false);
    // The registry set as this registry knows it, for the page: itself,
    // unpublished, until the DHT publisher's first merge.
    let addrs = dialable(local);
    let (set_tx, set_view) = watch::channel(vec![SetMember { addrs: addrs.clone(), refreshed: None }]);
    let mut publishing = None;
    if !args.no_dht {
        // A port in use is the user's to fix: said at once. The node itself
        // starts in the background (resolving bootstrap host names can take
        // as long as DNS does), and publishes once it is up.
        if let Some(port) = args.dht_port {
            std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, port)).map_err(|e| {
                format!("cannot start the DHT node on UDP port {port}: {e}; choose another --dht-port")
            })?;
        }
        let bootstrap = args.bootstrap.clone().unwrap_or_default().0;
        let dht_port = args.dht_port;
        let starting = Starting::spawn(async move { DhtNode::registry(&bootstrap, dht_port).await });
        let (keypair, stop) = (keypair.clone(), stop.clone());
        let mut stopped = stop.clone();
        publishing = Some(tokio::spawn(async move {
            // A node that cannot start says so itself (`Starting`); a
            // registry stopped before its node started has nothing to leave.
            tokio::select! {
                dht = starting.ready() => if let Ok(dht) = dht {
                    publish_loop(dht, keypair, addrs, set_tx, stop).await;
                },
                () = async { let _ = stopped.wait_for(|stopped| *stopped).await; } => {}
            }
        }));
    }

    let config = RegistryConfig {
        handshake_timeout: args.handshake_timeout,
        idle_timeout: args.idle_timeout,
        max_sessions: args.max_sessions as usize,
        max_handshakes: args.max_handshakes as usize,
        max_handshakes_per_source: args.max_handshakes_per_source as usize,
        max_registrations: args.max_registrations as usize,
        max_watches: args.max_watches as usize,
        max_total_registrations: args.max_total_registrations as usize,
        max_total_queued: (args.max_total_queued as usize) << 20,
        max_queued: (args.max_queued_per_peer as usize) << 20,
        ..RegistryConfig::default()
    };
    let mut registry = Registry::new(keypair.clone(), config);
    if let Some(acl) = acl {
        tracing::info!(grants = acl.grants().len(), "access list in force");
        registry.set_acl(Some(acl));
    }
    let (commands_tx, commands) = mpsc::unbounded_channel::<Command>();
    // SIGHUP rereads the access list; without one it is only logged (its
    // default action would end the registry, e.g. on `systemctl reload`).
    let (mut acl_path, config) = (args.acl.clone(), args.config.clone());
    tokio::spawn(seaport_net::signal::on_hangup(move || {
        // With --config, the file says which access list (its path may change).
        if let Some(config) = &config {
            match seaport_net::config::reread::<Args>(config) {
                Ok(new) if new.acl != acl_path => {
                    tracing::info!(acl = ?new.acl, "config reread: the access list is now another file");
                    acl_path = new.acl;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!("config not reread, the one in force stays: {e}");
                    return;
                }
            }
        }
        let Some(path) = &acl_path else {
            tracing::info!("SIGHUP: no --acl file to reread");
            return;
        };
        match seaport_net::acl::load(path) {
            Ok(acl) => {
                tracing::info!("access list reread: {} grants", acl.grants().len());
                let _ =
                    commands_tx.send(Box::new(move |registry: &mut Registry| registry.set_acl(Some(acl))));
            }
            Err(e) => tracing::error!("access list not reread, the one in force stays: {e}"),
        }
    }));
    let relay = RelayOptions {
        enabled: !args.no_relay,
        max: args.max_relays as usize,
        per_key: args.max_relays_per_key as usize,
        limits: RelayLimits {
            handshake: args.handshake_timeout,
            lifetime: args.max_relay_time,
            bytes: u64::from(args.max_relay_mib) << 20,
            ..RelayLimits::default()
        },
        greeting_timeout: args.handshake_timeout,
        greeting_per_source: args.max_handshakes_per_source as usize,
        ..RelayOptions::default()
    };
    if args.no_relay {
        tracing::info!(
            "relaying is off (--no-relay): proxies and services that cannot punch through their NATs cannot connect"
        );
    }
    // The page reads snapshots the server publishes; the server alone owns the registry.
    let (view, page) = match args.http {
        Some(addr) => {
            let (tx, rx) = watch::channel(Arc::new(RegistryView::new(keypair.public())));
            let page: Arc<dyn Page> = Arc::new(RegistryPage::new(rx, set_view));
            (Some(tx), Some((addr, page)))
        }
        None => (None, None),
    };
    seaport_net::http::start(args.metrics, page, stop.clone()).await?;
    emit(&Event::RegistryListening { key: keypair.public() });
    readiness().set(READY_SESSIONS, None);
    seaport_net::notify::ready();
    let counters = Arc::new(RelayCounters::default());
    let mut server =
        RegistryServer::new(registry, relay, counters.clone()).with_commands(commands).on_event(logger());
    if let Some(view) = view {
        server = server.with_view(view);
    }
    let server = tokio::spawn(server.run(listener, stop));
    seaport_net::signal::shutdown_signal().await;
    tracing::info!("shutting down");
    seaport_net::notify::stopping();
    readiness().set(READY_SESSIONS, Some("shutting down".to_owned()));
    let _ = stop_tx.send(true);
    let _ = server.await;
    // Leaving the set ran alongside the server's shutdown; the publisher
    // bounds it by LEAVE_TIMEOUT, and this wait never outlasts that much.
    if let Some(publishing) = publishing {
        let _ = tokio::time::timeout(LEAVE_TIMEOUT + Duration::from_secs(1), publishing).await;
    }
    let relayed = counters.to_service.get() + counters.to_proxy.get();
    tracing::info!(relays = counters.opened.get(), bytes = relayed, "relayed in all");
    emit(&Event::Stopped);
    Ok(())
}

/// How often refusals by the access list are logged, at most: any key may
/// send requests the list refuses, and a flood of them must not become a
/// flood of log lines.
const FORBIDDEN_LOG_EVERY: Duration = Duration::from_secs(10);

/// Logs registry events; refusals by the access list at most once per
/// [`FORBIDDEN_LOG_EVERY`], with a count of the others (each at debug).
fn logger() -> impl FnMut(&RegistryEvent) {
    let mut last: Option<std::time::Instant> = None;
    let mut since = 0usize;
    move |event| match event {
        RegistryEvent::Forbidden { peer, text } => {
            since += 1;
            let now = std::time::Instant::now();
            if last.is_none_or(|at| now.duration_since(at) >= FORBIDDEN_LOG_EVERY) {
                tracing::warn!(%peer, "access list refused {since} request(s) since the last report; the last: {text}");
                last = Some(now);
                since = 0;
            } else {
                tracing::debug!(%peer, "access list: {text}");
            }
        }
        other => log_event(other),
    }
}

fn log_event(event: &RegistryEvent) {
    match event {
        RegistryEvent::SessionOpened { peer, .. } => tracing::debug!(%peer, "session opened"),
        // Replays and refusals can come in floods: not a line each.
        RegistryEvent::SessionClosed {
            peer: Some(peer),
            reason: reason @ (CloseReason::Replayed | CloseReason::Full(_)),
            ..
        } => {
            tracing::debug!(%peer, %reason, "session closed");
        }
        RegistryEvent::SessionClosed { peer: Some(peer), reason, .. } => {
            tracing::info!(%peer, %reason, "session closed");
        }
        RegistryEvent::SessionClosed { peer: None, reason, .. } => {
            tracing::debug!(%reason, "handshake failed")
        }
        RegistryEvent::Registered { peer, role } => tracing::info!(%peer, %role, "registered"),
        RegistryEvent::Unregistered { peer, role } => tracing::info!(%peer, %role, "unregistered"),
        RegistryEvent::MeetArranged { proxy, service } => {
            tracing::info!(%proxy, %service, "meeting arranged")
        }
        _ => tracing::debug!(?event),
    }
}

/// The addresses to publish for a listener: itself, or for a wildcard
/// listener the host's primary address (loopback on a host without one).
fn dialable(local: SocketAddr) -> Vec<SocketAddr> {
    if !local.ip().is_unspecified() {
        return vec![local];
    }
    // Loopback only when the host has no other address: a record in the
    // (public) DHT should name addresses another host can dial, and a client
    // on this host reaches the primary address as well.
    match primary_ip() {
        Some(ip) => vec![SocketAddr::new(ip, local.port())],
        None => vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), local.port())],
    }
}

/// The source address the host would use for the default route. Connecting
/// a UDP socket only consults the routing table; no packet is sent. The
/// target is a documentation address (RFC 5737) that nothing answers.
fn primary_ip() -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified() && !ip.is_loopback()).then_some(ip)
}
