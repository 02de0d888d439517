//! Rendezvous through the BitTorrent mainline DHT: a [`DhtNode`] publishes
//! the addresses of a *registry set* and resolves them for clients.
//!
//! Registries started with the same seed (the same ed25519 key) form a set.
//! They never talk to each other; they share one BEP44 mutable item, signed
//! with the key (salt [`SALT`]), that lists every live member with the time
//! it last refreshed its entry ([`SetRecord`]). Each registry merges itself
//! in every [`SET_REFRESH`]: it reads the record, merges, writes the result
//! with compare-and-swap on the `seq` it read, reads the newest back to
//! check that it is listed, and starts over (after a short random pause)
//! when another writer came first. So registries publishing at once do not
//! erase each other. A registry that stops removes its entry
//! ([`publish_loop`]); one that is killed ages out after [`SET_STALE`].
//! Clients fetch the newest item (mainline checks the signature) and dial
//! the live members.
//!
//! A record by an old build lists only its own addresses, with no time.
//! A registry reading it stamps that member with the time its item was
//! written (old builds' `seq` is milliseconds since the epoch), so a running
//! old build stays listed for [`SET_STALE`] like any member. (An old build
//! still overwrites the whole record when it republishes; the others merge
//! themselves back within [`SET_REFRESH`].)
//!
//! BEP44's CAS is checked by each storing node on its own, only against a
//! value it holds, and a put counts as done when some node took it and most
//! did not refuse it: two writers can each win at some nodes, and a write
//! most nodes refused still lands at the others. Measured on loopback,
//! three registries started at once leave the nodes holding different
//! versions in about one start in three; after that every CAS is refused by
//! some majority for ever (each node refuses any `seq` but its own), and a
//! plain write of the newest version drops the members only older versions
//! hold. So a registry reads every version the nodes hold: when they agree,
//! it writes with CAS (on `seq` 0 when there is no record: none of ours has
//! it, so nodes already holding another first writer's record refuse);
//! when they disagree, it writes the members of all versions, unconditional
//! and newer than any, which every node takes ([`DhtNode::join_set`]).
//!
//! Measured with mainline 8.0.1: a lone server node makes every query wait out
//! 2 s request timeouts, while nodes that bootstrap from each other answer in
//! about 60–120 ms. So a registry with `--dht-port` runs two nodes (the server
//! node, and a publishing node bootstrapped from it), and clients given
//! `--bootstrap` run in server mode too. A node never bootstraps from its own
//! address (that spins a core).
//!
//! # Files
//! - `record`: the record's value (its text format, capacity and freshness
//!   rules), its codec and merge; pure, and re-exported here.
//! - `tests`: the node's tests, through a private DHT on loopback.
//!
//! # Invariants
//! - What a registry writes is what [`SetRecord::merge`] or
//!   [`SetRecord::leave`] made: never over BEP44's 1000 bytes nor
//!   [`MAX_SET_MEMBERS`] members. What it reads is untrusted text, decoded
//!   by [`SetRecord::decode`].
//! - A read keeps at most [`MAX_VERSIONS`] versions and 32 members.
//! - Publishing retries for ever, its pause capped at 30 s, and tells the
//!   user once what to try when it keeps failing or when the set is full.

mod record;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_core::Stream;
use mainline::async_dht::AsyncDht;
use mainline::errors::PutMutableError;
use mainline::{Dht, MutableItem};
use seaport_proto::keys::{Keypair, PublicKey};
use tokio::sync::watch;

pub use self::record::{
    BadRecord, CLOCK_SKEW, MAX_SET_MEMBERS, MAX_VALUE, SET_STALE, SetFull, SetMember, SetRecord,
};
use crate::identity::random_u64;

