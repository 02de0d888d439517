//! What a link's tasks share, behind one `std` mutex: the state machine, the
//! driver's view of each stream (its socket, the bytes its socket has not
//! taken yet, how it ended), its UDP flows, and the wake-ups that carry the machine's
//! events to the tasks.
//!
//! Invariants:
//! - The lock is held only for non-blocking work (socket `try_read` and
//!   `try_write`, machine calls), never across an await.
//! - Whoever changes the machine drains its events ([`changed`], or
//!   [`dispatch`] in the writer) before letting the lock go, so no task ever
//!   sees the machine ahead of what its events said.
//! - Whether the link may open streams or has ended comes from the machine
//!   (`Link::can_open`, `Link::is_ended`); the driver keeps no copy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use super::socket::StreamSocket;
use seaport_proto::keys::PublicKey;
use seaport_proto::link::{Link, LinkConfig, LinkEvent, RESUME_TOKEN_LEN, Reason, Side, StreamId};
use tokio::sync::{Notify, oneshot};

use super::datagram::Datagrams;
use crate::clock;
use crate::lock::lock;
use crate::reach::Path;

/// Bytes one stream moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// From the stream's socket into the link.
    pub sent: u64,
    /// From the link to the stream's socket.
    pub received: u64,
}

/// One direction of a stream, as the driver saw it end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Half {
    Open,
    Ended,
}

/// One stream as the driver sees it.
pub(super) struct Slot {
    pub(super) socket: Arc<StreamSocket>,
    pub(super) wake: Arc<Notify>,
    /// Proxy: where the service's answer to `OPEN` goes.
    pub(super) answer: Option<oneshot::Sender<Result<(), Reason>>>,
    /// Received bytes the socket has not taken yet.
    pub(super) pending: Vec<u8>,
    /// The stream asked for a turn to send and the writer has not read yet.
    pub(super) read_requested: bool,
    /// Ended when the socket reached EOF and `END` was sent. The driver's
    /// own, with `received`: the machine forgets a stream once both
    /// directions ended and every byte was consumed, while its task still
    /// has to finish the socket (write what is pending, shut down, report).
    /// Each is set in one place only (the writer's `fill`, `dispatch`).
    pub(super) sent: Half,
    /// Ended when the peer's `END` arrived.
    pub(super) received: Half,
    /// The stream was reset; the task closes its socket with RST.
    pub(super) reset: Option<Reason>,
    pub(super) moved: Moved,
}

impl Slot {
    pub(super) fn new(socket: Arc<StreamSocket>) -> Slot {
        Slot {
            socket,
            wake: Arc::new(Notify::new()),
            answer: None,
            pending: Vec::new(),
            read_requested: false,
            sent: Half::Open,
            received: Half::Open,
            reset: None,
            moved: Moved::default(),
        }
    }
}

pub(super) struct State {
    pub(super) link: Link,
    pub(super) streams: HashMap<StreamId, Slot>,
    /// Service: streams opened by the proxy (and where their clients
    /// connected from, if the proxy said), for the driver to connect.
    pub(super) opened: Vec<(StreamId, Option<SocketAddr>)>,
    /// Service: early data of streams not accepted yet, for their backend
    /// once it is connected (at most `EARLY_DATA` each, the machine checks).
    pub(super) early: HashMap<StreamId, Vec<u8>>,
    /// Why the link ended, once it has.
    pub(super) close_reason: Option<String>,
    /// Why its last transport was lost, until the driver says so.
    pub(super) path_lost: Option<String>,
    /// UDP flows and their datagrams waiting for the writer.
    pub(super) datagrams: Datagrams,
}

