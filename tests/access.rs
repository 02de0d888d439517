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
    let failed = stranger.wait_log("every instance failed", WAIT);
    // The stranger is told what to check, and by which key it is known.
    assert!(failed.contains("--allow") && failed.contains(&stranger_key), "{failed}");
    assert_eq!(stranger.count_log(&format!("key={stranger_key}")), 1, "it says its own key at start");

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

/// A fresh path for a test's ACL file.
fn acl_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("seaport-acl-{name}-{}", std::process::id()))
}

/// 70 services with fresh keys that try to register `couchdb@3.2.2` in
/// front of the backend on `port` (the caller waits for what it expects).
fn squatters(target: &str, port: u16) -> Vec<Proc> {
    let port = port.to_string();
    (0..70)
        .map(|_| Proc::start("seaport-service", &[target, "-p", &port, "-r", "couchdb@3.2.2"], &[]))
        .collect()
}

/// The finding itself, without `--acl`: whoever knows the registry's key
/// may register any role, so squatters that came first take a proxy's
/// traffic for it.
#[test]
fn without_an_acl_squatters_take_most_of_a_roles_traffic() {
    let (real, squat) = (http_backend("real"), http_backend("attacker"));
    let reg = registry(&[]);
    let squatters = squatters(&reg.target, squat);
    for squatter in &squatters {
        squatter.wait_line("registered service couchdb@3.2.2", WAIT);
    }
    let _svc = service(&reg.target, real, "couchdb@3.2.2");
    let (_proxy, port) = proxy(&reg.target, "couchdb@3.x", 71);
    let bodies: Vec<String> = (0..30).map(|_| http_get(port).1).collect();
    let stolen = bodies.iter().filter(|b| *b == "attacker").count();
    assert!(stolen >= 25, "only {stolen} of 30 requests reached a squatter: {bodies:?}");
}

