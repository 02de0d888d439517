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
//! The value is text that old clients (which parse each `,`-separated item
//! as an address and skip the rest) still read: a member's addresses, then
//! an item `=SECS` (unix seconds of its last refresh) that closes its group,
//! e.g. `127.0.0.1:4500,[::1]:4500,=1765000000,10.0.0.2:4500,=1765000011`.
//! Addresses with no closing `=SECS` (a record by an old build, which lists
//! only itself) decode as one member of unknown freshness: clients treat it
//! as fresh. A merge stamps such a member with the time its item was written
//! (old builds' `seq` is milliseconds since the epoch), so a running old
//! build stays listed for [`SET_STALE`] like any member; a member of unknown
//! freshness that is still unknown is dropped by a merge, since nobody could
//! ever refresh or age it out. (An old build still overwrites the whole
//! record when it republishes; the others merge themselves back within
//! [`SET_REFRESH`].)
//!
//! Capacity (BEP44's 1000 bytes, and at most [`MAX_SET_MEMBERS`] members),
//! with worst-case lengths: `255.255.255.255:65535` is 21 bytes,
//! `[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535` 47 (58 with a
//! `%4294967295` scope), `=SECS` 11 (until the year 2286), and items are
//! joined by one `,`. A member with one IPv4 address takes 33 bytes plus a
//! separator: 29 would fit in 1000 bytes, so the cap of 16 (543 bytes) binds
//! first. A member with one IPv4 and one IPv6 address takes 81 + 1: 12 fit
//! (10 with scope ids). A new member that does not fit is refused
//! ([`SetFull`]), never squeezed in by dropping a live one.
//!
//! Freshness is judged by the local clock. Registries, which should keep
//! their clocks in sync, drop members last refreshed more than [`SET_STALE`]
//! ago or more than [`CLOCK_SKEW`] ahead; clients are lenient about their
//! own clocks and keep members up to [`SET_STALE`] + [`CLOCK_SKEW`] old and
//! [`CLOCK_SKEW`] ahead. A member is identified by its addresses: an entry
//! sharing an address with mine is my previous one.
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
//! Invariants: a record never exceeds BEP44's 1000 bytes nor lists more than
//! [`MAX_SET_MEMBERS`] members; a record read from the DHT is untrusted text:
//! one over 1000 bytes or not UTF-8 is refused, anything else decodes without
//! panicking, each member taking at least 8 of its bytes; a read keeps at
//! most [`MAX_VERSIONS`] versions and 32 members. Publishing retries for
//! ever, its pause capped at 30 s, and tells the user once what to try when
//! it keeps failing or when the set is full.

use std::cmp::Reverse;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mainline::async_dht::AsyncDht;
use mainline::errors::PutMutableError;
use mainline::{Dht, MutableItem};
use seaport_proto::keys::{Keypair, PublicKey};
use tokio::sync::watch;

use crate::identity::random_u64;

/// Salt of seaport's records, so they never collide with other uses of a key.
pub const SALT: &[u8] = b"seaport/1";
/// BEP44 values are at most 1000 bytes.
pub const MAX_VALUE: usize = 1000;
/// Most registries one set's record lists: a client dials every member at
/// once, and the record stays small whatever the addresses.
pub const MAX_SET_MEMBERS: usize = 16;
/// How often a registry refreshes its entry in the set's record.
pub const SET_REFRESH: Duration = Duration::from_secs(60);
/// A member not refreshed for this long is gone: five refreshes missed.
pub const SET_STALE: Duration = Duration::from_secs(5 * 60);
/// How far apart clocks may be: a member refreshed up to this far in the
/// future is kept, and clients keep members this much older than
/// [`SET_STALE`].
pub const CLOCK_SKEW: Duration = Duration::from_secs(2 * 60);
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

/// One registry of a set, as the set's record lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetMember {
    /// Where it may be dialed.
    pub addrs: Vec<SocketAddr>,
    /// Unix seconds of its last refresh; `None` when unknown (a record by an
    /// old build).
    pub refreshed: Option<u64>,
}

