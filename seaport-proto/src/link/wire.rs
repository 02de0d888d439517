//! The link's frames on the wire: one frame is the whole plaintext of one
//! Noise transport message, so a frame needs no length of its own.
//!
//! Layout, all integers big-endian: a fixed 5-byte header, `type` (u8) then
//! `stream id` (u32), then a body whose size the type fixes (only `DATA` has
//! a variable body: the rest of the message).
//!
//! | type | name     | id        | body                        |
//! |------|----------|-----------|-----------------------------|
//! | 0x01 | `OPEN`   | ≠ 0       | receive window (u32), client address (optional) |
//! | 0x02 | `ACCEPT` | ≠ 0       | receive window (u32)        |
//! | 0x03 | `DATA`   | ≠ 0       | 1 to [`MAX_DATA`] bytes     |
//! | 0x04 | `END`    | ≠ 0       | none                        |
//! | 0x05 | `RESET`  | ≠ 0       | reason (u32)                |
//! | 0x06 | `WINDOW` | 0 = link  | increment (u32, ≥ 1)        |
//! | 0x07 | `PING`   | 0         | nonce (u64)                 |
//! | 0x08 | `PONG`   | 0         | nonce (u64)                 |
//! | 0x09 | `GOAWAY` | 0         | reason (u32)                |
//! | 0x0a | `ACK`    | 0         | frames received (u64)       |
//! | 0x0b | `RESUME` | 0         | frames received (u64), token (32 bytes) |
//! | 0x0c | `RESUMED`| 0         | frames received (u64)       |
//! | 0x0d | `DATAGRAM`| flow ≠ 0 | 0 to [`MAX_DATAGRAM`] bytes |
//!
//! `OPEN` may carry, after the window, the address the proxy's client
//! connected from: port (u16) then the IPv4 (4 bytes) or IPv6 (16 bytes)
//! address, so its body is 4, 10 or 22 bytes. Only a peer that advertised
//! [`Capabilities::CLIENT_ADDRESS`](crate::hello::Capabilities::CLIENT_ADDRESS)
//! is sent one (a service hands it to its backend in a PROXY protocol
//! header); a proxy may withhold it (`--hide-client-address`).
//!
//! Early data: right after a stream's `OPEN`, before its `ACCEPT`, a proxy
//! may send one `DATA` of at most [`crate::link::EARLY_DATA`] bytes (the
//! first bytes its client sent), only to a service that advertised
//! [`Capabilities::EARLY_DATA`](crate::hello::Capabilities::EARLY_DATA).
//! It counts against the stream's window like any `DATA`: such a service
//! grants at least that much in `ACCEPT`. A refused stream's early data
//! is dropped with it (a service refuses before it writes any to its
//! backend), and the proxy still has it to send elsewhere; a stream that
//! fails otherwise after its early data went (no answer in time, a lost
//! link) may have delivered it, and is not tried elsewhere.
//!
//! `DATAGRAM` carries one UDP datagram of a flow (`datagram.rs`) and goes
//! only to a peer that advertised
//! [`Capabilities::DATAGRAM`](crate::hello::Capabilities::DATAGRAM). It is
//! unnumbered like `ACK`: never kept for resending, since a datagram
//! resent after a path loss would arrive late and a UDP peer copes with
//! loss anyway. Its id names a flow, not a stream: flows have ids of their
//! own.
//!
//! `ACK`, `RESUME` and `RESUMED` belong to resumable links (`resume.rs`) and
//! go only to a peer that advertised
//! [`Capabilities::RESUME`](crate::hello::Capabilities::RESUME). They are
//! about the transport, not the link: they are neither numbered nor kept for
//! resending.
//!
//! Decoding is strict: a wrong size, a stream id where none belongs (or none
//! where one does), an empty `DATA`, a zero increment or a window above
//! [`MAX_WINDOW`] is a [`FrameError`]. An unknown type is an error too, not
//! skipped: a new frame type is only sent to a peer that advertised a
//! [`crate::hello::Capabilities`] bit for it, so an unknown type means the
//! peer broke that rule, and skipping it could silently lose data or credit
//! and stall a stream forever.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::noise::MAX_PLAINTEXT;

