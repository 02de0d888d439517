//! The measurements, each against one address (direct, relay or proxy):
//! bulk throughput, request/response latency, new-connection latency, idle
//! connections held open, registry lookups; and for links, a download that
//! runs until stopped (load beside a latency figure) and two downloads at once
//! (how a link shares itself).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use seaport_proto::hello::Intent;
use seaport_proto::keys::{Keypair, PublicKey, Seed};
use seaport_proto::message::Message;
use seaport_proto::role::{Role, RoleQuery};
use seaport_proto::session::Session;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends `bytes` to the sink; returns MB/s (10^6 bytes per second) from the
/// first byte sent to the sink's count received.
pub async fn bulk_up(addr: SocketAddr, bytes: u64) -> Result<f64> {
    let mut stream = connect(addr).await?;
    let buf = vec![0xa5u8; 256 * 1024];
    let start = Instant::now();
    stream.write_all(b"S").await?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        stream.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    stream.shutdown().await?;
    let mut count = [0u8; 8];
    stream.read_exact(&mut count).await?;
    if u64::from_le_bytes(count) != bytes {
        return Err(format!("sink counted {} of {bytes} bytes", u64::from_le_bytes(count)).into());
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// Receives `bytes` from the source; returns MB/s.
pub async fn bulk_down(addr: SocketAddr, bytes: u64) -> Result<f64> {
    let mut stream = connect(addr).await?;
    let start = Instant::now();
    let mut request = vec![b'D'];
    request.extend_from_slice(&bytes.to_le_bytes());
    stream.write_all(&request).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    if total != bytes {
        return Err(format!("received {total} of {bytes} bytes").into());
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// `rounds` round trips of 64 bytes on one connection; the latency of each.
/// Downloads from the source at `addr` until the returned handle is aborted
/// (or dropped with its runtime): steady bulk load on that path.
pub fn background_download(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = bulk_down(addr, u64::MAX / 2).await;
    })
}

/// Two downloads of `bytes` each through `addr` at once; returns the share of
/// the bytes each had received when the first one finished (0.5 each is
/// fair), and both together in MB/s until then.
pub async fn two_downloads(addr: SocketAddr, bytes: u64) -> Result<([f64; 2], f64)> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let counts = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(addr).await?;
        let mut request = vec![b'D'];
        request.extend_from_slice(&bytes.to_le_bytes());
        stream.write_all(&request).await?;
        streams.push(stream);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (mut stream, count) in streams.into_iter().zip(counts.clone()) {
        tasks.spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
    }
    // The first to finish ends the comparison; the other is cut off.
    tasks.join_next().await;
    let got = counts.map(|c| c.load(Ordering::Relaxed) as f64);
    let rate = (got[0] + got[1]) / started.elapsed().as_secs_f64() / 1e6;
    tasks.abort_all();
    let total = got[0] + got[1];
    if total == 0.0 {
        return Err("no bytes received".into());
    }
    Ok((got.map(|g| g / total), rate))
}

pub async fn request_response(addr: SocketAddr, rounds: usize) -> Result<Vec<Duration>> {
    let mut stream = connect(addr).await?;
    stream.write_all(b"E").await?;
    let msg = [0x42u8; 64];
    let mut back = [0u8; 64];
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        stream.write_all(&msg).await?;
        stream.read_exact(&mut back).await?;
        times.push(start.elapsed());
    }
    Ok(times)
}

/// The sum and count of a proxy's `seaport_stream_open_seconds` histogram,
/// from its `--metrics` listener at `addr`.
pub async fn stream_open_totals(addr: SocketAddr) -> Result<(f64, f64)> {
    let mut stream = connect(addr).await?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
            .ok_or_else(|| format!("no {name} in the proxy's metrics"))
    };
    Ok((value("seaport_stream_open_seconds_sum")?, value("seaport_stream_open_seconds_count")?))
}

/// `count` fresh connections: connect, send one byte, receive its echo.
pub async fn new_connections(addr: SocketAddr, count: usize) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        let mut stream = connect(addr).await?;
        stream.write_all(b"E!").await?;
        let mut back = [0u8; 1];
        stream.read_exact(&mut back).await?;
        times.push(start.elapsed());
    }
    Ok(times)
}

