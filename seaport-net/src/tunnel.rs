//! Tunnels: the handshake on a TCP stream, parallel dialing of a service's
//! addresses, and the byte pump between a plain and a sealed stream.
//!
//! Tunnel wire format after the Noise handshake: frames of 1 to
//! `MAX_PLAINTEXT` bytes of data; an empty frame is end of stream, so a
//! half-close passes through. A sealed stream that ends without that frame
//! was cut, and the pump reports an error instead of a clean end.
//!
//! Backpressure: each direction owns one read buffer and one frame buffer and
//! reads again only after its last write completed; nothing queues beyond them.

use std::net::SocketAddr;
use std::time::Duration;

use seaport_proto::frame::{FrameDecoder, MAX_WIRE_FRAME};
use seaport_proto::keys::{Keypair, PublicKey};
use seaport_proto::message::Instance;
use seaport_proto::noise::{Intent, MAX_PLAINTEXT, Opener, Sealer, Transport};
use seaport_proto::session::{Session, SessionError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::identity::entropy;

/// Why a tunnel could not be opened or ended badly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// Socket-level failure.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The handshake failed (wrong key, version, corruption).
    #[error("handshake failed: {0}")]
    Handshake(#[from] SessionError),
    /// The handshake did not finish in time.
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    /// The peer closed before the handshake finished.
    #[error("peer closed the connection during the handshake")]
    ClosedEarly,
    /// A frame failed to decrypt.
    #[error("tunnel data failed to authenticate")]
    Corrupt,
    /// The sealed stream ended without an end-of-stream frame.
    #[error("tunnel cut off before end of stream")]
    Truncated,
    /// No address of any instance could be reached.
    #[error("no instance reachable: {0}")]
    Unreachable(String),
}

/// Runs `session`'s handshake on `stream`. With `reply` false the responder's
/// answer stays queued in the session, so the caller can decide (after
/// connecting the backend) whether to complete the handshake at all.
pub async fn handshake(
    stream: &mut TcpStream,
    session: &mut Session,
    reply: bool,
    timeout: Duration,
) -> Result<(), TunnelError> {
    let work = async {
        let mut buf = [0u8; 1024];
        let mut out = Vec::new();
        loop {
            if (reply || !session.is_established()) && session.poll_transmit(&mut out) {
                stream.write_all(&out).await?;
                out.clear();
            }
            if session.is_established() {
                return Ok(());
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(TunnelError::ClosedEarly);
            }
            session.handle_input(buf.get(..n).unwrap_or_default())?;
        }
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| TunnelError::Timeout(timeout))?
}

/// An open tunnel to a service, ready to pump.
pub struct OpenTunnel {
    /// The stream to the service.
    pub stream: TcpStream,
    /// The established transport.
    pub transport: Transport,
    /// Bytes read past the handshake.
    pub leftover: Vec<u8>,
    /// The address that answered first.
    pub addr: SocketAddr,
}

/// Dials every address of `instance` at once and handshakes; the first to
/// finish wins and the others are dropped.
pub async fn open(
    instance: &Instance,
    local: &Keypair,
    timeout: Duration,
) -> Result<OpenTunnel, TunnelError> {
    let mut attempts = tokio::task::JoinSet::new();
    for addr in instance.addrs.iter().copied() {
        let (local, remote) = (local.clone(), instance.key);
        attempts.spawn(async move { open_one(addr, &local, &remote, timeout).await.map_err(|e| (addr, e)) });
    }
    let mut errors = Vec::new();
    while let Some(done) = attempts.join_next().await {
        match done {
            Ok(Ok(tunnel)) => return Ok(tunnel),
            Ok(Err((addr, e))) => errors.push(format!("{addr}: {e}")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(TunnelError::Unreachable(errors.join("; ")))
}

async fn open_one(
    addr: SocketAddr,
    local: &Keypair,
    remote: &PublicKey,
    timeout: Duration,
) -> Result<OpenTunnel, TunnelError> {
    let mut stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| TunnelError::Timeout(timeout))??;
    let _ = stream.set_nodelay(true);
    let mut session =
        Session::initiate(std::time::Instant::now(), local, remote, Intent::Tunnel, entropy(), timeout)?;
    handshake(&mut stream, &mut session, true, timeout).await?;
    let (transport, leftover) = session.into_transport().ok_or(TunnelError::ClosedEarly)?;
    Ok(OpenTunnel { stream, transport, leftover, addr })
}

/// Bytes moved by a finished tunnel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// From the plain side into the tunnel.
    pub sealed: u64,
    /// Out of the tunnel to the plain side.
    pub opened: u64,
}

/// Pumps both directions between `plain` and the tunnel on `sealed` until
/// both have ended. An error in either direction ends both.
pub async fn pump(
    plain: TcpStream,
    sealed: TcpStream,
    transport: Transport,
    leftover: Vec<u8>,
) -> Result<Moved, TunnelError> {
    let (sealer, opener) = transport.split();
    let (plain_rd, plain_wr) = plain.into_split();
    let (sealed_rd, sealed_wr) = sealed.into_split();
    let up = std::pin::pin!(seal_loop(plain_rd, sealed_wr, sealer));
    let down = std::pin::pin!(open_loop(sealed_rd, plain_wr, opener, leftover));
    pump_both(up, down).await
}

async fn pump_both(
    mut up: std::pin::Pin<&mut impl Future<Output = Result<u64, TunnelError>>>,
    mut down: std::pin::Pin<&mut impl Future<Output = Result<u64, TunnelError>>>,
) -> Result<Moved, TunnelError> {
    tokio::select! {
        sealed = &mut up => {
            let sealed = sealed?;
            Ok(Moved { sealed, opened: down.await? })
        }
        opened = &mut down => {
            let opened = opened?;
            Ok(Moved { sealed: up.await?, opened })
        }
    }
}

/// Plain bytes in, sealed frames out; an end of input becomes an end-of-stream frame.
async fn seal_loop(
    mut rd: impl AsyncRead + Unpin,
    mut wr: impl AsyncWrite + Unpin,
    mut sealer: Sealer,
) -> Result<u64, TunnelError> {
    let mut buf = vec![0u8; MAX_PLAINTEXT];
    let mut frame = Vec::with_capacity(MAX_WIRE_FRAME);
    let mut total = 0u64;
    loop {
        let n = rd.read(&mut buf).await?;
        frame.clear();
        sealer.seal(buf.get(..n).unwrap_or_default(), &mut frame).map_err(|_| TunnelError::Corrupt)?;
        wr.write_all(&frame).await?;
        total += n as u64;
        if n == 0 {
            wr.shutdown().await?;
            return Ok(total);
        }
    }
}

/// Sealed frames in, plain bytes out; the end-of-stream frame becomes a half-close.
async fn open_loop(
    mut rd: impl AsyncRead + Unpin,
    mut wr: impl AsyncWrite + Unpin,
    mut opener: Opener,
    leftover: Vec<u8>,
) -> Result<u64, TunnelError> {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; MAX_WIRE_FRAME];
    let mut plain = Vec::with_capacity(MAX_PLAINTEXT);
    let mut total = 0u64;
    let mut input = leftover;
    loop {
        let mut rest = input.as_slice();
        while !rest.is_empty() {
            let taken = decoder.push(rest);
            rest = rest.get(taken..).unwrap_or_default();
            while let Some(frame) = decoder.next_frame() {
                plain.clear();
                opener.open(frame, &mut plain).map_err(|_| TunnelError::Corrupt)?;
                if plain.is_empty() {
                    wr.shutdown().await?;
                    return Ok(total);
                }
                wr.write_all(&plain).await?;
                total += plain.len() as u64;
            }
        }
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return Err(TunnelError::Truncated);
        }
        input.clear();
        input.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
}

/// Answers one tunnel on the service side: handshake, connect the backend,
/// only then complete the handshake (so a proxy whose service has no backend
/// sees a failed handshake and fails over), then pump.
pub async fn serve_one(
    mut stream: TcpStream,
    local: &Keypair,
    backend: SocketAddr,
    timeout: Duration,
) -> Result<Moved, TunnelError> {
    let _ = stream.set_nodelay(true);
    let mut session = Session::respond(std::time::Instant::now(), local, Intent::Tunnel, entropy(), timeout)?;
    handshake(&mut stream, &mut session, false, timeout).await?;
    let backend = tokio::time::timeout(timeout, TcpStream::connect(backend))
        .await
        .map_err(|_| TunnelError::Timeout(timeout))??;
    let _ = backend.set_nodelay(true);
    let mut reply = Vec::new();
    session.poll_transmit(&mut reply);
    stream.write_all(&reply).await?;
    let (transport, leftover) = session.into_transport().ok_or(TunnelError::ClosedEarly)?;
    pump(backend, stream, transport, leftover).await
}
