//! A link: one Noise `IK` session ([`crate::noise::Intent::Link`]) between a
//! proxy (the initiator) and a service, carrying many **streams**, one per
//! client connection at the proxy, each connected by the service to its
//! backend. [`Link`] is the sans-io state machine of one end; [`wire`] holds
//! its frames. After the handshake every Noise message carries exactly one
//! frame as its plaintext, so the driver reads a message, opens it in place
//! and hands the plaintext to [`Link::handle_frame`], which lends `DATA`
//! payloads straight back: no copy on the receive path. On the send path the
//! driver reads socket bytes straight into its frame buffer after room for the
//! header, and [`Link::data_header`] fills that room: no copy either. The link
//! never sees ciphertext, sockets or stream bytes it does not need.
//!
//! # Streams
//! The proxy opens (`OPEN`, ids 1, 2, 3, … never reused on a link, so any id
//! below the next one names a stream that existed and a late frame for it is
//! told apart from a bogus one). The service answers `ACCEPT` only once its
//! backend connection is up, or `RESET` with a reason (refused, unreachable,
//! stream limit, going away): until `ACCEPT` nothing else moves on the stream,
//! so the proxy can still try another instance before its client has seen a
//! byte ([`LinkEvent::Refused`]). Then `DATA` flows both ways, `END`
//! half-closes one direction, `RESET` aborts both. A stream's state is freed
//! once both directions ended and every received byte was consumed, or at once
//! on a reset. Per stream the link keeps about 50 bytes and no buffer.
//!
//! # Flow control (from HTTP/2, QUIC and yamux)
//! - Credit per stream and per link, as in HTTP/2 and QUIC: a sender may have
//!   at most the receiver's window outstanding on a stream, and at most the
//!   link window on all streams together. The link window is what bounds the
//!   bytes a link can make its receiver buffer; per-stream windows keep one
//!   slow socket from taking all of it.
//! - The initial stream window travels in `OPEN` and `ACCEPT` (no settings
//!   frame to wait for); the link window starts at the protocol constant
//!   [`INITIAL_LINK_WINDOW`] (HTTP/2's 65,535 idea) and each side raises it at
//!   once with a `WINDOW` on stream 0.
//! - Window updates are batched as in yamux: credit is returned when at least
//!   half the window was consumed, not per read.
//! - Windows auto-tune as in yamux and QUIC: a stream starts at
//!   [`LinkConfig::initial_stream_window`] and its window doubles (up to
//!   [`LinkConfig::max_stream_window`]) whenever an update falls due less
//!   than two round trips after the previous one, i.e. when the consumer
//!   drains faster than the window lets the sender fill the pipe. A fixed small
//!   window is what cost frp 85% of its throughput; a fixed large one makes
//!   every idle stream a large potential buffer. RTT comes from our pings.
//! - Data for a stream already gone still counts against the link window and
//!   is credited back at once (HTTP/2 does the same), so credit never leaks.
//!
//! Backpressure is a value, never a queue: [`Link::send_credit`] says how many
//! bytes may go now; when it is 0 the driver stops reading that socket and
//! waits for [`LinkEvent::Writable`].
//!
//! # Scheduling
//! No priorities (HTTP/2's were unused and removed in RFC 9113's era; QUIC
//! leaves them to the application): round robin. The driver says which
//! streams have bytes waiting ([`Link::want_send`]) and asks
//! [`Link::next_send`] which stream goes next and how much it may send; a
//! stream that sent goes to the back of the queue. While other streams wait,
//! a frame is at most [`LinkConfig::max_frame_shared`] bytes, so a small
//! request waits for at most one such frame of each stream ahead of it; a
//! stream alone gets up to [`LinkConfig::max_frame_alone`].
//!
//! # Going away and failure
//! `GOAWAY` is HTTP/2's, without the last-stream id: the sender opens (proxy)
//! or accepts (service) no new streams and open ones finish; an `OPEN` that
//! crossed a service's `GOAWAY` is answered `RESET` with
//! [`Reason::GOING_AWAY`], which says the stream never started and may be
//! retried elsewhere. [`LinkEvent::Drained`] tells the driver when the last
//! stream is gone. A `GOAWAY` with an error reason ends the link at once.
//! When a link fails (protocol error, silent peer, closed transport) every
//! stream gets a [`LinkEvent::Reset`] with [`Reason::LINK_LOST`] (the client
//! must see a reset, not a clean end), then [`LinkEvent::Closed`]. Keepalive:
//! a `PING` every [`LinkConfig::keepalive`]; a peer from which no frame came
//! for [`LinkConfig::dead_after`] is dead.
//!
//! # Call order
//! After every call that changes the link (`handle_frame`, `handle_timeout`,
//! `handle_closed` and every stream operation): drain [`Link::poll_transmit`]
//! (one frame per call; seal each as one Noise message), then
//! [`Link::poll_event`], then ask [`Link::poll_timeout`]. Receive path: open
//! the message in place, `handle_frame(now, plaintext)`; for
//! [`Incoming::Data`] write the bytes to the stream's socket and, once
//! written, call `consumed(now, id, n)`. On `Reset` or `Closed` events drop
//! whatever the stream still buffers. Send path: `want_send(id)` when a
//! socket is readable; then loop `next_send()` → `(id, credit)`, read at most
//! `credit` bytes from that socket into `buf[HEADER_LEN..]`, call
//! `data_header(id, n, &mut buf)` and seal the frame before the next
//! `poll_transmit`; call `want_send(id)` again if the socket has more, or
//! `end(id)` at its EOF.
//!
//! Invariants: nothing a peer sends panics or grows memory without bound
//! (streams are capped by [`LinkConfig::max_streams`], buffered bytes by the
//! windows, control replies to a peer that does not read them by
//! [`CONTROL_BACKLOG`]); the receiver never accepts a byte beyond the credit
//! it granted; per stream, `allowed + unconsumed + pending == window`.

