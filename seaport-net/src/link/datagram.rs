//! UDP flows on a link: the datagrams waiting for the writer, the flows
//! each end knows, and on a service the socket per flow toward its backend.
//!
//! A flow is one client address at a proxy's UDP port. The proxy numbers it
//! on the link it chose ([`super::LinkHandle::open_flow`]); the service
//! opens one UDP socket toward its backend for it on its first datagram, so
//! the backend's replies come back on that socket and go to that flow's
//! client. Flows end after an idle time, at each end on its own: a service
//! that let a flow go opens a new socket if the proxy sends on it again.
//!
//! Invariants:
//! - Nothing here waits or queues without bound. Datagrams waiting for the
//!   writer are capped ([`QUEUE_BYTES`], [`QUEUE_DATAGRAMS`]): when the
//!   link carries less than comes in, the oldest waiting datagram is
//!   dropped for the newest. A datagram that waited longest is the one
//!   least likely still wanted (a game's old position, a retried DNS
//!   query), and dropping at the head keeps the queueing delay at most
//!   one queue long instead of letting stale data hold back fresh.
//! - A datagram is written to its socket at once (a non-blocking send) or
//!   dropped: a full socket buffer never holds the reader.
//! - A service's flows are capped by its flow budget ([`Budget`]); each
//!   flow's socket and task end with the flow, and every flow ends with the
//!   link ([`Datagrams::clear`]).
//! - Every drop is counted by reason ([`DatagramDrop`]).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use seaport_proto::link::{FlowId, Link, MAX_DATAGRAM};
use tokio::net::UdpSocket;

use super::state::{Shared, State};
use crate::budget::{Budget, StreamShare};
use crate::clock;
use crate::metrics::{DatagramDrop, OpenGuard, metrics};

/// Most bytes of datagrams waiting for a link's writer.
pub const QUEUE_BYTES: usize = 256 * 1024;
/// Most datagrams waiting for a link's writer.
pub const QUEUE_DATAGRAMS: usize = 1024;

/// Where a service's flows go: its UDP backend.
#[derive(Debug, Clone)]
pub struct UdpBackend {
    /// The backend's address.
    pub addr: SocketAddr,
    /// How long a flow lives without a datagram either way.
    pub idle: Duration,
    /// What the service's proxies may hold at once (flows here).
    pub budget: Arc<Budget>,
}

/// One flow as its end of the link knows it.
struct Flow {
    /// Proxy: the port's socket (shared by its flows). Service: the
    /// flow's own socket, connected to the backend.
    socket: Arc<UdpSocket>,
    /// Proxy: the client's address; service: none (the socket is connected).
    client: Option<SocketAddr>,
    /// The last datagram either way.
    last: Instant,
    /// Service: the task reading the backend's replies; aborted with the flow.
    _pump: Option<AbortOnDrop>,
    /// Service: the flow's share of the budget.
    _share: Option<StreamShare>,
    _open: OpenGuard,
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A link's datagrams: waiting ones and known flows.
#[derive(Default)]
pub(super) struct Datagrams {
    queue: VecDeque<(FlowId, Vec<u8>)>,
    queued_bytes: usize,
    flows: HashMap<FlowId, Flow>,
    /// Proxy: the next flow's number.
    next_flow: u32,
    /// Service: where new flows go, for a service of a UDP port.
    pub(super) backend: Option<UdpBackend>,
}

impl Datagrams {
    /// Queues a datagram for the writer, dropping the oldest waiting ones
    /// if the queue is full.
    fn push(&mut self, flow: FlowId, bytes: &[u8]) {
        while !self.queue.is_empty()
            && (self.queue.len() >= QUEUE_DATAGRAMS || self.queued_bytes + bytes.len() > QUEUE_BYTES)
        {
            if let Some((_, old)) = self.queue.pop_front() {
                self.queued_bytes -= old.len();
                metrics().drop_datagram(DatagramDrop::QueueFull);
            }
        }
        self.queued_bytes += bytes.len();
        self.queue.push_back((flow, bytes.to_vec()));
    }

