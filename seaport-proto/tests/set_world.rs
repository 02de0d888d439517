//! A world of one registry *set*: three registries under one key that share
//! nothing, each an in-memory [`Net`] of the shared harness, all on one
//! virtual clock. Four services register with every registry (one
//! `ServiceClient` per registry); the proxy watches on every registry (one
//! `ProxyClient` per registry) and acts on their union, a [`SetView`].
//! A seeded schedule kills registries (a crash: every stream ends, and no
//! dial succeeds until the restart, which comes back empty under the same
//! key), restarts them, stops and starts services, withdraws and restores
//! them, and cuts and heals single service–registry links (so that the
//! registries' lists differ), with 0–20 s of virtual time between events.
//!
//! Checked, the property: once the world has had time to settle,
//! the union holds every instance some live registry lists and nothing that
//! no live registry lists (and each live registry lists exactly the
//! services that are up, available and not cut off from it, so the check is
//! not vacuous). At every step, settled or not: an instance registered with
//! a live registry for the whole span, while the proxy's session to it
//! stayed open, is in the union (no flapping); and while every registry is
//! dead the union keeps what it held when the last one died.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use seaport_proto::client::proxy::RECONNECT_GRACE;
use seaport_proto::client::{
    Backoff, ClientConfig, ProxyClient, ProxyEvent, RegistryClient, ServiceClient, SetView, Strategy,
};
use seaport_proto::keys::Keypair;
use seaport_proto::message::Instance;
use seaport_proto::registry::{OwnedId, Registry, RegistryConfig};
use seaport_proto::role::{Role, RoleQuery};
use seaport_proto::testing::{Chunker, Client, Net, Peer, keypair};

const REGISTRIES: usize = 3;
const SERVICES: usize = 4;
/// The proxy's index in every net, after the services.
const PROXY: usize = SERVICES;
/// Reconnect backoff cap (RECONNECT_GRACE's docs assume 2 s of services).
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// From the last event: every client redials a restarted registry within
/// MAX_BACKOFF, the proxy's grace ends RECONNECT_GRACE later; plus a margin.
const SETTLE: Duration = RECONNECT_GRACE.saturating_add(MAX_BACKOFF).saturating_add(Duration::from_secs(3));
const STEPS: usize = 40;
const SEEDS: u64 = 24;

/// An instance as the properties see it: service number (its key) and role.
type Id = (u8, String);

fn id(i: &Instance) -> Id {
    let n = (1..=SERVICES as u8).find(|n| keypair(*n).public() == i.key).expect("one of our services");
    (n, i.role.to_string())
}

fn role(s: usize) -> String {
    format!("couchdb@3.{s}.0")
}

/// A client of one registry, whatever its kind.
enum Node {
    Service(Client<ServiceClient>),
    Proxy(Client<ProxyClient>),
}

/// `$e` with `$c` bound to whichever client `$node` is.
macro_rules! each {
    ($node:expr, $c:ident => $e:expr) => {
        match $node {
            Node::Service($c) => $e,
            Node::Proxy($c) => $e,
        }
    };
}

impl Peer for Node {
    fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool {
        each!(self, c => c.poll_transmit(buf))
    }
    fn handle_input(&mut self, now: Instant, data: &[u8]) {
        each!(self, c => c.handle_input(now, data))
    }
    fn handle_closed(&mut self) {
        each!(self, c => c.handle_closed())
    }
    fn handle_timeout(&mut self, now: Instant) {
        each!(self, c => c.handle_timeout(now))
    }
    fn poll_timeout(&self) -> Option<Instant> {
        each!(self, c => c.poll_timeout())
    }
    fn take_ended(&mut self) -> bool {
        each!(self, c => c.take_ended())
    }
}

/// Service `s` (key `s + 1`, port 7001 + s) of the set `key`: a fresh process.
fn service(key: &Keypair, s: usize) -> Node {
    let config = ClientConfig::new(keypair(s as u8 + 1), key.public());
    let roles = vec![Role::parse(&role(s)).unwrap()];
    Node::Service(Client::new(ServiceClient::new(config, roles, 7001 + s as u16, vec![])))
}

fn proxy_of(net: &Net<Node>) -> &Client<ProxyClient> {
    let Node::Proxy(c) = &net.peers[PROXY].peer else { unreachable!("the proxy is last") };
    c
}