impl SetMember {
    /// Whether it lists any of `addrs`: then it is the same registry.
    fn shares_addr(&self, addrs: &[SocketAddr]) -> bool {
        self.addrs.iter().any(|a| addrs.contains(a))
    }

    /// Whether a registry merging at `now` (unix seconds) keeps it: known,
    /// refreshed within [`SET_STALE`], at most [`CLOCK_SKEW`] ahead.
    pub fn is_current(&self, now: u64) -> bool {
        self.refreshed.is_some_and(|at| {
            now.saturating_sub(at) <= SET_STALE.as_secs() && at <= now.saturating_add(CLOCK_SKEW.as_secs())
        })
    }

    /// Whether a client at `now` (unix seconds) dials it: unknown freshness
    /// (an old build's record) counts as live, and the window is wider by
    /// [`CLOCK_SKEW`] than [`SetMember::is_current`]'s, for the client's clock.
    pub fn is_live(&self, now: u64) -> bool {
        self.refreshed.is_none_or(|at| {
            now.saturating_sub(at) <= (SET_STALE + CLOCK_SKEW).as_secs()
                && at <= now.saturating_add(CLOCK_SKEW.as_secs())
        })
    }
}

/// The set's record: its members in the order they joined (a member that
/// refreshes keeps its place, a new one goes last), so the order does not
/// churn at every refresh. [`DhtNode::resolve`] hands clients the freshest
/// first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SetRecord {
    /// The members, each with its addresses and freshness.
    pub members: Vec<SetMember>,
}

/// A merge refused: the record would pass BEP44's 1000 bytes or list more
/// than [`MAX_SET_MEMBERS`] registries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetFull {
    /// Live registries listed besides the one that would join.
    pub listed: usize,
    /// Bytes those take.
    pub bytes: usize,
    /// Bytes the record would take with the one that would join.
    pub needed: usize,
}

impl fmt::Display for SetFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the registry set's DHT record is full ({} registries, {} of {MAX_VALUE} bytes",
            self.listed, self.bytes
        )?;
        if self.listed >= MAX_SET_MEMBERS {
            write!(f, "; a record lists at most {MAX_SET_MEMBERS} registries)")
        } else {
            write!(f, "; with this registry it would take {} bytes)", self.needed)
        }
    }
}

impl std::error::Error for SetFull {}

/// A value that is not a record at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadRecord {
    /// Longer than BEP44 allows.
    #[error("{0} bytes, over BEP44's {MAX_VALUE}")]
    TooLong(usize),
    /// Not UTF-8 text.
    #[error("not UTF-8 text")]
    NotText,
}

impl SetRecord {
    /// Reads a record's value. Items that are neither an address nor
    /// `=SECS` (a later format's) are skipped, as old clients skip them; a
    /// `=` whose number does not parse closes its group with unknown
    /// freshness; `=SECS` closing no address is ignored.
    pub fn decode(value: &[u8]) -> Result<SetRecord, BadRecord> {
        // Bounds the work, and the members: each takes at least 8 bytes.
        if value.len() > MAX_VALUE {
            return Err(BadRecord::TooLong(value.len()));
        }
        let text = std::str::from_utf8(value).map_err(|_| BadRecord::NotText)?;
        let mut members = Vec::new();
        let mut group = Vec::new();
        for item in text.split(',').map(str::trim) {
            if let Some(secs) = item.strip_prefix('=') {
                if !group.is_empty() {
                    members
                        .push(SetMember { addrs: std::mem::take(&mut group), refreshed: secs.parse().ok() });
                }
            } else if let Ok(addr) = item.parse() {
                group.push(addr);
            }
        }
        if !group.is_empty() {
            members.push(SetMember { addrs: group, refreshed: None });
        }
        Ok(SetRecord { members })
    }

    /// The record's value. A member of unknown freshness (which
    /// [`SetRecord::merge`] never makes) is closed by a bare `=`, so that it
    /// reads back as one wherever it stands.
    pub fn encode(&self) -> String {
        let mut items: Vec<String> = Vec::new();
        for member in &self.members {
            items.extend(member.addrs.iter().map(ToString::to_string));
            items.push(member.refreshed.map_or_else(|| "=".to_owned(), |at| format!("={at}")));
        }
        items.join(",")
    }

