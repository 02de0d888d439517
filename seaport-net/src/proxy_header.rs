//! PROXY protocol headers (HAProxy's "PROXY protocol", versions 1 and 2) a
//! service writes at the start of each backend connection
//! (`seaport-service --proxy-protocol v1|v2`), so the backend sees who is
//! calling instead of `127.0.0.1`.
//!
//! What the header says:
//! - source: the address the proxy's client connected from, as the proxy
//!   saw it (carried in the stream's `OPEN`). A proxy that withholds it
//!   (`--hide-client-address`), or one too old to send it, gives
//!   `PROXY UNKNOWN` (v1) or an `AF_UNSPEC` address block (v2): the
//!   backend then uses the connection's own addresses, as the spec says.
//! - destination: the backend's address (what the connection is to).
//! - v2 only: a TLV of type [`TLV_PROXY_KEY`] (0xE0, first of the range the
//!   spec leaves to applications) holding the proxy's public key as the 64
//!   lowercase hex characters every seaport tool prints, authenticated by
//!   the link's handshake: the one caller identity a backend can trust.
//!   nginx logs it as `$proxy_protocol_tlv_0xe0`.
//!
//! Invariant: both addresses of one header are of one family (the spec has
//! no mixed block); an IPv4 address beside an IPv6 one is written as
//! IPv4-mapped IPv6.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use seaport_proto::keys::PublicKey;

/// The v2 TLV type of the proxy's public key.
pub const TLV_PROXY_KEY: u8 = 0xE0;

/// v2's fixed signature, the first 12 bytes of every v2 header.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Which header a service writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Text: `PROXY TCP4 src dst sport dport\r\n`; no room for the key.
    V1,
    /// Binary, with the proxy's key in a TLV.
    V2,
}

impl FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Version, String> {
        match s {
            "v1" | "1" => Ok(Version::V1),
            "v2" | "2" => Ok(Version::V2),
            other => Err(format!("{other:?} is not a PROXY protocol version: v1 or v2")),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// The header for one backend connection to `backend` carrying a stream
/// of the proxy `proxy`, whose client connected from `client` if it said.
pub fn header(
    version: Version,
    client: Option<SocketAddr>,
    backend: SocketAddr,
    proxy: &PublicKey,
) -> Vec<u8> {
    // An IPv4 client seen through a dual-stack socket is an IPv4 client.
    let client = client.map(|c| SocketAddr::new(c.ip().to_canonical(), c.port()));
    let pair = client.map(|client| same_family(client, backend));
    match version {
        Version::V1 => v1(pair),
        Version::V2 => v2(pair, proxy),
    }
}

/// The header of a connection made by the service itself (its health
/// check), not for a client: `PROXY UNKNOWN` (v1) or the `LOCAL` command
/// (v2, meant for exactly this), so the backend neither logs a broken
/// header nor takes the check for a client.
pub fn local(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        Version::V2 => {
            let mut out = SIGNATURE.to_vec();
            out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
            out
        }
    }
}

/// Both addresses in one family: IPv4 if both are, else IPv6 (mapped).
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if src.is_ipv4() && dst.is_ipv4() { (src, dst) } else { (v6(src), v6(dst)) }
}

fn v1(pair: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let Some((src, dst)) = pair else { return b"PROXY UNKNOWN\r\n".to_vec() };
    let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {family} {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port()).into_bytes()
}

