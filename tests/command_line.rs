//! The command-line contract: exit codes and one clear line for a user's
//! mistakes, and the seed tool's output.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::process::Command;
use std::time::Duration;

use seaport_tests::*;

fn run(name: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin(name)).args(args).env_remove("SEAPORT_REGISTRY").output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs a binary; its exit code and stdout.
fn run_out(name: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin(name)).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn seed_prints_the_walkthrough_lines() {
    let out = Command::new(bin("seaport-seed")).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0], "Generated a random seed for you!");
    assert!(lines[1].starts_with("--seed ") && lines[1].len() == 7 + 64);
    assert!(
        lines[2].starts_with("services and proxies will connect with pubkey ") && lines[2].len() == 46 + 64
    );
    let (seed, key) = new_seed();
    assert_ne!(seed, key);
}

#[test]
fn invalid_key_exits_2_naming_the_argument() {
    let (code, err) = run("seaport-proxy", &["not-a-key", "-p", "1", "-r", "db@1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("REGISTRY") && err.contains("64-character"), "{err}");
    let (code, err) = run("seaport-service", &["abcd", "-p", "1", "-r", "db@1.0.0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("REGISTRY"), "{err}");
}

#[test]
fn missing_flag_exits_2() {
    let (_, key) = new_seed();
    let (code, err) = run("seaport-service", &[&key, "-p", "1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--role"), "{err}");
    let (code, err) = run("seaport-service", &[&key, "-p", "1", "-r", "db"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("NAME@VERSION"), "{err}");
}

#[test]
fn port_in_use_exits_1_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (_, key) = new_seed();
    let mut proxy =
        Proc::start("seaport-proxy", &[&format!("{key}@127.0.0.1:1"), "-p", &port, "-r", "db"], &[]);
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(1));
    let errors = proxy.errors();
    let line = errors.iter().find(|l| l.starts_with("seaport-proxy:")).expect("a one-line error");
    assert!(line.contains("cannot listen") && line.contains(&port), "{line}");
    let listen = format!("127.0.0.1:{port}");
    let mut reg = Proc::start("seaport-registry", &["--listen", &listen, "--no-dht"], &[]);
    assert_eq!(reg.wait_exit(Duration::from_secs(10)), Some(1));
    assert!(
        reg.errors().iter().any(|l| l.starts_with("seaport-registry: cannot listen")),
        "{:#?}",
        reg.errors()
    );
}

#[test]
fn sigterm_exits_0_after_a_clean_shutdown() {
    let backend = http_backend("bye");
    let reg = registry(&[]);
    let mut svc = service(&reg.target, backend, "db@1.0.0");
    svc.signal("TERM");
    assert_eq!(svc.wait_exit(Duration::from_secs(15)), Some(0), "{:#?}", svc.errors());
}

#[test]
fn no_dht_ignores_an_exported_bootstrap_list() {
    let listen = format!("127.0.0.1:{}", free_port());
    let reg = Proc::start(
        "seaport-registry",
        &["--no-dht", "--listen", &listen],
        &[("SEAPORT_BOOTSTRAP", "127.0.0.1:1")],
    );
    reg.wait_line("Registry listening", Duration::from_secs(20));
}

/// Runs `name` with `args` expecting a usage error: exit 2, clap's form, and
/// every needle in the message.
fn usage_error(name: &str, args: &[&str], needles: &[&str]) {
    let (code, err) = run(name, args);
    assert_eq!(code, Some(2), "{name} {args:?}: {err}");
    assert!(err.starts_with("error: ") && err.contains("--help"), "{name} {args:?}: not clap's form: {err}");
    for needle in needles {
        assert!(err.contains(needle), "{name} {args:?}: {needle:?} missing from {err}");
    }
}

#[test]
fn values_that_cannot_work_are_refused_with_their_range() {
    let (_, key) = new_seed();
    let key = key.as_str();
    let proxy = |extra: &[&'static str]| [&[key, "-p", "1", "-r", "db"][..], extra].concat();
    let service = |extra: &[&'static str]| [&[key, "-r", "db@1.0.0"][..], extra].concat();
    usage_error("seaport-proxy", &proxy(&["--connect-timeout", "2h"]), &["--connect-timeout", "0s to 1h"]);
    usage_error("seaport-proxy", &proxy(&["--dial-timeout", "0"]), &["100ms to 1m"]);
    usage_error("seaport-proxy", &proxy(&["--threads", "0"]), &["--threads", "1..=256"]);
    usage_error("seaport-proxy", &proxy(&["--drain", "-1"]), &["cannot be negative"]);
    usage_error("seaport-service", &service(&["-p", "0"]), &["--port", "1..=65535"]);
    usage_error("seaport-service", &service(&["-p", "1", "--check-interval", "0"]), &["100ms to 1h"]);
    usage_error("seaport-registry", &["--idle-timeout", "0"], &["10s to 1h"]);
    usage_error("seaport-registry", &["--max-sessions", "0"], &["--max-sessions"]);
    usage_error("seaport-registry", &["--handshake-timeout", "-5s"], &["cannot be negative"]);
    usage_error("seaport-registry", &["--max-queued-per-peer", "0"], &["--max-queued-per-peer", "1..=1024"]);
    // One peer's cap above everyone's together can never be used.
    let (code, err) = run("seaport-registry", &["--max-queued-per-peer", "8", "--max-total-queued", "4"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--max-queued-per-peer 8 is above --max-total-queued 4"), "{err}");
}

#[test]
fn every_usage_error_exits_2_in_one_form() {
    let (_, key) = new_seed();
    // A malformed seed, on the command line or in a file, is the user's mistake too.
    usage_error("seaport-registry", &["--seed", "abc"], &["--seed", "64 hex"]);
    usage_error("seaport-proxy", &[&key, "-p", "1", "-r", "db", "--seed", "abc"], &["--seed"]);
    let missing = std::env::temp_dir().join("seaport-no-such-seed-file");
    let missing = missing.to_str().unwrap();
    usage_error("seaport-service", &[&key, "-p", "1", "-r", "db@1.0.0", "--seed-file", missing], &[missing]);
    usage_error("seaport-proxy", &["not-a-key", "-p", "1", "-r", "db"], &["REGISTRY"]);
    // A proxy with nothing to serve, half a pair, or a mapping without its port.
    usage_error("seaport-proxy", &[&key], &["--map ROLE@RANGE=PORT"]);
    usage_error("seaport-proxy", &[&key, "-p", "1"], &["--role"]);
    usage_error("seaport-proxy", &[&key, "--map", "db@1"], &["ROLE@RANGE=PORT"]);
    usage_error("seaport-proxy", &[&key, "--map", "db@1=http"], &["not a port"]);
}

#[test]
fn a_seed_file_made_by_seaport_seed_starts_a_registry() {
    let dir = std::env::temp_dir().join(format!("seaport-seed-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("registry.seed");
    let _ = std::fs::remove_file(&path);
    let path_text = path.to_str().unwrap();
    let out = Command::new(bin("seaport-seed")).args(["--seed-file", path_text]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text.lines().last().unwrap().rsplit(' ').next().unwrap().to_owned();
    assert!(!text.contains(std::fs::read_to_string(&path).unwrap().trim()), "seed printed: {text}");
    // Never overwritten: a second run refuses and keeps the first seed.
    let (code, err) = run("seaport-seed", &["--seed-file", path_text]);
    assert_eq!(code, Some(2), "{err}");
    let listen = format!("127.0.0.1:{}", free_port());
    let reg =
        Proc::start("seaport-registry", &["--seed-file", path_text, "--listen", &listen, "--no-dht"], &[]);
    let line = reg.wait_line("Registry listening", Duration::from_secs(20));
    assert!(line.ends_with(&key), "{line} should name {key}");
    assert_eq!(reg.count_log("can be read by others"), 0, "{:#?}", reg.errors());
    drop(reg);
    // Readable by others: it still works, with a warning, as ssh does.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let reg =
        Proc::start("seaport-registry", &["--seed-file", path_text, "--listen", &listen, "--no-dht"], &[]);
    reg.wait_line("Registry listening", Duration::from_secs(20));
    let warning = reg.wait_log("can be read by others", Duration::from_secs(5));
    assert!(warning.contains("chmod 600"), "{warning}");
    drop(reg);
    // --show prints the pubkey of the seed already in the file, as text and JSON.
    let (code, shown) = run_out("seaport-seed", &["--show", path_text]);
    assert_eq!(code, Some(0));
    assert_eq!(shown.trim(), format!("{path_text} holds the seed of pubkey {key}"));
    let (_, json) = run_out("seaport-seed", &["--show", path_text, "--json"]);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["pubkey"], key.as_str());
    // A directory given as a seed file is named as what it is, with no
    // advice to chmod it.
    let (code, err) = run("seaport-registry", &["--seed-file", dir.to_str().unwrap(), "--no-dht"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("directory") && !err.contains("chmod"), "{err}");
    let (code, err) = run("seaport-seed", &["--show", dir.join("missing.seed").to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn proxy_on_port_0_prints_the_port_it_bound_and_tags_show() {
    let backend = http_backend("tagged");
    let reg = registry(&[]);
    let _svc = service_with(&reg.target, backend, "db@1.2.3", &["--tag", "eu", "--tag", "ssd"]);
    // A pool of workers instead of the default single event loop: same behaviour.
    let proxy = Proc::start("seaport-proxy", &[&reg.target, "-p", "0", "-r", "db@1", "--threads", "2"], &[]);
    let found = proxy.wait_line("found service", Duration::from_secs(20));
    assert!(found.ends_with("db@1.2.3 tags=eu,ssd"), "{found}");
    let line = proxy.wait_line("proxy from", Duration::from_secs(20));
    let port: u16 = line.split(' ').nth(2).unwrap().parse().unwrap();
    assert_ne!(port, 0, "{line}");
    assert_eq!(http_get(port), (200, "tagged".to_owned()));
}

#[test]
fn a_wrong_registry_key_and_a_full_registry_are_told_apart() {
    let reg = registry(&["--max-sessions", "1"]);
    let (_, wrong) = new_seed();
    let addr = reg.target.split_once('@').unwrap().1;
    let lost = Proc::start("seaport-proxy", &[&format!("{wrong}@{addr}"), "-p", "0", "-r", "db"], &[]);
    let line = lost.wait_log("registry key is probably wrong", Duration::from_secs(20));
    assert!(line.contains("check the pubkey"), "{line}");
    drop(lost);
    // The one session slot taken, the next client hears "full", not "wrong key".
    let _first = Proc::start("seaport-proxy", &[&reg.target, "-p", "0", "-r", "db"], &[]);
    _first.wait_line("connected to registry", Duration::from_secs(20));
    let second = Proc::start("seaport-proxy", &[&reg.target, "-p", "0", "-r", "db"], &[]);
    second.wait_log("session limit", Duration::from_secs(20));
    assert_eq!(second.count_log("probably wrong"), 0, "{:#?}", second.errors());
}

#[test]
fn an_unreachable_dht_says_what_to_try() {
    // A bootstrap node that does not exist: the bare key is never found.
    let (_, key) = new_seed();
    let nowhere = format!("127.0.0.1:{}", free_port());
    let proxy = Proc::start("seaport-proxy", &[&key, "-p", "0", "-r", "db", "--bootstrap", &nowhere], &[]);
    let hint = proxy.wait_log("still not found in the DHT", Duration::from_secs(60));
    assert!(hint.contains(&format!("{key}@HOST:PORT")) && hint.contains("--bootstrap"), "{hint}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(proxy.count_log("still not found in the DHT"), 1, "said once");
}

/// Every stdout line of `proc` so far, parsed as one JSON object each.
fn json_events(proc: &Proc) -> Vec<serde_json::Value> {
    proc.lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

fn names(events: &[serde_json::Value]) -> Vec<String> {
    events.iter().map(|e| e["event"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn json_events_follow_the_walkthrough() {
    let (seed, key) = new_seed();
    let listen = format!("127.0.0.1:{}", free_port());
    let reg = Proc::start(
        "seaport-registry",
        &["--listen", &listen, "--no-dht", "--json"],
        &[("SEAPORT_REGISTRY_SEED", &seed)],
    );
    reg.wait_line("\"event\":\"registry_listening\"", Duration::from_secs(20));
    let target = format!("{key}@{listen}");
    let backend = http_backend("json");
    let port = backend.to_string();
    let mut svc = Proc::start(
        "seaport-service",
        &[&target, "-p", &port, "-r", "db@1.0.0", "--tag", "eu", "--json"],
        &[],
    );
    svc.wait_line("\"event\":\"registered\"", Duration::from_secs(20));
    let proxy = Proc::start("seaport-proxy", &[&target, "-p", "0", "-r", "db", "--json"], &[]);
    let serving = proxy.wait_line("\"event\":\"serving\"", Duration::from_secs(20));
    let serving: serde_json::Value = serde_json::from_str(&serving).unwrap();
    let proxy_port = serving["port"].as_u64().unwrap() as u16;
    assert_eq!(http_get(proxy_port), (200, "json".to_owned()));
    proxy.wait_line("\"event\":\"link_up\"", Duration::from_secs(20));

    svc.signal("TERM");
    assert_eq!(svc.wait_exit(Duration::from_secs(20)), Some(0), "{:#?}", svc.errors());
    proxy.wait_line("\"event\":\"instance_lost\"", Duration::from_secs(20));

    let events = json_events(&svc);
    assert_eq!(
        names(&events),
        ["service_started", "registry_connecting", "registry_connected", "registered", "draining", "stopped"],
        "{events:#?}"
    );
    assert_eq!(events[2]["registry_addr"], listen.as_str());
    assert_eq!(events[2]["member"], 0);
    assert_eq!(events[3]["role"], "db@1.0.0");
    assert_eq!(events[3]["tags"], serde_json::json!(["eu"]));
    for event in json_events(&proxy).iter().chain(&events).chain(&json_events(&reg)) {
        let ts = event["ts"].as_str().unwrap();
        assert!(ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
    }
    let proxy_names = names(&json_events(&proxy));
    for expected in
        ["registry_connecting", "registry_connected", "instance_found", "serving", "link_up", "instance_lost"]
    {
        assert!(proxy_names.iter().any(|n| n == expected), "{expected} missing from {proxy_names:?}");
    }
}

#[test]
fn systemd_hears_ready_once_the_proxy_serves_and_stopping_on_sigterm() {
    use std::os::unix::net::UnixDatagram;
    let path = std::env::temp_dir().join(format!("seaport-notify-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let systemd = UnixDatagram::bind(&path).unwrap();
    systemd.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let backend = http_backend("ready");
    let reg = registry(&[]);
    let _svc = service(&reg.target, backend, "ready@1.0.0");
    let mut proxy = Proc::start(
        "seaport-proxy",
        &[&reg.target, "-p", "0", "-r", "ready"],
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let mut buf = [0u8; 64];
    let n = systemd.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    // Ready only once serving: the serving line was printed before.
    proxy.wait_line("proxy from", Duration::from_secs(5));
    proxy.signal("TERM");
    let n = systemd.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)), Some(0));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn every_binary_prints_its_completions_without_other_arguments() {
    for name in ["seaport-seed", "seaport-registry", "seaport-service", "seaport-proxy"] {
        let out = Command::new(bin(name))
            .args(["--completions", "bash"])
            .env_remove("SEAPORT_REGISTRY")
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains("complete") && script.contains("--json"), "{name}: {script}");
    }
    let (code, err) = run("seaport-proxy", &["--completions", "tcsh"]);
    assert_eq!(code, Some(2), "{err}");
    // Values a flag takes are completed too.
    let (_, script) = run_out("seaport-proxy", &["--completions", "bash"]);
    assert!(script.contains("first round-robin random hash"), "--balance values missing");
}
