//! Attacks on who a peer is and on the registry's capacity, with the real
//! binaries: a replayed first handshake message, one identity run by two
//! processes, and silent connections from one host.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use seaport_proto::hello::{Intent, Stamp};
use seaport_proto::keys::{Keypair, PublicKey, Seed};
use seaport_proto::message::Message;
use seaport_proto::role::Role;
use seaport_proto::session::Session;
use seaport_tests::*;

const WAIT: Duration = Duration::from_secs(20);

/// A control session driven by hand on a blocking stream.
struct Raw {
    stream: TcpStream,
    session: Session,
}

impl Raw {
    /// Reads until `done` holds for the session, or the stream ends.
    fn read_until(&mut self, done: impl Fn(&Session) -> bool) {
        let mut buf = [0u8; 4096];
        self.stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        while !done(&self.session) {
            let n = self.stream.read(&mut buf).unwrap();
            assert!(n > 0, "the registry closed the session");
            self.session.handle_input(Instant::now(), &buf[..n]).unwrap();
        }
    }

    fn request(&mut self, msg: &Message) -> Message {
        let mut plain = Vec::new();
        msg.encode(&mut plain).unwrap();
        self.session.send(&plain).unwrap();
        let mut wire = Vec::new();
        self.session.poll_transmit(&mut wire);
        self.stream.write_all(&wire).unwrap();
        let mut got = None;
        while got.is_none() {
            let mut buf = [0u8; 4096];
            let n = self.stream.read(&mut buf).unwrap();
            assert!(n > 0, "the registry closed the session");
            self.session.handle_input(Instant::now(), &buf[..n]).unwrap();
            got = self.session.poll_message();
        }
        Message::decode(&got.unwrap()).unwrap()
    }
}

#[test]
fn a_replayed_first_message_leaves_the_real_session_and_its_registrations_in_place() {
    let reg = registry(&[]);
    let addr: SocketAddr = reg.target.split_once('@').unwrap().1.parse().unwrap();
    let registry_key: PublicKey = reg.key.parse().unwrap();
    let me = keypair(21);
    let stamp = Some(Stamp { process: 42, counter: 1 });
    let mut session = Session::initiate_stamped(
        Instant::now(),
        &me,
        &registry_key,
        Intent::Control,
        [5; 32],
        Duration::from_secs(5),
        stamp,
    )
    .unwrap();
    let mut first = Vec::new();
    session.poll_transmit(&mut first);
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(&first).unwrap();
    let mut real = Raw { stream, session };
    real.read_until(Session::is_established);
    let backend = http_backend("real");
    let role = Role::parse("real@1.0.0").unwrap();
    let answer = real.request(&Message::Register { id: 0, role, port: backend, addrs: vec![] });
    assert_eq!(answer, Message::Registered { id: 0 });

    // The captured first message, replayed: each connection is dropped
    // without a byte of answer.
    for _ in 0..50 {
        let mut replay = TcpStream::connect(addr).unwrap();
        replay.write_all(&first).unwrap();
        replay.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        match replay.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("a replay got {other:?}"),
        }
    }
    // The real session is alive, and its registration in place.
    assert_eq!(real.request(&Message::Ping { nonce: 9 }), Message::Pong { nonce: 9 });
    let finder = Proc::start("seaport-proxy", &[&reg.target, "-p", "0", "-r", "real"], &[]);
    let found = finder.wait_line("found service", WAIT);
    assert!(found.contains(&me.public().to_string()), "{found}");
    assert_eq!(reg.proc.count_log("superseded"), 0, "{:#?}", reg.proc.errors());
}

