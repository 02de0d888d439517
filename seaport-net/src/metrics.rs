//! The process's metric families (Prometheus, through `prometheus-client`)
//! and its readiness, shared by the registry, the service and the proxy.
//!
//! The families live in one process-wide [`Metrics`] ([`metrics`]), created
//! on first use whether or not `--metrics` serves them: an increment is an
//! atomic add, cheaper than asking whether anyone will read it. Each binary
//! exports only the families it touches, but all are registered, so a
//! dashboard sees zeros rather than gaps.
//!
//! Invariants:
//! - Counters that correspond to stdout events are incremented only where
//!   the events are emitted (the `event` module counts each event it
//!   prints, so this module knows nothing of events): stdout, `--json` and
//!   `/metrics` cannot disagree.
//! - Label values are a fixed set of `&'static str` chosen here, never a
//!   peer's text or key: nothing a peer sends can grow a family.
//! - No metric carries a seed, a key or an address.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry as MetricsRegistry, Unit};

use crate::lock::lock;

/// One label, name and value, both from a fixed set.
pub type Label = Vec<(&'static str, &'static str)>;

/// Every metric family; see the README's "Metrics" section for meanings.
pub struct Metrics {
    registry: MetricsRegistry,
    /// Registry: sessions open now (handshaking ones included).
    pub sessions: Gauge,
    /// Registry: sessions whose handshake completed.
    pub sessions_opened: Counter,
    /// Registry: sessions that ended (after a handshake or not).
    pub sessions_closed: Counter,
    /// Registry: instances registered now; proxy: matching instances known now.
    pub instances: Gauge,
    /// Registry: watches held now.
    pub watches: Gauge,
    /// Registry: lookups and watches answered.
    pub lookups: Counter,
    /// Registrations by `event`: registered, unregistered (registry);
    /// registered, refused, withdrawn (service).
    pub registrations: Family<Label, Counter>,
    /// Proxy: instances that appeared and left.
    pub instance_changes: Family<Label, Counter>,
    /// Service and proxy: control sessions to the registry that ended.
    pub registry_disconnects: Counter,
    /// Service and proxy: 1 while the session with the registry of slot
    /// `member` (0 to 7, as logged at start) is open, else 0.
    pub registry_connected: Family<Label, Gauge>,
    /// Noise handshakes by `result`: ok, failed.
    pub handshakes: Family<Label, Counter>,
    /// Proxy: links opened, by `path`: direct, punched, relayed.
    pub links: Family<Label, Counter>,
    /// Proxy: links open now.
    pub links_open: Gauge,
    /// Service and proxy: resumable links' transports, by `event`: lost
    /// (the link waits for a new one), resumed (it carries on on a new one,
    /// after a loss or a move to a better path).
    pub link_paths: Family<Label, Counter>,
    /// Streams open now.
    pub streams: Gauge,
    /// Streams opened, by `result`: accepted, refused, failed.
    pub streams_opened: Family<Label, Counter>,
    /// Proxy: time from a stream's open request to the service's answer.
    pub stream_open: Histogram,
    /// Stream payload bytes by `direction`: sent (local socket → link),
    /// received (link → local socket).
    pub stream_bytes: Family<Label, Counter>,
    /// `stream_bytes{direction="sent"}`, looked up once: it is counted per frame.
    pub stream_sent: Counter,
    /// `stream_bytes{direction="received"}`, looked up once.
    pub stream_received: Counter,
    /// Registry: relays open now.
    pub relays: Gauge,
    /// Registry: relays ever opened.
    pub relays_opened: Counter,
    /// Registry: relayed bytes by `direction`: to_service, to_proxy.
    pub relayed_bytes: Family<Label, Counter>,
    /// Hole punching attempts by `result`: punched, failed.
    pub punches: Family<Label, Counter>,
    /// Refusals by `reason` (see [`Refusal`]).
    pub refusals: Family<Label, Counter>,
    /// Service and proxy: UDP flows open now (proxy: client addresses
    /// served; service: sockets toward the backend).
    pub udp_flows: Gauge,
    /// Service and proxy: UDP flows ever opened.
    pub udp_flows_opened: Counter,
    /// Datagrams by `direction`: sent (local socket → link), received
    /// (link → local socket).
    pub datagrams: Family<Label, Counter>,
    /// Datagrams dropped, by `reason` (see [`DatagramDrop`]).
    pub datagrams_dropped: Family<Label, Counter>,
}

