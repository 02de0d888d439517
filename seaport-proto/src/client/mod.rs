//! The two registry clients, [`ServiceClient`] (register roles, keep them
//! registered) and [`ProxyClient`] (watch a query), each composed of a
//! [`ControlSession`] (the control session and its keepalive) and its own
//! logic; [`Backoff`] paces reconnects. A client follows one registry: of
//! a registry set (several registries under one key) a process runs one
//! client per member, and a proxy acts on their union ([`set::SetView`]),
//! ordered for each connection by [`balance`].
//!
//! Driving either (sans-io, through [`RegistryClient`]): when the driver has
//! a fresh TCP stream to the registry it calls `connect(now, entropy)`; bytes
//! read go to `handle_input(now, bytes)`, a closed stream to
//! `handle_closed()`, the timer at `poll_timeout()` to `handle_timeout(now)`;
//! after each call it drains `poll_transmit(&mut buf)` and then
//! `poll_event()`. A `Disconnected` event (exactly one per session) means:
//! close the stream, wait [`Backoff::next_delay`], dial again and call
//! `connect`. What the client wants (its roles, its query) survives
//! reconnects: it registers and watches again by itself each time a session
//! opens.
//!
//! Liveness: a ping goes out every `keepalive`; a registry silent for
//! `dead_after` is dead. Both bounds come from [`ClientConfig`].

use std::time::{Duration, Instant};

use crate::keys::{Keypair, PublicKey};
use crate::message::{ErrorCode, MessageError};
use crate::session::SessionError;

/// The glue every client has alike: its `control_session` field is its session,
/// its events queue in `events`, its event type has `Connected` and
/// `Disconnected(ClientError)`, its `on_control_event` interprets the
/// session's events and its `on_local_addr` takes the local address of the
/// stream to the registry.
macro_rules! registry_client {
    ($client:ident, $event:ident) => {
        impl $crate::client::sealed::Composed for $client {
            fn control_session(&self) -> &ControlSession {
                &self.control_session
            }
            fn control_session_mut(&mut self) -> &mut ControlSession {
                &mut self.control_session
            }
            fn on_control_event(&mut self, event: ControlEvent) {
                self.on_control_event(event);
            }
            fn on_local_addr(&mut self, local: std::net::SocketAddr) {
                self.on_local_addr(local);
            }
            fn deadline(&self) -> Option<std::time::Instant> {
                self.deadline()
            }
            fn on_deadline(&mut self, now: std::time::Instant) {
                self.on_deadline(now);
            }
        }

        impl $crate::client::RegistryClient for $client {
            type Event = $event;
            fn poll_event(&mut self) -> Option<$event> {
                self.events.pop_front()
            }
            fn is_connected_event(event: &$event) -> bool {
                matches!(event, $event::Connected)
            }
            fn disconnect_reason(event: &$event) -> Option<&ClientError> {
                match event {
                    $event::Disconnected(reason) => Some(reason),
                    _ => None,
                }
            }
        }
    };
}

pub mod backoff;
pub mod balance;
pub mod control;
pub mod proxy;
pub mod service;
pub mod set;

pub use backoff::Backoff;
pub use balance::Strategy;
pub use control::{ControlEvent, ControlSession};
pub use proxy::{ProxyClient, ProxyEvent};
pub use service::{ServiceClient, ServiceEvent};
pub use set::{MAX_MEMBERS, SetView};

/// Who to talk to and how patiently.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// This client's identity.
    pub keypair: Keypair,
    /// The registry's identity.
    pub registry: PublicKey,
    /// How long the handshake may take.
    pub handshake_timeout: Duration,
    /// How often to ping the registry.
    pub keepalive: Duration,
    /// A registry silent this long is considered gone.
    pub dead_after: Duration,
    /// This process among others of the same identity (random, chosen once
    /// per process by the driver): a registry lets sessions of different
    /// processes of one identity coexist, and a session supersede only an
    /// earlier one of its own process ([`crate::hello::Stamp`]). 0 means
    /// unset: the client then sends no stamp.
    pub process: u64,
}

impl ClientConfig {
    /// Defaults: 10 s handshake, ping every 5 s, dead after 15 s of silence,
    /// process 0 (a driver sets a random one).
    pub fn new(keypair: Keypair, registry: PublicKey) -> ClientConfig {
        ClientConfig {
            keypair,
            registry,
            handshake_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(5),
            dead_after: Duration::from_secs(15),
            process: 0,
        }
    }
}

