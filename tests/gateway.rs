//! The proxy's HTTP gateway (`--gateway`) with real clients: curl moves
//! 200 MiB each way through `/role/...` with the sha256 intact, receives a
//! chunked response as it is sent, keeps one connection for two requests;
//! headless Chromium loads a page with its script and image and echoes a
//! WebSocket through the gateway, by path and by `Host`; `/list/` answers
//! the instances; mistakes get the HTTP status that names them.
//!
//! The backend is `gateway_backend.py` (python3, standard library). The
//! browser test needs Debian's `chromium` and `chromium-driver` (see
//! `browser.rs`).

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

#[path = "browser.rs"]
mod browser;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use seaport_tests::*;
use sha2::{Digest, Sha256};

const WAIT: Duration = Duration::from_secs(20);
const DOMAIN: &str = "seaport.test";

/// `gateway_backend.py` named `name` on a free port.
fn backend(name: &str) -> (Proc, u16) {
    let port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/gateway_backend.py");
    let mut cmd = Command::new("python3");
    cmd.args([script, &port.to_string(), name]);
    let p = Proc::spawn("gateway backend", cmd);
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the backend did not start: {:?}", p.errors());
        thread::sleep(Duration::from_millis(20));
    }
    (p, port)
}

/// A registry, one `web@1.2.0` service in front of a backend, and a proxy
/// serving only a gateway (with `Host` routing under [`DOMAIN`]).
struct Setup {
    _reg: Registry,
    _backend: Proc,
    service: Proc,
    proxy: Proc,
    gateway: u16,
}

fn setup(extra: &[&str]) -> Setup {
    let reg = registry(&[]);
    let (backend, port) = backend("alpha");
    let service = service(&reg.target, port, "web@1.2.0");
    let gateway = free_port();
    let listen = format!("127.0.0.1:{gateway}");
    let mut args = vec![reg.target.as_str(), "--gateway", &listen, "--gateway-domain", DOMAIN];
    args.extend_from_slice(extra);
    let proxy = Proc::start("seaport-proxy", &args, &[]);
    proxy.wait_log("HTTP gateway on", WAIT);
    Setup { _reg: reg, _backend: backend, service, proxy, gateway }
}

/// curl with `args`; returns (stdout, stderr), asserting it succeeded.
fn curl(args: &[&str]) -> (Vec<u8>, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "120"]).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "curl {args:?}: {err}");
    (out.stdout, err)
}

/// The status and body of a GET through the gateway.
fn status(url: &str) -> (u16, String) {
    let (out, _) = curl(&["-o", "-", "-w", "\n%{http_code}", url]);
    let text = String::from_utf8(out).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_owned())
}

/// The sha256 of `len` bytes of the backend's pattern (0..=255 repeated).
fn pattern_digest(len: usize) -> String {
    let block: Vec<u8> = (0..=255u8).cycle().take(1 << 16).collect();
    let mut digest = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len());
        digest.update(&block[..n]);
        left -= n;
    }
    hex(&digest.finalize())
}

#[test]
fn curl_moves_200_mib_each_way_streams_chunks_and_keeps_its_connection() {
    let s = setup(&[]);
    let base = format!("http://127.0.0.1:{}/role/web@1", s.gateway);

    // 200 MiB down, whole.
    let len = 200 << 20;
    let (body, _) = curl(&[&format!("{base}/bytes?n={len}")]);
    assert_eq!(body.len(), len);
    assert_eq!(hex(&Sha256::digest(&body)), pattern_digest(len));
    drop(body);

    // 200 MiB up, with a length and chunked.
    let file = std::env::temp_dir().join(format!("seaport-gateway-upload-{}", std::process::id()));
    let mut content = Vec::with_capacity(len);
    let mut seed = 0x9e37_79b9_u32;
    while content.len() < len {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        content.extend_from_slice(&seed.to_le_bytes());
    }
    std::fs::write(&file, &content).unwrap();
    let want = hex(&Sha256::digest(&content));
    drop(content);
    let data = format!("@{}", file.display());
    let (sent, _) = curl(&["--data-binary", &data, &format!("{base}/sha256")]);
    assert_eq!(String::from_utf8(sent).unwrap(), want, "upload with a length");
    let (sent, _) =
        curl(&["-H", "Transfer-Encoding: chunked", "--data-binary", &data, &format!("{base}/sha256")]);
    assert_eq!(String::from_utf8(sent).unwrap(), want, "chunked upload");
    let _ = std::fs::remove_file(&file);

    // A chunked answer arrives as it is sent (the backend waits 300 ms
    // between chunks), not all at once at its end.
    let mut child = Command::new("curl")
        .args(["-sSN", &format!("{base}/stream")])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut arrivals = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        assert!(line.starts_with(&format!("chunk {}", arrivals.len())), "{line}");
        arrivals.push(Instant::now());
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(arrivals.len(), 5);
    let spread = arrivals[4] - arrivals[0];
    assert!(spread >= Duration::from_millis(900), "the chunks came together ({spread:?} apart)");

    // Keep-alive: curl keeps its connection for a second request, and the
    // gateway its backend connection.
    let url = format!("{base}/echo-headers");
    let (out, err) = curl(&["-v", "-D", "-", &url, &url]);
    assert!(err.contains("Re-using existing connection"), "{err}");
    // hyper writes header names in lower case.
    let out = String::from_utf8(out).unwrap().to_lowercase();
    let conns: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("x-backend-conn: ")).collect();
    assert_eq!(conns.len(), 2, "{out}");
    assert_eq!(conns[0], conns[1], "one backend connection for both requests:\n{out}");
    // The backend sees its own path and who asked.
    assert!(out.contains("get /echo-headers http/1.1"), "{out}");
    assert!(out.contains("x-forwarded-for: 127.0.0.1"), "{out}");
    assert!(out.contains("x-forwarded-prefix: /role/web@1"), "{out}");
    assert!(out.contains("\nforwarded: for=127.0.0.1;proto=http"), "{out}");
}

