//! Reliability with real processes on loopback: start in any order, services
//! killed or frozen, failover without a failed request, registry restarts,
//! backends going down, and graceful shutdown.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use seaport_tests::*;

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn any_start_order_works() {
    let backend = http_backend("late registry");
    let (seed, key) = new_seed();
    let listen = format!("127.0.0.1:{}", free_port());
    let target = format!("{key}@{listen}");
    // Service and proxy first: nothing listens at the registry's address yet.
    let svc = Proc::start("seaport-service", &[&target, "-p", &backend.to_string(), "-r", "late@1.0.0"], &[]);
    let port = free_port();
    let proxy = Proc::start("seaport-proxy", &[&target, "-p", &port.to_string(), "-r", "late"], &[]);
    svc.wait_log("registry not reachable", WAIT);
    proxy.wait_log("registry not reachable", WAIT);
    let _reg = Proc::start("seaport-registry", &["--seed", &seed, "--listen", &listen, "--no-dht"], &[]);
    svc.wait_line("registered service late@1.0.0", WAIT);
    proxy.wait_line("proxy from", WAIT);
    assert_eq!(http_get(port), (200, "late registry".to_owned()));
}

#[test]
fn killed_service_is_dropped_at_once() {
    let backend = http_backend("x");
    let reg = registry(&[]);
    let svc = service(&reg.target, backend, "victim@1.0.0");
    let (proxy, _) = proxy(&reg.target, "victim", 1);
    svc.signal("KILL");
    reg.proc.wait_log("unregistered", WAIT);
    proxy.wait_log("service gone from the registry", WAIT);
}

#[test]
fn frozen_service_is_dropped_within_the_idle_timeout() {
    let backend = http_backend("x");
    let reg = registry(&[]);
    let svc = service(&reg.target, backend, "frozen@1.0.0");
    let (proxy, _) = proxy(&reg.target, "frozen", 1);
    let frozen_at = Instant::now();
    svc.signal("STOP");
    // Default idle timeout 15 s, swept every second; the deadline leaves room for a loaded machine.
    reg.proc.wait_log("unregistered", Duration::from_secs(30));
    let took = frozen_at.elapsed();
    assert!(took >= Duration::from_secs(14), "dropped after {took:?}: before the idle timeout?");
    proxy.wait_log("service gone from the registry", WAIT);
    svc.signal("CONT");
}

#[test]
fn failover_loses_no_request() {
    let (a, b) = (http_backend("a"), http_backend("b"));
    let reg = registry(&[]);
    let sa = service(&reg.target, a, "ha@1.0.0");
    let _sb = service(&reg.target, b, "ha@1.0.1");
    let (_proxy, port) = proxy(&reg.target, "ha", 2);
    let mut seen = HashSet::new();
    for i in 0..200 {
        if i == 100 {
            assert_eq!(seen.len(), 2, "both instances served before the kill");
            // Between requests, so no request is in flight on it; the proxy
            // may not know yet, and must fail over on its own.
            sa.signal("KILL");
        }
        let (status, body) = http_get(port);
        assert_eq!(status, 200, "request {i} failed");
        seen.insert(body);
    }
}

