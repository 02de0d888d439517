//! The backend sees who is calling: `seaport-service --proxy-protocol v1|v2`
//! in front of nginx (Debian's, `listen ... proxy_protocol`), whose access
//! log must show the address and port the client connected from at the
//! proxy; a small backend here parses v2's TLV 0xE0 and must find the
//! proxy's key; `--hide-client-address` withholds the address.
//!
//! nginx 1.22 (Debian 12) parses both versions but has no
//! `$proxy_protocol_tlv_*` variables yet (1.23.2), hence the parser here for
//! the key. Where nginx is missing the nginx tests skip, saying so, unless
//! `SEAPORT_TOOLS=require` (set by `.ci/run`).

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use seaport_tests::*;

const WAIT: Duration = Duration::from_secs(20);

/// `GET /` through the proxy on `port` from the loopback address `from`;
/// returns the port the request left from, once answered 200.
fn get_from(from: [u8; 4], port: u16) -> u16 {
    let mut conn = connect_from(from, SocketAddr::from(([127, 0, 0, 1], port)));
    let local = conn.local_addr().unwrap().port();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    local
}

/// Waits until nginx's access log (in `dir`) holds `line`.
fn wait_logged(dir: &std::path::Path, line: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = std::fs::read_to_string(dir.join("logs/access.log")).unwrap_or_default();
        // nginx writes an empty variable as "-".
        if log.lines().any(|l| l == line || l == line.replace(": ", "-:- ")) {
            return log;
        }
        assert!(Instant::now() < deadline, "nginx never logged {line:?}; its log:\n{log}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn nginx_logs_the_clients_address_with_v1_and_v2_and_none_when_hidden() {
    let (v1_port, v2_port) = (free_port(), free_port());
    let http = format!(
        "  log_format pp '$proxy_protocol_addr:$proxy_protocol_port $remote_addr';\n\
         server {{ listen 127.0.0.1:{v1_port} proxy_protocol; access_log logs/access.log pp; return 200 'v1'; }}\n\
         server {{ listen 127.0.0.1:{v2_port} proxy_protocol; access_log logs/access.log pp; return 200 'v2'; }}"
    );
    // nginx refuses a connection without the header: reaching it at all
    // (the waits in `nginx`) already needs one, so wait with a header.
    let Some((_nginx, dir)) = nginx_with_header(&http, &[v1_port, v2_port]) else { return };
    let reg = registry(&[]);
    let _v1 = service_with(&reg.target, v1_port, "pp1@1.0.0", &["--proxy-protocol", "v1"]);
    let _v2 = service_with(&reg.target, v2_port, "pp2@1.0.0", &["--proxy-protocol", "v2"]);
    let (_p1, port1) = proxy(&reg.target, "pp1@1", 1);
    let (_p2, port2) = proxy(&reg.target, "pp2@1", 1);
    let (_hidden, hidden_port) = proxy_with(&reg.target, "pp2@1", 1, &["--hide-client-address"]);

    let from1 = get_from([127, 0, 0, 21], port1);
    wait_logged(&dir, &format!("127.0.0.21:{from1} 127.0.0.1"));
    let from2 = get_from([127, 0, 0, 22], port2);
    wait_logged(&dir, &format!("127.0.0.22:{from2} 127.0.0.1"));
    // Withheld: the header has no address, nginx logs none.
    get_from([127, 0, 0, 23], hidden_port);
    let log = wait_logged(&dir, ": 127.0.0.1");
    assert!(!log.contains("127.0.0.23"), "the hidden address reached the backend:\n{log}");
    // The services' health checks (every 2 s) were taken as LOCAL/UNKNOWN
    // headers, not broken ones.
    thread::sleep(Duration::from_secs(3));
    let errors = std::fs::read_to_string(dir.join("logs/error.log")).unwrap();
    assert!(!errors.contains("broken header"), "{errors}");
}

/// nginx as [`nginx`] starts it, but waited for with a PROXY header (a
/// connection without one is refused, so the plain wait would fail).
fn nginx_with_header(http: &str, ports: &[u16]) -> Option<(Proc, std::path::PathBuf)> {
    tool("/usr/sbin/nginx", "nginx")?;
    // A plain server on a spare port is what `nginx` waits for.
    let probe = free_port();
    let http = format!("{http}\n  server {{ listen 127.0.0.1:{probe}; return 200 'up'; }}");
    let started = nginx(&http, probe)?;
    for port in ports {
        let mut conn = TcpStream::connect(("127.0.0.1", *port)).unwrap();
        conn.write_all(b"PROXY UNKNOWN\r\nGET / HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    // Forget the probes' lines.
    std::fs::write(started.1.join("logs/access.log"), "").unwrap();
    Some(started)
}

/// A backend that reads a v2 header and sends back what it found; each
/// header's (source, TLV 0xE0) goes to `found`.
fn v2_backend(found: mpsc::Sender<(Option<SocketAddr>, String)>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let found = found.clone();
            thread::spawn(move || {
                let mut head = [0u8; 16];
                if conn.read_exact(&mut head).is_err() {
                    return;
                }
                assert_eq!(&head[..12], b"\r\n\r\n\0\r\nQUIT\n", "a v2 signature");
                let mut rest = vec![0u8; usize::from(u16::from_be_bytes([head[14], head[15]]))];
                conn.read_exact(&mut rest).unwrap();
                if head[12] == 0x20 {
                    return; // LOCAL: the service's health check.
                }
                let (source, mut tlvs) = match head[13] {
                    0x11 => {
                        let ip: [u8; 4] = rest[0..4].try_into().unwrap();
                        (Some(SocketAddr::from((ip, u16::from_be_bytes([rest[8], rest[9]])))), &rest[12..])
                    }
                    0x00 => (None, &rest[..]),
                    other => panic!("family {other:#x}"),
                };
                let mut key = String::new();
                while tlvs.len() >= 3 {
                    let n = usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]]));
                    if tlvs[0] == 0xE0 {
                        key = String::from_utf8(tlvs[3..3 + n].to_vec()).unwrap();
                    }
                    tlvs = &tlvs[3 + n..];
                }
                let _ = found.send((source, key));
                // The request, read whole: closing on unread bytes would reset.
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") && conn.read_exact(&mut byte).is_ok() {
                    request.push(byte[0]);
                }
                let _ =
                    conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
            });
        }
    });
    port
}

