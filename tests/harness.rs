//! The end-to-end harness: builds the real binaries once, runs them as child
//! processes on 127.0.0.1 with free ports, reads their stdout event lines,
//! and kills every process it started when its handle drops.
//!
//! Also small loopback backends: an HTTP server with a fixed body, and a
//! "bulk" server that hashes what it receives or streams bytes it generates.

// Test support: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The workspace's target directory for this profile.
fn target_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    target.join("debug")
}

/// Path of a seaport binary, built (once per test process) with cargo.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        raise_fd_limit();
        cargo_build(&[
            "-p",
            "seaport-seed",
            "-p",
            "seaport-registry",
            "-p",
            "seaport-service",
            "-p",
            "seaport-proxy",
        ]);
    });
    let path = target_dir().join(name);
    assert!(path.exists(), "{} missing after build", path.display());
    path
}

/// Path of an example of the `seaport` crate, built (once per test process) with cargo.
pub fn example(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| cargo_build(&["-p", "seaport", "--examples"]));
    let path = target_dir().join("examples").join(name);
    assert!(path.exists(), "{} missing after build", path.display());
    path
}

/// `cargo build --quiet ARGS` in the workspace; fails the test if it fails.
fn cargo_build(args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    // `cargo test` sets the package's variables for this process, and
    // ring's build script tracks some of them: inherited, they make this
    // build and a plain `cargo build` rebuild ring and all above it in turn.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_"].iter().any(|p| key.starts_with(p)) {
            build.env_remove(&*key);
        }
    }
    let status = build.args(["build", "--quiet"]).args(args).status().expect("run cargo build");
    assert!(status.success(), "cargo build {args:?} failed");
}

/// The hostile-input test holds over 2,000 sockets at once: lift the soft
/// open-file limit to the hard one, as the binaries do for themselves.
fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let _ = setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum });
}

/// A TCP connection to `to` from the loopback address `from` (say
/// 127.0.0.2): another host, as far as per-address limits go.
pub fn connect_from(from: [u8; 4], to: std::net::SocketAddr) -> TcpStream {
    use rustix::net::{AddressFamily, SocketType, bind, connect, socket};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    bind(&fd, &std::net::SocketAddrV4::new(from.into(), 0)).unwrap();
    connect(&fd, &to).unwrap();
    TcpStream::from(fd)
}

/// The identity made from seed `[n; 32]`: a fixed key per number, the same
/// as `seaport_proto::testing::keypair` gives the proto tests.
pub fn keypair(n: u8) -> seaport_proto::keys::Keypair {
    seaport_proto::keys::Keypair::from_seed(&seaport_proto::keys::Seed::from_bytes([n; 32]))
}

/// Whether the server closed `stream` within `limit` (EOF or reset).
pub fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A UDP port that was free a moment ago.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running binary. Killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn collect(reader: impl Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) {
    thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { return };
            into.lock().unwrap().push(line);
        }
    });
}

/// Arguments and environment for a seaport binary: tests never reach the
/// public DHT, so inherited settings are cleared before ours are applied.
fn seaport_env(cmd: &mut Command, args: &[&str], env: &[(&str, &str)]) {
    cmd.args(args);
    cmd.env_remove("SEAPORT_BOOTSTRAP").env_remove("SEAPORT_REGISTRY").env_remove("SEAPORT_SEED");
    cmd.env_remove("SEAPORT_REGISTRY_SEED").env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
}

