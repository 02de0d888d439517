//! seaport-net: the tokio glue shared by the seaport binaries, and the only
//! crate that touches sockets, clocks, tasks, OS randomness and the DHT.
//!
//! - [`acl`]: the registry's `--acl` file: who may register and look up which roles.
//! - [`allow`]: which proxy keys may open links to a service.
//! - [`budget`]: how many links and streams a service's proxies may hold.
//! - [`clock`]: the one place time is read (tokio's clock).
//! - [`cli`]: what every binary's `main` shares: logging, durations, exits.
//! - [`event`]: the stdout event lines, one type for every binary.
//! - [`http`]: the operations HTTP server (`/metrics`, `/ready`, `/healthz`, the registry's page).
//! - [`metrics`]: the metric families and readiness the HTTP server reports.
//! - [`handshake`]: a data session's Noise handshake on a TCP stream.
//! - [`identity`]: seeds from flags, files or the environment; OS entropy.
//! - [`target`]: the `KEY` / `KEY@HOST:PORT` registry argument and its resolution.
//! - [`control`]: runs a service or proxy control session with reconnects.
//! - [`link`]: links (many streams over one Noise session) on tokio; a proxy's link pool.
//! - [`meet`]: meet connections: joining, punching, and the registry's pairing and relay.
//! - [`reach`]: which path a link takes (direct, punched, relayed); a service's meetings.
//! - [`page`]: the registry's live page and its JSON (`--http`).
//! - [`notify`]: readiness for systemd (`READY=1`, `STOPPING=1`).
//! - [`registry`]: serves the registry state machine on a TCP listener.
//! - [`dial`]: racing a peer's addresses; dial errors.
//! - [`dht`]: publishing and resolving a registry's addresses on mainline.
//! - [`serve`]: the accept loop and drain the service and proxy share.
//! - [`signal`]: SIGINT/SIGTERM as a future.
//!
//! Each async driver is a pure adapter: every protocol decision is made by a
//! seaport-proto state machine; this crate moves bytes and fires timers.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing))]

pub mod acl;
pub mod allow;
pub mod budget;
pub mod cli;
pub mod clock;
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
pub mod reach;
pub mod registry;
pub mod serve;
pub mod signal;
pub mod target;
