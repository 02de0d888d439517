//! A link's driver: the task that owns the link socket and joins a
//! **reader** (link socket → frames → stream sockets) and a **writer**
//! (frames and stream bytes → link socket), and on a service spawns and owns
//! the stream tasks.
//!
//! # No copies, bounded buffers
//! - Receive: a frame is opened in place in the reader's decoder buffer and
//!   its payload written straight to the stream's socket (non-blocking).
//! - Send: the writer reads a stream's socket straight into the frame slot
//!   of its batch buffer, after room for the headers, and seals in place. The
//!   batch stops growing once it holds [`BATCH`] bytes (so it holds less than
//!   `BATCH` plus one frame) and is freed while the link is idle.
//!
//! # Invariants
//! - Frames are sealed in exactly the order they are written: only the
//!   writer seals, one batch at a time.
//! - A stream whose link is lost is reset, never ended cleanly.
//! - The service's stream tasks are capped by the link's stream limit, not
//!   only by the machine's count (see [`drive`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use seaport_proto::link::{self as proto, Incoming, Reason};
use seaport_proto::noise::{Opener, Sealer, TAG_LEN};
use seaport_proto::record::{self, MAX_WIRE_RECORD, RecordDecoder};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::datagram;
use super::resume::{Carrier, Handover, Repath, SEARCH_AGAIN_AFTER, resume_as_proxy, resume_as_service};
use super::state::{Half, Shared, State, changed, dispatch, lose};
use super::stream::{Backend, connect_stream, deliver};
use crate::budget::{LinkShare, OverBudget};
use crate::clock;
use crate::event::{Event, emit};
use crate::handshake::HandshakeError;
use crate::lock::lock;
use crate::metrics::{DatagramDrop, Refusal, metrics};
use crate::reach::Search;

/// Most bytes the writer gathers before one write to the link socket.
const BATCH: usize = 4 * MAX_WIRE_RECORD;
/// Most unsent bytes the kernel queues on a link socket (`TCP_NOTSENT_LOWAT`,
/// as HTTP/2 servers set it). Every stream shares the link's one TCP
/// connection, so a byte written behind a bulk transfer waits for all the
/// unsent bytes ahead of it: send-buffer autotuning lets that queue reach
/// megabytes (milliseconds at loopback speed). Capping the unsent part keeps
/// the writer's round robin, not the kernel's FIFO, in charge of who goes
/// next, while bytes in flight still grow to the path's bandwidth-delay
/// product. Two frames' worth keeps the socket from running dry between
/// writer wake-ups (Linux reports it writable again below half of it).
/// So a frame that becomes ready behind a bulk transfer waits for at most
/// the writer's batch in flight ([`BATCH`]) and this much in the kernel,
/// plus what the receiver has not read yet. Linux and Android only; a
/// relayed link's bytes also cross the registry's relay sockets, which keep
/// the kernel's default.
const NOTSENT_LOWAT: u32 = 2 * MAX_WIRE_RECORD as u32;
/// How long the reader and the writer keep their buffers while idle.
const IDLE_RELEASE: Duration = Duration::from_millis(100);

/// One reusable timer for a loop that waits on a deadline each turn. A fresh
/// `sleep` per wait took the runtime's timer lock twice (insert and remove),
/// and when it was earlier than the runtime's next wake-up, a write to the
/// runtime's eventfd and a spurious turn of its event loop: 10,000 such
/// writes per GiB through a link. Moving a timer that has not fired later
/// is one atomic update; an earlier instant, or any instant after it fired,
/// goes back to the timer wheel.
struct Alarm {
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
}

impl Alarm {
    fn new() -> Alarm {
        // Never polled before it is armed, so never registered until then.
        Alarm { sleep: Box::pin(tokio::time::sleep(Duration::ZERO)), armed: false }
    }

    /// Arms for `at`, or disarms for `None`. A disarmed timer is left where
    /// it was: it can wake the loop once for nothing, and arming it again
    /// for a later instant stays an atomic update.
    fn set(&mut self, at: Option<tokio::time::Instant>) {
        match at {
            Some(at) => {
                if !self.armed || self.sleep.deadline() != at {
                    self.sleep.as_mut().reset(at);
                }
                self.armed = true;
            }
            None => self.armed = false,
        }
    }

