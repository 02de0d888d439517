//! The proxy side of one registry: watches one or more queries (one per
//! role it serves) and keeps the instances last reported for each (across
//! registry reconnects). Choosing among them, over every registry of a set,
//! is [`crate::client::set::SetView`]'s.
//!
//! Invariants: each query's instance set only ever holds instances that
//! match that query, whatever the registry sends. Query `i` is watch id `i`;
//! lookups and meetings count from [`FIRST_REQUEST_ID`], above any watch.
//! Queries can be added and dropped while the session runs
//! ([`ProxyClient::set_slots`]): a dropped query's slot is empty and is the
//! first one a new query takes ([`take_slot`]), so the indices of the
//! others never move and every member of a set numbers them alike. An answer that
//! comes in parts ([`Message::InstancesPart`]s, then the last `Instances`)
//! is reported only once whole, never a part of it; at most one answer is
//! being assembled at a time (the registry sends an answer's parts one after
//! another), and it holds at most [`MAX_ANSWER_INSTANCES`] instances.
//!
//! After a reconnect (a registry that restarted knows nothing until its
//! services come back), the instances known before are kept for
//! [`RECONNECT_GRACE`] beside what the new session reports: clients are not
//! told "no instance" while services are still reconnecting. At the end of
//! the grace the set is what the registry reports, and an instance gone for
//! good is lost then.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::client::control::{ControlEvent, ControlSession};
use crate::client::{ClientConfig, ClientError};
use crate::hello::Capabilities;
use crate::keys::PublicKey;
use crate::meet::Ticket;
use crate::message::{ErrorCode, Instance, MAX_ANSWER_INSTANCES, Message};
use crate::role::{Role, RoleQuery};

/// What a proxy client reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyEvent {
    /// The control session is open (the watch follows).
    Connected,
    /// The set of instances matching one query, whenever the registry reports it.
    Instances {
        /// Which query (its index in the order given).
        query: usize,
        /// The new set, oldest registration first.
        instances: Vec<Instance>,
        /// More matched than the registry sent.
        truncated: bool,
    },
    /// The answer to a [`ProxyClient::lookup`].
    LookupResult {
        /// The lookup's id.
        id: u32,
        /// What matched.
        instances: Vec<Instance>,
        /// More matched than the registry sent.
        truncated: bool,
    },
    /// The registry refused a request.
    Refused {
        /// The request's id.
        id: u32,
        /// Why.
        code: ErrorCode,
        /// Why, for people.
        text: String,
    },
    /// The answer to a [`ProxyClient::meet`]: connect with `ticket`.
    MeetReady {
        /// The request's id.
        id: u32,
        /// What admits the meet connection.
        ticket: Ticket,
    },
    /// The registry refused a [`ProxyClient::meet`], or the session ended
    /// before it answered.
    MeetRefused {
        /// The request's id.
        id: u32,
        /// Why, for people.
        text: String,
    },
    /// The session ended; reconnect after a backoff. Known instances stay.
    Disconnected(ClientError),
}

/// How long after a reconnect the instances known before are kept beside
/// what the new session reports: longer than a service takes to come back
/// to a registry that restarted (its backoff is capped at 2 s).
pub const RECONNECT_GRACE: Duration = Duration::from_secs(5);

/// Most meetings a proxy asks for at once (the registry has its own cap).
pub const MAX_PENDING_MEETS: usize = 64;

/// The id of the first lookup or meeting: watch ids (query slots) stay below it.
pub const FIRST_REQUEST_ID: u32 = 1 << 31;

/// Most query slots: a watch id is the slot in its low 16 bits and the
/// slot's generation (how many queries it held before) in the 15 above, so
/// an answer still on its way for a query a slot held before is told apart
/// from one for the query it holds now.
pub const MAX_SLOTS: usize = 1 << 16;

/// The watch id of slot `index` in generation `generation`.
fn watch_id(index: usize, generation: u16) -> u32 {
    (u32::from(generation & 0x7fff) << 16) | (index as u32 & 0xffff)
}

/// The slot and generation a watch id names (`None` for a lookup's or a
/// meeting's id).
pub fn watch_slot(id: u32) -> Option<(usize, u16)> {
    (id < FIRST_REQUEST_ID).then_some(((id & 0xffff) as usize, (id >> 16) as u16))
}