pub(super) struct Shared {
    state: Mutex<State>,
    /// The other end's key.
    pub(super) remote: PublicKey,
    /// Proxy: the path the link runs over now, and its address.
    pub(super) route: Mutex<Option<(Path, SocketAddr)>>,
    /// Wakes the writer: frames to send, or streams waiting for a turn.
    pub(super) work: Notify,
    /// Wakes the service driver: streams were opened.
    pub(super) opened: Notify,
    /// Proxy: streams carry their client's first bytes as early data (the
    /// service must take it too). Off unless asked: see `LinkHandle::open`.
    pub(super) send_early: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

/// The shared state of a link whose handshake with `remote` just completed;
/// resumable (named by `token`) when both ends advertised it.
pub(super) fn new_shared(
    side: Side,
    config: LinkConfig,
    remote: PublicKey,
    token: Option<[u8; RESUME_TOKEN_LEN]>,
    route: Option<(Path, SocketAddr)>,
) -> Arc<Shared> {
    let now = clock::now();
    let link = match token {
        Some(token) => Link::new_resumable(side, config, now, token),
        None => Link::new(side, config, now),
    };
    let state = State {
        link,
        streams: HashMap::new(),
        opened: Vec::new(),
        early: HashMap::new(),
        close_reason: None,
        path_lost: None,
        datagrams: Datagrams::default(),
    };
    Arc::new(Shared {
        state: Mutex::new(state),
        remote,
        route: Mutex::new(route),
        work: Notify::new(),
        opened: Notify::new(),
        send_early: std::sync::atomic::AtomicBool::new(false),
    })
}

/// After a change from outside the writer: react to the link's events and
/// wake the writer for the frames the change queued.
pub(super) fn changed(state: &mut State, shared: &Shared) {
    dispatch(state, shared);
    shared.work.notify_one();
}

/// Reacts to what the link says: wakes streams and answers opens. Called
/// with the lock held. The writer calls this directly (waking itself would spin).
pub(super) fn dispatch(state: &mut State, shared: &Shared) {
    while let Some(event) = state.link.poll_event() {
        match event {
            LinkEvent::Opened { id, client } => {
                state.opened.push((id, client));
                shared.opened.notify_one();
            }
            LinkEvent::Accepted { id } => {
                if let Some(answer) = state.streams.get_mut(&id).and_then(|s| s.answer.take()) {
                    let _ = answer.send(Ok(()));
                }
            }
            LinkEvent::Refused { id, reason } => {
                if let Some(mut slot) = state.streams.remove(&id)
                    && let Some(answer) = slot.answer.take()
                {
                    let _ = answer.send(Err(reason));
                }
            }
            LinkEvent::End { id } => {
                if let Some(slot) = state.streams.get_mut(&id) {
                    slot.received = Half::Ended;
                    slot.wake.notify_one();
                }
            }
            LinkEvent::Reset { id, reason } => {
                state.early.remove(&id);
                let unanswered = state.streams.get(&id).is_some_and(|s| s.answer.is_some());
                if unanswered {
                    // No task carries it yet: the opener hears "lost" as its
                    // answer's sender drops with the slot.
                    state.streams.remove(&id);
                } else if let Some(slot) = state.streams.get_mut(&id) {
                    slot.reset = Some(reason);
                    slot.pending = Vec::new();
                    slot.wake.notify_one();
                }
            }
            LinkEvent::Writable { id } => {
                if let Some(slot) = state.streams.get(&id) {
                    slot.wake.notify_one();
                }
            }
            // Nothing left to carry (the machine says so, `is_ended`): the
            // writer closes its side, the peer answers with its own end, and
            // the reader ends on it.
            LinkEvent::GoAway | LinkEvent::Drained => {}
            LinkEvent::PathLost { error } => {
                // The reader sees the link detached and ends the transport.
                // Datagrams are not kept for a new path: they would arrive late.
                state.path_lost = Some(error.to_string());
                state.datagrams.drop_waiting();
            }
            LinkEvent::Closed { error } => {
                tracing::debug!("link closed: {error}");
                state.close_reason.get_or_insert_with(|| error.to_string());
            }
            other => tracing::debug!(?other, "link event"),
        }
    }
}

/// Tells the link its transport is gone (`why`): a resumable link is
/// detached and waits for another, any other is closed and every stream
/// reset.
pub(super) fn lose(shared: &Shared, why: &str) {
    let mut state = shared.lock();
    if state.link.is_detached() || state.link.is_closed() {
        return;
    }
    state.path_lost = Some(why.to_owned());
    state.link.detach(clock::now());
    // Datagrams are not kept for a new path: they would arrive late.
    state.datagrams.drop_waiting();
    changed(&mut state, shared);
}
