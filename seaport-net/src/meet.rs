//! Meet connections on TCP ([`seaport_proto::meet`] has the exchange and
//! its bounds): a client joins a meeting and punches from the same local
//! port; the registry tells the two sides apart from handshakes, pairs them
//! and relays.
//!
//! Invariants:
//! - A client reads exactly the registry's one [`MeetPeer`] frame from a
//!   meet connection and nothing more, so every byte after it (a relayed
//!   link's handshake) is left for the link.
//! - A relay holds two fixed buffers ([`RELAY_BUFFER`] each way), never
//!   more, and ends after [`RELAY_IDLE`] without a byte either way (a live
//!   link pings every 10 s), after [`RelayLimits::lifetime`], or once it
//!   carried [`RelayLimits::bytes`]; it splices only once both sides' first
//!   records have a link handshake's sizes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use seaport_proto::meet::{HELLO_LEN, MeetHello, MeetPeer, MeetSide, PEER_MAX_LEN, is_handshake_size};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// How long one punching connect may wait before it is tried again: the
/// kernel resends a SYN only after a second, and the peer's SYN should have
/// opened its NAT by then.
const PUNCH_ATTEMPT: Duration = Duration::from_millis(1000);
/// Pause between punching connects that failed at once (a NAT that answers
/// with RST), so a refusing peer is not hammered.
const PUNCH_PAUSE: Duration = Duration::from_millis(50);
/// Bytes a relay buffers in each direction: a link's writes come in
/// batches of up to 256 KiB, and fewer, larger copies cost the registry less.
pub const RELAY_BUFFER: usize = 64 * 1024;
/// A relay with no byte either way for this long ends.
pub const RELAY_IDLE: Duration = Duration::from_secs(60);

/// What one relay may take of the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Ends after this long without a byte either way.
    pub idle: Duration,
    /// How long each side may take to send its handshake record before
    /// anything is spliced (the registry's `--handshake-timeout`).
    pub handshake: Duration,
    /// Ends after this long in all (`--max-relay-time`): a relay is a
    /// path of last resort, not a place to live.
    pub lifetime: Duration,
    /// Ends once it carried this many bytes, both ways together
    /// (`--max-relay-mib`).
    pub bytes: u64,
}

impl Default for RelayLimits {
    /// 60 s idle, 24 h, 64 GiB.
    fn default() -> Self {
        RelayLimits {
            idle: RELAY_IDLE,
            handshake: Duration::from_secs(10),
            lifetime: Duration::from_secs(24 * 3600),
            bytes: 64 << 30,
        }
    }
}

/// Why joining a meeting failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeetError {
    /// Socket-level failure.
    #[error("meet connection: {0}")]
    Io(#[from] std::io::Error),
    /// The registry closed the meet connection before the other side came.
    #[error("the registry closed the meeting (the other side did not come, or the ticket was refused)")]
    Closed,
    /// The registry's answer was not a peer frame.
    #[error("the registry sent something that is not a meeting answer")]
    Garbled,
    /// No answer in time.
    #[error("no meeting within {0:?}")]
    Timeout(Duration),
}

/// One side's meet connection, once the registry paired it.
#[derive(Debug)]
pub struct Joined {
    /// The meet connection: the relay, when `peer.relaying`.
    pub stream: TcpStream,
    /// Its local address, which the punch reuses.
    pub local: SocketAddr,
    /// The other side, as the registry saw it.
    pub peer: MeetPeer,
}

/// A TCP socket for `local` that other sockets may bind too (SO_REUSEADDR
/// and SO_REUSEPORT): the meet connection and the punches share one port,
/// so the NAT maps both to the one external port the registry observed.
fn shared_port(local: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = if local.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(local)?;
    Ok(socket)
}

/// Joins a meeting at `registry` (the address of the control session):
/// connects from a fresh shared port, says `hello`, and waits until the
/// registry pairs us with the other side, at most `timeout`.
pub async fn join(registry: SocketAddr, hello: MeetHello, timeout: Duration) -> Result<Joined, MeetError> {
    let work = async {
        let any = if registry.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        };
        let mut stream = shared_port(SocketAddr::new(any, 0))?.connect(registry).await?;
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr()?;
        let mut frame = Vec::with_capacity(2 + HELLO_LEN);
        // A hello is far below the frame limit.
        let _ = seaport_proto::record::encode(&hello.encode(), &mut frame);
        stream.write_all(&frame).await?;
        let mut len = [0u8; 2];
        read_exact_or_closed(&mut stream, &mut len).await?;
        let len = usize::from(u16::from_be_bytes(len));
        if len > PEER_MAX_LEN {
            return Err(MeetError::Garbled);
        }
        let mut body = [0u8; PEER_MAX_LEN];
        let body = body.get_mut(..len).ok_or(MeetError::Garbled)?;
        read_exact_or_closed(&mut stream, body).await?;
        let peer = MeetPeer::decode(body).ok_or(MeetError::Garbled)?;
        Ok(Joined { stream, local, peer })
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| MeetError::Timeout(timeout))?
}

