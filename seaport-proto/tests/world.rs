//! An in-memory world: one registry, services and a proxy exchanging real
//! encrypted bytes through the state machines, over streams cut at random
//! points, with one virtual clock (the shared harness, `seaport_proto::testing`).
//!
//! Scenarios: the proxy finds both services; a service that goes silent is
//! dropped and the proxy's watch reports it; the registry restarts and
//! everyone reconnects, re-registers and re-watches by themselves.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use seaport_proto::client::{
    Backoff, ClientConfig, ClientError, ProxyClient, ProxyEvent, RegistryClient, ServiceClient, ServiceEvent,
    SetView, Strategy,
};
use seaport_proto::keys::{Keypair, PublicKey};
use seaport_proto::noise::NoiseError;
use seaport_proto::registry::{CloseReason, Registry, RegistryConfig, RegistryEvent};
use seaport_proto::role::{Role, RoleQuery};
use seaport_proto::session::SessionError;
use seaport_proto::testing::{Chunker, Client, Net, Peer, keypair, observed};

/// A client of the world, whatever its kind.
enum Node {
    Service(Client<ServiceClient>),
    Proxy(Client<ProxyClient>),
}

impl Node {
    fn peer(&mut self) -> &mut dyn Peer {
        match self {
            Node::Service(c) => c,
            Node::Proxy(c) => c,
        }
    }
    fn peer_ref(&self) -> &dyn Peer {
        match self {
            Node::Service(c) => c,
            Node::Proxy(c) => c,
        }
    }
    fn connect(&mut self, now: Instant, entropy: [u8; 32]) {
        match self {
            Node::Service(c) => c.client.connect(now, entropy),
            Node::Proxy(c) => c.client.connect(now, entropy),
        }
        .unwrap();
    }
    /// Whether any event from index `from` on reports its session open; and
    /// how many events there are.
    fn connected_since(&self, from: usize) -> (bool, usize) {
        match self {
            Node::Service(c) => {
                (c.events.iter().skip(from).any(|e| matches!(e, ServiceEvent::Connected)), c.events.len())
            }
            Node::Proxy(c) => {
                (c.events.iter().skip(from).any(|e| matches!(e, ProxyEvent::Connected)), c.events.len())
            }
        }
    }
}

impl Peer for Node {
    fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool {
        self.peer().poll_transmit(buf)
    }
    fn handle_input(&mut self, now: Instant, data: &[u8]) {
        self.peer().handle_input(now, data);
    }
    fn handle_closed(&mut self) {
        self.peer().handle_closed();
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.peer().handle_timeout(now);
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.peer_ref().poll_timeout()
    }
    fn take_ended(&mut self) -> bool {
        self.peer().take_ended()
    }
}

/// A node's reconnect schedule, kept beside the net.
struct Redial {
    backoff: Backoff,
    at: Option<Instant>,
    /// Events already looked at for `Connected`.
    seen: usize,
}

struct World {
    registry_key: Keypair,
    net: Net<Node>,
    redial: Vec<Redial>,
}

impl World {
    fn dial(&mut self, i: usize) {
        self.net.accept(i).expect("registry has room");
        self.redial[i].at = None;
        let entropy = self.net.chunker.entropy();
        let now = self.net.now;
        self.net.peers[i].peer.connect(now, entropy);
    }

    /// Delivers every queued byte; schedules a redial for each node whose session ended.
    fn settle(&mut self) {
        self.net.pump();
        for i in 0..self.net.peers.len() {
            let node = &mut self.net.peers[i];
            if node.session.is_none() && self.redial[i].at.is_none() && !node.frozen {
                let delay = self.redial[i].backoff.next_delay(self.net.chunker.next_u64());
                self.redial[i].at = Some(self.net.now + delay);
            }
            let (connected, seen) = node.peer.connected_since(self.redial[i].seen);
            self.redial[i].seen = seen;
            if connected {
                self.redial[i].backoff.reset();
            }
        }
    }

    /// Runs the world until `now + span`, firing timers and reconnects on the way.
    fn run_for(&mut self, span: Duration) {
        let until = self.net.now + span;
        for _ in 0..100_000 {
            self.settle();
            let redials = self.redial.iter().filter_map(|r| r.at);
            let next = self.net.poll_timeout().into_iter().chain(redials).min();
            let Some(next) = next.filter(|t| *t <= until) else {
                self.net.now = until;
                return;
            };
            self.net.now = self.net.now.max(next);
            for i in 0..self.net.peers.len() {
                if !self.net.peers[i].frozen && self.redial[i].at.is_some_and(|t| t <= self.net.now) {
                    self.dial(i);
                }
            }
            let now = self.net.now;
            self.net.advance(now);
        }
        panic!("timers did not converge");
    }

