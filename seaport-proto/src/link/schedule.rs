//! Scheduling: which stream sends next. No priorities (HTTP/2's were unused
//! and removed in RFC 9113's era; QUIC leaves them to the application):
//! round robin over the streams whose driver has bytes for them.
//!
//! Invariants: a stream is in the ready queue at most once (its
//! [`Turn::queued`] says whether), and a forgotten stream is not in it, so
//! the queue is never longer than the live streams.

use std::collections::VecDeque;

use super::wire::StreamId;

/// One stream's place in the round robin.
#[derive(Debug, Default)]
pub(super) struct Turn {
    /// The driver has bytes for it ([`super::Link::want_send`]).
    pub(super) wants: bool,
    /// In the ready queue.
    queued: bool,
}

/// The ready queue; see the module docs.
#[derive(Debug, Default)]
pub(super) struct RoundRobin {
    ready: VecDeque<StreamId>,
}

impl RoundRobin {
    /// The driver has bytes for `id`: queued once, at the back.
    pub(super) fn want(&mut self, id: StreamId, turn: &mut Turn) {
        turn.wants = true;
        if !turn.queued {
            turn.queued = true;
            self.ready.push_back(id);
        }
    }

    /// `id` can send again (credit came back): it rejoins the queue if it
    /// still has bytes and is not in it.
    pub(super) fn rejoin(&mut self, id: StreamId, turn: &mut Turn) {
        if turn.wants && !turn.queued {
            turn.queued = true;
            self.ready.push_back(id);
        }
    }

    /// The stream at the front, out of the queue; the caller marks its
    /// [`Turn`] with [`Turn::popped`].
    pub(super) fn pop(&mut self) -> Option<StreamId> {
        self.ready.pop_front()
    }

    /// Whether streams other than the one `turn` belongs to (if any) are
    /// waiting. Counted, not scanned, so waking many streams costs O(1) each.
    pub(super) fn others_waiting(&self, turn: Option<&Turn>) -> bool {
        self.ready.len() > usize::from(turn.is_some_and(|t| t.queued))
    }

    /// Streams waiting.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.ready.len()
    }

    /// Whether any stream is waiting.
    pub(super) fn is_empty(&self) -> bool {
        self.ready.is_empty()
    }

    /// `id` is forgotten.
    pub(super) fn remove(&mut self, id: StreamId, turn: &Turn) {
        if turn.queued {
            self.ready.retain(|r| *r != id);
        }
    }

    /// The link closed.
    pub(super) fn clear(&mut self) {
        self.ready.clear();
    }
}

impl Turn {
    /// Out of the queue; whether the driver still has bytes for it.
    pub(super) fn popped(&mut self) -> bool {
        self.queued = false;
        self.wants
    }
}