/// Bytes of the fixed header: type and stream id.
pub const HEADER_LEN: usize = 5;
/// Most payload one `DATA` frame carries: a Noise message's plaintext less the header.
pub const MAX_DATA: usize = MAX_PLAINTEXT - HEADER_LEN;
/// Largest datagram a `DATAGRAM` frame carries: the largest UDP payload
/// over IPv4 (65,535 less the 20-byte IP and 8-byte UDP headers). It fits
/// one Noise message, so a datagram is never cut or split.
pub const MAX_DATAGRAM: usize = 65_507;
const _: () = assert!(MAX_DATAGRAM <= MAX_DATA);
/// Largest window or credit either side may grant (HTTP/2's limit, 2^31 - 1):
/// the sum of increments a peer sends beyond it is a flow-control error.
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// A stream's number on its link, chosen by the proxy: 1, 2, 3, … and never
/// reused. 0 names the link itself (in `WINDOW` frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(u32);

impl StreamId {
    /// The link as a whole: the id of link-level `WINDOW` frames.
    pub const LINK: StreamId = StreamId(0);

    /// The id with this number (any number; the link checks which are valid).
    pub const fn new(n: u32) -> StreamId {
        StreamId(n)
    }

    /// Its number on the wire.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A UDP flow's number on its link, chosen by the proxy (one per client
/// address of a UDP port): 1, 2, 3, … and never reused. Flows are numbered
/// apart from streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowId(u32);

impl FlowId {
    /// The flow with this number (0 is not a flow: the peer refuses it).
    pub const fn new(n: u32) -> FlowId {
        FlowId(n)
    }

    /// Its number on the wire.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "flow {}", self.0)
    }
}

/// Why a stream was reset or a link is going away. A number on the wire, so
/// new reasons need no new frame: an unknown one prints as its number and is
/// treated like any other reset.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reason(pub u32);

impl Reason {
    /// No error: a graceful `GOAWAY`.
    pub const NO_ERROR: Reason = Reason(0);
    /// The stream's other end gave up (the client went away, the proxy cancelled).
    pub const CANCELLED: Reason = Reason(1);
    /// The backend refused the connection.
    pub const REFUSED: Reason = Reason(2);
    /// The backend could not be reached (timeout, no route).
    pub const UNREACHABLE: Reason = Reason(3);
    /// The service is at its limit of concurrent streams on this link.
    pub const STREAM_LIMIT: Reason = Reason(4);
    /// The link is draining: the stream was not started, retry elsewhere.
    pub const GOING_AWAY: Reason = Reason(5);
    /// The peer broke the link protocol.
    pub const PROTOCOL: Reason = Reason(6);
    /// The peer sent more than its credit.
    pub const FLOW_CONTROL: Reason = Reason(7);
    /// The link under the stream failed (a local reason, reported per stream).
    pub const LINK_LOST: Reason = Reason(8);
    /// The backend's connection failed after it was established.
    pub const BACKEND_ERROR: Reason = Reason(9);
    /// A `RESUME` named a link the service does not have (it restarted,
    /// or gave the link up): the proxy's streams on it are lost.
    pub const UNKNOWN_LINK: Reason = Reason(10);
    /// The service forwards the other protocol (a stream to a UDP service):
    /// no instance of that service can take it.
    pub const WRONG_PROTOCOL: Reason = Reason(11);

