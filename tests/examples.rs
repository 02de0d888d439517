//! The `seaport` crate's examples, run as a user runs them, against a real
//! registry on loopback: the in-process echo service and its client, a
//! hyper server registered as a role and reached by curl through the
//! `seaport-proxy` binary, and a watcher that prints a range's instances
//! as a `seaport-service` binary comes and goes. Each proves the library
//! and the binaries speak to each other.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use seaport_tests::*;

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn echo_example_registers_finds_and_echoes_through_the_registry() {
    let registry = registry(&[]);
    let mut echo = Proc::example("echo", &[&registry.target]);
    assert_eq!(echo.wait_exit(Duration::from_secs(60)), Some(0), "{:?}\n{:?}", echo.lines(), echo.errors());
    let lines = echo.lines();
    let service = echo.wait_line("offers echo@1.0.0", WAIT);
    let key = service.split_whitespace().nth(1).unwrap().to_owned();
    // The client found the service by range and each message came back whole.
    for bytes in [5, 22, 1_048_576] {
        let line = format!("echoed {bytes} bytes through service {key}");
        assert!(lines.contains(&line), "{line:?} missing: {lines:#?}");
    }
    // The events came as values, in the order they happened.
    let events: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("event: ")).collect();
    let at = |name: &str| {
        events.iter().position(|e| *e == name).unwrap_or_else(|| panic!("no {name}: {events:?}"))
    };
    assert!(at("service_started") < at("registered"), "{events:?}");
    assert!(at("instance_found") < at("link_up"), "{events:?}");
    // The service's own shutdown, in order (the client's link may report
    // its end on either side of it: both live in the one process).
    assert!(at("registered") < at("draining") && at("draining") < at("stopped"), "{events:?}");
    // The library printed no event line of its own on stdout.
    assert!(!lines.iter().any(|l| l.starts_with("registered service")), "{lines:#?}");
}

#[test]
fn http_server_example_answers_curl_through_a_proxy_and_withdraws_on_sigterm() {
    let registry = registry(&[]);
    let server = Proc::example("http_server", &[&registry.target, "web@1.2.3"]);
    let line = server.wait_line("offers web@1.2.3", WAIT);
    let key = line.split_whitespace().nth(1).unwrap().to_owned();
    server.wait_line("registered web@1.2.3", WAIT);
    let (proxy, port) = proxy(&registry.target, "web@1.x", 1);
    for path in ["/hello", "/again"] {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", &format!("http://127.0.0.1:{port}{path}")])
            .output()
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
        // The server saw the client's address as the proxy did.
        assert!(body.starts_with(&format!("web@1.2.3 answers GET {path} for 127.0.0.1:")), "{body:?}");
    }
    let mut server = server;
    server.signal("TERM");
    assert_eq!(server.wait_exit(WAIT), Some(0), "{:?}", server.errors());
    assert!(server.lines().iter().any(|l| l == "stopped"), "{:?}", server.lines());
    proxy.wait_line(&format!("lost service {key}"), WAIT);
}

#[test]
fn watch_example_prints_a_range_as_a_service_comes_and_goes() {
    let registry = registry(&[]);
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_port = backend.local_addr().unwrap().port();
    let watch = Proc::example("watch", &[&registry.target, "cache@2.x"]);
    // The first answer, before anything is registered: none.
    watch.wait_line("cache@2.x: 0 instances", WAIT);
    let service = service(&registry.target, backend_port, "cache@2.4.1");
    let started = service.wait_line("started p2p service on", WAIT);
    let key = started.rsplit(' ').next().unwrap().to_owned();
    watch.wait_line("cache@2.x: 1 instances", WAIT);
    watch.wait_line(&format!("  {key} cache@2.4.1"), WAIT);
    // A role outside the range changes nothing it prints.
    let other = service_with(&registry.target, backend_port, "cache@3.0.0", &[]);
    service.signal("TERM");
    let deadline = std::time::Instant::now() + WAIT;
    while watch.count("cache@2.x: 0 instances") < 2 {
        assert!(std::time::Instant::now() < deadline, "{:?}", watch.lines());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!watch.lines().iter().any(|l| l.contains("cache@3.0.0")), "{:?}", watch.lines());
    drop(other);
}
