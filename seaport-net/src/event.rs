//! The events a binary reports on stdout: one type for the registry, the
//! service and the proxy. As text (the default), `Display` is the
//! command-line contract: one line per event, stable, scripts read them. With
//! `--json` ([`print_events`]), every event is one JSON object a line with `ts`
//! (RFC 3339, UTC), `event` (its name, [`Event::name`]) and its fields; a few
//! events (links, draining, stopped) exist only there, so the text lines stay
//! exactly as they were. Logs, with their detail, go to stderr through
//! `tracing`; stdout carries only events. A program that uses the crates
//! as a library prints nothing unless it calls [`print_events`], and gets
//! every event as a value from [`subscribe`].
//!
//! Invariant: every state change a script would act on has a variant here, and
//! nothing in the registry, service or proxy prints to stdout except [`emit`].
//! The counters that correspond to events ([`crate::metrics`]) are counted
//! in [`emit`] alone (by `count`, here), so stdout, `--json` and `/metrics`
//! agree.

use std::fmt;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use seaport_proto::keys::PublicKey;
use seaport_proto::role::{Role, RoleQuery};
use tokio::sync::broadcast;

use crate::metrics::{Label, Refusal, label, metrics};

/// One thing that happened, as a script sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The registry accepts sessions.
    RegistryListening {
        /// Its public key, the name clients use.
        key: PublicKey,
    },
    /// A service's identity is known and its link port is open.
    ServiceStarted {
        /// The service's public key.
        key: PublicKey,
    },
    /// A service or proxy starts looking for its registry.
    Connecting {
        /// The registry's key.
        registry: PublicKey,
    },
    /// The control session to one registry of the set is open.
    Connected {
        /// Where it runs to.
        addr: SocketAddr,
        /// The registry's slot among those followed (0 to 7).
        member: usize,
    },
    /// The control session to one registry of the set ended; the client
    /// reconnects by itself.
    Disconnected {
        /// Where it ran to.
        addr: SocketAddr,
        /// The registry's slot among those followed (0 to 7).
        member: usize,
        /// Why, for people.
        reason: String,
    },
    /// The registry confirmed a service's role.
    Registered {
        /// The role.
        role: Role,
    },
    /// A service withdrew its role (its backend is down); it registers again
    /// when the backend is back.
    Withdrawn {
        /// The role.
        role: Role,
        /// Why, for people.
        reason: String,
    },
    /// The registry refused a service's role; the service keeps its session
    /// and asks again after its next reconnect.
    RegistrationRefused {
        /// The role.
        role: Role,
        /// The registry's reason.
        text: String,
    },
    /// The registry refused a proxy's watch; the proxy keeps its session and
    /// asks again after its next reconnect.
    WatchRefused {
        /// The query.
        query: RoleQuery,
        /// The registry's reason.
        text: String,
    },
    /// A proxy learned of an instance.
    Found {
        /// The instance's key.
        key: PublicKey,
        /// Its role, with its tags.
        role: Role,
    },
    /// A proxy serves a newly found instance on its port.
    Serving {
        /// The proxy's local port.
        port: u16,
        /// The instance's key.
        key: PublicKey,
    },
    /// An instance left the registry (it stopped, died, or withdrew).
    Lost {
        /// The instance's key.
        key: PublicKey,
        /// Its role.
        role: Role,
    },
    /// A proxy opened a link to an instance (JSON only).
    LinkUp {
        /// The instance's key.
        key: PublicKey,
        /// How the link was reached: `direct`, `punched` or `relayed`
        /// (`Path::name`).
        path: &'static str,
        /// The address it runs over.
        addr: SocketAddr,
    },
    /// A proxy's link to an instance moved to another path, its streams
    /// with it (JSON only; the log says it too).
    LinkMoved {
        /// The instance's key.
        key: PublicKey,
        /// The new path: `direct`, `punched` or `relayed`.
        path: &'static str,
        /// The address it runs over now.
        addr: SocketAddr,
    },
    /// A proxy's link to an instance ended (JSON only).
    LinkDown {
        /// The instance's key.
        key: PublicKey,
        /// Why, for people.
        reason: String,
    },
    /// Shutdown began: no new connections, open ones finish (JSON only).
    Draining,
    /// The process is about to exit 0 (JSON only).
    Stopped,
}

