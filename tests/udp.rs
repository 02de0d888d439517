//! UDP through seaport with real programs nobody here wrote: `dnsmasq`
//! behind a service and `dig` through a proxy; datagrams of every size up
//! to the largest; a service forwarding TCP and UDP under one role on one
//! link; a flood of client addresses against the flow caps; and the word a
//! user gets for mixing TCP and UDP up.
//!
//! The DNS test needs `dnsmasq` (Debian `dnsmasq-base`) and `dig` (Debian
//! `bind9-dnsutils`); where they are missing it skips, saying so, unless
//! `SEAPORT_TOOLS=require` (set by `.ci/run`), where that is a failure.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use seaport_tests::*;

const WAIT: Duration = Duration::from_secs(20);

/// A proxy with `maps` (`--map` values), once it found `services` instances.
fn proxy_maps(target: &str, maps: &[String], services: usize, extra: &[&str]) -> Proc {
    let mut args = vec![target.to_owned()];
    for map in maps {
        args.extend(["--map".to_owned(), map.clone()]);
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = Proc::start("seaport-proxy", &args, &[]);
    wait_found(&p, services);
    p
}

/// Answers every datagram with the datagram itself; runs until the test ends.
fn udp_echo() -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    });
    port
}

/// A client socket talking to `to`.
fn client(to: SocketAddr) -> UdpSocket {
    let bind: SocketAddr =
        if to.is_ipv4() { "127.0.0.1:0".parse().unwrap() } else { "[::1]:0".parse().unwrap() };
    let c = UdpSocket::bind(bind).unwrap();
    c.connect(to).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c
}

/// Sends `bytes` and waits for the echo (retrying: UDP may lose one).
fn echoed(c: &UdpSocket, bytes: &[u8]) -> Vec<u8> {
    let mut back = vec![0u8; 65536];
    for _ in 0..5 {
        c.send(bytes).unwrap();
        if let Ok(n) = c.recv(&mut back) {
            return back[..n].to_vec();
        }
    }
    panic!("no echo of {} bytes", bytes.len());
}

