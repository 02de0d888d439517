//! Requests: what the registry does with each control message of an
//! established session (register, unregister, look up, watch, meet, ping),
//! under the access list and the per-session limits.
//!
//! Access: with an [`Acl`] ([`Registry::set_acl`]), a key may register,
//! look up and watch only the role names a grant gives it; anything else is
//! refused with [`ErrorCode::FORBIDDEN`] and the session goes on. Setting a
//! new list revokes the registrations and ends the watches it no longer
//! grants, at once. Without one, any key may do anything.
//!
//! Invariants: a refusal answers the request it refuses (by its id) and
//! changes nothing else; every change to the registered set marks the
//! watches it matches as due.

use std::net::SocketAddr;
use std::time::Instant;

use super::{CloseReason, Party, Registry, RegistryEvent, SessionId};
use crate::acl::{Acl, Action};
use crate::hello::Capabilities;
use crate::keys::PublicKey;
use crate::message::{ErrorCode, Instance, MAX_ADDRS, MAX_ERROR_TEXT, Message};
use crate::role::Role;

/// The established session a request came from.
#[derive(Clone, Copy)]
struct Asker {
    id: SessionId,
    key: PublicKey,
    /// Where its connection comes from.
    observed: SocketAddr,
}

impl Registry {
    /// The access control list in force; `None`: anyone may do anything.
    pub fn acl(&self) -> Option<&Acl> {
        self.acl.as_ref()
    }

    /// Puts `acl` in force (`None`: anyone may do anything). What it no
    /// longer grants ends at once: such a registration is revoked (its
    /// watchers hear of it) and its service gets an [`ErrorCode::FORBIDDEN`]
    /// error naming it; such a watch is dropped with the same error.
    pub fn set_acl(&mut self, acl: Option<Acl>) {
        self.acl = acl;
        let mut sessions: Vec<(SessionId, PublicKey)> =
            self.peers.iter().filter_map(|(id, p)| Some((*id, p.session.remote()?))).collect();
        sessions.sort_unstable();
        for (id, key) in sessions {
            let regs: Vec<(u32, String)> = self
                .directory
                .registrations_of(id)
                .into_iter()
                .filter(|(_, i)| !self.allows(&key, Action::Register, i.role.name()))
                .map(|(reg, i)| (reg, i.role.to_string()))
                .collect();
            for (reg, role) in regs {
                self.unregister(id, reg);
                self.forbid(id, key, reg, &format!("registration of {role} revoked: {}", Action::Register));
            }
            let watches: Vec<(u32, String)> = self
                .directory
                .watches_of(id)
                .into_iter()
                .filter(|(_, q)| !self.allows(&key, Action::Lookup, q.name()))
                .map(|(watch, q)| (watch, q.name().to_owned()))
                .collect();
            for (watch, name) in watches {
                self.directory.unwatch((id, watch));
                if let Some(peer) = self.peers.get_mut(&id) {
                    peer.queue.due.remove(&watch);
                }
                self.forbid(id, key, watch, &format!("watch of {name} ended: {}", Action::Lookup));
            }
        }
    }

    pub(super) fn allows(&self, key: &PublicKey, action: Action, name: &str) -> bool {
        self.acl.as_ref().is_none_or(|acl| acl.allows(key, action, name))
    }

    /// Refuses request `req` of `key` (session `id`) with FORBIDDEN. `what`
    /// says what was refused; the text adds that the key is not granted it.
    fn forbid(&mut self, id: SessionId, key: PublicKey, req: u32, what: &str) {
        let text = format!("{what}: key {key} is not granted this by the registry's access list");
        self.send(id, &error(Some(req), ErrorCode::FORBIDDEN, &text));
        self.events.push_back(RegistryEvent::Forbidden { peer: key, text });
    }