impl Event {
    /// The event's stable name: the `event` field of its JSON form.
    pub fn name(&self) -> &'static str {
        match self {
            Event::RegistryListening { .. } => "registry_listening",
            Event::ServiceStarted { .. } => "service_started",
            Event::Connecting { .. } => "registry_connecting",
            Event::Connected { .. } => "registry_connected",
            Event::Disconnected { .. } => "registry_lost",
            Event::Registered { .. } => "registered",
            Event::Withdrawn { .. } => "withdrawn",
            Event::RegistrationRefused { .. } => "registration_refused",
            Event::WatchRefused { .. } => "lookup_refused",
            Event::Found { .. } => "instance_found",
            Event::Serving { .. } => "serving",
            Event::Lost { .. } => "instance_lost",
            Event::LinkUp { .. } => "link_up",
            Event::LinkMoved { .. } => "link_moved",
            Event::LinkDown { .. } => "link_down",
            Event::Draining => "draining",
            Event::Stopped => "stopped",
        }
    }

    /// Whether the event has a text line (the others are JSON only).
    pub fn has_text(&self) -> bool {
        !matches!(
            self,
            Event::LinkUp { .. }
                | Event::LinkMoved { .. }
                | Event::LinkDown { .. }
                | Event::Draining
                | Event::Stopped
        )
    }

    /// The event as one JSON object: `ts`, `event`, then its fields (keys as
    /// 64 hex characters, roles as `name@version` with `tags` apart).
    pub fn to_json(&self, at: SystemTime) -> String {
        use serde_json::{Value, json};
        let role_fields = |role: &Role| vec![("role", json!(role.to_string())), ("tags", json!(role.tags()))];
        let fields: Vec<(&str, Value)> = match self {
            Event::RegistryListening { key } | Event::ServiceStarted { key } => {
                vec![("key", json!(key.to_string()))]
            }
            Event::Connecting { registry } => vec![("registry", json!(registry.to_string()))],
            Event::Draining | Event::Stopped => vec![],
            Event::Connected { addr, member } => {
                vec![("registry_addr", json!(addr.to_string())), ("member", json!(member))]
            }
            Event::Disconnected { addr, member, reason } => vec![
                ("registry_addr", json!(addr.to_string())),
                ("member", json!(member)),
                ("reason", json!(reason)),
            ],
            Event::Registered { role } => role_fields(role),
            Event::Withdrawn { role, reason } => {
                [role_fields(role), vec![("reason", json!(reason))]].concat()
            }
            Event::RegistrationRefused { role, text } => {
                [role_fields(role), vec![("text", json!(text))]].concat()
            }
            Event::WatchRefused { query, text } => {
                vec![("query", json!(query.to_string())), ("text", json!(text))]
            }
            Event::Found { key, role } | Event::Lost { key, role } => {
                [vec![("key", json!(key.to_string()))], role_fields(role)].concat()
            }
            Event::Serving { port, key } => vec![("port", json!(port)), ("key", json!(key.to_string()))],
            Event::LinkUp { key, path, addr } | Event::LinkMoved { key, path, addr } => {
                vec![
                    ("key", json!(key.to_string())),
                    ("path", json!(path)),
                    ("addr", json!(addr.to_string())),
                ]
            }
            Event::LinkDown { key, reason } => {
                vec![("key", json!(key.to_string())), ("reason", json!(reason))]
            }
        };
        let mut object = serde_json::Map::new();
        object.insert("ts".into(), json!(rfc3339(at)));
        object.insert("event".into(), json!(self.name()));
        for (name, value) in fields {
            object.insert(name.into(), value);
        }
        Value::Object(object).to_string()
    }
}

/// `2026-12-02T13:52:45.123Z` for `at` (UTC, milliseconds).
pub(crate) fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// Whether [`emit`] prints at all: a binary's `run` turns it on; a
/// program using the crates as a library keeps its stdout.
static PRINT: AtomicBool = AtomicBool::new(false);
/// Whether [`emit`] prints JSON.
static JSON: AtomicBool = AtomicBool::new(false);

/// Makes [`emit`] print each event on stdout: text lines, or JSON objects
/// with `json` (`--json`). Off until called: a library prints nothing.
pub fn print_events(json: bool) {
    JSON.store(json, Ordering::Relaxed);
    PRINT.store(true, Ordering::Relaxed);
}

/// Events a subscriber has not taken yet, at most: a slower one misses the
/// oldest ([`broadcast::error::RecvError::Lagged`] says how many).
pub const SUBSCRIBED_EVENTS: usize = 1024;

/// Where [`emit`] sends events for [`subscribe`]rs.
fn subscribers() -> &'static broadcast::Sender<Event> {
    static SENDER: OnceLock<broadcast::Sender<Event>> = OnceLock::new();
    SENDER.get_or_init(|| broadcast::channel(SUBSCRIBED_EVENTS).0)
}

