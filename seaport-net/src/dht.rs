//! Rendezvous through the BitTorrent mainline DHT: a [`DhtNode`] publishes a
//! registry's addresses and resolves them for clients.
//!
//! A registry publishes its dialable addresses as a BEP44 mutable item signed
//! with its own ed25519 key (salt [`SALT`]), and republishes before nodes
//! forget it; clients fetch the newest item for the key (mainline checks the
//! signature) and dial what it lists. `--bootstrap` replaces the public
//! bootstrap nodes with private ones; a registry can also run a DHT server
//! node of its own (`--dht-port`) so that a private network needs no other
//! process.
//!
//! Measured with mainline 8.0.1: a lone server node makes every query wait out
//! 2 s request timeouts, while nodes that bootstrap from each other answer in
//! about 60–120 ms. So a registry with `--dht-port` runs two nodes (the server
//! node, and a publishing node bootstrapped from it), and clients given
//! `--bootstrap` run in server mode too. A node never bootstraps from its own
//! address (that spins a core).
//!
//! Invariants: a record never exceeds BEP44's 1000 bytes (addresses past it
//! are left out); publishing retries for ever, its pause capped at 30 s, and
//! tells the user once what to try when it keeps failing.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mainline::async_dht::AsyncDht;
use mainline::{Dht, MutableItem};
use seaport_proto::keys::{Keypair, PublicKey};
use tokio::sync::watch;

/// Salt of seaport's records, so they never collide with other uses of a key.
pub const SALT: &[u8] = b"seaport/1";
/// BEP44 values are at most 1000 bytes.
const MAX_VALUE: usize = 1000;
/// How long publishing may fail before the user is told, once, what to try.
pub const PUBLISH_HINT_AFTER: Duration = Duration::from_secs(30);
/// How long a DHT node may take to start before the user is told what is
/// going on (its bootstrap host names are being resolved).
pub const START_HINT_AFTER: Duration = Duration::from_secs(20);
/// How often the record is republished while nothing changes.
pub const REFRESH: Duration = Duration::from_secs(15 * 60);

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
}

/// A running DHT node (or two, for a registry with its own server node):
/// what publishes a registry's addresses and resolves them for clients.
pub struct DhtNode {
    node: AsyncDht,
    /// Kept alive: the registry's own server node, which others bootstrap from.
    _server: Option<AsyncDht>,
}

async fn build(builder: mainline::DhtBuilder) -> std::io::Result<AsyncDht> {
    // `build` resolves host names and binds sockets: blocking work.
    tokio::task::spawn_blocking(move || builder.build().map(Dht::as_async))
        .await
        .map_err(std::io::Error::other)?
}

impl DhtNode {
    /// A node for a service or proxy. With private `bootstrap` nodes it runs
    /// in server mode (so private queries answer fast); else it is a plain
    /// client of the public DHT.
    pub async fn client(bootstrap: &[String]) -> std::io::Result<DhtNode> {
        let mut builder = Dht::builder();
        if !bootstrap.is_empty() {
            // Port 0: a private network's node must not take 6881 from a real client.
            builder.bootstrap(bootstrap).server_mode().port(0);
        }
        Ok(DhtNode { node: build(builder).await?, _server: None })
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
        let server = build(server).await?;
        let mut own: Vec<String> = vec![format!("127.0.0.1:{port}")];
        own.extend(bootstrap.iter().cloned());
        let mut node = Dht::builder();
        node.server_mode().bootstrap(&own).port(0);
        Ok(DhtNode { node: build(node).await?, _server: Some(server) })
    }

    /// The addresses the registry `key` published last.
    pub async fn resolve(&self, key: &PublicKey) -> Result<Vec<Vec<SocketAddr>>, DhtError> {
        let item = self
            .node
            .get_mutable_most_recent(key.as_bytes(), Some(SALT))
            .await
            .ok_or(DhtError::NotFound(*key))?;
        let addrs = std::str::from_utf8(item.value()).map(decode_addrs).unwrap_or_default();
        if addrs.is_empty() {
            return Err(DhtError::EmptyRecord(*key));
        }
        Ok(vec![addrs])
    }

    /// Publishes `addrs` under `keypair`'s key, signed by it.
    pub async fn publish(&self, keypair: &Keypair, addrs: &[SocketAddr]) -> Result<(), String> {
        // Milliseconds since the epoch: newer than any record of an earlier run.
        let seq = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_millis() as i64);
        let value = encode_addrs(addrs);
        let item = MutableItem::new(keypair.signing_key().clone(), value.as_bytes(), seq, Some(SALT));
        self.node.put_mutable(item, None).await.map(|_| ()).map_err(|e| e.to_string())
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

/// Keeps `addrs` published until `stop`: at once, then every [`REFRESH`],
/// retrying failures with a growing pause.
pub async fn publish_loop(
    node: std::sync::Arc<DhtNode>,
    keypair: Keypair,
    addrs: Vec<SocketAddr>,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = Duration::from_millis(500);
    // Since when publishing has failed, and whether the user was told what
    // to try: an offline registry must not fail quietly for ever.
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut hinted = false;
    loop {
        let pause = match node.publish(&keypair, &addrs).await {
            Ok(()) => {
                tracing::info!(addrs = %encode_addrs(&addrs), "published registry addresses in the DHT");
                retry = Duration::from_millis(500);
                failing_since = None;
                REFRESH
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
            _ = stop.changed() => return,
        }
    }
}

/// `addr,addr,...`, cut to what a BEP44 value holds.
fn encode_addrs(addrs: &[SocketAddr]) -> String {
    let mut out = String::new();
    for addr in addrs {
        let next = if out.is_empty() { addr.to_string() } else { format!(",{addr}") };
        if out.len() + next.len() > MAX_VALUE {
            break;
        }
        out.push_str(&next);
    }
    out
}

fn decode_addrs(text: &str) -> Vec<SocketAddr> {
    text.split(',').filter_map(|a| a.trim().parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_and_fit() {
        let addrs: Vec<SocketAddr> = vec!["127.0.0.1:4000".parse().unwrap(), "[::1]:4000".parse().unwrap()];
        assert_eq!(decode_addrs(&encode_addrs(&addrs)), addrs);
        let many: Vec<SocketAddr> =
            (0..200).map(|i| SocketAddr::from(([10, 0, 0, i as u8], 40000))).collect();
        let text = encode_addrs(&many);
        assert!(text.len() <= MAX_VALUE);
        // Exactly the longest prefix that fits: in order, and the next one
        // would not have.
        let kept = decode_addrs(&text);
        assert!(!kept.is_empty() && kept.len() < many.len());
        assert_eq!(kept[..], many[..kept.len()]);
        assert!(text.len() + format!(",{}", many[kept.len()]).len() > MAX_VALUE);
        assert_eq!(decode_addrs("garbage,127.0.0.1:1"), vec!["127.0.0.1:1".parse::<SocketAddr>().unwrap()]);
    }
}
