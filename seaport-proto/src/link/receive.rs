//! The receive path: what each frame from the peer does to the link, and
//! which of them are the peer's error (any of which ends the link).
//!
//! Invariants: the receiver never accepts a byte beyond the credit it
//! granted; a frame for a stream that lived once is ignored, one for a
//! stream that never existed is an error.

use std::time::Instant;

use super::config::CONTROL_BACKLOG;
use super::error::LinkError;
use super::event::{Incoming, LinkEvent};
use super::flow::add_credit;
use super::stream::{Acceptance, Half, Stream};
use super::wire::{Frame, FrameKind, Reason, StreamId};
use super::{EARLY_DATA, Link, Side};

impl Link {
    /// Handles one decoded frame of `len` bytes.
    pub(super) fn on_frame<'a>(
        &mut self,
        now: Instant,
        frame: Frame<'a>,
        len: usize,
    ) -> Result<Option<Incoming<'a>>, LinkError> {
        let kind = frame.kind();
        // Unnumbered on a resumable link: never kept, never counted.
        if let Frame::Datagram { flow, bytes } = frame {
            return self.on_datagram(flow, bytes);
        }
        match (&mut self.resume, frame) {
            (Some(r), Frame::Ack { received }) => {
                if r.on_ack(now, received)? {
                    self.unblock_all();
                }
                return Ok(None);
            }
            (_, Frame::Ack { .. } | Frame::Resume { .. } | Frame::Resumed { .. }) => {
                return Err(LinkError::NotResumable(kind));
            }
            (Some(r), frame) => {
                if let Frame::Data { .. } = frame {
                    r.heard_data(now);
                }
                r.received(now, len);
            }
            (None, _) => {}
        }
        match frame {
            Frame::Open { id, window, client } => self.on_open(now, id, window, client)?,
            Frame::Accept { id, window } => {
                if self.side == Side::Service {
                    return Err(LinkError::WrongDirection(kind));
                }
                let Some(s) = self.live(id, kind)? else { return Ok(None) };
                if s.accepted() {
                    return Err(LinkError::Unexpected { id, kind, when: "after ACCEPT" });
                }
                // The window counts the early data sent before it.
                let sent = u32::from(std::mem::take(&mut s.early));
                s.acceptance = Acceptance::Accepted;
                s.credit.available =
                    window.checked_sub(sent).ok_or(LinkError::EarlyDataOverWindow { id, window, sent })?;
                self.events.push_back(LinkEvent::Accepted { id });
            }
            Frame::Data { id, bytes } => return self.on_data(id, bytes),
            Frame::End { id } => {
                let Some(s) = self.live(id, kind)? else { return Ok(None) };
                if s.before_accept() {
                    return Err(LinkError::Unexpected { id, kind, when: "before ACCEPT" });
                }
                if s.recv == Half::Ended {
                    return Err(LinkError::Unexpected { id, kind, when: "after END" });
                }
                s.recv = Half::Ended;
                self.events.push_back(LinkEvent::End { id });
                self.forget_if_finished(id);
            }
            Frame::Reset { id, reason } => {
                let proxy = self.side == Side::Proxy;
                let Some(s) = self.live(id, kind)? else { return Ok(None) };
                let event = if proxy && !s.accepted() {
                    LinkEvent::Refused { id, reason }
                } else {
                    LinkEvent::Reset { id, reason }
                };
                self.forget(id);
                self.events.push_back(event);
            }
            Frame::Window { id: StreamId::LINK, increment } => {
                let was_empty = self.send_credit == 0;
                self.send_credit = add_credit(self.send_credit, increment, StreamId::LINK)?;
                if was_empty {
                    self.unblock_all();
                }
            }
            Frame::Window { id, increment } => {
                let Some(s) = self.live(id, kind)? else { return Ok(None) };
                s.credit.available = add_credit(s.credit.available, increment, id)?;
                self.unblock(id);
            }
            Frame::Ping { nonce } => self.keepalive.on_ping(nonce),
            Frame::Pong { nonce } => self.keepalive.on_pong(now, nonce),
            Frame::GoAway { reason } if reason != Reason::NO_ERROR => {
                return Err(LinkError::PeerAborted(reason));
            }
            Frame::GoAway { .. } => {
                if !std::mem::replace(&mut self.go_away.received, true) {
                    self.events.push_back(LinkEvent::GoAway);
                }
            }
            // Handled above.
            Frame::Ack { .. } | Frame::Resume { .. } | Frame::Resumed { .. } | Frame::Datagram { .. } => {}
        }
        Ok(None)
    }

    fn on_open(
        &mut self,
        now: Instant,
        id: StreamId,
        window: u32,
        client: Option<std::net::SocketAddr>,
    ) -> Result<(), LinkError> {
        if self.side == Side::Proxy {
            return Err(LinkError::WrongDirection(FrameKind::Open));
        }
        if u64::from(id.get()) < self.next_id {
            return Err(LinkError::StreamIdReused(id));
        }
        self.next_id = u64::from(id.get()) + 1;
        let refusal = if self.go_away.sent {
            Some(Reason::GOING_AWAY)
        } else if self.streams.len() >= self.config.max_streams {
            Some(Reason::STREAM_LIMIT)
        } else {
            None
        };
        if let Some(reason) = refusal {
            if self.control.len() >= CONTROL_BACKLOG {
                return Err(LinkError::Flooded);
            }
            self.control.push_back(Frame::Reset { id, reason });
            return Ok(());
        }
        self.streams.insert(id, Stream::new(now, window, self.config.initial_stream_window));
        self.events.push_back(LinkEvent::Opened { id, client });
        Ok(())
    }

    fn on_data<'a>(&mut self, id: StreamId, bytes: &'a [u8]) -> Result<Option<Incoming<'a>>, LinkError> {
        // At most MAX_DATA, checked by the decoder.
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.window
            .take(len)
            .map_err(|allowed| LinkError::LinkWindowExceeded { len: bytes.len(), allowed })?;
        let early_data = self.early_data && self.side == Side::Service;
        let Some(s) = self.live(id, FrameKind::Data)? else {
            // A stream we already forgot: the bytes are dropped, the credit returned.
            self.window.discard(len);
            self.maybe_update_link();
            return Ok(None);
        };
        if s.before_accept() {
            // Early data: from a proxy told we take it, one frame's worth
            // (the wire's "Early data"), whether or not we accepted since.
            let early =
                u16::try_from(u32::from(s.early) + len).ok().filter(|n| usize::from(*n) <= EARLY_DATA);
            let Some(early) = early.filter(|_| early_data) else {
                return Err(LinkError::Unexpected { id, kind: FrameKind::Data, when: "before ACCEPT" });
            };
            s.early = early;
        }
        if s.recv == Half::Ended {
            return Err(LinkError::Unexpected { id, kind: FrameKind::Data, when: "after END" });
        }
        s.window.recv.take(len).map_err(|allowed| LinkError::StreamWindowExceeded {
            id,
            len: bytes.len(),
            allowed,
        })?;
        s.window.recv.deliver(len);
        self.window.deliver(len);
        Ok(Some(Incoming::Data { id, bytes }))
    }

    /// The stream a peer frame names: `Some` if it lives, `None` if it lived
    /// once (a frame that crossed our reset or the end: ignored), an error if
    /// it never existed.
    fn live(&mut self, id: StreamId, kind: FrameKind) -> Result<Option<&mut Stream>, LinkError> {
        if u64::from(id.get()) >= self.next_id {
            return Err(LinkError::UnknownStream { id, kind });
        }
        Ok(self.streams.get_mut(&id))
    }
}
