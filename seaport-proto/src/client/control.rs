//! The control session: one client's encrypted control session to the registry,
//! with its keepalive, as a state machine of its own. It handles what every
//! client needs alike (handshake, ping/pong, a dead registry, a session-wide
//! error) and returns the rest as [`ControlEvent`]s for the client that owns
//! it to interpret.
//!
//! Invariants: a session ends exactly once, with one
//! [`ControlEvent::Closed`]; events come in wire order, so the messages that
//! arrived before whatever ended the session are still delivered, and nothing
//! after it is; after `Closed` it is idle until the next `connect`.

use std::collections::VecDeque;
use std::time::Instant;

use crate::client::{ClientConfig, ClientError};
use crate::hello::{Capabilities, Intent, Stamp};
use crate::message::{Message, MessageError};
use crate::session::Session;

/// What a control session reports to the client that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ControlEvent {
    /// The handshake completed, `at` this time: the client (re)sends what
    /// it wants.
    Opened {
        /// When.
        at: Instant,
    },
    /// A message for the client to interpret.
    Message(Message),
    /// The session ended; it is idle until the next `connect`.
    Closed(ClientError),
}

/// One open control session and its keepalive state.
struct Open {
    session: Session,
    last_heard: Instant,
    next_ping: Instant,
    nonce: u64,
}

/// A client's control session to the registry; see the module docs.
pub struct ControlSession {
    config: ClientConfig,
    /// The session, between `connect` and its end.
    open: Option<Open>,
    /// Sessions started so far: the counter of the next one's stamp.
    started: u64,
    events: VecDeque<ControlEvent>,
}

impl ControlSession {
    /// Idle; nothing happens before `connect`.
    pub fn new(config: ClientConfig) -> ControlSession {
        ControlSession { config, open: None, started: 0, events: VecDeque::new() }
    }

    /// Who this is and whom it talks to.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// A fresh stream to the registry is up: start the handshake. Replaces
    /// any session still open (its stream is gone).
    pub fn connect(&mut self, now: Instant, entropy: [u8; 32]) -> Result<(), ClientError> {
        let c = &self.config;
        self.started += 1;
        // Process 0 is "not set": such a client sends no stamp (as builds
        // before stamps), rather than one that collides across restarts.
        let stamp = (c.process != 0).then_some(Stamp { process: c.process, counter: self.started });
        let session = Session::initiate_stamped(
            now,
            &c.keypair,
            &c.registry,
            Intent::Control,
            entropy,
            c.handshake_timeout,
            stamp,
        )?;
        self.open = Some(Open { session, last_heard: now, next_ping: now + c.keepalive, nonce: 0 });
        Ok(())
    }

    /// Whether a session is open (handshake done).
    pub fn is_established(&self) -> bool {
        self.open.as_ref().is_some_and(|o| o.session.is_established())
    }

    /// What the registry advertised in its handshake reply (none before).
    pub fn remote_capabilities(&self) -> Capabilities {
        self.open.as_ref().map_or(Capabilities::NONE, |o| o.session.remote_capabilities())
    }

    /// Whether a session exists, established or still handshaking.
    pub fn is_active(&self) -> bool {
        self.open.is_some()
    }

    /// Bytes read from the registry.
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) {
        let Some(open) = &mut self.open else { return };
        let was = open.session.is_established();
        let fed = open.session.handle_input(now, data);
        open.last_heard = now;
        if !was && open.session.is_established() {
            self.events.push_back(ControlEvent::Opened { at: now });
        }
        // What arrived before a failure is delivered first, then the failure.
        let mut ended = None;
        while let Some(plain) = self.open.as_mut().and_then(|o| o.session.poll_message()) {
            match Message::decode(&plain) {
                Ok(Message::Ping { nonce }) => self.send(&Message::Pong { nonce }),
                Ok(Message::Pong { .. }) => {}
                Ok(Message::Error { id: None, code, text }) => {
                    ended = Some(ClientError::Refused { code, text });
                    break;
                }
                Ok(msg) => self.events.push_back(ControlEvent::Message(msg)),
                // A newer registry's message: nothing a client of this build needs.
                Err(MessageError::UnknownKind { .. }) => {}
                Err(e) => {
                    ended = Some(e.into());
                    break;
                }
            }
        }
        if let Some(reason) = ended.or(fed.err().map(ClientError::from)) {
            self.end(reason);
        }
    }

    /// The stream to the registry closed.
    pub fn handle_closed(&mut self) {
        if self.open.is_some() {
            self.end(ClientError::Closed);
        }
    }

    /// Timers: handshake deadline, keepalive, dead registry.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(open) = &mut self.open else { return };
        if let Err(e) = open.session.handle_timeout(now) {
            self.end(e.into());
            return;
        }
        if !open.session.is_established() {
            return;
        }
        if now.saturating_duration_since(open.last_heard) >= self.config.dead_after {
            self.end(ClientError::Silent(self.config.dead_after));
            return;
        }
        if now >= open.next_ping {
            open.nonce += 1;
            open.next_ping = now + self.config.keepalive;
            let nonce = open.nonce;
            self.send(&Message::Ping { nonce });
        }
    }

    /// Ends the session for a reason the client found (an unexpected
    /// message): events still queued from the same read are dropped, since
    /// they came after it.
    pub fn fail(&mut self, reason: ClientError) {
        self.events.retain(|e| !matches!(e, ControlEvent::Message(_)));
        self.end(reason);
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let open = self.open.as_ref()?;
        match open.session.poll_timeout() {
            Some(deadline) => Some(deadline),
            None => Some(open.next_ping.min(open.last_heard + self.config.dead_after)),
        }
    }

    /// Bytes to write to the registry; false if none.
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool {
        self.open.as_mut().is_some_and(|o| o.session.poll_transmit(buf))
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ControlEvent> {
        self.events.pop_front()
    }

    /// Queues `msg` for the registry; dropped when no session is open.
    pub fn send(&mut self, msg: &Message) {
        let Some(open) = &mut self.open else { return };
        let mut plain = Vec::new();
        // Client messages are small and within limits by construction.
        if msg.encode(&mut plain).is_ok() {
            let _ = open.session.send(&plain);
        }
    }

    fn end(&mut self, reason: ClientError) {
        if self.open.take().is_some() {
            self.events.push_back(ControlEvent::Closed(reason));
        }
    }
}
