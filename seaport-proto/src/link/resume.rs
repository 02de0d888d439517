//! Resumable links: a link that outlives its transport. Both ends number the
//! frames they send (the link's, not `ACK`/`RESUME`/`RESUMED`), acknowledge
//! what they received, and keep what the peer has not acknowledged in a
//! bounded [`Journal`]; when the transport goes, the link is *detached*: its
//! streams stay, and it waits up to [`super::LinkConfig::resume_within`] for
//! a new transport, on which each end tells the other how much it received
//! and resends the rest. The link machine above this sees one unbroken
//! sequence of frames, so every rule it keeps (credit, stream states) holds
//! across the move.
//!
//! # Acknowledgements
//! `ACK` carries the count of numbered frames received and handled. It goes
//! once [`ACK_EVERY`] bytes (or a quarter of the resend limit, if less: a
//! sender at its limit is never stuck waiting) arrived since the last one,
//! and otherwise [`ACK_DELAY`] after the first frame it does not cover: one
//! 29-byte record per 256 KiB under bulk, a few a second at most otherwise,
//! none on an idle link. `RESUME` and `RESUMED` carry the same count.
//!
//! # Bounds
//! The journal holds at most [`super::LinkConfig::resend_limit`] bytes of
//! `DATA` (control frames are few and bounded by the machine's own queues):
//! at the limit, no stream gets credit until an `ACK` frees room, so the
//! driver stops reading its sockets instead of the journal growing. Control
//! frames beyond it are allowed [`RESEND_SLACK`] more, past which the peer
//! is taken to withhold its acknowledgements and the link ends. Emptied,
//! the journal gives its memory back: an idle link keeps none.
//!
//! # Dead paths
//! A path is dead when frames wait for an acknowledgement and none came for
//! [`PATH_TIMEOUT`] (or four round trips, if longer): much sooner than the
//! keepalive's silence, because with data outstanding an `ACK` is due within
//! [`ACK_DELAY`] of its arrival. The link is then detached, and the driver
//! finds another path. The receiving end of a transfer has nothing waiting
//! for an `ACK`: when `DATA` stops arriving for half a [`PATH_TIMEOUT`] it
//! probes with a ping (once per pause), so it finds a dead path within one
//! and a half path timeouts, and the proxy, the one that can look for a new path, learns of
//! it even when it is the one downloading.
//!
//! # Security
//! A link is named on a new transport by a token derived from the handshake
//! hash of the session it began on ([`token`]): only its two ends know it,
//! and it travels only inside a new session authenticated to the same two
//! keys, so a recorded `RESUME` replayed on another connection fails that
//! connection's handshake, and another key cannot name the link.
//!
//! Invariants: the journal holds exactly the frames numbered
//! `first .. first + len` (the peer acknowledged everything before); an
//! acknowledgement or resume point outside what was sent is the peer's
//! error; nothing is resent that the peer said it had.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::error::LinkError;
use super::wire::RESUME_TOKEN_LEN;
use crate::noise::MAX_PLAINTEXT;

/// Longest an `ACK` waits for more frames to cover.
pub const ACK_DELAY: Duration = Duration::from_millis(20);
/// Bytes received after which an `ACK` goes at once: what a sender keeps
/// beyond the bytes in flight is at most about this much.
pub const ACK_EVERY: usize = 256 * 1024;
/// A path with frames outstanding and no acknowledgement for this long (or
/// four round trips, if longer) is dead.
pub const PATH_TIMEOUT: Duration = Duration::from_millis(1500);

/// Bytes of control frames a resumable link keeps beyond its resend limit
/// before it takes the peer to be withholding acknowledgements (an end that
/// acknowledges as this one does keeps far fewer: its control frames are
/// replies, a few per round trip).
pub const RESEND_SLACK: usize = 256 * 1024;

/// What a kept frame counts for at least: its allocation and its place in
/// the queue cost about this much however small it is, so a flood of tiny
/// control frames is bounded by memory, not by their payload.
pub const MIN_CHARGE: usize = 64;