#[test]
fn services_sharing_a_seed_file_coexist() {
    let reg = registry(&[]);
    let (seed, _) = new_seed();
    let file = std::env::temp_dir().join(format!("seaport-shared-seed-{}", std::process::id()));
    let _ = std::fs::remove_file(&file);
    std::fs::write(&file, format!("{seed}\n")).unwrap();
    let file = file.to_str().unwrap();
    let couch = service_with(&reg.target, http_backend("couch"), "couch@3.2.2", &["--seed-file", file]);
    let redis = service_with(&reg.target, http_backend("redis"), "redis@7.0.0", &["--seed-file", file]);
    // One proxy serving both roles: each port must reach its own process
    // (and backend), though both processes have one key.
    let (couch_port, redis_port) = (free_port(), free_port());
    let (couch_map, redis_map) = (format!("couch@3={couch_port}"), format!("redis@7={redis_port}"));
    let both = Proc::start("seaport-proxy", &[&reg.target, "--map", &couch_map, "--map", &redis_map], &[]);
    let deadline = Instant::now() + WAIT;
    while both.count("found service") < 2 {
        assert!(Instant::now() < deadline, "{:#?}", both.lines());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(both.count("connected to registry"), 1, "one session for both roles");
    // Long enough for a supersede loop to show (it took a fraction of a second).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(couch.count("registered service"), 1, "{:#?}", couch.lines());
    assert_eq!(redis.count("registered service"), 1, "{:#?}", redis.lines());
    assert_eq!(reg.proc.count_log("superseded"), 0);
    for _ in 0..5 {
        assert_eq!(http_get(couch_port), (200, "couch".to_owned()));
        assert_eq!(http_get(redis_port), (200, "redis".to_owned()));
    }
    let links = both.count_log("link to");
    assert_eq!(links, 2, "one link per service process: {:#?}", both.errors());
}

#[test]
fn silent_connections_from_one_host_do_not_keep_a_service_out() {
    let reg = registry(&["--max-sessions", "50"]);
    let addr: SocketAddr = reg.target.split_once('@').unwrap().1.parse().unwrap();
    // 60 connections from another host (127.0.0.2) that never say a word.
    let _silent: Vec<TcpStream> = (0..60).map(|_| connect_from([127, 0, 0, 2], addr)).collect();
    let started = Instant::now();
    let svc = service(&reg.target, http_backend("in"), "in@1.0.0");
    eprintln!("registered {:?} after the silent connections", started.elapsed());
    assert_eq!(svc.count("registered service"), 1);
    let (_proxy, port) = proxy(&reg.target, "in", 1);
    assert_eq!(http_get(port), (200, "in".to_owned()));
    // The refusals were logged, but not one line each.
    let refused = reg.proc.count_log("refused");
    assert!((1..=3).contains(&refused), "{refused} refusal lines: {:#?}", reg.proc.errors());
}

/// A backend that counts connections and holds each open until its client
/// ends its side.
fn holding_backend() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            seen.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || while matches!(stream.read(&mut [0u8; 64]), Ok(n) if n > 0) {});
        }
    });
    (port, count)
}

#[test]
fn a_proxy_holds_no_more_streams_than_the_service_allows_it() {
    use std::sync::atomic::Ordering;
    let reg = registry(&[]);
    let (backend, connections) = holding_backend();
    // The health check connects too: once, at start, with this interval.
    let _svc = service_with(
        &reg.target,
        backend,
        "hold@1.0.0",
        &["--max-streams-per-proxy", "5", "--check-interval", "1h"],
    );
    let (_proxy, port) = proxy(&reg.target, "hold", 1);
    let before = connections.load(Ordering::SeqCst);
    let clients: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.write_all(b"x").unwrap();
            c
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while connections.load(Ordering::SeqCst) - before < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Room for any sixth to show up, were the cap not kept.
    std::thread::sleep(Duration::from_secs(1));
    let held = connections.load(Ordering::SeqCst) - before;
    assert_eq!(held, 5, "the backend holds {held} connections for one proxy capped at 5");
    // Once its streams end, the proxy may open new ones.
    drop(clients);
    std::thread::sleep(Duration::from_millis(500));
    let mut again = TcpStream::connect(("127.0.0.1", port)).unwrap();
    again.write_all(b"y").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while connections.load(Ordering::SeqCst) - before <= held && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(connections.load(Ordering::SeqCst) - before > held, "a new stream after the old ones ended");
}