    fn proxy(&self) -> &Client<ProxyClient> {
        self.net
            .peers
            .iter()
            .find_map(|p| match &p.peer {
                Node::Proxy(c) => Some(c),
                Node::Service(_) => None,
            })
            .unwrap()
    }

    fn service(&self, i: usize) -> &Client<ServiceClient> {
        match &self.net.peers[i].peer {
            Node::Service(c) => c,
            Node::Proxy(_) => panic!("node {i} is the proxy"),
        }
    }
}

/// How the proxy's connections choose among what it knows (one registry:
/// its view is what that registry reports).
fn round_robin(proxy: &ProxyClient) -> SetView {
    let mut view = SetView::new(1, Strategy::RoundRobin, keypair(9).public(), Duration::from_secs(5));
    view.update(&[proxy]);
    view
}

fn service(registry: PublicKey, n: u8, role: &str) -> Node {
    let config = ClientConfig::new(keypair(n), registry);
    let client = ServiceClient::new(config, vec![Role::parse(role).unwrap()], 7000 + u16::from(n), vec![]);
    Node::Service(Client::new(client))
}

fn world(seed: u64) -> World {
    let registry_key = keypair(50);
    let registry = Registry::new(registry_key.clone(), RegistryConfig::default());
    let reg = registry_key.public();
    let proxy =
        ProxyClient::new(ClientConfig::new(keypair(9), reg), RoleQuery::parse("couchdb@3.x").unwrap());
    let mut net = Net::new(registry, Chunker::seeded(seed));
    net.add(service(reg, 1, "couchdb@3.2.2"));
    net.add(service(reg, 2, "couchdb@3.3.0"));
    net.add(service(reg, 3, "couchdb@4.0.0"));
    net.add(Node::Proxy(Client::new(proxy)));
    let redial = (0..net.peers.len())
        .map(|_| Redial {
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            at: None,
            seen: 0,
        })
        .collect();
    let mut w = World { registry_key, net, redial };
    for i in 0..w.net.peers.len() {
        w.dial(i);
    }
    w
}

