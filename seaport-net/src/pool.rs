//! A proxy's pool of links ([`Links`]): one per service instance, opened on
//! first need by whichever path works ([`crate::reach`]) and shared by every
//! client connection to that instance, and the upgrade of a relayed link to
//! a better path.
//!
//! Invariants:
//! - At most [`MAX_LINKS_PER_INSTANCE`] links per instance, so the streams
//!   to one instance are bounded too; a second link is opened only while
//!   every usable one is at its stream limit.
//! - Concurrent first connections to an instance wait for one dial (an
//!   async lock per instance) instead of dialing each.
//! - A link is never torn down under its streams: a dead, departing or
//!   replaced link leaves the pool and goes away; its streams finish on it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use seaport_proto::keys::{Keypair, PublicKey};
use seaport_proto::link::{self as proto, LinkConfig, StreamId};
use seaport_proto::message::Instance;

use crate::event::{Event, emit};
use crate::handshake::HandshakeError;
use crate::link::{LinkHandle, OpenError, Repath, StreamSocket};
use crate::lock::lock;
use crate::reach::{self, Introducer, Path, PathMemo};

/// When a relayed link first tries for a better path.
pub const UPGRADE_FIRST: Duration = Duration::from_secs(30);
/// The longest pause between such tries.
pub const UPGRADE_MAX: Duration = Duration::from_secs(300);

/// Most links a proxy keeps to one instance; each carries up to
/// `LinkConfig::max_streams` streams, so this bounds the streams too.
pub const MAX_LINKS_PER_INSTANCE: usize = 64;

/// A proxy's links: one per service instance, opened on first need and
/// reused by every stream; another only while every one is at its stream
/// limit; replaced once dead or going away.
pub struct Links {
    keypair: Keypair,
    config: LinkConfig,
    dial_timeout: Duration,
    /// Meetings through the registry, for services no direct path reaches.
    introducer: Option<Arc<Introducer>>,
    /// What path worked last, per service.
    memo: Arc<PathMemo>,
    /// Per service key, its processes and their links.
    links: Mutex<HashMap<PublicKey, Vec<Process>>>,
    /// Services are not told where clients connect from (`--hide-client-address`).
    hide_client_address: bool,
    /// Streams carry their client's first bytes with the open.
    early_data: bool,
}

/// One process of a service identity: one identity may run as several
/// processes (one seed per host), each with its own link port and backend,
/// so a link belongs to a key *and* the addresses that process reported.
/// The addresses may change (which registries of a set answer decides which
/// the proxy knows): a process stays the same while some address stays
/// ([`seaport_proto::client::set::is_same_instance`]).
struct Process {
    addrs: Vec<SocketAddr>,
    /// Its links; the async lock makes concurrent first connections wait
    /// for one dial instead of dialing each.
    cell: Arc<tokio::sync::Mutex<Vec<LinkHandle>>>,
}

/// Whether a process reported at `addrs` is the one known at `known`.
fn same_process(known: &[SocketAddr], addrs: &[SocketAddr]) -> bool {
    known.iter().any(|a| addrs.contains(a))
}

impl Links {
    /// No links yet; each will be dialed as `keypair` within `dial_timeout`.
    pub fn new(keypair: Keypair, config: LinkConfig, dial_timeout: Duration) -> Links {
        Links {
            keypair,
            config,
            dial_timeout,
            introducer: None,
            memo: Arc::default(),
            links: Mutex::new(HashMap::new()),
            hide_client_address: false,
            early_data: false,
        }
    }

    /// Never tells services where a client connected from (their PROXY
    /// protocol headers then say `UNKNOWN`).
    pub fn hiding_client_addresses(mut self, hide: bool) -> Links {
        self.hide_client_address = hide;
        self
    }

    /// Streams carry their client's first bytes with the open
    /// ([`LinkHandle::send_early_data`], and the trade it makes).
    pub fn sending_early_data(mut self, on: bool) -> Links {
        self.early_data = on;
        self
    }

    /// Also reaches services through meetings (punched or relayed paths).
    pub fn with_introducer(mut self, introducer: Introducer) -> Links {
        self.introducer = Some(Arc::new(introducer));
        self
    }

