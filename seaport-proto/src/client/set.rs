//! A proxy's view of a registry set: several registries under one key, each
//! followed by a [`ProxyClient`] of its own (a *member*), whose answers are
//! merged here into one set of instances per query, and ordered for each
//! new connection by the balance strategy.
//!
//! The registries share nothing, so the union is the whole truth:
//! - **One instance through two registries is one instance.** Two reports
//!   are the same instance when key and role are equal and their addresses
//!   meet (a registry adds the address it observed, which can differ
//!   between registries); the merged instance has the addresses of both, in
//!   the order of the members that report it.
//! - **An instance is lost only when no registry lists it any more.** The
//!   union is taken over the members whose session is open. A member whose
//!   session ended says nothing about the present, so what it reported
//!   before is not counted; while *no* member has a session, the last union
//!   stays as it was (as with one registry, a proxy keeps its instances
//!   while the registry is away), and nothing a member knew before its own
//!   session ended comes back.
//! - **An instance keeps its identity while its addresses change.** Which
//!   registries answer decides which addresses the union has; an instance
//!   is the same while key and role are equal and some address stays
//!   ([`is_same_instance`]), so that a proxy reports no departure and keeps
//!   its link when a registry comes or goes.
//! - A member that reconnects keeps what it knew before for its own grace
//!   ([`crate::client::proxy::RECONNECT_GRACE`]), so a restarted registry
//!   that is still being repopulated hides nothing.
//!
//! Invariants: each query's union holds at most [`MAX_MEMBERS`] times a
//! member's cap of instances, every instance at most once; the balance
//! state (turns, bans) belongs to the union, not to a member, so a
//! connection's choice does not depend on which registry answered.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::client::RegistryClient;
use crate::client::balance::{Balancer, Strategy};
use crate::client::proxy::ProxyClient;
use crate::keys::PublicKey;
use crate::message::Instance;

/// Most registries of a set a client follows at once: each costs the client
/// a session and the registry a session per client.
pub const MAX_MEMBERS: usize = 8;

/// One query's union and how connections choose from it.
struct Chosen {
    balancer: Balancer,
    instances: Vec<Instance>,
}

/// The union of a set's answers, per query; see the module docs.
pub struct SetView {
    queries: Vec<Chosen>,
    /// How a query added later balances.
    strategy: Strategy,
    me: PublicKey,
    ban: Duration,
}

impl SetView {
    /// A view for `queries` queries, balanced by `strategy` for the proxy
    /// `me`; a failed instance goes last for `ban`.
    pub fn new(queries: usize, strategy: Strategy, me: PublicKey, ban: Duration) -> SetView {
        let queries = (0..queries)
            .map(|_| Chosen { balancer: Balancer::new(strategy, me, ban), instances: Vec::new() })
            .collect();
        SetView { queries, strategy, me, ban }
    }

    /// Takes each query's union anew from `members` (at most
    /// [`MAX_MEMBERS`] are read); returns the queries whose union changed.
    pub fn update(&mut self, members: &[&ProxyClient]) -> Vec<usize> {
        let members = members.get(..MAX_MEMBERS).unwrap_or(members);
        let connected: Vec<&ProxyClient> = members.iter().copied().filter(|m| m.is_connected()).collect();
        if connected.is_empty() {
            return Vec::new();
        }
        // Queries added since ([`ProxyClient::watch`]) get a union too.
        let slots = members.iter().map(|m| m.slots().count()).max().unwrap_or(0);
        while self.queries.len() < slots {
            let balancer = Balancer::new(self.strategy, self.me, self.ban);
            self.queries.push(Chosen { balancer, instances: Vec::new() });
        }
        let mut changed = Vec::new();
        for (query, chosen) in self.queries.iter_mut().enumerate() {
            let union = union(connected.iter().map(|m| m.instances_of(query)));
            if union != chosen.instances {
                chosen.instances = union;
                changed.push(query);
            }
        }
        changed
    }

    /// Forgets query `query`'s union (its slot was freed), whether or not
    /// a registry is connected to say so.
    pub fn clear(&mut self, query: usize) {
        if let Some(chosen) = self.queries.get_mut(query) {
            chosen.instances.clear();
        }
    }

    /// The union for query `query`.
    pub fn instances_of(&self, query: usize) -> &[Instance] {
        self.queries.get(query).map_or(&[], |c| c.instances.as_slice())
    }

