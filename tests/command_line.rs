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