/// What keeping a frame of `len` bytes counts for.
fn charge(len: usize) -> usize {
    len.max(MIN_CHARGE)
}

/// The secret that names a link on a new transport: derived from the
/// handshake hash of the Noise session the link began on, which both ends
/// share and no one else can compute.
pub fn token(handshake_hash: &[u8]) -> [u8; RESUME_TOKEN_LEN] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"seaport link resume token v1\0");
    ctx.update(handshake_hash);
    let mut out = [0u8; RESUME_TOKEN_LEN];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// A frame at least this long is kept in a buffer of [`MAX_PLAINTEXT`]
/// bytes that the journal reuses once the frame is acknowledged. Under bulk
/// every `DATA` frame would otherwise be a fresh 64 KiB allocation, which
/// the allocator takes from the kernel and gives back in turn: page faults,
/// zeroing and unmapping were about 9 % of a busy service's CPU (its
/// profile, BENCHMARKS.md). A reused buffer holds at most twice its frame;
/// a smaller frame gets an allocation of its own size.
const REUSED_FROM: usize = MAX_PLAINTEXT / 2;
/// The frames sent and not yet acknowledged, oldest first, with where
/// resending stands on the current transport. A small frame is kept in an
/// allocation of its own size, a large one in a buffer reused from an
/// acknowledged one ([`REUSED_FROM`]): memory follows what is kept, with no
/// ring to double. Buffers wait for reuse until the link is idle
/// ([`Journal::release_spares`]), as many as the resend limit holds at
/// most: kept and spare buffers together are never more than the journal
/// held at its fullest. In bytes that is at most twice the resend limit
/// and its slack (a reused buffer holds at least half its size), and in
/// bulk, with full frames, about the limit. (Fewer spares measured no
/// better: acknowledgements free frames in bursts, and each buffer not
/// kept was allocated again, page by page, moments later.)
#[derive(Debug, Default)]
pub(super) struct Journal {
    /// The frames kept.
    frames: VecDeque<Vec<u8>>,
    /// Buffers of acknowledged large frames, for the next ones.
    spares: Vec<Vec<u8>>,
    /// Most spare buffers kept.
    max_spares: usize,
    /// Their bytes in all.
    bytes: usize,
    /// The number of the oldest frame kept.
    first: u64,
    /// The number of the next frame to resend; `next()` when none is due.
    resend: u64,
}

impl Journal {
    /// The number the next frame sent gets.
    pub(super) fn next(&self) -> u64 {
        self.first + self.frames.len() as u64
    }

    /// Bytes kept, each frame counted at least [`MIN_CHARGE`].
    pub(super) fn kept_bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frames are waiting to be resent on this transport.
    pub(super) fn resending(&self) -> bool {
        self.resend < self.next()
    }

    /// Keeps a frame just sent.
    pub(super) fn push(&mut self, frame: &[u8]) {
        let at_end = !self.resending();
        let kept = if frame.len() >= REUSED_FROM {
            let mut buffer = self.spares.pop().unwrap_or_else(|| Vec::with_capacity(MAX_PLAINTEXT));
            buffer.clear();
            buffer.extend_from_slice(frame);
            buffer
        } else {
            frame.to_vec()
        };
        self.frames.push_back(kept);
        self.bytes += charge(frame.len());
        if at_end {
            self.resend = self.next();
        }
    }

    /// The peer has every frame before `n`: forgets them. `n` may not pass
    /// what was sent on this transport. Returns whether anything was freed.
    pub(super) fn ack(&mut self, n: u64) -> Result<bool, LinkError> {
        if n < self.first || n > self.resend {
            return Err(LinkError::BadAck { received: n, sent: self.resend, kept_from: self.first });
        }
        let freed = n > self.first;
        while self.first < n {
            let Some(frame) = self.frames.pop_front() else { break };
            self.bytes -= charge(frame.len());
            self.first += 1;
            if frame.len() >= REUSED_FROM && self.spares.len() < self.max_spares {
                self.spares.push(frame);
            }
        }
        if self.frames.is_empty() {
            // An idle link keeps no memory.
            self.frames = VecDeque::new();
        }
        Ok(freed)
    }

