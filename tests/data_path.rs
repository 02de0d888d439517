//! The data path end to end: 100 MiB each way with equal sha256 on both ends,
//! half-close passing through the tunnel, and the bytes behind a client's
//! TCP urgent data.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use seaport_tests::*;

const MIB: usize = 1024 * 1024;

#[test]
fn hundred_mib_each_way_arrive_intact() {
    let backend = bulk_backend();
    let reg = registry(&[]);
    let _svc = service(&reg.target, backend, "bulk@1.0.0");
    let (_proxy, port) = proxy(&reg.target, "bulk", 1);
    assert_eq!(upload(port, 7, 100 * MIB), pattern_sha256(7, 100 * MIB), "upload digest");
    let (len, digest) = download(port, 11, 100 * MIB);
    assert_eq!(len, 100 * MIB);
    assert_eq!(digest, pattern_sha256(11, 100 * MIB), "download digest");
}

#[test]
fn half_close_passes_through() {
    let backend = bulk_backend();
    let reg = registry(&[]);
    let _svc = service(&reg.target, backend, "bulk@1.0.0");
    let (_proxy, port) = proxy(&reg.target, "bulk", 1);
    // Like `nc -q` or an HTTP/1.0 client: send, shut the write side, read the answer.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.write_all(b"UP\nsome bytes").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, hex(&<sha2::Sha256 as sha2::Digest>::digest(b"some bytes")));
}

#[test]
fn bytes_behind_tcp_urgent_data_go_through_without_more_being_sent() {
    // A read stops at TCP's urgent mark with bytes still queued behind it
    // (telnet's and FTP's interrupts send urgent data): a proxy that took
    // that short read for a drained socket would hold "after" until the
    // client sent more. The urgent byte itself is out of band and not
    // carried, as through any TCP proxy.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_port = listener.local_addr().unwrap().port();
    let (got_tx, got_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let got_tx = got_tx.clone();
            std::thread::spawn(move || {
                // What came within 10 s: "before" alone says the rest was held.
                stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 64];
                while got.len() < b"beforeafter".len() {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                // The service's health checks connect and send nothing.
                if !got.is_empty() {
                    let _ = got_tx.send(got);
                }
            });
        }
    });
    let reg = registry(&[]);
    let _svc = service(&reg.target, backend_port, "urgent@1.0.0");
    let (_proxy, port) = proxy(&reg.target, "urgent", 1);
    for round in 0..5 {
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        client.write_all(b"before").unwrap();
        rustix::net::send(&client, b"!", rustix::net::SendFlags::OOB).unwrap();
        client.write_all(b"after").unwrap();
        // Nothing more is sent until the backend has it all.
        let got = got_rx.recv_timeout(Duration::from_secs(20)).expect("the backend got nothing");
        assert_eq!(String::from_utf8_lossy(&got), "beforeafter", "round {round}");
        drop(client);
    }
}