/// dnsmasq answering a.example.lan and b.example.lan on a free port, once
/// it says it started. It listens on TCP as well as UDP at that port, and a
/// port free for UDP may be taken for TCP by another test's connection: a
/// start that fails so is tried again on another port (without this, 1,000
/// queries to nobody held the test for dig's timeouts, 50 minutes).
fn start_dnsmasq(dnsmasq: &str) -> (Proc, u16) {
    for _ in 0..5 {
        let port = free_udp_port();
        let mut cmd = Command::new(dnsmasq);
        cmd.args(["--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces"])
            .args(["--listen-address=127.0.0.1", &format!("--port={port}"), "--log-facility=-"])
            .args(["--address=/a.example.lan/10.0.0.1", "--address=/b.example.lan/10.0.0.2"]);
        // As root dnsmasq would drop to `nobody`, which may not exist in a container.
        if rustix::process::geteuid().is_root() {
            cmd.arg("--user=root");
        }
        let proc = Proc::spawn("dnsmasq", cmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let log = proc.errors();
            if log.iter().any(|l| l.contains("started")) {
                return (proc, port);
            }
            if log.iter().any(|l| l.contains("failed")) {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("dnsmasq did not start on port {port}, trying another: {:#?}", proc.errors());
    }
    panic!("dnsmasq did not start on any of five free ports");
}

#[test]
fn dns_through_seaport_answers_every_query_and_each_client_its_own() {
    let (Some(dnsmasq), Some(dig)) =
        (tool("/usr/sbin/dnsmasq", "dnsmasq-base"), tool("/usr/bin/dig", "bind9-dnsutils"))
    else {
        return;
    };
    let (_dnsmasq, dns_port) = start_dnsmasq(&dnsmasq);
    let reg = registry(&[]);
    let svc = service_with(&reg.target, dns_port, "dns@1.0.0", &["--udp"]);
    let port = free_udp_port();
    let proxy = proxy_maps(&reg.target, &[format!("dns@1={port}/udp")], 1, &[]);

    // Two clients at once, 500 queries each, every query from a new
    // source port (a new flow): each gets its own name's answer, always.
    let batch = move |name: &str| {
        let queries = std::env::temp_dir().join(format!("seaport-dig-{}-{name}", std::process::id()));
        std::fs::write(&queries, format!("{name} A\n").repeat(500)).unwrap();
        let out = Command::new(&dig)
            .args(["@127.0.0.1", "-p", &port.to_string(), "+short", "+tries=3", "+time=2", "-f"])
            .arg(&queries)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&queries);
        String::from_utf8(out.stdout).unwrap()
    };
    let a = thread::spawn({
        let batch = batch.clone();
        move || batch("a.example.lan")
    });
    let b = batch("b.example.lan");
    let a = a.join().unwrap();
    for (answers, expected) in [(&a, "10.0.0.1"), (&b, "10.0.0.2")] {
        // dig's own ";;" notes aside: a query retried after a datagram was
        // lost gets two answers, and the second reaches a later query's
        // socket as an "ID mismatch" that dig reports and ignores.
        let lines: Vec<&str> = answers.lines().filter(|l| !l.starts_with(";;")).collect();
        assert_eq!(lines.len(), 500, "every query answered: {answers}");
        assert!(lines.iter().all(|l| *l == expected), "each client its own answer: {answers}");
    }
    assert!(proxy.errors().iter().all(|l| !l.contains("ERROR")), "{:#?}", proxy.errors());
    drop(svc);
}

#[test]
fn datagrams_arrive_whole_up_to_the_largest_and_an_overlarge_one_is_refused_and_counted() {
    let reg = registry(&[]);
    let _svc = service_with(&reg.target, udp_echo(), "echo@1.0.0", &["--udp"]);
    // On ::1, where UDP carries more than a link's largest datagram.
    let (port, metrics) = (free_udp_port(), free_port());
    let _proxy = proxy_maps(
        &reg.target,
        &[format!("echo@1={port}/udp")],
        1,
        &["--bind", "::1", "--metrics", &format!("127.0.0.1:{metrics}")],
    );
    let c = client(format!("[::1]:{port}").parse().unwrap());
    for len in [0, 1, 512, 1400, 9000, 65_507] {
        let sent: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(echoed(&c, &sent), sent, "{len} bytes whole");
    }
    // 65,508 bytes: valid UDP over IPv6, too large for a link. Refused
    // whole (never cut), counted, and the flow goes on.
    c.send(&vec![1u8; 65_508]).unwrap();
    scrape_until(metrics, "the overlarge datagram counted", |s| {
        sample(s, "seaport_datagrams_dropped_total{reason=\"too_large\"}") == 1.0
    });
    assert_eq!(echoed(&c, b"still here"), b"still here");
}

#[test]
fn tcp_and_udp_of_one_role_share_a_link_and_a_flood_of_clients_is_capped() {
    let tcp_port = http_backend("tcp beside udp");
    let reg = registry(&[]);
    let svc_metrics = free_port();
    let udp_port = udp_echo().to_string();
    let svc = service_with(
        &reg.target,
        tcp_port,
        "both@1.0.0",
        &["--udp-port", &udp_port, "--metrics", &format!("127.0.0.1:{svc_metrics}")],
    );
    let (tcp, udp, metrics) = (free_port(), free_udp_port(), free_port());
    let proxy = proxy_maps(
        &reg.target,
        &[format!("both@1={tcp}"), format!("both@1={udp}/udp")],
        2,
        &["--max-flows", "50", "--metrics", &format!("127.0.0.1:{metrics}")],
    );
    let target: SocketAddr = format!("127.0.0.1:{udp}").parse().unwrap();
    assert_eq!(echoed(&client(target), b"udp"), b"udp");
    assert_eq!(http_get(tcp), (200, "tcp beside udp".into()));
    let s = scrape(metrics);
    let links: f64 = ["direct", "punched", "relayed"]
        .iter()
        .map(|p| sample(&s, &format!("seaport_links_total{{path=\"{p}\"}}")))
        .sum();
    assert_eq!(links, 1.0, "one link carries the role's TCP and UDP");

    // 500 client addresses at once, 20 datagrams each: the proxy serves
    // at most 50 flows, drops (and counts) the rest; TCP requests on the
    // same link keep being answered meanwhile.
    let flood = thread::spawn(move || {
        let clients: Vec<UdpSocket> = (0..500).map(|_| client(target)).collect();
        for round in 0..20u8 {
            for c in &clients {
                let _ = c.send(&[round; 200]);
            }
        }
    });
    let mut latencies = Vec::new();
    while !flood.is_finished() || latencies.len() < 20 {
        let started = Instant::now();
        assert_eq!(http_get(tcp), (200, "tcp beside udp".into()));
        latencies.push(started.elapsed());
    }
    flood.join().unwrap();
    latencies.sort();
    eprintln!(
        "TCP request during the flood: p50 {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies.last().unwrap()
    );
    let s = scrape_until(metrics, "flows beyond the cap dropped", |s| {
        sample(s, "seaport_datagrams_dropped_total{reason=\"flow_limit\"}") > 0.0
    });
    assert!(sample(&s, "seaport_udp_flows") <= 50.0, "{s:#?}");
    assert!(sample(&s, "seaport_udp_flows_opened_total") <= 51.0, "{s:#?}");
    let served = scrape(svc_metrics);
    assert!(sample(&served, "seaport_udp_flows") <= 50.0, "{served:#?}");
    assert!(svc.rss_kib() < 64 * 1024, "service RSS {} KiB", svc.rss_kib());
    drop(proxy);
}

#[test]
fn a_port_of_the_other_protocol_says_what_to_do() {
    let reg = registry(&[]);
    let _udp = service_with(&reg.target, udp_echo(), "dns@1.0.0", &["--udp"]);
    let _tcp = service_with(&reg.target, http_backend("web"), "web@1.0.0", &[]);
    let (tcp, udp) = (free_port(), free_udp_port());
    let proxy = Proc::start(
        "seaport-proxy",
        &[&reg.target, "--map", &format!("dns@1={tcp}"), "--map", &format!("web@1={udp}/udp")],
        &[],
    );
    proxy.wait_log("forward UDP, but port", WAIT);
    let line = proxy.wait_log("forward TCP, but port", WAIT);
    assert!(line.contains("without /udp"), "{line}");
    // A TCP client of the UDP role is closed, not left hanging.
    let mut c = TcpStream::connect(("127.0.0.1", tcp)).unwrap();
    assert!(closed_within(&mut c, Duration::from_secs(15)));
    // The flags say what they take.
    let bad =
        Command::new(bin("seaport-proxy")).args([&reg.target, "--map", "dns@1=53/sctp"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("write PORT/udp"));
    let reserved = Command::new(bin("seaport-service"))
        .args([&reg.target, "-p", "53", "-r", "dns@1.0.0", "--tag", "seaport:udp"])
        .output()
        .unwrap();
    assert!(!reserved.status.success());
    assert!(String::from_utf8_lossy(&reserved.stderr).contains("seaport's own"));
}

// ---- WireGuard through seaport ----------------------------------------------------------------

/// Two namespaces, each a WireGuard peer behind a veth pair to this one;
/// deleted (with whatever runs in them) on drop.
struct WgLab {
    names: [String; 2],
}

impl Drop for WgLab {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "pids", ns]).output().map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = Command::new("ip").args(["link", "del", &format!("{ns}h")]).output();
        }
    }
}