/// One query the proxy serves: what it asks and what matched last.
struct Watched {
    query: RoleQuery,
    /// What connections choose from: the registry's last answer, and
    /// during a grace the instances known before it too.
    instances: Vec<Instance>,
    /// During a grace: what was known when it began, kept beside answers.
    before: Vec<Instance>,
    /// During a grace: the registry's last answer alone, applied when the
    /// grace ends.
    reported: Option<(Vec<Instance>, bool)>,
    /// A session has answered it (with no instance, perhaps), or refused it.
    answered: bool,
    /// Why the registry refused it, if it did.
    refused: Option<String>,
    /// Which query of its slot this is (see [`MAX_SLOTS`]).
    generation: u16,
}

impl Watched {
    fn new(query: RoleQuery, generation: u16) -> Watched {
        Watched {
            query,
            instances: Vec::new(),
            before: Vec::new(),
            reported: None,
            answered: false,
            refused: None,
            generation,
        }
    }

    fn id(&self, index: usize) -> u32 {
        watch_id(index, self.generation)
    }
}

/// The proxy side; see the module docs.
pub struct ProxyClient {
    control_session: ControlSession,
    /// One slot per query index; `None` for a dropped query.
    watched: Vec<Option<Watched>>,
    /// Per slot, the generation of its next query.
    generations: Vec<u16>,
    next_lookup: u32,
    /// Meet requests the registry has not answered yet.
    meets: HashSet<u32>,
    /// The answer being assembled from parts, if any (boxed: rare, and
    /// the client is moved around whole).
    partial: Option<Box<Partial>>,
    /// Until when the instances known before a reconnect are kept.
    grace_until: Option<Instant>,
    events: VecDeque<ProxyEvent>,
}

/// The parts of one answer received so far.
struct Partial {
    id: u32,
    instances: Vec<Instance>,
    /// More came than [`MAX_ANSWER_INSTANCES`]: the rest was let go.
    cut: bool,
}

impl ProxyClient {
    /// A proxy for `query`.
    pub fn new(config: ClientConfig, query: RoleQuery) -> ProxyClient {
        ProxyClient::with_queries(config, vec![query])
    }

    /// A proxy for several queries at once (one per role it serves), over
    /// one control session.
    pub fn with_queries(config: ClientConfig, queries: Vec<RoleQuery>) -> ProxyClient {
        ProxyClient::with_slots(config, queries.into_iter().map(Some).collect())
    }

    /// A proxy whose query `i` is `slots[i]`, an empty slot for `None` (a
    /// query dropped before this client was made: new members of a set are
    /// made with the slots the others have).
    pub fn with_slots(config: ClientConfig, slots: Vec<Option<RoleQuery>>) -> ProxyClient {
        ProxyClient {
            control_session: ControlSession::new(config),
            next_lookup: FIRST_REQUEST_ID,
            generations: vec![1; slots.len()],
            watched: slots.into_iter().map(|q| q.map(|q| Watched::new(q, 0))).collect(),
            meets: HashSet::new(),
            partial: None,
            grace_until: None,
            events: VecDeque::new(),
        }
    }

    /// Asks the registry once for `query`; the answer comes as
    /// [`ProxyEvent::LookupResult`] with the returned id. `None` when not connected.
    pub fn lookup(&mut self, query: RoleQuery) -> Option<u32> {
        if !self.control_session.is_established() {
            return None;
        }
        let id = self.next_request_id();
        self.control_session.send(&Message::Lookup { id, query });
        Some(id)
    }

    /// Asks the registry to arrange a meeting with the process of `service`
    /// that registered `role` ([`crate::meet`]); the answer comes as
    /// [`ProxyEvent::MeetReady`] or [`ProxyEvent::MeetRefused`] with the
    /// returned id. `None` when not connected, when the registry cannot
    /// meet, or with [`MAX_PENDING_MEETS`] unanswered.
    pub fn meet(&mut self, service: PublicKey, role: Role) -> Option<u32> {
        let can_meet = self.control_session.remote_capabilities().contains(Capabilities::MEET);
        if !self.control_session.is_established() || !can_meet || self.meets.len() >= MAX_PENDING_MEETS {
            return None;
        }
        let id = self.next_request_id();
        self.meets.insert(id);
        self.control_session.send(&Message::Meet { id, service, role });
        Some(id)
    }