    /// The next datagram for the writer.
    pub(super) fn pop(&mut self) -> Option<(FlowId, Vec<u8>)> {
        let next = self.queue.pop_front()?;
        self.queued_bytes -= next.1.len();
        Some(next)
    }

    /// The link lost its path: waiting datagrams are dropped (and counted),
    /// not delivered late on the next one; flows stay.
    pub(super) fn drop_waiting(&mut self) {
        for _ in self.queue.drain(..) {
            metrics().drop_datagram(DatagramDrop::NoPath);
        }
        self.queue = VecDeque::new();
        self.queued_bytes = 0;
    }

    /// The link ended: every flow ends (a service's sockets and tasks with
    /// them), waiting datagrams are dropped.
    pub(super) fn clear(&mut self) {
        self.flows.clear();
        self.queue = VecDeque::new();
        self.queued_bytes = 0;
    }
}

/// Proxy: a new flow for the client at `client` of the port `socket`,
/// numbered on this link.
pub(super) fn open_flow(state: &mut State, socket: Arc<UdpSocket>, client: SocketAddr) -> Option<FlowId> {
    let d = &mut state.datagrams;
    let n = d.next_flow.checked_add(1)?;
    d.next_flow = n;
    let flow = FlowId::new(n);
    let open = metrics().flow_guard();
    d.flows.insert(
        flow,
        Flow { socket, client: Some(client), last: clock::now(), _pump: None, _share: None, _open: open },
    );
    Some(flow)
}

/// Proxy: the flow is over (idle, or its client went elsewhere).
pub(super) fn close_flow(state: &mut State, flow: FlowId) {
    state.datagrams.flows.remove(&flow);
}

/// When the flow last carried a datagram either way; `None` once it ended.
pub(super) fn last_active(state: &State, flow: FlowId) -> Option<Instant> {
    state.datagrams.flows.get(&flow).map(|f| f.last)
}

/// A datagram from this end's socket for the link: queued for the writer,
/// or dropped (and counted) when the link cannot carry it now.
pub(super) fn send(
    state: &mut State,
    shared: &Shared,
    flow: FlowId,
    bytes: &[u8],
) -> Result<(), DatagramDrop> {
    let link = &state.link;
    let why = if bytes.len() > MAX_DATAGRAM {
        Some(DatagramDrop::TooLarge)
    } else if link.is_closed() || link.is_detached() || !link.takes_datagrams() {
        Some(DatagramDrop::NoPath)
    } else {
        None
    };
    if let Some(why) = why {
        metrics().drop_datagram(why);
        return Err(why);
    }
    if let Some(f) = state.datagrams.flows.get_mut(&flow) {
        f.last = clock::now();
    }
    state.datagrams.push(flow, bytes);
    metrics().datagram("sent");
    shared.work.notify_one();
    Ok(())
}

/// A datagram from the link: to its flow's socket at once, or dropped. On a
/// service of a UDP port, a flow not known yet is opened here.
pub(super) fn deliver(shared: &Arc<Shared>, state: &mut State, flow: FlowId, bytes: &[u8]) {
    let State { link, datagrams, .. } = state;
    if !datagrams.flows.contains_key(&flow) {
        let Some(backend) = datagrams.backend.clone() else {
            // A proxy's flow that ended here, or a service of a TCP port.
            metrics().drop_datagram(DatagramDrop::NoFlow);
            return;
        };
        match open_backend_flow(shared, link, &backend, flow) {
            Ok(f) => {
                datagrams.flows.insert(flow, f);
            }
            Err(why) => {
                metrics().drop_datagram(why);
                return;
            }
        }
    }
    let Some(f) = datagrams.flows.get_mut(&flow) else { return };
    f.last = clock::now();
    // Straight to the kernel: tokio's `try_send` also asks the reactor,
    // which knows nothing of a socket made a moment ago and so refuses
    // the first datagram of every new flow.
    let socket = socket2::SockRef::from(&*f.socket);
    let sent = match f.client {
        Some(client) => socket.send_to(bytes, &client.into()),
        None => socket.send(bytes),
    };
    match sent {
        Ok(_) => metrics().datagram("received"),
        Err(e) => {
            tracing::trace!(%flow, "datagram not sent: {e}");
            metrics().drop_datagram(DatagramDrop::SocketFull);
        }
    }
}

/// Service: a socket toward the backend for `flow`, and the task that
/// carries the backend's replies back over the link.
fn open_backend_flow(
    shared: &Arc<Shared>,
    link: &Link,
    backend: &UdpBackend,
    flow: FlowId,
) -> Result<Flow, DatagramDrop> {
    if link.is_ended() {
        return Err(DatagramDrop::NoPath);
    }
    let share = backend.budget.flow(shared.remote).map_err(|e| {
        tracing::debug!(%flow, "flow refused: {e}");
        DatagramDrop::FlowLimit
    })?;
    let socket = backend_socket(backend.addr).map_err(|e| {
        tracing::warn!(backend = %backend.addr, "cannot open a UDP socket toward the backend: {e}");
        DatagramDrop::FlowLimit
    })?;
    let socket = Arc::new(socket);
    let pump = tokio::spawn(pump(shared.clone(), flow, socket.clone(), backend.idle));
    tracing::debug!(%flow, "flow opened toward the backend");
    Ok(Flow {
        socket,
        client: None,
        last: clock::now(),
        _pump: Some(AbortOnDrop(pump.abort_handle())),
        _share: Some(share),
        _open: metrics().flow_guard(),
    })
}

/// A UDP socket on an ephemeral port, connected to `backend` (so only its
/// replies are taken).
fn backend_socket(backend: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if backend.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(backend)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

thread_local! {
    /// Where a received datagram lands before it is copied, at its own
    /// size, into the link's queue: one buffer per thread, not per flow.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM + 1]);
}

/// Reads one datagram waiting on `socket` into the thread's scratch buffer
/// and hands it to `take`; `None` if none was waiting.
pub fn recv_with<T>(
    socket: &UdpSocket,
    take: impl FnOnce(&[u8], SocketAddr) -> T,
) -> Option<std::io::Result<T>> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        match socket.try_recv_from(&mut scratch) {
            // One byte more than the largest datagram a link carries: a
            // datagram that fills the buffer was larger, and cut.
            Ok((n, from)) => Some(Ok(take(scratch.get(..n).unwrap_or_default(), from))),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => Some(Err(e)),
        }
    })
}

