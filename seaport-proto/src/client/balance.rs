//! How a proxy orders instances for one new connection: the strategy's
//! choice first, then the rest, and instances that failed recently last.
//!
//! Invariant: the order always holds every known instance exactly once, so a
//! failover can reach each of them; a ban only moves an instance to the end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::keys::PublicKey;
use crate::message::Instance;

/// How a proxy picks among matching instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Always the oldest registration that is not banned.
    First,
    /// Each connection the next one.
    RoundRobin,
    /// A random one per connection.
    Random,
    /// A stable choice per proxy (rendezvous hash of proxy and instance keys),
    /// so one proxy sticks to one instance while it is there.
    Hash,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Strategy, String> {
        match s {
            "first" => Ok(Strategy::First),
            "round-robin" => Ok(Strategy::RoundRobin),
            "random" => Ok(Strategy::Random),
            "hash" => Ok(Strategy::Hash),
            _ => Err(format!("unknown strategy {s:?}: use first, round-robin, random or hash")),
        }
    }
}

/// A strategy with its state: whose turn it is, and who is banned until when.
#[derive(Debug, Clone)]
pub struct Balancer {
    strategy: Strategy,
    /// The proxy's own key, what [`Strategy::Hash`] hashes against.
    me: PublicKey,
    ban: Duration,
    banned: HashMap<PublicKey, Instant>,
    turn: usize,
}

impl Balancer {
    /// Balances by `strategy` for the proxy `me`; a failed instance goes last for `ban`.
    pub fn new(strategy: Strategy, me: PublicKey, ban: Duration) -> Balancer {
        Balancer { strategy, me, ban, banned: HashMap::new(), turn: 0 }
    }

    /// The order in which to try `instances` for one new connection.
    /// `random` is used by [`Strategy::Random`].
    pub fn order(&mut self, now: Instant, random: u64, instances: &[Instance]) -> Vec<Instance> {
        self.banned.retain(|_, until| *until > now);
        let (mut order, banned): (Vec<Instance>, Vec<Instance>) =
            instances.iter().cloned().partition(|i| !self.banned.contains_key(&i.key));
        let n = order.len();
        if n > 1 {
            match self.strategy {
                Strategy::First => {}
                Strategy::RoundRobin => {
                    order.rotate_left(self.turn % n);
                    self.turn = self.turn.wrapping_add(1);
                }
                Strategy::Random => order.rotate_left((random % n as u64) as usize),
                Strategy::Hash => {
                    let me = self.me;
                    order.sort_by_key(|i| std::cmp::Reverse(rendezvous(&me, &i.key)));
                }
            }
        }
        order.extend(banned);
        order
    }

    /// Dialing or handshaking with `key` failed: try it last for a while.
    pub fn report_failure(&mut self, now: Instant, key: PublicKey) {
        self.banned.insert(key, now + self.ban);
    }
}

/// FNV-1a over both keys: a stable, well-spread score for rendezvous hashing.
fn rendezvous(a: &PublicKey, b: &PublicKey) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in a.as_bytes().iter().chain(b.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_parse() {
        assert_eq!("round-robin".parse::<Strategy>(), Ok(Strategy::RoundRobin));
        assert!("fastest".parse::<Strategy>().unwrap_err().contains("round-robin"));
    }
}