/// Every event emitted in this process from now on, as values: those of
/// every service, client and registry it runs (the fields say whose). The
/// same events the binaries print, whether or not they are printed.
pub fn subscribe() -> broadcast::Receiver<Event> {
    subscribers().subscribe()
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::RegistryListening { key } => write!(f, "Registry listening. Connect with pubkey {key}"),
            Event::ServiceStarted { key } => write!(f, "started p2p service on {key}"),
            Event::Connecting { registry } => write!(f, "connecting to registry {registry}"),
            Event::Connected { addr, .. } => write!(f, "connected to registry at {addr}"),
            Event::Disconnected { addr, reason, .. } => {
                write!(f, "disconnected from registry at {addr}: {reason}")
            }
            Event::Registered { role } => write!(f, "registered service {role}"),
            Event::Withdrawn { role, reason } => write!(f, "withdrew service {role}: {reason}"),
            Event::RegistrationRefused { role, text } => write!(f, "registry refused service {role}: {text}"),
            Event::WatchRefused { query, text } => write!(f, "registry refused lookup {query}: {text}"),
            Event::Found { key, role } => {
                write!(f, "found service {key} {role}")?;
                if !role.tags().is_empty() {
                    write!(f, " tags={}", role.tags().join(","))?;
                }
                Ok(())
            }
            Event::Serving { port, key } => write!(f, "proxy from {port} to p2p service {key}"),
            Event::Lost { key, role } => write!(f, "lost service {key} {role}"),
            Event::LinkUp { key, path, addr } => write!(f, "link to {key} via {path} {addr}"),
            Event::LinkMoved { key, path, addr } => write!(f, "link to {key} moved to {path} {addr}"),
            Event::LinkDown { key, reason } => write!(f, "link to {key} down: {reason}"),
            Event::Draining => f.write_str("draining"),
            Event::Stopped => f.write_str("stopped"),
        }
    }
}

/// Counts what `event` stands for in the metrics. Called by [`emit`] only,
/// so a counter moves exactly when its line is printed.
fn count(event: &Event) {
    let m = metrics();
    let inc = |family: &Family<Label, Counter>, name, value| {
        family.get_or_create(&label(name, value)).inc();
    };
    match event {
        Event::Registered { .. } => inc(&m.registrations, "event", "registered"),
        Event::Withdrawn { .. } => inc(&m.registrations, "event", "withdrawn"),
        Event::RegistrationRefused { .. } => {
            inc(&m.registrations, "event", "refused");
            m.refuse(Refusal::Registration);
        }
        Event::WatchRefused { .. } => m.refuse(Refusal::Lookup),
        Event::Found { .. } => {
            inc(&m.instance_changes, "change", "found");
            m.instances.inc();
        }
        Event::Lost { .. } => {
            inc(&m.instance_changes, "change", "lost");
            m.instances.dec();
        }
        Event::Disconnected { .. } => {
            m.registry_disconnects.inc();
        }
        Event::LinkUp { path, .. } => inc(&m.links, "path", path),
        _ => {}
    }
}

/// Counts `event`, hands it to [`subscribe`]rs, and (after [`print_events`])
/// prints it as one line on stdout: its text line, or with `--json` its
/// JSON object. Scripts read these, so each is flushed at once (Rust's
/// stdout is line-buffered).
pub fn emit(event: &Event) {
    count(event);
    let subscribers = subscribers();
    if subscribers.receiver_count() > 0 {
        let _ = subscribers.send(event.clone());
    }
    if !PRINT.load(Ordering::Relaxed) {
        return;
    }
    if JSON.load(Ordering::Relaxed) {
        println!("{}", event.to_json(SystemTime::now()));
    } else if event.has_text() {
        println!("{event}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seaport_proto::keys::{Keypair, Seed};

    #[test]
    fn lines_keep_the_contract() {
        let key = Keypair::from_seed(&Seed::from_bytes([7; 32])).public();
        let role = Role::parse("couchdb@3.2.2").unwrap();
        assert_eq!(Event::Registered { role: role.clone() }.to_string(), "registered service couchdb@3.2.2");
        assert_eq!(
            Event::Found { key, role: role.clone() }.to_string(),
            format!("found service {key} couchdb@3.2.2")
        );
        let tagged = role.clone().with_tags(["eu", "ssd"]).unwrap();
        assert_eq!(
            Event::Found { key, role: tagged }.to_string(),
            format!("found service {key} couchdb@3.2.2 tags=eu,ssd")
        );
        assert_eq!(
            Event::Serving { port: 6000, key }.to_string(),
            format!("proxy from 6000 to p2p service {key}")
        );
        assert_eq!(Event::Lost { key, role }.to_string(), format!("lost service {key} couchdb@3.2.2"));
    }

    #[test]
    fn json_names_the_event_and_its_fields() {
        let key = Keypair::from_seed(&Seed::from_bytes([7; 32])).public();
        let role = Role::parse("couchdb@3.2.2").unwrap().with_tags(["eu"]).unwrap();
        let at = UNIX_EPOCH + std::time::Duration::from_millis(1_764_683_565_123);
        let json: serde_json::Value = serde_json::from_str(&Event::Found { key, role }.to_json(at)).unwrap();
        assert_eq!(json["ts"], "2025-12-02T13:52:45.123Z");
        assert_eq!(json["event"], "instance_found");
        assert_eq!(json["key"], key.to_string());
        assert_eq!(json["role"], "couchdb@3.2.2");
        assert_eq!(json["tags"], serde_json::json!(["eu"]));
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + std::time::Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
        let connected = Event::Connected { addr: "127.0.0.1:4500".parse().unwrap(), member: 0 };
        assert!(!Event::Stopped.has_text() && connected.has_text());
    }
}