    fn name(self) -> Option<&'static str> {
        Some(match self {
            Reason::NO_ERROR => "no error",
            Reason::CANCELLED => "cancelled",
            Reason::REFUSED => "backend refused",
            Reason::UNREACHABLE => "backend unreachable",
            Reason::STREAM_LIMIT => "stream limit",
            Reason::GOING_AWAY => "link going away",
            Reason::PROTOCOL => "protocol error",
            Reason::FLOW_CONTROL => "flow control error",
            Reason::LINK_LOST => "link lost",
            Reason::BACKEND_ERROR => "backend error",
            Reason::UNKNOWN_LINK => "no such link",
            Reason::WRONG_PROTOCOL => "the service forwards UDP, not TCP",
            _ => return None,
        })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "reason {}", self.0),
        }
    }
}

impl fmt::Debug for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reason({}: {self})", self.0)
    }
}

/// The kinds of frame, named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FrameKind {
    /// `OPEN`
    Open,
    /// `ACCEPT`
    Accept,
    /// `DATA`
    Data,
    /// `END`
    End,
    /// `RESET`
    Reset,
    /// `WINDOW`
    Window,
    /// `PING`
    Ping,
    /// `PONG`
    Pong,
    /// `GOAWAY`
    GoAway,
    /// `ACK`
    Ack,
    /// `RESUME`
    Resume,
    /// `RESUMED`
    Resumed,
    /// `DATAGRAM`
    Datagram,
}

impl FrameKind {
    fn from_byte(b: u8) -> Option<FrameKind> {
        Some(match b {
            0x01 => FrameKind::Open,
            0x02 => FrameKind::Accept,
            0x03 => FrameKind::Data,
            0x04 => FrameKind::End,
            0x05 => FrameKind::Reset,
            0x06 => FrameKind::Window,
            0x07 => FrameKind::Ping,
            0x08 => FrameKind::Pong,
            0x09 => FrameKind::GoAway,
            0x0a => FrameKind::Ack,
            0x0b => FrameKind::Resume,
            0x0c => FrameKind::Resumed,
            0x0d => FrameKind::Datagram,
            _ => return None,
        })
    }

    fn byte(self) -> u8 {
        match self {
            FrameKind::Open => 0x01,
            FrameKind::Accept => 0x02,
            FrameKind::Data => 0x03,
            FrameKind::End => 0x04,
            FrameKind::Reset => 0x05,
            FrameKind::Window => 0x06,
            FrameKind::Ping => 0x07,
            FrameKind::Pong => 0x08,
            FrameKind::GoAway => 0x09,
            FrameKind::Ack => 0x0a,
            FrameKind::Resume => 0x0b,
            FrameKind::Resumed => 0x0c,
            FrameKind::Datagram => 0x0d,
        }
    }
}

/// One link frame. `Data` borrows its payload from the decoded message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Proxy → service: start stream `id`; the proxy accepts `window` bytes on it.
    Open {
        /// The new stream.
        id: StreamId,
        /// The opener's initial receive window for the stream.
        window: u32,
        /// Where the proxy's client connected from, if the proxy shares it.
        client: Option<SocketAddr>,
    },
    /// Service → proxy: the backend is connected; the service accepts `window` bytes.
    Accept {
        /// The stream.
        id: StreamId,
        /// The accepter's initial receive window for the stream.
        window: u32,
    },
    /// Stream bytes.
    Data {
        /// The stream.
        id: StreamId,
        /// 1 to [`MAX_DATA`] bytes.
        bytes: &'a [u8],
    },
    /// The sender will send no more data on the stream (half-close).
    End {
        /// The stream.
        id: StreamId,
    },
    /// Abort the stream in both directions.
    Reset {
        /// The stream.
        id: StreamId,
        /// Why.
        reason: Reason,
    },
    /// The receiver of this frame may send `increment` more bytes on stream
    /// `id`, or on the link as a whole if `id` is [`StreamId::LINK`].
    Window {
        /// The stream, or [`StreamId::LINK`].
        id: StreamId,
        /// Added credit, 1 to [`MAX_WINDOW`].
        increment: u32,
    },
    /// Keepalive probe; answered with a `Pong` of the same nonce.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Answer to a `Ping`.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// The sender opens (proxy) or accepts (service) no new streams; open
    /// ones finish. A reason other than [`Reason::NO_ERROR`] ends the link now.
    GoAway {
        /// Why.
        reason: Reason,
    },
    /// The sender has received (and handled) this many numbered frames of
    /// the link: the receiver of this frame may forget what it kept of them.
    Ack {
        /// Numbered frames received since the link began.
        received: u64,
    },
    /// Proxy → service, first on a new transport: continue the link that
    /// `token` names ([`super::resume::token`]), resending from frame
    /// `received` on.
    Resume {
        /// Numbered frames the proxy received on the link.
        received: u64,
        /// The link's secret, known only to its two ends.
        token: [u8; RESUME_TOKEN_LEN],
    },
    /// Service → proxy, first on a new transport: the link is continued.
    Resumed {
        /// Numbered frames the service received on the link.
        received: u64,
    },
    /// One UDP datagram of flow `flow`, either way.
    Datagram {
        /// The flow.
        flow: FlowId,
        /// 0 to [`MAX_DATAGRAM`] bytes (UDP allows an empty datagram).
        bytes: &'a [u8],
    },
}

