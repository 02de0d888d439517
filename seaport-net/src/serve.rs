//! The accept loop both the service and the proxy run: one task per
//! connection until shutdown, then a bounded drain of the open ones. Each
//! task runs in a `conn` span naming the peer's address, and its peer's key
//! (`peer_key`) once a handshake has told it.
//!
//! Invariant: every connection task belongs to the `JoinSet` the accept
//! loop returns, so none outlives the drain.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

/// Accepts connections on `listener`, and takes those that arrive on `more`
/// (a service's punched and relayed links), running `serve(stream, peer)` as
/// a task for each, until `shutdown` resolves; returns the tasks still
/// running. An accept error (out of descriptors, say) pauses briefly
/// instead of spinning.
pub async fn accept_until<S, F>(
    listener: &TcpListener,
    mut more: Option<mpsc::Receiver<(TcpStream, SocketAddr)>>,
    shutdown: impl Future<Output = ()>,
    mut serve: S,
) -> JoinSet<()>
where
    S: FnMut(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut open = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let span = tracing::info_span!("conn", %peer, peer_key = tracing::field::Empty);
                    open.spawn(serve(stream, peer).instrument(span));
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some((stream, peer)) = async { match &mut more { Some(more) => more.recv().await, None => None } } => {
                let span = tracing::info_span!("conn", %peer, peer_key = tracing::field::Empty);
                open.spawn(serve(stream, peer).instrument(span));
            }
            Some(_) = open.join_next(), if !open.is_empty() => {}
            () = &mut shutdown => return open,
        }
    }
}

/// Lets the `open` connections finish for up to `limit`, then drops the rest.
pub async fn drain(mut open: JoinSet<()>, limit: Duration) {
    if tokio::time::timeout(limit, async { while open.join_next().await.is_some() {} }).await.is_err() {
        tracing::warn!(open = open.len(), "drain time over; closing open connections");
    }
}

/// Names the peer's key in the current connection's span (see the module docs).
pub fn record_peer_key(key: &seaport_proto::keys::PublicKey) {
    tracing::Span::current().record("peer_key", tracing::field::display(key));
}
