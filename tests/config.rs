//! `--config FILE`: a proxy serving five roles from a file, reread on
//! SIGHUP (a port removed closes, a port added serves, the others keep
//! their connections, a bad file changes nothing and says where it is
//! wrong); a service and a registry configured from files, with flags
//! overriding them.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use seaport_tests::*;

const WAIT: Duration = Duration::from_secs(20);

/// A TCP backend answering every read with `name: ` and what it read;
/// connections stay open until the client closes them.
fn echo_backend(name: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            thread::spawn(move || {
                let mut buf = [0u8; 256];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(format!("{name}: ").as_bytes()).is_err() {
                        return;
                    }
                    if conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// One exchange on an open connection.
fn exchange(conn: &mut TcpStream, text: &str) -> String {
    conn.write_all(text.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.ends_with(text.as_bytes()) {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "the connection closed; had {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(got).unwrap()
}

fn temp_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("seaport-config-{}-{name}", std::process::id()))
}

fn maps_toml(target: &str, maps: &[(usize, u16)]) -> String {
    let mut text = format!("registry = \"{target}\"\nconnect-timeout = \"5s\"\n");
    for (n, port) in maps {
        text.push_str(&format!("\n[[map]]\nrole = \"web{n}@1\"\nport = {port}\n"));
    }
    text
}

#[test]
fn a_proxy_reloads_its_maps_on_sighup_without_dropping_the_others() {
    let reg = registry(&[]);
    let names = ["zero", "one", "two", "three", "four", "five"];
    let _services: Vec<Proc> = names
        .iter()
        .enumerate()
        .map(|(n, name)| service(&reg.target, echo_backend(name), &format!("web{n}@1.0.0")))
        .collect();
    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let file = temp_file("proxy.toml");
    let first: Vec<(usize, u16)> = (0..5).map(|n| (n, ports[n])).collect();
    std::fs::write(&file, maps_toml(&reg.target, &first)).unwrap();
    let proxy = Proc::start("seaport-proxy", &["--config", file.to_str().unwrap()], &[]);
    wait_found(&proxy, 5);

    // A connection on each port that stays, carried across the reload.
    let mut kept: Vec<TcpStream> =
        (1..5).map(|n| TcpStream::connect(("127.0.0.1", ports[n])).unwrap()).collect();
    for (i, conn) in kept.iter_mut().enumerate() {
        assert_eq!(exchange(conn, "before"), format!("{}: before", names[i + 1]));
    }
    let mut on_removed = TcpStream::connect(("127.0.0.1", ports[0])).unwrap();
    assert_eq!(exchange(&mut on_removed, "hi"), "zero: hi");

    // web0 goes, web5 comes.
    let second: Vec<(usize, u16)> = (1..6).map(|n| (n, ports[n])).collect();
    std::fs::write(&file, maps_toml(&reg.target, &second)).unwrap();
    proxy.signal("HUP");
    proxy.wait_log("config reread: port opened", WAIT);
    proxy.wait_log("config reread: port closed", WAIT);
    assert!(TcpStream::connect(("127.0.0.1", ports[0])).is_err(), "the removed port still listens");
    let mut new = TcpStream::connect(("127.0.0.1", ports[5])).unwrap();
    assert_eq!(exchange(&mut new, "new"), "five: new");
    for (i, conn) in kept.iter_mut().enumerate() {
        assert_eq!(exchange(conn, "after"), format!("{}: after", names[i + 1]), "a kept port's connection");
    }
    // A connection of the removed port may finish (within --drain).
    assert_eq!(exchange(&mut on_removed, "still"), "zero: still");

    // A bad file: nothing changes, and the log says where.
    std::fs::write(&file, "registry = \"x\"\n[[map]]\nrole = \"web1@1\"\nport = \n").unwrap();
    proxy.signal("HUP");
    let said = proxy.wait_log("config not reread", WAIT);
    assert!(said.contains("line 4"), "{said}");
    assert_eq!(exchange(&mut new, "again"), "five: again");
    assert_eq!(exchange(&mut kept[0], "again"), "one: again");
    let _ = std::fs::remove_file(&file);
}

#[test]
fn a_service_and_a_registry_from_files_flags_overriding() {
    let (seed, key) = new_seed();
    let listen = format!("127.0.0.1:{}", free_port());
    let reg_file = temp_file("registry.toml");
    let seed_file = temp_file("registry.seed");
    std::fs::write(&seed_file, &seed).unwrap();
    std::fs::write(
        &reg_file,
        format!("listen = \"{listen}\"\nno-dht = true\nseed-file = \"{}\"\n", seed_file.display()),
    )
    .unwrap();
    let reg = Proc::start("seaport-registry", &["--config", reg_file.to_str().unwrap()], &[]);
    reg.wait_line(&format!("Connect with pubkey {key}"), WAIT);
    let target = format!("{key}@{listen}");

    // The file says web@1.0.0 on a port nothing listens on; the flags fix both.
    let backend = echo_backend("served");
    let svc_file = temp_file("service.toml");
    std::fs::write(
        &svc_file,
        format!("registry = \"{target}\"\nport = 1\nrole = \"web@1.0.0\"\ntag = [\"a\"]\n"),
    )
    .unwrap();
    let port = backend.to_string();
    let svc = Proc::start(
        "seaport-service",
        &["--config", svc_file.to_str().unwrap(), "-p", &port, "-r", "web@2.0.0"],
        &[],
    );
    svc.wait_line("registered service web@2.0.0", WAIT);
    let (_proxy, local) = proxy(&target, "web@2", 1);
    let mut conn = TcpStream::connect(("127.0.0.1", local)).unwrap();
    assert_eq!(exchange(&mut conn, "x"), "served: x");

    // A mistake in a file is a usage error naming it and the key.
    std::fs::write(&svc_file, "registry = \"x\"\nprot = 1\n").unwrap();
    let out = std::process::Command::new(bin("seaport-service"))
        .args(["--config", svc_file.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown setting `prot`") && err.contains(svc_file.to_str().unwrap()), "{err}");
    for file in [reg_file, seed_file, svc_file] {
        let _ = std::fs::remove_file(file);
    }
}

/// The example files in `contrib/config/` name only settings that exist,
/// with values of the right kind (the units load them).
#[test]
fn the_contrib_examples_are_valid_settings() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/config");
    for (binary, file) in [
        ("seaport-proxy", "proxy.toml"),
        ("seaport-service", "service.toml"),
        ("seaport-registry", "registry.toml"),
    ] {
        let path = format!("{dir}/{file}");
        let out =
            std::process::Command::new(bin(binary)).args(["--config", &path, "--help"]).output().unwrap();
        assert!(out.status.success(), "{binary} --config {file}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