pub mod wire;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

pub use wire::{Frame, FrameError, FrameKind, HEADER_LEN, MAX_DATA, MAX_WINDOW, Reason, StreamId};

/// The link window each side may assume before the peer's first link-level
/// `WINDOW`: a protocol constant, so no settings exchange is needed.
pub const INITIAL_LINK_WINDOW: u32 = 64 * 1024;
/// Most control frames queued when a peer's `OPEN` needs a refusal: beyond
/// it the peer is taken to be flooding (it keeps opening while not reading
/// our replies). A driver that drains `poll_transmit` after every call
/// keeps the queue near empty.
pub const CONTROL_BACKLOG: usize = 4096;
/// Longest keepalive or dead-after: a day (keeps `Instant` arithmetic far from overflow).
const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Round-trip time assumed for window auto-tuning until the first pong.
const INITIAL_RTT: Duration = Duration::from_millis(100);

/// Which end of the link this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The initiator: opens streams for its clients.
    Proxy,
    /// The responder: accepts streams and connects them to its backend.
    Service,
}

/// Limits and tuning of one link. Out-of-range values are clamped by
/// [`Link::new`] (a zero window or keepalive would stall or spin): windows to
/// 1..=[`MAX_WINDOW`] (the link window to at least [`INITIAL_LINK_WINDOW`]),
/// frame sizes to 1..=[`MAX_DATA`], intervals to 1 ms..=1 day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Most concurrent streams; a service refuses more with
    /// [`Reason::STREAM_LIMIT`], a proxy's `open` fails. Default 1024.
    pub max_streams: usize,
    /// Receive window a stream starts with. Default 256 KiB (yamux's), grown
    /// by auto-tuning for streams whose consumer keeps up.
    pub initial_stream_window: u32,
    /// Most a stream's receive window grows to. Default 8 MiB: enough for
    /// about 1 Gbit/s at 60 ms round trip on one stream.
    pub max_stream_window: u32,
    /// Receive window of the link: the most bytes the peer can make us hold
    /// (received, not yet consumed) over all streams. Default 16 MiB.
    pub link_window: u32,
    /// Largest `DATA` payload while other streams wait to send. Default 16 KiB:
    /// small enough that a request behind a bulk transfer waits microseconds
    /// at LAN speeds, large enough that headers and seals stay cheap.
    pub max_frame_shared: usize,
    /// Largest `DATA` payload for a stream sending alone. Default [`MAX_DATA`].
    pub max_frame_alone: usize,
    /// How often to ping. Default 10 s.
    pub keepalive: Duration,
    /// A peer silent this long is dead. Default 30 s (three pings lost).
    pub dead_after: Duration,
}

impl Default for LinkConfig {
    fn default() -> LinkConfig {
        LinkConfig {
            max_streams: 1024,
            initial_stream_window: 256 * 1024,
            max_stream_window: 8 * 1024 * 1024,
            link_window: 16 * 1024 * 1024,
            max_frame_shared: 16 * 1024,
            max_frame_alone: MAX_DATA,
            keepalive: Duration::from_secs(10),
            dead_after: Duration::from_secs(30),
        }
    }
}

impl LinkConfig {
    fn clamped(mut self) -> LinkConfig {
        self.initial_stream_window = self.initial_stream_window.clamp(1, MAX_WINDOW);
        self.max_stream_window = self.max_stream_window.clamp(self.initial_stream_window, MAX_WINDOW);
        self.link_window = self.link_window.clamp(INITIAL_LINK_WINDOW, MAX_WINDOW);
        self.max_frame_alone = self.max_frame_alone.clamp(1, MAX_DATA);
        self.max_frame_shared = self.max_frame_shared.clamp(1, self.max_frame_alone);
        self.keepalive = self.keepalive.clamp(Duration::from_millis(1), MAX_INTERVAL);
        self.dead_after = self.dead_after.clamp(self.keepalive, MAX_INTERVAL);
        self
    }
}

