//! What the registry holds, as snapshots for the page (`--http`): the times
//! the server learned of sessions and registrations, and the publishing of
//! a [`RegistryView`] after changes, at most every [`VIEW_EVERY`].
//!
//! Invariant: the page reads snapshots, never the state machine; the maps
//! of times hold only what still exists once a snapshot is taken (and at
//! every gauge refresh, for sessions).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use seaport_proto::registry::{Registry, SessionId};
use tokio::sync::watch;

use crate::page::{InstanceView, RegistryView, SessionView};

/// Most often a new [`RegistryView`] is published.
pub const VIEW_EVERY: Duration = Duration::from_millis(250);

/// Times the registry learned of things, for the page.
#[derive(Default)]
pub(super) struct Times {
    /// When each session connected.
    pub(super) sessions: HashMap<SessionId, SystemTime>,
    /// When each registration was first seen.
    registrations: HashMap<(SessionId, u32), SystemTime>,
}

impl Times {
    /// Forgets sessions `registry` no longer has. Every closed session
    /// should have said so; this bounds the map even if one did not.
    pub(super) fn keep_live(&mut self, registry: &Registry) {
        if self.sessions.len() > registry.session_count() {
            let live: HashSet<SessionId> = registry.sessions().map(|(id, _, _)| id).collect();
            self.sessions.retain(|id, _| live.contains(id));
        }
    }
}

/// Where snapshots go, and whether the last one is behind the registry.
pub(super) struct ViewPublisher {
    view: watch::Sender<Arc<RegistryView>>,
    /// Whether the view is behind the registry.
    stale: bool,
    /// When it may be published next.
    next: tokio::time::Instant,
}

impl ViewPublisher {
    pub(super) fn new(view: watch::Sender<Arc<RegistryView>>) -> ViewPublisher {
        ViewPublisher { view, stale: true, next: tokio::time::Instant::now() }
    }

    /// The registry changed.
    pub(super) fn stale(&mut self) {
        self.stale = true;
    }

    /// When the next snapshot is due, if one is.
    pub(super) fn due(&self) -> Option<tokio::time::Instant> {
        self.stale.then_some(self.next)
    }

    /// Publishes what `registry` holds now.
    pub(super) fn publish(&mut self, registry: &Registry, times: &mut Times) {
        // Read apart: a borrow held across send_replace would deadlock.
        let started = self.view.borrow().started;
        self.view.send_replace(Arc::new(snapshot(registry, times, started)));
        self.stale = false;
        self.next = tokio::time::Instant::now() + VIEW_EVERY;
    }
}

/// What `registry` holds now, with the times `times` remembers (and keeps
/// to what still exists).
fn snapshot(registry: &Registry, times: &mut Times, started: SystemTime) -> RegistryView {
    let now = SystemTime::now();
    let directory = registry.directory();
    let mut seen = HashSet::new();
    let instances = directory
        .instances()
        .map(|(owned, instance)| {
            seen.insert(owned);
            InstanceView {
                key: instance.key,
                role: instance.role.clone(),
                addrs: instance.addrs.clone(),
                connected: times.sessions.get(&owned.0).copied(),
                registered: *times.registrations.entry(owned).or_insert(now),
            }
        })
        .collect();
    times.registrations.retain(|owned, _| seen.contains(owned));
    let mut sessions: Vec<SessionView> = registry
        .sessions()
        .map(|(id, key, addr)| SessionView {
            key,
            addr,
            since: times.sessions.get(&id).copied(),
            registrations: directory.registration_count(id),
            watches: directory.watch_count(id),
        })
        .collect();
    sessions.sort_by_key(|s| s.since);
    RegistryView { key: registry.public_key(), started, instances, sessions }
}
