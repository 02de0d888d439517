//! The registry's live page (`--http`): what the registry holds, as a
//! snapshot the server loop publishes ([`RegistryView`]), and the registry
//! set as of the DHT publisher's last merge ([`SetMember`]s), served as JSON
//! at `/api/instances` and shown by one self-contained HTML page at `/` that
//! polls the JSON every second.
//!
//! Invariants: the page is read-only and never touches the registry state
//! machine: it reads the latest published snapshot (an `Arc` behind a
//! `watch`), which the server loop replaces at most a few times a second,
//! and renders each snapshot's instances and sessions once, however many
//! viewers poll (the cache holds one snapshot's text).
//! The snapshot holds public keys, roles and addresses, never a seed. The
//! HTML has no external asset (inline CSS and JS), so it works offline, and
//! writes every value as text (`textContent`), never as markup: a role's
//! tags come from services.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use seaport_proto::keys::PublicKey;
use seaport_proto::role::Role;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::dht::SetMember;
use crate::event::rfc3339;
use crate::http::Page;
use crate::lock::lock;
use crate::metrics::{label, metrics};

/// What the registry holds at one moment.
#[derive(Debug, Clone)]
pub struct RegistryView {
    /// The registry's public key.
    pub key: PublicKey,
    /// When the registry started.
    pub started: SystemTime,
    /// Every registered instance, by role name, oldest first within one.
    pub instances: Vec<InstanceView>,
    /// Every session, handshaking ones included.
    pub sessions: Vec<SessionView>,
}

/// One registered instance.
#[derive(Debug, Clone)]
pub struct InstanceView {
    /// The service's key.
    pub key: PublicKey,
    /// Its role, version and tags.
    pub role: Role,
    /// Where proxies dial it.
    pub addrs: Vec<SocketAddr>,
    /// When its session connected.
    pub connected: Option<SystemTime>,
    /// When the registry first saw this registration.
    pub registered: SystemTime,
}

/// One session.
#[derive(Debug, Clone)]
pub struct SessionView {
    /// The peer's key, once its handshake completed.
    pub key: Option<PublicKey>,
    /// Where it connected from.
    pub addr: SocketAddr,
    /// When it connected.
    pub since: Option<SystemTime>,
    /// Registrations it holds.
    pub registrations: usize,
    /// Watches it holds.
    pub watches: usize,
}

impl RegistryView {
    /// An empty view of registry `key`, started now.
    pub fn new(key: PublicKey) -> RegistryView {
        RegistryView { key, started: SystemTime::now(), instances: Vec::new(), sessions: Vec::new() }
    }

    /// The `/api/instances` document as of `now`, with the registry set
    /// `set`, as one value: what [`RegistryPage`] serves, assembled without
    /// its cache (the tests' reference).
    #[cfg(test)]
    fn to_json(&self, now: SystemTime, set: &[SetMember]) -> Value {
        let mut document = self.live(now);
        if let Some(fields) = document.as_object_mut() {
            fields.insert("set".into(), set_json(set));
            fields.insert("roles".into(), self.roles());
            fields.insert("sessions".into(), self.sessions());
        }
        document
    }

    /// The document's fields that change between snapshots too: uptime
    /// and relay counters.
    fn live(&self, now: SystemTime) -> Value {
        let m = metrics();
        let relayed = |direction| m.relayed_bytes.get_or_create(&label("direction", direction)).get();
        json!({
            "registry": self.key.to_string(),
            "started": rfc3339(self.started),
            "uptime_seconds": now.duration_since(self.started).unwrap_or_default().as_secs(),
            "relays": {
                "open": m.relays.get(),
                "opened": m.relays_opened.get(),
                "bytes_to_service": relayed("to_service"),
                "bytes_to_proxy": relayed("to_proxy"),
            },
        })
    }

    /// The instances, grouped by role name: the bulk of the document, fixed
    /// for one snapshot.
    fn roles(&self) -> Value {
        let mut roles: Vec<(String, Vec<Value>)> = Vec::new();
        for i in &self.instances {
            let entry = json!({
                "key": i.key.to_string(),
                "role": i.role.to_string(),
                "version": i.role.version().to_string(),
                "tags": i.role.tags(),
                "addrs": i.addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "connected_since": i.connected.map(rfc3339),
                "registered_since": rfc3339(i.registered),
            });
            match roles.last_mut() {
                Some((name, list)) if name == i.role.name() => list.push(entry),
                _ => roles.push((i.role.name().to_owned(), vec![entry])),
            }
        }
        roles.into_iter().map(|(name, instances)| json!({"name": name, "instances": instances})).collect()
    }