async fn read_exact_or_closed(stream: &mut TcpStream, buf: &mut [u8]) -> Result<(), MeetError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(MeetError::Closed),
        Err(e) => Err(e.into()),
    }
}

/// Punches a TCP path to `peer` from `local` (the meet connection's own
/// address): connects again and again until a connect succeeds (through
/// cone NATs the two sides' SYNs cross: a simultaneous open) or `deadline`.
pub async fn punch(local: SocketAddr, peer: SocketAddr, deadline: Instant) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::TimedOut, "no punched path before the deadline");
    while Instant::now() < deadline {
        let attempt_ends = (Instant::now() + PUNCH_ATTEMPT).min(deadline);
        let started = Instant::now();
        match tokio::time::timeout_at(attempt_ends, shared_port(local)?.connect(peer)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = e,
            Err(_) => continue,
        }
        // Refused at once: wait a little, the peer's NAT may open any moment.
        if started.elapsed() < PUNCH_PAUSE {
            tokio::time::sleep_until((started + PUNCH_PAUSE).min(deadline)).await;
        }
    }
    Err(last)
}

/// What a registry's new connection turned out to be, from its first frame.
pub enum Greeting {
    /// A meet connection.
    Meet(MeetHello),
    /// Anything else (a control handshake): these bytes were read already
    /// and belong to it.
    Session(Vec<u8>),
}

