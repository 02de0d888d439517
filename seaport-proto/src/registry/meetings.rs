//! The registry's side of meetings ([`crate::meet`] has the exchange and
//! its frames): tickets, who may ask how often, and pairing the two meet
//! connections of one meeting.
//!
//! # Bounds (all in [`MeetConfig`])
//! Only an established control session may ask; each asker has a token
//! bucket (a burst, then one meeting per refill interval) and a cap on
//! meetings waiting at once, each service a cap on meetings waiting for it,
//! and the registry caps waiting meetings overall. A
//! meeting waits at most `ttl` for its two sides and is forgotten once both
//! arrived, once it expires, or once either session ends. Tickets are
//! HMAC-SHA256 of a counter under a secret the registry keeps (derived from
//! its identity and the entropy its driver gives), so they cannot be guessed
//! and never repeat within a run.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::SessionId;
use crate::keys::{Keypair, PublicKey};
use crate::meet::{MeetSide, TICKET_LEN, Ticket};

/// Limits on meetings.
#[derive(Debug, Clone)]
pub struct MeetConfig {
    /// How long a meeting waits for its two sides.
    pub ttl: Duration,
    /// Most meetings waiting at once, all askers together.
    pub max_waiting: usize,
    /// Most meetings one session may have waiting at once.
    pub per_session: usize,
    /// Most meetings waiting for one service session at once, all askers
    /// together (its side of each costs it a connection and a punch).
    pub per_target: usize,
    /// How many meetings a session may ask for in a burst.
    pub burst: u32,
    /// How often a session earns one more (up to `burst`).
    pub refill: Duration,
}

impl Default for MeetConfig {
    /// 10 s to arrive; 4,096 waiting; 16 per asking session and 32 per
    /// service; a burst of 16, then 4 a second.
    fn default() -> Self {
        MeetConfig {
            ttl: Duration::from_secs(10),
            max_waiting: 4096,
            per_session: 16,
            per_target: 32,
            burst: 16,
            refill: Duration::from_millis(250),
        }
    }
}

/// Why a meeting was not arranged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MeetRefusal {
    /// The asker used up its budget for now.
    #[error("too many meetings asked for; try again shortly")]
    Rate,
    /// The asker, or the registry, has as many meetings waiting as allowed.
    #[error("too many meetings waiting")]
    Busy,
}

/// A meet connection arrived: what the registry's driver does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The first side: hold the connection until the other comes (or `until`).
    First {
        /// Which meeting (the other side's arrival names it too).
        meeting: u64,
        /// When the meeting expires.
        until: Instant,
        /// Who asked for it: what a relay for it is counted against.
        proxy: PublicKey,
    },
    /// The second side: pair it with the first, tell both, relay.
    Second {
        /// Which meeting.
        meeting: u64,
    },
}

/// A meet connection that must be closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArrivalError {
    /// No such meeting (never was, expired, already complete, or the ticket
    /// belongs to the other side).
    #[error("unknown or expired ticket")]
    Unknown,
    /// This side of the meeting already arrived.
    #[error("this side of the meeting already arrived")]
    Duplicate,
    /// The connection does not come from where that side's control session
    /// comes from: a ticket is good only from its holder's address.
    #[error("meet connection from {0}, not from its session's address")]
    WrongSource(IpAddr),
}

/// Both tickets of one meeting: each side gets its own, so neither can
/// stand in for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tickets {
    /// The proxy's (in `MeetReady`).
    pub proxy: Ticket,
    /// The service's (in `MeetOffer`).
    pub service: Ticket,
}

/// One side of a meeting as the registry knows it: its control session, the
/// address that session comes from, and its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Party {
    /// The side's control session.
    pub session: SessionId,
    /// Where it comes from; its meet connection must come from there too.
    pub ip: IpAddr,
    /// Its identity (a relay is counted against the proxy's).
    pub key: PublicKey,
}

struct Meeting {
    proxy: Party,
    service: Party,
    expires: Instant,
    arrived: Option<MeetSide>,
    tickets: Tickets,
}

struct Bucket {
    tokens: u32,
    updated: Instant,
}

/// The registry's meetings; see the module docs.
pub struct Meetings {
    config: MeetConfig,
    key: ring::hmac::Key,
    counter: u64,
    /// Meetings by their own number.
    waiting: HashMap<u64, Meeting>,
    /// Each ticket: its meeting, and whose it is.
    tickets: HashMap<Ticket, (u64, MeetSide)>,
    buckets: HashMap<SessionId, Bucket>,
}