/// What the peer did wrong, or why else the link ended. Any of these ends
/// the link: every stream is reset and [`LinkEvent::Closed`] follows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// A frame did not decode.
    #[error("malformed frame: {0}")]
    Malformed(#[from] FrameError),
    /// A frame only the other side may send (a service opening, a proxy accepting).
    #[error("peer sent {0:?}, which only the other side of a link sends")]
    WrongDirection(FrameKind),
    /// A frame on a stream that was never opened.
    #[error("peer sent {kind:?} on stream {id}, which was never opened")]
    UnknownStream {
        /// The stream.
        id: StreamId,
        /// The frame.
        kind: FrameKind,
    },
    /// An `OPEN` whose id is not above every earlier one.
    #[error("peer opened stream {0} again or out of order (ids must increase)")]
    StreamIdReused(StreamId),
    /// A frame the stream's state forbids: data before `ACCEPT` or after
    /// `END`, a second `END` or `ACCEPT`.
    #[error("peer sent {kind:?} on stream {id} {when}")]
    Unexpected {
        /// The stream.
        id: StreamId,
        /// The frame.
        kind: FrameKind,
        /// The state that forbids it.
        when: &'static str,
    },
    /// More bytes on a stream than the credit we granted.
    #[error("peer sent {len} bytes on stream {id} with {allowed} bytes of credit")]
    StreamWindowExceeded {
        /// The stream.
        id: StreamId,
        /// Bytes in the frame.
        len: usize,
        /// Credit it had left.
        allowed: u32,
    },
    /// More bytes on the link than the credit we granted.
    #[error("peer sent {len} bytes with {allowed} bytes of link credit")]
    LinkWindowExceeded {
        /// Bytes in the frame.
        len: usize,
        /// Link credit it had left.
        allowed: u32,
    },
    /// Increments that add up beyond [`MAX_WINDOW`].
    #[error("peer granted credit beyond {MAX_WINDOW} on stream {0}")]
    CreditOverflow(StreamId),
    /// The peer keeps sending while not reading our answers.
    #[error("peer does not read: over {CONTROL_BACKLOG} replies queued")]
    Flooded,
    /// No frame for [`LinkConfig::dead_after`].
    #[error("peer silent for {0:?}")]
    Silent(Duration),
    /// The peer ended the link with an error `GOAWAY`.
    #[error("peer ended the link: {0}")]
    PeerAborted(Reason),
    /// The driver reported the transport closed ([`Link::handle_closed`]).
    #[error("transport closed")]
    Closed,
}

impl LinkError {
    /// What to tell the peer in a final `GOAWAY`, if it is worth telling.
    fn wire_reason(&self) -> Option<Reason> {
        match self {
            LinkError::StreamWindowExceeded { .. }
            | LinkError::LinkWindowExceeded { .. }
            | LinkError::CreditOverflow(_) => Some(Reason::FLOW_CONTROL),
            LinkError::Silent(_) | LinkError::PeerAborted(_) | LinkError::Closed => None,
            _ => Some(Reason::PROTOCOL),
        }
    }
}

/// A stream operation the driver asked for that cannot be done. These are
/// races (the peer reset the stream first) or driver bugs; the link is
/// unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The link has closed.
    #[error("the link is closed")]
    LinkClosed,
    /// A proxy-only or service-only operation on the other side.
    #[error("only the other side of a link does that")]
    WrongSide,
    /// The stream is gone (reset, finished) or never existed.
    #[error("no stream {0} on this link")]
    Unknown(StreamId),
    /// Not accepted yet (or the `ACCEPT` is not transmitted yet): nothing
    /// but a reset may be sent.
    #[error("stream {0} is not accepted yet")]
    NotAccepted(StreamId),
    /// `accept` or `refuse` on a stream already accepted.
    #[error("stream {0} is already accepted")]
    AlreadyAccepted(StreamId),
    /// Data or `END` after `END`.
    #[error("stream {0} already ended its sending side")]
    Ended(StreamId),
    /// A data frame larger than the credit ([`Link::send_credit`]), or empty.
    #[error("{len} bytes on stream {id} with {credit} bytes of credit")]
    NoCredit {
        /// The stream.
        id: StreamId,
        /// Bytes asked for.
        len: usize,
        /// Bytes allowed (ignoring fairness).
        credit: usize,
    },
    /// The buffer given to `data_header` is shorter than [`HEADER_LEN`].
    #[error("header buffer shorter than {HEADER_LEN} bytes")]
    BufferTooSmall,
    /// `consumed` of more bytes than were received and not yet consumed.
    #[error("{n} bytes consumed on stream {id}, only {unconsumed} were received")]
    OverConsumed {
        /// The stream.
        id: StreamId,
        /// Bytes reported.
        n: usize,
        /// Bytes outstanding.
        unconsumed: u32,
    },
    /// `open` at [`LinkConfig::max_streams`].
    #[error("stream limit reached")]
    StreamLimit,
    /// `open` after a `GOAWAY` either way.
    #[error("the link is going away")]
    GoingAway,
    /// All 2^32 - 1 stream ids used: open a new link.
    #[error("stream ids exhausted")]
    IdsExhausted,
}

/// What `handle_frame` hands back at once. Non-exhaustive for growth; today
/// only data, because it borrows the frame and so cannot wait in a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Incoming<'a> {
    /// Bytes for the stream, in order: write them to its socket, then call
    /// [`Link::consumed`].
    Data {
        /// The stream.
        id: StreamId,
        /// The payload, borrowed from the frame given to `handle_frame`.
        bytes: &'a [u8],
    },
}