/// Reads as much of a new connection as tells a meet connection from a
/// handshake: the 2-byte frame length, and only for a hello-sized frame
/// its body too.
pub async fn greet(stream: &mut TcpStream, timeout: Duration) -> std::io::Result<Greeting> {
    let work = async {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        if usize::from(u16::from_be_bytes(len)) != HELLO_LEN {
            return Ok(Greeting::Session(len.to_vec()));
        }
        let mut body = [0u8; HELLO_LEN];
        stream.read_exact(&mut body).await?;
        Ok(match MeetHello::decode(&body) {
            Some(hello) => Greeting::Meet(hello),
            None => Greeting::Session([&len[..], &body[..]].concat()),
        })
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no first frame in time"))?
}

/// Bytes relayed, all relays together. The fields are the process's
/// metric families themselves ([`crate::metrics`]), so `/metrics` and the
/// registry's own accounting are one set of atomics.
#[derive(Debug, Clone)]
pub struct RelayCounters {
    /// Relays open now.
    pub open: Gauge,
    /// Relays ever opened.
    pub opened: Counter,
    /// Bytes from proxies to services.
    pub to_service: Counter,
    /// Bytes from services to proxies.
    pub to_proxy: Counter,
}

impl Default for RelayCounters {
    fn default() -> Self {
        let m = crate::metrics::metrics();
        let bytes = |direction| {
            (*m.relayed_bytes.get_or_create(&crate::metrics::label("direction", direction))).clone()
        };
        RelayCounters {
            open: m.relays.clone(),
            opened: m.relays_opened.clone(),
            to_service: bytes("to_service"),
            to_proxy: bytes("to_proxy"),
        }
    }
}

/// Tells both sides of a paired meeting where the other is (and whether we
/// relay), then relays until both directions have ended, neither moved a
/// byte for `limits.idle`, or the relay reached its lifetime or its bytes.
/// Without `relaying`, holds the two connections (their NAT mappings stay
/// open while the sides punch) until either closes or `limits.idle`.
pub async fn pair(
    proxy: (TcpStream, SocketAddr),
    service: (TcpStream, SocketAddr),
    relaying: bool,
    limits: RelayLimits,
    counters: Arc<RelayCounters>,
) -> std::io::Result<()> {
    let idle = limits.idle;
    let ((mut p, p_addr), (mut s, s_addr)) = (proxy, service);
    let tell = |addr| {
        let mut frame = Vec::with_capacity(2 + PEER_MAX_LEN);
        let _ = seaport_proto::record::encode(&MeetPeer { addr, relaying }.encode(), &mut frame);
        frame
    };
    p.write_all(&tell(s_addr)).await?;
    s.write_all(&tell(p_addr)).await?;
    if !relaying {
        let (mut a, mut b) = ([0u8; 1], [0u8; 1]);
        let _ = tokio::time::timeout(idle, async {
            tokio::select! {
                _ = p.read(&mut a) => {}
                _ = s.read(&mut b) => {}
            }
        })
        .await;
        return Ok(());
    }
    // A relay carries links: the proxy's first record and the service's
    // reply must have a link handshake's size before anything is spliced.
    // Both within one handshake timeout: a relay that carries nothing yet
    // holds its share no longer than an unproved connection would.
    let (deadline, wait) = (tokio::time::Instant::now() + limits.handshake, limits.handshake);
    let proxy_first =
        tokio::time::timeout_at(deadline, forward_handshake(&mut p, &mut s, MeetSide::Proxy)).await;
    let Some(moved) = handshake_forwarded(proxy_first, MeetSide::Proxy, wait) else { return Ok(()) };
    counters.to_service.inc_by(moved);
    let service_first =
        tokio::time::timeout_at(deadline, forward_handshake(&mut s, &mut p, MeetSide::Service)).await;
    let Some(moved) = handshake_forwarded(service_first, MeetSide::Service, wait) else { return Ok(()) };
    counters.to_proxy.inc_by(moved);
    counters.opened.inc();
    // Counted while this future lives, however it ends (an abort at shutdown too).
    let _open = crate::metrics::OpenGuard::count(&counters.open);
    let started = Instant::now();
    let last = AtomicU64::new(0);
    let (pr, pw) = p.into_split();
    let (sr, sw) = s.into_split();
    let (to_service, to_proxy) = (AtomicU64::new(0), AtomicU64::new(0));
    // The relay's bytes, both ways: past `limits.bytes`, a pump stops and says so.
    let moved = AtomicU64::new(0);
    let spent = tokio::sync::Notify::new();
    let budget = Budget { moved: &moved, limit: limits.bytes, spent: &spent };
    let up = pump(pr, sw, &last, started, (&to_service, &counters.to_service), &budget);
    let down = pump(sr, pw, &last, started, (&to_proxy, &counters.to_proxy), &budget);
    let watchdog = async {
        loop {
            tokio::time::sleep(idle / 4).await;
            let quiet = started.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
        }
    };
    // Ends once both directions have ended (a half-closed link may still
    // carry its other half), once neither moved a byte for `idle`, at its
    // lifetime, or once it carried its bytes.
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        () = watchdog => tracing::info!("relay idle for {idle:?}: closed"),
        () = tokio::time::sleep(limits.lifetime) => tracing::info!("relay open for {:?} (--max-relay-time): closed", limits.lifetime),
        () = spent.notified() => tracing::info!("relay carried {} MiB (--max-relay-mib): closed", limits.bytes >> 20),
    }
    let (to_service, to_proxy) = (to_service.load(Ordering::Relaxed), to_proxy.load(Ordering::Relaxed));
    tracing::info!(to_service, to_proxy, "relay ended after {:?}", started.elapsed());
    Ok(())
}

/// The bytes `side`'s first record moved, or why the relay ends: a record
/// that is no link handshake is worth a log line; a side that closed (a
/// proxy whose punch won closes the relayed path) or said nothing is not.
fn handshake_forwarded(
    forwarded: Result<std::io::Result<u64>, tokio::time::error::Elapsed>,
    side: MeetSide,
    idle: Duration,
) -> Option<u64> {
    match forwarded {
        Ok(Ok(moved)) => Some(moved),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
            tracing::info!("relay refused: {e}");
            None
        }
        Ok(Err(e)) => {
            tracing::debug!("relay ended before the {side:?} side's handshake: {e}");
            None
        }
        Err(_) => {
            tracing::debug!("relay: no handshake from the {side:?} side within {idle:?}");
            None
        }
    }
}