impl Meetings {
    /// Meetings whose tickets derive from `identity` (so they cannot be
    /// guessed even before [`Meetings::mix_entropy`]).
    pub fn new(identity: &Keypair, config: MeetConfig) -> Meetings {
        let seed = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, identity.signing_key().as_bytes());
        let secret = ring::hmac::sign(&seed, b"seaport meet tickets");
        Meetings {
            config,
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref()),
            counter: 0,
            waiting: HashMap::new(),
            tickets: HashMap::new(),
            buckets: HashMap::new(),
        }
    }

    /// Mixes fresh randomness into the ticket secret, so tickets differ
    /// from one run of the same registry to the next.
    pub fn mix_entropy(&mut self, entropy: [u8; 32]) {
        let secret = ring::hmac::sign(&self.key, &entropy);
        self.key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref());
    }

    /// Meetings waiting for their sides now.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Arranges a meeting between `proxy` (the asker) and `service`; each
    /// gets its own ticket.
    pub fn open(&mut self, now: Instant, proxy: Party, service: Party) -> Result<Tickets, MeetRefusal> {
        let config = &self.config;
        let bucket =
            self.buckets.entry(proxy.session).or_insert(Bucket { tokens: config.burst, updated: now });
        let earned =
            now.saturating_duration_since(bucket.updated).as_nanos() / config.refill.as_nanos().max(1);
        if earned > 0 {
            bucket.tokens =
                u32::try_from(earned).unwrap_or(u32::MAX).saturating_add(bucket.tokens).min(config.burst);
            bucket.updated = now;
        }
        if bucket.tokens == 0 {
            return Err(MeetRefusal::Rate);
        }
        let live = |m: &&Meeting| m.expires > now;
        let mine = self.waiting.values().filter(live).filter(|m| m.proxy.session == proxy.session).count();
        let theirs =
            self.waiting.values().filter(live).filter(|m| m.service.session == service.session).count();
        if mine >= config.per_session
            || theirs >= config.per_target
            || self.waiting.len() >= config.max_waiting
        {
            return Err(MeetRefusal::Busy);
        }
        bucket.tokens -= 1;
        let number = self.counter;
        let tickets = Tickets { proxy: self.ticket(), service: self.ticket() };
        self.tickets.insert(tickets.proxy, (number, MeetSide::Proxy));
        self.tickets.insert(tickets.service, (number, MeetSide::Service));
        let expires = now + self.config.ttl;
        self.waiting.insert(number, Meeting { proxy, service, expires, arrived: None, tickets });
        Ok(tickets)
    }

    /// The next ticket: HMAC of a counter that never repeats in a run.
    fn ticket(&mut self) -> Ticket {
        self.counter += 1;
        let tag = ring::hmac::sign(&self.key, &self.counter.to_be_bytes());
        let mut ticket = [0u8; TICKET_LEN];
        if let Some(bytes) = tag.as_ref().first_chunk::<TICKET_LEN>() {
            ticket = *bytes;
        }
        Ticket(ticket)
    }

    /// A meet connection from `from` arrived with `ticket`, saying it is
    /// `side`. Looks the one meeting up; never scans the others.
    pub fn arrive(
        &mut self,
        now: Instant,
        ticket: Ticket,
        side: MeetSide,
        from: IpAddr,
    ) -> Result<Arrival, ArrivalError> {
        let &(number, whose) = self.tickets.get(&ticket).ok_or(ArrivalError::Unknown)?;
        if whose != side {
            return Err(ArrivalError::Unknown);
        }
        let meeting = self.waiting.get_mut(&number).ok_or(ArrivalError::Unknown)?;
        if meeting.expires <= now {
            self.forget(number);
            return Err(ArrivalError::Unknown);
        }
        let expected = match side {
            MeetSide::Proxy => meeting.proxy.ip,
            MeetSide::Service => meeting.service.ip,
        };
        if from != expected {
            return Err(ArrivalError::WrongSource(from));
        }
        match meeting.arrived {
            None => {
                meeting.arrived = Some(side);
                Ok(Arrival::First { meeting: number, until: meeting.expires, proxy: meeting.proxy.key })
            }
            Some(first) if first == side => Err(ArrivalError::Duplicate),
            Some(_) => {
                self.forget(number);
                Ok(Arrival::Second { meeting: number })
            }
        }
    }

    fn forget(&mut self, number: u64) {
        if let Some(meeting) = self.waiting.remove(&number) {
            self.tickets.remove(&meeting.tickets.proxy);
            self.tickets.remove(&meeting.tickets.service);
        }
    }

    /// Session `id` ended: its meetings and its budget go.
    pub fn release(&mut self, id: SessionId) {
        let gone: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, m)| m.proxy.session == id || m.service.session == id)
            .map(|(n, _)| *n)
            .collect();
        for number in gone {
            self.forget(number);
        }
        self.buckets.remove(&id);
    }

    /// Forgets meetings past their time, and buckets that are full again
    /// (the registry's periodic sweep).
    pub fn expire(&mut self, now: Instant) {
        let gone: Vec<u64> = self.waiting.iter().filter(|(_, m)| m.expires <= now).map(|(n, _)| *n).collect();
        for number in gone {
            self.forget(number);
        }
        let full = self.config.refill.saturating_mul(self.config.burst);
        self.buckets.retain(|_, b| now.saturating_duration_since(b.updated) < full);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::keypair;

    /// Session `n` from 10.0.0.n.
    fn party(n: u64) -> Party {
        Party { session: SessionId(n), ip: IpAddr::from([10, 0, 0, n as u8]), key: keypair(n as u8).public() }
    }

    #[test]
    fn a_meeting_pairs_one_proxy_and_one_service_once() {
        let now = Instant::now();
        let mut meetings = Meetings::new(&keypair(1), MeetConfig::default());
        let (p, s) = (party(1), party(2));
        let tickets = meetings.open(now, p, s).unwrap();
        assert_ne!(tickets.proxy, tickets.service, "a ticket of its own for each side");
        let nobody = Ticket([0; TICKET_LEN]);
        assert_eq!(meetings.arrive(now, nobody, MeetSide::Proxy, p.ip), Err(ArrivalError::Unknown));
        // A side's ticket is good for that side only, and only from its address.
        assert_eq!(meetings.arrive(now, tickets.proxy, MeetSide::Service, s.ip), Err(ArrivalError::Unknown));
        let stranger = IpAddr::from([192, 0, 2, 9]);
        assert_eq!(
            meetings.arrive(now, tickets.service, MeetSide::Service, stranger),
            Err(ArrivalError::WrongSource(stranger))
        );
        assert!(matches!(
            meetings.arrive(now, tickets.service, MeetSide::Service, s.ip),
            Ok(Arrival::First { .. })
        ));
        assert_eq!(
            meetings.arrive(now, tickets.service, MeetSide::Service, s.ip),
            Err(ArrivalError::Duplicate)
        );
        assert!(matches!(
            meetings.arrive(now, tickets.proxy, MeetSide::Proxy, p.ip),
            Ok(Arrival::Second { .. })
        ));
        assert_eq!(
            meetings.arrive(now, tickets.proxy, MeetSide::Proxy, p.ip),
            Err(ArrivalError::Unknown),
            "used up"
        );
        assert_eq!(meetings.waiting(), 0);
        assert!(meetings.tickets.is_empty(), "both tickets forgotten");
    }

    #[test]
    fn meetings_expire_and_go_with_their_sessions() {
        let now = Instant::now();
        let config = MeetConfig::default();
        let mut meetings = Meetings::new(&keypair(1), config.clone());
        let first = meetings.open(now, party(1), party(2)).unwrap();
        let later = now + config.ttl;
        assert_eq!(
            meetings.arrive(later, first.proxy, MeetSide::Proxy, party(1).ip),
            Err(ArrivalError::Unknown)
        );
        let second = meetings.open(later, party(1), party(2)).unwrap();
        assert_ne!(first, second, "tickets never repeat");
        meetings.release(SessionId(2));
        assert_eq!(
            meetings.arrive(later, second.proxy, MeetSide::Proxy, party(1).ip),
            Err(ArrivalError::Unknown)
        );
        meetings.expire(later);
        assert_eq!(meetings.waiting(), 0);
        assert!(meetings.tickets.is_empty());
    }

    #[test]
    fn an_asker_gets_a_burst_then_a_steady_rate_and_caps_on_waiting() {
        let now = Instant::now();
        let config = MeetConfig { per_session: 100, per_target: 100, ..MeetConfig::default() };
        let mut meetings = Meetings::new(&keypair(1), config.clone());
        let asker = party(1);
        for _ in 0..config.burst {
            meetings.open(now, asker, party(2)).unwrap();
        }
        assert_eq!(meetings.open(now, asker, party(2)), Err(MeetRefusal::Rate));
        // Another asker has a budget of its own.
        assert!(meetings.open(now, party(3), party(2)).is_ok());
        let then = now + config.refill;
        assert!(meetings.open(then, asker, party(2)).is_ok());
        assert_eq!(meetings.open(then, asker, party(2)), Err(MeetRefusal::Rate));

        let config = MeetConfig { per_session: 2, per_target: 3, ..MeetConfig::default() };
        let mut meetings = Meetings::new(&keypair(1), config);
        meetings.open(now, asker, party(2)).unwrap();
        meetings.open(now, asker, party(2)).unwrap();
        assert_eq!(meetings.open(now, asker, party(2)), Err(MeetRefusal::Busy), "per asker");
        meetings.open(now, party(3), party(2)).unwrap();
        assert_eq!(meetings.open(now, party(4), party(2)), Err(MeetRefusal::Busy), "per service");
        assert!(meetings.open(now, party(4), party(5)).is_ok());
    }

    #[test]
    fn tickets_depend_on_the_identity_and_on_the_entropy_mixed_in() {
        let now = Instant::now();
        let ticket = |n: u8, entropy: Option<[u8; 32]>| {
            let mut m = Meetings::new(&keypair(n), MeetConfig::default());
            if let Some(e) = entropy {
                m.mix_entropy(e);
            }
            m.open(now, party(1), party(2)).unwrap()
        };
        assert_eq!(ticket(1, None), ticket(1, None));
        assert_ne!(ticket(1, None), ticket(2, None));
        assert_ne!(ticket(1, None), ticket(1, Some([9; 32])));
    }
}