/// Why a datagram was dropped: the `reason` label of
/// `seaport_datagrams_dropped_total`. UDP may lose datagrams; these say
/// where and why seaport did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramDrop {
    /// The link's queue was full (the path carries less than comes in):
    /// its oldest datagram made room for the new one.
    QueueFull,
    /// Above the largest datagram a link carries (65,507 bytes).
    TooLarge,
    /// No flow could take it: beyond `--max-flows`, or no instance.
    FlowLimit,
    /// The link was between paths, or ended.
    NoPath,
    /// The local UDP socket's send buffer was full.
    SocketFull,
    /// For a flow this end does not know (it ended here), or a datagram
    /// sent to a service that forwards TCP.
    NoFlow,
}

impl DatagramDrop {
    /// Every reason.
    pub const ALL: [DatagramDrop; 6] = [
        DatagramDrop::QueueFull,
        DatagramDrop::TooLarge,
        DatagramDrop::FlowLimit,
        DatagramDrop::NoPath,
        DatagramDrop::SocketFull,
        DatagramDrop::NoFlow,
    ];

    /// Its label value.
    pub fn name(self) -> &'static str {
        match self {
            DatagramDrop::QueueFull => "queue_full",
            DatagramDrop::TooLarge => "too_large",
            DatagramDrop::FlowLimit => "flow_limit",
            DatagramDrop::NoPath => "no_path",
            DatagramDrop::SocketFull => "socket_full",
            DatagramDrop::NoFlow => "no_flow",
        }
    }
}

/// Why something was refused: the `reason` label of `seaport_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Registry: a session beyond `--max-sessions`.
    SessionsFull,
    /// Registry: a connection beyond the limits on handshakes under way
    /// (in all, or from one address), or on silent new connections.
    HandshakesFull,
    /// Registry: a meeting beyond `--max-relays` was not relayed.
    RelaysFull,
    /// Registry: a meeting beyond the cap on meetings under way.
    MeetingsFull,
    /// Service: the registry refused a registration.
    Registration,
    /// Proxy: the registry refused a lookup (watch).
    Lookup,
    /// Service: a proxy key its allow list does not admit.
    NotAllowed,
    /// Service: a stream refused (its backend could not be reached, or the
    /// link's stream limit).
    Stream,
    /// Service: a link beyond the links one proxy key may hold.
    Link,
    /// Service: a link connection beyond the pool of those that have not
    /// proved themselves yet (in all, or from one source).
    Greetings,
    /// Service: a link whose first record after the handshake did not
    /// authenticate (a replayed handshake).
    Unauthenticated,
}

impl Refusal {
    /// Every reason.
    pub const ALL: [Refusal; 11] = [
        Refusal::SessionsFull,
        Refusal::HandshakesFull,
        Refusal::RelaysFull,
        Refusal::MeetingsFull,
        Refusal::Registration,
        Refusal::Lookup,
        Refusal::NotAllowed,
        Refusal::Stream,
        Refusal::Link,
        Refusal::Greetings,
        Refusal::Unauthenticated,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::SessionsFull => "sessions_full",
            Refusal::HandshakesFull => "handshakes_full",
            Refusal::RelaysFull => "relays_full",
            Refusal::MeetingsFull => "meetings_full",
            Refusal::Registration => "registration",
            Refusal::Lookup => "lookup",
            Refusal::NotAllowed => "not_allowed",
            Refusal::Stream => "stream",
            Refusal::Link => "link",
            Refusal::Greetings => "greetings_full",
            Refusal::Unauthenticated => "unauthenticated",
        }
    }
}