fn v2(pair: Option<(SocketAddr, SocketAddr)>, proxy: &PublicKey) -> Vec<u8> {
    let mut addresses = Vec::with_capacity(36);
    // Family and transport: AF_INET/AF_INET6 with STREAM, or AF_UNSPEC.
    let family = match pair {
        None => 0x00,
        Some((src, dst)) => {
            let ports = [src.port().to_be_bytes(), dst.port().to_be_bytes()];
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    addresses.extend_from_slice(&s.octets());
                    addresses.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    for ip in [s, d] {
                        if let IpAddr::V6(ip) = ip {
                            addresses.extend_from_slice(&ip.octets());
                        }
                    }
                }
            }
            addresses.extend(ports.iter().flatten());
            if src.is_ipv4() { 0x11 } else { 0x21 }
        }
    };
    let key = proxy.to_string();
    let mut tlv = vec![TLV_PROXY_KEY];
    tlv.extend_from_slice(&u16::try_from(key.len()).unwrap_or(0).to_be_bytes());
    tlv.extend_from_slice(key.as_bytes());
    let len = u16::try_from(addresses.len() + tlv.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(16 + usize::from(len));
    out.extend_from_slice(&SIGNATURE);
    // Version 2, command PROXY.
    out.push(0x21);
    out.push(family);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&addresses);
    out.extend_from_slice(&tlv);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use seaport_proto::keys::Keypair;

    fn key() -> PublicKey {
        Keypair::from_seed(&seaport_proto::keys::Seed::from_bytes([7; 32])).public()
    }

    #[test]
    fn v1_names_both_ends_in_one_family() {
        let client = "192.0.2.1:40000".parse().ok();
        let backend: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            header(Version::V1, client, backend, &key()),
            b"PROXY TCP4 192.0.2.1 127.0.0.1 40000 8080\r\n"
        );
        let client = "[2001:db8::5]:1".parse().ok();
        assert_eq!(
            header(Version::V1, client, backend, &key()),
            b"PROXY TCP6 2001:db8::5 ::ffff:127.0.0.1 1 8080\r\n"
        );
        assert_eq!(header(Version::V1, None, backend, &key()), b"PROXY UNKNOWN\r\n");
        let mapped = "[::ffff:192.0.2.9]:7".parse().ok();
        assert_eq!(
            header(Version::V1, mapped, backend, &key()),
            b"PROXY TCP4 192.0.2.9 127.0.0.1 7 8080\r\n"
        );
    }

    /// A v2 header as a backend reads it: family byte, addresses, TLVs.
    type Parsed = (u8, Vec<u8>, Vec<(u8, Vec<u8>)>);

    fn parse_v2(bytes: &[u8]) -> Parsed {
        assert_eq!(&bytes[..12], &SIGNATURE);
        assert_eq!(bytes[12], 0x21, "version 2, PROXY");
        let len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        assert_eq!(bytes.len(), 16 + len, "the length covers addresses and TLVs exactly");
        let addr_len = match bytes[13] {
            0x11 => 12,
            0x21 => 36,
            0x00 => 0,
            other => panic!("family {other:#x}"),
        };
        let (addresses, mut rest) = bytes[16..].split_at(addr_len);
        let mut tlvs = Vec::new();
        while !rest.is_empty() {
            let n = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
            tlvs.push((rest[0], rest[3..3 + n].to_vec()));
            rest = &rest[3 + n..];
        }
        (bytes[13], addresses.to_vec(), tlvs)
    }

    #[test]
    fn v2_carries_the_addresses_and_the_proxy_key() {
        let backend: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let (family, addresses, tlvs) =
            parse_v2(&header(Version::V2, "10.1.2.3:5000".parse().ok(), backend, &key()));
        assert_eq!(family, 0x11);
        assert_eq!(addresses, [10, 1, 2, 3, 127, 0, 0, 1, 0x13, 0x88, 0x1f, 0x90]);
        assert_eq!(tlvs, [(TLV_PROXY_KEY, key().to_string().into_bytes())]);
        assert_eq!(tlvs[0].1.len(), 64);

        let (family, addresses, _) =
            parse_v2(&header(Version::V2, "[::1]:5000".parse().ok(), backend, &key()));
        assert_eq!(family, 0x21);
        assert_eq!(&addresses[..16], &std::net::Ipv6Addr::LOCALHOST.octets());
        assert_eq!(&addresses[16..32], &std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets());

        // A withheld address: no address block, the key still there.
        let (family, addresses, tlvs) = parse_v2(&header(Version::V2, None, backend, &key()));
        assert_eq!((family, addresses.len(), tlvs.len()), (0x00, 0, 1));
    }

    #[test]
    fn a_health_check_says_it_is_local() {
        assert_eq!(local(Version::V1), b"PROXY UNKNOWN\r\n");
        let v2 = local(Version::V2);
        assert_eq!((&v2[..12], v2[12], v2.len()), (&SIGNATURE[..], 0x20, 16));
    }

    #[test]
    fn versions_parse_as_users_write_them() {
        assert_eq!("v1".parse(), Ok(Version::V1));
        assert_eq!("2".parse(), Ok(Version::V2));
        assert!("v3".parse::<Version>().unwrap_err().contains("v1 or v2"));
    }
}