    /// The sessions, fixed for one snapshot.
    fn sessions(&self) -> Value {
        self.sessions
            .iter()
            .map(|s| {
                json!({
                    "key": s.key.map(|k| k.to_string()),
                    "addr": s.addr.to_string(),
                    "since": s.since.map(rfc3339),
                    "registrations": s.registrations,
                    "watches": s.watches,
                })
            })
            .collect()
    }
}

/// The registries of the set, each with its addresses and the unix seconds
/// of its last refresh (`null`: not published in the DHT).
fn set_json(set: &[SetMember]) -> Value {
    set.iter()
        .map(|m| {
            json!({
                "addrs": m.addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "refreshed": m.refreshed,
            })
        })
        .collect()
}

/// One snapshot's roles and sessions, rendered once: the page polls every
/// second per viewer, and with thousands of instances rendering them is the
/// whole cost of an answer.
struct Rendered {
    view: Arc<RegistryView>,
    roles: String,
    sessions: String,
}

/// The page over the server loop's published snapshots.
pub struct RegistryPage {
    view: watch::Receiver<Arc<RegistryView>>,
    /// The registry set as the DHT publisher last saw it: a few members,
    /// rendered at each request.
    set: watch::Receiver<Vec<SetMember>>,
    rendered: Mutex<Option<Rendered>>,
    /// Snapshots rendered so far (the cache's hits are the requests beyond).
    renders: AtomicU64,
}

impl RegistryPage {
    /// The page showing what `view` publishes, and the registry set that
    /// `set` holds.
    pub fn new(
        view: watch::Receiver<Arc<RegistryView>>,
        set: watch::Receiver<Vec<SetMember>>,
    ) -> RegistryPage {
        RegistryPage { view, set, rendered: Mutex::new(None), renders: AtomicU64::new(0) }
    }

    /// The document as of `now`: the latest snapshot's roles and sessions,
    /// rendered once per snapshot, around the fields that change anyway.
    fn document(&self, now: SystemTime) -> String {
        let view = self.view.borrow().clone();
        let mut rendered = lock(&self.rendered);
        let cached = rendered.take().filter(|r| Arc::ptr_eq(&r.view, &view));
        let r = cached.unwrap_or_else(|| {
            self.renders.fetch_add(1, Ordering::Relaxed);
            Rendered {
                roles: view.roles().to_string(),
                sessions: view.sessions().to_string(),
                view: view.clone(),
            }
        });
        // `live` is an object: its text ends with `}`; the other fields join it.
        let live = view.live(now).to_string();
        let head = live.strip_suffix('}').unwrap_or("{");
        let set = set_json(&self.set.borrow());
        let document = format!("{head},\"set\":{set},\"roles\":{},\"sessions\":{}}}", r.roles, r.sessions);
        *rendered = Some(r);
        document
    }
}

impl Page for RegistryPage {
    fn json(&self) -> String {
        self.document(SystemTime::now())
    }

    fn html(&self) -> &'static str {
        HTML
    }
}

/// The page: inline CSS and JS, polling `/api/instances` every second.
const HTML: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>seaport registry</title>
<style>
  :root { color-scheme: light dark; --line: #8884; --dim: #888; }
  body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5rem; max-width: 72rem; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
  h2 { font-size: 1.05rem; margin: 1.6rem 0 .4rem; }
  code, .key { font: 12px ui-monospace, monospace; word-break: break-all; }
  .dim { color: var(--dim); }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid var(--line); vertical-align: top; }
  th { font-weight: 600; font-size: 12px; color: var(--dim); }
  .tag { display: inline-block; padding: 0 .4rem; margin-right: .2rem; border: 1px solid var(--line); border-radius: .6rem; font-size: 12px; }
  .role { font-weight: 600; margin-top: 1rem; }
  #roles table { table-layout: fixed; }
  #roles th:nth-child(1) { width: 47%; } #roles th:nth-child(2) { width: 8%; }
  #roles th:nth-child(3) { width: 12%; } #roles th:nth-child(4) { width: 14%; }
  #status.stale { color: #c33; }
  .stats span { margin-right: 1.2rem; }
</style>
</head>
<body>
<h1>seaport registry</h1>
<div class="key" id="registry">…</div>
<div class="stats dim"><span>up <b id="uptime">…</b></span><span><b id="count-instances">0</b> <span id="word-instances">instances</span></span><span><b id="count-sessions">0</b> <span id="word-sessions">sessions</span></span><span id="status">connecting…</span></div>

