//! An in-memory world: one registry, two services and a proxy exchanging real
//! encrypted bytes through the state machines, over links that cut the byte
//! stream at random points, with one virtual clock.
//!
//! Scenarios: the proxy finds both services; a service that goes silent is
//! dropped and the proxy's watch reports it; the registry restarts and
//! everyone reconnects, re-registers and re-watches by themselves.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use seaport_proto::client::{Backoff, ClientConfig, ProxyClient, RegistryClient, ServiceClient, Strategy};
use seaport_proto::keys::{Keypair, PublicKey, Seed};
use seaport_proto::registry::{Registry, RegistryConfig, RegistryEvent, SessionId};
use seaport_proto::role::{Role, RoleQuery};

/// What the world needs of a client, whatever its kind.
trait Endpoint {
    fn connect(&mut self, now: Instant, entropy: [u8; 32]);
    fn handle_input(&mut self, now: Instant, data: &[u8]);
    fn handle_closed(&mut self);
    fn handle_timeout(&mut self, now: Instant);
    fn poll_timeout(&self) -> Option<Instant>;
    fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool;
    /// Drains events; true if the session ended (the driver must reconnect).
    fn drain_events(&mut self, log: &mut Vec<String>) -> bool;
}

impl<C: RegistryClient> Endpoint for C {
    fn connect(&mut self, now: Instant, entropy: [u8; 32]) {
        RegistryClient::connect(self, now, entropy).unwrap();
    }
    fn handle_input(&mut self, now: Instant, data: &[u8]) {
        RegistryClient::handle_input(self, now, data);
    }
    fn handle_closed(&mut self) {
        RegistryClient::handle_closed(self);
    }
    fn handle_timeout(&mut self, now: Instant) {
        RegistryClient::handle_timeout(self, now);
    }
    fn poll_timeout(&self) -> Option<Instant> {
        RegistryClient::poll_timeout(self)
    }
    fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool {
        RegistryClient::poll_transmit(self, buf)
    }
    fn drain_events(&mut self, log: &mut Vec<String>) -> bool {
        let mut ended = false;
        while let Some(e) = self.poll_event() {
            ended |= C::disconnect_reason(&e).is_some();
            log.push(format!(
                "{}: {e:?}",
                std::any::type_name::<C>().rsplit("::").next().unwrap_or("client")
            ));
        }
        ended
    }
}

/// One client's connection state in the world.
struct Node {
    client: Box<dyn Endpoint>,
    session: Option<SessionId>,
    /// Frozen nodes neither send nor receive (a process under SIGSTOP).
    frozen: bool,
    backoff: Backoff,
    reconnect_at: Option<Instant>,
}

struct World {
    now: Instant,
    rng: ChaCha8Rng,
    registry_key: Keypair,
    registry: Registry,
    nodes: Vec<Node>,
    log: Vec<String>,
}

impl World {
    fn entropy(&mut self) -> [u8; 32] {
        self.rng.random()
    }

