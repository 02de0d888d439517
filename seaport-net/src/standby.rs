//! Standby tunnels: a proxy's tunnels opened ahead of need, so that a new
//! client connection skips the TCP connect, the Noise handshake and the
//! service's backend connect (about 1 ms of a new connection's time here).
//!
//! Each instance gets up to `per_instance` spares. A spare lives at most
//! `ttl` (shorter than common backend idle timeouts, so its backend
//! connection is still open when used), and is checked before use: one whose
//! service closed it is dropped and the next tried. Spares of an instance that
//! leaves the registry are closed at once, so a draining service is not held.
//! Costs: one handshake and one backend connection per instance per `ttl`
//! while idle. Off unless asked for (`seaport-proxy --standby N`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use seaport_proto::client::ProxyClient;
use seaport_proto::keys::{Keypair, PublicKey};
use tokio::io::ReadBuf;
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};

use crate::control::lock;
use crate::tunnel::{self, OpenTunnel};

/// How long opening one spare may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

struct Spare {
    opened: Instant,
    tunnel: OpenTunnel,
}

/// The pool of spare tunnels; see the module docs.
pub struct Standby {
    per_instance: usize,
    ttl: Duration,
    spares: Mutex<HashMap<PublicKey, Vec<Spare>>>,
    /// Wakes the refill loop when a spare was taken.
    taken: Notify,
}

impl Standby {
    /// A pool keeping `per_instance` spares per instance, each at most `ttl` old.
    pub fn new(per_instance: usize, ttl: Duration) -> Arc<Standby> {
        Arc::new(Standby { per_instance, ttl, spares: Mutex::new(HashMap::new()), taken: Notify::new() })
    }

    /// A ready tunnel to the instance `key`, if the pool has a live one.
    pub fn take(&self, key: &PublicKey) -> Option<OpenTunnel> {
        let found = {
            let mut spares = lock(&self.spares);
            let list = spares.get_mut(key)?;
            let mut found = None;
            while let Some(spare) = list.pop() {
                if spare.opened.elapsed() < self.ttl && still_open(&spare.tunnel.stream) {
                    found = Some(spare.tunnel);
                    break;
                }
            }
            found
        };
        self.taken.notify_one();
        found
    }

    /// Keeps the pool filled for the instances `client` knows, until aborted.
    /// `changed` ticks whenever the instance set changes.
    pub async fn keep_filled(
        self: Arc<Self>,
        client: Arc<Mutex<ProxyClient>>,
        keypair: Keypair,
        mut changed: watch::Receiver<u64>,
    ) {
        loop {
            let instances = lock(&client).instances().to_vec();
            let mut retired = Vec::new();
            {
                let mut spares = lock(&self.spares);
                for (key, list) in spares.iter_mut() {
                    let known = instances.iter().any(|i| i.key == *key);
                    let (keep, old): (Vec<Spare>, Vec<Spare>) =
                        list.drain(..).partition(|s| known && s.opened.elapsed() < self.ttl);
                    *list = keep;
                    retired.extend(old);
                }
                spares.retain(|_, list| !list.is_empty());
            }
            for spare in retired {
                tokio::spawn(spare.tunnel.close());
            }
            for instance in &instances {
                let have = lock(&self.spares).get(&instance.key).map_or(0, Vec::len);
                for _ in have..self.per_instance {
                    match tunnel::open(instance, &keypair, OPEN_TIMEOUT).await {
                        Ok(tunnel) => {
                            let spare = Spare { opened: Instant::now(), tunnel };
                            lock(&self.spares).entry(instance.key).or_default().push(spare);
                        }
                        Err(e) => {
                            tracing::debug!(service = %instance.key, "cannot open a standby tunnel: {e}");
                            break;
                        }
                    }
                }
            }
            // Refill before the oldest spare expires, or as soon as one is taken
            // or the instances change.
            tokio::select! {
                _ = changed.changed() => {}
                () = self.taken.notified() => {}
                () = tokio::time::sleep(self.ttl / 2) => {}
            }
        }
    }
}

/// Whether the service has not closed `stream`: nothing to read (or data
/// waiting, such as a backend's greeting) means open; end of stream or an
/// error means closed. Looks without waiting and without consuming.
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    match stream.poll_peek(&mut cx, &mut buf) {
        Poll::Pending => true,
        Poll::Ready(Ok(n)) => n > 0,
        Poll::Ready(Err(_)) => false,
    }
}
