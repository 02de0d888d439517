//! Model-based test of the registry: random sequences of register,
//! unregister, disconnect, lookup, watch and time passing, checked against a
//! plain map of what should be registered.
//!
//! Each simulated peer talks to the real `Registry` through a real Noise
//! session, over the shared harness (`seaport_proto::testing`); after every step every lookup answer and the latest push of every
//! watch must equal the model's matching set. The same operations are also
//! applied to a bare `Directory` (the registry's index, no sessions), which
//! must agree with the model too.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use seaport_proto::keys::{Keypair, PublicKey};
use seaport_proto::message::{Instance, Message};
use seaport_proto::registry::Directory;
use seaport_proto::registry::{Registry, RegistryConfig, SessionId};
use seaport_proto::role::{Role, RoleQuery};
use seaport_proto::testing::{Chunker, Net, RawPeer, keypair};

const PEERS: usize = 3;
const ROLES: [&str; 4] = ["db@1.0.0", "db@2.1.0", "web@1.0.0", "db@2.2.0-rc.1"];
const QUERIES: [&str; 4] = ["db@2.x", "db", "web@^1", "db@>=1.0.0 <2.2.0"];

#[derive(Debug, Clone)]
enum Op {
    Register { peer: usize, reg: u32, role: usize },
    Unregister { peer: usize, reg: u32 },
    Disconnect { peer: usize },
    Lookup { peer: usize, query: usize },
    Watch { peer: usize, watch: u32, query: usize },
    Tick { seconds: u64, quiet: Option<usize> },
}

fn op() -> impl Strategy<Value = Op> {
    let peer = 0..PEERS;
    prop_oneof![
        (peer.clone(), 0u32..3, 0..ROLES.len()).prop_map(|(peer, reg, role)| Op::Register {
            peer,
            reg,
            role
        }),
        (peer.clone(), 0u32..3).prop_map(|(peer, reg)| Op::Unregister { peer, reg }),
        peer.clone().prop_map(|peer| Op::Disconnect { peer }),
        (peer.clone(), 0..QUERIES.len()).prop_map(|(peer, query)| Op::Lookup { peer, query }),
        (peer.clone(), 0u32..2, 0..QUERIES.len()).prop_map(|(peer, watch, query)| Op::Watch {
            peer,
            watch,
            query
        }),
        (1u64..20, prop::option::of(peer)).prop_map(|(seconds, quiet)| Op::Tick { seconds, quiet }),
    ]
}

/// What the model test remembers of one peer; its session is in the net.
struct Peer {
    keypair: Keypair,
    /// Latest instance set pushed for each watch id (cleared on reconnect).
    watches: HashMap<u32, Option<Vec<(PublicKey, String)>>>,
    watch_queries: HashMap<u32, usize>,
    lookups: Vec<Vec<(PublicKey, String)>>,
    last_heard: Instant,
}

struct Harness {
    net: Net<RawPeer>,
    peers: Vec<Peer>,
    /// The model: (peer, registration id) → role index.
    model: BTreeMap<(usize, u32), usize>,
}

fn summary(instances: &[Instance]) -> Vec<(PublicKey, String)> {
    let mut v: Vec<_> = instances.iter().map(|i| (i.key, i.role.to_string())).collect();
    v.sort();
    v
}

impl Harness {
    fn new() -> Harness {
        let registry = Registry::new(keypair(100), RegistryConfig::default());
        let mut net = Net::new(registry, Chunker::whole());
        let peers = (0..PEERS)
            .map(|i| {
                net.add(RawPeer::new());
                Peer {
                    keypair: keypair(i as u8 + 1),
                    watches: HashMap::new(),
                    watch_queries: HashMap::new(),
                    lookups: Vec::new(),
                    last_heard: net.now,
                }
            })
            .collect();
        Harness { net, peers, model: BTreeMap::new() }
    }

    fn connected(&self, p: usize) -> bool {
        self.net.peers[p].session.is_some()
    }

