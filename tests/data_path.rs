//! The data path end to end: 100 MiB each way with equal sha256 on both ends,
//! and half-close passing through the tunnel.

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
