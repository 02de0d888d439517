//! The processes a benchmark run talks to, all on loopback: a backend (sink,
//! source and echo in one), a plain relay hop, and the seaport binaries.
//!
//! The backend and relay are this same executable started with a hidden
//! subcommand, so that each side of every comparison is its own process, as
//! proxy and service are.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Relay buffer per direction: the same frame size seaport's pump uses.
const RELAY_BUF: usize = 64 * 1024;

/// Backend protocol: the first byte picks the mode.
/// - `S`: sink; reads to EOF, then answers the byte count as 8 bytes LE.
/// - `D` + 8 bytes LE length: source; sends that many bytes, then closes.
/// - `E`: echo everything.
pub async fn serve_backend(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut mode = [0u8; 1];
            if stream.read_exact(&mut mode).await.is_err() {
                return;
            }
            let _ = match mode[0] {
                b'S' => sink(&mut stream).await,
                b'D' => source(&mut stream).await,
                _ => echo(&mut stream).await,
            };
        });
    }
}

async fn sink(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.write_all(&total.to_le_bytes()).await;
        }
        total += n as u64;
    }
}

async fn source(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len).await?;
    let mut left = u64::from_le_bytes(len);
    let buf = vec![0x5au8; 256 * 1024];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        stream.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    stream.shutdown().await
}

async fn echo(stream: &mut TcpStream) -> std::io::Result<()> {
    let (mut rd, mut wr) = stream.split();
    // A small buffer: idle echo connections should cost the backend little.
    let mut buf = vec![0u8; 4096];
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return wr.shutdown().await;
        }
        wr.write_all(&buf[..n]).await?;
    }
}

/// One plain relay hop: every connection to `listener` is copied both ways
/// to `to`, with half-close, 64 KiB buffers and no encryption.
pub async fn serve_relay(listener: TcpListener, to: SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let _ = inbound.set_nodelay(true);
            let Ok(mut outbound) = TcpStream::connect(to).await else { return };
            let _ = outbound.set_nodelay(true);
            let _ =
                tokio::io::copy_bidirectional_with_sizes(&mut inbound, &mut outbound, RELAY_BUF, RELAY_BUF)
                    .await;
        });
    }
}

/// A child process, killed on drop.
pub struct Peer {
    pub name: String,
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Peer {
    pub fn start(name: &str, program: &Path, args: &[&str]) -> Peer {
        let mut child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "warn")
            .env_remove("SEAPORT_BOOTSTRAP")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Peer { name: name.to_owned(), child, stdout }
    }

    /// Reads stdout until a line contains `needle`; returns that line.
    pub fn wait_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut line = String::new();
        while Instant::now() < deadline {
            line.clear();
            if self.stdout.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            if line.contains(needle) {
                return line.trim().to_owned();
            }
        }
        panic!("{}: no line with {needle:?}", self.name)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (current RSS, peak RSS) in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Resets the peak RSS (VmHWM) to the current RSS.
    pub fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the seaport binaries in release mode and returns their directory.
pub fn build_binaries() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--release", "--quiet", "-p", "seaport-seed", "-p", "seaport-registry"])
        .args(["-p", "seaport-service", "-p", "seaport-proxy"])
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the seaport binaries failed");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    target.join("release")
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// bore (`cargo install bore-cli`), the plain TCP tunnel the performance
/// issue names as the bar: its server and its local client on loopback,
/// tunnelling to `backend`. bore's control port is fixed (7835), so one
/// bench with `--bore` runs at a time. Returns both processes and the
/// tunnel's address.
pub fn start_bore(bore: &Path, backend: SocketAddr) -> (Peer, Peer, SocketAddr) {
    let tunnel_port = free_port();
    let port = tunnel_port.to_string();
    let server = Peer::start(
        "bore server",
        bore,
        &["server", "--bind-addr", "127.0.0.1", "--min-port", &port, "--max-port", &port],
    );
    wait_listening("bore server", SocketAddr::from(([127, 0, 0, 1], 7835)));
    let local_port = backend.port().to_string();
    let client = Peer::start(
        "bore local",
        bore,
        &["local", &local_port, "--local-host", "127.0.0.1", "--to", "127.0.0.1", "--port", &port],
    );
    let tunnel = SocketAddr::from(([127, 0, 0, 1], tunnel_port));
    wait_listening("bore local", tunnel);
    (server, client, tunnel)
}

/// Waits (up to 10 s) until `addr` takes a connection.
fn wait_listening(name: &str, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{name}: nothing listening on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
