//! How a link ends: gracefully, by a `GOAWAY` either way after which its
//! open streams finish and it drains, or at once, when it fails (a peer's
//! error, a silent peer, a closed transport) and every stream is reset.
//!
//! Invariants: the phase only moves forward (live, drained, closed); a
//! drained link opens nothing and is closed by its driver; a closed link
//! queues only its final `GOAWAY` and holds no stream.

use super::Link;
use super::error::LinkError;
use super::event::LinkEvent;
use super::wire::{Frame, Reason};

/// Whether a `GOAWAY` went either way: no new streams on the link.
#[derive(Debug, Default)]
pub(super) struct GoAway {
    pub(super) sent: bool,
    pub(super) received: bool,
}

impl GoAway {
    pub(super) fn either(&self) -> bool {
        self.sent || self.received
    }
}

/// Where the link is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Carrying streams.
    Live,
    /// A `GOAWAY` went one way or the other and the last stream is gone
    /// ([`LinkEvent::Drained`] was given); the driver closes it.
    Drained,
    /// Ended ([`LinkEvent::Closed`] was given): nothing moves any more.
    Closed,
}

impl Link {
    /// Whether the link has ended.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Whether new streams may be opened: the link is live and no `GOAWAY`
    /// went either way.
    pub fn can_open(&self) -> bool {
        self.phase == Phase::Live && !self.go_away.either()
    }

    /// Whether the link carries nothing more: it closed, or it drained after
    /// a `GOAWAY` (the driver then closes it).
    pub fn is_ended(&self) -> bool {
        self.phase != Phase::Live
    }

    /// No new streams on this link (drain before shutdown or rotation):
    /// `GOAWAY` goes out next; open streams finish, then
    /// [`LinkEvent::Drained`].
    pub fn go_away(&mut self) {
        if self.is_closed() || self.go_away.sent {
            return;
        }
        self.go_away.sent = true;
        self.control.push_back(Frame::GoAway { reason: Reason::NO_ERROR });
        self.check_drained();
    }

    pub(super) fn check_drained(&mut self) {
        if self.phase == Phase::Live && self.go_away.either() && self.streams.is_empty() {
            self.phase = Phase::Drained;
            self.events.push_back(LinkEvent::Drained);
        }
    }

    pub(super) fn close(&mut self, error: LinkError) {
        if self.is_closed() {
            return;
        }
        self.phase = Phase::Closed;
        self.control.clear();
        self.early_queued.clear();
        self.early_queued_bytes = 0;
        self.early_next = None;
        self.schedule.clear();
        self.keepalive.close();
        if let Some(r) = &mut self.resume {
            r.journal.clear();
            r.detached = None;
        }
        if let Some(reason) = error.wire_reason() {
            self.control.push_back(Frame::GoAway { reason });
        }
        for id in std::mem::take(&mut self.streams).into_keys() {
            self.events.push_back(LinkEvent::Reset { id, reason: Reason::LINK_LOST });
        }
        self.window.unconsumed = 0;
        self.events.push_back(LinkEvent::Closed { error });
    }
}