    fn next_request_id(&mut self) -> u32 {
        let id = self.next_lookup;
        self.next_lookup = self.next_lookup.checked_add(1).unwrap_or(FIRST_REQUEST_ID);
        id
    }

    /// Makes the queries `slots` (index `i` is watch `i`; `None`: no
    /// query there): a query that changed is unwatched and watched anew at
    /// once if the session is open, else with the others when it opens; an
    /// unchanged one keeps what it found. The indices of the others never
    /// move, so a proxy gives every member of a set the same list (kept with
    /// [`take_slot`] and [`free_slot`]) and they number their queries alike.
    /// Slots past [`MAX_SLOTS`] are ignored.
    pub fn set_slots(&mut self, slots: &[Option<RoleQuery>]) {
        let slots = slots.get(..MAX_SLOTS).unwrap_or(slots);
        let open = self.control_session.is_established();
        if self.generations.len() < slots.len() {
            self.generations.resize(slots.len(), 0);
        }
        for index in 0..slots.len().max(self.watched.len()) {
            let wanted = slots.get(index).cloned().flatten();
            let held = self.watched.get(index).and_then(Option::as_ref);
            if held.map(|w| &w.query) == wanted.as_ref() {
                continue;
            }
            if open && let Some(held) = held {
                self.control_session.send(&Message::Unwatch { id: held.id(index) });
            }
            let new = wanted.map(|query| {
                let generation = self.generations.get_mut(index).map_or(0, |g| {
                    let now = *g;
                    *g = g.wrapping_add(1) & 0x7fff;
                    now
                });
                Watched::new(query, generation)
            });
            if open && let Some(new) = &new {
                self.control_session.send(&Message::Watch { id: new.id(index), query: new.query.clone() });
            }
            if index >= self.watched.len() {
                self.watched.resize_with(index + 1, || None);
            }
            if let Some(slot) = self.watched.get_mut(index) {
                *slot = new;
            }
        }
        self.watched.truncate(slots.len());
    }

    /// The queries' slots, in index order (`None`: dropped).
    pub fn slots(&self) -> impl Iterator<Item = Option<&RoleQuery>> {
        self.watched.iter().map(|w| w.as_ref().map(|w| &w.query))
    }

    /// The queries served, in index order, dropped ones left out.
    pub fn queries(&self) -> impl Iterator<Item = &RoleQuery> {
        self.watched.iter().flatten().map(|w| &w.query)
    }

    /// Whether a session has answered query `index` (possibly with
    /// nothing), or the registry refused it.
    pub fn is_answered(&self, index: usize) -> bool {
        self.watched.get(index).and_then(Option::as_ref).is_some_and(|w| w.answered)
    }

    /// Why the registry refused query `index`, if it did.
    pub fn refusal(&self, index: usize) -> Option<&str> {
        self.watched.get(index).and_then(Option::as_ref).and_then(|w| w.refused.as_deref())
    }

    /// The instances last reported for the first query (kept across
    /// registry reconnects).
    pub fn instances(&self) -> &[Instance] {
        self.instances_of(0)
    }

    /// The instances last reported for query `query`.
    pub fn instances_of(&self, query: usize) -> &[Instance] {
        self.watched.get(query).and_then(Option::as_ref).map_or(&[], |w| w.instances.as_slice())
    }

    /// The instances last reported for every query, each once.
    pub fn all_instances(&self) -> Vec<Instance> {
        let mut all: Vec<Instance> = Vec::new();
        for instance in self.watched.iter().flatten().flat_map(|w| &w.instances) {
            if !all.contains(instance) {
                all.push(instance.clone());
            }
        }
        all
    }

    /// Whether an instance of `key` with `role` is among those last
    /// reported for any query.
    pub fn lists(&self, key: &PublicKey, role: &Role) -> bool {
        self.watched.iter().flatten().flat_map(|w| &w.instances).any(|i| i.key == *key && i.role == *role)
    }