/// One (registry, client) pair's reconnect schedule.
struct Redial {
    backoff: Backoff,
    at: Option<Instant>,
}

fn redial_at(at: Option<Instant>) -> Redial {
    Redial { backoff: Backoff::new(Duration::from_millis(200), MAX_BACKOFF), at }
}

/// For the no-flap check, of a registry the proxy is connected to at the
/// start of a span: which, how far the proxy's events went, and what the
/// registry held, by registration (session ids are never reused).
type Snapshot = (usize, usize, Vec<(OwnedId, Id)>);

/// How many checks were made that could have failed.
#[derive(Default, Debug)]
struct Coverage {
    settled: usize,
    all_dead: usize,
    steady: usize,
}

struct World {
    key: Keypair,
    query: RoleQuery,
    nets: Vec<Net<Node>>,
    redial: Vec<Vec<Redial>>,
    alive: [bool; REGISTRIES],
    up: [bool; SERVICES],
    available: [bool; SERVICES],
    /// `cut[s][r]`: service `s` cannot reach registry `r` (refused dials).
    cut: [[bool; REGISTRIES]; SERVICES],
    view: SetView,
    /// While every registry is dead: the union just before the last died.
    kept: Option<BTreeSet<Id>>,
    rng: Chunker,
    seed: u64,
    log: Vec<String>,
    cov: Coverage,
}

impl World {
    fn new(seed: u64) -> World {
        let key = keypair(50);
        let query = RoleQuery::parse("couchdb@3.x").unwrap();
        let mut nets: Vec<Net<Node>> = (0..REGISTRIES as u64)
            .map(|r| {
                Net::new(Registry::new(key.clone(), RegistryConfig::default()), Chunker::seeded(seed * 8 + r))
            })
            .collect();
        let now = nets[0].now;
        for net in &mut nets {
            net.now = now; // One clock: each Net starts its own.
            for s in 0..SERVICES {
                net.add(service(&key, s));
            }
            let proxy = ProxyClient::new(ClientConfig::new(keypair(9), key.public()), query.clone());
            net.add(Node::Proxy(Client::new(proxy)));
        }
        World {
            redial: (0..REGISTRIES).map(|_| (0..=PROXY).map(|_| redial_at(Some(now))).collect()).collect(),
            view: SetView::new(1, Strategy::RoundRobin, keypair(9).public(), Duration::from_secs(5)),
            key,
            query,
            nets,
            alive: [true; REGISTRIES],
            up: [true; SERVICES],
            available: [true; SERVICES],
            cut: [[false; REGISTRIES]; SERVICES],
            kept: None,
            rng: Chunker::seeded(seed ^ 0x5e7),
            seed,
            log: Vec::new(),
            cov: Coverage::default(),
        }
    }

    fn now(&self) -> Instant {
        self.nets[0].now
    }

    /// Client `i` dials registry `r`; a dead or cut-off registry refuses, so
    /// it tries again after a backoff.
    fn dial(&mut self, r: usize, i: usize) {
        let (net, redial) = (&mut self.nets[r], &mut self.redial[r][i]);
        if !self.alive[r] || (i < SERVICES && self.cut[i][r]) {
            redial.at = Some(net.now + redial.backoff.next_delay(net.chunker.next_u64()));
            return;
        }
        redial.at = None;
        net.accept(i).expect("registry has room");
        let (now, entropy) = (net.now, net.chunker.entropy());
        each!(&mut net.peers[i].peer, c => c.client.connect(now, entropy)).unwrap();
    }

    /// Delivers every queued byte; schedules a redial for each client whose
    /// session ended (a stopped service is frozen: it does not redial).
    fn settle(&mut self) {
        for (net, redials) in self.nets.iter_mut().zip(&mut self.redial) {
            net.pump();
            for (node, redial) in net.peers.iter().zip(redials) {
                if each!(&node.peer, c => c.client.is_connected()) {
                    redial.backoff.reset();
                }
                if node.session.is_none() && redial.at.is_none() && !node.frozen {
                    redial.at = Some(net.now + redial.backoff.next_delay(net.chunker.next_u64()));
                }
            }
        }
    }

