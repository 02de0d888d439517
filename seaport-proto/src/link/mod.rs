//! A link: one Noise `IK` session ([`crate::hello::Intent::Link`]) between a
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
//! Round robin, no priorities (`schedule.rs` says why). The driver says which
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
//! Where each concern lives: `mod.rs` (here) the public face, the
//! `handle_*`/`poll_*` verbs and the stream operations; `receive.rs` what
//! each peer frame does; `stream.rs` one stream's states; `flow.rs` credit
//! and windows with their auto-tuning; `schedule.rs` the round robin;
//! `keepalive.rs` pings, round-trip time and the dead-peer timer;
//! `event.rs`, `config.rs`, `error.rs` what the driver sees, sets and gets
//! wrong; `wire.rs` the frames; `resume.rs` resumable links (sequence
//! numbers, a resend buffer); `datagram.rs` UDP datagrams beside the
//! streams.
//!
//! Invariants: nothing a peer sends panics or grows memory without bound
//! (streams are capped by [`LinkConfig::max_streams`], buffered bytes by the
//! windows, control replies to a peer that does not read them by
//! [`CONTROL_BACKLOG`]); the receiver never accepts a byte beyond the credit
//! it granted; per stream, `allowed + unconsumed + pending == window`.

mod config;
mod datagram;
mod error;
mod event;
mod flow;
mod keepalive;
mod lifecycle;
mod receive;
mod resume;
mod schedule;
mod stream;
pub mod wire;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

pub use config::{CONTROL_BACKLOG, INITIAL_LINK_WINDOW, LinkConfig};
pub use error::{LinkError, StreamError};
pub use event::{Incoming, LinkEvent};
pub use resume::{ACK_DELAY, PATH_TIMEOUT, RESEND_SLACK, token as resume_token};
pub use wire::{
    FlowId, Frame, FrameError, FrameKind, HEADER_LEN, MAX_DATA, MAX_DATAGRAM, MAX_WINDOW, RESUME_TOKEN_LEN,
    Reason, StreamId,
};

use flow::RecvWindow;
use keepalive::{Due, Keepalive};
use lifecycle::{GoAway, Phase};
use resume::Resume;
use schedule::RoundRobin;
use stream::{Acceptance, Half, Stream};

/// Most early data a stream carries (the wire's "Early data"): enough for
/// a request's first bytes (an HTTP head, a TLS ClientHello, a Redis
/// command), and small enough to keep for a retry on another instance.
pub const EARLY_DATA: usize = 16 * 1024;
const _: () = assert!(EARLY_DATA <= u16::MAX as usize);

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