/// Why a client's control session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The stream closed.
    #[error("connection to the registry closed")]
    Closed,
    /// Noise-level failure: wrong registry key, incompatible version, timeout, corruption.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The registry sent something that is not a valid control message.
    #[error(transparent)]
    Message(#[from] MessageError),
    /// The registry sent a kind of message a client does not expect (named).
    #[error("unexpected {0} message from the registry")]
    Unexpected(&'static str),
    /// The registry ended the session with an error.
    #[error("registry closed the session: {code}: {text}")]
    Refused {
        /// Its code.
        code: ErrorCode,
        /// Its text.
        text: String,
    },
    /// No answer within `dead_after`.
    #[error("registry silent for {0:?}")]
    Silent(Duration),
}

/// How a client is composed, kept out of the public API: its control session,
/// and where the link's events go.
pub(crate) mod sealed {
    use super::control::{ControlEvent, ControlSession};

    /// Implemented by each client; [`super::RegistryClient`] builds on it.
    pub trait Composed {
        /// The client's control session.
        fn control_session(&self) -> &ControlSession;
        /// The client's control session, to drive it.
        fn control_session_mut(&mut self) -> &mut ControlSession;
        /// Interprets one event of the control session.
        fn on_control_event(&mut self, event: ControlEvent);
        /// The local address of the stream to the registry.
        fn on_local_addr(&mut self, local: std::net::SocketAddr);
        /// When the client's own timer is next due, if it has one.
        fn deadline(&self) -> Option<std::time::Instant>;
        /// The client's own timer came due.
        fn on_deadline(&mut self, now: std::time::Instant);
    }
}

/// What a driver needs of either client to keep its control session going:
/// the common vocabulary, provided once here over the client's control session.
pub trait RegistryClient: sealed::Composed {
    /// The client's event type.
    type Event: std::fmt::Debug;

    /// The next event.
    fn poll_event(&mut self) -> Option<Self::Event>;
    /// Whether `event` reports the session opened (the backoff can reset).
    fn is_connected_event(event: &Self::Event) -> bool;
    /// The reason, if `event` reports the session ended (reconnect after a backoff).
    fn disconnect_reason(event: &Self::Event) -> Option<&ClientError>;

    /// A fresh stream to the registry is up: start the handshake.
    fn connect(&mut self, now: Instant, entropy: [u8; 32]) -> Result<(), ClientError> {
        self.control_session_mut().connect(now, entropy)
    }

    /// The fresh stream's local address (call before `connect`): the
    /// address this host reaches the registry from, which a service reports
    /// as one of its own when it listens on every interface, so that a proxy
    /// on its LAN dials it directly.
    fn handle_local_addr(&mut self, local: std::net::SocketAddr) {
        self.on_local_addr(local);
    }

    /// Whether the control session is established.
    fn is_connected(&self) -> bool {
        self.control_session().is_established()
    }

    /// Bytes read from the registry.
    fn handle_input(&mut self, now: Instant, data: &[u8]) {
        self.control_session_mut().handle_input(now, data);
        drain(self);
    }

    /// The stream to the registry closed.
    fn handle_closed(&mut self) {
        self.control_session_mut().handle_closed();
        drain(self);
    }

    /// Timers: handshake deadline, keepalive, dead registry, and the
    /// client's own (a proxy's grace after a reconnect).
    fn handle_timeout(&mut self, now: Instant) {
        self.control_session_mut().handle_timeout(now);
        drain(self);
        if self.deadline().is_some_and(|d| d <= now) {
            self.on_deadline(now);
        }
    }

    /// When `handle_timeout` must next be called.
    fn poll_timeout(&self) -> Option<Instant> {
        let session = self.control_session().poll_timeout();
        match (session, self.deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Bytes to write to the registry; false if none.
    fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool {
        self.control_session_mut().poll_transmit(buf)
    }
}

/// Hands every event of the client's control session to the client, in order.
fn drain<C: sealed::Composed + ?Sized>(client: &mut C) {
    while let Some(event) = client.control_session_mut().poll_event() {
        client.on_control_event(event);
    }
}