/// What the driver learns from [`Link::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkEvent {
    /// Service: the proxy opened a stream. Connect the backend, then
    /// [`Link::accept`] or [`Link::refuse`].
    Opened {
        /// The stream.
        id: StreamId,
    },
    /// Proxy: the service reached its backend; the stream carries data now.
    Accepted {
        /// The stream.
        id: StreamId,
    },
    /// Proxy: the service reset the stream before accepting it; nothing
    /// reached a backend, so another instance may be tried.
    Refused {
        /// The stream.
        id: StreamId,
        /// Why.
        reason: Reason,
    },
    /// The peer sent all its data on the stream: after writing what was
    /// delivered, shut down the socket's write side.
    End {
        /// The stream.
        id: StreamId,
    },
    /// The stream was aborted (by the peer, or [`Reason::LINK_LOST`]): reset
    /// its socket and drop what it buffers.
    Reset {
        /// The stream.
        id: StreamId,
        /// Why.
        reason: Reason,
    },
    /// A stream that was told it had no credit has some again.
    Writable {
        /// The stream.
        id: StreamId,
    },
    /// The peer sent a graceful `GOAWAY`: no new streams on this link.
    GoAway,
    /// A `GOAWAY` went one way or the other and no stream is left: close
    /// the link.
    Drained,
    /// The link ended (after a `Reset` for each stream): close the transport.
    Closed {
        /// Why.
        error: LinkError,
    },
}

/// One stream's state: counters and flags, no buffers.
#[derive(Debug)]
struct Stream {
    /// Bytes we may still send (the peer's grant).
    send_credit: u32,
    /// Our current receive window for the stream (auto-tuned).
    recv_window: u32,
    /// Bytes the peer may still send.
    recv_allowed: u32,
    /// Bytes delivered to the driver and not yet consumed.
    unconsumed: u32,
    /// Bytes consumed and not yet credited back.
    pending: u32,
    /// When credit was last returned (auto-tuning).
    last_update: Instant,
    /// Proxy: `ACCEPT` received. Service: `accept` called.
    accepted: bool,
    /// Service: `ACCEPT` queued and not transmitted yet, so no data may go.
    accept_unsent: bool,
    sent_end: bool,
    recv_end: bool,
    /// The driver has bytes for it ([`Link::want_send`]).
    wants_send: bool,
    /// In the ready queue.
    queued: bool,
    /// The driver was told it had no credit: owed a `Writable`.
    blocked: bool,
}

impl Stream {
    fn new(now: Instant, send_credit: u32, recv_window: u32, accepted: bool) -> Stream {
        Stream {
            send_credit,
            recv_window,
            recv_allowed: recv_window,
            unconsumed: 0,
            pending: 0,
            last_update: now,
            accepted,
            accept_unsent: false,
            sent_end: false,
            recv_end: false,
            wants_send: false,
            queued: false,
            blocked: false,
        }
    }

    fn sendable(&self) -> bool {
        self.accepted && !self.accept_unsent && !self.sent_end
    }

    fn finished(&self) -> bool {
        self.sent_end && self.recv_end && self.unconsumed == 0
    }
}

/// One end of a link; see the module docs for the call order.
#[derive(Debug)]
pub struct Link {
    side: Side,
    config: LinkConfig,
    streams: BTreeMap<u32, Stream>,
    /// Ids below this were opened (by the proxy) at some point.
    next_id: u64,
    /// Link credit for sending.
    send_credit: u32,
    /// Link credit the peer has left.
    recv_allowed: u32,
    /// Bytes received on live streams and not consumed.
    unconsumed: u32,
    /// Link bytes consumed (or discarded) and not yet credited back.
    pending: u32,
    /// Streams waiting to send, round robin; each live stream at most once
    /// (`queued`), and no forgotten one.
    ready: VecDeque<u32>,
    /// Control frames to send, in order. Never `Data`.
    control: VecDeque<Frame<'static>>,
    /// The latest ping to answer; pongs coalesce so pings cannot queue.
    pong: Option<u64>,
    events: VecDeque<LinkEvent>,
    ping_nonce: u64,
    ping_sent: Option<(u64, Instant)>,
    rtt: Option<Duration>,
    next_ping: Instant,
    last_heard: Instant,
    go_away_sent: bool,
    go_away_received: bool,
    drained: bool,
    closed: bool,
}

impl Link {
    /// A link whose handshake just completed. Queues the link window's
    /// raise and a first ping (to learn the round-trip time).
    pub fn new(side: Side, config: LinkConfig, now: Instant) -> Link {
        let config = config.clamped();
        let mut link = Link {
            side,
            streams: BTreeMap::new(),
            next_id: 1,
            send_credit: INITIAL_LINK_WINDOW,
            recv_allowed: config.link_window,
            unconsumed: 0,
            pending: 0,
            ready: VecDeque::new(),
            control: VecDeque::new(),
            pong: None,
            events: VecDeque::new(),
            ping_nonce: 0,
            ping_sent: None,
            rtt: None,
            next_ping: now,
            last_heard: now,
            go_away_sent: false,
            go_away_received: false,
            drained: false,
            closed: false,
            config,
        };
        if let Some(increment) = link.config.link_window.checked_sub(INITIAL_LINK_WINDOW).filter(|n| *n > 0) {
            link.control.push_back(Frame::Window { id: StreamId::LINK, increment });
        }
        link.send_ping(now);
        link
    }