    /// Feeds `data` to a receiver in random pieces.
    fn chunks(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let n = self.rng.random_range(1..=rest.len().min(97));
            out.push(rest[..n].to_vec());
            rest = &rest[n..];
        }
        out
    }

    fn dial(&mut self, i: usize) {
        let (e1, e2) = (self.entropy(), self.entropy());
        let addr = format!("127.0.0.{}:4000", i + 2).parse().unwrap();
        let id = self.registry.accept(self.now, addr, e1).unwrap();
        let node = &mut self.nodes[i];
        node.session = Some(id);
        node.reconnect_at = None;
        node.client.connect(self.now, e2);
    }

    fn node_of(&self, id: SessionId) -> Option<usize> {
        self.nodes.iter().position(|n| n.session == Some(id))
    }

    /// Delivers every queued byte, handles events, until quiet.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                let Some(id) = self.nodes[i].session else { continue };
                if self.nodes[i].frozen {
                    continue;
                }
                let mut buf = Vec::new();
                if self.nodes[i].client.poll_transmit(&mut buf) {
                    moved = true;
                    for piece in self.chunks(&buf) {
                        self.registry.handle_input(self.now, id, &piece);
                    }
                }
            }
            loop {
                let mut buf = Vec::new();
                let Some(id) = self.registry.poll_transmit(&mut buf) else { break };
                moved = true;
                let Some(i) = self.node_of(id) else { continue };
                if self.nodes[i].frozen {
                    continue;
                }
                for piece in self.chunks(&buf) {
                    let now = self.now;
                    self.nodes[i].client.handle_input(now, &piece);
                }
            }
            while let Some(event) = self.registry.poll_event() {
                self.log.push(format!("registry: {event:?}"));
                if let RegistryEvent::SessionClosed { id, .. } = event {
                    if let Some(i) = self.node_of(id) {
                        // The driver closes the stream; the client sees EOF.
                        self.nodes[i].session = None;
                        self.nodes[i].client.handle_closed();
                    }
                }
            }
            for i in 0..self.nodes.len() {
                let mut log = Vec::new();
                if self.nodes[i].client.drain_events(&mut log) {
                    moved = true;
                    if let Some(id) = self.nodes[i].session.take() {
                        self.registry.handle_closed(id);
                    }
                    let r = self.rng.random();
                    let delay = self.nodes[i].backoff.next_delay(r);
                    self.nodes[i].reconnect_at = Some(self.now + delay);
                }
                if log.iter().any(|l| l.contains("Connected")) {
                    self.nodes[i].backoff.reset();
                }
                self.log.extend(log);
            }
            if !moved {
                return;
            }
        }
        panic!("livelock: the world did not settle");
    }

    /// Runs the world until `now + span`, firing timers and reconnects on the way.
    fn run_for(&mut self, span: Duration) {
        let until = self.now + span;
        for _ in 0..100_000 {
            self.settle();
            let mut next = self.registry.poll_timeout();
            for n in &self.nodes {
                let t = if n.frozen { None } else { n.client.poll_timeout().or(n.reconnect_at) };
                next = match (next, t) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            let Some(next) = next.filter(|t| *t <= until) else {
                self.now = until;
                return;
            };
            self.now = self.now.max(next);
            self.registry.handle_timeout(self.now);
            for i in 0..self.nodes.len() {
                if self.nodes[i].frozen {
                    continue;
                }
                if self.nodes[i].reconnect_at.is_some_and(|t| t <= self.now) {
                    self.dial(i);
                }
                let now = self.now;
                self.nodes[i].client.handle_timeout(now);
            }
        }
        panic!("timers did not converge");
    }
}

fn keypair(n: u8) -> Keypair {
    Keypair::from_seed(&Seed::from_bytes([n; 32]))
}

fn service(registry: PublicKey, n: u8, role: &str) -> Node {
    let config = ClientConfig::new(keypair(n), registry);
    let client = ServiceClient::new(config, vec![Role::parse(role).unwrap()], 7000 + u16::from(n), vec![]);
    node(Box::new(client))
}

fn node(client: Box<dyn Endpoint>) -> Node {
    Node {
        client,
        session: None,
        frozen: false,
        backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
        reconnect_at: None,
    }
}

/// The proxy's current instance keys, read through a shared handle.
struct ProxyView(std::rc::Rc<std::cell::RefCell<ProxyClient>>);

impl Endpoint for ProxyView {
    fn connect(&mut self, now: Instant, entropy: [u8; 32]) {
        Endpoint::connect(&mut *self.0.borrow_mut(), now, entropy);
    }
    fn handle_input(&mut self, now: Instant, data: &[u8]) {
        Endpoint::handle_input(&mut *self.0.borrow_mut(), now, data);
    }
    fn handle_closed(&mut self) {
        Endpoint::handle_closed(&mut *self.0.borrow_mut());
    }
    fn handle_timeout(&mut self, now: Instant) {
        Endpoint::handle_timeout(&mut *self.0.borrow_mut(), now);
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Endpoint::poll_timeout(&*self.0.borrow())
    }
    fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool {
        Endpoint::poll_transmit(&mut *self.0.borrow_mut(), buf)
    }
    fn drain_events(&mut self, log: &mut Vec<String>) -> bool {
        Endpoint::drain_events(&mut *self.0.borrow_mut(), log)
    }
}

fn world(seed: u64) -> (World, std::rc::Rc<std::cell::RefCell<ProxyClient>>) {
    let registry_key = keypair(50);
    let registry = Registry::new(registry_key.clone(), RegistryConfig::default());
    let reg = registry_key.public();
    let proxy = ProxyClient::new(
        ClientConfig::new(keypair(9), reg),
        RoleQuery::parse("couchdb@3.x").unwrap(),
        Strategy::RoundRobin,
        Duration::from_secs(5),
    );
    let proxy = std::rc::Rc::new(std::cell::RefCell::new(proxy));
    let nodes = vec![
        service(reg, 1, "couchdb@3.2.2"),
        service(reg, 2, "couchdb@3.3.0"),
        service(reg, 3, "couchdb@4.0.0"),
        node(Box::new(ProxyView(proxy.clone()))),
    ];
    let mut w = World {
        now: Instant::now(),
        rng: ChaCha8Rng::seed_from_u64(seed),
        registry_key,
        registry,
        nodes,
        log: Vec::new(),
    };
    for i in 0..w.nodes.len() {
        w.dial(i);
    }
    (w, proxy)
}