    /// Runs every net until `now + span`, all on the one clock.
    fn run_for(&mut self, span: Duration) {
        let until = self.now() + span;
        for _ in 0..100_000 {
            self.settle();
            let timers = self.nets.iter().filter_map(Net::poll_timeout);
            let redials = self.redial.iter().flatten().filter_map(|d| d.at);
            let Some(next) = timers.chain(redials).min().filter(|t| *t <= until) else {
                self.nets.iter_mut().for_each(|n| n.now = until);
                return;
            };
            let now = self.now().max(next);
            for r in 0..REGISTRIES {
                self.nets[r].now = now;
                let due: Vec<usize> =
                    (0..=PROXY).filter(|i| self.redial[r][*i].at.is_some_and(|t| t <= now)).collect();
                due.into_iter().for_each(|i| self.dial(r, i));
                self.nets[r].advance(now);
            }
        }
        panic!("timers did not converge");
    }

    /// The proxy's union now, computed as a proxy does after any event.
    fn union(&mut self) -> BTreeSet<Id> {
        let members: Vec<&ProxyClient> = self.nets.iter().map(|n| &proxy_of(n).client).collect();
        self.view.update(&members);
        self.view.instances_of(0).iter().map(id).collect()
    }

    /// What registry `r` lists for the proxy's query, by registration.
    fn listed(&self, r: usize) -> Vec<(OwnedId, Id)> {
        let directory = self.nets[r].registry.directory();
        directory.instances().filter(|(_, i)| self.query.matches(&i.role)).map(|(o, i)| (o, id(i))).collect()
    }

    /// Service `s`'s process stops (its sessions end everywhere) or starts afresh.
    fn set_up(&mut self, s: usize, up: bool) {
        let now = self.now();
        for (net, redials) in self.nets.iter_mut().zip(&mut self.redial) {
            net.close(s);
            if up {
                net.peers[s].peer = service(&self.key, s);
            }
            net.peers[s].frozen = !up;
            redials[s] = redial_at(up.then_some(now));
        }
        (self.up[s], self.available[s]) = (up, true);
    }

    fn pick(&mut self, n: usize, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let pool: Vec<usize> = (0..n).filter(|i| ok(*i)).collect();
        let x = self.rng.next_u64() as usize;
        (!pool.is_empty()).then(|| pool[x % pool.len()])
    }

    /// One random event of the schedule; what it was, for the log.
    fn random_event(&mut self) -> String {
        let (alive, up) = (self.alive, self.up);
        let live = alive.iter().filter(|a| **a).count();
        match self.rng.next_u64() % 6 {
            // Keep one alive mostly; one time in four let the last die too.
            0 if live > 1 || self.rng.next_u64().is_multiple_of(4) => {
                let Some(r) = self.pick(REGISTRIES, |r| alive[r]) else { return "-".into() };
                if live == 1 {
                    self.kept = Some(self.union());
                }
                self.alive[r] = false;
                // The proxy first: a crashed registry sends nothing more,
                // not even the updates its services' departures would cause.
                (0..=PROXY).rev().for_each(|i| self.nets[r].close(i));
                format!("kill {r}")
            }
            1 => {
                let Some(r) = self.pick(REGISTRIES, |r| !alive[r]) else { return "-".into() };
                self.nets[r].registry = Registry::new(self.key.clone(), RegistryConfig::default());
                (self.alive[r], self.kept) = (true, None);
                format!("restart {r}")
            }
            2 | 3 => {
                let start = self.rng.next_u64().is_multiple_of(2);
                let Some(s) = self.pick(SERVICES, |s| up[s] != start) else { return "-".into() };
                self.set_up(s, start);
                format!("{} {s}", if start { "start" } else { "stop" })
            }
            4 => {
                let Some(s) = self.pick(SERVICES, |s| up[s]) else { return "-".into() };
                self.available[s] = !self.available[s];
                for net in &mut self.nets {
                    let Node::Service(c) = &mut net.peers[s].peer else { unreachable!() };
                    c.client.set_available(self.available[s]);
                }
                format!("available {s} {}", self.available[s])
            }
            5 => {
                let (s, r) =
                    (self.rng.next_u64() as usize % SERVICES, self.rng.next_u64() as usize % REGISTRIES);
                self.cut[s][r] = !self.cut[s][r];
                if self.cut[s][r] {
                    self.nets[r].close(s);
                }
                format!("cut {s}-{r} {}", self.cut[s][r])
            }
            _ => "-".into(),
        }
    }

