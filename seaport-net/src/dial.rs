//! Racing a peer's addresses: every address is tried at once, the first
//! attempt to finish wins, the others are dropped (which cancels them). Both
//! the control session (TCP connect to the registry, then its handshake) and
//! links (connect and handshake to a service) go through [`race`], so an
//! address that accepts TCP but cannot complete a handshake never beats one
//! that can.
//!
//! A race that nobody wins keeps each address's own cause ([`Unreachable`]),
//! so the user sees why every address failed, and metrics can count causes.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Why one TCP connect failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// The connect itself failed (refused, unreachable, ...).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No answer in time.
    #[error("no answer in {0:?}")]
    Timeout(Duration),
}

/// Every address failed: each with its own cause.
#[derive(Debug)]
pub struct Unreachable<E> {
    /// Each address tried and why it failed, in the order they failed.
    pub causes: Vec<(SocketAddr, E)>,
}

impl<E: fmt::Display> fmt::Display for Unreachable<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.causes.is_empty() {
            return f.write_str("no address to try");
        }
        for (i, (addr, cause)) in self.causes.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{addr}: {cause}")?;
        }
        Ok(())
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for Unreachable<E> {}

/// Runs `attempt` for every address at once; returns the first success and
/// its address, or every address's failure. The losers are aborted.
pub async fn race<T, E, F, Fut>(addrs: &[SocketAddr], attempt: F) -> Result<(SocketAddr, T), Unreachable<E>>
where
    T: Send + 'static,
    E: Send + 'static,
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
{
    let mut attempts = JoinSet::new();
    for addr in addrs.iter().copied() {
        let work = attempt(addr);
        attempts.spawn(async move { (addr, work.await) });
    }
    let mut causes = Vec::new();
    while let Some(done) = attempts.join_next().await {
        match done {
            Ok((addr, Ok(won))) => return Ok((addr, won)),
            Ok((addr, Err(e))) => causes.push((addr, e)),
            // A panicked attempt is a bug, not a cause to report per address;
            // the others may still win.
            Err(e) => tracing::error!("a dial attempt failed: {e}"),
        }
    }
    Err(Unreachable { causes })
}

/// A TCP connect to `addr` within `timeout`, with Nagle off (every protocol
/// here writes whole messages).
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, DialError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| DialError::Timeout(timeout))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_success_wins_and_every_failure_is_kept() {
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        // A port with no listener: bind, note it, close.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let timeout = Duration::from_secs(5);
        let (won, _stream) = race(&[closed, good_addr], |a| connect(a, timeout)).await.unwrap();
        assert_eq!(won, good_addr);
        let err = race(&[closed], |a| connect(a, timeout)).await.unwrap_err();
        assert_eq!(err.causes.len(), 1);
        assert!(matches!(err.causes[0], (a, DialError::Io(_)) if a == closed));
        assert!(err.to_string().starts_with(&closed.to_string()), "{err}");
        let none = race(&[], |a| connect(a, timeout)).await.unwrap_err();
        assert_eq!(none.to_string(), "no address to try");
    }
}