/// Service: carries the backend's replies on `flow` over the link until
/// the flow has been idle for `idle` (or the link ends, which aborts it).
async fn pump(shared: Arc<Shared>, flow: FlowId, socket: Arc<UdpSocket>, idle: Duration) {
    loop {
        let Some(last) = last_active(&shared.lock(), flow) else { return };
        let until = tokio::time::Instant::from_std(last + idle);
        match tokio::time::timeout_at(until, socket.readable()).await {
            Err(_) => {
                let mut state = shared.lock();
                if last_active(&state, flow).is_some_and(|l| clock::now() >= l + idle) {
                    tracing::debug!(%flow, "flow idle: closed");
                    // Drops this task's own abort handle: it ends here.
                    state.datagrams.flows.remove(&flow);
                    return;
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(%flow, "backend socket failed: {e}");
                shared.lock().datagrams.flows.remove(&flow);
                return;
            }
            Ok(Ok(())) => {
                let got = recv_with(&socket, |bytes, _| {
                    let mut state = shared.lock();
                    send(&mut state, &shared, flow, bytes)
                });
                match got {
                    // Counted where sent or dropped.
                    Some(Ok(_)) | None => {}
                    // A backend that is not listening answers with ICMP,
                    // which a connected socket reports on its next read.
                    Some(Err(e)) => tracing::debug!(%flow, "backend: {e}"),
                }
            }
        }
    }
}