    /// Every query's union, each instance once.
    pub fn all_instances(&self) -> Vec<Instance> {
        union(self.queries.iter().map(|c| c.instances.as_slice()))
    }

    /// The order in which to try instances of query `query` for one new
    /// connection: the strategy's choice first, then the others, instances
    /// banned for a recent failure last. `random` is used by [`Strategy::Random`].
    pub fn choose_for(&mut self, query: usize, now: Instant, random: u64) -> Vec<Instance> {
        self.queries.get_mut(query).map(|c| c.balancer.order(now, random, &c.instances)).unwrap_or_default()
    }

    /// Dialing or handshaking with `key` failed: avoid it for a while, for
    /// every query.
    pub fn report_failure(&mut self, now: Instant, key: PublicKey) {
        for chosen in &mut self.queries {
            chosen.balancer.report_failure(now, key);
        }
    }
}

/// Whether `a` and `b` are one instance seen twice (through two registries,
/// or through one at two times): one key, one role, and an address in
/// common. One identity can run as several processes (one seed on several
/// hosts), each with its own addresses: those are different instances.
pub fn is_same_instance(a: &Instance, b: &Instance) -> bool {
    a.key == b.key && a.role == b.role && a.addrs.iter().any(|x| b.addrs.contains(x))
}

/// The union of `reports`, in order: an instance that meets one already
/// taken (module docs) adds its addresses to it.
fn union<'a>(reports: impl Iterator<Item = &'a [Instance]>) -> Vec<Instance> {
    let mut all: Vec<Instance> = Vec::new();
    // Where each key's instances are in `all`: the union stays linear in
    // the answers' size (thousands of instances, on every change).
    let mut by_key: HashMap<PublicKey, Vec<usize>> = HashMap::new();
    for instance in reports.flatten() {
        let slots = by_key.entry(instance.key).or_default();
        let same = slots.iter().copied().find(|i| all.get(*i).is_some_and(|k| is_same_instance(k, instance)));
        match same.and_then(|i| all.get_mut(i)) {
            Some(known) => {
                for addr in &instance.addrs {
                    if !known.addrs.contains(addr) {
                        known.addrs.push(*addr);
                    }
                }
            }
            None => {
                slots.push(all.len());
                all.push(instance.clone());
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::Role;
    use crate::testing::keypair;

    fn instance(n: u8, addrs: &[&str]) -> Instance {
        Instance {
            key: keypair(n).public(),
            role: Role::parse("db@1.0.0").unwrap(),
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn one_instance_through_two_registries_is_one_instance() {
        let a = [instance(1, &["10.0.0.1:7000"]), instance(2, &["10.0.0.2:7000"])];
        let b = [instance(2, &["10.0.0.2:7000", "192.0.2.2:7000"]), instance(3, &["10.0.0.3:7000"])];
        let all = union([a.as_slice(), b.as_slice()].into_iter());
        assert_eq!(all.len(), 3);
        assert_eq!(all[1].addrs.len(), 2, "the addresses of both reports: {:?}", all[1]);
        // The same key at other addresses is another process of that identity.
        let other = [instance(1, &["10.0.0.9:7000"])];
        assert_eq!(union([a.as_slice(), other.as_slice()].into_iter()).len(), 3);
        // Another role of the same process is another instance.
        let mut web = instance(1, &["10.0.0.1:7000"]);
        web.role = Role::parse("web@1.0.0").unwrap();
        assert_eq!(union([a.as_slice(), std::slice::from_ref(&web)].into_iter()).len(), 3);
    }

    #[test]
    fn a_ban_holds_whichever_registry_reports_the_instance() {
        let mut view = SetView::new(1, Strategy::First, keypair(9).public(), Duration::from_secs(30));
        view.queries[0].instances = vec![instance(1, &["10.0.0.1:7000"]), instance(2, &["10.0.0.2:7000"])];
        let now = Instant::now();
        assert_eq!(view.choose_for(0, now, 0)[0].key, keypair(1).public());
        view.report_failure(now, keypair(1).public());
        assert_eq!(view.choose_for(0, now, 0)[0].key, keypair(2).public());
        assert!(view.choose_for(5, now, 0).is_empty(), "no such query");
    }
}