    pub(super) fn handle_message(&mut self, now: Instant, id: SessionId, msg: Message) {
        let Some(peer) = self.peers.get(&id) else { return };
        let Some(key) = peer.session.remote() else { return };
        let asker = Asker { id, key, observed: peer.observed };
        match msg {
            Message::Register { id: reg, role, port, addrs } => self.register(asker, reg, role, port, addrs),
            Message::Unregister { id: reg } => {
                if !self.unregister(id, reg) {
                    self.send(id, &error(Some(reg), ErrorCode::UNKNOWN, "no such registration"));
                }
            }
            Message::Lookup { id: req, query } => {
                if !self.allows(&key, Action::Lookup, query.name()) {
                    self.forbid(id, key, req, &format!("{} {query} refused", Action::Lookup));
                    return;
                }
                let answer = self.directory.answer(req, &query, peer.takes_parts());
                if self.send_answer(id, req, &answer) {
                    self.lookups_answered += 1;
                }
            }
            Message::Watch { id: watch, query } => {
                if !self.allows(&key, Action::Lookup, query.name()) {
                    self.forbid(id, key, watch, &format!("watch of {query} refused"));
                    return;
                }
                let replacing = self.directory.has_watch((id, watch));
                if !replacing && self.directory.watch_count(id) >= self.config.max_watches {
                    let text = format!("at most {} watches per session", self.config.max_watches);
                    self.send(id, &error(Some(watch), ErrorCode::LIMIT, &text));
                    return;
                }
                self.directory.watch((id, watch), query);
                self.make_due(id, watch);
                self.lookups_answered += 1;
            }
            Message::Unwatch { id: watch } => {
                if !self.directory.unwatch((id, watch)) {
                    self.send(id, &error(Some(watch), ErrorCode::UNKNOWN, "no such watch"));
                }
            }
            Message::Meet { id: req, service, role } => self.meet(now, asker, req, service, &role),
            Message::Ping { nonce } => self.send(id, &Message::Pong { nonce }),
            Message::Pong { .. } => {}
            // A peer's complaint is worth a log line, not a reply.
            Message::Error { code, text, .. } => self.close(id, CloseReason::PeerError { code, text }),
            other @ (Message::Registered { .. }
            | Message::Instances { .. }
            | Message::InstancesPart { .. }
            | Message::MeetReady { .. }
            | Message::MeetOffer { .. }) => {
                let text = format!("a registry does not accept {}", other.kind());
                self.send(id, &error(None, ErrorCode::MALFORMED, &text));
                self.close(id, CloseReason::WrongDirection(other.kind()));
            }
        }
    }

    /// Registration `reg` of `role` on `port`, with the addresses the
    /// service reported: the access list first (a key that may not register
    /// learns nothing of the limits), then the limits.
    fn register(&mut self, asker: Asker, reg: u32, role: Role, port: u16, addrs: Vec<SocketAddr>) {
        let Asker { id, key, observed } = asker;
        if !self.allows(&key, Action::Register, role.name()) {
            self.forbid(id, key, reg, &format!("{} {role} refused", Action::Register));
            return;
        }
        let replacing = self.directory.has_registration((id, reg));
        if !replacing && self.directory.registration_count(id) >= self.config.max_registrations {
            let text = format!("at most {} registrations per session", self.config.max_registrations);
            self.send(id, &error(Some(reg), ErrorCode::LIMIT, &text));
            return;
        }
        if !replacing && self.directory.instance_count() >= self.config.max_total_registrations {
            let text = format!(
                "the registry holds its maximum of {} registrations",
                self.config.max_total_registrations
            );
            self.send(id, &error(Some(reg), ErrorCode::LIMIT, &text));
            return;
        }
        let mut dialable = vec![SocketAddr::new(observed.ip(), port)];
        for addr in addrs {
            if plausible(addr, observed) && !dialable.contains(&addr) && dialable.len() <= MAX_ADDRS {
                dialable.push(addr);
            }
        }
        // The old registration goes first, so its watchers hear of both changes.
        self.unregister(id, reg);
        self.directory.register((id, reg), Instance { key, role: role.clone(), addrs: dialable });
        self.send(id, &Message::Registered { id: reg });
        self.events.push_back(RegistryEvent::Registered { peer: key, role: role.clone() });
        self.notify(&role);
    }

