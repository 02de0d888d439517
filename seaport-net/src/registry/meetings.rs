//! The meetings the registry arranged, as their two meet connections arrive
//! on its port: the first side waits (until the meeting's deadline) for the
//! second, then the pair is told where the other is and relayed, or held
//! open while the sides punch ([`crate::meet::pair`] moves the bytes).
//!
//! Invariants:
//! - At most [`MAX_PAIRS`] meetings are paired at once, relayed or not: each
//!   holds two sockets.
//! - Relays are capped in all (`--max-relays`), per proxy source (an IPv4
//!   address or an IPv6 /64) and per proxy key (`--max-relays-per-key`); a
//!   meeting past any cap is paired without relaying, and said so. Each
//!   relay is capped in time and bytes ([`crate::meet::RelayLimits`]).
//! - The map of first sides holds only waiters whose task may still take a
//!   second side: the ended ones are dropped at every arrival.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use seaport_proto::keys::PublicKey;
use seaport_proto::meet::MeetSide;
use seaport_proto::registry::Source;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tracing::Instrument;

use crate::limit::{Limit, Over, Share};
use crate::meet::{RelayCounters, RelayLimits, pair};
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
    /// Most relays at once for one proxy key (`--max-relays-per-key`).
    pub per_key: usize,
    /// How long one relay may live, and how much it may carry
    /// (`--max-relay-time`, `--max-relay-mib`), and how long it may idle.
    pub limits: RelayLimits,
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
            per_key: 8,
            limits: RelayLimits::default(),
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
    #[error("{1} relays open for proxy {0} (--max-relays-per-key)")]
    Key(PublicKey, usize),
}

/// [`MAX_PAIRS`] meetings are under way: a new one is refused.
#[derive(Debug)]
pub(super) struct PairsFull;

/// What every pairing shares: whether and how much to relay, and the byte counts.
#[derive(Clone)]
struct Relaying {
    enabled: bool,
    limits: RelayLimits,
    relays: Arc<Limit<Source>>,
    keys: Arc<Limit<PublicKey>>,
    counters: Arc<RelayCounters>,
}

/// A relay's places: among all relays and its source's, and among its key's.
type RelayShare = (Share<Source>, Share<PublicKey>);

impl Relaying {
    /// A relay's place among `--max-relays`, and among those of its proxy's
    /// source (an IPv4 address or an IPv6 /64).
    fn take(&self, source: Source, proxy: PublicKey) -> Result<RelayShare, RelayRefusal> {
        if !self.enabled {
            return Err(RelayRefusal::Off);
        }
        let place = self.relays.take(source).map_err(|over| match over {
            Over::All(n) => RelayRefusal::Full(n),
            Over::Key(n) => RelayRefusal::Source(source, n),
        })?;
        let mine = self.keys.take(proxy).map_err(|over| match over {
            Over::All(n) | Over::Key(n) => RelayRefusal::Key(proxy, n),
        })?;
        Ok((place, mine))
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
                limits: options.limits,
                relays: Limit::new(options.max, options.per_source),
                keys: Limit::new(options.max, options.per_key),
                counters,
            },
        }
    }

    /// The first side of `meeting` (on `side`) arrived: the task that waits
    /// for the second side until `until`, then pairs the two.
    pub(super) fn first(
        &mut self,
        (meeting, until, proxy): (u64, std::time::Instant, PublicKey),
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
        Ok(meet(slot, (until, proxy), side, arrived, rx, relaying).instrument(span))
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
    (until, asker): (tokio::time::Instant, PublicKey),
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
    let share = relaying.take(Source::of(proxy.1.ip()), asker);
    if let Err(why) = &share {
        tracing::info!("meeting not relayed: {why}");
        if !matches!(why, RelayRefusal::Off) {
            metrics().refuse(Refusal::RelaysFull);
        }
    }
    let limits =
        if share.is_ok() { relaying.limits } else { RelayLimits { idle: UNRELAYED_HOLD, ..relaying.limits } };
    if let Err(e) = pair(proxy, service, share.is_ok(), limits, relaying.counters).await {
        tracing::debug!("meeting ended: {e}");
    }
    drop(share);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_proxy_key_holds_its_share_of_relays_from_any_address() {
        let options = RelayOptions { per_key: 2, ..RelayOptions::default() };
        let meetings = Meetings::new(&options, Arc::new(RelayCounters::default()));
        let relaying = &meetings.relaying;
        let key =
            seaport_proto::keys::Keypair::from_seed(&seaport_proto::keys::Seed::from_bytes([1; 32])).public();
        let from = |n: u8| Source::of(std::net::IpAddr::from([192, 0, 2, n]));
        let first = relaying.take(from(1), key).unwrap();
        let _second = relaying.take(from(2), key).unwrap();
        assert!(matches!(relaying.take(from(3), key), Err(RelayRefusal::Key(k, 2)) if k == key));
        drop(first);
        assert!(relaying.take(from(4), key).is_ok(), "a share comes back when its relay ends");
    }
}
