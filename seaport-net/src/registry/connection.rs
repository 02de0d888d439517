//! A registry session's connection: a reader task feeding the server bytes
//! through a bounded channel, and a writer task draining the session's
//! queue and reporting each write back.
//!
//! Invariant: the registry alone decides when a peer is too slow (bytes
//! handed out and not yet written, capped by `RegistryConfig::max_queued`):
//! one slow-peer policy, in the state machine, so a queue here holds at most
//! that many bytes though it is unbounded in count.

use std::net::SocketAddr;
use std::time::Duration;

use seaport_proto::registry::SessionId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tracing::Instrument;

/// Read size per connection.
const READ_CHUNK: usize = 8 * 1024;
/// How long a closing connection may take to write its last bytes.
const LINGER: Duration = Duration::from_secs(2);
/// A write stuck this long means the peer stopped reading: give up on it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a connection's tasks tell the server.
pub(super) enum Input {
    Data(SessionId, Vec<u8>),
    Written(SessionId, usize),
    Closed(SessionId),
}

/// The server's end of one session's connection.
pub(super) struct Connection {
    /// Unbounded in count, bounded in bytes: the registry drops a peer whose
    /// unwritten bytes pass its `max_queued`.
    queue: mpsc::UnboundedSender<Vec<u8>>,
    reader: AbortHandle,
}

impl Connection {
    /// Starts the reader and the writer of session `id` on `stream`, as
    /// tasks of `tasks`; they report on `input`.
    pub(super) fn start(
        id: SessionId,
        stream: TcpStream,
        peer: SocketAddr,
        input: &mpsc::Sender<Input>,
        tasks: &mut JoinSet<()>,
    ) -> Connection {
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let (queue, rx) = mpsc::unbounded_channel();
        let span = tracing::info_span!("session", id = id.0, %peer);
        let reader = tasks.spawn(read_loop(id, rd, input.clone()).instrument(span.clone()));
        tasks.spawn(write_loop(id, wr, rx, input.clone()).instrument(span));
        Connection { queue, reader }
    }

    /// Queues bytes for the writer.
    pub(super) fn send(&self, bytes: Vec<u8>) {
        // A send fails only once the writer gave up, which it reports.
        let _ = self.queue.send(bytes);
    }

    /// The session ended: no more reading; dropping the queue lets the
    /// writer finish what is queued, then close.
    pub(super) fn close(self) {
        self.reader.abort();
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