/// Bytes of the secret a `RESUME` names its link by.
pub const RESUME_TOKEN_LEN: usize = 32;

/// Why a frame did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Shorter than the fixed header.
    #[error("frame of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    Short(usize),
    /// A type this build does not know (and did not advertise).
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// The body has the wrong size for its type.
    #[error("{kind:?} frame with a {len}-byte body, expected {expected}")]
    BodyLength {
        /// The frame's type.
        kind: FrameKind,
        /// The body it had.
        len: usize,
        /// The body its type has.
        expected: usize,
    },
    /// A stream frame on stream 0.
    #[error("{0:?} frame on stream 0")]
    ZeroStream(FrameKind),
    /// A link frame with a stream id.
    #[error("{kind:?} frame on stream {id}, it belongs to the link (0)")]
    StreamOnLinkFrame {
        /// The frame's type.
        kind: FrameKind,
        /// The id it carried.
        id: u32,
    },
    /// A `DATA` frame with no bytes (`END` says end of stream).
    #[error("empty DATA frame")]
    EmptyData,
    /// A `DATA` frame larger than a Noise message can carry.
    #[error("DATA frame of {0} bytes exceeds {MAX_DATA}")]
    DataTooLong(usize),
    /// A `DATAGRAM` frame larger than a UDP datagram can be.
    #[error("DATAGRAM frame of {0} bytes exceeds {MAX_DATAGRAM}")]
    DatagramTooLong(usize),
    /// A `WINDOW` frame granting nothing.
    #[error("WINDOW frame with a zero increment")]
    ZeroIncrement,
    /// A window or increment above [`MAX_WINDOW`].
    #[error("{kind:?} frame with a window of {value}, above {MAX_WINDOW}")]
    WindowTooLarge {
        /// The frame's type.
        kind: FrameKind,
        /// The value it carried.
        value: u32,
    },
}