    /// Adds a part of answer `id`; a part of another answer than the one
    /// under way means that one was abandoned (its session cannot carry
    /// both at once), so it starts afresh.
    fn add_part(&mut self, id: u32, instances: Vec<Instance>) {
        let partial = match &mut self.partial {
            Some(p) if p.id == id => p,
            other => other.insert(Box::new(Partial { id, instances: Vec::new(), cut: false })),
        };
        let room = MAX_ANSWER_INSTANCES.saturating_sub(partial.instances.len());
        partial.cut |= instances.len() > room;
        partial.instances.extend(instances.into_iter().take(room));
    }

    /// Answer `id`'s last part: with the parts before it, the whole set.
    fn assemble(&mut self, id: u32, last: Vec<Instance>, truncated: bool) -> (Vec<Instance>, bool) {
        match self.partial.take() {
            Some(p) if p.id == id => {
                let mut all = p.instances;
                let room = MAX_ANSWER_INSTANCES.saturating_sub(all.len());
                let cut = p.cut || last.len() > room;
                all.extend(last.into_iter().take(room));
                (all, truncated || cut)
            }
            _ => (last, truncated),
        }
    }

    fn handle_message(&mut self, msg: Message) {
        let msg = match msg {
            Message::InstancesPart { id, instances } => {
                self.add_part(id, instances);
                return;
            }
            Message::Instances { id, instances, truncated } => {
                let (instances, truncated) = self.assemble(id, instances, truncated);
                Message::Instances { id, instances, truncated }
            }
            other => other,
        };
        match msg {
            Message::Instances { id, instances, truncated } if id < FIRST_REQUEST_ID => {
                // A watch dropped or replaced since: its answer is nobody's.
                let Some((query, watched)) = current(&mut self.watched, id) else { return };
                watched.answered = true;
                watched.refused = None;
                // Only what we asked for: a confused registry cannot steer us elsewhere.
                let mut instances: Vec<Instance> =
                    instances.into_iter().filter(|i| watched.query.matches(&i.role)).collect();
                if self.grace_until.is_some() {
                    // What was known before the reconnect, beside the answer
                    // until the grace ends (at most twice an answer's cap).
                    watched.reported = Some((instances.clone(), truncated));
                    let answered: HashSet<(PublicKey, &Role)> =
                        instances.iter().map(|i| (i.key, &i.role)).collect();
                    let kept: Vec<Instance> = watched
                        .before
                        .iter()
                        .filter(|i| !answered.contains(&(i.key, &i.role)))
                        .cloned()
                        .collect();
                    instances.extend(kept);
                }
                watched.instances.clone_from(&instances);
                self.events.push_back(ProxyEvent::Instances { query, instances, truncated });
            }
            Message::Instances { id, instances, truncated } => {
                self.events.push_back(ProxyEvent::LookupResult { id, instances, truncated });
            }
            Message::MeetReady { id, ticket } if self.meets.remove(&id) => {
                self.events.push_back(ProxyEvent::MeetReady { id, ticket });
            }
            // An answer to a meeting given up on (the session ended) is old news.
            Message::MeetReady { .. } => {}
            Message::Error { id: Some(id), text, .. } if self.meets.remove(&id) => {
                self.events.push_back(ProxyEvent::MeetRefused { id, text });
            }
            Message::Error { id: Some(id), code, text } => {
                let watch = current(&mut self.watched, id);
                let for_old_watch = watch.is_none() && id < FIRST_REQUEST_ID;
                if let Some((_, watched)) = watch {
                    // Refused is answered: nobody waits for more.
                    watched.answered = true;
                    watched.refused = Some(text.clone());
                }
                // A watch the registry no longer grants (its ACL was reloaded
                // without us): what it found is no longer ours to use.
                if code == ErrorCode::FORBIDDEN
                    && let Some((query, watched)) = current(&mut self.watched, id)
                    && !watched.instances.is_empty()
                {
                    watched.instances.clear();
                    watched.before.clear();
                    watched.reported = None;
                    self.events.push_back(ProxyEvent::Instances {
                        query,
                        instances: Vec::new(),
                        truncated: false,
                    });
                }
                // A refusal of a query the slot no longer holds is old news.
                if !for_old_watch {
                    self.events.push_back(ProxyEvent::Refused { id, code, text });
                }
            }
            other => self.control_session.fail(ClientError::Unexpected(other.kind())),
        }
    }

