//! The proxy side: watches one query, keeps the instances last reported
//! (across registry reconnects) and orders them for each new connection.
//!
//! Invariant: the instance set only ever holds instances that match the
//! proxy's own query, whatever the registry sends.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::client::balance::{Balancer, Strategy};
use crate::client::control::{ControlEvent, ControlLink};
use crate::client::{ClientConfig, ClientError};
use crate::keys::PublicKey;
use crate::message::{ErrorCode, Instance, Message};
use crate::role::RoleQuery;

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

/// The proxy side; see the module docs.
pub struct ProxyClient {
    control_link: ControlLink,
    query: RoleQuery,
    balancer: Balancer,
    instances: Vec<Instance>,
    next_lookup: u32,
    events: VecDeque<ProxyEvent>,
}

impl ProxyClient {
    /// A proxy for `query`; a failed instance is avoided for `ban`.
    pub fn new(config: ClientConfig, query: RoleQuery, strategy: Strategy, ban: Duration) -> ProxyClient {
        let balancer = Balancer::new(strategy, config.keypair.public(), ban);
        ProxyClient {
            control_link: ControlLink::new(config),
            query,
            balancer,
            instances: Vec::new(),
            next_lookup: WATCH_ID + 1,
            events: VecDeque::new(),
        }
    }

    /// Asks the registry once for `query`; the answer comes as
    /// [`ProxyEvent::LookupResult`] with the returned id. `None` when not connected.
    pub fn lookup(&mut self, query: RoleQuery) -> Option<u32> {
        if !self.control_link.is_established() {
            return None;
        }
        let id = self.next_lookup;
        self.next_lookup = self.next_lookup.checked_add(1).unwrap_or(WATCH_ID + 1);
        self.control_link.send(&Message::Lookup { id, query });
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
        self.balancer.order(now, random, &self.instances)
    }

    /// Dialing or handshaking with `key` failed: avoid it for a while.
    pub fn report_failure(&mut self, now: Instant, key: PublicKey) {
        self.balancer.report_failure(now, key);
    }

    fn handle_message(&mut self, msg: Message) {
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
            other => self.control_link.fail(ClientError::Unexpected(other.kind())),
        }
    }

    /// Interprets one event of the control link.
    fn apply_control_event(&mut self, event: ControlEvent) {
        match event {
            ControlEvent::Opened => {
                self.events.push_back(ProxyEvent::Connected);
                self.control_link.send(&Message::Watch { id: WATCH_ID, query: self.query.clone() });
            }
            ControlEvent::Message(msg) => self.handle_message(msg),
            ControlEvent::Closed(reason) => self.events.push_back(ProxyEvent::Disconnected(reason)),
        }
    }
}

registry_client!(ProxyClient, ProxyEvent);