impl<'a> Frame<'a> {
    /// Its type.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Open { .. } => FrameKind::Open,
            Frame::Accept { .. } => FrameKind::Accept,
            Frame::Data { .. } => FrameKind::Data,
            Frame::End { .. } => FrameKind::End,
            Frame::Reset { .. } => FrameKind::Reset,
            Frame::Window { .. } => FrameKind::Window,
            Frame::Ping { .. } => FrameKind::Ping,
            Frame::Pong { .. } => FrameKind::Pong,
            Frame::GoAway { .. } => FrameKind::GoAway,
            Frame::Ack { .. } => FrameKind::Ack,
            Frame::Resume { .. } => FrameKind::Resume,
            Frame::Resumed { .. } => FrameKind::Resumed,
            Frame::Datagram { .. } => FrameKind::Datagram,
        }
    }

    /// Appends the frame to `out`. Encodes what it is given: a frame built
    /// with out-of-range fields (an empty `Data`, id 0 on `End`) encodes, and
    /// the peer refuses it; the [`super::Link`] never builds one.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let id = match self {
            Frame::Open { id, .. }
            | Frame::Accept { id, .. }
            | Frame::Data { id, .. }
            | Frame::End { id }
            | Frame::Reset { id, .. }
            | Frame::Window { id, .. } => id.0,
            Frame::Datagram { flow, .. } => flow.0,
            Frame::Ping { .. }
            | Frame::Pong { .. }
            | Frame::GoAway { .. }
            | Frame::Ack { .. }
            | Frame::Resume { .. }
            | Frame::Resumed { .. } => 0,
        };
        out.push(self.kind().byte());
        out.extend_from_slice(&id.to_be_bytes());
        match self {
            Frame::Open { window: n, client, .. } => {
                out.extend_from_slice(&n.to_be_bytes());
                if let Some(client) = client {
                    out.extend_from_slice(&client.port().to_be_bytes());
                    match client.ip() {
                        IpAddr::V4(ip) => out.extend_from_slice(&ip.octets()),
                        IpAddr::V6(ip) => out.extend_from_slice(&ip.octets()),
                    }
                }
            }
            Frame::Accept { window: n, .. }
            | Frame::Window { increment: n, .. }
            | Frame::Reset { reason: Reason(n), .. }
            | Frame::GoAway { reason: Reason(n) } => out.extend_from_slice(&n.to_be_bytes()),
            Frame::Data { bytes, .. } | Frame::Datagram { bytes, .. } => out.extend_from_slice(bytes),
            Frame::Ping { nonce: n }
            | Frame::Pong { nonce: n }
            | Frame::Ack { received: n }
            | Frame::Resumed { received: n } => out.extend_from_slice(&n.to_be_bytes()),
            Frame::Resume { received, token } => {
                out.extend_from_slice(&received.to_be_bytes());
                out.extend_from_slice(token);
            }
            Frame::End { .. } => {}
        }
    }

    /// Decodes one frame (a whole Noise plaintext), strictly.
    pub fn decode(bytes: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        let (header, body) = bytes.split_first_chunk::<HEADER_LEN>().ok_or(FrameError::Short(bytes.len()))?;
        let [ty, id @ ..] = *header;
        let kind = FrameKind::from_byte(ty).ok_or(FrameError::UnknownType(ty))?;
        let raw_id = u32::from_be_bytes(id);
        let id = StreamId(raw_id);
        let on_link = matches!(
            kind,
            FrameKind::Ping
                | FrameKind::Pong
                | FrameKind::GoAway
                | FrameKind::Ack
                | FrameKind::Resume
                | FrameKind::Resumed
        );
        if on_link && raw_id != 0 {
            return Err(FrameError::StreamOnLinkFrame { kind, id: raw_id });
        }
        if !on_link && kind != FrameKind::Window && raw_id == 0 {
            return Err(FrameError::ZeroStream(kind));
        }
        let word = || body.try_into().map(u32::from_be_bytes).map_err(|_| length(kind, body, 4));
        let window = || match word()? {
            value if value > MAX_WINDOW => Err(FrameError::WindowTooLarge { kind, value }),
            value => Ok(value),
        };
        let long = || body.try_into().map(u64::from_be_bytes).map_err(|_| length(kind, body, 8));
        Ok(match kind {
            FrameKind::Open => {
                let (head, client) = body.split_at_checked(4).ok_or_else(|| length(kind, body, 4))?;
                let window = match u32::from_be_bytes(head.try_into().map_err(|_| length(kind, body, 4))?) {
                    value if value > MAX_WINDOW => return Err(FrameError::WindowTooLarge { kind, value }),
                    value => value,
                };
                Frame::Open {
                    id,
                    window,
                    client: client_address(client).ok_or_else(|| length(kind, body, 4))?,
                }
            }
            FrameKind::Accept => Frame::Accept { id, window: window()? },
            FrameKind::Data if body.is_empty() => return Err(FrameError::EmptyData),
            FrameKind::Data if body.len() > MAX_DATA => return Err(FrameError::DataTooLong(body.len())),
            FrameKind::Data => Frame::Data { id, bytes: body },
            FrameKind::End if !body.is_empty() => return Err(length(kind, body, 0)),
            FrameKind::End => Frame::End { id },
            FrameKind::Reset => Frame::Reset { id, reason: Reason(word()?) },
            FrameKind::Window => match window()? {
                0 => return Err(FrameError::ZeroIncrement),
                increment => Frame::Window { id, increment },
            },
            FrameKind::Ping => Frame::Ping { nonce: long()? },
            FrameKind::Pong => Frame::Pong { nonce: long()? },
            FrameKind::GoAway => Frame::GoAway { reason: Reason(word()?) },
            FrameKind::Datagram if body.len() > MAX_DATAGRAM => {
                return Err(FrameError::DatagramTooLong(body.len()));
            }
            FrameKind::Datagram => Frame::Datagram { flow: FlowId(raw_id), bytes: body },
            FrameKind::Ack => Frame::Ack { received: long()? },
            FrameKind::Resumed => Frame::Resumed { received: long()? },
            FrameKind::Resume => {
                let (received, token) = body
                    .split_first_chunk::<8>()
                    .and_then(|(n, rest)| {
                        Some((u64::from_be_bytes(*n), <[u8; RESUME_TOKEN_LEN]>::try_from(rest).ok()?))
                    })
                    .ok_or_else(|| length(kind, body, 8 + RESUME_TOKEN_LEN))?;
                Frame::Resume { received, token }
            }
        })
    }
}