    /// A new transport, on which the peer says it has every frame before
    /// `n`: forgets those and resends the rest, from the oldest.
    pub(super) fn restart(&mut self, n: u64) -> Result<(), LinkError> {
        if n < self.first || n > self.next() {
            return Err(LinkError::BadResume { received: n, sent: self.next(), kept_from: self.first });
        }
        self.resend = self.next();
        self.ack(n)?;
        self.resend = n;
        Ok(())
    }

    /// Appends the next frame to resend to `out`; false when none is due.
    pub(super) fn resend_next(&mut self, out: &mut Vec<u8>) -> bool {
        if !self.resending() {
            return false;
        }
        let index = usize::try_from(self.resend - self.first).unwrap_or(usize::MAX);
        let Some(frame) = self.frames.get(index) else { return false };
        out.extend_from_slice(frame);
        self.resend += 1;
        true
    }

    /// Whether buffers wait for reuse.
    pub(super) fn holds_spares(&self) -> bool {
        !self.spares.is_empty()
    }

    /// Gives back the buffers kept for reuse (the link is idle).
    pub(super) fn release_spares(&mut self) {
        self.spares = Vec::new();
    }

    /// A journal whose `DATA` is bounded by `limit` bytes.
    pub(super) fn new(limit: usize) -> Journal {
        Journal { max_spares: limit.div_ceil(MAX_PLAINTEXT), ..Journal::default() }
    }

    /// Forgets everything (the link ended).
    pub(super) fn clear(&mut self) {
        *self = Journal {
            first: self.next(),
            resend: self.next(),
            max_spares: self.max_spares,
            ..Journal::default()
        };
    }
}

/// One end's resumption state: see the module docs.
#[derive(Debug)]
pub(super) struct Resume {
    pub(super) token: [u8; RESUME_TOKEN_LEN],
    pub(super) journal: Journal,
    /// Numbered frames received and handled.
    pub(super) received: u64,
    /// `received` as last told to the peer.
    told: u64,
    /// Bytes of numbered frames received since then.
    untold_bytes: usize,
    /// An `ACK` goes with the next transmit.
    pub(super) ack_now: bool,
    /// When an `ACK` falls due though few bytes came.
    ack_at: Option<Instant>,
    /// Since when frames wait for the peer's acknowledgement without any
    /// progress; `None` while nothing waits.
    waiting_since: Option<Instant>,
    /// Set while detached: the transport is gone, and the link is given up
    /// at this instant unless a new one comes.
    pub(super) detached: Option<Instant>,
    /// When to probe the path with a ping: half a path timeout after the
    /// last `DATA` received, so a transfer that stops dead is noticed by its
    /// receiver too, which has nothing of its own waiting for an ACK.
    probe_at: Option<Instant>,
    /// A probe is to go with the next transmit chance.
    pub(super) probe_now: bool,
    /// Most bytes of `DATA` kept.
    limit: usize,
    /// How long a detached link waits.
    within: Duration,
}

impl Resume {
    pub(super) fn new(token: [u8; RESUME_TOKEN_LEN], limit: usize, within: Duration) -> Resume {
        Resume {
            token,
            journal: Journal::new(limit),
            received: 0,
            told: 0,
            untold_bytes: 0,
            ack_now: false,
            ack_at: None,
            waiting_since: None,
            detached: None,
            probe_at: None,
            probe_now: false,
            limit,
            within,
        }
    }

    /// Bytes of `DATA` that may still be kept before sending must wait.
    pub(super) fn room(&self) -> usize {
        self.limit.saturating_sub(self.journal.kept_bytes())
    }

