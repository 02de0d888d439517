//! The registry's index: which instances are registered under which role,
//! and which watches want to hear about which role name. No sessions, no
//! bytes, no time: the registry state machine decides who may do what and
//! when; the directory only remembers it and answers queries.
//!
//! Everything is keyed by an owner (the registry's [`SessionId`], opaque
//! here) and the owner's own id for the registration or watch, so removing an
//! owner removes exactly what it made. Invariants: an owner's index and the
//! by-name indexes always agree; no empty entry is kept in either; answers
//! list instances oldest owner first, then by registration id.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::SessionId;
use crate::keys::PublicKey;
use crate::message::{Instance, encode_answer_parts, encode_instances};
use crate::role::{Role, RoleQuery};

/// One registered instance, with its wire encoding made once for all answers.
struct Entry {
    instance: Instance,
    encoded: Vec<u8>,
}

/// Key of one registration or watch: its owner, then the owner's id for it.
pub type OwnedId = (SessionId, u32);

/// What one owner holds, to find it again by the owner's ids.
#[derive(Default)]
struct Owned {
    /// Registration id → role name (the instance lives in `by_name`).
    registrations: HashMap<u32, String>,
    watches: HashMap<u32, RoleQuery>,
}

/// The index of registrations and watches; see the module docs.
#[derive(Default)]
pub struct Directory {
    owners: HashMap<SessionId, Owned>,
    /// Role name → registrations, in key order (oldest owner first).
    by_name: HashMap<String, BTreeMap<OwnedId, Entry>>,
    /// Role name → watches whose query names it.
    watchers: HashMap<String, HashSet<OwnedId>>,
    /// Entries in `by_name`, all names together.
    instances: usize,
}

impl Directory {
    /// An empty directory.
    pub fn new() -> Directory {
        Directory::default()
    }

    /// Registered instances, all owners together.
    pub fn instance_count(&self) -> usize {
        self.instances
    }

    /// How many registrations `owner` holds.
    pub fn registration_count(&self, owner: SessionId) -> usize {
        self.owners.get(&owner).map_or(0, |o| o.registrations.len())
    }

    /// Watches held now, all owners together.
    pub fn watch_total(&self) -> usize {
        self.owners.values().map(|o| o.watches.len()).sum()
    }