impl Proc {
    /// Starts the seaport binary `name` with `args` and extra environment.
    pub fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(bin(name));
        seaport_env(&mut cmd, args, env);
        Proc::spawn(name, cmd)
    }

    /// Starts the seaport binary `name` like [`Proc::start`], inside the
    /// network namespace `netns` (`ip netns exec`, which execs the binary:
    /// the pid is the binary's own). Needs root.
    pub fn start_in(netns: &str, name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns]).arg(bin(name));
        seaport_env(&mut cmd, args, env);
        Proc::spawn(&format!("{name} in {netns}"), cmd)
    }

    /// Starts an example of the `seaport` crate with `args`, in the
    /// environment a binary gets.
    pub fn example(name: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new(example(name));
        seaport_env(&mut cmd, args, &[]);
        Proc::spawn(&format!("example {name}"), cmd)
    }

    /// Starts any command, with its output collected like a binary's.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn process");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().unwrap(), stdout.clone());
        collect(child.stderr.take().unwrap(), stderr.clone());
        Proc { name: name.into(), child, stdout, stderr }
    }

    /// Stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Stderr lines so far.
    pub fn errors(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for a stdout line containing `needle`; fails the test after `timeout`.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no line with {needle:?} within {timeout:?}\nstdout: {:#?}\nstderr: {:#?}",
                self.name,
                self.lines(),
                self.errors()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a stderr (log) line containing `needle`; fails the test after `timeout`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.errors().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no log line with {needle:?} within {timeout:?}\nstderr: {:#?}",
                self.name,
                self.errors()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Counts stderr (log) lines containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.errors().iter().filter(|l| l.contains(needle)).count()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Counts stdout lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits for the process to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Give the reader threads a moment to take the last lines.
                thread::sleep(Duration::from_millis(50));
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal (`TERM`, `INT`, `KILL`, `STOP`, `CONT`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The path of a program a test needs, or a skip (a failure in CI, where
/// `SEAPORT_TOOLS=require`).
pub fn tool(path: &str, package: &str) -> Option<String> {
    if std::path::Path::new(path).exists() {
        return Some(path.to_owned());
    }
    assert!(
        std::env::var("SEAPORT_TOOLS").as_deref() != Ok("require"),
        "SEAPORT_TOOLS=require, but {path} is missing: apt-get install {package}"
    );
    eprintln!("skipped: needs {path} (Debian {package}); CI runs it");
    None
}

/// nginx in the foreground, one process, with `http` (the body of an
/// `http { }` block) as its configuration, its files in a directory of its
/// own; `None` (a skip) where nginx is missing. Waits until `port` answers.
pub fn nginx(http: &str, port: u16) -> Option<(Proc, PathBuf)> {
    let path = tool("/usr/sbin/nginx", "nginx")?;
    let dir = std::env::temp_dir().join(format!("seaport-nginx-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let conf = format!(
        "pid {dir}/nginx.pid;\nerror_log {dir}/logs/error.log info;\nevents {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
         fastcgi_temp_path {dir}/fcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n{http}\n}}\n",
        dir = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let mut cmd = Command::new(path);
    cmd.arg("-p").arg(&dir).arg("-c").arg(dir.join("nginx.conf"));
    cmd.args(["-g", "daemon off; master_process off;"]);
    let p = Proc::spawn("nginx", cmd);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        let log = std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "nginx did not start: {:?}\n{log}", p.errors());
        thread::sleep(Duration::from_millis(20));
    }
    Some((p, dir))
}

/// A plain HTTP server in its own process (python3), stoppable and restartable
/// on the same port, serving `dir`.
pub fn python_http(port: u16, dir: &std::path::Path) -> Proc {
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"]).arg(dir);
    let p = Proc::spawn("python3 http.server", cmd);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "python3 http.server did not start");
        thread::sleep(Duration::from_millis(20));
    }
    p
}

/// A new registry seed and its public key, from `seaport-seed --json`.
pub fn new_seed() -> (String, String) {
    let out = Command::new(bin("seaport-seed")).arg("--json").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        let start = text.find(&format!("\"{name}\": \"")).unwrap() + name.len() + 5;
        text[start..start + 64].to_owned()
    };
    (field("seed"), field("pubkey"))
}

/// A registry on loopback, without DHT; `target` is `KEY@127.0.0.1:PORT`.
pub struct Registry {
    pub proc: Proc,
    pub key: String,
    pub target: String,
}

pub fn registry(extra: &[&str]) -> Registry {
    let (seed, key) = new_seed();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--listen", &listen, "--no-dht"];
    args.extend_from_slice(extra);
    let proc = Proc::start("seaport-registry", &args, &[("SEAPORT_REGISTRY_SEED", &seed)]);
    proc.wait_line("Registry listening. Connect with pubkey", Duration::from_secs(20));
    Registry { proc, target: format!("{key}@{listen}"), key }
}

/// A service for `role` in front of the backend on `port`.
pub fn service(target: &str, port: u16, role: &str) -> Proc {
    service_with(target, port, role, &[])
}

/// A service with extra flags, once registered.
pub fn service_with(target: &str, port: u16, role: &str, extra: &[&str]) -> Proc {
    let port = port.to_string();
    let mut args = vec![target, "-p", &port, "-r", role];
    args.extend_from_slice(extra);
    let p = Proc::start("seaport-service", &args, &[]);
    p.wait_line("registered service", Duration::from_secs(20));
    p
}

/// A proxy for `query` on a free port, once it has found `services` instances.
pub fn proxy(target: &str, query: &str, services: usize) -> (Proc, u16) {
    proxy_with(target, query, services, &[])
}

/// A proxy with extra flags, once it has found `services` instances.
pub fn proxy_with(target: &str, query: &str, services: usize, extra: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let port_text = port.to_string();
    let mut args = vec![target, "-p", &port_text, "-r", query];
    args.extend_from_slice(extra);
    let p = Proc::start("seaport-proxy", &args, &[]);
    wait_found(&p, services);
    (p, port)
}