#[test]
fn list_instance_host_routes_and_the_errors_a_user_meets() {
    let s = setup(&[]);
    let g = format!("http://127.0.0.1:{}", s.gateway);
    let key = s.service.lines()[0].rsplit(' ').next().unwrap().to_owned();

    let (code, body) = status(&format!("{g}/list/web@1"));
    assert_eq!(code, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list[0]["key"], key.as_str(), "{body}");
    assert_eq!(list[0]["role"], "web@1.2.0", "{body}");
    // Escaped ranges are read as written.
    assert_eq!(status(&format!("{g}/list/web@%5E1.0.0")).0, 200);
    assert_eq!(status(&format!("{g}/list/web@2")), (200, "[]".to_owned()));

    let (code, body) = status(&format!("{g}/instance/{key}/echo-headers"));
    assert_eq!(code, 200);
    assert!(body.contains(&format!("x-forwarded-prefix: /instance/{key}")), "{body}");

    // By Host: the path as it is.
    let (out, _) = curl(&["-H", &format!("Host: web.{DOMAIN}"), &format!("{g}/echo-headers")]);
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("GET /echo-headers HTTP/1.1"), "{out}");
    assert!(out.contains(&format!("x-forwarded-host: web.{DOMAIN}")), "{out}");

    // A role's host name is routed by host alone: its pages cannot reach
    // another role's paths (each role is its own origin).
    let (out, _) = curl(&["-H", &format!("Host: web.{DOMAIN}"), &format!("{g}/role/other@1/echo-headers")]);
    let out = String::from_utf8(out).unwrap();
    assert!(out.starts_with("not here"), "the backend got the path as it was: {out}");
    // A name that is not the gateway's (DNS rebinding) is refused.
    let (out, _) =
        curl(&["-o", "-", "-w", "\n%{http_code}", "-H", "Host: evil.example", &format!("{g}/list/web@1")]);
    let out = String::from_utf8(out).unwrap();
    assert!(out.ends_with("421") && out.contains("not a name of this gateway"), "{out}");
    assert_eq!(status(&format!("http://localhost:{}/list/web@2", s.gateway)).0, 200);

    let (code, body) = status(&format!("{g}/role/nothing@1/"));
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no instance of nothing@1"), "{body}");
    let (code, body) = status(&format!("{g}/role/web@not-a-range!/"));
    assert_eq!(code, 400, "{body}");
    let (code, body) = status(&format!("{g}/instance/abc/"));
    assert_eq!(code, 400, "{body}");
    let (code, body) = status(&format!("{g}/elsewhere"));
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("/role/ROLE@RANGE/PATH"), "{body}");

    // The service gone: its instance is refused, and the gateway says so.
    drop(s.service);
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, body) = status(&format!("{g}/role/web@1/"));
        if code == 404 || code == 502 {
            break;
        }
        assert!(Instant::now() < deadline, "still {code} after the service died: {body}");
        thread::sleep(Duration::from_millis(100));
    }
    assert!(s.proxy.errors().iter().all(|l| !l.contains("panicked")));
}

#[test]
fn chromium_loads_a_page_with_its_assets_and_a_websocket_through_the_gateway() {
    if let Some(why) = browser::browser_missing() {
        eprintln!("skipping the browser test: {why}");
        return;
    }
    let s = setup(&[]);
    let by_path = format!("http://127.0.0.1:{}/role/web@1/", s.gateway);
    let by_host = format!("http://web.{DOMAIN}:{}/", s.gateway);
    let rules = format!("--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1");
    browser::with_chromium(&[rules], async |browser| {
        for url in [&by_path, &by_host] {
            browser.goto(url).await.unwrap();
            let deadline = Instant::now() + WAIT;
            loop {
                let title = browser.title().await.unwrap();
                let echoes = browser.execute("return window.echoes || [];", vec![]).await.unwrap();
                if title == "loaded with image" && echoes.as_array().is_some_and(|e| e.len() == 2) {
                    assert_eq!(echoes, serde_json::json!(["alpha echoes one", "alpha echoes two"]), "{url}");
                    break;
                }
                assert!(Instant::now() < deadline, "{url}: title {title:?}, echoes {echoes}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
}

/// On SIGTERM the gateway finishes what is under way and closes its idle
/// keep-alive connections at once: the proxy does not wait out --drain
/// for a client that merely kept its connection.
#[test]
fn shutdown_closes_idle_keep_alive_connections_at_once() {
    use std::io::{Read, Write};
    let mut s = setup(&["--drain", "30s"]);
    let mut conn = TcpStream::connect(("127.0.0.1", s.gateway)).unwrap();
    conn.write_all(b"GET /role/web@1/echo-headers HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    s.proxy.signal("TERM");
    // Within 20 s, against a 30 s --drain: it did not wait for the client.
    let code = s.proxy.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{:?}", s.proxy.errors());
    // The rest of the answer, then the end: the connection was closed.
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
}
