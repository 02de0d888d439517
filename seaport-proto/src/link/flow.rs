//! Flow control: the credit we may send on, and the windows we grant, for a
//! stream and for the link as a whole (see the module docs of
//! [`crate::link`] for the rules and where they come from).
//!
//! Invariants, per window: `allowed + unconsumed + pending == size`
//! (bytes in flight aside), so credit never leaks; `allowed` never exceeds
//! [`MAX_WINDOW`]; a sender's credit never exceeds [`MAX_WINDOW`] either.

use std::time::{Duration, Instant};

use super::error::LinkError;
use super::wire::{MAX_WINDOW, StreamId};

/// Adds the peer's grant `increment` to `credit` (for stream `id`, or
/// [`StreamId::LINK`]); a grant beyond [`MAX_WINDOW`] is the peer's error.
pub(super) fn add_credit(credit: u32, increment: u32, id: StreamId) -> Result<u32, LinkError> {
    credit.checked_add(increment).filter(|c| *c <= MAX_WINDOW).ok_or(LinkError::CreditOverflow(id))
}

/// What a stream may still send: the peer's grant.
#[derive(Debug)]
pub(super) struct SendCredit {
    /// Bytes we may still send.
    pub(super) available: u32,
    /// The driver was told there was none: a `Writable` is owed when there
    /// is some again.
    pub(super) blocked: bool,
}

impl SendCredit {
    pub(super) fn new(available: u32) -> SendCredit {
        SendCredit { available, blocked: false }
    }
}

/// A window we grant: what the peer may still send, and what we owe it.
#[derive(Debug)]
pub(super) struct RecvWindow {
    /// The window: fixed for the link, auto-tuned for a stream.
    pub(super) size: u32,
    /// Bytes the peer may still send.
    pub(super) allowed: u32,
    /// Bytes delivered to the driver and not yet consumed.
    pub(super) unconsumed: u32,
    /// Bytes consumed (or dropped) and not yet credited back.
    pub(super) pending: u32,
}

impl RecvWindow {
    pub(super) fn new(size: u32) -> RecvWindow {
        RecvWindow { size, allowed: size, unconsumed: 0, pending: 0 }
    }

    /// `len` bytes arrived: debits the credit, or says how much there was.
    pub(super) fn take(&mut self, len: u32) -> Result<(), u32> {
        self.allowed = self.allowed.checked_sub(len).ok_or(self.allowed)?;
        Ok(())
    }

    /// `len` bytes that arrived went to the driver.
    pub(super) fn deliver(&mut self, len: u32) {
        self.unconsumed = self.unconsumed.saturating_add(len);
    }

    /// `n` delivered bytes were consumed (or dropped with their stream);
    /// the caller checked `n <= unconsumed`.
    pub(super) fn consume(&mut self, n: u32) {
        self.unconsumed -= n;
        self.pending += n;
    }

    /// `len` bytes arrived for no one (a stream already gone): credited
    /// back as if consumed.
    pub(super) fn discard(&mut self, len: u32) {
        self.pending = self.pending.saturating_add(len);
    }

    /// Whether enough was consumed to return: half the window, batched as
    /// in yamux rather than per read.
    pub(super) fn update_due(&self) -> bool {
        self.pending > 0 && self.pending >= self.size / 2
    }

    /// Returns what is pending, growing the window to `size` (at least the
    /// current one): the increment to send in a `WINDOW`.
    pub(super) fn update(&mut self, size: u32) -> u32 {
        let increment = self.pending + (size - self.size);
        self.size = size;
        self.allowed += increment;
        self.pending = 0;
        increment
    }
}

/// A stream's receive window with its auto-tuning.
#[derive(Debug)]
pub(super) struct StreamWindow {
    pub(super) recv: RecvWindow,
    /// When credit was last returned.
    last_update: Instant,
}

impl StreamWindow {
    pub(super) fn new(now: Instant, size: u32) -> StreamWindow {
        StreamWindow { recv: RecvWindow::new(size), last_update: now }
    }

    /// The increment to send now, if one is due: a window used up again
    /// within two round trips (`rtt`) is what limits the stream, so it
    /// doubles, up to `max`.
    pub(super) fn update(&mut self, now: Instant, rtt: Duration, max: u32) -> Option<u32> {
        if !self.recv.update_due() {
            return None;
        }
        let size = self.recv.size;
        let fast = now.saturating_duration_since(self.last_update) < rtt * 2;
        let grown = if fast { size.saturating_mul(2).min(max) } else { size };
        self.last_update = now;
        Some(self.recv.update(grown))
    }
}