/// Forwards the first record `side` sends, if it has the size of that
/// side's link handshake message; the bytes moved.
async fn forward_handshake(from: &mut TcpStream, to: &mut TcpStream, side: MeetSide) -> std::io::Result<u64> {
    let mut header = [0u8; seaport_proto::record::HEADER_LEN];
    from.read_exact(&mut header).await?;
    let len = usize::from(u16::from_be_bytes(header));
    if !is_handshake_size(side, len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the {side:?} side's first record ({len} bytes) is not a link handshake"),
        ));
    }
    let mut record = header.to_vec();
    record.resize(header.len() + len, 0);
    from.read_exact(record.get_mut(header.len()..).unwrap_or_default()).await?;
    to.write_all(&record).await?;
    Ok(record.len() as u64)
}

/// What one relay may still carry, both ways together.
struct Budget<'a> {
    moved: &'a AtomicU64,
    limit: u64,
    /// Told once the limit is reached.
    spent: &'a tokio::sync::Notify,
}

/// Copies one direction of a relay, adding what it moves to `mine` (this
/// relay's) and `total` (all relays', the metric), until either end closes
/// or the relay's `budget` is spent.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    last: &AtomicU64,
    started: Instant,
    (mine, total): (&AtomicU64, &Counter),
    budget: &Budget<'_>,
) {
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(n) if n > 0 => n,
            _ => break,
        };
        if to.write_all(buf.get(..n).unwrap_or_default()).await.is_err() {
            break;
        }
        mine.fetch_add(n as u64, Ordering::Relaxed);
        total.inc_by(n as u64);
        last.store(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
        if budget.moved.fetch_add(n as u64, Ordering::Relaxed).saturating_add(n as u64) >= budget.limit {
            budget.spent.notify_one();
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Two connected loopback streams.
    async fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dial = TcpStream::connect(listener.local_addr().unwrap());
        let (dialed, accepted) = tokio::join!(dial, listener.accept());
        (dialed.unwrap(), accepted.unwrap().0)
    }

    /// A relay between two fresh pairs: the proxy's end, the service's
    /// end, and the relay's task.
    async fn relay(limits: RelayLimits) -> (TcpStream, TcpStream, tokio::task::JoinHandle<()>) {
        let (proxy, at_proxy) = connected().await;
        let (service, at_service) = connected().await;
        let (p_addr, s_addr) = (proxy.local_addr().unwrap(), service.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let counters = Arc::new(RelayCounters::default());
            let _ = pair((at_proxy, p_addr), (at_service, s_addr), true, limits, counters).await;
        });
        let (mut proxy, mut service) = (proxy, service);
        // Each side first hears where the other is.
        for side in [&mut proxy, &mut service] {
            let mut len = [0u8; 2];
            side.read_exact(&mut len).await.unwrap();
            let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
            side.read_exact(&mut body).await.unwrap();
        }
        (proxy, service, task)
    }

    fn record(len: usize) -> Vec<u8> {
        let mut out = u16::try_from(len).unwrap().to_be_bytes().to_vec();
        out.resize(2 + len, 0xab);
        out
    }

    /// Whether `stream` ends (EOF or error) within a few seconds.
    async fn ends(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        read.await.is_ok()
    }

    #[tokio::test]
    async fn plaintext_is_never_spliced() {
        // The attack: a key meets a service of its own and pushes plain
        // HTTP through the registry.
        let (mut proxy, mut service, task) = relay(RelayLimits::default()).await;
        proxy.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), service.read_to_end(&mut got)).await;
        assert!(matches!(read, Ok(Ok(0))), "the service's end is closed without a byte: {read:?} {got:?}");
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_relay_ends_once_it_carried_its_bytes() {
        let limits = RelayLimits { bytes: 64 << 10, ..RelayLimits::default() };
        let (mut proxy, mut service, task) = relay(limits).await;
        // A link handshake's sizes go through, and then data.
        proxy.write_all(&record(seaport_proto::meet::MIN_NOISE_FIRST)).await.unwrap();
        let mut first = vec![0u8; 2 + seaport_proto::meet::MIN_NOISE_FIRST];
        service.read_exact(&mut first).await.unwrap();
        service.write_all(&record(seaport_proto::meet::MIN_NOISE_REPLY)).await.unwrap();
        let mut reply = vec![0u8; 2 + seaport_proto::meet::MIN_NOISE_REPLY];
        proxy.read_exact(&mut reply).await.unwrap();
        // Past 64 KiB the relay closes both ends.
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 16 << 10];
            for _ in 0..64 {
                if proxy.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            proxy
        });
        assert!(ends(&mut service).await, "the relay did not end at its byte limit");
        task.await.unwrap();
        drop(writer.await.unwrap());
    }
}