    /// Whether no data may be read from streams now: detached, or frames
    /// still to resend first.
    pub(super) fn paused(&self) -> bool {
        self.detached.is_some() || self.journal.resending()
    }

    /// A frame was sent for the first time. An error if the peer lets
    /// far more wait for its acknowledgement than it should.
    pub(super) fn sent(&mut self, now: Instant, frame: &[u8]) -> Result<(), LinkError> {
        self.journal.push(frame);
        self.waiting_since.get_or_insert(now);
        if self.journal.kept_bytes() > self.limit + RESEND_SLACK {
            return Err(LinkError::Unacknowledged(self.journal.kept_bytes()));
        }
        Ok(())
    }

    /// A `DATA` frame arrived: the path is probed if data then stops.
    pub(super) fn heard_data(&mut self, now: Instant) {
        self.probe_at = Some(now + PATH_TIMEOUT / 2);
    }

    /// A numbered frame of `len` bytes was received and handled.
    pub(super) fn received(&mut self, now: Instant, len: usize) {
        self.received += 1;
        self.untold_bytes += len;
        if self.untold_bytes >= (self.limit / 4).clamp(1, ACK_EVERY) {
            self.ack_now = true;
        } else {
            self.ack_at.get_or_insert(now + ACK_DELAY);
        }
    }

    /// The count to put in an `ACK` now, if one is due; it is then told.
    pub(super) fn take_ack(&mut self) -> Option<u64> {
        if !self.ack_now || self.detached.is_some() {
            return None;
        }
        self.ack_now = false;
        self.ack_at = None;
        self.untold_bytes = 0;
        self.told = self.received;
        (self.told > 0).then_some(self.told)
    }

    /// The peer acknowledged frames before `n`. Returns whether room was
    /// freed.
    pub(super) fn on_ack(&mut self, now: Instant, n: u64) -> Result<bool, LinkError> {
        let freed = self.journal.ack(n)?;
        if freed {
            self.waiting_since = (!self.journal.is_empty()).then_some(now);
        }
        Ok(freed)
    }

    /// The transport is gone: waits for a new one until `now + within`.
    pub(super) fn detach(&mut self, now: Instant) {
        if self.detached.is_none() {
            self.detached = Some(now + self.within);
        }
        self.ack_now = false;
        self.ack_at = None;
        self.waiting_since = None;
        self.probe_at = None;
        self.probe_now = false;
    }

    /// A new transport, on which the peer has frames before `peer_received`
    /// and was told ours.
    pub(super) fn attach(&mut self, now: Instant, peer_received: u64) -> Result<(), LinkError> {
        self.journal.restart(peer_received)?;
        self.detached = None;
        self.told = self.received;
        self.untold_bytes = 0;
        self.waiting_since = (!self.journal.is_empty()).then_some(now);
        Ok(())
    }

    /// What falls due at `now`.
    pub(super) fn due(&mut self, now: Instant, rtt: Option<Duration>) -> Option<LinkError> {
        if let Some(deadline) = self.detached {
            return (now >= deadline).then_some(LinkError::NotResumed(self.within));
        }
        if self.ack_at.is_some_and(|at| now >= at) {
            self.ack_now = true;
        }
        if self.probe_at.is_some_and(|at| now >= at) {
            self.probe_at = None;
            // Frames of ours waiting for an ACK already time the path.
            self.probe_now = self.waiting_since.is_none();
        }
        let timeout = self.path_timeout(rtt);
        self.waiting_since.filter(|since| now >= *since + timeout).map(|_| LinkError::PathDead(timeout))
    }

    /// When [`Resume::due`] next has something to do.
    pub(super) fn deadline(&self, rtt: Option<Duration>) -> Option<Instant> {
        if let Some(deadline) = self.detached {
            return Some(deadline);
        }
        let path = self.waiting_since.map(|since| since + self.path_timeout(rtt));
        [self.ack_at.filter(|_| !self.ack_now), path, self.probe_at].into_iter().flatten().min()
    }

