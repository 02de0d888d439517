//! The two registry clients: [`ServiceClient`] (register roles, keep them
//! registered) and [`ProxyClient`] (watch a query, choose instances), on top
//! of a shared control link with keepalive.
//!
//! Driving either (sans-io): when the driver has a fresh TCP stream to the
//! registry it calls `connect(now, entropy)`; bytes read go to `handle_input`,
//! a closed stream to `handle_disconnect`, the timer at `poll_timeout` to
//! `handle_timeout`; after each call it drains `poll_transmit` and then
//! `poll_event`. A `Disconnected` event means: close the stream, wait
//! [`Backoff::next_delay`], dial again and call `connect`. What the client
//! wants (its roles, its query) survives reconnects: it registers and watches
//! again by itself each time a session opens.
//!
//! Liveness: a ping goes out every `keepalive`; a registry silent for
//! `dead_after` is dead. Both bounds come from [`ClientConfig`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::keys::{Keypair, PublicKey};
use crate::message::{ErrorCode, Instance, Message, MessageError};
use crate::noise::Intent;
use crate::role::{Role, RoleQuery};
use crate::session::{Session, SessionError};

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
}

impl ClientConfig {
    /// Defaults: 10 s handshake, ping every 5 s, dead after 15 s of silence.
    pub fn new(keypair: Keypair, registry: PublicKey) -> ClientConfig {
        ClientConfig {
            keypair,
            registry,
            handshake_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(5),
            dead_after: Duration::from_secs(15),
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
    /// The registry sent a message a client does not expect.
    #[error("unexpected message from the registry: {0}")]
    Unexpected(String),
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

/// The machinery both clients share, kept out of the public API: the control
/// link (handshake, keepalive, message framing) and the hooks through which
/// [`ControlClient`]'s provided methods reach each client.
mod sealed {
    use super::*;

    /// One open control session and its keepalive state.
    pub struct Link {
        session: Session,
        last_heard: Instant,
        next_ping: Instant,
        nonce: u64,
    }

    /// A client's link to the registry: its configuration, and the session
    /// while there is one (`None` between a disconnect and the next `connect`).
    pub struct Control {
        pub config: ClientConfig,
        pub link: Option<Link>,
    }

    impl Control {
        pub fn connect(&mut self, now: Instant, entropy: [u8; 32]) -> Result<(), ClientError> {
            let c = &self.config;
            let session = Session::initiate(
                now,
                &c.keypair,
                &c.registry,
                Intent::Control,
                entropy,
                c.handshake_timeout,
            )?;
            self.link = Some(Link { session, last_heard: now, next_ping: now + c.keepalive, nonce: 0 });
            Ok(())
        }

        pub fn is_established(&self) -> bool {
            self.link.as_ref().is_some_and(|l| l.session.is_established())
        }

        /// Feeds bytes; appends decoded messages to `inbox`. Returns whether the
        /// session became established with this input.
        pub fn handle_input(
            &mut self,
            now: Instant,
            data: &[u8],
            inbox: &mut Vec<Message>,
        ) -> Result<bool, ClientError> {
            let Some(link) = &mut self.link else { return Ok(false) };
            let was = link.session.is_established();
            link.session.handle_input(data)?;
            link.last_heard = now;
            while let Some(plain) = link.session.recv() {
                let msg = match Message::decode(&plain) {
                    Ok(msg) => msg,
                    // A newer registry's message: nothing a client of this build needs.
                    Err(MessageError::UnknownKind { .. }) => continue,
                    Err(e) => return Err(e.into()),
                };
                match msg {
                    Message::Ping { nonce } => send(link, &Message::Pong { nonce }),
                    Message::Pong { .. } => {}
                    Message::Error { id: None, code, text } => {
                        return Err(ClientError::Refused { code, text });
                    }
                    msg => inbox.push(msg),
                }
            }
            Ok(!was && link.session.is_established())
        }

        pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ClientError> {
            let Some(link) = &mut self.link else { return Ok(()) };
            link.session.handle_timeout(now)?;
            if !link.session.is_established() {
                return Ok(());
            }
            if now.saturating_duration_since(link.last_heard) >= self.config.dead_after {
                return Err(ClientError::Silent(self.config.dead_after));
            }
            if now >= link.next_ping {
                link.nonce += 1;
                let nonce = link.nonce;
                send(link, &Message::Ping { nonce });
                link.next_ping = now + self.config.keepalive;
            }
            Ok(())
        }

        pub fn poll_timeout(&self) -> Option<Instant> {
            let link = self.link.as_ref()?;
            match link.session.poll_timeout() {
                Some(deadline) => Some(deadline),
                None => Some(link.next_ping.min(link.last_heard + self.config.dead_after)),
            }
        }

        pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool {
            self.link.as_mut().is_some_and(|l| l.session.poll_transmit(buf))
        }

        pub fn send(&mut self, msg: &Message) {
            if let Some(link) = &mut self.link {
                send(link, msg);
            }
        }
    }

    fn send(link: &mut Link, msg: &Message) {
        let mut plain = Vec::new();
        // Client messages are small and within limits by construction.
        if msg.encode(&mut plain).is_ok() {
            let _ = link.session.send(&plain);
        }
    }

    /// What each client supplies; everything else comes from [`ControlClient`].
    pub trait Controlled {
        /// The client's control link.
        fn control(&self) -> &Control;
        /// The client's control link, mutably.
        fn control_mut(&mut self) -> &mut Control;
        /// The session just opened: (re)send what the client wants.
        fn on_open(&mut self);
        /// A message the link did not handle itself.
        fn on_message(&mut self, msg: Message);
        /// The session ended: forget it and report why.
        fn on_disconnect(&mut self, reason: ClientError);
    }
}

use sealed::{Control, Controlled};

/// What a driver needs of either client to keep its control session going.
/// The methods shared by both clients are provided here, once.
pub trait ControlClient: Controlled {
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
        self.control_mut().connect(now, entropy)
    }

    /// Whether the control session is established.
    fn is_connected(&self) -> bool {
        self.control().is_established()
    }

    /// Bytes read from the registry.
    fn handle_input(&mut self, now: Instant, data: &[u8]) {
        let mut inbox = Vec::new();
        match self.control_mut().handle_input(now, data, &mut inbox) {
            Ok(opened) => {
                if opened {
                    self.on_open();
                }
                for msg in inbox {
                    self.on_message(msg);
                }
            }
            Err(e) => self.on_disconnect(e),
        }
    }

    /// The stream to the registry closed.
    fn handle_disconnect(&mut self) {
        if self.control().link.is_some() {
            self.on_disconnect(ClientError::Closed);
        }
    }

    /// Timers: handshake deadline, keepalive, dead registry.
    fn handle_timeout(&mut self, now: Instant) {
        if let Err(e) = self.control_mut().handle_timeout(now) {
            self.on_disconnect(e);
        }
    }

    /// When `handle_timeout` must next be called.
    fn poll_timeout(&self) -> Option<Instant> {
        self.control().poll_timeout()
    }

    /// Bytes to write to the registry; false if none.
    fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool {
        self.control_mut().poll_transmit(buf)
    }
}

/// Capped exponential backoff with jitter, for reconnecting.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays start near `base` and double up to `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max, attempt: 0 }
    }

