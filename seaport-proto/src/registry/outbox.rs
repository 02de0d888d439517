//! The outbox: what the registry sends, to whom, and when a peer is too
//! slow to be sent more.
//!
//! A request's answer (a lookup's, an error, a pong) is checked against the
//! peer's cap *before* it is queued, and a peer it would take past
//! `max_queued` is dropped as slow, so no peer ever has more than that
//! queued. A watch's updates are not queued at each change: a change marks
//! the watch as due, and its answer is made from the directory as it is
//! then, once everything handed out for that peer before was written, and
//! when it fits the peer's cap and the registry's total budget. A watch thus
//! has at most one update waiting, always the latest set, however fast the
//! registered set churns; a watcher is dropped only for not reading what it
//! asked for itself.
//!
//! Invariants: [`Outbox::queued`] is the sum of every peer's
//! [`PeerQueue::counted`]; a session is in [`Outbox::dirty`] at most once
//! (its `dirty` flag says so); farewells are the last bytes of sessions
//! already ended, sent before anything else.

use std::collections::{BTreeSet, VecDeque};

use super::requests::error;
use super::{CloseReason, Registry, SessionId};
use crate::message::{ErrorCode, Message};
use crate::noise::TAG_LEN;
use crate::record::HEADER_LEN;

/// One peer's share of the outbox.
#[derive(Default)]
pub(super) struct PeerQueue {
    /// Already in [`Outbox::dirty`].
    dirty: bool,
    /// Bytes handed to the driver by `poll_transmit` and not yet reported
    /// written ([`Registry::handle_written`]): with what the session still
    /// holds, what this peer has not read. The one slow-peer measure.
    unwritten: usize,
    /// This peer's share of [`Outbox::queued`], as last counted.
    counted: usize,
    /// Watches whose update is due and not made yet (see the module docs).
    pub(super) due: BTreeSet<u32>,
}

/// The registry-wide outbox; see the module docs.
#[derive(Default)]
pub(super) struct Outbox {
    /// Sessions with bytes to send, in the order they got them.
    dirty: VecDeque<SessionId>,
    /// Final bytes of sessions that were closed.
    farewells: VecDeque<(SessionId, Vec<u8>)>,
    /// Bytes queued for all peers together (the sum of their `counted`).
    pub(super) queued: usize,
    /// Peers with due watch updates that wait for the total budget.
    starved: BTreeSet<SessionId>,
}

impl Outbox {
    /// Keeps the last bytes of a session that ended, for the driver.
    pub(super) fn farewell(&mut self, id: SessionId, bytes: Vec<u8>) {
        self.farewells.push_back((id, bytes));
    }

    /// A session ended: its share goes.
    fn release(&mut self, id: SessionId, queue: &PeerQueue) {
        self.queued = self.queued.saturating_sub(queue.counted);
        self.starved.remove(&id);
    }
}

impl super::Peer {
    /// Bytes queued for this peer and not yet written.
    pub(super) fn queued(&self) -> usize {
        self.session.pending_transmit().saturating_add(self.queue.unwritten)
    }
}

/// Whether more bytes can be queued for a peer.
enum Room {
    Fits,
    /// Past the peer's own cap: it asks faster than it reads.
    PeerFull(usize),
    /// Past the registry's total budget.
    RegistryFull,
}

/// The bytes `plain` takes once sealed and framed.
fn sealed_len(plain: &[u8]) -> usize {
    plain.len() + TAG_LEN + HEADER_LEN
}

impl Registry {
    /// Moves bytes for one session into `buf` and says which; `None` when
    /// nothing is waiting.
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> Option<SessionId> {
        if let Some((id, bytes)) = self.outbox.farewells.pop_front() {
            buf.extend_from_slice(&bytes);
            return Some(id);
        }
        while let Some(id) = self.outbox.dirty.pop_front() {
            // While the peer is still marked dirty, so that what this sends
            // does not queue it again.
            self.make_due_updates(id);
            if let Some(peer) = self.peers.get_mut(&id) {
                peer.queue.dirty = false;
                let before = buf.len();
                if peer.session.poll_transmit(buf) {
                    let sent = buf.len().saturating_sub(before);
                    peer.queue.unwritten = peer.queue.unwritten.saturating_add(sent);
                    return Some(id);
                }
            }
        }
        None
    }

    /// The driver wrote `n` bytes of what [`Registry::poll_transmit`] gave for
    /// session `id` to its stream. A driver that never calls this makes every
    /// peer look slow once `max_queued` bytes went out; one that calls it
    /// when the bytes were handed to the kernel gets the intended measure.
    pub fn handle_written(&mut self, id: SessionId, n: usize) {
        let Some(peer) = self.peers.get_mut(&id) else { return };
        peer.queue.unwritten = peer.queue.unwritten.saturating_sub(n);
        let due = peer.queue.unwritten == 0 && !peer.queue.due.is_empty();
        self.recount(id);
        if due {
            self.mark_dirty(id);
        }
        self.retry_starved();
    }

