//! Keepalive and round-trip time: a `PING` every
//! [`super::LinkConfig::keepalive`], a `PONG` for each ping received
//! (coalesced: only the latest is answered, so pings cannot queue), and a
//! peer silent for [`super::LinkConfig::dead_after`] is dead.
//!
//! Invariant: at most one pong and one ping of ours are outstanding.

use std::time::{Duration, Instant};

/// What is due at a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    /// Nothing yet.
    Nothing,
    /// Send a ping.
    Ping,
    /// The peer has been silent past `dead_after`.
    Dead,
}

/// See the module docs.
#[derive(Debug)]
pub(super) struct Keepalive {
    interval: Duration,
    dead_after: Duration,
    /// The latest ping to answer.
    pong: Option<u64>,
    nonce: u64,
    /// Our ping in flight, and when it went.
    ping_sent: Option<(u64, Instant)>,
    rtt: Option<Duration>,
    next_ping: Instant,
    last_heard: Instant,
}

impl Keepalive {
    pub(super) fn new(now: Instant, interval: Duration, dead_after: Duration) -> Keepalive {
        Keepalive {
            interval,
            dead_after,
            pong: None,
            nonce: 0,
            ping_sent: None,
            rtt: None,
            next_ping: now,
            last_heard: now,
        }
    }

    /// A frame came from the peer.
    pub(super) fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// Our next ping's nonce; the next one is due an interval later.
    pub(super) fn ping(&mut self, now: Instant) -> u64 {
        self.nonce = self.nonce.wrapping_add(1);
        self.ping_sent = Some((self.nonce, now));
        self.next_ping = now + self.interval;
        self.nonce
    }

    /// Our ping in flight will not be answered (its transport is gone): a
    /// pong for it after a resume would measure the outage, not the path.
    pub(super) fn forget_ping(&mut self) {
        self.ping_sent = None;
    }

    /// Whether a ping of ours is still unanswered.
    pub(super) fn awaiting_pong(&self) -> bool {
        self.ping_sent.is_some()
    }

    /// The peer pinged.
    pub(super) fn on_ping(&mut self, nonce: u64) {
        self.pong = Some(nonce);
    }

    /// The peer answered: the round trip is measured if it answers ours.
    pub(super) fn on_pong(&mut self, now: Instant, nonce: u64) {
        if let Some((_, sent)) = self.ping_sent.filter(|(n, _)| *n == nonce) {
            self.rtt = Some(now.saturating_duration_since(sent));
            self.ping_sent = None;
        }
    }

    /// The pong to send, if one is owed.
    pub(super) fn take_pong(&mut self) -> Option<u64> {
        self.pong.take()
    }

    /// The link closed: no pong is owed any more.
    pub(super) fn close(&mut self) {
        self.pong = None;
    }

    /// The last measured round-trip time.
    pub(super) fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// What is due at `now`.
    pub(super) fn due(&self, now: Instant) -> Due {
        if now.saturating_duration_since(self.last_heard) >= self.dead_after {
            Due::Dead
        } else if now >= self.next_ping {
            Due::Ping
        } else {
            Due::Nothing
        }
    }

    /// When [`Keepalive::due`] next changes.
    pub(super) fn deadline(&self) -> Instant {
        self.next_ping.min(self.last_heard + self.dead_after)
    }
}