    /// The delay before the next attempt: between half and all of the current
    /// step, placed by `random`, so that many clients do not retry in step.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let step = self.base.saturating_mul(1 << self.attempt.min(16)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_nanos(random % spread)
    }

    /// After a success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// What a service client reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServiceEvent {
    /// The control session is open (registrations follow).
    Connected,
    /// The registry confirmed this role.
    Registered(Role),
    /// The registry refused this role.
    Refused {
        /// The role.
        role: Role,
        /// Why.
        code: ErrorCode,
        /// Why, for people.
        text: String,
    },
    /// The session ended; reconnect after a backoff.
    Disconnected(ClientError),
}

/// The service side: keeps its roles registered while it is available.
pub struct ServiceClient {
    control: Control,
    roles: Vec<Role>,
    port: u16,
    addrs: Vec<SocketAddr>,
    available: bool,
    events: VecDeque<ServiceEvent>,
}

impl ServiceClient {
    /// A service offering `roles` on tunnel `port` (and at `addrs`).
    pub fn new(config: ClientConfig, roles: Vec<Role>, port: u16, addrs: Vec<SocketAddr>) -> ServiceClient {
        ServiceClient {
            control: Control { config, link: None },
            roles,
            port,
            addrs,
            available: true,
            events: VecDeque::new(),
        }
    }

