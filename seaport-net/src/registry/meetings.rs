//! The meetings the registry arranged, as their two meet connections arrive
//! on its port: the first side waits (until the meeting's deadline) for the
//! second, then the pair is told where the other is and relayed, or held
//! open while the sides punch ([`crate::meet::pair`] moves the bytes).
//!
//! Invariants:
//! - At most [`MAX_PAIRS`] meetings are paired at once, relayed or not: each
//!   holds two sockets.
//! - Relays are capped in all (`--max-relays`) and per proxy address; a
//!   meeting past either cap is paired without relaying, and said so.
//! - The map of first sides holds only waiters whose task may still take a
//!   second side: the ended ones are dropped at every arrival.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use seaport_proto::meet::MeetSide;
use seaport_proto::registry::Source;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tracing::Instrument;

use crate::limit::{Limit, Over, Share};
use crate::meet::{RelayCounters, pair};
use crate::metrics::{Refusal, metrics};

/// Most meetings paired at once, relayed or not (each holds two sockets).
pub(super) const MAX_PAIRS: usize = 1024;
/// How long a meeting that is not relayed keeps its two connections (their
/// NAT mappings help the punch): the sides punch for 5 s.
const UNRELAYED_HOLD: Duration = Duration::from_secs(10);

/// How the registry relays for the meetings it arranged, and how long and
/// how many new connections may take to say what they are.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Splice the two sides of a meeting (`--no-relay` turns it off: then
    /// meetings only exchange addresses for punching).
    pub enabled: bool,
    /// Most relays at once (`--max-relays`); a meeting beyond it is not relayed.
    pub max: usize,
    /// Most relays at once for proxies at one source (an IPv4 address or an
    /// IPv6 /64): one host cannot take every relay.
    pub per_source: usize,
    /// A relay idle this long ends.
    pub idle: Duration,
    /// How long a new connection may take to send its first frame.
    pub greeting_timeout: Duration,
    /// Most new connections from one source address waiting to send their
    /// first frame (the registry's own handshake pool has the same cap per
    /// source, `RegistryConfig::max_handshakes_per_source`).
    pub greeting_per_source: usize,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            enabled: true,
            max: 64,
            per_source: 8,
            idle: crate::meet::RELAY_IDLE,
            greeting_timeout: Duration::from_secs(10),
            greeting_per_source: 16,
        }
    }
}

/// Why a meeting is not relayed.
#[derive(Debug, thiserror::Error)]
enum RelayRefusal {
    #[error("relaying is off (--no-relay)")]
    Off,
    #[error("{0} relays open (--max-relays)")]
    Full(usize),
    #[error("{1} relays open for proxies at {0}")]
    Source(Source, usize),
}

/// [`MAX_PAIRS`] meetings are under way: a new one is refused.
#[derive(Debug)]
pub(super) struct PairsFull;

/// What every pairing shares: whether and how much to relay, and the byte counts.
#[derive(Clone)]
struct Relaying {
    enabled: bool,
    idle: Duration,
    relays: Arc<Limit<Source>>,
    counters: Arc<RelayCounters>,
}

impl Relaying {
    /// A relay's place among `--max-relays`, and among those of its proxy's
    /// source (an IPv4 address or an IPv6 /64).
    fn take(&self, source: Source) -> Result<Share<Source>, RelayRefusal> {
        if !self.enabled {
            return Err(RelayRefusal::Off);
        }
        self.relays.take(source).map_err(|over| match over {
            Over::All(n) => RelayRefusal::Full(n),
            Over::Key(n) => RelayRefusal::Source(source, n),
        })
    }
}

/// The meetings whose first side came and whose second has not.
pub(super) struct Meetings {
    /// First sides, waiting for the second.
    waiting: HashMap<u64, oneshot::Sender<(TcpStream, SocketAddr)>>,
    pairs: Arc<Semaphore>,
    relaying: Relaying,
}

impl Meetings {
    /// Meetings relayed as `options` says, their bytes counted in `counters`.
    pub(super) fn new(options: &RelayOptions, counters: Arc<RelayCounters>) -> Meetings {
        Meetings {
            waiting: HashMap::new(),
            pairs: Arc::new(Semaphore::new(MAX_PAIRS)),
            relaying: Relaying {
                enabled: options.enabled,
                idle: options.idle,
                relays: Limit::new(options.max, options.per_source),
                counters,
            },
        }
    }

    /// The first side of `meeting` (on `side`) arrived: the task that waits
    /// for the second side until `until`, then pairs the two.
    pub(super) fn first(
        &mut self,
        meeting: u64,
        until: std::time::Instant,
        side: MeetSide,
        arrived: (TcpStream, SocketAddr),
    ) -> Result<impl Future<Output = ()> + Send + 'static, PairsFull> {
        // Every pair, relayed or not, holds two sockets: all of them
        // together are capped.
        let slot = self.pairs.clone().try_acquire_owned().map_err(|_| PairsFull)?;
        let (tx, rx) = oneshot::channel();
        self.waiting.retain(|_, tx| !tx.is_closed());
        self.waiting.insert(meeting, tx);
        let relaying = self.relaying.clone();
        let until = tokio::time::Instant::from_std(until);
        let span = tracing::info_span!("meeting", meeting);
        Ok(meet(slot, until, side, arrived, rx, relaying).instrument(span))
    }

    /// The second side of `meeting` arrived: it goes to the first's task.
    pub(super) fn second(&mut self, meeting: u64, arrived: (TcpStream, SocketAddr)) {
        if let Some(tx) = self.waiting.remove(&meeting) {
            let _ = tx.send(arrived);
        }
    }
}

/// One meeting, from its first side's arrival: waits for the other side,
/// then pairs them, relayed if a relay may be had.
async fn meet(
    _slot: OwnedSemaphorePermit,
    until: tokio::time::Instant,
    side: MeetSide,
    arrived: (TcpStream, SocketAddr),
    other: oneshot::Receiver<(TcpStream, SocketAddr)>,
    relaying: Relaying,
) {
    let Ok(Ok(other)) = tokio::time::timeout_at(until, other).await else {
        tracing::debug!("the other side did not come");
        return;
    };
    let (proxy, service) = match side {
        MeetSide::Proxy => (arrived, other),
        MeetSide::Service => (other, arrived),
    };
    let share = relaying.take(Source::of(proxy.1.ip()));
    if let Err(why) = &share {
        tracing::info!("meeting not relayed: {why}");
        if !matches!(why, RelayRefusal::Off) {
            metrics().refuse(Refusal::RelaysFull);
        }
    }
    let hold = if share.is_ok() { relaying.idle } else { UNRELAYED_HOLD };
    if let Err(e) = pair(proxy, service, share.is_ok(), hold, relaying.counters).await {
        tracing::debug!("meeting ended: {e}");
    }
    drop(share);
}
