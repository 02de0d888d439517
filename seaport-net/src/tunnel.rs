//! Tunnels: the handshake on a TCP stream, parallel dialing of a service's
//! addresses, and the byte pump between a plain and a sealed stream.
//!
//! Tunnel wire format after the Noise handshake: frames of 1 to
//! `MAX_PLAINTEXT` bytes of data; an empty frame is end of stream, so a
//! half-close passes through. A sealed stream that ends without that frame
//! was cut, and the pump reports an error instead of a clean end.
//!
//! Backpressure: each direction owns one buffer (up to four frames on the
//! sealing side, one frame on the opening side) and reads again only after its
//! last write completed; nothing queues beyond it. The buffers are taken only
//! while data moves: a direction idle for 100 ms gives its buffer back, so an
//! idle tunnel costs little more than its two sockets.

use std::net::SocketAddr;
use std::time::Duration;

use seaport_proto::frame::{FrameDecoder, HEADER_LEN, MAX_WIRE_FRAME};
use seaport_proto::keys::{Keypair, PublicKey};
use seaport_proto::message::Instance;
use seaport_proto::noise::{Intent, MAX_PLAINTEXT, Opener, Sealer, Transport};
use seaport_proto::session::{Session, SessionError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::clock;
use crate::dial::{self, DialError, Unreachable, race};
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
    /// The TCP connect failed.
    #[error("{0}")]
    Dial(#[from] DialError),
    /// No address of the instance could be reached, each for its own cause.
    #[error("no address reachable: {0}")]
    Unreachable(Unreachable<TunnelError>),
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
            session.handle_input(clock::now(), buf.get(..n).unwrap_or_default())?;
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

impl OpenTunnel {
    /// Ends an unused tunnel cleanly: an end-of-stream frame, then waits
    /// (a second at most) for the service's own end before closing, so the
    /// service sees a finished tunnel rather than a cut one.
    pub async fn close(self) {
        let (mut sealer, _) = self.transport.split();
        let mut frame = Vec::new();
        let mut stream = self.stream;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            if sealer.seal(&[], &mut frame).is_ok() && stream.write_all(&frame).await.is_ok() {
                let _ = stream.shutdown().await;
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            }
        })
        .await;
    }
}

/// Dials every address of `instance` at once and handshakes; the first
/// handshake to finish wins and the others are dropped.
pub async fn open(
    instance: &Instance,
    local: &Keypair,
    timeout: Duration,
) -> Result<OpenTunnel, TunnelError> {
    let remote = instance.key;
    let attempt = |addr| open_one(addr, local.clone(), remote, timeout);
    race(&instance.addrs, attempt).await.map(|(_, tunnel)| tunnel).map_err(TunnelError::Unreachable)
}

async fn open_one(
    addr: SocketAddr,
    local: Keypair,
    remote: PublicKey,
    timeout: Duration,
) -> Result<OpenTunnel, TunnelError> {
    let mut stream = dial::connect(addr, timeout).await?;
    let mut session = Session::initiate(clock::now(), &local, &remote, Intent::Tunnel, entropy(), timeout)?;
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

/// How long a direction may sit idle before it gives its buffer back.
const IDLE_RELEASE: Duration = Duration::from_millis(100);

/// Waits until `rd` is readable. While holding a buffer, waits at most
/// [`IDLE_RELEASE`] and then reports idleness (`false`) so the caller can free
/// it; an idle tunnel thus holds no data buffers at all.
async fn wait_readable(rd: &OwnedReadHalf, holding: bool) -> std::io::Result<bool> {
    if !holding {
        rd.readable().await?;
        return Ok(true);
    }
    match tokio::time::timeout(IDLE_RELEASE, rd.readable()).await {
        Ok(ready) => ready.map(|()| true),
        Err(_) => Ok(false),
    }
}

/// Frames read, sealed and written per system call when data is plentiful.
const BATCH: usize = 4;

/// Plain bytes in, sealed frames out; an end of input becomes an end-of-stream
/// frame. Up to [`BATCH`] frames are read at once (a vectored read into the
/// plaintext slots of consecutive frames), sealed in place and written with
/// one call: only the last slot can be partly filled, so the sealed frames lie
/// back to back. No copy beyond the kernel's.
async fn seal_loop(
    rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    mut sealer: Sealer,
) -> Result<u64, TunnelError> {
    let mut buf: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        if !wait_readable(&rd, !buf.is_empty()).await? {
            buf = Vec::new();
            continue;
        }
        if buf.is_empty() {
            buf = vec![0u8; BATCH * MAX_WIRE_FRAME];
        }
        let read = {
            let mut frames = buf.chunks_mut(MAX_WIRE_FRAME);
            let mut slots: [std::io::IoSliceMut<'_>; BATCH] = std::array::from_fn(|_| {
                let frame = frames.next().unwrap_or_default();
                std::io::IoSliceMut::new(
                    frame.get_mut(HEADER_LEN..HEADER_LEN + MAX_PLAINTEXT).unwrap_or_default(),
                )
            });
            rd.try_read_vectored(&mut slots)
        };
        let n = match read {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        let mut wire = 0;
        let mut left = n;
        for frame in buf.chunks_mut(MAX_WIRE_FRAME) {
            let len = left.min(MAX_PLAINTEXT);
            // The first frame is always sealed: with n == 0 it is the end of stream.
            if len == 0 && wire > 0 {
                break;
            }
            wire += sealer.seal_frame(frame, len).map_err(|_| TunnelError::Corrupt)?;
            left -= len;
        }
        wr.write_all(buf.get(..wire).unwrap_or_default()).await?;
        total += n as u64;
        if n == 0 {
            wr.shutdown().await?;
            return Ok(total);
        }
    }
}

/// Sealed frames in, plain bytes out; the end-of-stream frame becomes a
/// half-close. Bytes are read straight into the frame decoder, opened in place
/// and written from there.
async fn open_loop(
    rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    mut opener: Opener,
    leftover: Vec<u8>,
) -> Result<u64, TunnelError> {
    let mut decoder = FrameDecoder::new();
    let mut total = 0u64;
    let mut pending = leftover.as_slice();
    loop {
        // Frames already buffered first, then what the handshake left over.
        while let Some(body) = decoder.next_frame() {
            let plain = opener.open_in_place(body).map_err(|_| TunnelError::Corrupt)?;
            if plain.is_empty() {
                wr.shutdown().await?;
                return Ok(total);
            }
            wr.write_all(plain).await?;
            total += plain.len() as u64;
        }
        if !pending.is_empty() {
            let taken = decoder.push(pending);
            pending = pending.get(taken..).unwrap_or_default();
            continue;
        }
        // A partial frame must stay; only an empty buffer is given back when idle.
        let releasable = decoder.holds_buffer() && decoder.buffered() == 0;
        if !wait_readable(&rd, releasable).await? {
            decoder.release();
            continue;
        }
        match rd.try_read(decoder.spare_mut()) {
            Ok(0) => return Err(TunnelError::Truncated),
            Ok(n) => decoder.commit(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
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
    let mut session = Session::respond(clock::now(), local, Intent::Tunnel, entropy(), timeout)?;
    handshake(&mut stream, &mut session, false, timeout).await?;
    if let Some(key) = session.remote() {
        crate::serve::record_peer_key(&key);
    }
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