    /// Bytes queued for all peers together, not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.outbox.queued
    }

    /// Makes the answers of session `id`'s due watches from the directory
    /// as it is now, as many as fit, once everything handed out for it
    /// before was written (see the module docs). The rest stay due: a
    /// written report or freed budget brings them back here.
    fn make_due_updates(&mut self, id: SessionId) {
        let Some(peer) = self.peers.get(&id) else { return };
        if peer.queue.unwritten > 0 || peer.queue.due.is_empty() {
            return;
        }
        let parts = peer.takes_parts();
        let due: Vec<u32> = peer.queue.due.iter().copied().collect();
        for watch in due {
            let Some(query) = self.directory.watch_query((id, watch)) else {
                if let Some(peer) = self.peers.get_mut(&id) {
                    peer.queue.due.remove(&watch);
                }
                continue;
            };
            let mut answer = self.directory.answer(watch, query, parts);
            let empty = self.peers.get(&id).is_some_and(|p| p.queued() == 0);
            match self.room(id, &answer) {
                Room::Fits => {}
                // An answer bigger than the whole queue cap would never go:
                // one message of it, marked truncated, does.
                Room::PeerFull(_) if empty && parts => {
                    answer = self.directory.answer(watch, query, false);
                    if !matches!(self.room(id, &answer), Room::Fits) {
                        return;
                    }
                }
                Room::PeerFull(_) => return,
                Room::RegistryFull => {
                    self.outbox.starved.insert(id);
                    return;
                }
            }
            if let Some(peer) = self.peers.get_mut(&id) {
                peer.queue.due.remove(&watch);
            }
            self.send_all(id, &answer);
        }
    }

    /// Whether `plains` can be queued for session `id` now.
    fn room(&self, id: SessionId, plains: &[Vec<u8>]) -> Room {
        let Some(peer) = self.peers.get(&id) else { return Room::Fits };
        let size: usize = plains.iter().map(|p| sealed_len(p)).sum();
        let queued = peer.queued();
        if queued.saturating_add(size) > self.config.max_queued {
            Room::PeerFull(queued)
        } else if self.outbox.queued.saturating_add(size) > self.config.max_total_queued {
            Room::RegistryFull
        } else {
            Room::Fits
        }
    }

    /// Brings [`Outbox::queued`] up to date with session `id`'s queue.
    pub(super) fn recount(&mut self, id: SessionId) {
        let Some(peer) = self.peers.get_mut(&id) else { return };
        let now = peer.queued();
        self.outbox.queued = self.outbox.queued.saturating_sub(peer.queue.counted).saturating_add(now);
        peer.queue.counted = now;
    }

    /// Budget freed: peers whose updates waited for it try again, once the
    /// total is back to half the budget. Not at every byte written: each
    /// retry builds a whole answer, and with many peers waiting near the
    /// limit most would be built only to be thrown away.
    fn retry_starved(&mut self) {
        if !self.outbox.starved.is_empty() && self.outbox.queued <= self.config.max_total_queued / 2 {
            for starved in std::mem::take(&mut self.outbox.starved) {
                self.mark_dirty(starved);
            }
        }
    }

    /// Session `id` ended (its peer is already removed): its share of the
    /// outbox goes, and what waited for that budget may go now.
    pub(super) fn release_queue(&mut self, id: SessionId, queue: &PeerQueue) {
        self.outbox.release(id, queue);
        self.retry_starved();
    }

    /// Watch `watch` of session `id` is due for an update (see the module
    /// docs): made at the next `poll_transmit` that has room for it.
    pub(super) fn make_due(&mut self, id: SessionId, watch: u32) {
        if let Some(peer) = self.peers.get_mut(&id) {
            peer.queue.due.insert(watch);
            self.mark_dirty(id);
        }
    }

    /// Queues the answer to a lookup for session `id`; false if it was not
    /// (the peer was dropped as slow, or the registry is at its budget and
    /// the peer was told so as request `req`).
    pub(super) fn send_answer(&mut self, id: SessionId, req: u32, answer: &[Vec<u8>]) -> bool {
        match self.room(id, answer) {
            Room::Fits => {
                self.send_all(id, answer);
                true
            }
            Room::PeerFull(queued) => {
                self.close(id, CloseReason::Slow(queued));
                false
            }
            Room::RegistryFull => {
                let text = "the registry is at its queue budget: ask again later";
                self.send(id, &error(Some(req), ErrorCode::LIMIT, text));
                false
            }
        }
    }

    /// Queues a small message for session `id`, within the peer's cap and
    /// the registry's budget: a peer it does not fit is dropped as slow.
    pub(super) fn send(&mut self, id: SessionId, msg: &Message) {
        let mut plain = Vec::new();
        // Our own messages are within limits by construction; one that is
        // not is dropped rather than sent half-formed.
        if msg.encode(&mut plain).is_err() {
            return;
        }
        let plains = [plain];
        match self.room(id, &plains) {
            Room::Fits => self.send_all(id, &plains),
            Room::PeerFull(queued) => self.close(id, CloseReason::Slow(queued)),
            Room::RegistryFull => match self.peers.get(&id).map(|p| p.queued()) {
                // Over the budget by one small message, for a peer that
                // reads: the bound the config documents.
                Some(0) => self.send_all(id, &plains),
                Some(queued) => self.close(id, CloseReason::Budget(queued)),
                None => {}
            },
        }
    }

    /// Seals encoded messages for session `id`, in order; the caller
    /// checked the room for them.
    fn send_all(&mut self, id: SessionId, plains: &[Vec<u8>]) {
        let Some(peer) = self.peers.get_mut(&id) else { return };
        let mut sent = false;
        for plain in plains {
            sent |= !plain.is_empty() && peer.session.send(plain).is_ok();
        }
        if sent {
            self.recount(id);
            self.mark_dirty(id);
        }
    }

    pub(super) fn mark_dirty(&mut self, id: SessionId) {
        if let Some(peer) = self.peers.get_mut(&id)
            && !std::mem::replace(&mut peer.queue.dirty, true)
        {
            self.outbox.dirty.push_back(id);
        }
    }

    /// Drops session `id` as slow if it has more queued than its cap.
    pub(super) fn check_queue(&mut self, id: SessionId) {
        let queued = self.peers.get(&id).map_or(0, |p| p.queued());
        if queued > self.config.max_queued {
            self.close(id, CloseReason::Slow(queued));
        }
    }
}
