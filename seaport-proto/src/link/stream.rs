//! One stream's state: where its opening stands, whether each direction
//! ended, its credit, window and turn. Counters and states, no buffers:
//! about 50 bytes a stream.
//!
//! Invariant: a stream is freed once both directions ended and every
//! received byte was consumed ([`Stream::finished`]), or at once on a reset.

use std::time::Instant;

use super::flow::{SendCredit, StreamWindow};
use super::schedule::Turn;

/// Where a stream's opening stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Acceptance {
    /// Proxy: `OPEN` sent, no `ACCEPT` yet. Service: `accept` not called.
    Awaiting,
    /// Service: `ACCEPT` queued and not transmitted yet, so no data may go.
    Unsent,
    /// Accepted, and (service) the `ACCEPT` is on the wire.
    Accepted,
}

/// One direction of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Half {
    Open,
    /// `END` sent (for the send half) or received (for the receive half).
    Ended,
}

/// See the module docs.
#[derive(Debug)]
pub(super) struct Stream {
    pub(super) acceptance: Acceptance,
    pub(super) send: Half,
    pub(super) recv: Half,
    /// What we may send: the peer's grant.
    pub(super) credit: SendCredit,
    /// What we grant.
    pub(super) window: StreamWindow,
    pub(super) turn: Turn,
    /// Early data (the wire's "Early data"): proxy, bytes sent before an
    /// `ACCEPT` covered them; service, bytes received before accepting.
    /// At most [`super::EARLY_DATA`], which fits.
    pub(super) early: u16,
}

impl Stream {
    pub(super) fn new(now: Instant, send_credit: u32, recv_window: u32) -> Stream {
        Stream {
            acceptance: Acceptance::Awaiting,
            send: Half::Open,
            recv: Half::Open,
            credit: SendCredit::new(send_credit),
            window: StreamWindow::new(now, recv_window),
            turn: Turn::default(),
            early: 0,
        }
    }

    /// Accepted (whether or not its `ACCEPT` is on the wire yet).
    pub(super) fn accepted(&self) -> bool {
        self.acceptance != Acceptance::Awaiting
    }

    /// Not accepted as far as the peer can know: its data or `END` would
    /// be early.
    pub(super) fn before_accept(&self) -> bool {
        self.acceptance != Acceptance::Accepted
    }

    /// Whether data may go now, credit aside.
    pub(super) fn sendable(&self) -> bool {
        self.acceptance == Acceptance::Accepted && self.send == Half::Open
    }

    /// Both directions ended and every received byte consumed.
    pub(super) fn finished(&self) -> bool {
        self.send == Half::Ended && self.recv == Half::Ended && self.window.recv.unconsumed == 0
    }
}
