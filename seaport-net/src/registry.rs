//! Serves the registry state machine on a TCP listener.
//!
//! One task owns the [`Registry`]; each connection has a reader task feeding
//! it bytes through a bounded channel and a writer task draining its queue.
//! The writer reports what it wrote back to the registry, which alone decides
//! when a peer is too slow (bytes handed out and not yet written, capped by
//! `RegistryConfig::max_queued`): one slow-peer policy, in the state machine,
//! so the queue here holds at most that many bytes. Every connection task
//! belongs to the server's `JoinSet` and ends with it.

use std::collections::HashMap;
use std::time::Duration;

use seaport_proto::registry::{Registry, RegistryEvent, SessionId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tracing::Instrument;

use crate::identity::entropy;

/// Read size per connection.
const READ_CHUNK: usize = 8 * 1024;
/// How long a closing connection may take to write its last bytes.
const LINGER: Duration = Duration::from_secs(2);
/// A write stuck this long means the peer stopped reading: give up on it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

enum Input {
    Data(SessionId, Vec<u8>),
    Written(SessionId, usize),
    Closed(SessionId),
}

struct Connection {
    /// Unbounded in count, bounded in bytes: the registry drops a peer whose
    /// unwritten bytes pass its `max_queued`.
    queue: mpsc::UnboundedSender<Vec<u8>>,
    reader: AbortHandle,
}

/// Serves `registry` on `listener` until `stop` turns true; `on_event` sees
/// every registry event (for logs).
pub async fn serve(
    listener: TcpListener,
    mut registry: Registry,
    mut stop: watch::Receiver<bool>,
    mut on_event: impl FnMut(&RegistryEvent),
) {
    let (input_tx, mut input_rx) = mpsc::channel::<Input>(1024);
    let mut connections: HashMap<SessionId, Connection> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut buf = Vec::new();
    loop {
        let deadline = registry.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match registry.accept(crate::clock::now(), peer, entropy()) {
                    Ok(id) => {
                        let _ = stream.set_nodelay(true);
                        let (rd, wr) = stream.into_split();
                        let (queue, rx) = mpsc::unbounded_channel();
                        let span = tracing::info_span!("session", id = id.0, %peer);
                        let reader =
                            tasks.spawn(read_loop(id, rd, input_tx.clone()).instrument(span.clone()));
                        tasks.spawn(write_loop(id, wr, rx, input_tx.clone()).instrument(span));
                        connections.insert(id, Connection { queue, reader });
                    }
                    Err(full) => {
                        // An empty frame tells the client "full, not a wrong
                        // key" (no Noise message is empty); best effort only.
                        let _ = stream.try_write(&[0, 0]);
                        tracing::warn!(%peer, "refusing connection: {full}");
                    }
                },
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(input) = input_rx.recv() => match input {
                Input::Data(id, bytes) => registry.handle_input(crate::clock::now(), id, &bytes),
                Input::Written(id, n) => registry.handle_written(id, n),
                Input::Closed(id) => registry.handle_closed(id),
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            () = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                registry.handle_timeout(crate::clock::now());
            }
            _ = stop.changed() => return,
        }
        loop {
            let mut progressed = false;
            while let Some(id) = registry.poll_transmit(&mut buf) {
                progressed = true;
                let bytes = std::mem::take(&mut buf);
                if let Some(conn) = connections.get(&id) {
                    // A send fails only once the writer gave up, which it reports.
                    let _ = conn.queue.send(bytes);
                }
            }
            while let Some(event) = registry.poll_event() {
                progressed = true;
                if let RegistryEvent::SessionClosed { id, .. } = &event {
                    // Dropping the queue lets the writer finish what is queued, then close.
                    if let Some(conn) = connections.remove(id) {
                        conn.reader.abort();
                    }
                }
                on_event(&event);
            }
            if !progressed {
                break;
            }
        }
    }
}

async fn read_loop(id: SessionId, mut rd: OwnedReadHalf, tx: mpsc::Sender<Input>) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match rd.read(&mut buf).await {
            Ok(n) if n > 0 => {
                if tx.send(Input::Data(id, buf.get(..n).unwrap_or_default().to_vec())).await.is_err() {
                    return;
                }
            }
            _ => {
                let _ = tx.send(Input::Closed(id)).await;
                return;
            }
        }
    }
}

/// Writes what the registry queued and reports each write, so the registry
/// can tell a slow peer; a write stuck for [`WRITE_TIMEOUT`] ends the session.
async fn write_loop(
    id: SessionId,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    tx: mpsc::Sender<Input>,
) {
    while let Some(bytes) = rx.recv().await {
        if !matches!(tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&bytes)).await, Ok(Ok(()))) {
            tracing::info!("peer stopped reading; closing");
            let _ = tx.send(Input::Closed(id)).await;
            return;
        }
        if tx.send(Input::Written(id, bytes.len())).await.is_err() {
            return;
        }
    }
    let _ = tokio::time::timeout(LINGER, wr.shutdown()).await;
}
