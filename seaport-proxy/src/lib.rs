//! `seaport-proxy`: serves a role found in the registry on a local port. Each
//! client connection is a stream on the link to one instance (one link per
//! instance, opened on first need and reused), chosen by the balance
//! strategy, failing over to the next instance until one's service has
//! reached its backend.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use seaport_net::allow::AllowList;
use seaport_net::cli::{ClientArgs, Failure, HOUR, MINUTE, duration_in};
use seaport_net::control::{ControlTask, lock};
use seaport_net::event::{Event, emit};
use seaport_net::identity::random_u64;
use seaport_net::link::Links;
use seaport_net::reach::Introducer;
use seaport_net::serve::{accept_until, drain};
use seaport_proto::client::{ClientConfig, ProxyClient, ProxyEvent, Strategy};
use seaport_proto::keys::PublicKey;
use seaport_proto::link::LinkConfig;
use seaport_proto::message::Instance;
use seaport_proto::role::{Role, RoleQuery};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

/// Look a role up in the registry and serve it on a local port, as if the
/// service ran here.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example (REGKEY: the 64-character key the registry printed):\n  seaport-proxy REGKEY -p 6000 -r couchdb@3.x\n  curl http://127.0.0.1:6000/"
)]
pub struct Args {
    /// Registry, identity and DHT options, shared with the other client binary.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The local port to serve on (0: any free port, printed on stdout).
    #[arg(short, long, value_name = "PORT")]
    pub port: u16,
    /// The role and npm version range wanted, e.g. couchdb@3.x or couchdb@^3.2.0.
    #[arg(short, long, value_name = "ROLE@RANGE", value_parser = |s: &str| RoleQuery::parse(s).map_err(|e| e.to_string()))]
    pub role: RoleQuery,
    /// The local address to bind the port on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub bind: std::net::IpAddr,
    /// How to spread connections over instances: first, round-robin, random or hash.
    #[arg(long, value_name = "STRATEGY", default_value = "round-robin")]
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
    /// How long a failed instance is avoided (0s to 1h).
    #[arg(long, value_name = "DURATION", default_value = "30s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::ZERO, HOUR))]
    pub ban: Duration,
    /// On SIGTERM, how long open connections may take to finish (0s to 1h).
    #[arg(long, value_name = "DURATION", default_value = "10s", allow_hyphen_values = true,
          value_parser = duration_in(Duration::ZERO, HOUR))]
    pub drain: Duration,
}

