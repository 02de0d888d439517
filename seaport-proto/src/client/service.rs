//! The service side: keeps its roles registered while its backend is
//! available, re-registering by itself each time a control session opens.
//!
//! Invariant: registration ids are indexes into the role list, so every
//! answer from the registry maps back to the role it concerns.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use crate::client::control::{ControlEvent, ControlSession};
use crate::client::{ClientConfig, ClientError};
use crate::keys::PublicKey;
use crate::meet::Ticket;
use crate::message::{ErrorCode, MAX_ADDRS, Message};
use crate::role::Role;

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
    /// A proxy wants to meet (it could not dial us): connect to the
    /// registry with `ticket` ([`crate::meet`]).
    MeetOffer {
        /// What admits the meet connection.
        ticket: Ticket,
        /// Who asked.
        proxy: PublicKey,
    },
    /// The session ended; reconnect after a backoff.
    Disconnected(ClientError),
}

/// The service side; see the module docs.
pub struct ServiceClient {
    control_session: ControlSession,
    roles: Vec<Role>,
    port: u16,
    addrs: Vec<SocketAddr>,
    /// Whether the link port listens on every interface, so that the
    /// address toward the registry is one of ours too.
    every_interface: bool,
    /// That address, with the link port, once known.
    route_addr: Option<SocketAddr>,
    available: bool,
    events: VecDeque<ServiceEvent>,
}

impl ServiceClient {
    /// A service offering `roles` on link `port` (and at `addrs`).
    pub fn new(config: ClientConfig, roles: Vec<Role>, port: u16, addrs: Vec<SocketAddr>) -> ServiceClient {
        ServiceClient {
            control_session: ControlSession::new(config),
            roles,
            port,
            addrs,
            every_interface: false,
            route_addr: None,
            available: true,
            events: VecDeque::new(),
        }
    }

    /// The link port listens on every interface (0.0.0.0 or ::): report,
    /// besides `addrs`, the address this host reaches the registry from
    /// (a LAN address behind a NAT), with the link port.
    pub fn listening_on_every_interface(mut self) -> ServiceClient {
        self.every_interface = true;
        self
    }

    /// What this service reports besides the address the registry observes.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let mut addrs = self.addrs.clone();
        if let Some(route) = self.route_addr.filter(|a| !addrs.contains(a)) {
            addrs.insert(0, route);
        }
        addrs.truncate(MAX_ADDRS);
        addrs
    }

    /// The backend went down (`false`: withdraw every role, the one sense of
    /// "withdraw" in seaport) or came back
    /// (`true`: register again). Also the first step of a clean shutdown.
    pub fn set_available(&mut self, available: bool) {
        if available == self.available {
            return;
        }
        self.available = available;
        if !self.control_session.is_established() {
            return;
        }
        if available {
            self.register_all();
        } else {
            for id in 0..self.roles.len() {
                self.control_session.send(&Message::Unregister { id: id as u32 });
            }
        }
    }

    fn register_all(&mut self) {
        for (id, role) in self.roles.iter().enumerate() {
            let msg =
                Message::Register { id: id as u32, role: role.clone(), port: self.port, addrs: self.addrs() };
            self.control_session.send(&msg);
        }
    }

    fn handle_message(&mut self, msg: Message) {
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
            Message::MeetOffer { ticket, proxy } => {
                self.events.push_back(ServiceEvent::MeetOffer { ticket, proxy });
            }
            other => self.control_session.fail(ClientError::Unexpected(other.kind())),
        }
    }

    fn on_local_addr(&mut self, local: SocketAddr) {
        // Loopback is what the registry observes anyway when it is on this
        // host; any other address is news only for a wildcard listener.
        self.route_addr = self.every_interface.then(|| SocketAddr::new(local.ip(), self.port));
    }

    /// A service has no timer of its own.
    fn deadline(&self) -> Option<Instant> {
        None
    }

    fn on_deadline(&mut self, _now: Instant) {}

    /// Interprets one event of the control session.
    fn on_control_event(&mut self, event: ControlEvent) {
        match event {
            ControlEvent::Opened { .. } => {
                self.events.push_back(ServiceEvent::Connected);
                if self.available {
                    self.register_all();
                }
            }
            ControlEvent::Message(msg) => self.handle_message(msg),
            ControlEvent::Closed(reason) => self.events.push_back(ServiceEvent::Disconnected(reason)),
        }
    }
}