<h2>Registry set</h2>
<table><thead><tr><th>registry addresses</th><th>refreshed in the DHT</th></tr></thead>
<tbody id="set"></tbody></table>

<h2>Roles</h2>
<div id="roles"><p class="dim">No service registered.</p></div>

<h2>Sessions</h2>
<table><thead><tr><th>key</th><th>from</th><th>connected since</th><th>registrations</th><th>watches</th></tr></thead>
<tbody id="sessions"></tbody></table>

<h2>Relays</h2>
<div class="stats" id="relays">…</div>

<script>
"use strict";
// Every value is set as text, never as markup: tags and roles come from services.
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) { const td = document.createElement("td"); if (c instanceof Node) td.appendChild(c); else td.textContent = c; tr.appendChild(td); }
  return tr;
}
function ago(ts) {
  if (!ts) return "";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(ts)) / 1000));
  const at = new Date(ts);
  const when = at.toDateString() === new Date().toDateString() ? at.toLocaleTimeString() : at.toLocaleString();
  return when + " (" + duration(s) + " ago)";
}
function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + (d || h || m ? m + "m " : "") + (s % 60) + "s";
}
function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
function render(data) {
  document.getElementById("registry").textContent = data.registry;
  document.getElementById("uptime").textContent = duration(data.uptime_seconds);
  const set = document.getElementById("set");
  set.replaceChildren();
  for (const m of data.set || []) {
    const addrs = el("span");
    for (const a of m.addrs) { addrs.appendChild(el("code", a)); addrs.appendChild(document.createElement("br")); }
    const at = new Date(m.refreshed * 1000);
    set.appendChild(row([addrs, m.refreshed === null ? el("span", "not published", "dim") : isNaN(at) ? String(m.refreshed) : ago(at.toISOString())]));
  }
  let count = 0;
  const roles = document.getElementById("roles");
  roles.replaceChildren();
  for (const role of data.roles) {
    roles.appendChild(el("div", role.name, "role"));
    const table = el("table");
    const head = document.createElement("tr");
    for (const h of ["service key", "version", "tags", "addresses", "connected since"]) head.appendChild(el("th", h));
    table.appendChild(document.createElement("thead")).appendChild(head);
    const body = document.createElement("tbody");
    for (const i of role.instances) {
      count++;
      const tags = el("span");
      for (const t of i.tags) tags.appendChild(el("span", t, "tag"));
      const addrs = el("span");
      for (const a of i.addrs) { addrs.appendChild(el("code", a)); addrs.appendChild(document.createElement("br")); }
      const tr = row([el("span", i.key, "key"), i.version, tags, addrs, ago(i.connected_since)]);
      tr.dataset.key = i.key;
      body.appendChild(tr);
    }
    table.appendChild(body);
    roles.appendChild(table);
  }
  if (!data.roles.length) roles.appendChild(el("p", "No service registered.", "dim"));
  document.getElementById("count-instances").textContent = count;
  document.getElementById("word-instances").textContent = count === 1 ? "instance" : "instances";
  document.getElementById("count-sessions").textContent = data.sessions.length;
  document.getElementById("word-sessions").textContent = data.sessions.length === 1 ? "session" : "sessions";
  const sessions = document.getElementById("sessions");
  sessions.replaceChildren();
  for (const s of data.sessions) {
    sessions.appendChild(row([s.key ? el("span", s.key, "key") : el("span", "(handshaking)", "dim"), el("code", s.addr), ago(s.since), s.registrations, s.watches]));
  }
  const r = data.relays;
  const relays = document.getElementById("relays");
  relays.replaceChildren();
  for (const [k, v] of [["open", r.open], ["opened", r.opened], ["to services", bytes(r.bytes_to_service)], ["to proxies", bytes(r.bytes_to_proxy)]]) {
    const span = el("span", k + " "); span.appendChild(el("b", v)); relays.appendChild(span);
  }
}
async function poll() {
  const status = document.getElementById("status");
  try {
    const answer = await fetch("/api/instances", { cache: "no-store" });
    if (!answer.ok) throw new Error("HTTP " + answer.status);
    render(await answer.json());
    status.textContent = "live, updated " + new Date().toLocaleTimeString();
    status.className = "";
  } catch (e) {
    status.textContent = "registry unreachable (" + e.message + "), retrying";
    status.className = "stale";
  }
  setTimeout(poll, 1000);
}
poll();
</script>
</body>
</html>
"##;

#[cfg(test)]
mod tests {
    use super::*;
    use seaport_proto::keys::{Keypair, Seed};