    fn path_timeout(&self, rtt: Option<Duration>) -> Duration {
        PATH_TIMEOUT.max(rtt.unwrap_or_default() * 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(j: &mut Journal) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while j.resend_next(&mut buf) {
            out.push(std::mem::take(&mut buf));
        }
        out
    }

    #[test]
    fn a_journal_resends_exactly_what_the_peer_lacks() {
        let mut j = Journal::default();
        for i in 0..5u8 {
            j.push(&vec![i; usize::from(i) + 1]);
        }
        assert_eq!((j.next(), j.kept_bytes()), (5, 5 * MIN_CHARGE));
        assert!(!j.resending());
        assert_eq!(j.ack(2), Ok(true));
        assert_eq!(j.kept_bytes(), 3 * MIN_CHARGE);
        // Beyond what was sent, or behind what was acknowledged: the peer's error.
        assert!(j.ack(6).is_err());
        assert!(j.ack(1).is_err());
        assert!(j.restart(6).is_err());
        assert!(j.restart(1).is_err());
        j.restart(3).unwrap();
        assert!(j.resending());
        // A frame sent meanwhile queues behind the resend.
        j.push(&[9, 9]);
        assert_eq!(frames(&mut j), [vec![3; 4], vec![4; 5], vec![9, 9]]);
        // Acknowledgements only up to what went on this transport.
        j.restart(4).unwrap();
        assert!(j.ack(5).is_err(), "frame 4 was not resent yet");
        assert_eq!(frames(&mut j).len(), 2);
        assert_eq!(j.ack(6), Ok(true));
        assert!(j.is_empty() && j.kept_bytes() == 0 && j.frames.capacity() == 0);
    }

    #[test]
    fn a_journal_used_again_and_again_resends_whole_frames() {
        let mut j = Journal::default();
        let mut n = 0u64;
        for round in 0..50u8 {
            for k in 0..7u8 {
                j.push(&vec![round ^ k; usize::from(k) * 3 + 1]);
            }
            n += 7;
            j.ack(n - 3).unwrap();
            j.restart(n - 3).unwrap();
            let got = frames(&mut j);
            let want: Vec<Vec<u8>> = (4..7u8).map(|k| vec![round ^ k; usize::from(k) * 3 + 1]).collect();
            assert_eq!(got, want);
        }
    }

    /// Large frames' buffers are reused once acknowledged, at most
    /// SPARES of them wait, a reused buffer resends its new frame whole,
    /// and an idle link gives them back.
    #[test]
    fn a_journal_reuses_large_buffers_and_gives_them_back() {
        const SPARES: usize = 8;
        let mut j = Journal::new(SPARES * MAX_PLAINTEXT);
        for i in 0..2 * SPARES {
            j.push(&vec![i as u8; MAX_PLAINTEXT - i]);
        }
        j.push(&[1, 2, 3]);
        j.ack(j.next()).unwrap();
        assert_eq!(j.spares.len(), SPARES);
        assert!(j.spares.iter().all(|b| b.capacity() >= MAX_PLAINTEXT));
        let reused = j.spares.last().map(Vec::as_ptr);
        let n = j.next();
        j.push(&vec![7; REUSED_FROM]);
        assert_eq!(j.spares.len(), SPARES - 1);
        assert_eq!(j.frames.back().map(Vec::as_ptr), reused, "a spare buffer was taken");
        j.restart(n).unwrap();
        assert_eq!(frames(&mut j), [vec![7; REUSED_FROM]]);
        // Small frames take no spare.
        j.push(&[5; 100]);
        assert_eq!(j.spares.len(), SPARES - 1);
        j.release_spares();
        assert_eq!(j.spares.capacity(), 0);
    }

    #[test]
    fn tokens_differ_per_session() {
        assert_ne!(token(&[1; 32]), token(&[2; 32]));
        assert_eq!(token(&[1; 32]), token(&[1; 32]));
    }
}
