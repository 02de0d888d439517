//! Serves the registry state machine on a TCP listener.
//!
//! One task owns the [`Registry`]; each connection has a reader task feeding
//! it bytes through a bounded channel and a writer task draining a bounded
//! queue. A peer that does not read fills its queue and is dropped; nothing
//! grows without bound.

use std::collections::HashMap;
use std::time::Duration;

use seaport_proto::registry::{Registry, RegistryEvent, SessionId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use crate::identity::entropy;

/// Queued writes per connection before it counts as not reading.
const WRITE_QUEUE: usize = 64;
/// Read size per connection.
const READ_CHUNK: usize = 8 * 1024;
/// How long a closing connection may take to write its last bytes.
const LINGER: Duration = Duration::from_secs(2);
/// A write stuck this long means the peer stopped reading: give up on it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

enum Input {
    Data(SessionId, Vec<u8>),
    Closed(SessionId),
}

struct Connection {
    queue: mpsc::Sender<Vec<u8>>,
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
    let mut buf = Vec::new();
    loop {
        let deadline = registry.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match registry.accept(std::time::Instant::now(), peer, entropy()) {
                    Ok(id) => {
                        let _ = stream.set_nodelay(true);
                        let (rd, wr) = stream.into_split();
                        let (queue, rx) = mpsc::channel(WRITE_QUEUE);
                        let reader = tokio::spawn(read_loop(id, rd, input_tx.clone())).abort_handle();
                        tokio::spawn(write_loop(wr, rx));
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
                Input::Data(id, bytes) => registry.handle_input(std::time::Instant::now(), id, &bytes),
                Input::Closed(id) => registry.handle_closed(id),
            },
            () = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                registry.handle_timeout(std::time::Instant::now());
            }
            _ = stop.changed() => return,
        }
        loop {
            let mut progressed = false;
            while let Some(id) = registry.poll_transmit(&mut buf) {
                progressed = true;
                let bytes = std::mem::take(&mut buf);
                let full = connections.get(&id).is_some_and(|c| c.queue.try_send(bytes).is_err());
                if full {
                    tracing::warn!(session = id.0, "peer is not reading; dropping it");
                    registry.handle_closed(id);
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

async fn write_loop(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(bytes) = rx.recv().await {
        if !matches!(tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&bytes)).await, Ok(Ok(()))) {
            return;
        }
    }
    let _ = tokio::time::timeout(LINGER, wr.shutdown()).await;
}