/// One end of a link; see the module docs for the call order.
#[derive(Debug)]
pub struct Link {
    side: Side,
    config: LinkConfig,
    streams: BTreeMap<StreamId, Stream>,
    /// Ids below this were opened (by the proxy) at some point.
    next_id: u64,
    /// Link credit for sending.
    send_credit: u32,
    /// The link window we grant, over all streams.
    window: RecvWindow,
    /// Streams waiting to send.
    schedule: RoundRobin,
    /// Control frames to send, in order. Never `Data`.
    control: VecDeque<Frame<'static>>,
    keepalive: Keepalive,
    events: VecDeque<LinkEvent>,
    go_away: GoAway,
    phase: Phase,
    /// Set on a resumable link: what makes it outlive its transport.
    resume: Option<Resume>,
    /// Both ends take `DATAGRAM` frames (`datagram.rs`).
    datagrams: bool,
    /// The peer takes a client address in `OPEN` (proxy side).
    client_addresses: bool,
    /// Proxy: the service takes early data. Service: we take it.
    early_data: bool,
    /// Proxy: early data to go right after its stream's `OPEN`, in the
    /// order of the `OPEN`s (at most [`EARLY_DATA`] for each stream opening).
    early_queued: VecDeque<(StreamId, Box<[u8]>)>,
    /// Their bytes in all.
    early_queued_bytes: usize,
    /// Proxy: the stream whose `OPEN` went last, its early data next.
    early_next: Option<StreamId>,
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
            window: RecvWindow::new(config.link_window),
            schedule: RoundRobin::default(),
            control: VecDeque::new(),
            keepalive: Keepalive::new(now, config.keepalive, config.dead_after),
            events: VecDeque::new(),
            go_away: GoAway::default(),
            phase: Phase::Live,
            resume: None,
            datagrams: false,
            client_addresses: false,
            early_data: false,
            early_queued: VecDeque::new(),
            early_queued_bytes: 0,
            early_next: None,
            config,
        };
        if let Some(increment) = link.config.link_window.checked_sub(INITIAL_LINK_WINDOW).filter(|n| *n > 0) {
            link.control.push_back(Frame::Window { id: StreamId::LINK, increment });
        }
        link.send_ping(now);
        link
    }

    /// A resumable link (both ends advertised
    /// [`Capabilities::RESUME`](crate::hello::Capabilities::RESUME)) whose
    /// handshake just completed; `token` is [`resume_token`] of that
    /// session's handshake hash. See `resume.rs` for what it adds.
    pub fn new_resumable(
        side: Side,
        config: LinkConfig,
        now: Instant,
        token: [u8; RESUME_TOKEN_LEN],
    ) -> Link {
        let mut link = Link::new(side, config, now);
        // Only the proxy can find a new path: a service that notices the
        // loss first waits, beyond the window, for as long as the proxy may
        // take to notice it too (a keepalive and a path timeout).
        let within = match side {
            Side::Proxy => link.config.resume_within,
            Side::Service => link.config.resume_within + link.config.keepalive + PATH_TIMEOUT,
        };
        link.resume = Some(Resume::new(token, link.config.resend_limit, within));
        link
    }

    /// The link is idle: buffers kept for reuse (a resumable link's spare
    /// journal buffers) are given back. The driver calls this when it
    /// frees its own.
    pub fn release_buffers(&mut self) {
        if let Some(r) = &mut self.resume {
            r.journal.release_spares();
        }
    }

    /// Whether [`Link::release_buffers`] has anything to give back.
    pub fn holds_buffers(&self) -> bool {
        self.resume.as_ref().is_some_and(|r| r.journal.holds_spares())
    }

    /// Whether the link can continue on a new transport.
    pub fn is_resumable(&self) -> bool {
        self.resume.is_some() && !self.is_closed()
    }

    /// Whether the link waits for a new transport (streams kept, nothing sent).
    pub fn is_detached(&self) -> bool {
        self.resume.as_ref().is_some_and(|r| r.detached.is_some()) && !self.is_closed()
    }

    /// Numbered frames received from the peer on a resumable link (0 on
    /// another): more than 0 once the peer's end of the link is running.
    pub fn frames_received(&self) -> u64 {
        self.resume.as_ref().map_or(0, |r| r.received)
    }

    /// Bytes kept for resending (sent, not acknowledged): 0 on an idle or
    /// non-resumable link.
    pub fn resend_buffered(&self) -> usize {
        self.resume.as_ref().map_or(0, |r| r.journal.kept_bytes())
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
        self.window.unconsumed as usize
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
        self.window.pending as usize
    }

    /// The last measured round-trip time.
    pub fn rtt(&self) -> Option<Duration> {
        self.keepalive.rtt()
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
        // A detached link takes nothing in: whatever it received is what it
        // told (or will tell) the peer in its RESUME or RESUMED, and a frame
        // from a transport it left will come again on the new one.
        if self.is_closed() || self.is_detached() {
            return Ok(None);
        }
        let result =
            Frame::decode(frame).map_err(LinkError::from).and_then(|f| self.on_frame(now, f, frame.len()));
        self.keepalive.heard(now);
        result.inspect_err(|e| self.close(e.clone())).inspect(|_| self.check_drained())
    }

    /// The transport ended (EOF, I/O error, a message that failed to
    /// decrypt): every stream is reset.
    pub fn handle_closed(&mut self) {
        self.close(LinkError::Closed);
    }

    /// The transport is gone (closed, failed, or left for a better one): a
    /// resumable link keeps its streams and waits for a new transport
    /// ([`Link::attach`]) until [`LinkConfig::resume_within`] has passed;
    /// any other link (or one drained after a `GOAWAY`) closes as
    /// [`Link::handle_closed`] does. Nothing is
    /// sent while detached; streams get no credit.
    pub fn detach(&mut self, now: Instant) {
        // A drained link has nothing left to carry: it just ends.
        let live = self.phase == Phase::Live;
        match &mut self.resume {
            Some(r) if live => r.detach(now),
            _ => self.handle_closed(),
        }
    }

    /// The first frame for a new transport, before anything else (and
    /// before [`Link::attach`]): the proxy's `RESUME` or the service's
    /// `RESUMED`, carrying what this end received. `None` if the link is
    /// not resumable (or closed).
    pub fn handover(&self) -> Option<Frame<'static>> {
        let r = self.resume.as_ref().filter(|_| !self.is_closed())?;
        Some(match self.side {
            Side::Proxy => Frame::Resume { received: r.received, token: r.token },
            Side::Service => Frame::Resumed { received: r.received },
        })
    }

    /// The link's resume token, to find it by when a `RESUME` arrives.
    pub fn resume_token(&self) -> Option<[u8; RESUME_TOKEN_LEN]> {
        self.resume.as_ref().map(|r| r.token)
    }

    /// A new transport carries the link: the peer has every frame before
    /// `peer_received` (its `RESUME` or `RESUMED` said so) and was sent our
    /// [`Link::handover`]. Frames after that go again, first, from
    /// `poll_transmit`; then the link carries on. A point outside what was
    /// sent ends the link (the peer's error).
    pub fn attach(&mut self, now: Instant, peer_received: u64) -> Result<(), LinkError> {
        if self.is_closed() {
            return Err(LinkError::Closed);
        }
        let Some(r) = &mut self.resume else {
            self.close(LinkError::NotResumable(FrameKind::Resume));
            return Err(LinkError::NotResumable(FrameKind::Resume));
        };
        if let Err(e) = r.attach(now, peer_received) {
            self.close(e.clone());
            return Err(e);
        }
        self.keepalive.heard(now);
        self.keepalive.forget_ping();
        self.unblock_all();
        Ok(())
    }

    /// Sends a ping when one is due; declares the peer dead when it has been
    /// silent for `dead_after`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        let rtt = self.keepalive.rtt();
        if let Some(r) = &mut self.resume {
            let detached = r.detached.is_some();
            match r.due(now, rtt) {
                Some(e @ LinkError::NotResumed(_)) => return self.close(e),
                Some(e) => {
                    self.events.push_back(LinkEvent::PathLost { error: e });
                    return self.detach(now);
                }
                None if detached => return,
                None => {}
            }
            // A ping in flight already probes (and its round trip stays
            // measured).
            if std::mem::take(&mut r.probe_now) && !self.keepalive.awaiting_pong() {
                return self.send_ping(now);
            }
        }
        match self.keepalive.due(now) {
            Due::Dead if self.resume.is_some() => {
                self.events
                    .push_back(LinkEvent::PathLost { error: LinkError::Silent(self.config.dead_after) });
                self.detach(now);
            }
            Due::Dead => self.close(LinkError::Silent(self.config.dead_after)),
            Due::Ping => self.send_ping(now),
            Due::Nothing => {}
        }
    }

    fn send_ping(&mut self, now: Instant) {
        let nonce = self.keepalive.ping(now);
        self.control.push_back(Frame::Ping { nonce });
    }

    /// When `handle_timeout` is next due; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        let rtt = self.keepalive.rtt();
        match &self.resume {
            Some(r) if r.detached.is_some() => r.deadline(rtt),
            Some(r) => {
                Some(r.deadline(rtt).map_or(self.keepalive.deadline(), |d| d.min(self.keepalive.deadline())))
            }
            None => Some(self.keepalive.deadline()),
        }
    }

    /// Appends one control frame's plaintext to `buf` (seal it as one Noise
    /// message); false when there is none. `DATA` never comes from here,
    /// except frames resent on a new transport, which come first.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> bool {
        let start = buf.len();
        if !self.phase_is_closed()
            && let Some(r) = &mut self.resume
        {
            if r.detached.is_some() {
                return false;
            }
            // An ACK due goes even before resent frames: it is not numbered,
            // and a peer kept waiting for one while megabytes are resent
            // would take this new path for dead.
            if let Some(received) = r.take_ack() {
                Frame::Ack { received }.encode(buf);
                return true;
            }
            if r.journal.resend_next(buf) {
                if !r.journal.resending() {
                    self.unblock_all();
                }
                return true;
            }
        }
        // A stream's early data right after its OPEN.
        if let Some(id) = self.early_next.take()
            && self.early_queued.front().is_some_and(|(queued, _)| *queued == id)
            && let Some((_, bytes)) = self.early_queued.pop_front()
        {
            self.early_queued_bytes = self.early_queued_bytes.saturating_sub(bytes.len());
            Frame::Data { id, bytes: &bytes }.encode(buf);
            if let Some(r) = &mut self.resume
                && let Err(e) = r.sent(now, buf.get(start..).unwrap_or_default())
            {
                self.close(e);
            }
            return true;
        }
        let frame = match self.keepalive.take_pong() {
            Some(nonce) => Frame::Pong { nonce },
            None => match self.control.pop_front() {
                Some(frame) => frame,
                None => return false,
            },
        };
        if let Frame::Accept { id, .. } = frame
            && let Some(s) = self.streams.get_mut(&id)
        {
            s.acceptance = Acceptance::Accepted;
            self.unblock(id);
        }
        if let Frame::Open { id, .. } = frame
            && self.early_queued.front().is_some_and(|(queued, _)| *queued == id)
        {
            self.early_next = Some(id);
        }
        frame.encode(buf);
        if !self.phase_is_closed()
            && let Some(r) = &mut self.resume
            && let Err(e) = r.sent(now, buf.get(start..).unwrap_or_default())
        {
            self.close(e);
        }
        true
    }

    fn phase_is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// Proxy: opens a stream for a new client; `OPEN` goes out with the next
    /// `poll_transmit`. Wait for [`LinkEvent::Accepted`] (or `Refused`)
    /// before sending on it.
    pub fn open(&mut self, now: Instant) -> Result<StreamId, StreamError> {
        self.open_from(now, None)
    }

    /// The service advertised
    /// [`Capabilities::CLIENT_ADDRESS`](crate::hello::Capabilities::CLIENT_ADDRESS):
    /// [`Link::open_from`] sends it the client's address.
    pub fn allow_client_addresses(&mut self) {
        self.client_addresses = true;
    }

    /// Proxy: as [`Link::open`], telling the service where the client
    /// connected from (`client`) when it takes that ([`Link::allow_client_addresses`];
    /// otherwise the address is not sent).
    pub fn open_from(
        &mut self,
        now: Instant,
        client: Option<std::net::SocketAddr>,
    ) -> Result<StreamId, StreamError> {
        self.open_early(now, client, &[]).map(|(id, _)| id)
    }

    /// The service advertised
    /// [`Capabilities::EARLY_DATA`](crate::hello::Capabilities::EARLY_DATA)
    /// (proxy), or this end takes early data (service: its streams' windows
    /// start at [`EARLY_DATA`] at least, so `ACCEPT` always covers it).
    pub fn allow_early_data(&mut self) {
        self.early_data = true;
        if self.side == Side::Service {
            let least = EARLY_DATA as u32;
            self.config.initial_stream_window = self.config.initial_stream_window.max(least);
            self.config.max_stream_window = self.config.max_stream_window.max(least);
        }
    }

    /// Whether [`Link::open_early`] sends early data (proxy), or this end
    /// takes it (service).
    pub fn takes_early_data(&self) -> bool {
        self.early_data
    }

    /// Proxy: as [`Link::open_from`], with the first bytes of `early` (the
    /// client's, already received) sent right after the `OPEN` as early
    /// data when the service takes it: at most [`EARLY_DATA`] bytes, and
    /// what the link's credit allows. Returns the stream and how many
    /// bytes of `early` went: once [`LinkEvent::Accepted`], the stream's
    /// data continues after them; on [`LinkEvent::Refused`] none of them
    /// reached the backend.
    pub fn open_early(
        &mut self,
        now: Instant,
        client: Option<std::net::SocketAddr>,
        early: &[u8],
    ) -> Result<(StreamId, usize), StreamError> {
        if self.side != Side::Proxy {
            return Err(StreamError::WrongSide);
        }
        self.check_open()?;
        if self.go_away.either() {
            return Err(StreamError::GoingAway);
        }
        if self.streams.len() >= self.config.max_streams {
            return Err(StreamError::StreamLimit);
        }
        let id = StreamId::new(u32::try_from(self.next_id).map_err(|_| StreamError::IdsExhausted)?);
        self.next_id += 1;
        let window = self.config.initial_stream_window;
        self.streams.insert(id, Stream::new(now, 0, window));
        let client = client.filter(|_| self.client_addresses);
        self.control.push_back(Frame::Open { id, window, client });
        let take =
            if self.early_data { early.len().min(EARLY_DATA).min(self.send_limit() as usize) } else { 0 };
        if let Some(bytes) = early.get(..take).filter(|b| !b.is_empty()) {
            self.early_queued.push_back((id, bytes.into()));
            self.early_queued_bytes += take;
            // At most EARLY_DATA and the link's credit: fits a u32.
            self.send_credit -= take as u32;
            // Counted from now: an ACCEPT (even one that overtakes the data
            // on a resumed link) grants the window less these bytes.
            if let Some(s) = self.streams.get_mut(&id) {
                s.early = u16::try_from(take).unwrap_or(u16::MAX);
            }
        }
        Ok((id, take))
    }

    /// Service: whether `id` is opened and not accepted yet (its early
    /// data waits for the backend).
    pub fn is_opening(&self, id: StreamId) -> bool {
        self.streams.get(&id).is_some_and(|s| !s.accepted())
    }

    /// Service: the backend is connected; `ACCEPT` goes out next and the
    /// stream may carry data once it has (see [`Link::send_credit`]).
    pub fn accept(&mut self, id: StreamId) -> Result<(), StreamError> {
        let window = self.config.initial_stream_window;
        self.unaccepted(id)?.acceptance = Acceptance::Unsent;
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
        let s = self.streams.get_mut(&id).ok_or(StreamError::Unknown(id))?;
        if s.accepted() {
            return Err(StreamError::AlreadyAccepted(id));
        }
        Ok(s)
    }

    /// A stream whose sending side the driver may act on: accepted, not ended.
    fn sending(&mut self, id: StreamId) -> Result<&mut Stream, StreamError> {
        self.check_open()?;
        let s = self.streams.get_mut(&id).ok_or(StreamError::Unknown(id))?;
        if s.send == Half::Ended {
            return Err(StreamError::Ended(id));
        }
        if !s.accepted() {
            return Err(StreamError::NotAccepted(id));
        }
        Ok(s)
    }

    fn check_open(&self) -> Result<(), StreamError> {
        if self.is_closed() { Err(StreamError::LinkClosed) } else { Ok(()) }
    }

    /// Bytes the next `DATA` frame on `id` may carry now: the least of the
    /// stream's credit, the link's credit and the fairness cap. 0 means
    /// wait for [`LinkEvent::Writable`] (also 0 for a stream that cannot send).
    pub fn send_credit(&mut self, id: StreamId) -> usize {
        let others_waiting = self.schedule.others_waiting(self.streams.get(&id).map(|s| &s.turn));
        self.credit(id, others_waiting)
    }

    fn credit(&mut self, id: StreamId, others_waiting: bool) -> usize {
        let link = self.send_limit();
        let cap = if others_waiting { self.config.max_frame_shared } else { self.config.max_frame_alone };
        let Some(s) = self.streams.get_mut(&id).filter(|s| s.accepted() && s.send == Half::Open) else {
            return 0;
        };
        // An ACCEPT not yet transmitted holds the stream back like missing credit.
        let credit = if s.acceptance == Acceptance::Unsent {
            0
        } else {
            (s.credit.available.min(link) as usize).min(cap)
        };
        if credit == 0 {
            s.credit.blocked = true;
        }
        credit
    }

    /// The driver has bytes for `id`: queue it for [`Link::next_send`]
    /// (once; calling again while queued changes nothing).
    pub fn want_send(&mut self, id: StreamId) -> Result<(), StreamError> {
        self.sending(id)?;
        if let Some(s) = self.streams.get_mut(&id) {
            self.schedule.want(id, &mut s.turn);
        }
        Ok(())
    }

    /// The stream whose turn it is to send, and how many bytes it may put in
    /// one frame. Streams with no credit are skipped (owed a `Writable`,
    /// after which they rejoin the queue by themselves). Call `want_send`
    /// again if the stream has more after this frame: it goes to the back.
    pub fn next_send(&mut self) -> Option<(StreamId, usize)> {
        while let Some(id) = self.schedule.pop() {
            let Some(s) = self.streams.get_mut(&id) else { continue };
            if !s.turn.popped() {
                continue;
            }
            let others_waiting = !self.schedule.is_empty();
            let credit = self.credit(id, others_waiting);
            if let Some(s) = self.streams.get_mut(&id).filter(|_| credit > 0) {
                s.turn.wants = false;
                return Some((id, credit));
            }
        }
        None
    }

    /// Writes the header of a `DATA` frame carrying `len` bytes on `id` into
    /// `out[..HEADER_LEN]` (the payload follows it in the same buffer) and
    /// debits the credit. Returns [`HEADER_LEN`]. `len` must be 1 to the
    /// credit; the fairness cap is advice, not checked. On a resumable link
    /// the payload must already be in `out[HEADER_LEN..HEADER_LEN + len]`:
    /// the whole frame is kept for resending.
    pub fn data_header(
        &mut self,
        now: Instant,
        id: StreamId,
        len: usize,
        out: &mut [u8],
    ) -> Result<usize, StreamError> {
        let limit = self.send_limit();
        let link = self.send_credit;
        // A resumable link keeps the whole frame: the payload must be there.
        let keeps = self.resume.is_some();
        let s = self.sending(id)?;
        if s.acceptance == Acceptance::Unsent {
            return Err(StreamError::NotAccepted(id));
        }
        let credit = (s.credit.available.min(limit) as usize).min(MAX_DATA);
        let n = u32::try_from(len).ok().filter(|n| *n > 0 && len <= credit);
        let n = n.ok_or(StreamError::NoCredit { id, len, credit })?;
        if keeps && out.len() < HEADER_LEN + len {
            return Err(StreamError::BufferTooSmall);
        }
        wire::write_data_header(id, out).ok_or(StreamError::BufferTooSmall)?;
        // n <= credit <= both credits, checked above.
        s.credit.available -= n;
        let link = link - n;
        if s.credit.available == 0 || limit - n == 0 {
            s.credit.blocked = true;
        }
        self.send_credit = link;
        if let Some(r) = &mut self.resume
            && let Err(e) = r.sent(now, out.get(..HEADER_LEN + len).unwrap_or_default())
        {
            self.close(e);
        }
        Ok(HEADER_LEN)
    }

    /// What the link as a whole lets a stream send now: the peer's link
    /// credit, less on a resumable link by what its resend limit has room
    /// for, and nothing while it is detached or resending.
    fn send_limit(&self) -> u32 {
        match &self.resume {
            Some(r) if r.paused() => 0,
            // Early data queued will take room when it goes.
            Some(r) => {
                let room = r.room().saturating_sub(self.early_queued_bytes);
                self.send_credit.min(u32::try_from(room).unwrap_or(u32::MAX))
            }
            None => self.send_credit,
        }
    }

    /// The sending side of `id` is done (the client or backend sent EOF):
    /// `END` goes out next, after the data already sealed.
    pub fn end(&mut self, id: StreamId) -> Result<(), StreamError> {
        let s = self.sending(id)?;
        s.send = Half::Ended;
        s.turn.wants = false;
        s.credit.blocked = false;
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
        if !self.streams.contains_key(&id) {
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
        let rtt = self.keepalive.rtt().unwrap_or(INITIAL_RTT);
        let max_window = self.config.max_stream_window;
        let s = self.streams.get_mut(&id).ok_or(StreamError::Unknown(id))?;
        let unconsumed = s.window.recv.unconsumed;
        let n32 = u32::try_from(n).ok().filter(|n| *n <= unconsumed);
        let n32 = n32.ok_or(StreamError::OverConsumed { id, n, unconsumed })?;
        s.window.recv.consume(n32);
        if s.recv == Half::Open
            && let Some(increment) = s.window.update(now, rtt, max_window)
        {
            self.control.push_back(Frame::Window { id, increment });
        }
        self.window.consume(n32);
        self.maybe_update_link();
        self.forget_if_finished(id);
        self.check_drained();
        Ok(())
    }

    fn maybe_update_link(&mut self) {
        if self.window.update_due() {
            let increment = self.window.update(self.window.size);
            self.control.push_back(Frame::Window { id: StreamId::LINK, increment });
        }
    }

    /// `id` may have credit again: if it was told it had none, it is owed a
    /// `Writable`, and rejoins the round robin if it has bytes.
    fn unblock(&mut self, id: StreamId) {
        let link = self.send_limit();
        let Some(s) = self.streams.get_mut(&id) else { return };
        if !s.credit.blocked || !s.sendable() || s.credit.available.min(link) == 0 {
            return;
        }
        s.credit.blocked = false;
        self.schedule.rejoin(id, &mut s.turn);
        self.events.push_back(LinkEvent::Writable { id });
    }

    /// Every stream told it had no credit may have some again (the link's
    /// credit or resend room grew, or the link was attached).
    pub(super) fn unblock_all(&mut self) {
        if self.send_limit() == 0 {
            return;
        }
        let blocked: Vec<StreamId> =
            self.streams.iter().filter(|(_, s)| s.credit.blocked).map(|(id, _)| *id).collect();
        for id in blocked {
            self.unblock(id);
        }
    }

    fn forget_if_finished(&mut self, id: StreamId) {
        if self.streams.get(&id).is_some_and(Stream::finished) {
            self.forget(id);
        }
    }

    /// Frees a stream; bytes the driver still held for it are dropped, so
    /// their link credit goes back to the peer.
    fn forget(&mut self, id: StreamId) {
        if let Some(s) = self.streams.remove(&id) {
            // Early data that never went gives its link credit back.
            if let Some(at) = self.early_queued.iter().position(|(queued, _)| *queued == id)
                && let Some((_, bytes)) = self.early_queued.remove(at)
            {
                self.early_queued_bytes = self.early_queued_bytes.saturating_sub(bytes.len());
                let len = u32::try_from(bytes.len()).unwrap_or(0);
                self.send_credit = self.send_credit.saturating_add(len);
            }
            // Keeps the ready queue no longer than the live streams.
            self.schedule.remove(id, &s.turn);
            self.window.consume(s.window.recv.unconsumed);
            self.maybe_update_link();
        }
    }
}

#[cfg(test)]
mod tests;
