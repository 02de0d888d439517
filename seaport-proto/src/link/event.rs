//! What a link tells its driver: data handed back at once ([`Incoming`])
//! and everything else as events ([`LinkEvent`]).

use super::error::LinkError;
use super::wire::{FlowId, Reason, StreamId};

/// What `handle_frame` hands back at once: what borrows the frame and so
/// cannot wait in a queue. Non-exhaustive for growth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Incoming<'a> {
    /// Bytes for the stream, in order: write them to its socket, then call
    /// [`super::Link::consumed`].
    Data {
        /// The stream.
        id: StreamId,
        /// The payload, borrowed from the frame given to `handle_frame`.
        bytes: &'a [u8],
    },
    /// One datagram of a UDP flow: send it on the flow's socket now, or
    /// drop it (nothing is owed back: datagrams take no credit).
    Datagram {
        /// The flow.
        flow: FlowId,
        /// The whole datagram, borrowed from the frame.
        bytes: &'a [u8],
    },
}

/// What the driver learns from [`super::Link::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkEvent {
    /// Service: the proxy opened a stream. Connect the backend, then
    /// [`super::Link::accept`] or [`super::Link::refuse`].
    Opened {
        /// The stream.
        id: StreamId,
        /// Where the proxy's client connected from, if the proxy shared it
        /// (for a PROXY protocol header to the backend).
        client: Option<std::net::SocketAddr>,
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
    /// A resumable link found its path dead (frames unacknowledged for too
    /// long, or a silent peer) and is detached ([`super::Link::is_detached`]):
    /// drop the transport; a proxy looks for a new path and resumes on it.
    PathLost {
        /// What showed the path dead.
        error: LinkError,
    },
    /// The link ended (after a `Reset` for each stream): close the transport.
    Closed {
        /// Why.
        error: LinkError,
    },
}