    /// The record with `mine` in it (stamped `now_secs` if it has no time):
    /// in place of my previous entry (any member sharing an address with
    /// `mine`), else last; members that are not current
    /// ([`SetMember::is_current`]) are dropped. Refused when the result
    /// would pass [`MAX_VALUE`] bytes or [`MAX_SET_MEMBERS`] members.
    pub fn merge(self, mut mine: SetMember, now_secs: u64) -> Result<SetRecord, SetFull> {
        mine.refreshed.get_or_insert(now_secs);
        let mut place = None;
        let mut others = SetRecord::default();
        for member in self.members {
            if member.shares_addr(&mine.addrs) {
                place.get_or_insert(others.members.len());
            } else if member.is_current(now_secs) {
                others.members.push(member);
            }
        }
        let (listed, bytes) = (others.members.len(), others.encode().len());
        let mut merged = others;
        // `place` was a length of the list, which only grew since.
        merged.members.insert(place.unwrap_or(merged.members.len()), mine);
        let needed = merged.encode().len();
        if merged.members.len() > MAX_SET_MEMBERS || needed > MAX_VALUE {
            return Err(SetFull { listed, bytes, needed });
        }
        Ok(merged)
    }

    /// The record without my entry (any member sharing an address with
    /// `mine`), for a registry that stops; members that are not current are
    /// dropped too, as by [`SetRecord::merge`].
    pub fn leave(self, mine: &[SocketAddr], now_secs: u64) -> SetRecord {
        let members =
            self.members.into_iter().filter(|m| !m.shares_addr(mine) && m.is_current(now_secs)).collect();
        SetRecord { members }
    }