#[test]
fn registry_restart_keeps_tunnels_and_everyone_comes_back() {
    let backend = bulk_backend();
    let web = http_backend("still here");
    let (seed, key) = new_seed();
    let listen = format!("127.0.0.1:{}", free_port());
    let target = format!("{key}@{listen}");
    let start_registry = || {
        let p = Proc::start("seaport-registry", &["--seed", &seed, "--listen", &listen, "--no-dht"], &[]);
        p.wait_line("Registry listening", WAIT);
        p
    };
    let reg = start_registry();
    let _bulk = service(&target, backend, "bulk@1.0.0");
    let _web = service(&target, web, "web@1.0.0");
    let (_pb, bulk_port) = proxy(&target, "bulk", 1);
    let (_pw, web_port) = proxy(&target, "web", 1);

    // A download that runs across the registry's death and return.
    let len = 64 * 1024 * 1024;
    let mut stream = TcpStream::connect(("127.0.0.1", bulk_port)).unwrap();
    std::io::Write::write_all(&mut stream, format!("DOWN 5 {len}\n").as_bytes()).unwrap();
    let mut first = vec![0u8; 1024 * 1024];
    stream.read_exact(&mut first).unwrap();

    reg.signal("KILL");
    drop(reg);
    // While it is gone, the proxy serves new connections from what it knew.
    assert_eq!(http_get(web_port), (200, "still here".to_owned()));

    let back = Instant::now();
    let reg = start_registry();
    let deadline = back + Duration::from_secs(10);
    while reg.count_log("registered peer") < 2 {
        assert!(Instant::now() < deadline, "services did not come back: {:#?}", reg.errors());
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("services re-registered {:?} after the registry's return", back.elapsed());

    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    first.extend_from_slice(&rest);
    assert_eq!(first.len(), len);
    assert_eq!(hex(&<sha2::Sha256 as sha2::Digest>::digest(&first)), pattern_sha256(5, len));
    assert_eq!(http_get(web_port), (200, "still here".to_owned()));
}

#[test]
fn a_registry_back_at_its_address_is_found_without_asking_the_dht() {
    let web = http_backend("cached");
    let (seed, key) = new_seed();
    let dht = free_udp_port().to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let reg =
        Proc::start("seaport-registry", &["--seed", &seed, "--listen", &listen, "--dht-port", &dht], &[]);
    reg.wait_line("Registry listening", WAIT);
    let bootstrap = format!("127.0.0.1:{dht}");
    let env = [("SEAPORT_BOOTSTRAP", bootstrap.as_str())];
    let svc = Proc::start("seaport-service", &[&key, "-p", &web.to_string(), "-r", "cached@1.0.0"], &env);
    svc.wait_line("registered service", WAIT);
    reg.signal("KILL");
    drop(reg);
    // Back where it was, but with no DHT node at all: only the address of
    // the service's last session can lead it there.
    let reg = Proc::start("seaport-registry", &["--seed", &seed, "--listen", &listen, "--no-dht"], &[]);
    reg.wait_line("Registry listening", WAIT);
    let deadline = Instant::now() + WAIT;
    while reg.count_log("registered peer") < 1 {
        assert!(Instant::now() < deadline, "the service did not come back: {:#?}", svc.errors());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn registry_found_again_through_the_dht_on_a_new_port() {
    let web = http_backend("moved");
    let (seed, key) = new_seed();
    let dht = free_udp_port().to_string();
    let start_registry = || {
        let listen = format!("127.0.0.1:{}", free_port());
        let p =
            Proc::start("seaport-registry", &["--seed", &seed, "--listen", &listen, "--dht-port", &dht], &[]);
        p.wait_line("Registry listening", WAIT);
        p
    };
    let reg = start_registry();
    let bootstrap = format!("127.0.0.1:{dht}");
    let env = [("SEAPORT_BOOTSTRAP", bootstrap.as_str())];
    let svc = Proc::start("seaport-service", &[&key, "-p", &web.to_string(), "-r", "moved@1.0.0"], &env);
    svc.wait_line("registered service", WAIT);
    let port = free_port();
    let proxy = Proc::start("seaport-proxy", &[&key, "-p", &port.to_string(), "-r", "moved"], &env);
    proxy.wait_line("proxy from", WAIT);

    reg.signal("KILL");
    drop(reg);
    let reg = start_registry();
    let deadline = Instant::now() + Duration::from_secs(30);
    while reg.count_log("registered peer") < 1 {
        assert!(Instant::now() < deadline, "service did not find the moved registry: {:#?}", svc.errors());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http_get(port), (200, "moved".to_owned()));
}

#[test]
fn backend_down_withdraws_and_back_registers_again() {
    let dir = std::env::temp_dir().join(format!("seaport-backend-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("index.html"), "backend up").unwrap();
    let backend_port = free_port();
    let backend = python_http(backend_port, &dir);
    let reg = registry(&[]);
    let svc = service_with(&reg.target, backend_port, "flaky@1.0.0", &["--check-interval", "200ms"]);
    let (proxy, port) = proxy_with(&reg.target, "flaky", 1, &["--connect-timeout", "1s"]);
    assert_eq!(http_get(port), (200, "backend up".to_owned()));

    drop(backend);
    svc.wait_log("backend is down", WAIT);
    reg.proc.wait_log("unregistered", WAIT);
    proxy.wait_log("service gone from the registry", WAIT);
    // Scripts see both changes on stdout, not only in the logs.
    let withdrawn = svc.wait_line("withdrew service flaky@1.0.0", WAIT);
    assert!(withdrawn.contains(&format!("backend 127.0.0.1:{backend_port} is down")), "{withdrawn}");
    proxy.wait_line("lost service", WAIT);
    // No instance: the client is closed after the connect timeout, never sent to the dead backend.
    assert_eq!(http_get(port).0, 0);

    let _backend = python_http(backend_port, &dir);
    svc.wait_log("backend is back", WAIT);
    let deadline = Instant::now() + WAIT;
    while svc.count("registered service") < 2 {
        assert!(Instant::now() < deadline, "not registered again: {:#?}", svc.lines());
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.wait_line("found service", WAIT);
    let deadline = Instant::now() + WAIT;
    while http_get(port).0 != 200 {
        assert!(Instant::now() < deadline, "proxy did not use the instance again");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_unregisters_first_and_drains_open_tunnels() {
    let backend = bulk_backend();
    let reg = registry(&[]);
    let mut svc = service(&reg.target, backend, "drain@1.0.0");
    let (mut proxy, port) = proxy(&reg.target, "drain", 1);
    let len = 32 * 1024 * 1024;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut stream, format!("DOWN 9 {len}\n").as_bytes()).unwrap();
    let mut data = vec![0u8; 1024 * 1024];
    stream.read_exact(&mut data).unwrap();

    svc.signal("TERM");
    reg.proc.wait_log("unregistered", WAIT);
    // The open tunnel finishes although the service is shutting down.
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    data.extend_from_slice(&rest);
    assert_eq!(data.len(), len);
    assert_eq!(hex(&<sha2::Sha256 as sha2::Digest>::digest(&data)), pattern_sha256(9, len));
    assert_eq!(svc.wait_exit(WAIT), Some(0), "{:#?}", svc.errors());

    proxy.signal("INT");
    assert_eq!(proxy.wait_exit(WAIT), Some(0), "{:#?}", proxy.errors());
}

#[test]
fn links_fail_over_when_an_instance_dies() {
    let (a, b) = (http_backend("a"), http_backend("b"));
    let reg = registry(&[]);
    let sa = service(&reg.target, a, "warm@1.0.0");
    let sb = service(&reg.target, b, "warm@1.0.1");
    let (proxy, port) = proxy(&reg.target, "warm", 2);
    let mut seen = HashSet::new();
    for i in 0..60 {
        if i == 30 {
            assert_eq!(seen.len(), 2, "both instances served over their links");
            // Its link is now dead: the proxy must notice and fail over.
            sa.signal("KILL");
        }
        let (status, body) = http_get(port);
        assert_eq!(status, 200, "request {i} failed: {body}");
        seen.insert(body);
        std::thread::sleep(Duration::from_millis(20));
    }
    // One link per instance, reused by every request: the survivor saw one.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(proxy.count_log("via direct"), 2, "{:#?}", proxy.errors());
    assert_eq!(sb.count_log("link ended"), 0, "{:#?}", sb.errors());
    assert_eq!(proxy.count_log("every instance failed"), 0, "{:#?}", proxy.errors());
}

#[test]
fn a_stream_cut_mid_transfer_reaches_the_client_as_a_reset() {
    let backend = bulk_backend();
    let reg = registry(&[]);
    let svc = service(&reg.target, backend, "bulk@1.0.0");
    let (_proxy, port) = proxy(&reg.target, "bulk", 1);
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(format!("DOWN 1 {}\n", 1u64 << 40).as_bytes()).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < 1 << 20 {
        got += stream.read(&mut buf).unwrap();
    }
    // The service dies mid-transfer: its link is lost, and the stream with it.
    svc.signal("KILL");
    let ended = loop {
        match stream.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(e),
        }
    };
    let err = ended.expect_err("a cut transfer must not look like a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[test]
fn a_backend_not_up_yet_is_waited_for_not_withdrawn() {
    // A service started before its backend: nothing was registered, so
    // nothing is withdrawn; it says what it waits for, then registers.
    let dir = std::env::temp_dir().join(format!("seaport-late-backend-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("index.html"), "late").unwrap();
    let backend_port = free_port();
    let reg = registry(&[]);
    let port = backend_port.to_string();
    let args = [reg.target.as_str(), "-p", &port, "-r", "late@1.0.0", "--check-interval", "200ms"];
    let svc = Proc::start("seaport-service", &args, &[]);
    svc.wait_log("does not answer", WAIT);
    let _backend = python_http(backend_port, &dir);
    svc.wait_line("registered service late@1.0.0", WAIT);
    assert_eq!(svc.count("withdrew"), 0, "nothing was withdrawn: {:#?}", svc.lines());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Registries of one seed on loopback, without DHT, each at its own port:
/// the members of a static set.
struct Set {
    seed: String,
    key: String,
    listens: Vec<String>,
    members: Vec<Proc>,
}

impl Set {
    fn start(n: usize) -> Set {
        let (seed, key) = new_seed();
        let listens: Vec<String> = (0..n).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let mut set = Set { seed, key, listens, members: Vec::new() };
        set.members = (0..n).map(|i| set.member(i)).collect();
        set
    }

    /// Starts member `i` at its address.
    fn member(&self, i: usize) -> Proc {
        let args = ["--listen", self.listens[i].as_str(), "--no-dht"];
        let p = Proc::start("seaport-registry", &args, &[("SEAPORT_REGISTRY_SEED", &self.seed)]);
        p.wait_line("Registry listening", WAIT);
        p
    }

    /// `KEY@HOST:PORT,HOST:PORT,...`
    fn target(&self) -> String {
        format!("{}@{}", self.key, self.listens.join(","))
    }

    /// Waits until each member holds `n` registrations.
    fn wait_registered(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        for member in &self.members {
            while member.count_log("registered peer") < n {
                assert!(Instant::now() < deadline, "a member lacks registrations: {:#?}", member.errors());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[test]
fn a_set_of_three_fails_nothing_while_one_is_killed_and_another_restarted() {
    let mut set = Set::start(3);
    let target = set.target();
    let (web, bulk) = (http_backend("from the set"), bulk_backend());
    let _web_svc = service(&target, web, "web@1.0.0");
    let _bulk_svc = service(&target, bulk, "bulk@1.0.0");
    set.wait_registered(2);
    let bulk_port = free_port();
    let (web_proxy, port) = proxy_with(&target, "web", 2, &["--map", &format!("bulk@1={bulk_port}")]);
    let deadline = Instant::now() + WAIT;
    while web_proxy.count("connected to registry at") < 3 {
        assert!(
            Instant::now() < deadline,
            "the proxy has no session with each registry: {:#?}",
            web_proxy.lines()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    const LEN: usize = 200 << 20;
    let download = std::thread::spawn(move || download(bulk_port, 21, LEN));
    for i in 0..1000 {
        if i == 300 {
            set.members[0].signal("KILL");
        }
        if i == 600 {
            set.members[1].signal("TERM");
            set.members[1].wait_exit(WAIT);
            set.members[1] = set.member(1);
        }
        let (status, body) = http_get(port);
        assert_eq!((status, body.as_str()), (200, "from the set"), "request {i} failed");
    }
    let (len, sha) = download.join().unwrap();
    assert_eq!(len, LEN);
    assert_eq!(sha, pattern_sha256(21, LEN), "the download is intact");
    assert_eq!(web_proxy.count("lost service"), 0, "{:#?}", web_proxy.lines());

    // The restarted member is repopulated by the clients' reconnects, and a
    // proxy started now finds the service through the members left.
    while set.members[1].count_log("registered peer") < 2 {
        assert!(Instant::now() < deadline + WAIT, "not repopulated: {:#?}", set.members[1].errors());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_late, late_port) = proxy(&target, "web", 1);
    assert_eq!(http_get(late_port), (200, "from the set".to_owned()));
}

#[test]
fn a_set_found_through_a_private_dht_survives_a_member_killed() {
    let web = http_backend("through the dht");
    let (seed, key) = new_seed();
    let dht: Vec<String> = (0..3).map(|_| free_udp_port().to_string()).collect();
    let first_dht = format!("127.0.0.1:{}", dht[0]);
    let mut members: Vec<Proc> = (0..3)
        .map(|i| {
            let listen = format!("127.0.0.1:{}", free_port());
            let mut args = vec!["--listen", listen.as_str(), "--dht-port", dht[i].as_str()];
            // Each DHT node of a member knows the first: one private DHT.
            if i > 0 {
                args.extend(["--bootstrap", first_dht.as_str()]);
            }
            let p = Proc::start("seaport-registry", &args, &[("SEAPORT_REGISTRY_SEED", &seed)]);
            p.wait_line("Registry listening", WAIT);
            p
        })
        .collect();
    let bootstrap: Vec<String> = dht.iter().map(|d| format!("127.0.0.1:{d}")).collect();
    let bootstrap = bootstrap.join(",");
    let env = [("SEAPORT_BOOTSTRAP", bootstrap.as_str())];
    let svc = Proc::start("seaport-service", &[&key, "-p", &web.to_string(), "-r", "dht@1.0.0"], &env);
    svc.wait_line("registered service", WAIT);
    let port = free_port();
    let proxy = Proc::start("seaport-proxy", &[&key, "-p", &port.to_string(), "-r", "dht"], &env);
    // Given only the key, each client follows all three.
    let deadline = Instant::now() + Duration::from_secs(40);
    for client in [&svc, &proxy] {
        while client.count_log("following 3 registries of the set") < 1 {
            assert!(Instant::now() < deadline, "not all three found: {:#?}", client.errors());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    proxy.wait_line("proxy from", WAIT);
    assert_eq!(http_get(port), (200, "through the dht".to_owned()));

    members[0].signal("KILL");
    members.remove(0);
    // A proxy started after the kill still reaches the service, through the
    // members left (the dead one's entry is still in the record for a while).
    let late_port = free_port();
    let late = Proc::start("seaport-proxy", &[&key, "-p", &late_port.to_string(), "-r", "dht"], &env);
    late.wait_line("proxy from", Duration::from_secs(40));
    assert_eq!(http_get(late_port), (200, "through the dht".to_owned()));
    assert_eq!(http_get(port), (200, "through the dht".to_owned()));
}

/// Kills the TCP connections whose remote port is `port` (`ss -K`, which
/// needs root): to the process on the other side they are cut, as by a
/// NAT that forgot them or a path that went away. Returns how many it cut.
fn cut_connections_to(port: u16) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-K", "-t", "state", "established", "dport", "=", &format!(":{port}")])
        .output()
        .expect("ss runs");
    assert!(out.status.success(), "ss -K failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(&format!(":{port}"))).count()
}

/// Whether sockets can be cut from outside here (root); under
/// `SEAPORT_NETLAB=require` (CI) they must be.
fn can_cut_connections() -> bool {
    let root = rustix::process::geteuid().is_root();
    assert!(
        root || std::env::var("SEAPORT_NETLAB").as_deref() != Ok("require"),
        "SEAPORT_NETLAB=require, but cutting connections (ss -K) needs root"
    );
    if !root {
        eprintln!("skipped: cutting a link's connection from outside (ss -K) needs root");
    }
    root
}

#[test]
fn a_download_survives_its_link_connection_cut_again_and_again() {
    if !can_cut_connections() {
        return;
    }
    let backend = bulk_backend();
    let reg = registry(&[]);
    let link_port = free_port();
    let svc =
        service_with(&reg.target, backend, "bulk@1.0.0", &["--listen", &format!("127.0.0.1:{link_port}")]);
    let (proxy, port) = proxy(&reg.target, "bulk", 1);

    const LEN: usize = 300 << 20;
    let download = std::thread::spawn(move || download(port, 33, LEN));
    proxy.wait_log("via direct", WAIT);
    let mut cuts = 0;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        if download.is_finished() {
            break;
        }
        cuts += cut_connections_to(link_port);
        // Each cut is resumed on a new connection before the next.
        let deadline = Instant::now() + WAIT;
        while proxy.count_log("moved to direct") < cuts {
            assert!(Instant::now() < deadline, "the link did not resume: {:#?}", proxy.errors());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let (len, sha) = download.join().unwrap();
    assert!(cuts >= 1, "the download ended before any cut");
    assert_eq!(len, LEN);
    assert_eq!(sha, pattern_sha256(33, LEN), "every byte arrived once, in order");
    assert_eq!(proxy.count_log("via direct"), 1, "one link, resumed, not replaced: {:#?}", proxy.errors());
    assert_eq!(proxy.count_log("down:"), 0, "{:#?}", proxy.errors());
    assert_eq!(svc.count_log("link resumed on a new connection"), cuts, "{:#?}", svc.errors());
}