    fn snapshot(&self) -> Vec<Snapshot> {
        let connected = |r: &usize| self.alive[*r] && proxy_of(&self.nets[*r]).client.is_connected();
        let snap = |r| (r, proxy_of(&self.nets[r]).events.len(), self.listed(r));
        (0..REGISTRIES).filter(connected).map(snap).collect()
    }

    fn context(&self) -> String {
        let last = &self.log[self.log.len().saturating_sub(8)..];
        let (seed, alive, up, avail, cut) = (self.seed, self.alive, self.up, self.available, self.cut);
        format!("seed {seed}, alive {alive:?}, up {up:?}, avail {avail:?}, cut {cut:?}, last {last:?}")
    }

    /// Settled: the union is exactly what the live registries list, and each
    /// lists exactly the services that are up, available and not cut off from it.
    fn check_settled(&mut self) {
        let union = self.union();
        let live: Vec<usize> = (0..REGISTRIES).filter(|r| self.alive[*r]).collect();
        if live.is_empty() {
            return; // Nothing to compare with: `kept` is checked at every step.
        }
        let listed: BTreeSet<Id> = live.iter().flat_map(|r| self.listed(*r)).map(|(_, i)| i).collect();
        let lost: Vec<&Id> = listed.difference(&union).collect();
        assert!(lost.is_empty(), "lost {lost:?}, which a live registry lists; {}", self.context());
        let stale: Vec<&Id> = union.difference(&listed).collect();
        assert!(stale.is_empty(), "kept {stale:?}, which no live registry lists; {}", self.context());
        for r in live {
            let ok = |s: &usize| self.up[*s] && self.available[*s] && !self.cut[*s][r];
            let expected: BTreeSet<Id> = (0..SERVICES).filter(ok).map(|s| (s as u8 + 1, role(s))).collect();
            let got: BTreeSet<Id> = self.listed(r).into_iter().map(|(_, i)| i).collect();
            assert_eq!(got, expected, "registry {r}, settled; {}", self.context());
        }
        self.cov.settled += 1;
    }

    /// At every step. No flapping: a registration that lasted the span, at a
    /// registry the proxy stayed connected to all along, is in the union.
    /// Events happen only between spans, so a registry alive at the start
    /// was alive all along, and a registration held by the same session at
    /// both ends was not withdrawn in between. And while every registry is
    /// dead, the union keeps what it held when the last one died.
    fn check_step(&mut self, before: &[Snapshot]) {
        let union = self.union();
        for (r, events, held) in before {
            let proxy = proxy_of(&self.nets[*r]);
            let bounced = |e: &ProxyEvent| matches!(e, ProxyEvent::Connected | ProxyEvent::Disconnected(_));
            if proxy.events[*events..].iter().any(bounced) || !proxy.client.is_connected() {
                continue;
            }
            let now = self.listed(*r);
            for (_, id) in held.iter().filter(|h| now.contains(h)) {
                assert!(union.contains(id), "{id:?} flapped, held by {r} all span; {}", self.context());
                self.cov.steady += 1;
            }
        }
        if let Some(kept) = &self.kept {
            let forgot: Vec<&Id> = kept.difference(&union).collect();
            assert!(forgot.is_empty(), "all dead, the union forgot {forgot:?}; {}", self.context());
            self.cov.all_dead += 1;
        }
    }
}

fn run(seed: u64) -> Coverage {
    let mut w = World::new(seed);
    w.run_for(SETTLE);
    w.check_settled();
    for _ in 0..STEPS {
        let event = w.random_event();
        w.settle();
        let before = w.snapshot();
        let span = Duration::from_millis(w.rng.next_u64() % 20_001);
        w.log.push(format!("{event}, {span:?}"));
        w.run_for(span);
        w.check_step(&before);
        if span >= SETTLE {
            w.check_settled();
        }
    }
    w.run_for(SETTLE);
    w.check_settled();
    w.cov
}

#[test]
fn a_registry_set_under_random_deaths_loses_nothing_live_and_keeps_nothing_dead() {
    let runs: Vec<Coverage> = (0..SEEDS).map(run).collect();
    // Every kind of check had something to check.
    assert!(runs.iter().all(|c| c.settled > 1 && c.steady > 0), "{runs:?}");
    assert!(runs.iter().any(|c| c.all_dead > 0), "{runs:?}");
}
