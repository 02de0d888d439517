//! Sequences of registry operations from several peers: real sessions that
//! send well-formed or garbage messages, raw garbage connections, closes and
//! time passing. The registry must never panic, and its bookkeeping must
//! agree with itself after every step.
#![no_main]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use seaport_proto::keys::{Keypair, Seed};
use seaport_proto::message::Message;
use seaport_proto::noise::Intent;
use seaport_proto::registry::{Registry, RegistryConfig, RegistryEvent, SessionId};
use seaport_proto::role::{Role, RoleQuery};
use seaport_proto::session::Session;

const ROLES: [&str; 3] = ["db@1.0.0", "db@2.0.0", "web@1.2.3"];
const QUERIES: [&str; 3] = ["db", "db@2.x", "web@^1"];

#[derive(Arbitrary, Debug)]
enum Op {
    Open { peer: u8 },
    Register { peer: u8, id: u8, role: u8 },
    Unregister { peer: u8, id: u8 },
    Lookup { peer: u8, query: u8 },
    Watch { peer: u8, id: u8, query: u8 },
    Unwatch { peer: u8, id: u8 },
    Sealed { peer: u8, bytes: Vec<u8> },
    Raw { peer: u8, bytes: Vec<u8> },
    Close { peer: u8 },
    Tick { seconds: u8 },
}

fuzz_target!(|ops: Vec<Op>| {
    let mut now = Instant::now();
    let config = RegistryConfig { max_sessions: 8, max_registrations: 2, max_watches: 2, ..Default::default() };
    let mut registry = Registry::new(Keypair::from_seed(&Seed::from_bytes([9; 32])), config);
    let registry_key = registry.public_key();
    let mut links: HashMap<u8, (SessionId, Option<Session>)> = HashMap::new();
    let mut entropy = 0u8;
    for op in ops.into_iter().take(256) {
        entropy = entropy.wrapping_add(1);
        let msg = match &op {
            Op::Register { id, role, .. } => Some(Message::Register {
                id: u32::from(*id),
                role: Role::parse(ROLES[usize::from(*role) % ROLES.len()]).unwrap(),
                port: 1,
                addrs: vec![],
            }),
            Op::Unregister { id, .. } => Some(Message::Unregister { id: u32::from(*id) }),
            Op::Lookup { query, .. } => Some(Message::Lookup {
                id: 0,
                query: RoleQuery::parse(QUERIES[usize::from(*query) % QUERIES.len()]).unwrap(),
            }),
            Op::Watch { id, query, .. } => Some(Message::Watch {
                id: u32::from(*id),
                query: RoleQuery::parse(QUERIES[usize::from(*query) % QUERIES.len()]).unwrap(),
            }),
            Op::Unwatch { id, .. } => Some(Message::Unwatch { id: u32::from(*id) }),
            _ => None,
        };
        match op {
            Op::Open { peer } => {
                let Ok(id) = registry.accept(now, "127.0.0.1:1".parse().unwrap(), [entropy; 32]) else { continue };
                let keys = Keypair::from_seed(&Seed::from_bytes([peer % 4; 32]));
                let mut session =
                    Session::initiate(now, &keys, &registry_key, Intent::Control, [entropy; 32], Duration::from_secs(5))
                        .unwrap();
                let mut hello = Vec::new();
                session.poll_transmit(&mut hello);
                registry.handle_input(now, id, &hello);
                if let Some((old, _)) = links.insert(peer, (id, Some(session))) {
                    registry.handle_closed(old);
                }
            }
            Op::Raw { peer, bytes } => {
                if let Some((id, _)) = links.get(&peer) {
                    registry.handle_input(now, *id, &bytes);
                }
            }
            Op::Sealed { peer, bytes } => {
                if let Some((id, Some(session))) = links.get_mut(&peer) {
                    if session.send(&bytes).is_ok() {
                        let mut out = Vec::new();
                        session.poll_transmit(&mut out);
                        registry.handle_input(now, *id, &out);
                    }
                }
            }
            Op::Close { peer } => {
                if let Some((id, _)) = links.remove(&peer) {
                    registry.handle_closed(id);
                }
            }
            Op::Tick { seconds } => {
                now += Duration::from_secs(u64::from(seconds % 20));
                registry.handle_timeout(now);
            }
            Op::Register { peer, .. }
            | Op::Unregister { peer, .. }
            | Op::Lookup { peer, .. }
            | Op::Watch { peer, .. }
            | Op::Unwatch { peer, .. } => {
                if let (Some((id, Some(session))), Some(msg)) = (links.get_mut(&peer), msg) {
                    let mut plain = Vec::new();
                    msg.encode(&mut plain).unwrap();
                    if session.send(&plain).is_ok() {
                        let mut out = Vec::new();
                        session.poll_transmit(&mut out);
                        registry.handle_input(now, *id, &out);
                    }
                }
            }
        }
        // Deliver the registry's answers; a peer whose session broke stops sealing.
        let mut buf = Vec::new();
        while let Some(id) = registry.poll_transmit(&mut buf) {
            for (sid, session) in links.values_mut() {
                let Some(s) = session.as_mut().filter(|_| *sid == id) else { continue };
                if s.handle_input(now, &buf).is_err() {
                    *session = None;
                    continue;
                }
                while let Some(plain) = s.poll_event() {
                    assert!(Message::decode(&plain).is_ok(), "registry sent an undecodable message");
                }
            }
            buf.clear();
        }
        while let Some(event) = registry.poll_event() {
            if let RegistryEvent::SessionClosed { id, .. } = event {
                links.retain(|_, (sid, _)| *sid != id);
            }
        }
        assert!(registry.session_count() <= 8);
        assert!(registry.instance_count() <= 2 * registry.session_count());
    }
});