#[test]
fn a_link_handshake_alone_never_touches_the_backend_even_replayed() {
    use std::sync::atomic::Ordering;
    let reg = registry(&[]);
    let (backend, connections) = holding_backend();
    let link_port = free_port();
    let listen = format!("127.0.0.1:{link_port}");
    let svc =
        service_with(&reg.target, backend, "quiet@1.0.0", &["--listen", &listen, "--check-interval", "1h"]);
    let service_key: PublicKey = svc.lines()[0].rsplit(' ').next().unwrap().parse().unwrap();
    let before = connections.load(Ordering::SeqCst);
    // A stranger's complete link handshake, then its first message replayed
    // 20 times: no stream was opened, so no backend connection may follow.
    let stranger = keypair(33);
    let mut session = Session::initiate(
        Instant::now(),
        &stranger,
        &service_key,
        Intent::Link,
        [6; 32],
        Duration::from_secs(5),
    )
    .unwrap();
    let mut first = Vec::new();
    session.poll_transmit(&mut first);
    let mut attempts = Vec::new();
    for _ in 0..21 {
        let mut s = TcpStream::connect(&listen).unwrap();
        s.write_all(&first).unwrap();
        attempts.push(s);
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(connections.load(Ordering::SeqCst), before, "a handshake reached the backend");
    drop(attempts);
    // The service still serves real proxies.
    let (_proxy, port) = proxy(&reg.target, "quiet", 1);
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"hello").unwrap();
    let deadline = Instant::now() + WAIT;
    while connections.load(Ordering::SeqCst) == before {
        assert!(Instant::now() < deadline, "a real stream never reached the backend");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A service whose link port is `127.0.0.1:PORT`, with its key.
fn service_on_known_port(reg: &Registry, backend: u16, role: &str) -> (Proc, SocketAddr, PublicKey) {
    let link: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let svc = service_with(&reg.target, backend, role, &["--listen", &link.to_string()]);
    let key: PublicKey = svc.lines()[0].rsplit(' ').next().unwrap().parse().unwrap();
    (svc, link, key)
}

#[test]
fn a_replayed_link_hello_takes_no_link_from_its_proxy() {
    // The attack: the first message of an allowed proxy's link handshake,
    // replayed 64 times (the links one proxy key may hold) to the service's
    // link port. Each is answered; none may cost the real proxy a link.
    let backend = http_backend("mine");
    let reg = registry(&[]);
    let (seed, proxy_key) = new_seed();
    let (_svc, link, service_key) = service_on_known_port(&reg, backend, "mine@1.0.0");
    let me = Keypair::from_seed(&seed.parse::<Seed>().unwrap());
    assert_eq!(me.public().to_string(), proxy_key);
    let mut hello = Vec::new();
    Session::initiate(Instant::now(), &me, &service_key, Intent::Link, [5; 32], WAIT)
        .unwrap()
        .poll_transmit(&mut hello);
    // From four hosts, so that no source's share of handshakes under way
    // is what stops them.
    let mut replays: Vec<TcpStream> = (0..64u8)
        .map(|i| {
            let mut s = connect_from([127, 0, 0, 3 + i % 4], link);
            s.write_all(&hello).unwrap();
            s
        })
        .collect();
    // Each replay is answered: the service cannot tell it from the proxy.
    for s in &mut replays {
        let mut reply = [0u8; 256];
        s.set_read_timeout(Some(WAIT)).unwrap();
        assert!(s.read(&mut reply).unwrap() > 0, "no handshake reply");
    }
    let port = free_port();
    let args = [reg.target.as_str(), "-p", &port.to_string(), "-r", "mine@1"].map(str::to_owned);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = Proc::start("seaport-proxy", &args, &[("SEAPORT_SEED", &seed)]);
    proxy.wait_line("proxy from", WAIT);
    for _ in 0..3 {
        assert_eq!(http_get(port), (200, "mine".to_owned()), "{:#?}", proxy.errors());
    }
    drop(replays);
}

#[test]
fn silent_connections_to_a_link_port_are_capped_per_source() {
    // The attack: silent TCP connections to a service's link port, as many
    // as one host can open; each used to be held for the handshake timeout.
    let backend = http_backend("steady");
    let reg = registry(&[]);
    let (svc, link, _) = service_on_known_port(&reg, backend, "steady@1.0.0");
    let mut silent: Vec<TcpStream> = (0..200).map(|_| connect_from([127, 0, 0, 4], link)).collect();
    std::thread::sleep(Duration::from_millis(300));
    // Past its share, the source's connections are closed at once.
    let closed = silent
        .iter_mut()
        .rev()
        .take(100)
        .filter_map(|s| closed_within(s, Duration::from_millis(500)).then_some(()))
        .count();
    assert_eq!(closed, 100, "the newest 100 of 200 silent connections from one source were closed at once");
    // Another source is still served.
    let (_proxy, port) = proxy(&reg.target, "steady", 1);
    assert_eq!(http_get(port), (200, "steady".to_owned()), "{:#?}", svc.errors());
}

#[test]
fn a_link_peer_that_opens_with_any_authentic_frame_is_served() {
    // What the service asks of a proxy before it charges its key is an
    // authentic first record, whatever frame it holds: a peer driven by
    // hand (as an older or another implementation would be) that opens
    // with a single PING, and no window raise, is answered.
    use seaport_proto::link::Frame;
    use seaport_proto::record::RecordDecoder;
    let backend = http_backend("any");
    let reg = registry(&[]);
    let (_svc, link, service_key) = service_on_known_port(&reg, backend, "any@1.0.0");
    let mut stream = TcpStream::connect(link).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut session =
        Session::initiate(Instant::now(), &keypair(40), &service_key, Intent::Link, [4; 32], WAIT).unwrap();
    let mut wire = Vec::new();
    session.poll_transmit(&mut wire);
    stream.write_all(&wire).unwrap();
    let mut buf = [0u8; 4096];
    while !session.is_established() {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the service closed during the handshake");
        session.handle_input(Instant::now(), &buf[..n]).unwrap();
    }
    let (mut transport, leftover) = session.into_transport().unwrap();
    let mut ping = Vec::new();
    Frame::Ping { nonce: 77 }.encode(&mut ping);
    let mut sealed = Vec::new();
    transport.seal(&ping, &mut sealed).unwrap();
    stream.write_all(&sealed).unwrap();
    let mut decoder = RecordDecoder::new();
    decoder.push(&leftover);
    let deadline = Instant::now() + WAIT;
    loop {
        while let Some(body) = decoder.next_record() {
            let mut plain = Vec::new();
            transport.open(body, &mut plain).unwrap();
            if Frame::decode(&plain).unwrap() == (Frame::Pong { nonce: 77 }) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no PONG: the link was not served");
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the service closed the link");
        assert_eq!(decoder.push(&buf[..n]), n);
    }
}