/// Salt of seaport's records, so they never collide with other uses of a key.
pub const SALT: &[u8] = b"seaport/1";
/// How often a registry refreshes its entry in the set's record.
pub const SET_REFRESH: Duration = Duration::from_secs(60);
/// How long a stopping registry may spend removing its entry: a read, a
/// write and a read-back take under a second on a private DHT, a few on the
/// public one.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times one update reads, merges and writes the record before it
/// gives up for this round (the publish loop tries again later).
const SET_ATTEMPTS: u32 = 5;
/// How long publishing may fail before the user is told, once, what to try.
pub const PUBLISH_HINT_AFTER: Duration = Duration::from_secs(30);
/// How long a DHT node may take to start before the user is told what is
/// going on (its bootstrap host names are being resolved).
pub const START_HINT_AFTER: Duration = Duration::from_secs(20);

/// Why a registry's record could not be had from the DHT.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DhtError {
    /// No DHT node has a record for the key (yet).
    #[error("registry {0} not found in the DHT (yet)")]
    NotFound(PublicKey),
    /// The record found lists no address this build can parse.
    #[error("the DHT record for {0} lists no address")]
    EmptyRecord(PublicKey),
    /// The record lists registries, but none refreshed its entry lately.
    #[error(
        "the DHT record for {key} lists {members} registr{}, none refreshed in the last {} minutes: none is \
         running, or this host's clock is wrong",
        if *members == 1 { "y" } else { "ies" },
        (SET_STALE + CLOCK_SKEW).as_secs() / 60
    )]
    Stale {
        /// The set's key.
        key: PublicKey,
        /// How many members the record lists.
        members: usize,
    },
}

/// Why the set's record could not be updated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetError {
    /// The record has no room for this registry.
    #[error(transparent)]
    Full(#[from] SetFull),
    /// Nothing to publish.
    #[error("no address to publish")]
    NoAddress,
    /// The DHT did not take the write.
    #[error("{0}")]
    Dht(String),
    /// Other writers kept changing the record.
    #[error("the record kept changing under {SET_ATTEMPTS} attempts to update it (the last: {0})")]
    Contended(String),
}