#[test]
fn with_an_acl_squatters_cannot_take_a_role_and_a_revoked_key_is_withdrawn_on_sighup() {
    let (real, squat) = (http_backend("real"), http_backend("attacker"));
    let (service_seed, service_key) = new_seed();
    let (proxy_seed, proxy_key) = new_seed();
    let file = acl_path("squat");
    let granted = format!(
        "[[grant]]\nkeys = [\"{service_key}\"]\nregister = [\"couchdb\"]\n\n[[grant]]\nkeys = [\"{proxy_key}\"]\nlookup = [\"couchdb\"]\n"
    );
    std::fs::write(&file, &granted).unwrap();
    let reg = registry(&["--acl", file.to_str().unwrap()]);
    assert_eq!(reg.proc.count_log("no --acl given"), 0);

    // 70 services with fresh keys come for the role first: their keys are
    // in no grant, so each is refused at its handshake, holds no session
    // slot, and says why on stderr.
    let attackers = squatters(&reg.target, squat);
    for attacker in &attackers {
        let line = attacker.wait_log("in no grant", WAIT);
        assert!(line.contains("forbidden"), "{line}");
        assert_eq!(attacker.count("registered service"), 0);
    }

    // Then the real one, granted by its key.
    let real_port = real.to_string();
    let svc = Proc::start(
        "seaport-service",
        &[&reg.target, "-p", &real_port, "-r", "couchdb@3.2.2"],
        &[("SEAPORT_SEED", &service_seed)],
    );
    svc.wait_line("registered service couchdb@3.2.2", WAIT);
    let (proxy, port) = proxy_as(&reg.target, "couchdb@3.x", &proxy_seed, &[]);
    for i in 0..30 {
        assert_eq!(http_get(port), (200, "real".to_owned()), "request {i}");
    }
    assert_eq!(proxy.count("found service"), 1, "{:#?}", proxy.lines());
    assert!(attackers.iter().all(|a| a.count("registered service") == 0), "no squatter ever registered");

    // A bad file on reload keeps the list in force, and says why.
    std::fs::write(&file, "[[grant]]\nkeys = [\"nope\"]\n").unwrap();
    reg.proc.signal("HUP");
    let why = reg.proc.wait_log("access list not reread", WAIT);
    assert!(why.contains("line 2") && why.contains("\"nope\" is not a public key"), "{why}");
    assert_eq!(http_get(port), (200, "real".to_owned()));

    // The service's key is revoked: its registration goes at once and the
    // proxy hears of it.
    std::fs::write(&file, format!("[[grant]]\nkeys = [\"{proxy_key}\"]\nlookup = [\"couchdb\"]\n")).unwrap();
    reg.proc.signal("HUP");
    reg.proc.wait_log("access list reread: 1 grants", WAIT);
    proxy.wait_line(&format!("lost service {service_key} couchdb@3.2.2"), WAIT);
    svc.wait_line("registry refused service couchdb@3.2.2", WAIT);
    assert_eq!(svc.count("disconnected"), 0, "the service keeps its session");
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn an_acl_limits_lookups_and_a_bad_file_is_a_usage_error_naming_its_line() {
    let backend = http_backend("secret");
    let (service_seed, service_key) = new_seed();
    let (proxy_seed, proxy_key) = new_seed();
    let file = acl_path("lookup");
    let (insider_seed, insider_key) = new_seed();
    // The proxy is named, but granted another role only; the insider is
    // granted the role, until a reload takes it back.
    let grants = format!(
        "[[grant]]\nkeys = [\"{service_key}\"]\nregister = [\"@acme/*\"]\n\n[[grant]]\nkeys = [\"{proxy_key}\"]\nlookup = [\"public\"]\n"
    );
    let insider = format!("\n[[grant]]\nkeys = [\"{insider_key}\"]\nlookup = [\"@acme/*\"]\n");
    std::fs::write(&file, format!("{grants}{insider}")).unwrap();
    let reg = registry(&["--acl", file.to_str().unwrap()]);
    let port = backend.to_string();
    let _svc = Proc::start(
        "seaport-service",
        &[&reg.target, "-p", &port, "-r", "@acme/secret@1.0.0"],
        &[("SEAPORT_SEED", &service_seed)],
    );
    // A proxy whose key has no lookup grant is refused and keeps its session.
    let proxy_port = free_port().to_string();
    let proxy = Proc::start(
        "seaport-proxy",
        &[&reg.target, "-p", &proxy_port, "-r", "@acme/secret"],
        &[("SEAPORT_SEED", &proxy_seed)],
    );
    let line = proxy.wait_line("registry refused lookup @acme/secret", WAIT);
    assert!(line.contains("not granted"), "{line}");
    assert_eq!(proxy.count("found service"), 0);

    // The insider reaches the service until its grant is taken back; then it
    // forgets the service at once, and a new client finds nothing.
    let (insider, insider_port) =
        proxy_as(&reg.target, "@acme/secret", &insider_seed, &["--connect-timeout", "0s"]);
    insider.wait_line("found service", WAIT);
    assert_eq!(http_get(insider_port), (200, "secret".to_owned()));
    std::fs::write(&file, &grants).unwrap();
    reg.proc.signal("HUP");
    insider.wait_line(&format!("lost service {service_key}"), WAIT);
    insider.wait_line("registry refused lookup @acme/secret", WAIT);
    assert_eq!(http_get(insider_port).0, 0, "no answer: the proxy knows no instance");
    std::fs::remove_file(&file).unwrap();

    // Without --acl, one line says that anyone may do anything.
    let mut open = registry(&[]);
    open.proc.wait_log("no --acl given", WAIT);
    // SIGHUP (`systemctl reload`) then rereads nothing and ends nothing. The
    // handler is installed a little after that line is printed (once the
    // listener is up): give it a moment.
    std::thread::sleep(Duration::from_millis(300));
    open.proc.signal("HUP");
    open.proc.wait_log("SIGHUP: no --acl file to reread", WAIT);
    assert_eq!(open.proc.wait_exit(Duration::from_millis(200)), None, "still running");

    // A bad file stops the start: exit 2, the file, the line, what is wrong.
    let bad = acl_path("bad");
    std::fs::write(&bad, "[[grant]]\nkeys = [\"*\"]\nlookup = [\"couch*\"]\n").unwrap();
    let (seed, _) = new_seed();
    let out = std::process::Command::new(bin("seaport-registry"))
        .args(["--no-dht", "--listen", "127.0.0.1:0", "--acl", bad.to_str().unwrap()])
        .env("SEAPORT_REGISTRY_SEED", seed)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let needle = format!("{}: line 3: invalid role pattern \"couch*\"", bad.display());
    assert!(err.starts_with("error: ") && err.contains(&needle), "{err}");
    std::fs::remove_file(&bad).unwrap();
}