/// Waits (at most 20 s) until the proxy `p` has found `services` instances.
pub fn wait_found(p: &Proc, services: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.count("found service") < services {
        assert!(
            Instant::now() < deadline,
            "proxy found {} of {services}: {:#?}",
            p.count("found"),
            p.errors()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// An HTTP/1.0 server on loopback that answers every request with `body`.
/// Runs until the test process ends.
pub fn http_backend(body: &str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = body.to_owned();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let body = body.clone();
            thread::spawn(move || {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let reply = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                let _ = stream.write_all(reply.as_bytes());
            });
        }
    });
    port
}

/// `GET /` over HTTP/1.0; returns status code and body, or status 0 and the
/// error when the connection failed or closed without an answer.
pub fn http_get(port: u16) -> (u16, String) {
    http_get_path(port, "/")
}

/// `GET path` over HTTP/1.0, like [`http_get`].
pub fn http_get_path(port: u16, path: &str) -> (u16, String) {
    let attempt = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply)
    };
    match attempt() {
        Ok(reply) => {
            let status = reply.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
            (status, body)
        }
        Err(e) => (0, e.to_string()),
    }
}

/// Deterministic bytes for bulk transfers (xorshift), `len` long.
pub fn pattern(seed: u64, len: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut state = seed | 1;
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(64 * 1024);
        left -= n;
        let mut chunk = Vec::with_capacity(n);
        while chunk.len() < n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.extend_from_slice(&state.to_le_bytes());
        }
        chunk.truncate(n);
        Some(chunk)
    })
}

/// The sha256 of `pattern(seed, len)`.
pub fn pattern_sha256(seed: u64, len: usize) -> String {
    let mut h = Sha256::new();
    for chunk in pattern(seed, len) {
        h.update(&chunk);
    }
    hex(&h.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A bulk backend. A client sends one command line:
/// - `UP\n`, then data until it half-closes: the server answers the sha256 hex;
/// - `DOWN SEED LEN\n`: the server sends `pattern(SEED, LEN)` and closes.
pub fn bulk_backend() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            thread::spawn(move || serve_bulk(stream));
        }
    });
    port
}

fn serve_bulk(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut command = String::new();
    if reader.read_line(&mut command).is_err() {
        return;
    }
    let words: Vec<&str> = command.split_whitespace().collect();
    match words.as_slice() {
        ["UP"] => {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => h.update(&buf[..n]),
                    Err(_) => return,
                }
            }
            let _ = writer.write_all(hex(&h.finalize()).as_bytes());
        }
        ["DOWN", seed, len] => {
            for chunk in pattern(seed.parse().unwrap(), len.parse().unwrap()) {
                if writer.write_all(&chunk).is_err() {
                    return;
                }
            }
        }
        _ => {}
    }
    let _ = writer.shutdown(Shutdown::Write);
}

/// Uploads `pattern(seed, len)` through `port`, half-closes, and returns the
/// digest the backend reports.
pub fn upload(port: u16, seed: u64, len: usize) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream.write_all(b"UP\n").unwrap();
    for chunk in pattern(seed, len) {
        stream.write_all(&chunk).unwrap();
    }
    stream.shutdown(Shutdown::Write).unwrap();
    let mut digest = String::new();
    stream.read_to_string(&mut digest).unwrap();
    digest
}

/// Downloads `pattern(seed, len)` through `port`; returns (bytes, sha256).
pub fn download(port: u16, seed: u64, len: usize) -> (usize, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream.write_all(format!("DOWN {seed} {len}\n").as_bytes()).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match stream.read(&mut buf).unwrap() {
            0 => break,
            n => {
                total += n;
                h.update(&buf[..n]);
            }
        }
    }
    (total, hex(&h.finalize()))
}

// ---- /metrics ----------------------------------------------------------------------------

/// The samples of an OpenMetrics/Prometheus text page: `name{labels}` → value.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line:?}"));
        assert!(samples.insert(name.to_owned(), value).is_none(), "sample twice: {line:?}");
    }
    samples
}

/// Scrapes `/metrics` on `port`, checking the answer's form.
pub fn scrape(port: u16) -> HashMap<String, f64> {
    let (status, body) = http_get_path(port, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("# EOF\n"), "an OpenMetrics page ends with # EOF: {body}");
    parse_metrics(&body)
}

