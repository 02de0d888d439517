//! The hyperseaport walkthrough with the real binaries: seed, registry,
//! service, proxy, and an HTTP request through the proxy, both with
//! `KEY@HOST:PORT` and with a bare `KEY` found through a private DHT.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::collections::HashSet;
use std::time::Duration;

use seaport_tests::*;

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn walkthrough_with_direct_address() {
    let backend = http_backend("hello from couchdb 3.2.2");
    let reg = registry(&[]);
    let svc = service(&reg.target, backend, "couchdb@3.2.2");
    assert_eq!(
        svc.lines()[0].split_whitespace().take(4).collect::<Vec<_>>(),
        ["started", "p2p", "service", "on"]
    );
    assert!(svc.lines().contains(&format!("connecting to registry {}", reg.key)));
    assert!(svc.lines().contains(&"registered service couchdb@3.2.2".to_owned()));
    let (proxy, port) = proxy(&reg.target, "couchdb@3.x", 1);
    proxy.wait_line("connected to registry", WAIT);
    proxy.wait_line(&format!("proxy from {port} to p2p service"), WAIT);
    assert_eq!(http_get(port), (200, "hello from couchdb 3.2.2".to_owned()));
}

#[test]
fn walkthrough_with_bare_key_through_a_private_dht() {
    let backend = http_backend("found through the DHT");
    let (seed, key) = new_seed();
    let (listen, dht) = (free_port(), free_udp_port());
    let listen = format!("127.0.0.1:{listen}");
    let reg = Proc::start(
        "seaport-registry",
        &["--seed", &seed, "--listen", &listen, "--dht-port", &dht.to_string()],
        &[],
    );
    reg.wait_line(&format!("Registry listening. Connect with pubkey {key}"), WAIT);
    let bootstrap = format!("127.0.0.1:{dht}");
    let env = [("SEAPORT_BOOTSTRAP", bootstrap.as_str())];
    let svc = Proc::start("seaport-service", &[&key, "-p", &backend.to_string(), "-r", "web@1.0.0"], &env);
    svc.wait_line("registered service web@1.0.0", WAIT);
    let port = free_port();
    let proxy = Proc::start("seaport-proxy", &[&key, "-p", &port.to_string(), "-r", "web"], &env);
    proxy.wait_line("proxy from", WAIT);
    assert_eq!(http_get(port), (200, "found through the DHT".to_owned()));
}

#[test]
fn ranges_pick_the_right_version() {
    let v3 = http_backend("three");
    let v4 = http_backend("four");
    let reg = registry(&[]);
    let _s3 = service(&reg.target, v3, "db@3.2.2");
    let _s4 = service(&reg.target, v4, "db@4.0.0");
    let (p3, port3) = proxy(&reg.target, "db@3.x", 1);
    let (p4, port4) = proxy(&reg.target, "db@^4.0.0", 1);
    for _ in 0..5 {
        assert_eq!(http_get(port3), (200, "three".to_owned()));
        assert_eq!(http_get(port4), (200, "four".to_owned()));
    }
    assert_eq!(p3.count("found service"), 1, "3.x must not find 4.0.0: {:#?}", p3.lines());
    assert!(p3.lines().iter().any(|l| l.ends_with("db@3.2.2")));
    assert!(p4.lines().iter().any(|l| l.ends_with("db@4.0.0")));
}

#[test]
fn fifty_concurrent_clients_over_two_instances() {
    let a = http_backend("instance a");
    let b = http_backend("instance b");
    let reg = registry(&[]);
    let _sa = service(&reg.target, a, "api@2.0.0");
    let _sb = service(&reg.target, b, "api@2.1.0");
    let (_proxy, port) = proxy(&reg.target, "api@2", 2);
    let clients: Vec<_> = (0..50).map(|_| std::thread::spawn(move || http_get(port))).collect();
    let mut bodies = HashSet::new();
    for client in clients {
        let (status, body) = client.join().unwrap();
        assert_eq!(status, 200);
        bodies.insert(body);
    }
    let expected: HashSet<String> = ["instance a".to_owned(), "instance b".to_owned()].into();
    assert_eq!(bodies, expected, "round-robin uses both instances");
}