/// One label.
pub fn label(name: &'static str, value: &'static str) -> Label {
    vec![(name, value)]
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = MetricsRegistry::with_prefix("seaport");
        // Buckets from 50 µs to about 3 s: a stream opens in a round trip
        // plus the service's backend connect, ~0.1 ms on one host.
        let stream_open = Histogram::new(exponential_buckets(0.00005, 2.0, 17));
        let stream_bytes: Family<Label, Counter> = Family::default();
        let stream_sent = (*stream_bytes.get_or_create(&label("direction", "sent"))).clone();
        let stream_received = (*stream_bytes.get_or_create(&label("direction", "received"))).clone();
        let m = Metrics {
            registry: MetricsRegistry::default(),
            sessions: Gauge::default(),
            sessions_opened: Counter::default(),
            sessions_closed: Counter::default(),
            instances: Gauge::default(),
            watches: Gauge::default(),
            lookups: Counter::default(),
            registrations: Family::default(),
            instance_changes: Family::default(),
            registry_disconnects: Counter::default(),
            registry_connected: Family::default(),
            handshakes: Family::default(),
            links: Family::default(),
            links_open: Gauge::default(),
            link_paths: Family::default(),
            streams: Gauge::default(),
            streams_opened: Family::default(),
            stream_open,
            stream_bytes,
            stream_sent,
            stream_received,
            relays: Gauge::default(),
            relays_opened: Counter::default(),
            relayed_bytes: Family::default(),
            punches: Family::default(),
            refusals: Family::default(),
            udp_flows: Gauge::default(),
            udp_flows_opened: Counter::default(),
            datagrams: Family::default(),
            datagrams_dropped: Family::default(),
        };
        // Every label value up front: a family shows zeros, not nothing,
        // before its first event.
        let families: [(&Family<Label, Counter>, &str, &[&'static str]); 11] = [
            (&m.registrations, "event", &["registered", "unregistered", "refused", "withdrawn"]),
            (&m.instance_changes, "change", &["found", "lost"]),
            (&m.handshakes, "result", &["ok", "failed"]),
            (&m.links, "path", &["direct", "punched", "relayed"]),
            (&m.link_paths, "event", &["lost", "resumed"]),
            (&m.streams_opened, "result", &["accepted", "refused", "failed"]),
            (&m.relayed_bytes, "direction", &["to_service", "to_proxy"]),
            (&m.punches, "result", &["punched", "failed"]),
            (&m.refusals, "reason", &Refusal::ALL.map(Refusal::name)),
            (&m.datagrams, "direction", &["sent", "received"]),
            (&m.datagrams_dropped, "reason", &DatagramDrop::ALL.map(DatagramDrop::name)),
        ];
        for (family, name, values) in families {
            for value in values {
                let _ = family.get_or_create(&label(name, value));
            }
        }
        // Counters get `_total` from the encoder, units their suffix.
        let r = &mut registry;
        r.register("sessions", "Registry: sessions open now, handshaking ones included", m.sessions.clone());
        r.register(
            "sessions_opened",
            "Registry: sessions whose handshake completed",
            m.sessions_opened.clone(),
        );
        r.register("sessions_closed", "Registry: sessions that ended", m.sessions_closed.clone());
        r.register(
            "instances",
            "Registry: instances registered now; proxy: matching instances known now",
            m.instances.clone(),
        );
        r.register("watches", "Registry: watches held now", m.watches.clone());
        r.register("lookups", "Registry: lookups and watches answered", m.lookups.clone());
        r.register(
            "registrations",
            "Registrations by event: registered, unregistered (registry); registered, refused, withdrawn (service)",
            m.registrations.clone(),
        );
        r.register(
            "instance_changes",
            "Proxy: instances that appeared (found) and left (lost)",
            m.instance_changes.clone(),
        );
        r.register(
            "registry_disconnects",
            "Service and proxy: control sessions to the registry that ended",
            m.registry_disconnects.clone(),
        );
        r.register(
            "registry_connected",
            "Service and proxy: 1 while the session with the registry of slot member (0 to 7) is open",
            m.registry_connected.clone(),
        );
        r.register("handshakes", "Noise handshakes by result: ok, failed", m.handshakes.clone());
        r.register("links", "Proxy: links opened, by path: direct, punched, relayed", m.links.clone());
        r.register("links_open", "Proxy: links open now", m.links_open.clone());
        r.register(
            "link_paths",
            "Service and proxy: link transports by event: lost (the link waits for another), resumed (it carries on over a new one)",
            m.link_paths.clone(),
        );
        r.register("streams", "Streams open now", m.streams.clone());
        r.register(
            "streams_opened",
            "Streams opened, by result: accepted, refused, failed",
            m.streams_opened.clone(),
        );
        r.register_with_unit(
            "stream_open",
            "Proxy: time from a stream's open request to the service's answer",
            Unit::Seconds,
            m.stream_open.clone(),
        );
        r.register_with_unit(
            "stream",
            "Stream payload by direction: sent (local socket to link), received (link to local socket)",
            Unit::Bytes,
            m.stream_bytes.clone(),
        );
        r.register("relays", "Registry: relays open now", m.relays.clone());
        r.register("relays_opened", "Registry: relays ever opened", m.relays_opened.clone());
        r.register_with_unit(
            "relayed",
            "Registry: relayed bytes by direction: to_service, to_proxy",
            Unit::Bytes,
            m.relayed_bytes.clone(),
        );
        r.register("punch_attempts", "Hole punching attempts by result: punched, failed", m.punches.clone());
        r.register("udp_flows", "Service and proxy: UDP flows open now", m.udp_flows.clone());
        r.register(
            "udp_flows_opened",
            "Service and proxy: UDP flows ever opened",
            m.udp_flows_opened.clone(),
        );
        r.register(
            "datagrams",
            "Datagrams by direction: sent (local socket to link), received (link to local socket)",
            m.datagrams.clone(),
        );
        r.register(
            "datagrams_dropped",
            "Datagrams dropped by reason: queue_full, too_large, flow_limit, no_path, socket_full, no_flow",
            m.datagrams_dropped.clone(),
        );
        r.register(
            "refusals",
            "Refusals by reason: sessions_full, handshakes_full, relays_full, registration, lookup, not_allowed, stream",
            m.refusals.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text of every family.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Counts a refusal.
    pub fn refuse(&self, why: Refusal) {
        self.refusals.get_or_create(&label("reason", why.name())).inc();
    }

    /// Counts a datagram dropped.
    pub fn drop_datagram(&self, why: DatagramDrop) {
        self.datagrams_dropped.get_or_create(&label("reason", why.name())).inc();
    }

    /// Counts a datagram carried (`direction`: sent, received).
    pub fn datagram(&self, direction: &'static str) {
        self.datagrams.get_or_create(&label("direction", direction)).inc();
    }

    /// A UDP flow is open until the returned guard drops.
    pub fn flow_guard(&self) -> OpenGuard {
        self.udp_flows_opened.inc();
        OpenGuard::count(&self.udp_flows)
    }

    /// Counts a Noise handshake's outcome.
    pub fn handshake(&self, ok: bool) {
        self.handshakes.get_or_create(&label("result", if ok { "ok" } else { "failed" })).inc();
    }

    /// Counts a link's transport lost under it (the link waits to resume).
    pub fn link_path_lost(&self) {
        self.link_paths.get_or_create(&label("event", "lost")).inc();
    }

    /// Counts a link carried on over a new transport.
    pub fn link_resumed(&self) {
        self.link_paths.get_or_create(&label("event", "resumed")).inc();
    }

    /// Counts a punching attempt's outcome.
    pub fn punch(&self, punched: bool) {
        self.punches.get_or_create(&label("result", if punched { "punched" } else { "failed" })).inc();
    }

    /// The `registry_connected` gauge of the member in `slot` (0 to 7; a
    /// larger slot shares 7's, though a client follows no more than 8).
    pub fn registry_connected(&self, slot: usize) -> Gauge {
        const SLOTS: [&str; 8] = ["0", "1", "2", "3", "4", "5", "6", "7"];
        let slot = SLOTS.get(slot).or(SLOTS.last()).copied().unwrap_or("7");
        (*self.registry_connected.get_or_create(&label("member", slot))).clone()
    }

    /// Counts a stream's opening (`result`: accepted, refused, failed).
    pub fn stream_opened(&self, result: &'static str) {
        self.streams_opened.get_or_create(&label("result", result)).inc();
    }

    /// Records how long a stream took to open.
    pub fn stream_open_took(&self, took: Duration) {
        self.stream_open.observe(took.as_secs_f64());
    }

    /// A stream is open until the returned guard drops.
    pub fn stream_guard(&self) -> OpenGuard {
        OpenGuard::count(&self.streams)
    }

    /// A link is open until the returned guard drops (its driver ended or
    /// was aborted).
    pub fn link_guard(&self) -> OpenGuard {
        OpenGuard::count(&self.links_open)
    }
}

/// Counts one open thing in a gauge while it lives.
#[derive(Debug)]
pub struct OpenGuard(Gauge);

impl OpenGuard {
    /// Counts one more in `gauge` until the guard drops.
    pub fn count(gauge: &Gauge) -> OpenGuard {
        gauge.inc();
        OpenGuard(gauge.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Whether the process is ready for work: a set of named conditions, each
/// met or not with a one-line reason. Ready when every condition is met
/// and at least one was declared (a process that declared none is still
/// starting).
#[derive(Debug, Default)]
pub struct Readiness {
    conditions: Mutex<BTreeMap<String, Option<String>>>,
}

impl Readiness {
    /// Sets condition `name`: met (`None`) or not, with a reason.
    pub fn set(&self, name: &str, unmet: Option<String>) {
        let mut conditions = lock(&self.conditions);
        conditions.insert(name.to_owned(), unmet);
    }

    /// `Ok` when ready, else the first unmet condition's reason.
    pub fn check(&self) -> Result<(), String> {
        let conditions = lock(&self.conditions);
        if conditions.is_empty() {
            return Err("starting".to_owned());
        }
        match conditions.values().flatten().next() {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        }
    }
}

/// The process's readiness.
pub fn readiness() -> &'static Readiness {
    static READY: OnceLock<Readiness> = OnceLock::new();
    READY.get_or_init(Readiness::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_named_by_convention() {
        let m = Metrics::new();
        m.handshake(true);
        m.stream_sent.inc_by(10);
        m.stream_open_took(Duration::from_millis(3));
        m.refuse(Refusal::NotAllowed);
        m.registry_disconnects.inc();
        let text = m.encode();
        assert!(text.contains("seaport_handshakes_total{result=\"ok\"} 1"), "{text}");
        assert!(text.contains("seaport_stream_bytes_total{direction=\"sent\"} 10"), "{text}");
        assert!(text.contains("seaport_stream_open_seconds_count 1"), "{text}");
        assert!(text.contains("seaport_refusals_total{reason=\"not_allowed\"} 1"), "{text}");
        assert!(text.contains("seaport_registry_disconnects_total 1"), "{text}");
        assert!(text.contains("# TYPE seaport_sessions gauge"), "{text}");
        assert!(text.contains("# TYPE seaport_relayed_bytes counter"), "{text}");
    }

    #[test]
    fn ready_only_when_every_condition_is_met() {
        let ready = Readiness::default();
        assert_eq!(ready.check(), Err("starting".to_owned()));
        ready.set("registered", Some("not registered".to_owned()));
        ready.set("listening", None);
        assert_eq!(ready.check(), Err("not registered".to_owned()));
        ready.set("registered", None);
        assert_eq!(ready.check(), Ok(()));
    }
}