    /// A proxy reports no addresses: where its control session comes from
    /// does not matter to it.
    fn on_local_addr(&mut self, _local: std::net::SocketAddr) {}

    /// The end of the grace after a reconnect, if one is running.
    fn deadline(&self) -> Option<Instant> {
        self.grace_until
    }

    /// The grace ended: each query's set is what the registry reported.
    fn on_deadline(&mut self, _now: Instant) {
        self.grace_until = None;
        for (query, watched) in self.watched.iter_mut().enumerate() {
            let Some(watched) = watched else { continue };
            watched.before = Vec::new();
            // A query the new session has not answered yet keeps what it had.
            let Some((reported, truncated)) = watched.reported.take() else { continue };
            if reported != watched.instances {
                watched.instances.clone_from(&reported);
                self.events.push_back(ProxyEvent::Instances { query, instances: reported, truncated });
            }
        }
    }

    /// Interprets one event of the control session.
    fn on_control_event(&mut self, event: ControlEvent) {
        match event {
            ControlEvent::Opened { at } => {
                self.events.push_back(ProxyEvent::Connected);
                // A reconnect: what was known stays for a while (module docs).
                if self.watched.iter().flatten().any(|w| !w.instances.is_empty()) {
                    self.grace_until = Some(at + RECONNECT_GRACE);
                    for watched in self.watched.iter_mut().flatten() {
                        watched.before.clone_from(&watched.instances);
                        watched.reported = None;
                    }
                }
                for (index, watched) in self.watched.iter_mut().enumerate() {
                    let Some(watched) = watched else { continue };
                    // A new session asks anew; a refusal was the old one's.
                    watched.refused = None;
                    watched.answered = false;
                    let id = watched.id(index);
                    self.control_session.send(&Message::Watch { id, query: watched.query.clone() });
                }
            }
            ControlEvent::Message(msg) => self.handle_message(msg),
            ControlEvent::Closed(reason) => {
                // Half an answer is no answer: the next session sends it whole.
                self.partial = None;
                // A grace belongs to its session: the next one starts its
                // own from what is known now.
                self.grace_until = None;
                for watched in self.watched.iter_mut().flatten() {
                    watched.before = Vec::new();
                    watched.reported = None;
                }
                // Unanswered meetings will not be answered on a new session.
                for id in std::mem::take(&mut self.meets) {
                    self.events.push_back(ProxyEvent::MeetRefused { id, text: reason.to_string() });
                }
                self.events.push_back(ProxyEvent::Disconnected(reason));
            }
        }
    }
}

/// The slot and query a watch with id `id` is for, if that query is the
/// one its slot holds now.
fn current(watched: &mut [Option<Watched>], id: u32) -> Option<(usize, &mut Watched)> {
    let (index, generation) = watch_slot(id)?;
    let held = watched.get_mut(index)?.as_mut()?;
    (held.generation == generation).then_some((index, held))
}

/// Puts `value` in the first empty slot of `slots`, else after the last;
/// returns its index (`None` with every watch id taken). One rule for a
/// client's watches and for whoever keeps a copy of their slots, so the
/// indices agree.
pub fn take_slot<T>(slots: &mut Vec<Option<T>>, value: T) -> Option<usize> {
    let index = slots.iter().position(Option::is_none).unwrap_or(slots.len());
    if index >= MAX_SLOTS {
        return None;
    }
    if index == slots.len() {
        slots.push(None);
    }
    *slots.get_mut(index)? = Some(value);
    Some(index)
}

/// Empties slot `index` of `slots` and returns what it held; trailing empty
/// slots go, so the list does not only grow.
pub fn free_slot<T>(slots: &mut Vec<Option<T>>, index: usize) -> Option<T> {
    let value = slots.get_mut(index)?.take();
    while slots.last().is_some_and(Option::is_none) {
        slots.pop();
    }
    value
}