#[test]
fn a_v2_backend_is_told_the_proxys_key_which_the_link_proved() {
    let (found_tx, found) = mpsc::channel();
    let backend = v2_backend(found_tx);
    let reg = registry(&[]);
    let _svc = service_with(&reg.target, backend, "keyed@1.0.0", &["--proxy-protocol", "v2"]);
    let (proxy_seed, proxy_key) = new_seed();
    let start = |extra: &[&str]| {
        let port = free_port().to_string();
        let mut args = vec![reg.target.as_str(), "-p", &port, "-r", "keyed@1"];
        args.extend_from_slice(extra);
        let p = Proc::start("seaport-proxy", &args, &[("SEAPORT_SEED", &proxy_seed)]);
        wait_found(&p, 1);
        (p, port.parse::<u16>().unwrap())
    };
    let (_shown, shown) = start(&[]);
    let from = get_from([127, 0, 0, 31], shown);
    let (source, key) = found.recv_timeout(WAIT).unwrap();
    assert_eq!(source, Some(SocketAddr::from(([127, 0, 0, 31], from))));
    assert_eq!(key, proxy_key);

    let (_hidden, hidden) = start(&["--hide-client-address"]);
    get_from([127, 0, 0, 32], hidden);
    let (source, key) = found.recv_timeout(WAIT).unwrap();
    assert_eq!((source, key), (None, proxy_key), "no address, the key still");
}

#[test]
fn proxy_protocol_is_refused_on_a_udp_service_and_with_a_bad_version() {
    for args in [
        &["-p", "53", "-r", "dns@1.0.0", "--udp", "--proxy-protocol", "v2"][..],
        &["-p", "80", "-r", "web@1.0.0", "--proxy-protocol", "v3"],
    ] {
        let mut all = vec!["0000000000000000000000000000000000000000000000000000000000000000@127.0.0.1:1"];
        all.extend_from_slice(args);
        let out = std::process::Command::new(bin("seaport-service")).args(&all).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--proxy-protocol"), "{err}");
    }
}