    /// Whether any member shares an address with `mine`.
    fn lists(&self, mine: &[SocketAddr]) -> bool {
        self.members.iter().any(|m| m.shares_addr(mine))
    }
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
    /// The same node's blocking handle: the one way to have every version
    /// of a record the nodes hold, which the async API yields as a `Stream`
    /// (a trait this crate does not depend on).
    versions: Dht,
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
        DhtNode { node: dht.clone().as_async(), versions: dht, _server: server }
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
        let (dht, bytes) = (self.versions.clone(), *key.as_bytes());
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A thread of its own, not tokio's blocking pool: the read blocks
        // until the query ends, and a registry that exits meanwhile must
        // not wait for it.
        let read = std::thread::Builder::new().name("seaport-dht-read".into()).spawn(move || {
            #[allow(deprecated)] // The async form is a `Stream`: see the field `versions`.
            let items = dht.get_mutable(&bytes, Some(SALT), None).take(MAX_VERSIONS).collect();
            let _ = tx.send(items);
        });
        match read {
            Ok(_) => Held::from_versions(rx.await.unwrap_or_default()),
            Err(e) => {
                tracing::warn!(
                    "cannot start a thread to read the DHT ({e}): reading the newest version only"
                );
                Held::from_versions(self.newest(key).await.into_iter().collect())
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use seaport_proto::keys::Seed;

    const NOW: u64 = 1_765_000_000;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn member(addrs: &[&str], refreshed: Option<u64>) -> SetMember {
        SetMember { addrs: addrs.iter().map(|a| addr(a)).collect(), refreshed }
    }

    /// What clients of earlier builds do with a value.
    fn old_client(text: &str) -> Vec<SocketAddr> {
        text.split(',').filter_map(|a| a.trim().parse::<SocketAddr>().ok()).collect()
    }

    #[test]
    fn records_round_trip_and_old_clients_see_every_address() {
        let text = "127.0.0.1:4500,[::1]:4500,=1765000000,10.0.0.2:4500,=1765000011";
        let record = SetRecord::decode(text.as_bytes()).unwrap();
        assert_eq!(
            record.members,
            vec![
                member(&["127.0.0.1:4500", "[::1]:4500"], Some(1_765_000_000)),
                member(&["10.0.0.2:4500"], Some(1_765_000_011)),
            ]
        );
        assert_eq!(record.encode(), text);
        assert_eq!(old_client(text), vec![addr("127.0.0.1:4500"), addr("[::1]:4500"), addr("10.0.0.2:4500")]);
        // Unknown freshness reads back as such wherever it stands.
        let mixed =
            SetRecord { members: vec![member(&["10.0.0.1:1"], None), member(&["[fe80::1%7]:2"], Some(NOW))] };
        assert_eq!(mixed.encode(), "10.0.0.1:1,=,[fe80::1%7]:2,=1765000000");
        assert_eq!(SetRecord::decode(mixed.encode().as_bytes()).unwrap(), mixed);
        assert_eq!(SetRecord::decode(b"").unwrap(), SetRecord::default());
        assert_eq!(SetRecord::default().encode(), "");
    }

    #[test]
    fn an_old_builds_record_is_one_member_of_unknown_freshness() {
        let record = SetRecord::decode(b"192.0.2.7:4500, [2001:db8::7]:4500").unwrap();
        assert_eq!(record.members, vec![member(&["192.0.2.7:4500", "[2001:db8::7]:4500"], None)]);
        assert!(record.members[0].is_live(NOW), "clients dial it");
        assert!(!record.members[0].is_current(NOW));
        // A merge drops it when its time is unknown...
        let merged = record.clone().merge(member(&["10.0.0.9:1"], None), NOW).unwrap();
        assert_eq!(merged.members, vec![member(&["10.0.0.9:1"], Some(NOW))]);
        // ...and keeps it for SET_STALE when its item says when it was
        // written (old builds' seq: milliseconds since the epoch).
        let keypair = Keypair::from_seed(&Seed::from_bytes([3; 32]));
        let written = NOW - 100;
        let item = |value: &[u8], seq: u64| {
            MutableItem::new(keypair.signing_key().clone(), value, seq as i64, Some(SALT))
        };
        let old = item(b"192.0.2.7:4500", written * 1000 + 123);
        let read = Held::from_versions(vec![old.clone()]).union;
        assert_eq!(read.members, vec![member(&["192.0.2.7:4500"], Some(written))]);
        let merged = read.merge(member(&["10.0.0.9:1"], None), NOW).unwrap();
        assert_eq!(merged.members.len(), 2);
        let later = written + SET_STALE.as_secs() + 1;
        let stale = Held::from_versions(vec![old]).union.merge(member(&["10.0.0.9:1"], None), later);
        assert_eq!(stale.unwrap().members.len(), 1);
        // An unreadable record is replaced.
        let junk = Held::from_versions(vec![item(&[0xff, 0xfe], 5)]);
        assert_eq!((junk.union, junk.versions), (SetRecord::default(), 1));
    }

    /// Nodes that disagree: two writers each won at some, and the newest
    /// version (a write most nodes refused) lacks a member another has.
    #[test]
    fn the_members_of_every_version_are_kept() {
        let keypair = Keypair::from_seed(&Seed::from_bytes([4; 32]));
        let item = |value: &str, seq: i64| {
            MutableItem::new(keypair.signing_key().clone(), value.as_bytes(), seq, Some(SALT))
        };
        let first = item("10.0.0.1:1,=100", 100_000);
        let second = item("10.0.0.1:1,=100,10.0.0.2:1,=105", 105_000);
        let leaked = item("10.0.0.1:1,=100,10.0.0.3:1,=106", 106_000);
        let held =
            Held::from_versions(vec![second.clone(), leaked.clone(), first, second.clone(), leaked.clone()]);
        assert_eq!(held.versions, 3);
        assert_eq!(held.newest, Some(leaked));
        assert_eq!(
            held.union.members,
            vec![
                member(&["10.0.0.1:1"], Some(100)),
                member(&["10.0.0.3:1"], Some(106)),
                member(&["10.0.0.2:1"], Some(105)),
            ]
        );
        // The freshest entry of a registry wins, wherever it is.
        let refreshed = item("10.0.0.1:1,=110", 104_000);
        let held = Held::from_versions(vec![second.clone(), refreshed]);
        assert_eq!(held.newest, Some(second));
        assert_eq!(
            held.union.members,
            vec![member(&["10.0.0.1:1"], Some(110)), member(&["10.0.0.2:1"], Some(105))]
        );
        // Agreeing nodes: one version, however many answered.
        let one = item("10.0.0.1:1,=100", 100_000);
        assert_eq!(Held::from_versions(vec![one.clone(), one.clone(), one]).versions, 1);
        assert_eq!(Held::from_versions(Vec::new()).versions, 0);
        // Bounded, whatever the versions hold.
        let many: Vec<MutableItem> = (0..MAX_VERSIONS as u8)
            .map(|v| {
                let text: Vec<String> = (0..20).map(|m| format!("10.{v}.{m}.1:1,=100")).collect();
                item(&text.join(","), 1_000 + i64::from(v))
            })
            .collect();
        assert_eq!(Held::from_versions(many).union.members.len(), 2 * MAX_SET_MEMBERS);
    }

    #[test]
    fn a_merge_drops_stale_members_and_keeps_fresh_ones() {
        let stale = SET_STALE.as_secs();
        let skew = CLOCK_SKEW.as_secs();
        let record = SetRecord {
            members: vec![
                member(&["10.0.0.1:1"], Some(NOW - stale)),
                member(&["10.0.0.2:1"], Some(NOW - stale - 1)),
                member(&["10.0.0.3:1"], Some(NOW + skew)),
                member(&["10.0.0.4:1"], Some(NOW + skew + 1)),
                member(&["10.0.0.5:1"], Some(0)),
                member(&["10.0.0.6:1"], Some(u64::MAX)),
            ],
        };
        let merged = record.merge(member(&["10.0.0.9:1"], Some(NOW)), NOW).unwrap();
        let kept: Vec<SocketAddr> = merged.members.iter().map(|m| m.addrs[0]).collect();
        assert_eq!(kept, vec![addr("10.0.0.1:1"), addr("10.0.0.3:1"), addr("10.0.0.9:1")]);
        // Clients are more lenient, for their own clocks.
        let client = |at| member(&["10.0.0.1:1"], Some(at)).is_live(NOW);
        assert!(client(NOW - stale - skew) && !client(NOW - stale - skew - 1));
        assert!(client(NOW + skew) && !client(NOW + skew + 1) && !client(u64::MAX));
        // A clock at the epoch sees every member far ahead: none, and no overflow.
        assert!(!member(&["10.0.0.1:1"], Some(NOW)).is_live(0));
    }

    #[test]
    fn my_old_entry_is_replaced_in_place_and_a_new_member_goes_last() {
        let record = SetRecord {
            members: vec![
                member(&["10.0.0.1:1"], Some(NOW - 10)),
                member(&["10.0.0.9:1", "[::9]:1"], Some(NOW - 60)),
                member(&["10.0.0.2:1"], Some(NOW - 20)),
            ],
        };
        // Shares one address with my old entry: it is mine.
        let mine = member(&["10.0.0.9:1"], None);
        let merged = record.clone().merge(mine.clone(), NOW).unwrap();
        assert_eq!(
            merged.members,
            vec![
                member(&["10.0.0.1:1"], Some(NOW - 10)),
                member(&["10.0.0.9:1"], Some(NOW)),
                member(&["10.0.0.2:1"], Some(NOW - 20)),
            ]
        );
        // Twice listed (two writers raced): one entry left, at the first place.
        let mut twice = record.clone();
        twice.members.push(member(&["10.0.0.9:1"], Some(NOW - 5)));
        assert_eq!(twice.merge(mine, NOW).unwrap(), merged);
        let new = record.clone().merge(member(&["10.0.0.3:1"], Some(NOW)), NOW).unwrap();
        assert_eq!(new.members.len(), 4);
        assert_eq!(new.members[3], member(&["10.0.0.3:1"], Some(NOW)));
        assert_eq!(new.members[..3], record.members[..]);
        // Leaving takes my entry out, and the stale with it.
        let mut with_stale = new.clone();
        with_stale.members.push(member(&["10.0.0.4:1"], Some(NOW - SET_STALE.as_secs() - 1)));
        let left = with_stale.leave(&[addr("[::9]:1")], NOW);
        assert_eq!(
            left.members,
            vec![new.members[0].clone(), new.members[2].clone(), new.members[3].clone()]
        );
        assert!(!left.lists(&[addr("10.0.0.9:1")]));
    }

    /// Worst-case member lengths, as the module docs count them.
    fn worst(v6: Option<u32>) -> SetMember {
        let mut addrs = vec![addr("255.255.255.255:65535")];
        if let Some(scope) = v6 {
            let ip = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap();
            addrs.push(std::net::SocketAddrV6::new(ip, 65535, 0, scope).into());
        }
        SetMember { addrs, refreshed: Some(9_999_999_999) }
    }

    /// The most members of `m`'s length that fit in BEP44's bytes.
    fn fitting(m: &SetMember) -> usize {
        let fits = |n| SetRecord { members: vec![m.clone(); n] }.encode().len() <= MAX_VALUE;
        (1..100).take_while(|&n| fits(n)).last().unwrap()
    }

    #[test]
    fn the_documented_capacity_holds() {
        assert_eq!(SetRecord { members: vec![worst(None)] }.encode().len(), 33);
        assert_eq!(fitting(&worst(None)), 29);
        assert_eq!(SetRecord { members: vec![worst(None); MAX_SET_MEMBERS] }.encode().len(), 543);
        assert_eq!(SetRecord { members: vec![worst(Some(0))] }.encode().len(), 81);
        assert_eq!(fitting(&worst(Some(0))), 12);
        assert_eq!(fitting(&worst(Some(u32::MAX))), 10);
    }

    #[test]
    fn a_full_set_refuses_and_says_by_how_much() {
        let many = |n: usize| SetRecord {
            members: (0..n).map(|i| member(&[&format!("10.0.1.{i}:4500")], Some(NOW))).collect(),
        };
        let full = many(MAX_SET_MEMBERS).merge(member(&["10.0.0.99:4500"], None), NOW).unwrap_err();
        assert_eq!(full.listed, MAX_SET_MEMBERS);
        let text = full.to_string();
        assert!(
            text.contains("(16 registries, ")
                && text.contains(" of 1000 bytes")
                && text.contains("at most 16")
        );
        // My own refresh still fits a full set.
        assert_eq!(
            many(MAX_SET_MEMBERS).merge(member(&["10.0.1.3:4500"], None), NOW).unwrap().members.len(),
            16
        );
        assert!(many(MAX_SET_MEMBERS - 1).merge(member(&["10.0.0.99:4500"], None), NOW).is_ok());

        // Bytes: members with many addresses each.
        let fat = |i: u8| SetMember {
            addrs: (0..8).map(|p| SocketAddr::from(([10, 0, i, p], 40000))).collect(),
            refreshed: Some(NOW),
        };
        let record = SetRecord { members: (0..7).map(fat).collect() };
        let bytes = record.encode().len();
        let full = record.merge(fat(7), NOW).unwrap_err();
        assert_eq!((full.listed, full.bytes), (7, bytes));
        assert!(full.needed > MAX_VALUE);
        assert_eq!(
            full.to_string(),
            format!(
                "the registry set's DHT record is full (7 registries, {bytes} of 1000 bytes; with this registry it \
                 would take {} bytes)",
                full.needed
            )
        );
        // A member too large alone is refused too, not cut.
        let huge = SetMember {
            addrs: (0..70).map(|p| SocketAddr::from(([10, 0, 0, p], 40000))).collect(),
            refreshed: None,
        };
        assert_eq!(SetRecord::default().merge(huge, NOW).unwrap_err().listed, 0);
    }

    #[test]
    fn hostile_values_are_bounded_and_never_panic() {
        assert_eq!(SetRecord::decode(&[b'1'; MAX_VALUE + 1]), Err(BadRecord::TooLong(MAX_VALUE + 1)));
        assert_eq!(SetRecord::decode(&[0xc3, 0x28]), Err(BadRecord::NotText));
        let cases: &[(&str, Vec<SetMember>)] = &[
            ("garbage,127.0.0.1:1", vec![member(&["127.0.0.1:1"], None)]),
            ("=5,=,,=", vec![]),
            (",,,,", vec![]),
            ("127.0.0.1:1,=99999999999999999999999", vec![member(&["127.0.0.1:1"], None)]),
            (
                "127.0.0.1:1,=-5,127.0.0.2:1,= 7 ",
                vec![member(&["127.0.0.1:1"], None), member(&["127.0.0.2:1"], None)],
            ),
            ("127.0.0.1:1,=+7", vec![member(&["127.0.0.1:1"], Some(7))]),
            ("127.0.0.1:1,#later,127.0.0.2:1,=9", vec![member(&["127.0.0.1:1", "127.0.0.2:1"], Some(9))]),
            ("[::1]:1,=18446744073709551615", vec![member(&["[::1]:1"], Some(u64::MAX))]),
        ];
        for (text, members) in cases {
            assert_eq!(&SetRecord::decode(text.as_bytes()).unwrap().members, members, "{text:?}");
        }
        // The most members a value can hold, and a merge into it.
        let dense = vec!["[::]:0,="; 111].join(",");
        assert!(dense.len() <= MAX_VALUE);
        let record = SetRecord::decode(dense.as_bytes()).unwrap();
        assert_eq!(record.members.len(), 111);
        assert_eq!(record.merge(member(&["10.0.0.1:1"], None), NOW).unwrap().members.len(), 1);
    }

    /// A small deterministic generator (xorshift): no dependency, and the
    /// same cases on every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Decoding never panics, and what it yields encodes and decodes back
    /// to itself; merging whatever decoded keeps the limits.
    #[test]
    fn decoding_anything_is_safe_and_round_trips() {
        const TOKENS: &[&str] = &[
            "127.0.0.1:4500",
            "[::1]:1",
            "[fe80::1%3]:9",
            "255.255.255.255:65535",
            "0.0.0.0:0",
            "=",
            "=0",
            "=1765000000",
            "=18446744073709551616",
            "=x",
            " = 5",
            "",
            " ",
            ",",
            "[",
            "]",
            ":",
            "%",
            "é",
            "1.2.3.4",
            "[::1]",
            "::1:5",
            "1.2.3.4:99999",
            "\u{0}",
            "==",
            "=1765000000=",
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..20_000 {
            let value: Vec<u8> = if case % 4 == 0 {
                (0..rng.below(MAX_VALUE + 50)).map(|_| rng.next() as u8).collect()
            } else {
                let items: Vec<&str> = (0..rng.below(120)).map(|_| TOKENS[rng.below(TOKENS.len())]).collect();
                items.join(if case % 3 == 0 { "" } else { "," }).into_bytes()
            };
            let Ok(record) = SetRecord::decode(&value) else { continue };
            assert!(record.members.iter().all(|m| !m.addrs.is_empty()));
            let text = record.encode();
            if text.len() <= MAX_VALUE {
                assert_eq!(SetRecord::decode(text.as_bytes()).as_ref(), Ok(&record), "{value:?}");
            }
            if let Ok(merged) = record.merge(member(&["10.9.9.9:1"], None), NOW) {
                assert!(merged.members.len() <= MAX_SET_MEMBERS && merged.encode().len() <= MAX_VALUE);
            }
        }
    }

    fn free_udp_port() -> u16 {
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Resolves `key` at `client` until `want` holds of the members found,
    /// within `within`.
    async fn resolve_until(
        client: &DhtNode,
        key: &PublicKey,
        within: Duration,
        want: impl Fn(&[Vec<SocketAddr>]) -> bool,
    ) -> Vec<Vec<SocketAddr>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let found = client.resolve(key).await;
            match &found {
                Ok(members) if want(members) => return members.clone(),
                _ if tokio::time::Instant::now() >= deadline => panic!("not resolved as wanted: {found:?}"),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Two registries of one set joining at the same moment through a
    /// private DHT on loopback are both listed; one that leaves is not.
    /// Measured (2 shared cores): two joins at once take 0.55–1.5 s (the
    /// loser of the race writes again: a CAS refusal, a lost write caught by
    /// the read-back, or nodes left disagreeing and written over), a resolve
    /// 110–180 ms, a leave about 0.65 s; the whole test about 5 s, and it
    /// passed 40 runs in a row. Resolving retries within 20 s all the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registries_joining_at_once_are_both_listed() {
        let port = free_udp_port();
        let _server = DhtNode::registry(&[], Some(port)).await.unwrap();
        let bootstrap = vec![format!("127.0.0.1:{port}")];
        let a = DhtNode::client(&bootstrap).await.unwrap();
        let b = DhtNode::client(&bootstrap).await.unwrap();
        let client = DhtNode::client(&bootstrap).await.unwrap();
        let keypair = Keypair::from_seed(&Seed::from_bytes([9; 32]));
        let key = keypair.public();
        let (at_a, at_b) = (vec![addr("10.0.0.1:4500")], vec![addr("10.0.0.2:4500"), addr("[fd00::2]:4500")]);

        let (joined_a, joined_b) = tokio::join!(a.join_set(&keypair, &at_a), b.join_set(&keypair, &at_b));
        let (joined_a, joined_b) = (joined_a.unwrap(), joined_b.unwrap());
        assert!(joined_a.lists(&at_a) && joined_b.lists(&at_b));
        let both = |m: &[Vec<SocketAddr>]| m.len() == 2 && m.contains(&at_a) && m.contains(&at_b);
        resolve_until(&client, &key, Duration::from_secs(20), both).await;

        // At once again, over a record that exists: the CAS path.
        let (c, at_c) = (DhtNode::client(&bootstrap).await.unwrap(), vec![addr("10.0.0.3:4500")]);
        let (joined_b, joined_c) = tokio::join!(b.join_set(&keypair, &at_b), c.join_set(&keypair, &at_c));
        let (joined_b, joined_c) = (joined_b.unwrap(), joined_c.unwrap());
        assert!(joined_b.lists(&at_b) && joined_c.lists(&at_c));
        let three =
            |m: &[Vec<SocketAddr>]| m.len() == 3 && [&at_a, &at_b, &at_c].iter().all(|a| m.contains(a));
        resolve_until(&client, &key, Duration::from_secs(20), three).await;
        c.leave_set(&keypair, &at_c).await.unwrap();

        // A refresh keeps one entry each, the refreshed one first for clients.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        a.join_set(&keypair, &at_a).await.unwrap();
        let found = resolve_until(&client, &key, Duration::from_secs(20), both).await;
        assert_eq!(found[0], at_a);

        let left = a.leave_set(&keypair, &at_a).await.unwrap();
        assert_eq!(left.members.iter().map(|m| m.addrs.clone()).collect::<Vec<_>>(), vec![at_b.clone()]);
        resolve_until(&client, &key, Duration::from_secs(20), |m| m == [at_b.clone()]).await;
        // Leaving twice is a no-op.
        assert!(!a.leave_set(&keypair, &at_a).await.unwrap().lists(&at_a));
    }

    /// The publish loop lists its registry, tells the set it knows of, and
    /// leaves the set when stopped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_publish_loop_joins_and_leaves_on_stop() {
        let port = free_udp_port();
        let server = Arc::new(DhtNode::registry(&[], Some(port)).await.unwrap());
        let bootstrap = vec![format!("127.0.0.1:{port}")];
        let other = DhtNode::client(&bootstrap).await.unwrap();
        let keypair = Keypair::from_seed(&Seed::from_bytes([10; 32]));
        let (mine, theirs) = (vec![addr("10.0.0.1:4500")], vec![addr("10.0.0.2:4500")]);
        other.join_set(&keypair, &theirs).await.unwrap();

        let (set_tx, mut set) = watch::channel(Vec::new());
        let (stop_tx, stop) = watch::channel(false);
        let publishing = tokio::spawn(publish_loop(server, keypair.clone(), mine.clone(), set_tx, stop));
        let members = tokio::time::timeout(Duration::from_secs(20), set.wait_for(|m| !m.is_empty()))
            .await
            .unwrap()
            .unwrap()
            .clone();
        let addrs: Vec<Vec<SocketAddr>> = members.iter().map(|m| m.addrs.clone()).collect();
        assert_eq!(addrs, vec![theirs.clone(), mine.clone()]);

        stop_tx.send(true).unwrap();
        tokio::time::timeout(LEAVE_TIMEOUT + Duration::from_secs(1), publishing).await.unwrap().unwrap();
        resolve_until(&other, &keypair.public(), Duration::from_secs(20), |m| m == [theirs.clone()]).await;
    }
}