    #[test]
    fn json_groups_instances_by_role() {
        let key = Keypair::from_seed(&Seed::from_bytes([7; 32])).public();
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let instance = |role: &str| InstanceView {
            key,
            role: Role::parse(role).unwrap().with_tags(["eu"]).unwrap(),
            addrs: vec!["127.0.0.1:4000".parse().unwrap()],
            connected: Some(at),
            registered: at,
        };
        let view = RegistryView {
            key,
            started: at,
            instances: vec![instance("couchdb@3.2.2"), instance("couchdb@3.3.0"), instance("redis@7.0.0")],
            sessions: vec![SessionView {
                key: None,
                addr: "127.0.0.1:5000".parse().unwrap(),
                since: Some(at),
                registrations: 0,
                watches: 0,
            }],
        };
        let set =
            [SetMember { addrs: vec!["127.0.0.1:4500".parse().unwrap()], refreshed: Some(1_765_000_000) }];
        let json = view.to_json(at + std::time::Duration::from_secs(61), &set);
        assert_eq!(json["set"], json!([{"addrs": ["127.0.0.1:4500"], "refreshed": 1_765_000_000}]));
        assert_eq!(json["uptime_seconds"], 61);
        assert_eq!(json["roles"].as_array().unwrap().len(), 2);
        assert_eq!(json["roles"][0]["name"], "couchdb");
        assert_eq!(json["roles"][0]["instances"][1]["version"], "3.3.0");
        assert_eq!(json["roles"][0]["instances"][0]["tags"], json!(["eu"]));
        assert_eq!(json["roles"][1]["instances"][0]["addrs"], json!(["127.0.0.1:4000"]));
        assert_eq!(json["sessions"][0]["key"], Value::Null);
        assert!(json["relays"]["open"].is_i64());
    }

    #[test]
    fn the_page_renders_a_snapshot_once_and_a_new_one_afresh() {
        let key = Keypair::from_seed(&Seed::from_bytes([7; 32])).public();
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let view = |count: u16| RegistryView {
            key,
            started: at,
            instances: (0..count)
                .map(|n| InstanceView {
                    key,
                    role: Role::parse("db@1.0.0").unwrap(),
                    addrs: vec![SocketAddr::from(([127, 0, 0, 1], 4000 + n))],
                    connected: None,
                    registered: at,
                })
                .collect(),
            sessions: Vec::new(),
        };
        let (tx, rx) = watch::channel(Arc::new(view(2)));
        let own = SetMember { addrs: vec!["127.0.0.1:4500".parse().unwrap()], refreshed: None };
        let (set_tx, set) = watch::channel(vec![own.clone()]);
        let page = RegistryPage::new(rx, set);
        let later = at + std::time::Duration::from_secs(5);
        let first: Value = serde_json::from_str(&page.document(later)).unwrap();
        assert_eq!(
            first,
            view(2).to_json(later, std::slice::from_ref(&own)),
            "the same document as rendered whole"
        );
        assert_eq!(first["set"], json!([{"addrs": ["127.0.0.1:4500"], "refreshed": null}]));
        let renders = || page.renders.load(Ordering::Relaxed);
        assert_eq!(renders(), 1);
        // Cached: the uptime still moves.
        let again: Value =
            serde_json::from_str(&page.document(later + std::time::Duration::from_secs(1))).unwrap();
        assert_eq!(again["uptime_seconds"], 6);
        assert_eq!(again["roles"], first["roles"]);
        assert_eq!(renders(), 1, "the same text, not rendered again");
        // A new snapshot is rendered afresh.
        tx.send_replace(Arc::new(view(3)));
        let fresh: Value = serde_json::from_str(&page.document(later)).unwrap();
        assert_eq!(fresh["roles"][0]["instances"].as_array().unwrap().len(), 3);
        assert_eq!(fresh, view(3).to_json(later, std::slice::from_ref(&own)));
        // The set as the DHT publisher saw it last, in the same snapshot's text.
        let other =
            SetMember { addrs: vec!["10.0.0.2:4500".parse().unwrap()], refreshed: Some(1_765_000_011) };
        set_tx.send_replace(vec![own.clone(), other.clone()]);
        let known: Value = serde_json::from_str(&page.document(later)).unwrap();
        assert_eq!(known, view(3).to_json(later, &[own, other]));
        assert_eq!(known["set"][1]["refreshed"], 1_765_000_011);
        assert_eq!(renders(), 2, "the set does not render the roles again");
        assert_eq!(renders(), 2);
    }
}
