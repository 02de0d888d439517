//! Sequences of registry operations from several peers: sessions that send
//! well-formed or garbage messages, raw garbage on fresh or open
//! connections, closes and time passing, over the shared harness
//! (`seaport_proto::testing`). The registry must never panic, and its
//! bookkeeping must agree with itself after every step.
//!
//! Speed: sessions open through the `testing` feature's handshake shortcut,
//! and keys are derived once per process, so a run does no X25519 of its own
//! (a real handshake costs milliseconds under coverage instrumentation and
//! was nearly all of each run). Handshakes themselves are fuzzed by
//! `handshake_responder`; the shortcut enters the registry's code where a
//! completed handshake does.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use seaport_proto::keys::Keypair;
use seaport_proto::message::Message;
use seaport_proto::registry::{Registry, RegistryConfig};
use seaport_proto::role::{Role, RoleQuery};
use seaport_proto::testing::{Chunker, Net, RawPeer, keypair};

const ROLES: [&str; 3] = ["db@1.0.0", "db@2.0.0", "web@1.2.3"];
const QUERIES: [&str; 3] = ["db", "db@2.x", "web@^1"];
/// Peer slots; two slots share each identity, so sessions supersede each other.
const SLOTS: usize = 8;

#[derive(Arbitrary, Debug)]
enum Op {
    Open { peer: u8 },
    Connect { peer: u8 },
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

/// The registry's key and the peers' four identities, derived once.
fn keys() -> &'static (Keypair, Vec<Keypair>) {
    static KEYS: OnceLock<(Keypair, Vec<Keypair>)> = OnceLock::new();
    KEYS.get_or_init(|| (keypair(9), (0..4).map(keypair).collect()))
}

fn message(op: &Op) -> Option<Message> {
    let role = |r: u8| Role::parse(ROLES[usize::from(r) % ROLES.len()]).unwrap();
    let query = |q: u8| RoleQuery::parse(QUERIES[usize::from(q) % QUERIES.len()]).unwrap();
    Some(match *op {
        Op::Register { id, role: r, .. } => {
            Message::Register { id: u32::from(id), role: role(r), port: 1, addrs: vec![] }
        }
        Op::Unregister { id, .. } => Message::Unregister { id: u32::from(id) },
        Op::Lookup { query: q, .. } => Message::Lookup { id: 0, query: query(q) },
        Op::Watch { id, query: q, .. } => Message::Watch { id: u32::from(id), query: query(q) },
        Op::Unwatch { id, .. } => Message::Unwatch { id: u32::from(id) },
        _ => return None,
    })
}

fuzz_target!(|ops: Vec<Op>| {
    let (registry_key, peer_keys) = keys();
    let config = RegistryConfig { max_sessions: 8, max_registrations: 2, max_watches: 2, ..Default::default() };
    let mut net = Net::new(Registry::new(registry_key.clone(), config), Chunker::whole());
    for _ in 0..SLOTS {
        net.add(RawPeer::new());
    }
    for op in ops.into_iter().take(256) {
        let msg = message(&op);
        match op {
            Op::Open { peer } => {
                let slot = usize::from(peer) % SLOTS;
                net.connect_established(slot, &peer_keys[slot % 4]);
            }
            Op::Connect { peer } => {
                let slot = usize::from(peer) % SLOTS;
                net.close(slot);
                net.accept(slot);
            }
            Op::Raw { peer, bytes } => {
                if let Some(id) = net.peers[usize::from(peer) % SLOTS].session {
                    net.registry.handle_input(net.now, id, &bytes);
                }
            }
            Op::Sealed { peer, bytes } => {
                net.peers[usize::from(peer) % SLOTS].peer.send_plain(&bytes);
            }
            Op::Close { peer } => net.close(usize::from(peer) % SLOTS),
            Op::Tick { seconds } => {
                let now = net.now + Duration::from_secs(u64::from(seconds % 20));
                net.advance(now);
            }
            Op::Register { peer, .. }
            | Op::Unregister { peer, .. }
            | Op::Lookup { peer, .. }
            | Op::Watch { peer, .. }
            | Op::Unwatch { peer, .. } => {
                if let Some(msg) = msg {
                    net.peers[usize::from(peer) % SLOTS].peer.send(&msg);
                }
            }
        }
        net.pump();
        for slot in &mut net.peers {
            for got in slot.peer.inbox.drain(..) {
                assert!(got.is_ok(), "registry sent an undecodable message: {got:?}");
            }
        }
        assert!(net.registry.session_count() <= 8);
        assert!(net.registry.instance_count() <= 2 * net.registry.session_count());
        assert_eq!(net.registry.directory().instance_count(), net.registry.instance_count());
    }
});