registry_client!(ProxyClient, ProxyEvent);

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::client::RegistryClient;
    use crate::hello::Intent;
    use crate::role::Role;
    use crate::session::Session;
    use crate::testing::keypair;

    /// The watch of the proxy's first (here, only) query.
    const WATCH_ID: u32 = 0;

    /// A proxy client whose session to a hand-driven registry session is open.
    fn open_proxy() -> (ProxyClient, Session, Instant) {
        let now = Instant::now();
        let config = ClientConfig::new(keypair(2), keypair(1).public());
        let mut proxy = ProxyClient::new(config, RoleQuery::parse("db").unwrap());
        proxy.connect(now, [3; 32]).unwrap();
        let mut registry =
            Session::respond(now, &keypair(1), Intent::Control, [4; 32], Duration::from_secs(5)).unwrap();
        let mut wire = Vec::new();
        proxy.poll_transmit(&mut wire);
        registry.handle_input(now, &wire).unwrap();
        (proxy, registry, now)
    }

    /// Delivers `msgs` from the registry; returns the proxy's events.
    fn deliver(
        proxy: &mut ProxyClient,
        registry: &mut Session,
        now: Instant,
        msgs: &[Message],
    ) -> Vec<ProxyEvent> {
        for msg in msgs {
            let mut plain = Vec::new();
            msg.encode(&mut plain).unwrap();
            registry.send(&plain).unwrap();
        }
        let mut wire = Vec::new();
        registry.poll_transmit(&mut wire);
        proxy.handle_input(now, &wire);
        std::iter::from_fn(|| proxy.poll_event()).filter(|e| !matches!(e, ProxyEvent::Connected)).collect()
    }

    fn instances(from: u8, count: u8) -> Vec<Instance> {
        (from..from + count)
            .map(|n| Instance {
                key: keypair(n).public(),
                role: Role::parse("db@1.0.0").unwrap(),
                addrs: vec!["127.0.0.1:1".parse().unwrap()],
            })
            .collect()
    }

    #[test]
    fn parts_are_reported_only_once_whole() {
        let (mut proxy, mut registry, now) = open_proxy();
        let part = Message::InstancesPart { id: WATCH_ID, instances: instances(10, 3) };
        assert_eq!(deliver(&mut proxy, &mut registry, now, &[part.clone(), part.clone()]), vec![]);
        assert!(proxy.instances().is_empty(), "nothing acted on before the last part");
        let last = Message::Instances { id: WATCH_ID, instances: instances(20, 2), truncated: false };
        let events = deliver(&mut proxy, &mut registry, now, &[last]);
        let [ProxyEvent::Instances { query: 0, instances: got, truncated: false }] = events.as_slice() else {
            panic!("{events:?}")
        };
        assert_eq!(got.len(), 8);
        assert_eq!(got[6].key, keypair(20).public(), "in order: parts, then the last");

        // Parts of an answer given up on are not mixed into the next one.
        let stale = Message::InstancesPart { id: 5, instances: instances(30, 4) };
        let fresh = Message::Instances { id: WATCH_ID, instances: instances(40, 1), truncated: false };
        let events = deliver(&mut proxy, &mut registry, now, &[stale, fresh]);
        assert!(
            matches!(&events[..], [ProxyEvent::Instances { instances, .. }] if instances.len() == 1),
            "{events:?}"
        );

        // A part cut off by the end of the session is dropped with it.
        let part = Message::InstancesPart { id: WATCH_ID, instances: instances(50, 2) };
        deliver(&mut proxy, &mut registry, now, &[part]);
        proxy.handle_closed();
        assert!(proxy.partial.is_none());
    }

    #[test]
    fn queries_come_and_go_without_moving_the_others() {
        let (mut proxy, mut registry, now) = open_proxy();
        let q = |text: &str| RoleQuery::parse(text).unwrap();
        let mut slots = vec![Some(q("db"))];
        let second = take_slot(&mut slots, q("db@1")).unwrap();
        let third = take_slot(&mut slots, q("db@^1.0.0")).unwrap();
        assert_eq!((second, third), (1, 2));
        proxy.set_slots(&slots);
        assert!(!proxy.is_answered(second));
        let answer = |id| Message::Instances { id, instances: instances(10, 2), truncated: false };
        let events = deliver(&mut proxy, &mut registry, now, &[answer(0), answer(1)]);
        assert!(matches!(&events[..], [_, ProxyEvent::Instances { query: 1, .. }]), "{events:?}");
        assert!(proxy.is_answered(second) && !proxy.is_answered(third));

        assert_eq!(free_slot(&mut slots, second), Some(q("db@1")));
        proxy.set_slots(&slots);
        assert!(proxy.instances_of(second).is_empty());
        assert_eq!(proxy.instances_of(0).len(), 2, "an unchanged query keeps what it found");
        assert_eq!(proxy.slots().count(), 3, "the third keeps its index");
        // A late answer to the dropped watch is nobody's.
        assert_eq!(deliver(&mut proxy, &mut registry, now, &[answer(1)]), vec![]);
        // Its slot is the next one taken; a lookup's id is above every watch.
        assert_eq!(take_slot(&mut slots, q("other")), Some(1));
        proxy.set_slots(&slots);
        assert_eq!(proxy.queries().count(), 3);
        // An answer on its way for the slot's old query is not the new one's.
        assert_eq!(deliver(&mut proxy, &mut registry, now, &[answer(1)]), vec![]);
        assert!(!proxy.is_answered(1));
        let refused = Message::Error { id: Some(1), code: ErrorCode::LIMIT, text: "old".into() };
        assert_eq!(deliver(&mut proxy, &mut registry, now, &[refused]), vec![]);
        let new_id = 1 | (1 << 16);
        assert_eq!(watch_slot(new_id), Some((1, 1)));
        let refused = Message::Error { id: Some(new_id), code: ErrorCode::LIMIT, text: "too many".into() };
        deliver(&mut proxy, &mut registry, now, &[refused]);
        assert!(proxy.is_answered(1), "a refusal is an answer: nobody waits");
        assert_eq!(proxy.refusal(1), Some("too many"));
        assert!(proxy.lookup(q("db")).unwrap() >= FIRST_REQUEST_ID);
        // Dropping the last ones shrinks the list.
        free_slot(&mut slots, 2);
        free_slot(&mut slots, 1);
        assert_eq!(slots.len(), 1);
        proxy.set_slots(&slots);
        assert_eq!(proxy.slots().count(), 1);
        assert_eq!(proxy.instances_of(0).len(), 2);
    }

    #[test]
    fn a_watch_forbidden_later_forgets_what_it_found() {
        let (mut proxy, mut registry, now) = open_proxy();
        let found = Message::Instances { id: WATCH_ID, instances: instances(10, 2), truncated: false };
        deliver(&mut proxy, &mut registry, now, &[found]);
        assert_eq!(proxy.instances().len(), 2);

        // A refusal of another kind (a limit) leaves the last answer in use.
        let busy = Message::Error { id: Some(WATCH_ID), code: ErrorCode::LIMIT, text: "busy".into() };
        let events = deliver(&mut proxy, &mut registry, now, &[busy]);
        assert!(matches!(&events[..], [ProxyEvent::Refused { code: ErrorCode::LIMIT, .. }]), "{events:?}");
        assert_eq!(proxy.instances().len(), 2);

        let revoked = Message::Error { id: Some(WATCH_ID), code: ErrorCode::FORBIDDEN, text: "no".into() };
        let events = deliver(&mut proxy, &mut registry, now, &[revoked]);
        let [ProxyEvent::Instances { query: 0, instances: left, .. }, ProxyEvent::Refused { .. }] =
            &events[..]
        else {
            panic!("{events:?}")
        };
        assert!(left.is_empty());
        assert!(proxy.instances().is_empty());
    }

    #[test]
    fn an_answer_in_parts_is_held_to_the_answer_cap() {
        let (mut proxy, mut registry, now) = open_proxy();
        let part = Message::InstancesPart { id: WATCH_ID, instances: instances(1, 200) };
        let rounds = MAX_ANSWER_INSTANCES / 200 + 2;
        for _ in 0..rounds {
            deliver(&mut proxy, &mut registry, now, std::slice::from_ref(&part));
        }
        assert_eq!(proxy.partial.as_ref().unwrap().instances.len(), MAX_ANSWER_INSTANCES);
        let last = Message::Instances { id: WATCH_ID, instances: instances(1, 1), truncated: false };
        let events = deliver(&mut proxy, &mut registry, now, &[last]);
        let [ProxyEvent::Instances { query: 0, instances: got, truncated: true }] = events.as_slice() else {
            panic!("{events:?}")
        };
        assert_eq!(got.len(), MAX_ANSWER_INSTANCES);
    }

    #[test]
    fn known_instances_stay_through_a_reconnect_until_the_grace_ends() {
        let (mut proxy, mut registry, now) = open_proxy();
        let known = instances(10, 2);
        deliver(
            &mut proxy,
            &mut registry,
            now,
            &[Message::Instances { id: WATCH_ID, instances: known.clone(), truncated: false }],
        );
        assert_eq!(proxy.instances(), known);
        // The registry restarts: a new session, which knows nothing yet.
        let later = now + Duration::from_secs(1);
        let mut registry = reconnect(&mut proxy, later);
        let empty = Message::Instances { id: WATCH_ID, instances: vec![], truncated: false };
        let events = deliver(&mut proxy, &mut registry, later, &[empty]);
        assert_eq!(
            events,
            vec![ProxyEvent::Instances { query: 0, instances: known.clone(), truncated: false }]
        );
        assert_eq!(proxy.instances(), known, "kept while services come back");
        // One service is back; the other never comes.
        let back = vec![known[1].clone()];
        deliver(
            &mut proxy,
            &mut registry,
            later,
            &[Message::Instances { id: WATCH_ID, instances: back.clone(), truncated: false }],
        );
        assert_eq!(proxy.instances().len(), 2);
        let end = later + RECONNECT_GRACE;
        assert!(proxy.poll_timeout().is_some_and(|t| t <= end));
        proxy.handle_timeout(end);
        let events: Vec<ProxyEvent> = std::iter::from_fn(|| proxy.poll_event()).collect();
        assert_eq!(
            events,
            vec![ProxyEvent::Instances { query: 0, instances: back.clone(), truncated: false }]
        );
        assert_eq!(proxy.instances(), back, "what the registry reports, once the grace is over");
        // Later answers apply at once again.
        deliver(
            &mut proxy,
            &mut registry,
            end,
            &[Message::Instances { id: WATCH_ID, instances: vec![], truncated: false }],
        );
        assert!(proxy.instances().is_empty());
    }

    /// The session ends and a new one starts at `at` (its registry's end of
    /// it, whose handshake reply goes with the next `deliver`).
    fn reconnect(proxy: &mut ProxyClient, at: Instant) -> Session {
        proxy.handle_closed();
        while proxy.poll_event().is_some() {}
        proxy.connect(at, [5; 32]).unwrap();
        let mut registry =
            Session::respond(at, &keypair(1), Intent::Control, [6; 32], Duration::from_secs(5)).unwrap();
        let mut wire = Vec::new();
        proxy.poll_transmit(&mut wire);
        registry.handle_input(at, &wire).unwrap();
        registry
    }

    #[test]
    fn a_grace_ends_with_its_session_and_the_next_keeps_what_is_known() {
        let (mut proxy, mut registry, now) = open_proxy();
        let known = instances(10, 2);
        let answer =
            |instances: Vec<Instance>| Message::Instances { id: WATCH_ID, instances, truncated: false };
        deliver(&mut proxy, &mut registry, now, &[answer(known.clone())]);
        let t1 = now + Duration::from_secs(1);
        let mut registry = reconnect(&mut proxy, t1);
        deliver(&mut proxy, &mut registry, t1, &[answer(vec![])]);
        // That session dies inside its grace: no stale deadline survives it.
        let t2 = t1 + Duration::from_secs(1);
        let mut registry = reconnect(&mut proxy, t2);
        assert_eq!(proxy.instances(), known);
        let events = deliver(&mut proxy, &mut registry, t2, &[answer(vec![])]);
        assert_eq!(
            events,
            vec![ProxyEvent::Instances { query: 0, instances: known.clone(), truncated: false }]
        );
        proxy.handle_timeout(t1 + RECONNECT_GRACE);
        assert_eq!(proxy.instances(), known, "the first grace's end is not this session's");
        proxy.handle_timeout(t2 + RECONNECT_GRACE);
        assert!(proxy.instances().is_empty(), "this session's grace ended");
    }
}