    fn handle_service_message(&mut self, msg: Message) {
        let role_of = |id: u32| usize::try_from(id).ok().and_then(|i| self.roles.get(i)).cloned();
        match msg {
            Message::Registered { id } => {
                if let Some(role) = role_of(id) {
                    self.events.push_back(ServiceEvent::Registered(role));
                }
            }
            Message::Error { id: Some(id), code, text } => {
                if let Some(role) = role_of(id) {
                    self.events.push_back(ServiceEvent::Refused { role, code, text });
                }
            }
            other => self.on_disconnect(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The backend went down (`false`: withdraw every role) or came back
    /// (`true`: register again). Also the first step of a clean shutdown.
    pub fn set_available(&mut self, available: bool) {
        if available == self.available {
            return;
        }
        self.available = available;
        if !self.control.is_established() {
            return;
        }
        if available {
            self.register_all();
        } else {
            for id in 0..self.roles.len() {
                self.control.send(&Message::Unregister { id: id as u32 });
            }
        }
    }

    fn register_all(&mut self) {
        for (id, role) in self.roles.iter().enumerate() {
            let msg = Message::Register {
                id: id as u32,
                role: role.clone(),
                port: self.port,
                addrs: self.addrs.clone(),
            };
            self.control.send(&msg);
        }
    }
}

impl Controlled for ServiceClient {
    fn control(&self) -> &Control {
        &self.control
    }
    fn control_mut(&mut self) -> &mut Control {
        &mut self.control
    }
    fn on_open(&mut self) {
        self.events.push_back(ServiceEvent::Connected);
        if self.available {
            self.register_all();
        }
    }
    fn on_message(&mut self, msg: Message) {
        self.handle_service_message(msg);
    }
    fn on_disconnect(&mut self, reason: ClientError) {
        self.control.link = None;
        self.events.push_back(ServiceEvent::Disconnected(reason));
    }
}

impl ControlClient for ServiceClient {
    type Event = ServiceEvent;
    fn poll_event(&mut self) -> Option<ServiceEvent> {
        self.events.pop_front()
    }
    fn is_connected_event(event: &ServiceEvent) -> bool {
        matches!(event, ServiceEvent::Connected)
    }
    fn disconnect_reason(event: &ServiceEvent) -> Option<&ClientError> {
        match event {
            ServiceEvent::Disconnected(reason) => Some(reason),
            _ => None,
        }
    }
}

/// How a proxy picks among matching instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Always the oldest registration that is not banned.
    First,
    /// Each connection the next one.
    RoundRobin,
    /// A random one per connection.
    Random,
    /// A stable choice per proxy (rendezvous hash of proxy and instance keys),
    /// so one proxy sticks to one instance while it is there.
    Hash,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Strategy, String> {
        match s {
            "first" => Ok(Strategy::First),
            "round-robin" => Ok(Strategy::RoundRobin),
            "random" => Ok(Strategy::Random),
            "hash" => Ok(Strategy::Hash),
            _ => Err(format!("unknown strategy {s:?}: use first, round-robin, random or hash")),
        }
    }
}

/// What a proxy client reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyEvent {
    /// The control session is open (the watch follows).
    Connected,
    /// The set of matching instances, whenever the registry reports it.
    Instances {
        /// The new set, oldest registration first.
        instances: Vec<Instance>,
        /// More matched than the registry sent.
        truncated: bool,
    },
    /// The answer to a [`ProxyClient::lookup`].
    LookupResult {
        /// The lookup's id.
        id: u32,
        /// What matched.
        instances: Vec<Instance>,
        /// More matched than the registry sent.
        truncated: bool,
    },
    /// The registry refused a request.
    Refused {
        /// The request's id.
        id: u32,
        /// Why.
        code: ErrorCode,
        /// Why, for people.
        text: String,
    },
    /// The session ended; reconnect after a backoff. Known instances stay.
    Disconnected(ClientError),
}

/// The watch id a proxy uses for its own query; lookups count from 1.
const WATCH_ID: u32 = 0;

/// The proxy side: watches one query and chooses instances for connections.
pub struct ProxyClient {
    control: Control,
    query: RoleQuery,
    strategy: Strategy,
    ban: Duration,
    instances: Vec<Instance>,
    banned: HashMap<PublicKey, Instant>,
    turn: usize,
    next_lookup: u32,
    events: VecDeque<ProxyEvent>,
}

impl ProxyClient {
    /// A proxy for `query`; a failed instance is avoided for `ban`.
    pub fn new(config: ClientConfig, query: RoleQuery, strategy: Strategy, ban: Duration) -> ProxyClient {
        ProxyClient {
            control: Control { config, link: None },
            query,
            strategy,
            ban,
            instances: Vec::new(),
            banned: HashMap::new(),
            turn: 0,
            next_lookup: WATCH_ID + 1,
            events: VecDeque::new(),
        }
    }