/// Opens `count` echo connections, each proven open end to end by one echoed
/// byte, and returns them (idle) for the caller to hold.
pub async fn open_idle(addr: SocketAddr, count: usize) -> Result<Vec<TcpStream>> {
    let mut open = Vec::with_capacity(count);
    for chunk in 0..count.div_ceil(100) {
        let batch = (count - chunk * 100).min(100);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..batch {
            tasks.spawn(async move {
                let mut stream = connect(addr).await?;
                stream.write_all(b"E.").await?;
                let mut back = [0u8; 1];
                stream.read_exact(&mut back).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(stream)
            });
        }
        while let Some(done) = tasks.join_next().await {
            open.push(done??);
        }
    }
    Ok(open)
}

/// The `p`-th percentile (0–100) of `times`, in microseconds.
pub fn percentile_us(times: &mut [Duration], p: f64) -> f64 {
    times.sort_unstable();
    if times.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (times.len() - 1) as f64).round() as usize;
    times[rank.min(times.len() - 1)].as_secs_f64() * 1e6
}

/// A control session to a registry, for the lookup benchmark.
struct Control {
    stream: TcpStream,
    session: Session,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl Control {
    async fn open(addr: SocketAddr, registry: &PublicKey, seed: u8) -> Result<Control> {
        let stream = connect(addr).await?;
        let me = Keypair::from_seed(&Seed::from_bytes([seed; 32]));
        let session = Session::initiate(
            Instant::now(),
            &me,
            registry,
            Intent::Control,
            [seed; 32],
            Duration::from_secs(10),
        )?;
        let mut c = Control { stream, session, buf: vec![0; 64 * 1024], out: Vec::new() };
        c.flush().await?;
        while !c.session.is_established() {
            c.read().await?;
        }
        Ok(c)
    }

    fn send(&mut self, msg: &Message) -> Result<()> {
        let mut plain = Vec::new();
        msg.encode(&mut plain)?;
        self.session.send(&plain)?;
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.session.poll_transmit(&mut self.out) {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Reads once; returns the messages that arrived.
    async fn read(&mut self) -> Result<Vec<Message>> {
        let n = self.stream.read(&mut self.buf).await?;
        if n == 0 {
            return Err("registry closed the session".into());
        }
        self.session.handle_input(std::time::Instant::now(), &self.buf[..n])?;
        let mut msgs = Vec::new();
        while let Some(plain) = self.session.poll_message() {
            msgs.push(Message::decode(&plain)?);
        }
        Ok(msgs)
    }
}

/// Registers `instances` instances (1,000 role names, several versions
/// each) from one session, then runs `lookups` lookups of `name@1.x` from
/// another session with `window` in flight; returns lookups per second.
pub async fn lookups_per_second(
    addr: SocketAddr,
    registry: &PublicKey,
    instances: usize,
    lookups: usize,
    window: usize,
) -> Result<f64> {
    let names = 1000.min(instances.max(1));
    let mut service = Control::open(addr, registry, 201).await?;
    for i in 0..instances {
        let role = Role::parse(&format!("svc-{}@1.{}.0", i % names, i / names))?;
        service.send(&Message::Register { id: i as u32, role, port: 1, addrs: vec![] })?;
        if i % 256 == 255 {
            service.flush().await?;
        }
    }
    service.flush().await?;
    let mut registered = 0;
    while registered < instances {
        for msg in service.read().await? {
            match msg {
                Message::Registered { .. } => registered += 1,
                other => return Err(format!("registration answered with {other:?}").into()),
            }
        }
    }

    let mut proxy = Control::open(addr, registry, 202).await?;
    let queries: Vec<RoleQuery> = (0..names)
        .map(|i| RoleQuery::parse(&format!("svc-{i}@1.x")))
        .collect::<std::result::Result<_, _>>()?;
    let start = Instant::now();
    let (mut sent, mut done) = (0usize, 0usize);
    while done < lookups {
        while sent - done < window && sent < lookups {
            proxy.send(&Message::Lookup { id: sent as u32, query: queries[sent % names].clone() })?;
            sent += 1;
        }
        proxy.flush().await?;
        for msg in proxy.read().await? {
            match msg {
                Message::Instances { instances: found, .. } if !found.is_empty() => done += 1,
                other => return Err(format!("lookup answered with {other:?}").into()),
            }
        }
    }
    Ok(lookups as f64 / start.elapsed().as_secs_f64())
}