    /// The proxy `asker` asks, as request `req`, to meet the process of
    /// `service` that registered `role`: only one registered now, whose
    /// build can meet, within the asker's budget ([`super::Meetings::open`]).
    fn meet(&mut self, now: Instant, asker: Asker, req: u32, service: PublicKey, role: &Role) {
        let Asker { id, key, .. } = asker;
        // A key meeting itself would get a splice between two sockets it
        // holds: a free relay for any bytes, not a path to a service.
        if service == key {
            let text =
                format!("{key} asked to meet itself: a meeting joins a proxy to another key's service");
            self.send(id, &error(Some(req), ErrorCode::UNSUPPORTED, &text));
            return;
        }
        // With an access list, only for a role the proxy may look up; to a
        // proxy that may not, the service is unknown, as if not registered,
        // so the answer tells nothing it may not know.
        let owner = self.directory.owner_of(&service, role);
        let Some(target) = owner.filter(|_| self.allows(&key, Action::Lookup, role.name())) else {
            let text = format!("no service {service} has registered {role}");
            self.send(id, &error(Some(req), ErrorCode::UNKNOWN, &text));
            return;
        };
        let can_meet = self
            .peers
            .get(&target)
            .is_some_and(|p| p.session.remote_capabilities().contains(Capabilities::MEET));
        if !can_meet {
            let text = format!("service {service} runs a build that cannot meet");
            self.send(id, &error(Some(req), ErrorCode::UNSUPPORTED, &text));
            return;
        }
        let party = |session: SessionId| {
            let p = self.peers.get(&session)?;
            Some(Party { session, ip: p.observed.ip(), key: p.session.remote()? })
        };
        let (Some(proxy), Some(met)) = (party(id), party(target)) else {
            // Both are established sessions, so both have keys; were one
            // gone, the request is still answered.
            let text = format!("no service {service} has registered {role}");
            self.send(id, &error(Some(req), ErrorCode::UNKNOWN, &text));
            return;
        };
        match self.meetings.open(now, proxy, met) {
            Ok(tickets) => {
                self.send(id, &Message::MeetReady { id: req, ticket: tickets.proxy });
                self.send(target, &Message::MeetOffer { ticket: tickets.service, proxy: key });
                self.check_queue(target);
                self.events.push_back(RegistryEvent::MeetArranged { proxy: key, service });
            }
            Err(refusal) => self.send(id, &error(Some(req), ErrorCode::LIMIT, &refusal.to_string())),
        }
    }

    /// Removes registration `reg` of session `id` and tells its watchers;
    /// false if there was none.
    pub(super) fn unregister(&mut self, id: SessionId, reg: u32) -> bool {
        let Some(instance) = self.directory.unregister((id, reg)) else { return false };
        self.events
            .push_back(RegistryEvent::Unregistered { peer: instance.key, role: instance.role.clone() });
        self.notify(&instance.role);
        true
    }

    /// Marks every watch that `changed` matches as due for an update.
    fn notify(&mut self, changed: &Role) {
        let watches: Vec<(SessionId, u32)> =
            self.directory.watchers_of(changed).into_iter().map(|(key, _)| key).collect();
        for (session, watch) in watches {
            self.make_due(session, watch);
        }
    }
}

/// Whether a service seen at `observed` may name `addr` as one of its own:
/// its observed address, a private one (its LAN, behind a NAT: RFC 1918,
/// shared CGNAT space, IPv6 unique-local), or loopback when it is on this
/// host. Never another public address: proxies dial what the registry hands
/// them, and a registrant must not be able to aim them at a third party.
pub(super) fn plausible(addr: SocketAddr, observed: SocketAddr) -> bool {
    use std::net::IpAddr;
    let private = match addr.ip() {
        IpAddr::V4(ip) => ip.is_private() || (ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64),
        IpAddr::V6(ip) => (ip.segments()[0] & 0xfe00) == 0xfc00,
    };
    let loopback = addr.ip().is_loopback() && observed.ip().is_loopback();
    addr.ip() == observed.ip() || private || loopback
}

/// An error message, its text cut to what the wire allows.
pub(super) fn error(id: Option<u32>, code: ErrorCode, text: &str) -> Message {
    let mut text = text.to_owned();
    if text.len() > MAX_ERROR_TEXT {
        let mut cut = MAX_ERROR_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    Message::Error { id, code, text }
}