/// Runs until SIGINT/SIGTERM; errors are one line for the user.
pub async fn run(args: Args) -> Result<(), Failure> {
    seaport_net::event::use_json(args.client.json);
    let keypair = args.client.keypair()?;
    let addr = SocketAddr::new(args.bind, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}; choose another -p port or --bind address"))?;
    // With -p 0 the kernel picks the port: report that one, not 0.
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let resolver = args.client.resolver().await?;
    let mut config = ClientConfig::new(keypair.clone(), args.client.registry.key);
    // Tells this process's sessions from those of others with the same seed.
    config.process = seaport_net::identity::random_u64();
    let client = Arc::new(Mutex::new(ProxyClient::new(config, args.role.clone(), args.balance, args.ban)));
    // Bumped on every instance-set change, so waiting clients wake up.
    let (changed_tx, changed) = watch::channel(0u64);
    // The registry's answers to meeting requests, for the introducer below.
    let (answers_tx, answers) = mpsc::unbounded_channel();
    let pinned = Arc::new(AllowList::new(args.service_keys.clone(), None).map_err(Failure::Usage)?);
    let pinned_view = pinned.clone();
    // Filled once the control task exists: the event handler needs it first.
    let links_cell: Arc<std::sync::OnceLock<Arc<Links>>> = Arc::default();
    let links_view = links_cell.clone();
    let mut known: HashMap<PublicKey, Role> = HashMap::new();
    let mut connected = false;
    let query = args.role.clone();
    let on_event = move |e: &ProxyEvent| match e {
        ProxyEvent::Connected => {
            connected = true;
            emit(&Event::Connected);
        }
        ProxyEvent::Disconnected(reason) => {
            if std::mem::take(&mut connected) {
                emit(&Event::Disconnected { reason: reason.to_string() });
            }
        }
        ProxyEvent::Instances { instances, truncated } => {
            // With --service-key, the others do not exist for this proxy.
            let instances: Vec<&Instance> = instances.iter().filter(|i| pinned_view.admits(&i.key)).collect();
            let now: HashMap<PublicKey, Role> = instances.iter().map(|i| (i.key, i.role.clone())).collect();
            for (key, role) in &known {
                if !now.contains_key(key) {
                    tracing::info!(service = %key, "service gone from the registry");
                    emit(&Event::Lost { key: *key, role: role.clone() });
                }
            }
            for instance in &instances {
                if !known.contains_key(&instance.key) {
                    emit(&Event::Found { key: instance.key, role: instance.role.clone() });
                    emit(&Event::Serving { port, key: instance.key });
                    seaport_net::notify::ready();
                }
            }
            known = now;
            // Links of instances that left go away: their streams finish.
            if let Some(links) = links_view.get() {
                links.retain(&known.keys().copied().collect::<Vec<_>>());
            }
            if instances.is_empty() {
                tracing::warn!("no instance matches the query right now");
            }
            if *truncated {
                tracing::warn!("more instances match than the registry sent");
            }
            changed_tx.send_modify(|n| *n += 1);
        }
        ProxyEvent::MeetReady { id, ticket } => {
            let _ = answers_tx.send((*id, Ok(*ticket)));
        }
        ProxyEvent::MeetRefused { id, text } => {
            let _ = answers_tx.send((*id, Err(text.clone())));
        }
        ProxyEvent::Refused { code, text, .. } => {
            tracing::error!(%code, "registry refused the lookup: {text}; asking again after the next reconnect");
            emit(&Event::WatchRefused { query: query.clone(), text: text.clone() });
        }
        other => tracing::debug!(?other),
    };
    let control = ControlTask::spawn(client.clone(), args.client.registry.clone(), resolver, on_event);
    let introducer = Introducer::new(client.clone(), control.poke(), control.registry_addr(), answers);
    let links = Arc::new(
        Links::new(keypair.clone(), LinkConfig::default(), args.dial_timeout).with_introducer(introducer),
    );
    let _ = links_cell.set(links.clone());

    let (wait, dial) = (args.connect_timeout, args.dial_timeout);
    let conns = accept_until(&listener, None, seaport_net::signal::shutdown_signal(), |stream, peer| {
        let (client, links, changed, pinned) =
            (client.clone(), links.clone(), changed.clone(), pinned.clone());
        async move {
            let served = serve_client(stream, &client, &links, &pinned, changed, wait, dial);
            if let Err(e) = served.await {
                tracing::info!(%peer, "connection closed: {e}");
            }
        }
    })
    .await;
    tracing::info!("shutting down: draining open connections");
    emit(&Event::Draining);
    seaport_net::notify::stopping();
    drop(listener);
    links.go_away_all();
    control.stop().await;
    drain(conns, args.drain).await;
    emit(&Event::Stopped);
    Ok(())
}

/// One client connection: wait for an instance if none is known yet, then try
/// instances in the strategy's order until one accepts a stream on its link
/// (the service has reached its backend), and carry it. Nothing of the
/// client's is read before that, so any instance may fail without the
/// client seeing it.
async fn serve_client(
    stream: TcpStream,
    client: &Mutex<ProxyClient>,
    links: &Links,
    pinned: &AllowList,
    mut changed: watch::Receiver<u64>,
    wait: Duration,
    dial: Duration,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + wait;
    let order = loop {
        let mut order = lock(client).choose(seaport_net::clock::now(), random_u64());
        order.retain(|i| pinned.admits(&i.key));
        if !order.is_empty() {
            break order;
        }
        match tokio::time::timeout_at(deadline, changed.changed()).await {
            Ok(Ok(())) => {}
            _ => return Err(format!("no instance found within {wait:?}")),
        }
    };
    let socket = Arc::new(stream);
    let mut failures = Vec::new();
    for instance in order {
        match links.open(&instance, socket.clone(), dial).await {
            Ok((link, id)) => {
                seaport_net::serve::record_peer_key(&instance.key);
                let moved = link.run(id).await.map_err(|e| e.to_string())?;
                tracing::debug!(sent = moved.sent, received = moved.received, "connection closed");
                return Ok(());
            }
            Err(failure) => {
                tracing::warn!(service = %instance.key, "instance failed, trying the next: {failure}");
                lock(client).report_failure(seaport_net::clock::now(), instance.key);
                failures.push(failure.to_string());
            }
        }
    }
    Err(format!("every instance failed: {}", failures.join("; ")))
}