    fn handle_proxy_message(&mut self, msg: Message) {
        match msg {
            Message::Instances { id: WATCH_ID, instances, truncated } => {
                // Only what we asked for: a confused registry cannot steer us elsewhere.
                let instances: Vec<Instance> =
                    instances.into_iter().filter(|i| self.query.matches(&i.role)).collect();
                self.instances.clone_from(&instances);
                self.events.push_back(ProxyEvent::Instances { instances, truncated });
            }
            Message::Instances { id, instances, truncated } => {
                self.events.push_back(ProxyEvent::LookupResult { id, instances, truncated });
            }
            Message::Error { id: Some(id), code, text } => {
                self.events.push_back(ProxyEvent::Refused { id, code, text });
            }
            other => self.on_disconnect(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Asks the registry once for `query`; the answer comes as
    /// [`ProxyEvent::LookupResult`] with the returned id. `None` when not connected.
    pub fn lookup(&mut self, query: RoleQuery) -> Option<u32> {
        if !self.control.is_established() {
            return None;
        }
        let id = self.next_lookup;
        self.next_lookup = self.next_lookup.checked_add(1).unwrap_or(WATCH_ID + 1);
        self.control.send(&Message::Lookup { id, query });
        Some(id)
    }

    /// The instances last reported (kept across registry reconnects).
    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }

    /// The order in which to try instances for one new connection: the
    /// strategy's choice first, then the others, instances banned for a
    /// recent failure last. `random` is used by [`Strategy::Random`].
    pub fn choose(&mut self, now: Instant, random: u64) -> Vec<Instance> {
        self.banned.retain(|_, until| *until > now);
        let (mut order, banned): (Vec<Instance>, Vec<Instance>) =
            self.instances.iter().cloned().partition(|i| !self.banned.contains_key(&i.key));
        let n = order.len();
        if n > 1 {
            match self.strategy {
                Strategy::First => {}
                Strategy::RoundRobin => {
                    order.rotate_left(self.turn % n);
                    self.turn = self.turn.wrapping_add(1);
                }
                Strategy::Random => order.rotate_left((random % n as u64) as usize),
                Strategy::Hash => {
                    let me = self.control.config.keypair.public();
                    order.sort_by_key(|i| std::cmp::Reverse(rendezvous(&me, &i.key)));
                }
            }
        }
        order.extend(banned);
        order
    }

    /// Dialing or handshaking with `key` failed: avoid it for a while.
    pub fn report_failure(&mut self, now: Instant, key: PublicKey) {
        self.banned.insert(key, now + self.ban);
    }
}

impl Controlled for ProxyClient {
    fn control(&self) -> &Control {
        &self.control
    }
    fn control_mut(&mut self) -> &mut Control {
        &mut self.control
    }
    fn on_open(&mut self) {
        self.events.push_back(ProxyEvent::Connected);
        self.control.send(&Message::Watch { id: WATCH_ID, query: self.query.clone() });
    }
    fn on_message(&mut self, msg: Message) {
        self.handle_proxy_message(msg);
    }
    fn on_disconnect(&mut self, reason: ClientError) {
        self.control.link = None;
        self.events.push_back(ProxyEvent::Disconnected(reason));
    }
}

impl ControlClient for ProxyClient {
    type Event = ProxyEvent;
    fn poll_event(&mut self) -> Option<ProxyEvent> {
        self.events.pop_front()
    }
    fn is_connected_event(event: &ProxyEvent) -> bool {
        matches!(event, ProxyEvent::Connected)
    }
    fn disconnect_reason(event: &ProxyEvent) -> Option<&ClientError> {
        match event {
            ProxyEvent::Disconnected(reason) => Some(reason),
            _ => None,
        }
    }
}

/// FNV-1a over both keys: a stable, well-spread score for rendezvous hashing.
fn rendezvous(a: &PublicKey, b: &PublicKey) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in a.as_bytes().iter().chain(b.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d1 = b.next_delay(0);
        assert_eq!(d1, Duration::from_millis(50));
        let d2 = b.next_delay(u64::MAX);
        assert!(d2 >= Duration::from_millis(100) && d2 < Duration::from_millis(200), "{d2:?}");
        for _ in 0..20 {
            assert!(b.next_delay(12345) <= Duration::from_secs(2));
        }
        b.reset();
        assert!(b.next_delay(7) < Duration::from_millis(100));
    }

    #[test]
    fn a_newer_registrys_unknown_message_is_ignored() {
        use crate::keys::Seed;
        let now = Instant::now();
        let registry_keys = Keypair::from_seed(&Seed::from_bytes([1; 32]));
        let config =
            ClientConfig::new(Keypair::from_seed(&Seed::from_bytes([2; 32])), registry_keys.public());
        let role = Role::parse("db@1.0.0").unwrap();
        let mut service = ServiceClient::new(config, vec![role.clone()], 1, vec![]);
        service.connect(now, [3; 32]).unwrap();
        let mut registry =
            Session::respond(now, &registry_keys, Intent::Control, [4; 32], Duration::from_secs(5)).unwrap();
        let mut wire = Vec::new();
        service.poll_transmit(&mut wire);
        registry.handle_input(&wire).unwrap();
        // A push of a kind this client does not know, then the usual confirmation.
        registry.send(&postcard::to_allocvec(&(77u32, 0u32, "news")).unwrap()).unwrap();
        let mut plain = Vec::new();
        Message::Registered { id: 0 }.encode(&mut plain).unwrap();
        registry.send(&plain).unwrap();
        wire.clear();
        registry.poll_transmit(&mut wire);
        service.handle_input(now, &wire);
        let events: Vec<ServiceEvent> = std::iter::from_fn(|| service.poll_event()).collect();
        assert_eq!(events, vec![ServiceEvent::Connected, ServiceEvent::Registered(role)]);
        assert!(service.is_connected());
    }

    #[test]
    fn strategies_parse() {
        assert_eq!("round-robin".parse::<Strategy>(), Ok(Strategy::RoundRobin));
        assert!("fastest".parse::<Strategy>().unwrap_err().contains("round-robin"));
    }
}