    /// Every registered instance with its key, by role name, then in answer
    /// order (read-only; for a status page).
    pub fn instances(&self) -> impl Iterator<Item = (OwnedId, &Instance)> + '_ {
        let mut names: Vec<&String> = self.by_name.keys().collect();
        names.sort_unstable();
        names
            .into_iter()
            .filter_map(|name| self.by_name.get(name))
            .flat_map(|entries| entries.iter().map(|(key, entry)| (*key, &entry.instance)))
    }

    /// How many watches `owner` holds.
    pub fn watch_count(&self, owner: SessionId) -> usize {
        self.owners.get(&owner).map_or(0, |o| o.watches.len())
    }

    /// Whether `owner` holds registration `reg`.
    pub fn has_registration(&self, (owner, reg): OwnedId) -> bool {
        self.owners.get(&owner).is_some_and(|o| o.registrations.contains_key(&reg))
    }

    /// Whether `owner` holds watch `watch`.
    pub fn has_watch(&self, (owner, watch): OwnedId) -> bool {
        self.owners.get(&owner).is_some_and(|o| o.watches.contains_key(&watch))
    }

    /// Adds `instance` as registration `key`, returning the one it replaces.
    pub fn register(&mut self, key: OwnedId, instance: Instance) -> Option<Instance> {
        let name = instance.role.name().to_owned();
        let old_name = self.owners.entry(key.0).or_default().registrations.insert(key.1, name.clone());
        let replaced = old_name.and_then(|old| self.unindex(&old, key));
        let entry = Entry { encoded: instance.encode(), instance };
        self.by_name.entry(name).or_default().insert(key, entry);
        self.instances += 1;
        replaced
    }

    /// Removes registration `key`, returning its instance.
    pub fn unregister(&mut self, key: OwnedId) -> Option<Instance> {
        let owned = self.owners.get_mut(&key.0)?;
        let name = owned.registrations.remove(&key.1)?;
        self.forget_if_empty(key.0);
        self.unindex(&name, key)
    }

    /// Adds or replaces watch `key`.
    pub fn watch(&mut self, key: OwnedId, query: RoleQuery) {
        let name = query.name().to_owned();
        if let Some(old) = self.owners.entry(key.0).or_default().watches.insert(key.1, query) {
            self.unindex_watch(old.name(), key);
        }
        self.watchers.entry(name).or_default().insert(key);
    }

    /// Removes watch `key`; false if there was none.
    pub fn unwatch(&mut self, key: OwnedId) -> bool {
        let Some(query) = self.owners.get_mut(&key.0).and_then(|o| o.watches.remove(&key.1)) else {
            return false;
        };
        self.forget_if_empty(key.0);
        self.unindex_watch(query.name(), key);
        true
    }

    /// Drops every watch of `owner` and returns the ids of its registrations,
    /// in order, for the caller to [`Directory::unregister`] one by one (each
    /// removal is a change watchers hear of).
    pub fn release(&mut self, owner: SessionId) -> Vec<u32> {
        let Some(owned) = self.owners.get_mut(&owner) else { return Vec::new() };
        let watches: Vec<(u32, RoleQuery)> = owned.watches.drain().collect();
        let mut regs: Vec<u32> = owned.registrations.keys().copied().collect();
        regs.sort_unstable();
        for (watch, query) in watches {
            self.unindex_watch(query.name(), (owner, watch));
        }
        self.forget_if_empty(owner);
        regs
    }

    /// The session that registered `role` as `key`, if one did (the oldest
    /// such registration when several processes of one identity did).
    pub fn owner_of(&self, key: &PublicKey, role: &Role) -> Option<SessionId> {
        let entries = self.by_name.get(role.name())?;
        entries
            .iter()
            .find(|(_, e)| e.instance.key == *key && e.instance.role == *role)
            .map(|((owner, _), _)| *owner)
    }

    /// The instances matching `query`, in answer order.
    pub fn matching<'a>(&'a self, query: &'a RoleQuery) -> impl Iterator<Item = &'a Instance> + 'a {
        self.entries(query).map(|e| &e.instance)
    }

    /// The encoded answer to lookup or watch `id` for `query`: with `parts`
    /// the whole set, in as many messages as it takes (up to the caps of
    /// [`encode_answer_parts`]); without, one message cut to what a frame
    /// carries.
    pub fn answer(&self, id: u32, query: &RoleQuery, parts: bool) -> Vec<Vec<u8>> {
        // One past the most an answer carries: enough to say "truncated"
        // without collecting every match of a huge registry.
        let most = crate::message::MAX_ANSWER_INSTANCES + 1;
        let matching: Vec<&[u8]> = self.entries(query).take(most).map(|e| e.encoded.as_slice()).collect();
        if parts {
            return encode_answer_parts(id, &matching);
        }
        let mut plain = Vec::new();
        encode_instances(id, &matching, false, &mut plain);
        vec![plain]
    }

    /// `owner`'s registrations, by id, each with its instance.
    pub fn registrations_of(&self, owner: SessionId) -> Vec<(u32, &Instance)> {
        let Some(owned) = self.owners.get(&owner) else { return Vec::new() };
        let mut regs: Vec<(u32, &Instance)> = owned
            .registrations
            .iter()
            .filter_map(|(reg, name)| Some((*reg, &self.by_name.get(name)?.get(&(owner, *reg))?.instance)))
            .collect();
        regs.sort_unstable_by_key(|(reg, _)| *reg);
        regs
    }

    /// `owner`'s watches, by id, each with its query.
    pub fn watches_of(&self, owner: SessionId) -> Vec<(u32, &RoleQuery)> {
        let Some(owned) = self.owners.get(&owner) else { return Vec::new() };
        let mut watches: Vec<(u32, &RoleQuery)> = owned.watches.iter().map(|(w, q)| (*w, q)).collect();
        watches.sort_unstable_by_key(|(w, _)| *w);
        watches
    }

    /// The query of `owner`'s watch `watch`.
    pub fn watch_query(&self, (owner, watch): OwnedId) -> Option<&RoleQuery> {
        self.owners.get(&owner)?.watches.get(&watch)
    }

    /// The watches that a change of `changed` concerns (their query matches
    /// it), in key order, each with its query.
    pub fn watchers_of(&self, changed: &Role) -> Vec<(OwnedId, &RoleQuery)> {
        let Some(keys) = self.watchers.get(changed.name()) else { return Vec::new() };
        let mut targets: Vec<(OwnedId, &RoleQuery)> = keys
            .iter()
            .filter_map(|key| {
                let query = self.owners.get(&key.0)?.watches.get(&key.1)?;
                query.matches(changed).then_some((*key, query))
            })
            .collect();
        targets.sort_unstable_by_key(|(key, _)| *key);
        targets
    }

    fn entries<'a>(&'a self, query: &'a RoleQuery) -> impl Iterator<Item = &'a Entry> + 'a {
        self.by_name
            .get(query.name())
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter(move |e| query.matches(&e.instance.role))
    }

    fn unindex(&mut self, name: &str, key: OwnedId) -> Option<Instance> {
        let regs = self.by_name.get_mut(name)?;
        let entry = regs.remove(&key)?;
        self.instances = self.instances.saturating_sub(1);
        if regs.is_empty() {
            self.by_name.remove(name);
        }
        Some(entry.instance)
    }

    fn unindex_watch(&mut self, name: &str, key: OwnedId) {
        if let Some(set) = self.watchers.get_mut(name) {
            set.remove(&key);
            if set.is_empty() {
                self.watchers.remove(name);
            }
        }
    }

    fn forget_if_empty(&mut self, owner: SessionId) {
        if self.owners.get(&owner).is_some_and(|o| o.registrations.is_empty() && o.watches.is_empty()) {
            self.owners.remove(&owner);
        }
    }
}