/// Whether WireGuard can run here: root, `ip`, `wg`, `wireguard-go`,
/// `iperf3` and a TUN device. Without them the test skips (a failure in CI).
fn wireguard_available() -> bool {
    let tools = [
        ("/usr/bin/wireguard-go", "wireguard-go"),
        ("/usr/bin/wg", "wireguard-tools"),
        ("/usr/bin/iperf3", "iperf3"),
        ("/usr/bin/ping", "iputils-ping"),
        ("/dev/net/tun", "a TUN device"),
    ];
    if !tools.iter().all(|(path, package)| tool(path, package).is_some()) {
        return false;
    }
    if !rustix::process::geteuid().is_root() {
        assert!(
            std::env::var("SEAPORT_TOOLS").as_deref() != Ok("require"),
            "SEAPORT_TOOLS=require, but not root"
        );
        eprintln!("skipped: WireGuard in namespaces needs root; CI runs it");
        return false;
    }
    true
}

#[test]
fn wireguard_tunnels_through_seaport_carry_ping_and_an_iperf3_transfer() {
    if !wireguard_available() {
        return;
    }
    // Namespaces a (the WireGuard client, whose endpoint is the proxy's UDP
    // port) and b (the WireGuard server, the service's backend), each on a
    // veth pair to this namespace, where registry, service and proxy run.
    let tag = std::process::id() % 100_000;
    let lab = WgLab { names: [format!("wg{tag}a"), format!("wg{tag}b")] };
    for (i, ns) in lab.names.iter().enumerate() {
        let (host, inside) = (format!("{ns}h"), format!("{ns}n"));
        run_in("", &["ip", "netns", "add", ns]);
        run_in("", &["ip", "link", "add", &host, "type", "veth", "peer", "name", &inside]);
        run_in("", &["ip", "link", "set", &inside, "netns", ns]);
        run_in("", &["ip", "addr", "add", &format!("10.77.{i}.1/24"), "dev", &host]);
        run_in("", &["ip", "link", "set", &host, "up"]);
        run_in(ns, &["ip", "addr", "add", &format!("10.77.{i}.2/24"), "dev", &inside]);
        run_in(ns, &["ip", "link", "set", &inside, "up"]);
        run_in(ns, &["ip", "link", "set", "lo", "up"]);
        run_in(ns, &["ip", "route", "add", "default", "via", &format!("10.77.{i}.1")]);
    }
    // seaport: the service forwards to b's WireGuard port, the proxy serves
    // it on a UDP port a reaches.
    let reg = registry(&[]);
    let svc = service_with(&reg.target, 51820, "wg@1.0.0", &["--udp", "--host", "10.77.1.2"]);
    let port = free_udp_port();
    let proxy = proxy_maps(&reg.target, &[format!("wg@1={port}/udp")], 1, &["--bind", "10.77.0.1"]);

    // b first: a starts its handshake as soon as it has a peer, and a
    // handshake lost to a peer not up yet is retried only after 5 s.
    let (a, b) = (&lab.names[0], &lab.names[1]);
    let pair = WgPair::new();
    let server = pair.server(b, &format!("{b}w"), 51820);
    let client = pair.client(a, &format!("{a}w"), &format!("10.77.0.1:{port}"));
    let rate = wg_ping_and_iperf3(a, b);
    eprintln!("iperf3 over WireGuard through seaport: {:.0} Mbit/s", rate / 1e6);
    assert!(proxy.errors().iter().all(|l| !l.contains("ERROR")), "{:#?}", proxy.errors());
    drop((svc, server, client));
}