/// Now, in unix seconds and milliseconds (0 before the epoch: to a clock
/// that wrong every member looks ahead, which the resolve error then says).
fn unix_now() -> (u64, i64) {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (since.as_secs(), i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
}

/// What one update of the set's record does.
#[derive(Clone, Copy)]
enum Change<'a> {
    /// Merge in a member with these addresses, refreshed now.
    Join(&'a [SocketAddr]),
    /// Remove the member with these addresses.
    Leave(&'a [SocketAddr]),
}

/// A DHT node (or two, for a registry with its own server node): what
/// publishes a registry set's record and resolves it for clients.
pub struct DhtNode {
    node: AsyncDht,
    /// Kept alive: the registry's own server node, which others bootstrap from.
    _server: Option<AsyncDht>,
}

async fn build(builder: mainline::DhtBuilder) -> std::io::Result<Dht> {
    // `build` resolves host names and binds sockets: blocking work.
    tokio::task::spawn_blocking(move || builder.build()).await.map_err(std::io::Error::other)?
}

/// Most versions of a record one read keeps: one per node that answers,
/// about 20 on the public DHT.
pub const MAX_VERSIONS: usize = 64;

/// What the nodes hold of the set's record, as one read found it.
#[derive(Debug, Default)]
struct Held {
    /// The newest version (highest `seq`, then highest value: mainline's
    /// rule, so it is what clients get).
    newest: Option<MutableItem>,
    /// How many different versions answered.
    versions: usize,
    /// The members of all versions, newest version first: each registry's
    /// freshest entry, at most 2 × [`MAX_SET_MEMBERS`] (more is a full set
    /// anyway).
    union: SetRecord,
}

impl Held {
    /// Sorts out what the nodes answered.
    fn from_versions(mut items: Vec<MutableItem>) -> Held {
        items.sort_by(|a, b| (b.seq(), b.value()).cmp(&(a.seq(), a.value())));
        items.dedup_by(|a, b| a.seq() == b.seq() && a.value() == b.value());
        let mut union = SetRecord::default();
        for (at, item) in items.iter().enumerate() {
            let record = match SetRecord::decode(item.value()) {
                Ok(record) => record,
                Err(e) if at == 0 => {
                    tracing::warn!(
                        "the registry set's DHT record is unreadable ({e}): this registry replaces it"
                    );
                    continue;
                }
                Err(_) => continue,
            };
            for member in stamp_unknown(record, item.seq()).members {
                let room = union.members.len() < 2 * MAX_SET_MEMBERS;
                match union.members.iter_mut().find(|m| m.shares_addr(&member.addrs)) {
                    // `None` (unknown) is older than any time.
                    Some(known) if member.refreshed > known.refreshed => *known = member,
                    Some(_) => {}
                    None if room => union.members.push(member),
                    None => {}
                }
            }
        }
        Held { versions: items.len(), newest: items.into_iter().next(), union }
    }
}

/// `record` with its members of unknown freshness (an old build's record)
/// taken as refreshed when its item was written: old builds' `seq` is
/// milliseconds since the epoch, and a merge drops a time that is not
/// plausible.
fn stamp_unknown(mut record: SetRecord, seq: i64) -> SetRecord {
    let written = u64::try_from(seq / 1000).ok();
    for member in &mut record.members {
        if member.refreshed.is_none() {
            member.refreshed = written;
        }
    }
    record
}

impl DhtNode {
    fn new(dht: Dht, server: Option<AsyncDht>) -> DhtNode {
        DhtNode { node: dht.as_async(), _server: server }
    }

    /// A node for a service or proxy. With private `bootstrap` nodes it runs
    /// in server mode (so private queries answer fast); else it is a plain
    /// client of the public DHT.
    pub async fn client(bootstrap: &[String]) -> std::io::Result<DhtNode> {
        let mut builder = Dht::builder();
        if !bootstrap.is_empty() {
            // Port 0: a private network's node must not take 6881 from a real client.
            builder.bootstrap(bootstrap).server_mode().port(0);
        }
        Ok(DhtNode::new(build(builder).await?, None))
    }

    /// The registry's nodes: with `dht_port`, a server node on that UDP port
    /// plus a publishing node bootstrapped from it.
    pub async fn registry(bootstrap: &[String], dht_port: Option<u16>) -> std::io::Result<DhtNode> {
        let Some(port) = dht_port else { return DhtNode::client(bootstrap).await };
        let mut server = Dht::builder();
        server.server_mode().port(port);
        if bootstrap.is_empty() {
            server.no_bootstrap();
        } else {
            server.bootstrap(bootstrap);
        }
        let server = build(server).await?.as_async();
        let mut own: Vec<String> = vec![format!("127.0.0.1:{port}")];
        own.extend(bootstrap.iter().cloned());
        let mut node = Dht::builder();
        node.server_mode().bootstrap(&own).port(0);
        Ok(DhtNode::new(build(node).await?, Some(server)))
    }

    /// The live members of the set `key` (each its addresses), the freshest
    /// first: members that stopped refreshing ([`SetMember::is_live`], by
    /// this host's clock) are left out.
    pub async fn resolve(&self, key: &PublicKey) -> Result<Vec<Vec<SocketAddr>>, DhtError> {
        let item = self.newest(key).await.ok_or(DhtError::NotFound(*key))?;
        let record = SetRecord::decode(item.value()).map_err(|_| DhtError::EmptyRecord(*key))?;
        let listed = record.members.len();
        if listed == 0 {
            return Err(DhtError::EmptyRecord(*key));
        }
        let (now, _) = unix_now();
        let mut live: Vec<SetMember> = record.members.into_iter().filter(|m| m.is_live(now)).collect();
        if live.is_empty() {
            return Err(DhtError::Stale { key: *key, members: listed });
        }
        // Stable: equally fresh members keep the record's order; unknown
        // freshness (an old build's record) goes last.
        live.sort_by_key(|m| Reverse(m.refreshed));
        Ok(live.into_iter().map(|m| m.addrs).collect())
    }

    /// Merges a member with `addrs`, refreshed now, into the set's record
    /// under `keypair`'s key; the record as clients then get it, which
    /// lists this registry. Writers that race are reconciled as the module
    /// docs say.
    pub async fn join_set(&self, keypair: &Keypair, addrs: &[SocketAddr]) -> Result<SetRecord, SetError> {
        if addrs.is_empty() {
            return Err(SetError::NoAddress);
        }
        self.update_set(keypair, Change::Join(addrs)).await
    }

    /// Removes the member with `addrs` from the set's record, for a registry
    /// that stops; the record as clients then get it.
    pub async fn leave_set(&self, keypair: &Keypair, addrs: &[SocketAddr]) -> Result<SetRecord, SetError> {
        self.update_set(keypair, Change::Leave(addrs)).await
    }

    /// The newest version of the record for `key`: what clients get.
    async fn newest(&self, key: &PublicKey) -> Option<MutableItem> {
        self.node.get_mutable_most_recent(key.as_bytes(), Some(SALT)).await
    }

    /// Every version of the record for `key` that the nodes hold (one
    /// query), sorted out.
    async fn held(&self, key: &PublicKey) -> Held {
        // Ends when the query does. Dropped early (enough versions, or the
        // caller gone), the query runs on in mainline's actor, unheard.
        let mut versions = pin!(self.node.get_mutable(key.as_bytes(), Some(SALT), None));
        let mut items = Vec::new();
        while items.len() < MAX_VERSIONS {
            match poll_fn(|cx| versions.as_mut().poll_next(cx)).await {
                Some(item) => items.push(item),
                None => break,
            }
        }
        Held::from_versions(items)
    }

    /// Reads the record, applies `change`, writes the result and reads it
    /// back, until clients get a record with the change in it; when another
    /// writer came first (the CAS refused, or its record read back) it
    /// starts over after a short random pause.
    ///
    /// The write depends on what the nodes hold. When they agree on one
    /// version, it is a CAS on that version's `seq` (0 when there is none:
    /// no record of ours has that `seq`, and a node already holding another
    /// first writer's record refuses it). When they disagree (two writers
    /// each won at some nodes, a write most refused still landed at the
    /// others, a node missed a write), no CAS can ever pass at all of them,
    /// since each refuses any `seq` but its own: the write is then the
    /// change applied to the members of all versions (each registry's
    /// freshest entry), unconditional and newer than any, so every node
    /// takes it and they agree again, and no member is lost. A member that
    /// left in a newer version but is still in an older one comes back
    /// with its old time: it lingers until [`SET_STALE`], like a killed one.
    async fn update_set(&self, keypair: &Keypair, change: Change<'_>) -> Result<SetRecord, SetError> {
        let key = keypair.public();
        let mut conflict = String::new();
        for attempt in 0..SET_ATTEMPTS {
            if attempt > 0 {
                // Random, so that writers that collided do not collide again.
                let pause = 50 + (random_u64() % 250) * u64::from(attempt);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            let held = self.held(&key).await;
            let (now, now_millis) = unix_now();
            let next = match change {
                Change::Join(mine) => {
                    if attempt == 0 {
                        warn_ahead(&held.union, now);
                    }
                    held.union.clone().merge(SetMember { addrs: mine.to_vec(), refreshed: Some(now) }, now)?
                }
                Change::Leave(mine) if !held.union.lists(mine) => {
                    return Ok(held
                        .newest
                        .map(|i| SetRecord::decode(i.value()).unwrap_or_default())
                        .unwrap_or_default());
                }
                Change::Leave(mine) => held.union.clone().leave(mine, now),
            };
            let newest_seq = held.newest.as_ref().map(MutableItem::seq);
            // Newer than any version, and than any record of an earlier run.
            let seq = newest_seq.map_or(now_millis, |s| now_millis.max(s.saturating_add(1)));
            let cas = (held.versions <= 1).then_some(newest_seq.unwrap_or(0));
            if cas.is_none() {
                tracing::debug!(
                    attempt,
                    versions = held.versions,
                    "the DHT nodes disagree on the registry set's record: writing over it"
                );
            }
            let value = next.encode();
            let item = MutableItem::new(keypair.signing_key().clone(), value.as_bytes(), seq, Some(SALT));
            match self.node.put_mutable(item, cas).await {
                Ok(_) => {}
                Err(PutMutableError::Concurrency(e)) => {
                    tracing::debug!(
                        attempt,
                        ?cas,
                        seq,
                        "the registry set's DHT record changed while updating it: {e}"
                    );
                    conflict = e.to_string();
                    continue;
                }
                Err(PutMutableError::Query(e)) => return Err(SetError::Dht(e.to_string())),
            }
            // Another writer may have won at most nodes all the same.
            let Some(stored) = self.newest(&key).await else {
                conflict = "the record written could not be read back".to_owned();
                continue;
            };
            let stored = SetRecord::decode(stored.value()).unwrap_or_default();
            let done = match change {
                Change::Join(mine) => stored.lists(mine),
                Change::Leave(mine) => !stored.lists(mine),
            };
            if done {
                return Ok(stored);
            }
            tracing::debug!(attempt, "another registry's record replaced this one's update; merging again");
            conflict = "another registry's record replaced this one's update".to_owned();
        }
        Err(SetError::Contended(conflict))
    }
}

/// Warns when members of `record` were refreshed further ahead of this
/// host's clock than [`CLOCK_SKEW`]: a merge drops them, and registries
/// whose clocks disagree keep dropping each other.
fn warn_ahead(record: &SetRecord, now: u64) {
    let ahead = record
        .members
        .iter()
        .filter(|m| m.refreshed.is_some_and(|at| at > now.saturating_add(CLOCK_SKEW.as_secs())))
        .count();
    if ahead > 0 {
        tracing::warn!(
            "{ahead} registr{} of the set refreshed more than {}s ahead of this host's clock, and {} dropped \
             from the DHT record: keep the registries' clocks in sync (NTP)",
            if ahead == 1 { "y" } else { "ies" },
            CLOCK_SKEW.as_secs(),
            if ahead == 1 { "is" } else { "are" },
        );
    }
}

/// A DHT node starting in the background. Starting one resolves the
/// bootstrap nodes' host names, which takes as long as DNS does (40 s with a
/// DNS server that does not answer): nothing else waits for it, and a node
/// still starting after [`START_HINT_AFTER`] says so.
#[derive(Clone)]
pub struct Starting(watch::Receiver<Option<Result<Arc<DhtNode>, String>>>);

impl Starting {
    /// Starts the node that `start` builds, in a task of its own.
    pub fn spawn(start: impl Future<Output = std::io::Result<DhtNode>> + Send + 'static) -> Starting {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            tokio::pin!(start);
            let built = tokio::select! {
                built = &mut start => built,
                () = tokio::time::sleep(START_HINT_AFTER) => {
                    tracing::warn!(
                        "the DHT node has not started after {}s: it is resolving its bootstrap hosts, and DNS \
                         does not answer; without the public DHT, dial the registry as KEY@HOST:PORT or use a \
                         private DHT (--bootstrap HOST:PORT)",
                        START_HINT_AFTER.as_secs()
                    );
                    start.await
                }
            };
            if let Err(e) = &built {
                tracing::error!(
                    "cannot start the DHT node: {e}; a bare key cannot be resolved, KEY@HOST:PORT still works"
                );
            }
            let _ = tx.send(Some(built.map(Arc::new).map_err(|e| e.to_string())));
        });
        Starting(rx)
    }

    /// The node once it started (or why it could not); `None` while starting.
    pub fn node(&self) -> Option<Result<Arc<DhtNode>, String>> {
        self.0.borrow().clone()
    }

    /// Waits for the node.
    pub async fn ready(mut self) -> Result<Arc<DhtNode>, String> {
        loop {
            if let Some(node) = self.node() {
                return node;
            }
            if self.0.changed().await.is_err() {
                return Err("the DHT node's task ended".to_owned());
            }
        }
    }
}

/// Keeps this registry in its set's record until `stop`: merges it in at
/// once, then every [`SET_REFRESH`] (a little less, at random, so that
/// registries started together do not write together), retrying failures
/// with a growing pause; puts the members as of each successful merge in
/// `set`. On `stop` it removes its entry, within [`LEAVE_TIMEOUT`].
pub async fn publish_loop(
    node: Arc<DhtNode>,
    keypair: Keypair,
    addrs: Vec<SocketAddr>,
    set: watch::Sender<Vec<SetMember>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = Duration::from_millis(500);
    // Since when publishing has failed, and whether the user was told what
    // to try: an offline registry must not fail quietly for ever.
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut hinted = false;
    // Whether the user was told that the set is full, since this registry
    // was last listed.
    let mut told_full = false;
    while !*stop.borrow() {
        let joined = tokio::select! {
            joined = node.join_set(&keypair, &addrs) => joined,
            _ = stop.changed() => break,
        };
        let refresh = SET_REFRESH.saturating_sub(Duration::from_millis(random_u64() % 5_000));
        let pause = match joined {
            Ok(record) => {
                let n = record.members.len();
                tracing::info!(
                    "published in the DHT: {n} registr{} in the set",
                    if n == 1 { "y" } else { "ies" }
                );
                set.send_replace(record.members);
                retry = Duration::from_millis(500);
                failing_since = None;
                told_full = false;
                refresh
            }
            Err(SetError::Full(full)) => {
                let text = format!(
                    "{full}: this registry is not listed, clients that know only the key will not find it; \
                     retire one, or give clients the addresses ({}@HOST:PORT,HOST:PORT)",
                    keypair.public()
                );
                if told_full {
                    tracing::debug!("{text}");
                } else {
                    tracing::error!("{text}");
                    told_full = true;
                }
                failing_since = None;
                refresh
            }
            Err(e) => {
                tracing::warn!("DHT publish failed: {e}; retrying in {retry:?}");
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                if !hinted && since.elapsed() >= PUBLISH_HINT_AFTER {
                    hinted = true;
                    let port = addrs.first().map_or(0, SocketAddr::port);
                    tracing::error!(
                        "cannot publish in the DHT for {}s: is this host online (the DHT needs UDP)? Clients can \
                         still dial this registry directly as {}@HOST:{port}; on a network without the public \
                         DHT, run a private one (--dht-port N here, --bootstrap THISHOST:N on clients) or start \
                         with --no-dht",
                        PUBLISH_HINT_AFTER.as_secs(),
                        keypair.public()
                    );
                }
                let pause = retry;
                retry = (retry * 2).min(Duration::from_secs(30));
                pause
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => break,
        }
    }
    // A registry that stops leaves the set at once, so clients stop dialing
    // it; best effort: one that cannot ages out after SET_STALE.
    let stale = SET_STALE.as_secs();
    match tokio::time::timeout(LEAVE_TIMEOUT, node.leave_set(&keypair, &addrs)).await {
        Ok(Ok(record)) => {
            let n = record.members.len();
            tracing::info!(
                "left the registry set in the DHT: {n} registr{} in it now",
                if n == 1 { "y" } else { "ies" }
            );
        }
        Ok(Err(e)) => {
            tracing::warn!(
                "could not leave the registry set in the DHT ({e}); the entry ages out within {stale}s"
            )
        }
        Err(_) => tracing::warn!(
            "leaving the registry set in the DHT took over {}s; the entry ages out within {stale}s",
            LEAVE_TIMEOUT.as_secs()
        ),
    }
}
