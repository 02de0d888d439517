//! The proxy's local ports, one per mapping: bound at start (a port that
//! cannot be bound is a fatal error then), and with `--config` opened and
//! closed on SIGHUP to match the file's mappings ([`Ports::reconcile`]).
//!
//! Invariants: a mapping that stays keeps its socket, its query slot and
//! its connections; a mapping removed stops taking connections at once and
//! its open ones get `--drain` to finish, as at shutdown; a mapping added
//! that cannot be bound is reported and left out, the others untouched.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use seaport_net::lock::lock;
use seaport_net::serve::{accept_until, drain};
use seaport_proto::role::Protocol;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::{Mapping, Served, ServedPort, Watcher, udp};

/// A mapping's bound socket.
pub(crate) enum Listener {
    Tcp(tokio::net::TcpListener),
    Udp(tokio::net::UdpSocket),
}

/// Binds `mapping` on `bind`; returns the socket and its port (the
/// kernel's choice for port 0).
pub(crate) async fn bind(mapping: &Mapping, bind: IpAddr) -> Result<(Listener, u16), String> {
    let addr = SocketAddr::new(bind, mapping.port);
    let cannot = |e: std::io::Error| {
        format!(
            "cannot listen on {addr}/{} (for {}): {e}; choose another port or --bind address",
            mapping.protocol, mapping.query
        )
    };
    let (listener, local) = match mapping.protocol {
        Protocol::Tcp => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(cannot)?;
            let local = listener.local_addr().map_err(|e| e.to_string())?;
            (Listener::Tcp(listener), local)
        }
        Protocol::Udp => {
            let socket = tokio::net::UdpSocket::bind(addr).await.map_err(cannot)?;
            let local = socket.local_addr().map_err(|e| e.to_string())?;
            (Listener::Udp(socket), local)
        }
    };
    Ok((listener, local.port()))
}

/// What every port's connections share.
pub(crate) struct PortContext {
    pub(crate) bind: IpAddr,
    pub(crate) watcher: Arc<Watcher>,
    /// A TCP port's connections: everything but the query slot.
    pub(crate) tcp: ServedPort,
    /// A UDP port's flows: everything but the query slot and name.
    pub(crate) udp: udp::UdpPort,
    pub(crate) drain: Duration,
}

/// One open port.
struct OpenPort {
    mapping: Mapping,
    slot: usize,
    port: u16,
    stop: watch::Sender<bool>,
    /// Ends with the port's open connections (none for UDP).
    task: JoinHandle<JoinSet<()>>,
}

/// The open ports.
pub(crate) struct Ports {
    ctx: PortContext,
    open: Vec<OpenPort>,
}

impl Ports {
    pub(crate) fn new(ctx: PortContext) -> Ports {
        Ports { ctx, open: Vec::new() }
    }

    /// Serves `listener` (bound for `mapping` on `port`) with query slot `slot`.
    pub(crate) fn serve(&mut self, mapping: Mapping, listener: Listener, port: u16, slot: usize) {
        let (stop, mut stopped) = watch::channel(false);
        let shutdown = async move {
            let _ = stopped.wait_for(|stopped| *stopped).await;
        };
        let task = match listener {
            Listener::Tcp(listener) => {
                let generation = lock(&self.ctx.watcher.slots)
                    .get(slot)
                    .and_then(Option::as_ref)
                    .map_or(u64::MAX, |s| s.generation);
                let served_port = ServedPort { query: slot, generation, ..self.ctx.tcp.clone() };
                tokio::spawn(async move {
                    accept_until(&listener, None, shutdown, |stream, peer| {
                        let served_port = served_port.clone();
                        async move {
                            if let Err(e) = served_port.serve_client(stream, peer).await {
                                tracing::info!(%peer, "connection closed: {e}");
                            }
                        }
                    })
                    .await
                    // The listener drops here: no new connection is taken.
                })
            }
            Listener::Udp(socket) => {
                let udp_port = udp::UdpPort {
                    query: slot,
                    name: mapping.query.to_string(),
                    warned: Arc::default(),
                    ..self.ctx.udp.clone()
                };
                tokio::spawn(async move {
                    // Datagrams have nothing to finish: a UDP port stops at once.
                    udp_port.serve(socket, shutdown).await;
                    JoinSet::new()
                })
            }
        };
        self.open.push(OpenPort { mapping, slot, port, stop, task });
    }

    /// Opens and closes ports to serve `wanted` (a reread config file):
    /// mappings are the same when their query, requested port and protocol are.
    pub(crate) async fn reconcile(&mut self, wanted: &[Mapping]) {
        let same = |a: &Mapping, b: &Mapping| {
            a.query.to_string() == b.query.to_string() && a.port == b.port && a.protocol == b.protocol
        };
        let (kept, gone): (Vec<OpenPort>, Vec<OpenPort>) = std::mem::take(&mut self.open)
            .into_iter()
            .partition(|p| wanted.iter().any(|w| same(&p.mapping, w)));
        self.open = kept;
        for port in gone {
            tracing::info!(port = port.port, query = %port.mapping.query, "config reread: port closed");
            let _ = port.stop.send(true);
            self.ctx.watcher.remove(port.slot);
            // Its socket is closed once its loop ends: only then may a new
            // mapping bind the same port.
            if let Ok(open) = port.task.await {
                tokio::spawn(drain(open, self.ctx.drain));
            }
        }
        for mapping in wanted {
            if self.open.iter().any(|p| same(&p.mapping, mapping)) {
                continue;
            }
            match bind(mapping, self.ctx.bind).await {
                Ok((listener, port)) => {
                    let served = Served::new(mapping.query.clone(), Some(port), mapping.protocol);
                    let Some(slot) = self.ctx.watcher.add(served) else {
                        tracing::error!(query = %mapping.query, "config reread: no query slot left");
                        continue;
                    };
                    tracing::info!(port, query = %mapping.query, "config reread: port opened");
                    self.serve(mapping.clone(), listener, port, slot);
                }
                Err(e) => tracing::error!("config reread: {e}; the other ports are unchanged"),
            }
        }
    }

    /// Stops every port; returns their open connections, for the drain.
    pub(crate) async fn stop_all(self) -> Vec<JoinSet<()>> {
        for port in &self.open {
            let _ = port.stop.send(true);
        }
        let mut conns = Vec::new();
        for port in self.open {
            if let Ok(open) = port.task.await {
                conns.push(open);
            }
        }
        conns
    }
}
