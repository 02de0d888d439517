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
//!
//! A spare that passed its check can still belong to an instance that died a
//! moment ago (the kernel has not yet delivered its FIN). So a client is not
//! committed to a spare until the service has answered on it: [`probe`]
//! forwards the client's first bytes and keeps a copy (at most
//! [`REPLAY_CAP`]); a spare that ends before its first answer hands the copy
//! to the next attempt, and the client sees nothing of the failure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use seaport_proto::client::ProxyClient;
use seaport_proto::keys::{Keypair, PublicKey};
use seaport_proto::noise::MAX_PLAINTEXT;
use tokio::io::{AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::control::lock;
use crate::tunnel::{self, OpenTunnel, TunnelError};

struct Spare {
    opened: Instant,
    tunnel: OpenTunnel,
}

/// The pool of spare tunnels; see the module docs.
pub struct Standby {
    per_instance: usize,
    ttl: Duration,
    /// How long opening one spare may take.
    open_timeout: Duration,
    spares: Mutex<HashMap<PublicKey, Vec<Spare>>>,
    /// Wakes the refill loop when a spare was taken.
    taken: Notify,
}

impl Standby {
    /// A pool keeping `per_instance` spares per instance, each at most `ttl`
    /// old, each opened within `open_timeout`.
    pub fn new(per_instance: usize, ttl: Duration, open_timeout: Duration) -> Arc<Standby> {
        Arc::new(Standby {
            per_instance,
            ttl,
            open_timeout,
            spares: Mutex::new(HashMap::new()),
            taken: Notify::new(),
        })
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
                    match tunnel::open(instance, &keypair, self.open_timeout).await {
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

/// The most client bytes kept for a replay: past this, the client is committed
/// to its tunnel whether or not the service answered (a request that large is
/// rare before an answer, and the copy must be bounded).
pub const REPLAY_CAP: usize = MAX_PLAINTEXT;

/// What [`probe`] found out about a tunnel.
pub enum Probe {
    /// The service answered (or the client is committed for another reason):
    /// pump the tunnel.
    Answered(Box<OpenTunnel>),
    /// The tunnel ended before any answer: try another, replaying the copy.
    Dead(TunnelError),
    /// The client's own connection failed; nothing more to do.
    ClientGone(std::io::Error),
}

/// Sends `replay` (the client bytes a dead tunnel took) into `tunnel`, then,
/// for a `spare` tunnel, forwards the client's bytes and keeps a copy in
/// `replay` until the service answers. A fresh tunnel needs no wait: its
/// handshake completed only after the service reached its backend. The
/// client's end of stream commits too, so that only the pump forwards it.
pub async fn probe(client: &TcpStream, mut tunnel: OpenTunnel, replay: &mut Vec<u8>, spare: bool) -> Probe {
    let mut sealed = Vec::new();
    for chunk in replay.chunks(MAX_PLAINTEXT) {
        if tunnel.transport.seal(chunk, &mut sealed).is_err() {
            return Probe::Dead(TunnelError::Corrupt);
        }
    }
    if let Err(e) = tunnel.stream.write_all(&sealed).await {
        return Probe::Dead(e.into());
    }
    if !spare || !tunnel.leftover.is_empty() {
        return Probe::Answered(Box::new(tunnel));
    }
    let mut byte = [0u8; 1];
    let mut chunk = vec![0u8; REPLAY_CAP];
    loop {
        if replay.len() >= REPLAY_CAP {
            return Probe::Answered(Box::new(tunnel));
        }
        tokio::select! {
            peeked = tunnel.stream.peek(&mut byte) => return match peeked {
                Ok(n) if n > 0 => Probe::Answered(Box::new(tunnel)),
                Ok(_) => Probe::Dead(TunnelError::Truncated),
                Err(e) => Probe::Dead(e.into()),
            },
            readable = client.readable() => {
                if let Err(e) = readable {
                    return Probe::ClientGone(e);
                }
                let room = chunk.get_mut(..REPLAY_CAP - replay.len()).unwrap_or_default();
                let n = match client.try_read(room) {
                    Ok(0) => return Probe::Answered(Box::new(tunnel)),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Probe::ClientGone(e),
                };
                let fresh = room.get(..n).unwrap_or_default();
                sealed.clear();
                if tunnel.transport.seal(fresh, &mut sealed).is_err() {
                    return Probe::Dead(TunnelError::Corrupt);
                }
                replay.extend_from_slice(fresh);
                if let Err(e) = tunnel.stream.write_all(&sealed).await {
                    return Probe::Dead(e.into());
                }
            }
        }
    }
}