fn keys(proxy: &std::rc::Rc<std::cell::RefCell<ProxyClient>>) -> Vec<u8> {
    let mut ids: Vec<u8> = proxy
        .borrow()
        .instances()
        .iter()
        .map(|i| (1..=3).find(|n| keypair(*n).public() == i.key).unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

#[test]
fn proxy_finds_both_matching_services() {
    for seed in 0..8 {
        let (mut w, proxy) = world(seed);
        w.run_for(Duration::from_secs(1));
        assert_eq!(keys(&proxy), vec![1, 2], "seed {seed}: {:#?}", w.log);
        assert_eq!(w.registry.instance_count(), 3);
        // Round-robin spreads new connections over both, failover order lists both.
        let now = w.now;
        let first: Vec<PublicKey> = (0..4).map(|_| proxy.borrow_mut().choose(now, 0)[0].key).collect();
        assert_eq!(first[0], first[2]);
        assert_ne!(first[0], first[1]);
        // A failure bans that instance for a while.
        proxy.borrow_mut().report_failure(now, first[0]);
        assert_eq!(proxy.borrow_mut().choose(now, 0)[0].key, first[1]);
        assert_eq!(proxy.borrow_mut().choose(now, 0)[1].key, first[0], "banned one is last resort");
    }
}

#[test]
fn silent_service_is_dropped_and_the_watch_says_so() {
    let (mut w, proxy) = world(42);
    w.run_for(Duration::from_secs(1));
    assert_eq!(keys(&proxy), vec![1, 2]);
    w.nodes[0].frozen = true;
    // Keepalive 5 s, idle timeout 15 s, sweep every second: gone within 17 s.
    w.run_for(Duration::from_secs(17));
    assert_eq!(keys(&proxy), vec![2], "{:#?}", &w.log[w.log.len().saturating_sub(20)..]);
    assert_eq!(w.registry.instance_count(), 2);
    // It thaws, notices its session is gone, reconnects and registers again.
    w.nodes[0].frozen = false;
    w.run_for(Duration::from_secs(30));
    assert_eq!(keys(&proxy), vec![1, 2]);
}

#[test]
fn registry_restart_loses_nothing_that_matters() {
    let (mut w, proxy) = world(7);
    w.run_for(Duration::from_secs(1));
    assert_eq!(keys(&proxy), vec![1, 2]);
    // The registry dies: every stream closes; it comes back empty, same key.
    w.registry = Registry::new(w.registry_key.clone(), RegistryConfig::default());
    for i in 0..w.nodes.len() {
        w.nodes[i].session = None;
        w.nodes[i].client.handle_closed();
    }
    w.settle();
    // The proxy keeps what it knew while the registry is away.
    assert_eq!(keys(&proxy), vec![1, 2]);
    // Within a reconnect delay everyone is back.
    w.run_for(Duration::from_secs(2));
    assert_eq!(w.registry.instance_count(), 3);
    assert_eq!(w.registry.session_count(), 4);
    assert_eq!(keys(&proxy), vec![1, 2]);
    let pushes = w.log.iter().filter(|l| l.starts_with("ProxyClient: Instances")).count();
    assert!(pushes >= 2, "proxy re-watched after the restart");
}

#[test]
fn wrong_registry_key_never_connects() {
    let (mut w, _) = world(3);
    let other = keypair(77).public();
    let config = ClientConfig::new(keypair(4), other);
    let svc = ServiceClient::new(config, vec![Role::parse("x@1.0.0").unwrap()], 1, vec![]);
    w.nodes.push(node(Box::new(svc)));
    let i = w.nodes.len() - 1;
    w.dial(i);
    w.run_for(Duration::from_secs(3));
    let refused = w.log.iter().filter(|l| l.contains("SessionClosed") && l.contains("Decrypt")).count();
    assert!(refused >= 2, "registry refuses every attempt, and the service keeps trying: {:#?}", w.log);
    assert!(!w.log.iter().any(|l| l.contains("Registered(Role(x@")), "never registered");
    assert_eq!(w.registry.instance_count(), 3);
}
