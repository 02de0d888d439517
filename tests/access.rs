//! Who may connect: a service's allow list (`--allow`, `--allow-file`,
//! reread on SIGHUP) and a proxy's pinned service keys (`--service-key`).

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::time::{Duration, Instant};

use seaport_tests::*;

const WAIT: Duration = Duration::from_secs(20);

/// The key a service printed on its first line.
fn service_key(svc: &Proc) -> String {
    svc.lines()[0].rsplit(' ').next().unwrap().to_owned()
}

/// A proxy with the identity `seed`, once it has found its instances.
fn proxy_as(target: &str, query: &str, seed: &str, extra: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let port_text = port.to_string();
    let mut args = vec![target, "-p", &port_text, "-r", query];
    args.extend_from_slice(extra);
    let p = Proc::start("seaport-proxy", &args, &[("SEAPORT_SEED", seed)]);
    p.wait_line("proxy from", WAIT);
    (p, port)
}

#[test]
fn a_service_answers_only_the_proxies_it_allows_and_rereads_its_file_on_sighup() {
    let backend = http_backend("private");
    let reg = registry(&[]);
    let (friend_seed, friend_key) = new_seed();
    let (stranger_seed, stranger_key) = new_seed();
    let file = std::env::temp_dir().join(format!("seaport-allow-test-{}", std::process::id()));
    std::fs::write(&file, format!("# the one proxy we know\n{friend_key}\n")).unwrap();
    let svc = service_with(&reg.target, backend, "private@1.0.0", &["--allow-file", file.to_str().unwrap()]);

    let (_friend, friend_port) = proxy_as(&reg.target, "private", &friend_seed, &[]);
    let (stranger, stranger_port) = proxy_as(&reg.target, "private", &stranger_seed, &[]);
    assert_eq!(http_get(friend_port), (200, "private".to_owned()));
    assert_eq!(http_get(stranger_port).0, 0, "a proxy not on the list gets nothing");
    svc.wait_log(&format!("{stranger_key} is not allowed"), WAIT);
    stranger.wait_log("every instance failed", WAIT);

    // The stranger is added; SIGHUP rereads the file, no restart.
    std::fs::write(&file, format!("{friend_key}\n{stranger_key}\n")).unwrap();
    svc.signal("HUP");
    svc.wait_log("allow list reread: 2 keys", WAIT);
    let deadline = Instant::now() + WAIT;
    // Its ban on the instance (--ban) must run out first; poll.
    while http_get(stranger_port).0 != 200 {
        assert!(Instant::now() < deadline, "the stranger is still refused: {:#?}", svc.errors());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn a_proxy_pinned_to_a_service_key_uses_that_service_alone() {
    let (a, b) = (http_backend("a"), http_backend("b"));
    let reg = registry(&[]);
    let sa = service(&reg.target, a, "pin@1.0.0");
    let _sb = service(&reg.target, b, "pin@1.0.1");
    let (seed, _) = new_seed();
    let (proxy, port) = proxy_as(&reg.target, "pin", &seed, &["--service-key", &service_key(&sa)]);
    for i in 0..10 {
        assert_eq!(http_get(port), (200, "a".to_owned()), "request {i}");
    }
    assert_eq!(proxy.count("found service"), 1, "{:#?}", proxy.lines());
}