    /// Opens a stream for `client` on a link to `instance` and waits (at most
    /// `timeout`) for the service to accept it. `from` is where the client
    /// connected from, told to the service unless this proxy hides it.
    pub async fn open(
        &self,
        instance: &Instance,
        client: Arc<StreamSocket>,
        from: Option<SocketAddr>,
        timeout: Duration,
    ) -> Result<(LinkHandle, StreamId), OpenError> {
        let from = from.filter(|_| !self.hide_client_address);
        // A link found with room can fill up before our open lands: try once more.
        for _ in 0..2 {
            let link = self.get(instance).await?;
            if self.early_data {
                link.send_early_data();
            }
            match link.open(client.clone(), from, timeout).await {
                Err(OpenError::Link(proto::StreamError::StreamLimit)) => continue,
                opened => return opened.map(|id| (link, id)),
            }
        }
        Err(OpenError::Link(proto::StreamError::StreamLimit))
    }

    /// A usable link to `instance` (for UDP flows, which need no stream):
    /// the least loaded one, dialed now if there is none.
    pub async fn link_for(&self, instance: &Instance) -> Result<LinkHandle, HandshakeError> {
        self.get(instance).await
    }

    /// The least loaded usable link to `instance` with room for a stream,
    /// dialed now if there is none.
    async fn get(&self, instance: &Instance) -> Result<LinkHandle, HandshakeError> {
        let cell = {
            let mut links = lock(&self.links);
            let processes = links.entry(instance.key).or_default();
            match processes.iter_mut().find(|p| same_process(&p.addrs, &instance.addrs)) {
                Some(known) => {
                    known.addrs.clone_from(&instance.addrs);
                    known.cell.clone()
                }
                None => {
                    let cell = Arc::default();
                    processes.push(Process { addrs: instance.addrs.clone(), cell: Arc::clone(&cell) });
                    cell
                }
            }
        };
        let mut links = cell.lock().await;
        // A dead or departing link keeps running for its streams, which hold it.
        links.retain(LinkHandle::is_usable);
        let least = links.iter().min_by_key(|l| l.stream_count());
        if let Some(link) = least.filter(|l| l.stream_count() < self.config.max_streams) {
            return Ok(link.clone());
        }
        if let Some(link) = least.filter(|_| links.len() >= MAX_LINKS_PER_INSTANCE) {
            return Ok(link.clone());
        }
        let last = self.memo.get(&instance.key);
        let introducer = self.introducer.as_deref();
        // Boxed: the path search is a large future, and every client
        // connection's task would otherwise carry its size for its whole
        // life (tens of KiB each with thousands of idle connections).
        let establish = reach::establish(instance, &self.keypair, self.dial_timeout, introducer, last, true);
        let mut reached = Box::pin(establish).await?;
        let better = reached.better.take();
        let link = announce(&self.memo, &self.config, instance, reached, self.repath(instance))?;
        links.push(link.clone());
        if let Some(better) = better {
            move_when_found(link.clone(), better, self.memo.clone());
        }
        if self.introducer.is_some() && (link.path() == Path::Relayed || link.is_resumable()) {
            self.upgrade_later(instance.clone(), link.clone(), cell.clone());
        }
        Ok(link)
    }

    /// How a link to `instance` finds a new path when it loses its own:
    /// the same search as a new link's (relaying included), starting with
    /// what worked last.
    fn repath(&self, instance: &Instance) -> Repath {
        let (keypair, timeout) = (self.keypair.clone(), self.dial_timeout);
        let (introducer, memo, instance) = (self.introducer.clone(), self.memo.clone(), instance.clone());
        Arc::new(move || {
            let (keypair, introducer, memo, instance) =
                (keypair.clone(), introducer.clone(), memo.clone(), instance.clone());
            Box::pin(async move {
                let last = memo.get(&instance.key);
                let reached =
                    reach::establish(&instance, &keypair, timeout, introducer.as_deref(), last, true).await?;
                memo.set(instance.key, reached.path);
                Ok(reached)
            })
        })
    }

