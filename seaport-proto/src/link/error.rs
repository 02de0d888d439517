//! What can go wrong on a link: the peer's misbehaviour or the transport's
//! end ([`LinkError`], which ends the link), and a driver's stream operation
//! that cannot be done ([`StreamError`], which changes nothing).

use std::time::Duration;

use super::config::CONTROL_BACKLOG;
use super::wire::{FrameError, FrameKind, HEADER_LEN, MAX_WINDOW, Reason, StreamId};

/// What the peer did wrong, or why else the link ended. Any of these ends
/// the link: every stream is reset and [`super::LinkEvent::Closed`] follows.
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
    /// An `ACCEPT` whose window does not cover the early data already sent
    /// (a service that takes early data grants at least [`super::EARLY_DATA`]).
    #[error("stream {id} was accepted with a window of {window} bytes after {sent} bytes of early data")]
    EarlyDataOverWindow {
        /// The stream.
        id: StreamId,
        /// The window its `ACCEPT` granted.
        window: u32,
        /// Early bytes sent.
        sent: u32,
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
    /// No frame for [`super::LinkConfig::dead_after`].
    #[error("peer silent for {0:?}")]
    Silent(Duration),
    /// The peer ended the link with an error `GOAWAY`.
    #[error("peer ended the link: {0}")]
    PeerAborted(Reason),
    /// The driver reported the transport closed ([`super::Link::handle_closed`]).
    #[error("transport closed")]
    Closed,
    /// A resumable link's frame to a peer that did not advertise
    /// resumption, or a `RESUME`/`RESUMED` in the middle of a transport.
    #[error("peer sent {0:?}, which this link does not take here")]
    NotResumable(FrameKind),
    /// An `ACK` for frames never sent on this transport, or behind one
    /// already acknowledged.
    #[error("peer acknowledged {received} frames: {kept_from} were acknowledged before, {sent} sent")]
    BadAck {
        /// The count it sent.
        received: u64,
        /// Frames sent on this transport.
        sent: u64,
        /// Frames acknowledged before.
        kept_from: u64,
    },
    /// A resume from a point outside what was sent and kept.
    #[error("peer resumes after {received} frames: {kept_from} were acknowledged before, {sent} sent")]
    BadResume {
        /// The count it sent.
        received: u64,
        /// Frames sent on the link.
        sent: u64,
        /// Frames acknowledged before.
        kept_from: u64,
    },
    /// The peer let this many bytes of ours wait for its acknowledgement,
    /// far beyond the resend limit: it does not acknowledge as it should.
    #[error("peer leaves {0} bytes unacknowledged")]
    Unacknowledged(usize),
    /// The transport was lost and no new one came in time.
    #[error("no new path within {0:?}")]
    NotResumed(Duration),
    /// A `DATAGRAM` from a peer this end did not offer datagrams to
    /// ([`Capabilities::DATAGRAM`](crate::hello::Capabilities::DATAGRAM)
    /// not common to both).
    #[error("peer sent a DATAGRAM on a link without datagrams")]
    NoDatagrams,
    /// Frames waited this long for an acknowledgement: the path is dead.
    /// Ends a link only where it cannot be resumed.
    #[error("path silent for {0:?} with frames unacknowledged")]
    PathDead(Duration),
}

impl LinkError {
    /// What to tell the peer in a final `GOAWAY`, if it is worth telling.
    pub(super) fn wire_reason(&self) -> Option<Reason> {
        match self {
            LinkError::StreamWindowExceeded { .. }
            | LinkError::LinkWindowExceeded { .. }
            | LinkError::CreditOverflow(_) => Some(Reason::FLOW_CONTROL),
            LinkError::Silent(_)
            | LinkError::PeerAborted(_)
            | LinkError::Closed
            | LinkError::NotResumed(_)
            | LinkError::PathDead(_) => None,
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
    /// A data frame larger than the credit ([`super::Link::send_credit`]), or empty.
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
    /// `open` at [`super::LinkConfig::max_streams`].
    #[error("stream limit reached")]
    StreamLimit,
    /// `open` after a `GOAWAY` either way.
    #[error("the link is going away")]
    GoingAway,
    /// All 2^32 - 1 stream ids used: open a new link.
    #[error("stream ids exhausted")]
    IdsExhausted,
    /// A datagram on a link whose peer does not take datagrams (it is
    /// older, or did not advertise them).
    #[error("the peer does not take datagrams")]
    NoDatagrams,
    /// A datagram above [`super::MAX_DATAGRAM`] bytes: refused, never cut.
    #[error("a datagram of {0} bytes exceeds {max}", max = super::MAX_DATAGRAM)]
    DatagramTooLong(usize),
    /// A datagram of flow 0, which names no flow.
    #[error("flow 0 names no flow")]
    ZeroFlow,
    /// A datagram while the link has no transport (detached): it would
    /// arrive late, so it is dropped rather than kept.
    #[error("the link is between paths")]
    Detached,
}
