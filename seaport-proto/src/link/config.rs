//! A link's limits and tuning ([`LinkConfig`]), with the protocol constants
//! they are clamped against.
//!
//! Invariant: a config that reached a [`super::Link`] went through
//! `clamped`, so no window, frame size or interval is zero or out of range.

use std::time::Duration;

use super::wire::{MAX_DATA, MAX_WINDOW};

/// The link window each side may assume before the peer's first link-level
/// `WINDOW`: a protocol constant, so no settings exchange is needed.
pub const INITIAL_LINK_WINDOW: u32 = 64 * 1024;
/// Most control frames queued when a peer's `OPEN` needs a refusal: beyond
/// it the peer is taken to be flooding (it keeps opening while not reading
/// our replies). A driver that drains `poll_transmit` after every call
/// keeps the queue near empty.
pub const CONTROL_BACKLOG: usize = 4096;
/// Longest keepalive or dead-after: a day (keeps `Instant` arithmetic far from overflow).
pub(super) const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Limits and tuning of one link. Out-of-range values are clamped by
/// [`super::Link::new`] (a zero window or keepalive would stall or spin): windows to
/// 1..=[`MAX_WINDOW`] (the link window to at least [`INITIAL_LINK_WINDOW`]),
/// frame sizes to 1..=[`MAX_DATA`], intervals to 1 ms..=1 day, the resend
/// limit to two frames..=[`MAX_WINDOW`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Most concurrent streams; a service refuses more with
    /// [`Reason::STREAM_LIMIT`](super::Reason::STREAM_LIMIT), a proxy's `open` fails. Default 1024.
    pub max_streams: usize,
    /// Receive window a stream starts with. Default 256 KiB (yamux's), grown
    /// by auto-tuning for streams whose consumer keeps up.
    pub initial_stream_window: u32,
    /// Most a stream's receive window grows to. Default 8 MiB: enough for
    /// about 1 Gbit/s at 60 ms round trip on one stream.
    pub max_stream_window: u32,
    /// Receive window of the link: the most bytes the peer can make us hold
    /// (received, not yet consumed) over all streams. Default 16 MiB.
    pub link_window: u32,
    /// Largest `DATA` payload while other streams wait to send. Default 16 KiB:
    /// small enough that a request behind a bulk transfer waits microseconds
    /// at LAN speeds, large enough that headers and seals stay cheap.
    pub max_frame_shared: usize,
    /// Largest `DATA` payload for a stream sending alone. Default [`MAX_DATA`].
    pub max_frame_alone: usize,
    /// How often to ping. Default 10 s.
    pub keepalive: Duration,
    /// A peer silent this long is dead. Default 30 s (three pings lost).
    pub dead_after: Duration,
    /// How long a resumable link whose transport is lost waits for a new
    /// one before its streams are reset. Default 10 s: enough to find a
    /// path again through another registry of a set (a meeting, a punch and
    /// a relay's head start take a few seconds), short enough that a client
    /// whose service is really gone hears so soon. A service waits longer
    /// by a keepalive and a path timeout: only the proxy looks for a new
    /// path, and it may notice the loss that much later.
    pub resume_within: Duration,
    /// Most bytes of `DATA` a resumable link keeps for resending (sent, not
    /// acknowledged). At the limit, streams get no credit until an
    /// acknowledgement frees room, so it also caps the bytes in flight on
    /// the link: default 8 MiB, about 1 Gbit/s at 60 ms round trip. On a
    /// fast local path the kernel's socket buffers hold megabytes that this
    /// would keep again; 8 MiB bounds that at a few MB of a process's RSS.
    pub resend_limit: usize,
}

impl Default for LinkConfig {
    fn default() -> LinkConfig {
        LinkConfig {
            max_streams: 1024,
            initial_stream_window: 256 * 1024,
            max_stream_window: 8 * 1024 * 1024,
            link_window: 16 * 1024 * 1024,
            max_frame_shared: 16 * 1024,
            max_frame_alone: MAX_DATA,
            keepalive: Duration::from_secs(10),
            dead_after: Duration::from_secs(30),
            resume_within: Duration::from_secs(10),
            resend_limit: 8 * 1024 * 1024,
        }
    }
}

impl LinkConfig {
    pub(super) fn clamped(mut self) -> LinkConfig {
        self.initial_stream_window = self.initial_stream_window.clamp(1, MAX_WINDOW);
        self.max_stream_window = self.max_stream_window.clamp(self.initial_stream_window, MAX_WINDOW);
        self.link_window = self.link_window.clamp(INITIAL_LINK_WINDOW, MAX_WINDOW);
        self.max_frame_alone = self.max_frame_alone.clamp(1, MAX_DATA);
        self.max_frame_shared = self.max_frame_shared.clamp(1, self.max_frame_alone);
        self.keepalive = self.keepalive.clamp(Duration::from_millis(1), MAX_INTERVAL);
        self.dead_after = self.dead_after.clamp(self.keepalive, MAX_INTERVAL);
        self.resume_within = self.resume_within.clamp(Duration::from_millis(1), MAX_INTERVAL);
        // Room for two of the largest frames, so sending never stalls on a
        // single one; at most what a window can hold.
        self.resend_limit = self.resend_limit.clamp(2 * MAX_DATA, MAX_WINDOW as usize);
        self
    }
}