/// The proxy's current instances, as the service numbers they belong to.
fn keys(w: &World) -> Vec<u8> {
    let mut ids: Vec<u8> = w
        .proxy()
        .client
        .instances()
        .iter()
        .map(|i| (1..=3).find(|n| keypair(*n).public() == i.key).unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

fn proxy_mut(w: &mut World) -> &mut ProxyClient {
    w.net
        .peers
        .iter_mut()
        .find_map(|p| match &mut p.peer {
            Node::Proxy(c) => Some(&mut c.client),
            Node::Service(_) => None,
        })
        .unwrap()
}

#[test]
fn proxy_finds_both_matching_services() {
    for seed in 0..8 {
        let mut w = world(seed);
        w.run_for(Duration::from_secs(1));
        assert_eq!(keys(&w), vec![1, 2], "seed {seed}: {:#?}", w.net.events);
        assert_eq!(w.net.registry.instance_count(), 3);
        // Round-robin spreads new connections over both, failover order lists both.
        let now = w.net.now;
        let mut view = round_robin(proxy_mut(&mut w));
        let first: Vec<PublicKey> = (0..4).map(|_| view.choose_for(0, now, 0)[0].key).collect();
        assert_eq!(first[0], first[2]);
        assert_ne!(first[0], first[1]);
        // A failure bans that instance for a while.
        view.report_failure(now, first[0]);
        assert_eq!(view.choose_for(0, now, 0)[0].key, first[1]);
        assert_eq!(view.choose_for(0, now, 0)[1].key, first[0], "banned one is last resort");
    }
}

#[test]
fn silent_service_is_dropped_and_the_watch_says_so() {
    let mut w = world(42);
    w.run_for(Duration::from_secs(1));
    assert_eq!(keys(&w), vec![1, 2]);
    w.net.peers[0].frozen = true;
    // Keepalive 5 s, idle timeout 15 s, sweep every second: gone within 17 s.
    w.run_for(Duration::from_secs(17));
    assert_eq!(keys(&w), vec![2], "{:#?}", &w.net.events[w.net.events.len().saturating_sub(20)..]);
    assert_eq!(w.net.registry.instance_count(), 2);
    let idle = w.net.events.iter().any(|e| {
        matches!(e, RegistryEvent::SessionClosed { peer: Some(k), reason: CloseReason::Idle(_), .. } if *k == keypair(1).public())
    });
    assert!(idle, "the registry dropped the silent service as idle");
    // It thaws, notices its session is gone, reconnects and registers again.
    w.net.peers[0].frozen = false;
    w.run_for(Duration::from_secs(30));
    assert_eq!(keys(&w), vec![1, 2]);
    let registered = w.service(0).events.iter().filter(|e| matches!(e, ServiceEvent::Registered(_))).count();
    assert_eq!(registered, 2, "{:?}", w.service(0).events);
}

#[test]
fn registry_restart_loses_nothing_that_matters() {
    let mut w = world(7);
    w.run_for(Duration::from_secs(1));
    assert_eq!(keys(&w), vec![1, 2]);
    let pushes_before = w.proxy().events.iter().filter(|e| matches!(e, ProxyEvent::Instances { .. })).count();
    // The registry dies: every stream closes; it comes back empty, same key.
    w.net.registry = Registry::new(w.registry_key.clone(), RegistryConfig::default());
    for i in 0..w.net.peers.len() {
        w.net.peers[i].session = None;
        w.net.peers[i].peer.handle_closed();
    }
    w.settle();
    // The proxy keeps what it knew while the registry is away.
    assert_eq!(keys(&w), vec![1, 2]);
    assert!(w.proxy().events.contains(&ProxyEvent::Disconnected(ClientError::Closed)));
    // Within a reconnect delay everyone is back.
    w.run_for(Duration::from_secs(2));
    assert_eq!(w.net.registry.instance_count(), 3);
    assert_eq!(w.net.registry.session_count(), 4);
    assert_eq!(keys(&w), vec![1, 2]);
    let pushes = w.proxy().events.iter().filter(|e| matches!(e, ProxyEvent::Instances { .. })).count();
    assert!(pushes > pushes_before, "proxy re-watched after the restart");
}

#[test]
fn wrong_registry_key_never_connects() {
    let mut w = world(3);
    let config = ClientConfig::new(keypair(4), keypair(77).public());
    let svc = ServiceClient::new(config, vec![Role::parse("x@1.0.0").unwrap()], 1, vec![]);
    let i = w.net.add(Node::Service(Client::new(svc)));
    w.redial.push(Redial {
        backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
        at: None,
        seen: 0,
    });
    w.dial(i);
    w.run_for(Duration::from_secs(3));
    let refused = w
        .net
        .events
        .iter()
        .filter(|e| {
            matches!(
                e,
                RegistryEvent::SessionClosed {
                    peer: None,
                    reason: CloseReason::Session(SessionError::Noise(NoiseError::Decrypt)),
                    ..
                }
            )
        })
        .count();
    assert!(
        refused >= 2,
        "registry refuses every attempt, and the service keeps trying: {:#?}",
        w.net.events
    );
    assert!(
        !w.service(i).events.iter().any(|e| matches!(e, ServiceEvent::Registered(_))),
        "never registered"
    );
    assert_eq!(w.net.registry.instance_count(), 3);
}

#[test]
fn a_meeting_gives_the_proxy_and_the_service_one_ticket_and_the_registry_admits_each_side_once() {
    use seaport_proto::meet::MeetSide;
    use seaport_proto::registry::{Arrival, ArrivalError};
    for seed in 0..4 {
        let mut w = world(seed);
        w.run_for(Duration::from_secs(1));
        let service = keypair(1).public();
        let role = Role::parse("couchdb@3.2.2").unwrap();
        let id =
            proxy_mut(&mut w).meet(service, role.clone()).expect("connected to a registry that can meet");
        w.settle();
        let ready = w.proxy().events.iter().find_map(|e| match e {
            ProxyEvent::MeetReady { id: got, ticket } if *got == id => Some(*ticket),
            _ => None,
        });
        let ticket = ready.unwrap_or_else(|| panic!("seed {seed}: no answer: {:?}", w.proxy().events));
        let offers: Vec<_> = w
            .service(0)
            .events
            .iter()
            .filter_map(|e| match e {
                ServiceEvent::MeetOffer { ticket, proxy } => Some((*ticket, *proxy)),
                _ => None,
            })
            .collect();
        let [(offered, asker)] = offers[..] else { panic!("seed {seed}: {offers:?}") };
        assert_eq!(asker, keypair(9).public(), "the service hears who asked");
        assert_ne!(offered, ticket, "each side has a ticket of its own");
        assert!(w.service(1).events.iter().all(|e| !matches!(e, ServiceEvent::MeetOffer { .. })));
        let now = w.net.now;
        // Node 0 is the service, node 3 the proxy (tests/world.rs's `world`).
        let (at_service, at_proxy) = (observed(0).ip(), observed(3).ip());
        let first = w.net.registry.arrive(now, offered, MeetSide::Service, at_service);
        let (Ok(Arrival::First { meeting, .. }), Ok(Arrival::Second { meeting: same })) =
            (first, w.net.registry.arrive(now, ticket, MeetSide::Proxy, at_proxy))
        else {
            panic!("seed {seed}: the sides did not pair");
        };
        assert_eq!(meeting, same, "both arrivals name one meeting");
        assert_eq!(w.net.registry.arrive(now, ticket, MeetSide::Proxy, at_proxy), Err(ArrivalError::Unknown));

        // A service that is not registered cannot be met, nor a registered
        // one under another role than it registered; the proxy hears why.
        let refused = |w: &World, id: u32| {
            w.proxy()
                .events
                .iter()
                .any(|e| matches!(e, ProxyEvent::MeetRefused { id: got, .. } if *got == id))
        };
        let id = proxy_mut(&mut w).meet(keypair(77).public(), role.clone()).unwrap();
        w.settle();
        assert!(refused(&w, id), "seed {seed}: {:?}", w.proxy().events);
        let other = Role::parse("couchdb@3.3.0").unwrap();
        let id = proxy_mut(&mut w).meet(service, other).unwrap();
        w.settle();
        assert!(refused(&w, id), "seed {seed}: {:?}", w.proxy().events);

        // A meeting asked for just before the session ends is answered by
        // the end, not left hanging.
        let id = proxy_mut(&mut w).meet(service, role.clone()).unwrap();
        let proxy = w.net.peers.len() - 1;
        w.net.close(proxy);
        assert!(refused(&w, id), "seed {seed}");
    }
}

#[test]
fn three_hundred_instances_with_big_tags_all_reach_the_proxy_whole_and_are_chosen_in_turn() {
    use seaport_proto::keys::Seed;
    let registry_key = keypair(50);
    let reg = registry_key.public();
    let registry = Registry::new(registry_key.clone(), RegistryConfig::default());
    let mut net = Net::new(registry, Chunker::seeded(11));
    // 16 tags of 64 characters: about 1.1 KB an instance, 330 KB in all,
    // five times what one frame holds.
    let tags: Vec<String> = (0..16).map(|i| format!("{i:02}{}", "t".repeat(62))).collect();
    for n in 0..300u16 {
        let mut seed = [7u8; 32];
        seed[..2].copy_from_slice(&n.to_be_bytes());
        let config = ClientConfig::new(Keypair::from_seed(&Seed::from_bytes(seed)), reg);
        let role = Role::parse("couchdb@3.2.2").unwrap().with_tags(tags.clone()).unwrap();
        net.add(Node::Service(Client::new(ServiceClient::new(config, vec![role], 7000, vec![]))));
    }
    let proxy =
        ProxyClient::new(ClientConfig::new(keypair(9), reg), RoleQuery::parse("couchdb@3.x").unwrap());
    net.add(Node::Proxy(Client::new(proxy)));
    let redial = (0..net.peers.len())
        .map(|_| Redial {
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            at: None,
            seen: 0,
        })
        .collect();
    let mut w = World { registry_key, net, redial };
    // The proxy first, so that it sees the set grow one registration at a time.
    let proxy_index = w.net.peers.len() - 1;
    w.dial(proxy_index);
    w.settle();
    for i in 0..proxy_index {
        w.dial(i);
    }
    w.run_for(Duration::from_secs(2));
    assert_eq!(w.net.registry.instance_count(), 300);

    // Every set the proxy reported was a whole one: the registered set only
    // grew, so a part reported on its own would show as a set that shrank.
    let sizes: Vec<(usize, bool)> = w
        .proxy()
        .events
        .iter()
        .filter_map(|e| match e {
            ProxyEvent::Instances { instances, truncated, .. } => Some((instances.len(), *truncated)),
            _ => None,
        })
        .collect();
    assert!(sizes.windows(2).all(|p| p[0].0 <= p[1].0), "a set shrank: {sizes:?}");
    assert_eq!(sizes.last(), Some(&(300, false)), "{sizes:?}");
    assert!(sizes.iter().all(|(_, truncated)| !truncated));
    assert_eq!(w.proxy().client.instances().len(), 300);

    // Round-robin puts each of the 300 first once in 300 connections.
    let now = w.net.now;
    let mut view = round_robin(proxy_mut(&mut w));
    let mut firsts: Vec<PublicKey> = (0..300).map(|_| view.choose_for(0, now, 0)[0].key).collect();
    firsts.sort_unstable_by_key(|k| *k.as_bytes());
    firsts.dedup();
    assert_eq!(firsts.len(), 300);
}