registry_client!(ServiceClient, ServiceEvent);

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::client::RegistryClient;
    use crate::hello::Intent;
    use crate::session::Session;
    use crate::testing::keypair;

    /// A service client whose session to a hand-driven registry session is open.
    fn open_service() -> (ServiceClient, Session, Role, Instant) {
        let now = Instant::now();
        let registry_keys = keypair(1);
        let config = ClientConfig::new(keypair(2), registry_keys.public());
        let role = Role::parse("db@1.0.0").unwrap();
        let mut service = ServiceClient::new(config, vec![role.clone()], 1, vec![]);
        service.connect(now, [3; 32]).unwrap();
        let mut registry =
            Session::respond(now, &registry_keys, Intent::Control, [4; 32], Duration::from_secs(5)).unwrap();
        let mut wire = Vec::new();
        service.poll_transmit(&mut wire);
        registry.handle_input(now, &wire).unwrap();
        (service, registry, role, now)
    }

    /// Delivers `plains` from the registry to the service in one read; returns its events.
    fn deliver(
        service: &mut ServiceClient,
        registry: &mut Session,
        now: Instant,
        plains: &[Vec<u8>],
    ) -> Vec<ServiceEvent> {
        for plain in plains {
            registry.send(plain).unwrap();
        }
        let mut wire = Vec::new();
        registry.poll_transmit(&mut wire);
        service.handle_input(now, &wire);
        std::iter::from_fn(|| service.poll_event()).collect()
    }

    fn encoded(msg: &Message) -> Vec<u8> {
        let mut plain = Vec::new();
        msg.encode(&mut plain).unwrap();
        plain
    }

    #[test]
    fn a_newer_registrys_unknown_message_is_ignored() {
        let (mut service, mut registry, role, now) = open_service();
        // A push of a kind this client does not know, then the usual confirmation.
        let newer = postcard::to_allocvec(&(77u32, 0u32, "news")).unwrap();
        let events =
            deliver(&mut service, &mut registry, now, &[newer, encoded(&Message::Registered { id: 0 })]);
        assert_eq!(events, vec![ServiceEvent::Connected, ServiceEvent::Registered(role)]);
        assert!(service.is_connected());
    }

    #[test]
    fn two_unexpected_messages_in_one_read_end_the_session_once() {
        let (mut service, mut registry, _, now) = open_service();
        let push = encoded(&Message::Instances { id: 0, instances: vec![], truncated: false });
        let events = deliver(&mut service, &mut registry, now, &[push.clone(), push]);
        assert_eq!(
            events,
            vec![ServiceEvent::Connected, ServiceEvent::Disconnected(ClientError::Unexpected("Instances"))]
        );
        // Nor does the stream closing afterwards report a second end.
        service.handle_closed();
        assert_eq!(service.poll_event(), None);
    }

    #[test]
    fn a_session_error_keeps_what_came_before_it_in_the_same_read() {
        let (mut service, mut registry, role, now) = open_service();
        let refusal = Message::Error { id: None, code: ErrorCode::SUPERSEDED, text: "newer session".into() };
        let plains = [encoded(&Message::Registered { id: 0 }), encoded(&refusal)];
        let events = deliver(&mut service, &mut registry, now, &plains);
        let refused = ClientError::Refused { code: ErrorCode::SUPERSEDED, text: "newer session".into() };
        assert_eq!(
            events,
            vec![
                ServiceEvent::Connected,
                ServiceEvent::Registered(role),
                ServiceEvent::Disconnected(refused)
            ]
        );
    }

    fn client(addrs: Vec<SocketAddr>) -> ServiceClient {
        let config = ClientConfig::new(keypair(1), keypair(2).public());
        ServiceClient::new(config, vec![Role::parse("db@1.0.0").unwrap()], 7000, addrs)
    }

    #[test]
    fn a_wildcard_listener_reports_its_address_toward_the_registry() {
        let lan: SocketAddr = "192.168.1.2:40000".parse().unwrap();
        let given: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let mut wildcard = client(vec![given]).listening_on_every_interface();
        wildcard.handle_local_addr(lan);
        assert_eq!(wildcard.addrs(), vec!["192.168.1.2:7000".parse().unwrap(), given]);
        // Reconnecting from elsewhere replaces it; a given address is never doubled.
        wildcard.handle_local_addr("10.0.0.1:1".parse().unwrap());
        assert_eq!(wildcard.addrs(), vec![given]);
        // A listener on one address reports only what it was given.
        let mut fixed = client(vec![given]);
        fixed.handle_local_addr(lan);
        assert_eq!(fixed.addrs(), vec![given]);
    }
}
