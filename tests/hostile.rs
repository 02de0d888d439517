//! Hostile input against the registry's port and a service's link port,
//! while a legitimate proxy keeps making requests that must all succeed:
//! random bytes, a 65535-byte length prefix and nothing more, truncated and
//! wrong-key handshakes, garbage after a valid handshake, authentic frames
//! that make no sense inside a valid session, 1,000 silent
//! connections and a peer sending one byte a second. Every bad peer must be
//! dropped within a bounded time and the registry's memory must stay bounded.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use seaport_proto::hello::Intent;
use seaport_proto::keys::PublicKey;
use seaport_proto::session::Session;
use seaport_tests::*;

/// The handshake timeout the servers run with here.
const HANDSHAKE: Duration = Duration::from_secs(2);
/// Dropped within the handshake timeout plus the registry's 1 s sweep, with room for a loaded machine.
const DROPPED_WITHIN: Duration = Duration::from_secs(8);

/// The first handshake message of a session to `remote`, framed.
fn first_message(remote: &PublicKey, intent: Intent) -> Vec<u8> {
    let mut s = Session::initiate(Instant::now(), &keypair(1), remote, intent, [7; 32], HANDSHAKE).unwrap();
    let mut out = Vec::new();
    s.poll_transmit(&mut out);
    out
}

/// A completed handshake to `remote` on a blocking stream.
fn handshaken(addr: SocketAddr, remote: &PublicKey, intent: Intent) -> TcpStream {
    established(addr, remote, intent).0
}

/// A completed handshake to `remote`, with the session to seal frames in.
fn established(addr: SocketAddr, remote: &PublicKey, intent: Intent) -> (TcpStream, Session) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let mut s = Session::initiate(Instant::now(), &keypair(2), remote, intent, [8; 32], HANDSHAKE).unwrap();
    let mut out = Vec::new();
    s.poll_transmit(&mut out);
    stream.write_all(&out).unwrap();
    let mut buf = [0u8; 1024];
    while !s.is_established() {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "server closed during a valid handshake");
        s.handle_input(Instant::now(), &buf[..n]).unwrap();
    }
    (stream, s)
}

/// Runs every attack on `addr` at once; returns the names of those not dropped in time.
fn attack(addr: SocketAddr, key: PublicKey, intent: Intent) -> Vec<String> {
    type Attack = Box<dyn FnOnce() -> bool + Send>;
    let mut attacks: Vec<(&str, Attack)> = vec![
        (
            "random bytes",
            Box::new(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let bytes: Vec<u8> = pattern(3, 1000).flatten().collect();
                let _ = s.write_all(&bytes);
                closed_within(&mut s, DROPPED_WITHIN)
            }),
        ),
        (
            "length 65535 then nothing",
            Box::new(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(&[0xff, 0xff]).unwrap();
                closed_within(&mut s, DROPPED_WITHIN)
            }),
        ),
        (
            "truncated handshake",
            Box::new(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let first = first_message(&key, intent);
                s.write_all(&first[..first.len() / 2]).unwrap();
                closed_within(&mut s, DROPPED_WITHIN)
            }),
        ),
        (
            "handshake for the wrong key",
            Box::new(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(&first_message(&keypair(99).public(), intent)).unwrap();
                closed_within(&mut s, DROPPED_WITHIN)
            }),
        ),
        (
            "garbage after a valid handshake",
            Box::new(move || {
                let mut s = handshaken(addr, &key, intent);
                s.write_all(&[0, 20]).unwrap();
                s.write_all(&[0xAB; 20]).unwrap();
                closed_within(&mut s, DROPPED_WITHIN)
            }),
        ),
        (
            "one byte a second",
            Box::new(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let first = first_message(&key, intent);
                let start = Instant::now();
                for byte in first {
                    if s.write_all(&[byte]).is_err() {
                        break;
                    }
                    if closed_within(&mut s, Duration::from_secs(1)) {
                        return start.elapsed() < DROPPED_WITHIN;
                    }
                }
                false
            }),
        ),
        (
            "1,000 silent connections",
            Box::new(move || {
                // From another host (127.0.0.2): the registry caps what one
                // address may have waiting, and the other attacks here, from
                // 127.0.0.1, must still reach their handshakes.
                let mut conns: Vec<TcpStream> =
                    (0..1000).map(|_| connect_from([127, 0, 0, 2], addr)).collect();
                conns.iter_mut().all(|c| closed_within(c, DROPPED_WITHIN))
            }),
        ),
    ];
    if intent == Intent::Link {
        attacks.push((
            "authentic frames that make no sense (data on a stream never opened)",
            Box::new(move || {
                let (mut s, session) = established(addr, &key, intent);
                let (mut transport, _) = session.into_transport().unwrap();
                let mut sealed = Vec::new();
                // A link DATA frame (type 3) on stream 9, which was never opened.
                transport.seal(&[3, 0, 0, 0, 9, 1, 2, 3], &mut sealed).unwrap();
                s.write_all(&sealed).unwrap();
                closed_within(&mut s, DROPPED_WITHIN)
            }),
        ));
    }
    let threads: Vec<_> = attacks.into_iter().map(|(name, f)| (name, thread::spawn(f))).collect();
    threads.into_iter().filter_map(|(name, t)| (!t.join().unwrap()).then(|| name.to_owned())).collect()
}

#[test]
fn bad_peers_are_dropped_and_good_ones_unaffected() {
    let backend = http_backend("steady");
    let timeout = "2s";
    let reg = registry(&["--handshake-timeout", timeout]);
    let link_port = free_port();
    let listen = format!("127.0.0.1:{link_port}");
    let svc = service_with(
        &reg.target,
        backend,
        "steady@1.0.0",
        &["--listen", &listen, "--handshake-timeout", timeout],
    );
    let service_key: PublicKey = svc.lines()[0].rsplit(' ').next().unwrap().parse().unwrap();
    let (_proxy, port) = proxy(&reg.target, "steady", 1);
    let registry_key: PublicKey = reg.key.parse().unwrap();
    let registry_addr: SocketAddr = reg.target.split_once('@').unwrap().1.parse().unwrap();

    // Warm up, then measure the registry's memory.
    for _ in 0..20 {
        assert_eq!(http_get(port).0, 200);
    }
    let rss_before = reg.proc.rss_kib();

    // Legitimate traffic throughout: a request every 20 ms, each must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let legit = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match http_get(port) {
                    (200, body) if body == "steady" => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let at_registry = thread::spawn(move || attack(registry_addr, registry_key, Intent::Control));
    let at_service = attack(listen.parse().unwrap(), service_key, Intent::Link);
    let at_registry = at_registry.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    legit.join().unwrap();

    assert!(at_registry.is_empty(), "registry kept bad peers: {at_registry:?}");
    assert!(at_service.is_empty(), "service kept bad peers: {at_service:?}");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "legitimate requests failed during the attack ({ok} succeeded)");
    assert!(ok > 10, "legitimate traffic ran during the attack: {ok} requests");

    // Every bad session is gone, and memory came back to a bounded level.
    thread::sleep(Duration::from_secs(1));
    let rss_after = reg.proc.rss_kib();
    eprintln!("registry RSS: {rss_before} KiB before, {rss_after} KiB after 1,000+ hostile connections");
    assert!(rss_after < rss_before + 32 * 1024, "registry RSS grew from {rss_before} to {rss_after} KiB");
    assert_eq!(http_get(port), (200, "steady".to_owned()));
}