    /// A relayed link costs the registry and a detour: now and then (after
    /// [`UPGRADE_FIRST`], doubling to [`UPGRADE_MAX`]) a direct or punched
    /// path to the same instance is tried; once one is up, the link moves
    /// onto it with its open streams (a service that cannot resume links
    /// gets a new link for new streams, and the relayed one goes away once
    /// its streams finish). Stops once the link is no longer usable; a
    /// resumable link is watched for its whole life, since a lost path may
    /// leave it relayed later.
    fn upgrade_later(
        &self,
        instance: Instance,
        relayed: LinkHandle,
        cell: Arc<tokio::sync::Mutex<Vec<LinkHandle>>>,
    ) {
        let (keypair, config, timeout) = (self.keypair.clone(), self.config.clone(), self.dial_timeout);
        let (introducer, memo) = (self.introducer.clone(), self.memo.clone());
        let repath = self.repath(&instance);
        tokio::spawn(async move {
            let mut pause = UPGRADE_FIRST;
            loop {
                tokio::time::sleep(pause).await;
                if !relayed.is_usable() {
                    return;
                }
                if relayed.path() != Path::Relayed {
                    if !relayed.is_resumable() {
                        return;
                    }
                    pause = UPGRADE_FIRST;
                    continue;
                }
                let hint = Some(Path::Punched);
                match reach::establish(&instance, &keypair, timeout, introducer.as_deref(), hint, false).await
                {
                    Ok(reached) if relayed.is_resumable() => {
                        memo.set(instance.key, reached.path);
                        // Watched on: a move can fail, and a later loss can
                        // leave the link relayed again.
                        pause = match relayed.move_to(reached).await {
                            Ok(()) => UPGRADE_FIRST,
                            Err(e) => {
                                tracing::debug!(service = %instance.key, "the link did not move: {e}");
                                (pause * 2).min(UPGRADE_MAX)
                            }
                        };
                    }
                    Ok(reached) => {
                        let mut links = cell.lock().await;
                        if links.len() >= MAX_LINKS_PER_INSTANCE {
                            return;
                        }
                        let Ok(link) = announce(&memo, &config, &instance, reached, repath.clone()) else {
                            continue;
                        };
                        links.push(link);
                        relayed.go_away();
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(service = %instance.key, "still no path but the relay: {e}");
                        pause = (pause * 2).min(UPGRADE_MAX);
                    }
                }
            }
        });
    }

    /// Lets the links of instances not in `instances` go away: their open
    /// streams finish, new ones go elsewhere.
    pub fn retain(&self, instances: &[Instance]) {
        let gone: Vec<_> = {
            let keys: Vec<PublicKey> = instances.iter().map(|i| i.key).collect();
            self.memo.retain(&keys);
            let mut links = lock(&self.links);
            let mut gone = Vec::new();
            for (key, processes) in links.iter_mut() {
                let (kept, left): (Vec<Process>, Vec<Process>) =
                    std::mem::take(processes).into_iter().partition(|p| {
                        instances.iter().any(|i| i.key == *key && same_process(&p.addrs, &i.addrs))
                    });
                *processes = kept;
                gone.extend(left.into_iter().map(|p| p.cell));
            }
            links.retain(|_, processes| !processes.is_empty());
            gone
        };
        for cell in gone {
            // A dial in progress holds the lock; its link goes when its streams end.
            if let Ok(links) = cell.try_lock() {
                for link in links.iter() {
                    link.go_away();
                    link.abandon_if_detached();
                }
            }
        }
    }

    /// Every link goes away (shutdown): open streams finish.
    pub fn go_away_all(&self) {
        self.retain(&[]);
    }
}

/// Moves `link` onto the punched path `better` once (and if) its punch
/// succeeds: the relay it started on is left (and freed) at once.
fn move_when_found(link: LinkHandle, better: reach::Search, memo: Arc<PathMemo>) {
    tokio::spawn(async move {
        let Ok(mut reached) = better.await else { return };
        reached.better = None;
        if !link.is_usable() || link.path() != Path::Relayed {
            return;
        }
        memo.set(link.remote, reached.path);
        if let Err(e) = link.move_to(reached).await {
            tracing::debug!(service = %link.remote, "the link did not move to its punched path: {e}");
        }
    });
}

/// Starts the driver of a link that reached `instance`, remembers its path
/// and says which it took.
fn announce(
    memo: &PathMemo,
    config: &LinkConfig,
    instance: &Instance,
    reached: reach::Reached,
    repath: Repath,
) -> Result<LinkHandle, HandshakeError> {
    let (path, addr) = (reached.path, reached.addr);
    let link = LinkHandle::start(reached, config.clone(), repath)?;
    memo.set(instance.key, path);
    tracing::info!(service = %instance.key, "link to {} via {path} {addr}", instance.key);
    emit(&Event::LinkUp { key: instance.key, path: path.name(), addr });
    Ok(link)
}