    /// Resolves when the armed instant passes; never while disarmed.
    async fn fired(&mut self) {
        if self.armed {
            self.sleep.as_mut().await;
            self.armed = false;
        } else {
            std::future::pending::<()>().await;
        }
    }
}

/// A service's side of a link: where streams go, when to stop taking them,
/// and the link's share of the budget.
pub(super) struct ServiceSide {
    pub(super) backend: Backend,
    pub(super) drain: watch::Receiver<bool>,
    pub(super) share: LinkShare,
}

/// One link's driver: reader and writer, and on a service the stream tasks.
/// It carries the link over one transport after another: when a resumable
/// link loses its transport, a proxy looks for a new path (`repath`) and a
/// service waits for the proxy's `RESUME` (`handovers`), until the machine
/// gives the link up; a proxy's better path arrives through `handovers` too.
pub(super) async fn drive(
    shared: Arc<Shared>,
    first: Carrier,
    mut service: Option<ServiceSide>,
    mut handovers: mpsc::Receiver<Handover>,
    repath: Option<Repath>,
) {
    let mut streams = JoinSet::new();
    let mut carrying: Option<Pin<Box<dyn Future<Output = ()> + Send>>> =
        Some(Box::pin(carry(shared.clone(), first)));
    let mut searching: Option<Search> = None;
    loop {
        // Without a transport no reader fires the machine's timers: the
        // driver does (the resume deadline, above all).
        let detached_deadline = if carrying.is_none() {
            shared.lock().link.poll_timeout().map(tokio::time::Instant::from_std)
        } else {
            None
        };
        tokio::select! {
            () = async { if let Some(c) = carrying.as_mut() { c.await } }, if carrying.is_some() => {
                carrying = None;
                if !path_lost(&shared) {
                    break;
                }
                if let Some(repath) = &repath {
                    searching = Some(repath());
                }
            }
            found = async { match searching.as_mut() { Some(s) => s.await, None => std::future::pending().await } }, if searching.is_some() => {
                searching = None;
                let handover = found.and_then(Handover::from_reached);
                match handover {
                    Ok(handover) => match take_over(&shared, handover).await {
                        Ok(carrier) => carrying = Some(Box::pin(carry(shared.clone(), carrier))),
                        Err(e) => {
                            tracing::info!("the new path did not take the link: {e}");
                            if shared.lock().link.is_closed() {
                                break;
                            }
                            searching = repath.as_ref().map(|r| search_again(r.clone()));
                        }
                    },
                    Err(e) => {
                        tracing::info!("no new path yet: {e}");
                        searching = repath.as_ref().map(|r| search_again(r.clone()));
                    }
                }
            }
            Some(handover) = handovers.recv() => {
                // A move: the old transport (if any) is dropped, which
                // closes it (and frees a relay at once).
                carrying = None;
                searching = None;
                match take_over(&shared, handover).await {
                    Ok(carrier) => carrying = Some(Box::pin(carry(shared.clone(), carrier))),
                    Err(e) => {
                        tracing::info!("the link could not move: {e}");
                        if shared.lock().link.is_closed() {
                            break;
                        }
                        searching = repath.as_ref().map(|r| r());
                    }
                }
            }
            () = async { match detached_deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } }, if detached_deadline.is_some() => {
                let mut state = shared.lock();
                state.link.handle_timeout(clock::now());
                changed(&mut state, &shared);
                if state.link.is_closed() {
                    break;
                }
            }
            // Without a transport nobody else waits for work: a change from
            // outside (the proxy abandoning the link) lands here.
            () = shared.work.notified(), if carrying.is_none() => {
                if shared.lock().link.is_closed() {
                    break;
                }
            }
            () = shared.opened.notified(), if service.is_some() => {
                let opened = std::mem::take(&mut shared.lock().opened);
                if let Some(side) = &service {
                    for (id, client) in opened {
                        // A service of a UDP port takes no streams; the
                        // proxy should not have asked (the registry says
                        // which protocol a role is served over).
                        if matches!(side.backend.streams, super::StreamBackend::Refused) {
                            let mut state = shared.lock();
                            super::stream::refuse(&mut state, id, Reason::WRONG_PROTOCOL);
                            changed(&mut state, &shared);
                            metrics().stream_opened("refused");
                            continue;
                        }
                        // A stream reset while its backend connect is under way
                        // leaves the link's count but not this task's: cap the
                        // tasks too, or OPEN+RESET floods would pile up connects.
                        let share = if streams.len() >= shared.lock().link.config().max_streams {
                            Err(OverBudget::Streams(streams.len()))
                        } else {
                            side.share.stream()
                        };
                        let share = match share {
                            Ok(share) => share,
                            Err(e) => {
                                tracing::debug!("stream refused: {e}");
                                let mut state = shared.lock();
                                super::stream::refuse(&mut state, id, Reason::STREAM_LIMIT);
                                changed(&mut state, &shared);
                                metrics().stream_opened("refused");
                                metrics().refuse(Refusal::Stream);
                                continue;
                            }
                        };
                        let span = tracing::info_span!("stream", id = id.get());
                        let work = connect_stream(shared.clone(), id, client, side.backend.clone(), share);
                        streams.spawn(work.instrument(span));
                    }
                }
            }
            () = draining(&mut service) => {
                let mut state = shared.lock();
                state.link.go_away();
                changed(&mut state, &shared);
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
    // The link is gone: its streams were reset and finish at once; its
    // flows end now (a service's sockets and their tasks with them).
    shared.lock().datagrams.clear();
    while streams.join_next().await.is_some() {}
}

/// After a transport ended: whether the link lives on without one
/// (detached, waiting for another); says so. False once it has closed.
fn path_lost(shared: &Shared) -> bool {
    let mut state = shared.lock();
    if !state.link.is_detached() {
        // A transport that ended under a live link closes it (a link that
        // cannot be resumed, or one that drained).
        if !state.link.is_closed() {
            state.link.handle_closed();
            changed(&mut state, shared);
        }
        return false;
    }
    let why = state.path_lost.take().unwrap_or_else(|| "transport closed".into());
    tracing::info!("the link lost its path ({why}): waiting to resume it on another");
    metrics().link_path_lost();
    true
}

/// Another search for a path, after a pause.
fn search_again(repath: Repath) -> Search {
    Box::pin(async move {
        tokio::time::sleep(SEARCH_AGAIN_AFTER).await;
        repath().await
    })
}

/// Starts a new transport for the link with the resume exchange; the
/// transport to carry it on, once attached.
async fn take_over(shared: &Arc<Shared>, handover: Handover) -> Result<Carrier, HandshakeError> {
    match handover {
        Handover::Proxy { mut carrier, path, addr } => {
            resume_as_proxy(shared, &mut carrier).await?;
            let key = shared.remote;
            // Counted before it is said, so whoever reads the line finds it counted.
            metrics().link_resumed();
            *lock(&shared.route) = Some((path, addr));
            tracing::info!(service = %key, "link to {key} moved to {path} {addr}");
            emit(&Event::LinkMoved { key, path: path.name(), addr });
            Ok(carrier)
        }
        Handover::Service { mut carrier, peer_received } => {
            resume_as_service(shared, &mut carrier, peer_received).await?;
            tracing::info!(
                "link resumed on a new connection from {}",
                carrier.stream.peer_addr().map_or("?".into(), |a| a.to_string())
            );
            metrics().link_resumed();
            Ok(carrier)
        }
    }
}

/// Carries the link over one transport: its reader and writer, until both
/// end (the link closed and the transport with it) or the link is detached
/// from it (the path is lost or left).
async fn carry(shared: Arc<Shared>, carrier: Carrier) {
    let Carrier { stream, sealer, opener, decoder } = carrier;
    cap_unsent(&stream);
    let (rd, wr) = stream.into_split();
    let reader = read_loop(&shared, rd, opener, decoder);
    let writer = write_loop(&shared, wr, sealer);
    tokio::pin!(reader, writer);
    let (mut reading, mut writing) = (true, true);
    while reading || writing {
        tokio::select! {
            () = &mut reader, if reading => reading = false,
            () = &mut writer, if writing => writing = false,
        }
        if shared.lock().link.is_detached() {
            return;
        }
    }
}

/// Sets [`NOTSENT_LOWAT`] on a link socket. Best effort: where the option is
/// missing the link still works, with more head-of-line delay.
fn cap_unsent(stream: &TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        tracing::debug!("TCP_NOTSENT_LOWAT not set on the link socket: {e}");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stream;
}

/// Resolves once the service starts to drain, then never again (the link
/// goes away once).
async fn draining(service: &mut Option<ServiceSide>) {
    match service {
        Some(ServiceSide { drain, .. }) if !*drain.borrow() => {
            if drain.wait_for(|d| *d).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        _ => std::future::pending().await,
    }
}

/// Link socket in, frames to the state machine, data to stream sockets.
async fn read_loop(shared: &Arc<Shared>, rd: OwnedReadHalf, mut opener: Opener, mut decoder: RecordDecoder) {
    let (mut timeout, mut idle) = (Alarm::new(), Alarm::new());
    loop {
        while let Some(body) = decoder.next_record() {
            let Ok(plain) = opener.open_in_place(body) else {
                lose(shared, "link data failed to authenticate");
                return;
            };
            let mut state = shared.lock();
            let State { link, streams, early, .. } = &mut *state;
            match link.handle_frame(clock::now(), plain) {
                Ok(Some(Incoming::Data { id, bytes })) => deliver(link, streams, early, id, bytes),
                Ok(Some(Incoming::Datagram { flow, bytes })) => {
                    datagram::deliver(shared, &mut state, flow, bytes)
                }
                Ok(_) => {}
                Err(e) => tracing::info!("link ended: {e}"),
            }
            changed(&mut state, shared);
            if state.link.is_ended() || state.link.is_detached() {
                return;
            }
        }
        timeout.set(shared.lock().link.poll_timeout().map(tokio::time::Instant::from_std));
        // An idle link holds no read buffer (a partial frame must stay).
        let releasable = decoder.holds_buffer() && decoder.buffered() == 0;
        idle.set(releasable.then(|| tokio::time::Instant::now() + IDLE_RELEASE));
        tokio::select! {
            () = idle.fired() => decoder.release(),
            ready = rd.readable() => {
                if let Err(e) = ready {
                    lose(shared, &e.to_string());
                    return;
                }
                match rd.try_read(decoder.spare_mut()) {
                    Ok(0) => {
                        lose(shared, "transport closed");
                        return;
                    }
                    Ok(n) => decoder.commit(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        lose(shared, &e.to_string());
                        return;
                    }
                }
            }
            () = timeout.fired() => {
                let mut state = shared.lock();
                state.link.handle_timeout(clock::now());
                changed(&mut state, shared);
                if state.link.is_ended() || state.link.is_detached() {
                    return;
                }
            }
        }
    }
}

/// The writer's sealed frames waiting for one write. Its buffer is zero-filled
/// only when it grows and is reused after that: zero-filling each frame's
/// slot before reading a socket into it was a pass over every byte sent, 7 %
/// of a proxy's CPU during an upload.
struct Batch {
    buf: Vec<u8>,
    /// Bytes of `buf` in use.
    len: usize,
}

impl Batch {
    const fn new() -> Batch {
        Batch { buf: Vec::new(), len: 0 }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }

    /// `n` more bytes at the end, for the caller to fill (they hold whatever
    /// an earlier frame left there).
    fn extend(&mut self, n: usize) -> &mut [u8] {
        let (start, end) = (self.len, self.len + n);
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.len = end;
        self.buf.get_mut(start..end).unwrap_or_default()
    }

    /// The bytes from `start` on, e.g. the frame whose room `extend` made.
    fn from(&mut self, start: usize) -> &mut [u8] {
        self.buf.get_mut(start..self.len).unwrap_or_default()
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Gives the memory back (an idle link holds none).
    fn release(&mut self) {
        *self = Batch::new();
    }

    fn holds_buffer(&self) -> bool {
        self.buf.capacity() > 0
    }
}

/// Frames out: control frames from the state machine, and data read from the
/// streams whose turn it is, sealed in place and written in batches.
async fn write_loop(shared: &Shared, mut wr: OwnedWriteHalf, mut sealer: Sealer) {
    use tokio::io::AsyncWriteExt;
    let mut batch = Batch::new();
    let mut plain = Vec::new();
    let mut alarm = Alarm::new();
    // A peer that stops reading must not hold the link for ever.
    let stuck_after = shared.lock().link.config().dead_after;
    loop {
        let closed = fill(shared, &mut sealer, &mut batch, &mut plain);
        if batch.len() > 0 {
            // A write blocked on a silent path must not hide the machine's
            // deadlines (frames unacknowledged, above all): they are timed
            // here too while the write waits.
            let stuck = tokio::time::Instant::now() + stuck_after;
            let write = wr.write_all(batch.bytes());
            tokio::pin!(write);
            loop {
                let deadline = shared.lock().link.poll_timeout().map(tokio::time::Instant::from_std);
                alarm.set(Some(deadline.map_or(stuck, |d| d.min(stuck))));
                let written = tokio::select! {
                    biased;
                    written = &mut write => Some(written),
                    () = alarm.fired() => None,
                };
                match written {
                    Some(Ok(())) => break,
                    Some(Err(e)) => return lose(shared, &e.to_string()),
                    None if tokio::time::Instant::now() >= stuck => {
                        return lose(shared, "the peer stopped reading");
                    }
                    None => {
                        let mut state = shared.lock();
                        state.link.handle_timeout(clock::now());
                        dispatch(&mut state, shared);
                        if state.link.is_closed() || state.link.is_detached() {
                            return;
                        }
                    }
                }
            }
            batch.truncate(0);
            continue;
        }
        if shared.lock().link.is_detached() {
            return;
        }
        if closed {
            let _ = wr.shutdown().await;
            return;
        }
        // Idle: wait for work, but not past the machine's next deadline.
        // Frames just sent start a wait for their acknowledgement that the
        // reader, asleep until an older deadline, does not know of: the
        // writer times it too (handling a timeout twice changes nothing).
        let deadline = shared.lock().link.poll_timeout().map(tokio::time::Instant::from_std);
        // The journal's spares too: the last acknowledgements of a transfer
        // can come after the batch was given back.
        let holds = batch.holds_buffer() || shared.lock().link.holds_buffers();
        let release = holds.then(|| tokio::time::Instant::now() + IDLE_RELEASE);
        alarm.set([deadline, release].into_iter().flatten().min());
        let timed_out = tokio::select! {
            biased;
            () = shared.work.notified() => false,
            () = alarm.fired() => true,
        };
        if timed_out {
            let now = tokio::time::Instant::now();
            if release.is_some_and(|r| now >= r) {
                batch.release();
                shared.lock().link.release_buffers();
            }
            if deadline.is_some_and(|d| now >= d) {
                let mut state = shared.lock();
                state.link.handle_timeout(clock::now());
                dispatch(&mut state, shared);
            }
        }
    }
}

/// Gathers what is ready to send into `batch`, sealed. Returns whether the
/// link is closed (nothing more will come).
fn fill(shared: &Shared, sealer: &mut Sealer, batch: &mut Batch, plain: &mut Vec<u8>) -> bool {
    let mut state = shared.lock();
    let State { link, streams, datagrams, .. } = &mut *state;
    let mut wakes = Vec::new();
    let now = clock::now();
    loop {
        let mut progressed = false;
        while batch.len() < BATCH && link.poll_transmit(now, plain) {
            let start = batch.len();
            let frame = batch.extend(record::HEADER_LEN + plain.len() + TAG_LEN);
            if let Some(room) = frame.get_mut(record::HEADER_LEN..record::HEADER_LEN + plain.len()) {
                room.copy_from_slice(plain);
            }
            if sealer.seal_frame(frame, plain.len()).is_err() {
                // A control frame lost (a credit update, an end, a reset)
                // would leave the peer waiting for ever: end the link.
                batch.truncate(start);
                tracing::error!("cannot seal a link frame: closing the link");
                link.handle_closed();
                plain.clear();
                break;
            }
            plain.clear();
            progressed = true;
        }
        while batch.len() < BATCH {
            // Datagrams and stream frames take turns: a datagram waits
            // behind at most one frame of stream data in the batch, and a
            // flood of datagrams takes at most every other frame.
            let framed = datagram_frame(link, datagrams, sealer, batch);
            progressed |= framed;
            if batch.len() >= BATCH {
                break;
            }
            let Some((id, credit)) = link.next_send() else {
                if framed {
                    continue;
                }
                break;
            };
            progressed = true;
            let Some(slot) = streams.get_mut(&id) else { continue };
            let start = batch.len();
            let body = record::HEADER_LEN + proto::HEADER_LEN;
            let frame = batch.extend(body + credit + TAG_LEN);
            let read = slot.socket.try_read(frame.get_mut(body..body + credit).unwrap_or_default());
            match read {
                Ok(0) => {
                    batch.truncate(start);
                    slot.read_requested = false;
                    slot.sent = Half::Ended;
                    let _ = link.end(id);
                    wakes.push(slot.wake.clone());
                }
                Ok(n) => {
                    let frame = batch.from(start);
                    let header = frame.get_mut(record::HEADER_LEN..).unwrap_or_default();
                    let sealed = link
                        .data_header(now, id, n, header)
                        .ok()
                        .and_then(|_| sealer.seal_frame(frame, proto::HEADER_LEN + n).ok());
                    match sealed {
                        Some(len) => {
                            batch.truncate(start + len);
                            slot.moved.sent += n as u64;
                            metrics().stream_sent.inc_by(n as u64);
                            // The socket may hold more: back of the queue.
                            let _ = link.want_send(id);
                        }
                        None => {
                            // The bytes left the socket and cannot be sent:
                            // the stream is cut, and says so with a reset.
                            batch.truncate(start);
                            tracing::error!("cannot frame data for stream {id}: resetting it");
                            let _ = link.reset(id, Reason::CANCELLED);
                            slot.reset = Some(Reason::CANCELLED);
                            wakes.push(slot.wake.clone());
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    batch.truncate(start);
                    slot.read_requested = false;
                    wakes.push(slot.wake.clone());
                }
                Err(_) => {
                    batch.truncate(start);
                    let _ = link.reset(id, Reason::CANCELLED);
                    slot.reset = Some(Reason::CANCELLED);
                    wakes.push(slot.wake.clone());
                }
            }
        }
        if !progressed || batch.len() >= BATCH {
            break;
        }
    }
    // The machine's word, read before its events are dispatched. An end
    // that this fill's own `end`/`reset` brought about also queued a frame,
    // so the batch is not empty and the writer sends it before it stops.
    let closed = state.link.is_ended();
    dispatch(&mut state, shared);
    drop(state);
    for wake in wakes {
        wake.notify_one();
    }
    closed
}

/// Frames and seals the next waiting datagram into `batch`, if one waits;
/// whether one was taken (sent, or dropped when the link cannot carry it).
fn datagram_frame(
    link: &mut proto::Link,
    datagrams: &mut datagram::Datagrams,
    sealer: &mut Sealer,
    batch: &mut Batch,
) -> bool {
    let Some((flow, bytes)) = datagrams.pop() else { return false };
    let start = batch.len();
    let body = record::HEADER_LEN + proto::HEADER_LEN;
    let frame = batch.extend(body + bytes.len() + TAG_LEN);
    if let Some(room) = frame.get_mut(body..body + bytes.len()) {
        room.copy_from_slice(&bytes);
    }
    let header = frame.get_mut(record::HEADER_LEN..).unwrap_or_default();
    let sealed = match link.datagram_header(flow, bytes.len(), header) {
        Ok(_) => sealer.seal_frame(frame, proto::HEADER_LEN + bytes.len()).ok(),
        Err(e) => {
            tracing::trace!(%flow, "datagram dropped: {e}");
            None
        }
    };
    match sealed {
        Some(len) => batch.truncate(start + len),
        None => {
            batch.truncate(start);
            metrics().drop_datagram(DatagramDrop::NoPath);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_sends_only_what_it_was_given_and_reuses_its_memory() {
        let mut batch = Batch::new();
        batch.extend(3).copy_from_slice(b"abc");
        let big = batch.extend(1000);
        big.fill(7);
        assert_eq!(batch.len(), 1003);
        // A frame given up (a read that would block) leaves nothing behind.
        batch.truncate(3);
        assert_eq!(batch.bytes(), b"abc");
        // Room made again holds the old bytes, but only what is filled and
        // kept is sent.
        let room = batch.extend(10);
        room.get_mut(..2).unwrap().copy_from_slice(b"de");
        batch.truncate(5);
        assert_eq!(batch.bytes(), b"abcde");
        assert_eq!(batch.from(3), b"de");
        let capacity = batch.buf.capacity();
        batch.truncate(0);
        batch.extend(500);
        assert_eq!(batch.buf.capacity(), capacity, "no new allocation");
        batch.release();
        assert!(!batch.holds_buffer());
        assert!(batch.bytes().is_empty());
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[tokio::test]
    async fn link_sockets_cap_their_unsent_bytes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let before = socket2::SockRef::from(&stream).tcp_notsent_lowat().unwrap();
        cap_unsent(&stream);
        let after = socket2::SockRef::from(&stream).tcp_notsent_lowat().unwrap();
        assert_ne!(before, NOTSENT_LOWAT, "the kernel's default is not the cap");
        assert_eq!(after, NOTSENT_LOWAT);
    }
}