    /// Which end this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The limits in force (after clamping).
    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// Streams with state on this link.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Bytes delivered by `handle_frame` and not yet `consumed`, over all
    /// streams; never more than [`LinkConfig::link_window`].
    pub fn buffered(&self) -> usize {
        self.unconsumed as usize
    }

    /// Bytes this end may still send on the link as a whole (all streams).
    pub fn link_credit(&self) -> usize {
        self.send_credit as usize
    }

    /// Bytes consumed (or dropped with their stream) and not yet credited
    /// back to the peer: under half the link window. With nothing in flight
    /// and nothing buffered, the peer's [`Link::link_credit`] plus this is
    /// the link window: no credit is ever lost.
    pub fn credit_owed(&self) -> usize {
        self.pending as usize
    }

    /// Whether the link has ended.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The last measured round-trip time.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Handles one frame (one Noise message's plaintext). Data comes back at
    /// once, borrowing `frame`; everything else becomes events. An error ends
    /// the link (events follow, and a `GOAWAY` naming the error in
    /// `poll_transmit`). Frames after the end are ignored.
    pub fn handle_frame<'a>(
        &mut self,
        now: Instant,
        frame: &'a [u8],
    ) -> Result<Option<Incoming<'a>>, LinkError> {
        if self.closed {
            return Ok(None);
        }
        let result = Frame::decode(frame).map_err(LinkError::from).and_then(|f| self.on_frame(now, f));
        self.last_heard = now;
        result.inspect_err(|e| self.close(e.clone())).inspect(|_| self.check_drained())
    }

    fn on_frame<'a>(&mut self, now: Instant, frame: Frame<'a>) -> Result<Option<Incoming<'a>>, LinkError> {
        let kind = frame.kind();
        match frame {
            Frame::Open { id, window } => self.on_open(now, id, window)?,
            Frame::Accept { id, window } => {
                if self.side == Side::Service {
                    return Err(LinkError::WrongDirection(kind));
                }
                let Some(s) = self.live(id, kind)? else { return Ok(None) };
                if s.accepted {
                    return Err(LinkError::Unexpected { id, kind, when: "after ACCEPT" });
                }
                s.accepted = true;
                s.send_credit = window;
                self.events.push_back(LinkEvent::Accepted { id });
            }
            Frame::Data { id, bytes } => return self.on_data(id, bytes),
            Frame::End { id } => {
                let Some(s) = self.live(id, kind)? else { return Ok(None) };
                if !s.accepted || s.accept_unsent {
                    return Err(LinkError::Unexpected { id, kind, when: "before ACCEPT" });
                }
                if s.recv_end {
                    return Err(LinkError::Unexpected { id, kind, when: "after END" });
                }
                s.recv_end = true;
                self.events.push_back(LinkEvent::End { id });
                self.forget_if_finished(id);
            }
            Frame::Reset { id, reason } => {
                let proxy = self.side == Side::Proxy;
                let Some(s) = self.live(id, kind)? else { return Ok(None) };
                let event = if proxy && !s.accepted {
                    LinkEvent::Refused { id, reason }
                } else {
                    LinkEvent::Reset { id, reason }
                };
                self.forget(id);
                self.events.push_back(event);
            }
            Frame::Window { id: StreamId::LINK, increment } => {
                let was_empty = self.send_credit == 0;
                self.send_credit = add_credit(self.send_credit, increment, StreamId::LINK)?;
                if was_empty {
                    let blocked: Vec<u32> =
                        self.streams.iter().filter(|(_, s)| s.blocked).map(|(id, _)| *id).collect();
                    for id in blocked {
                        self.unblock(id);
                    }
                }
            }
            Frame::Window { id, increment } => {
                let Some(s) = self.live(id, kind)? else { return Ok(None) };
                s.send_credit = add_credit(s.send_credit, increment, id)?;
                self.unblock(id.get());
            }
            Frame::Ping { nonce } => self.pong = Some(nonce),
            Frame::Pong { nonce } => {
                if let Some((_, sent)) = self.ping_sent.filter(|(n, _)| *n == nonce) {
                    self.rtt = Some(now.saturating_duration_since(sent));
                    self.ping_sent = None;
                }
            }
            Frame::GoAway { reason } if reason != Reason::NO_ERROR => {
                return Err(LinkError::PeerAborted(reason));
            }
            Frame::GoAway { .. } => {
                if !self.go_away_received {
                    self.go_away_received = true;
                    self.events.push_back(LinkEvent::GoAway);
                }
            }
        }
        Ok(None)
    }

    fn on_open(&mut self, now: Instant, id: StreamId, window: u32) -> Result<(), LinkError> {
        if self.side == Side::Proxy {
            return Err(LinkError::WrongDirection(FrameKind::Open));
        }
        if u64::from(id.get()) < self.next_id {
            return Err(LinkError::StreamIdReused(id));
        }
        self.next_id = u64::from(id.get()) + 1;
        let refusal = if self.go_away_sent {
            Some(Reason::GOING_AWAY)
        } else if self.streams.len() >= self.config.max_streams {
            Some(Reason::STREAM_LIMIT)
        } else {
            None
        };
        if let Some(reason) = refusal {
            if self.control.len() >= CONTROL_BACKLOG {
                return Err(LinkError::Flooded);
            }
            self.control.push_back(Frame::Reset { id, reason });
            return Ok(());
        }
        self.streams.insert(id.get(), Stream::new(now, window, self.config.initial_stream_window, false));
        self.events.push_back(LinkEvent::Opened { id });
        Ok(())
    }

    fn on_data<'a>(&mut self, id: StreamId, bytes: &'a [u8]) -> Result<Option<Incoming<'a>>, LinkError> {
        // At most MAX_DATA, checked by the decoder.
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        let link_allowed = self.recv_allowed;
        self.recv_allowed = link_allowed
            .checked_sub(len)
            .ok_or(LinkError::LinkWindowExceeded { len: bytes.len(), allowed: link_allowed })?;
        let Some(s) = self.live(id, FrameKind::Data)? else {
            // A stream we already forgot: the bytes are dropped, the credit returned.
            self.pending = self.pending.saturating_add(len);
            self.maybe_update_link();
            return Ok(None);
        };
        if !s.accepted || s.accept_unsent {
            return Err(LinkError::Unexpected { id, kind: FrameKind::Data, when: "before ACCEPT" });
        }
        if s.recv_end {
            return Err(LinkError::Unexpected { id, kind: FrameKind::Data, when: "after END" });
        }
        s.recv_allowed = s.recv_allowed.checked_sub(len).ok_or(LinkError::StreamWindowExceeded {
            id,
            len: bytes.len(),
            allowed: s.recv_allowed,
        })?;
        s.unconsumed = s.unconsumed.saturating_add(len);
        self.unconsumed = self.unconsumed.saturating_add(len);
        Ok(Some(Incoming::Data { id, bytes }))
    }

    /// The stream a peer frame names: `Some` if it lives, `None` if it lived
    /// once (a frame that crossed our reset or the end: ignored), an error if
    /// it never existed.
    fn live(&mut self, id: StreamId, kind: FrameKind) -> Result<Option<&mut Stream>, LinkError> {
        if u64::from(id.get()) >= self.next_id {
            return Err(LinkError::UnknownStream { id, kind });
        }
        Ok(self.streams.get_mut(&id.get()))
    }

    /// The transport ended (EOF, I/O error, a message that failed to
    /// decrypt): every stream is reset.
    pub fn handle_closed(&mut self) {
        self.close(LinkError::Closed);
    }

    /// Sends a ping when one is due; declares the peer dead when it has been
    /// silent for `dead_after`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if now.saturating_duration_since(self.last_heard) >= self.config.dead_after {
            self.close(LinkError::Silent(self.config.dead_after));
        } else if now >= self.next_ping {
            self.send_ping(now);
        }
    }

    fn send_ping(&mut self, now: Instant) {
        self.ping_nonce = self.ping_nonce.wrapping_add(1);
        self.control.push_back(Frame::Ping { nonce: self.ping_nonce });
        self.ping_sent = Some((self.ping_nonce, now));
        self.next_ping = now + self.config.keepalive;
    }

    /// When `handle_timeout` is next due; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.closed).then(|| self.next_ping.min(self.last_heard + self.config.dead_after))
    }

    /// Appends one control frame's plaintext to `buf` (seal it as one Noise
    /// message); false when there is none. `DATA` never comes from here.
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool {
        let frame = match self.pong.take() {
            Some(nonce) => Frame::Pong { nonce },
            None => match self.control.pop_front() {
                Some(frame) => frame,
                None => return false,
            },
        };
        if let Frame::Accept { id, .. } = frame {
            if let Some(s) = self.streams.get_mut(&id.get()) {
                s.accept_unsent = false;
                self.unblock(id.get());
            }
        }
        frame.encode(buf);
        true
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// Proxy: opens a stream for a new client; `OPEN` goes out with the next
    /// `poll_transmit`. Wait for [`LinkEvent::Accepted`] (or `Refused`)
    /// before sending on it.
    pub fn open(&mut self, now: Instant) -> Result<StreamId, StreamError> {
        if self.side != Side::Proxy {
            return Err(StreamError::WrongSide);
        }
        self.check_open()?;
        if self.go_away_sent || self.go_away_received {
            return Err(StreamError::GoingAway);
        }
        if self.streams.len() >= self.config.max_streams {
            return Err(StreamError::StreamLimit);
        }
        let raw = u32::try_from(self.next_id).map_err(|_| StreamError::IdsExhausted)?;
        self.next_id += 1;
        let window = self.config.initial_stream_window;
        self.streams.insert(raw, Stream::new(now, 0, window, false));
        let id = StreamId::new(raw);
        self.control.push_back(Frame::Open { id, window });
        Ok(id)
    }

    /// Service: the backend is connected; `ACCEPT` goes out next and the
    /// stream may carry data once it has (see [`Link::send_credit`]).
    pub fn accept(&mut self, id: StreamId) -> Result<(), StreamError> {
        let window = self.config.initial_stream_window;
        let s = self.unaccepted(id)?;
        s.accepted = true;
        s.accept_unsent = true;
        self.control.push_back(Frame::Accept { id, window });
        Ok(())
    }

    /// Service: the backend could not be reached; the stream is reset with
    /// `reason` (e.g. [`Reason::REFUSED`]) and the proxy may try elsewhere.
    pub fn refuse(&mut self, id: StreamId, reason: Reason) -> Result<(), StreamError> {
        self.unaccepted(id)?;
        self.forget(id);
        self.control.push_back(Frame::Reset { id, reason });
        self.check_drained();
        Ok(())
    }

    fn unaccepted(&mut self, id: StreamId) -> Result<&mut Stream, StreamError> {
        if self.side != Side::Service {
            return Err(StreamError::WrongSide);
        }
        self.check_open()?;
        let s = self.streams.get_mut(&id.get()).ok_or(StreamError::Unknown(id))?;
        if s.accepted {
            return Err(StreamError::AlreadyAccepted(id));
        }
        Ok(s)
    }

    /// A stream whose sending side the driver may act on: accepted, not ended.
    fn sending(&mut self, id: StreamId) -> Result<&mut Stream, StreamError> {
        self.check_open()?;
        let s = self.streams.get_mut(&id.get()).ok_or(StreamError::Unknown(id))?;
        if s.sent_end {
            return Err(StreamError::Ended(id));
        }
        if !s.accepted {
            return Err(StreamError::NotAccepted(id));
        }
        Ok(s)
    }

    fn check_open(&self) -> Result<(), StreamError> {
        if self.closed { Err(StreamError::LinkClosed) } else { Ok(()) }
    }

    /// Bytes the next `DATA` frame on `id` may carry now: the least of the
    /// stream's credit, the link's credit and the fairness cap. 0 means
    /// wait for [`LinkEvent::Writable`] (also 0 for a stream that cannot send).
    pub fn send_credit(&mut self, id: StreamId) -> usize {
        // `ready` holds each queued stream once: count instead of scanning, so
        // waking many streams (a link credit update) costs O(1) each.
        let queued = self.streams.get(&id.get()).is_some_and(|s| s.queued);
        let others_waiting = self.ready.len() > usize::from(queued);
        self.credit(id.get(), others_waiting)
    }

    fn credit(&mut self, raw: u32, others_waiting: bool) -> usize {
        let link = self.send_credit;
        let cap = if others_waiting { self.config.max_frame_shared } else { self.config.max_frame_alone };
        let Some(s) = self.streams.get_mut(&raw).filter(|s| s.accepted && !s.sent_end) else { return 0 };
        // An ACCEPT not yet transmitted holds the stream back like missing credit.
        let credit = if s.accept_unsent { 0 } else { (s.send_credit.min(link) as usize).min(cap) };
        if credit == 0 {
            s.blocked = true;
        }
        credit
    }

    /// The driver has bytes for `id`: queue it for [`Link::next_send`]
    /// (once; calling again while queued changes nothing).
    pub fn want_send(&mut self, id: StreamId) -> Result<(), StreamError> {
        let s = self.sending(id)?;
        s.wants_send = true;
        if !s.queued {
            s.queued = true;
            self.ready.push_back(id.get());
        }
        Ok(())
    }

    /// The stream whose turn it is to send, and how many bytes it may put in
    /// one frame. Streams with no credit are skipped (owed a `Writable`,
    /// after which they rejoin the queue by themselves). Call `want_send`
    /// again if the stream has more after this frame: it goes to the back.
    pub fn next_send(&mut self) -> Option<(StreamId, usize)> {
        while let Some(raw) = self.ready.pop_front() {
            let Some(s) = self.streams.get_mut(&raw) else { continue };
            s.queued = false;
            if !s.wants_send {
                continue;
            }
            let others_waiting = !self.ready.is_empty();
            let credit = self.credit(raw, others_waiting);
            if let Some(s) = self.streams.get_mut(&raw).filter(|_| credit > 0) {
                s.wants_send = false;
                return Some((StreamId::new(raw), credit));
            }
        }
        None
    }

    /// Writes the header of a `DATA` frame carrying `len` bytes on `id` into
    /// `out[..HEADER_LEN]` (the payload follows it in the same buffer) and
    /// debits the credit. Returns [`HEADER_LEN`]. `len` must be 1 to the
    /// credit; the fairness cap is advice, not checked.
    pub fn data_header(&mut self, id: StreamId, len: usize, out: &mut [u8]) -> Result<usize, StreamError> {
        let link = self.send_credit;
        let s = self.sending(id)?;
        if s.accept_unsent {
            return Err(StreamError::NotAccepted(id));
        }
        let credit = (s.send_credit.min(link) as usize).min(MAX_DATA);
        let n = u32::try_from(len).ok().filter(|n| *n > 0 && len <= credit);
        let n = n.ok_or(StreamError::NoCredit { id, len, credit })?;
        wire::write_data_header(id, out).ok_or(StreamError::BufferTooSmall)?;
        // n <= credit <= both credits, checked above.
        s.send_credit -= n;
        let link = link - n;
        if s.send_credit == 0 || link == 0 {
            s.blocked = true;
        }
        self.send_credit = link;
        Ok(HEADER_LEN)
    }

    /// The sending side of `id` is done (the client or backend sent EOF):
    /// `END` goes out next, after the data already sealed.
    pub fn end(&mut self, id: StreamId) -> Result<(), StreamError> {
        let s = self.sending(id)?;
        s.sent_end = true;
        s.wants_send = false;
        s.blocked = false;
        self.control.push_back(Frame::End { id });
        self.forget_if_finished(id);
        self.check_drained();
        Ok(())
    }

    /// Aborts `id` both ways (`RESET` goes out next) and forgets it; what
    /// the driver buffers for it is dropped. Also cancels an unaccepted
    /// stream (proxy: its client went away).
    pub fn reset(&mut self, id: StreamId, reason: Reason) -> Result<(), StreamError> {
        self.check_open()?;
        if !self.streams.contains_key(&id.get()) {
            return Err(StreamError::Unknown(id));
        }
        self.forget(id);
        self.control.push_back(Frame::Reset { id, reason });
        self.check_drained();
        Ok(())
    }

    /// `n` bytes of `id` were delivered to its socket: credit them back to
    /// the peer, in batches of half a window.
    pub fn consumed(&mut self, now: Instant, id: StreamId, n: usize) -> Result<(), StreamError> {
        self.check_open()?;
        let rtt = self.rtt.unwrap_or(INITIAL_RTT);
        let max_window = self.config.max_stream_window;
        let s = self.streams.get_mut(&id.get()).ok_or(StreamError::Unknown(id))?;
        let unconsumed = s.unconsumed;
        let n32 = u32::try_from(n).ok().filter(|n| *n <= unconsumed);
        let n32 = n32.ok_or(StreamError::OverConsumed { id, n, unconsumed })?;
        s.unconsumed -= n32;
        s.pending += n32;
        if !s.recv_end && s.pending > 0 && s.pending >= s.recv_window / 2 {
            // Auto-tuning: a window used up again within two round trips is
            // what limits the stream, so it doubles.
            let fast = now.saturating_duration_since(s.last_update) < rtt * 2;
            let grown = if fast { s.recv_window.saturating_mul(2).min(max_window) } else { s.recv_window };
            let increment = s.pending + (grown - s.recv_window);
            s.recv_window = grown;
            s.recv_allowed += increment;
            s.pending = 0;
            s.last_update = now;
            self.control.push_back(Frame::Window { id, increment });
        }
        self.unconsumed -= n32;
        self.pending += n32;
        self.maybe_update_link();
        self.forget_if_finished(id);
        self.check_drained();
        Ok(())
    }

    fn maybe_update_link(&mut self) {
        if self.pending > 0 && self.pending >= self.config.link_window / 2 {
            self.control.push_back(Frame::Window { id: StreamId::LINK, increment: self.pending });
            self.recv_allowed += self.pending;
            self.pending = 0;
        }
    }

    /// No new streams on this link (drain before shutdown or rotation):
    /// `GOAWAY` goes out next; open streams finish, then
    /// [`LinkEvent::Drained`].
    pub fn go_away(&mut self) {
        if self.closed || self.go_away_sent {
            return;
        }
        self.go_away_sent = true;
        self.control.push_back(Frame::GoAway { reason: Reason::NO_ERROR });
        self.check_drained();
    }

    fn unblock(&mut self, raw: u32) {
        let link = self.send_credit;
        let Some(s) = self.streams.get_mut(&raw) else { return };
        if !s.blocked || !s.sendable() || s.send_credit.min(link) == 0 {
            return;
        }
        s.blocked = false;
        if s.wants_send && !s.queued {
            s.queued = true;
            self.ready.push_back(raw);
        }
        self.events.push_back(LinkEvent::Writable { id: StreamId::new(raw) });
    }

    fn forget_if_finished(&mut self, id: StreamId) {
        if self.streams.get(&id.get()).is_some_and(Stream::finished) {
            self.forget(id);
        }
    }

    /// Frees a stream; bytes the driver still held for it are dropped, so
    /// their link credit goes back to the peer.
    fn forget(&mut self, id: StreamId) {
        if let Some(s) = self.streams.remove(&id.get()) {
            if s.queued {
                // Keeps the ready queue no longer than the live streams.
                self.ready.retain(|r| *r != id.get());
            }
            self.unconsumed -= s.unconsumed;
            self.pending += s.unconsumed;
            self.maybe_update_link();
        }
    }

    fn check_drained(&mut self) {
        if !self.drained
            && !self.closed
            && (self.go_away_sent || self.go_away_received)
            && self.streams.is_empty()
        {
            self.drained = true;
            self.events.push_back(LinkEvent::Drained);
        }
    }

    fn close(&mut self, error: LinkError) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.control.clear();
        self.ready.clear();
        self.pong = None;
        if let Some(reason) = error.wire_reason() {
            self.control.push_back(Frame::GoAway { reason });
        }
        for id in std::mem::take(&mut self.streams).into_keys() {
            self.events.push_back(LinkEvent::Reset { id: StreamId::new(id), reason: Reason::LINK_LOST });
        }
        self.unconsumed = 0;
        self.events.push_back(LinkEvent::Closed { error });
    }
}

fn add_credit(credit: u32, increment: u32, id: StreamId) -> Result<u32, LinkError> {
    credit.checked_add(increment).filter(|c| *c <= MAX_WINDOW).ok_or(LinkError::CreditOverflow(id))
}

#[cfg(test)]
mod tests;
