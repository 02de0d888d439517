//! seaport-net: the tokio glue shared by the seaport binaries, and the only
//! crate that touches sockets, clocks, tasks, OS randomness and the DHT.
//!
//! Each async driver is a pure adapter: every protocol decision is made by a
//! seaport-proto state machine; this crate moves bytes and fires timers.
//! Backpressure is a value and every queue has a cap where it is defined;
//! [`event::emit`] is the one place where stdout, `--json` and the metrics
//! agree.
//!
//! # Where to find what
//! Data path (proxy ⇄ service):
//! - [`pool`]: the proxy's links, one per instance, shared by its client
//!   connections; a relayed link's upgrade to a better path.
//! - [`reach`]: which path a link takes (direct, punched, relayed); a
//!   service's side of meetings.
//! - [`handshake`]: both sides of a link's Noise handshake, and why a link
//!   could not be opened.
//! - [`link`]: a link on tokio (many streams over one session): `link/mod.rs`
//!   the public face, `state` what its tasks share, `driver` the socket's
//!   reader and writer, `stream` a stream's task.
//! - [`meet`]: meet connections: joining, punching, the registry's relay.
//! - [`budget`], [`allow`]: what a service's proxies may hold; who may link.
//! - [`dial`]: racing a peer's addresses; dial errors.
//! - [`serve`]: the accept loop and drain the service and proxy share.
//!
//! Control (service and proxy ⇄ registry):
//! - [`control`]: one control session per registry of the set, with
//!   reconnects and backoff, and finding the set's members.
//! - [`target`]: the `KEY` / `KEY@HOST:PORT,...` argument and its members;
//!   [`dht`]: publishing and resolving a registry set's record on mainline.
//!
//! Registry:
//! - [`registry`]: the server driving the registry state machine, one method
//!   per event (`registry/mod.rs`); its sessions' connections, meeting
//!   pairing and page snapshots in files beside it.
//! - [`acl`]: the `--acl` file. [`page`]: the live page and its JSON.
//! - [`limit`]: counted shares (relays, connections not spoken yet).
//!
//! Process plumbing:
//! - [`event`]: the stdout event lines (and the counters they move).
//! - [`metrics`]: the metric families and readiness; [`http`]: the
//!   operations HTTP server that reports them.
//! - [`proxy_header`]: the PROXY protocol header a service gives its backend.
//! - [`config`]: `--config FILE`, the flags from a TOML file.
//! - [`cli`]: what every `main` shares: logging, durations, exits.
//! - [`identity`]: seeds from flags, files or the environment; OS entropy.
//! - [`clock`]: the one place time is read. [`lock`]: taking a `std` lock.
//! - [`notify`]: systemd readiness. [`signal`]: SIGINT/SIGTERM/SIGHUP.
//!
//! No module imports (through `crate::`) a module that imports it back,
//! directly or through a chain: the lower layers (`lock`, `clock`,
//! `metrics`, `dial`, `meet`) know nothing of those above them.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing))]

pub mod acl;
pub mod allow;
pub mod budget;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod dht;
pub mod dial;
pub mod event;
pub mod handshake;
pub mod http;
pub mod identity;
pub mod limit;
pub mod link;
pub mod lock;
pub mod meet;
pub mod metrics;
pub mod notify;
pub mod page;
pub mod pool;
pub mod proxy_header;
pub mod reach;
pub mod registry;
pub mod serve;
pub mod signal;
pub mod target;

/// tokio, for [`local_stream_io!`]'s expansion in other crates.
#[doc(hidden)]
pub use tokio as __tokio;