    /// Moves bytes both ways until nothing is left, then files what each peer got.
    fn pump(&mut self) {
        self.net.pump();
        for (p, peer) in self.peers.iter_mut().enumerate() {
            for msg in self.net.peers[p].peer.take_messages() {
                match msg {
                    Message::Instances { id, instances, truncated } => {
                        assert!(!truncated);
                        if let Some(slot) = peer.watches.get_mut(&id) {
                            *slot = Some(summary(&instances));
                        } else {
                            peer.lookups.push(summary(&instances));
                        }
                    }
                    Message::Registered { .. } | Message::Pong { .. } => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }

    fn ensure_link(&mut self, p: usize) {
        if self.connected(p) {
            return;
        }
        self.peers[p].watches.clear();
        self.peers[p].watch_queries.clear();
        self.net.connect(p, &self.peers[p].keypair);
        assert!(self.net.peers[p].peer.is_established());
    }

    fn send(&mut self, p: usize, msg: Message) {
        self.ensure_link(p);
        assert!(self.net.peers[p].peer.send(&msg));
        self.peers[p].last_heard = self.net.now;
        self.pump();
    }

    fn expected(&self, query: usize) -> Vec<(PublicKey, String)> {
        let q = RoleQuery::parse(QUERIES[query]).unwrap();
        let mut v: Vec<_> = self
            .model
            .iter()
            .map(|((p, _), r)| (self.peers[*p].keypair.public(), Role::parse(ROLES[*r]).unwrap()))
            .filter(|(_, role)| q.matches(role))
            .map(|(k, role)| (k, role.to_string()))
            .collect();
        v.sort();
        v
    }

    fn drop_peer(&mut self, p: usize) {
        self.model.retain(|(owner, _), _| *owner != p);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Register { peer, reg, role } => {
                let role_v = Role::parse(ROLES[role]).unwrap();
                self.send(peer, Message::Register { id: reg, role: role_v, port: 4000, addrs: vec![] });
                self.model.insert((peer, reg), role);
            }
            Op::Unregister { peer, reg } => {
                if self.model.remove(&(peer, reg)).is_some() {
                    self.send(peer, Message::Unregister { id: reg });
                }
            }
            Op::Disconnect { peer } => {
                if self.connected(peer) {
                    self.net.close(peer);
                    self.drop_peer(peer);
                    self.pump();
                }
            }
            Op::Lookup { peer, query } => {
                let q = RoleQuery::parse(QUERIES[query]).unwrap();
                self.send(peer, Message::Lookup { id: 1000, query: q });
                let got = self.peers[peer].lookups.pop().expect("lookup answered");
                assert_eq!(got, self.expected(query), "lookup {}", QUERIES[query]);
            }
            Op::Watch { peer, watch, query } => {
                self.ensure_link(peer);
                self.peers[peer].watches.insert(watch, None);
                self.peers[peer].watch_queries.insert(watch, query);
                let q = RoleQuery::parse(QUERIES[query]).unwrap();
                self.send(peer, Message::Watch { id: watch, query: q });
            }
            Op::Tick { seconds, quiet } => {
                self.net.now += Duration::from_secs(seconds);
                // Everyone but `quiet` shows a sign of life just before the deadline passes.
                for p in 0..PEERS {
                    if Some(p) != quiet && self.connected(p) {
                        self.send(p, Message::Ping { nonce: 1 });
                    }
                }
                let now = self.net.now;
                self.net.advance(now);
                self.pump();
                let idle = RegistryConfig::default().idle_timeout;
                for p in 0..PEERS {
                    let dead = now.duration_since(self.peers[p].last_heard) >= idle;
                    if dead {
                        assert!(!self.connected(p), "silent peer {p} still connected");
                        self.drop_peer(p);
                    }
                }
            }
        }
        self.check();
    }

    fn check(&self) {
        let total: usize = self.model.len();
        assert_eq!(self.net.registry.instance_count(), total, "instance count");
        for (query, text) in QUERIES.iter().enumerate() {
            let q = RoleQuery::parse(text).unwrap();
            let found: Vec<Instance> = self.net.registry.directory().matching(&q).cloned().collect();
            assert_eq!(summary(&found), self.expected(query), "registry's directory, {text}");
        }
        for (p, peer) in self.peers.iter().enumerate() {
            if !self.connected(p) {
                continue;
            }
            for (watch, latest) in &peer.watches {
                let query = peer.watch_queries[watch];
                assert_eq!(latest.as_ref(), Some(&self.expected(query)), "watch {}", QUERIES[query]);
            }
        }
        let connected: BTreeSet<usize> = (0..PEERS).filter(|p| self.connected(*p)).collect();
        assert_eq!(self.net.registry.session_count(), connected.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn registry_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
        }
    }
}

/// The model, applied to a bare directory: owners stand in for sessions.
fn check_directory(ops: &[Op]) {
    let keys: Vec<PublicKey> = (0..PEERS).map(|i| keypair(i as u8 + 1).public()).collect();
    let owner = |p: usize| SessionId(p as u64);
    let mut directory = Directory::new();
    let mut model: BTreeMap<(usize, u32), usize> = BTreeMap::new();
    let mut watches: BTreeMap<(usize, u32), usize> = BTreeMap::new();
    let expected = |model: &BTreeMap<(usize, u32), usize>, query: usize| {
        let q = RoleQuery::parse(QUERIES[query]).unwrap();
        let mut v: Vec<_> = model
            .iter()
            .map(|((p, _), r)| (keys[*p], Role::parse(ROLES[*r]).unwrap()))
            .filter(|(_, role)| q.matches(role))
            .map(|(k, role)| (k, role.to_string()))
            .collect();
        v.sort();
        v
    };
    for op in ops {
        match *op {
            Op::Register { peer, reg, role } => {
                let instance =
                    Instance { key: keys[peer], role: Role::parse(ROLES[role]).unwrap(), addrs: vec![] };
                let replaced = directory.register((owner(peer), reg), instance);
                let old = model.insert((peer, reg), role);
                assert_eq!(replaced.map(|i| i.role.to_string()), old.map(|r| ROLES[r].to_owned()));
            }
            Op::Unregister { peer, reg } => {
                let removed = directory.unregister((owner(peer), reg));
                assert_eq!(removed.is_some(), model.remove(&(peer, reg)).is_some());
            }
            Op::Disconnect { peer } | Op::Tick { quiet: Some(peer), .. } => {
                for reg in directory.release(owner(peer)) {
                    assert!(directory.unregister((owner(peer), reg)).is_some());
                }
                model.retain(|(p, _), _| *p != peer);
                watches.retain(|(p, _), _| *p != peer);
            }
            Op::Lookup { query, .. } => {
                let q = RoleQuery::parse(QUERIES[query]).unwrap();
                let found: Vec<Instance> = directory.matching(&q).cloned().collect();
                assert_eq!(summary(&found), expected(&model, query), "lookup {}", QUERIES[query]);
            }
            Op::Watch { peer, watch, query } => {
                directory.watch((owner(peer), watch), RoleQuery::parse(QUERIES[query]).unwrap());
                watches.insert((peer, watch), query);
            }
            Op::Tick { quiet: None, .. } => {}
        }
        assert_eq!(directory.instance_count(), model.len());
        // The status page's read-only views agree with the model.
        let mut listed: Vec<(u64, u32)> = directory.instances().map(|((o, r), _)| (o.0, r)).collect();
        listed.sort_unstable();
        assert_eq!(listed, model.keys().map(|(p, r)| (*p as u64, *r)).collect::<Vec<_>>());
        let names: Vec<&str> = directory.instances().map(|(_, i)| i.role.name()).collect();
        assert!(names.windows(2).all(|w| w[0] <= w[1]), "grouped by role name: {names:?}");
        assert_eq!(directory.watch_total(), watches.len());
        for peer in 0..PEERS {
            let regs = model.keys().filter(|(p, _)| *p == peer).count();
            assert_eq!(directory.registration_count(owner(peer)), regs);
            let held = watches.keys().filter(|(p, _)| *p == peer).count();
            assert_eq!(directory.watch_count(owner(peer)), held);
        }
        // A change to any role reaches exactly the watches whose query matches it.
        for role in ROLES {
            let role = Role::parse(role).unwrap();
            let got: Vec<(usize, u32)> =
                directory.watchers_of(&role).into_iter().map(|((o, w), _)| (o.0 as usize, w)).collect();
            let want: Vec<(usize, u32)> = watches
                .iter()
                .filter(|(_, q)| RoleQuery::parse(QUERIES[**q]).unwrap().matches(&role))
                .map(|(k, _)| *k)
                .collect();
            assert_eq!(got, want, "watchers of {role}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn directory_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        check_directory(&ops);
    }
}