/// Scrapes until `check` holds for the samples (counters move a little after
/// the traffic that caused them; registry gauges refresh every second).
pub fn scrape_until(
    port: u16,
    what: &str,
    check: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let samples = scrape(port);
        if check(&samples) {
            return samples;
        }
        assert!(Instant::now() < deadline, "{what}: not so within 5 s: {samples:#?}");
        thread::sleep(Duration::from_millis(50));
    }
}

pub fn sample(samples: &HashMap<String, f64>, name: &str) -> f64 {
    *samples.get(name).unwrap_or_else(|| panic!("no sample {name}: {samples:#?}"))
}

// ---- WireGuard -------------------------------------------------------------------------------

/// Runs `args` (a command line) in network namespace `ns` (or here, for
/// ""), failing the test on error; its stdout.
pub fn run_in(ns: &str, args: &[&str]) -> String {
    let mut cmd = if ns.is_empty() {
        Command::new(args[0])
    } else {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, args[0]]);
        c
    };
    let out = cmd.args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?} in {ns:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Two WireGuard identities: a server (address 10.99.0.2, listening) and a
/// client (10.99.0.1, which dials the server's endpoint), for tunnels
/// carried by seaport. Runs `wireguard-go` (userspace; needs root and
/// `/dev/net/tun`) in network namespaces.
pub struct WgPair {
    keys: [(String, String); 2],
}

impl WgPair {
    /// Fresh keys (`wg genkey`, `wg pubkey`).
    pub fn new() -> WgPair {
        let key = || {
            let private = run_in("", &["wg", "genkey"]).trim().to_owned();
            let mut pubkey = Command::new("wg")
                .arg("pubkey")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            pubkey.stdin.take().unwrap().write_all(private.as_bytes()).unwrap();
            let public =
                String::from_utf8(pubkey.wait_with_output().unwrap().stdout).unwrap().trim().to_owned();
            (private, public)
        };
        WgPair { keys: [key(), key()] }
    }

    /// The server's device `dev` in `ns`, listening on UDP `port`, as 10.99.0.2.
    pub fn server(&self, ns: &str, dev: &str, port: u16) -> Proc {
        let port = port.to_string();
        self.up(ns, dev, 1, &["listen-port", &port, "peer", &self.keys[0].1, "allowed-ips", "10.99.0.1/32"])
    }

    /// The client's device `dev` in `ns`, as 10.99.0.1, sending to `endpoint`.
    pub fn client(&self, ns: &str, dev: &str, endpoint: &str) -> Proc {
        let peer = &self.keys[1].1;
        self.up(
            ns,
            dev,
            0,
            &["peer", peer, "allowed-ips", "10.99.0.2/32", "endpoint", endpoint, "persistent-keepalive", "1"],
        )
    }

    fn up(&self, ns: &str, dev: &str, me: usize, settings: &[&str]) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "wireguard-go", "-f", dev])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
        let daemon = Proc::spawn(&format!("wireguard-go in {ns}"), cmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Command::new("ip")
            .args(["netns", "exec", ns, "ip", "link", "show", dev])
            .output()
            .unwrap()
            .status
            .success()
        {
            assert!(Instant::now() < deadline, "wireguard-go made no {dev}: {:#?}", daemon.errors());
            thread::sleep(Duration::from_millis(50));
        }
        let key_file = std::env::temp_dir().join(format!("seaport-{}-{dev}.key", std::process::id()));
        std::fs::write(&key_file, &self.keys[me].0).unwrap();
        let key_path = key_file.to_string_lossy().into_owned();
        run_in(ns, &[&["wg", "set", dev, "private-key", &key_path], settings].concat());
        let _ = std::fs::remove_file(&key_file);
        run_in(ns, &["ip", "addr", "add", &format!("10.99.0.{}/24", me + 1), "dev", dev]);
        run_in(ns, &["ip", "link", "set", dev, "up"]);
        daemon
    }
}

impl Default for WgPair {
    fn default() -> WgPair {
        WgPair::new()
    }
}

/// Through a tunnel of a [`WgPair`] (client in `client_ns`, server in
/// `server_ns`): `ping` answers, and an `iperf3` TCP transfer of 3 s
/// arrives. Its rate in bits per second.
pub fn wg_ping_and_iperf3(client_ns: &str, server_ns: &str) -> f64 {
    run_in(client_ns, &["ping", "-c", "3", "-W", "5", "10.99.0.2"]);
    let mut server = Command::new("ip");
    server.args(["netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", "10.99.0.2"]);
    let _server = Proc::spawn("iperf3 -s", server);
    thread::sleep(Duration::from_millis(300));
    let report = run_in(client_ns, &["iperf3", "-c", "10.99.0.2", "-t", "3", "-J"]);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let received = report["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    assert!(received > 1e6, "iperf3 across the tunnel moved {received} bytes: {report}");
    report["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0)
}