fn length(kind: FrameKind, body: &[u8], expected: usize) -> FrameError {
    FrameError::BodyLength { kind, len: body.len(), expected }
}

/// Writes the header of a `DATA` frame on `id` into `out[..HEADER_LEN]`.
pub(super) fn write_data_header(id: StreamId, out: &mut [u8]) -> Option<()> {
    let header = out.first_chunk_mut::<HEADER_LEN>()?;
    let [ty, rest @ ..] = header;
    *ty = FrameKind::Data.byte();
    *rest = id.0.to_be_bytes();
    Some(())
}

/// An `OPEN`'s optional client address: nothing, or port then IPv4 or IPv6
/// address; `None` for any other length.
fn client_address(bytes: &[u8]) -> Option<Option<SocketAddr>> {
    let (port, ip) = match bytes.split_first_chunk::<2>() {
        None if bytes.is_empty() => return Some(None),
        None => return None,
        Some((port, ip)) => (u16::from_be_bytes(*port), ip),
    };
    let ip = match ip.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(ip).ok()?)),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(ip).ok()?)),
        _ => return None,
    };
    Some(Some(SocketAddr::new(ip, port)))
}

/// Writes the header of a `DATAGRAM` frame of `flow` into `out[..HEADER_LEN]`.
pub(super) fn write_datagram_header(flow: FlowId, out: &mut [u8]) -> Option<()> {
    let header = out.first_chunk_mut::<HEADER_LEN>()?;
    let [ty, rest @ ..] = header;
    *ty = FrameKind::Datagram.byte();
    *rest = flow.0.to_be_bytes();
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded(frame: Frame<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        frame.encode(&mut out);
        out
    }

    fn arb_frame() -> impl Strategy<Value = (u8, u32, u32, u64, Vec<u8>)> {
        (1u8..=13, 1u32.., 1u32..=MAX_WINDOW, any::<u64>(), prop::collection::vec(any::<u8>(), 1..300))
    }

    proptest! {
        #[test]
        fn every_frame_round_trips((kind, id, n, nonce, bytes) in arb_frame()) {
            let id = StreamId(id);
            let frame = match kind {
                1 => Frame::Open { id, window: n, client: None },
                2 => Frame::Accept { id, window: n },
                3 => Frame::Data { id, bytes: &bytes },
                4 => Frame::End { id },
                5 => Frame::Reset { id, reason: Reason(n) },
                6 => Frame::Window { id, increment: n },
                7 => Frame::Ping { nonce },
                8 => Frame::Pong { nonce },
                9 => Frame::GoAway { reason: Reason(n) },
                10 => Frame::Ack { received: nonce },
                11 => Frame::Resume { received: nonce, token: [n as u8; RESUME_TOKEN_LEN] },
                12 => Frame::Resumed { received: nonce },
                _ => Frame::Datagram { flow: FlowId(id.0), bytes: &bytes },
            };
            let wire = encoded(frame);
            prop_assert_eq!(Frame::decode(&wire), Ok(frame));
            // Strict sizes: one byte more or less is refused.
            let mut longer = wire.clone();
            longer.push(0);
            let shorter = &wire[..wire.len() - 1];
            // DATA and DATAGRAM bodies take any size (in their bounds).
            let sized = kind != 3 && kind != 13;
            if sized {
                prop_assert!(Frame::decode(&longer).is_err());
            }
            prop_assert!(kind == 13 || kind == 3 && bytes.len() > 1 || Frame::decode(shorter).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(frame) = Frame::decode(&bytes) {
                prop_assert_eq!(encoded(frame), bytes);
            }
        }
    }

    #[test]
    fn an_open_carries_a_client_address_of_either_family_or_none() {
        let id = StreamId(9);
        for client in
            [None, Some("192.0.2.7:40000".parse().unwrap()), Some("[2001:db8::1]:1".parse().unwrap())]
        {
            let wire = encoded(Frame::Open { id, window: 77, client });
            assert_eq!(
                wire.len(),
                HEADER_LEN + 4 + client.map_or(0, |c: SocketAddr| 2 + if c.is_ipv4() { 4 } else { 16 })
            );
            assert_eq!(Frame::decode(&wire), Ok(Frame::Open { id, window: 77, client }));
        }
        // Any other length is no address: refused, not guessed at.
        for extra in [1, 2, 3, 5, 7, 17, 19, 30] {
            let mut wire = encoded(Frame::Open { id, window: 77, client: None });
            wire.extend(std::iter::repeat_n(1, extra));
            assert!(Frame::decode(&wire).is_err(), "{extra} bytes after the window");
        }
    }

    #[test]
    fn link_window_and_largest_data_round_trip() {
        let w = Frame::Window { id: StreamId::LINK, increment: MAX_WINDOW };
        assert_eq!(Frame::decode(&encoded(w)), Ok(w));
        let big = vec![7; MAX_DATA];
        let wire = encoded(Frame::Data { id: StreamId(9), bytes: &big });
        assert_eq!(wire.len(), MAX_PLAINTEXT);
        assert_eq!(Frame::decode(&wire), Ok(Frame::Data { id: StreamId(9), bytes: &big }));
        let mut header = [0u8; HEADER_LEN];
        write_data_header(StreamId(9), &mut header).unwrap();
        assert_eq!(header, wire[..HEADER_LEN]);
        assert_eq!(write_data_header(StreamId(9), &mut [0; 4]), None);
        // The largest datagram and an empty one travel whole.
        let big = vec![9; MAX_DATAGRAM];
        for bytes in [&big[..], &[][..]] {
            let d = Frame::Datagram { flow: FlowId(4), bytes };
            let wire = encoded(d);
            assert_eq!(Frame::decode(&wire), Ok(d));
            let mut header = [0u8; HEADER_LEN];
            write_datagram_header(FlowId(4), &mut header).unwrap();
            assert_eq!(header, wire[..HEADER_LEN]);
        }
    }

    #[test]
    fn every_rejection() {
        let id = StreamId(3);
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (vec![], FrameError::Short(0)),
            (vec![1, 0, 0, 0], FrameError::Short(4)),
            (vec![0, 0, 0, 0, 1], FrameError::UnknownType(0)),
            (vec![0x0e, 0, 0, 0, 1], FrameError::UnknownType(0x0e)),
            (
                encoded(Frame::Datagram { flow: FlowId(0), bytes: b"x" }),
                FrameError::ZeroStream(FrameKind::Datagram),
            ),
            (
                encoded(Frame::Datagram { flow: FlowId(1), bytes: &vec![0; MAX_DATAGRAM + 1] }),
                FrameError::DatagramTooLong(MAX_DATAGRAM + 1),
            ),
            (
                encoded(Frame::Resume { received: 1, token: [0; RESUME_TOKEN_LEN] })[..20].to_vec(),
                FrameError::BodyLength { kind: FrameKind::Resume, len: 15, expected: 40 },
            ),
            (
                {
                    let mut ack = encoded(Frame::Ack { received: 1 });
                    ack[4] = 2;
                    ack
                },
                FrameError::StreamOnLinkFrame { kind: FrameKind::Ack, id: 2 },
            ),
            (vec![0xff, 0, 0, 0, 0], FrameError::UnknownType(0xff)),
            (
                encoded(Frame::Open { id, window: 1, client: None })[..7].to_vec(),
                FrameError::BodyLength { kind: FrameKind::Open, len: 2, expected: 4 },
            ),
            (
                [encoded(Frame::End { id }), vec![0]].concat(),
                FrameError::BodyLength { kind: FrameKind::End, len: 1, expected: 0 },
            ),
            (
                encoded(Frame::Ping { nonce: 1 })[..9].to_vec(),
                FrameError::BodyLength { kind: FrameKind::Ping, len: 4, expected: 8 },
            ),
            (encoded(Frame::End { id: StreamId(0) }), FrameError::ZeroStream(FrameKind::End)),
            (
                encoded(Frame::Open { id: StreamId(0), window: 5, client: None }),
                FrameError::ZeroStream(FrameKind::Open),
            ),
            (
                encoded(Frame::Reset { id: StreamId(0), reason: Reason::CANCELLED }),
                FrameError::ZeroStream(FrameKind::Reset),
            ),
            (
                {
                    let mut ping = encoded(Frame::Ping { nonce: 1 });
                    ping[4] = 1;
                    ping
                },
                FrameError::StreamOnLinkFrame { kind: FrameKind::Ping, id: 1 },
            ),
            (
                {
                    let mut away = encoded(Frame::GoAway { reason: Reason::NO_ERROR });
                    away[1] = 1;
                    away
                },
                FrameError::StreamOnLinkFrame { kind: FrameKind::GoAway, id: 1 << 24 },
            ),
            (encoded(Frame::Data { id, bytes: &[] }), FrameError::EmptyData),
            (
                encoded(Frame::Data { id, bytes: &vec![0; MAX_DATA + 1] }),
                FrameError::DataTooLong(MAX_DATA + 1),
            ),
            (encoded(Frame::Window { id, increment: 0 }), FrameError::ZeroIncrement),
            (
                encoded(Frame::Window { id, increment: MAX_WINDOW + 1 }),
                FrameError::WindowTooLarge { kind: FrameKind::Window, value: MAX_WINDOW + 1 },
            ),
            (
                encoded(Frame::Accept { id, window: u32::MAX }),
                FrameError::WindowTooLarge { kind: FrameKind::Accept, value: u32::MAX },
            ),
        ];
        for (bytes, error) in cases {
            assert_eq!(Frame::decode(&bytes), Err(error), "{bytes:?}");
        }
    }

    #[test]
    fn reasons_print_their_name_or_number() {
        assert_eq!(Reason::STREAM_LIMIT.to_string(), "stream limit");
        assert_eq!(Reason(4242).to_string(), "reason 4242");
        assert_eq!(format!("{:?}", Reason::REFUSED), "Reason(2: backend refused)");
        assert_eq!(StreamId::new(7).to_string(), "#7");
    }
}
