//! The set's record: the value of the BEP44 item a registry set shares
//! ([`SetRecord`]), its text codec, and the merge that puts a registry in
//! or takes it out. Pure: no DHT, no clock (callers pass the time), no I/O.
//!
//! The value is text that old clients (which parse each `,`-separated item
//! as an address and skip the rest) still read: a member's addresses, then
//! an item `=SECS` (unix seconds of its last refresh) that closes its group,
//! e.g. `127.0.0.1:4500,[::1]:4500,=1765000000,10.0.0.2:4500,=1765000011`.
//! Addresses with no closing `=SECS` (a record by an old build, which lists
//! only itself) decode as one member of unknown freshness: clients treat it
//! as fresh. A merge drops a member of unknown freshness, since nobody could
//! ever refresh or age it out (a registry reading the record first stamps
//! such a member with the time its item was written: see the node).
//!
//! Capacity (BEP44's 1000 bytes, and at most [`MAX_SET_MEMBERS`] members),
//! with worst-case lengths: `255.255.255.255:65535` is 21 bytes,
//! `[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535` 47 (58 with a
//! `%4294967295` scope), `=SECS` 11 (until the year 2286), and items are
//! joined by one `,`. A member with one IPv4 address takes 33 bytes plus a
//! separator: 29 would fit in 1000 bytes, so the cap of 16 (543 bytes) binds
//! first. A member with one IPv4 and one IPv6 address takes 81 + 1: 12 fit
//! (10 with scope ids). A new member that does not fit is refused
//! ([`SetFull`]), never squeezed in by dropping a live one.
//!
//! Freshness is judged by the local clock. Registries, which should keep
//! their clocks in sync, drop members last refreshed more than [`SET_STALE`]
//! ago or more than [`CLOCK_SKEW`] ahead; clients are lenient about their
//! own clocks and keep members up to [`SET_STALE`] + [`CLOCK_SKEW`] old and
//! [`CLOCK_SKEW`] ahead. A member is identified by its addresses: an entry
//! sharing an address with mine is my previous one.
//!
//! # Invariants
//! - A merged record never exceeds BEP44's 1000 bytes nor lists more than
//!   [`MAX_SET_MEMBERS`] members.
//! - A value read from the DHT is untrusted text: one over 1000 bytes or not
//!   UTF-8 is refused, anything else decodes without panicking, each member
//!   taking at least 8 of its bytes.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// BEP44 values are at most 1000 bytes.
pub const MAX_VALUE: usize = 1000;
/// Most registries one set's record lists: a client dials every member at
/// once, and the record stays small whatever the addresses.
pub const MAX_SET_MEMBERS: usize = 16;
/// A member not refreshed for this long is gone: five refreshes missed.
pub const SET_STALE: Duration = Duration::from_secs(5 * 60);
/// How far apart clocks may be: a member refreshed up to this far in the
/// future is kept, and clients keep members this much older than
/// [`SET_STALE`].
pub const CLOCK_SKEW: Duration = Duration::from_secs(2 * 60);

/// One registry of a set, as the set's record lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetMember {
    /// Where it may be dialed.
    pub addrs: Vec<SocketAddr>,
    /// Unix seconds of its last refresh; `None` when unknown (a record by an
    /// old build).
    pub refreshed: Option<u64>,
}

impl SetMember {
    /// Whether it lists any of `addrs`: then it is the same registry.
    pub(super) fn shares_addr(&self, addrs: &[SocketAddr]) -> bool {
        self.addrs.iter().any(|a| addrs.contains(a))
    }

    /// Whether a registry merging at `now` (unix seconds) keeps it: known,
    /// refreshed within [`SET_STALE`], at most [`CLOCK_SKEW`] ahead.
    pub fn is_current(&self, now: u64) -> bool {
        self.refreshed.is_some_and(|at| {
            now.saturating_sub(at) <= SET_STALE.as_secs() && at <= now.saturating_add(CLOCK_SKEW.as_secs())
        })
    }

    /// Whether a client at `now` (unix seconds) dials it: unknown freshness
    /// (an old build's record) counts as live, and the window is wider by
    /// [`CLOCK_SKEW`] than [`SetMember::is_current`]'s, for the client's clock.
    pub fn is_live(&self, now: u64) -> bool {
        self.refreshed.is_none_or(|at| {
            now.saturating_sub(at) <= (SET_STALE + CLOCK_SKEW).as_secs()
                && at <= now.saturating_add(CLOCK_SKEW.as_secs())
        })
    }
}

/// The set's record: its members in the order they joined (a member that
/// refreshes keeps its place, a new one goes last), so the order does not
/// churn at every refresh. [`super::DhtNode::resolve`] hands clients the freshest
/// first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SetRecord {
    /// The members, each with its addresses and freshness.
    pub members: Vec<SetMember>,
}

/// A merge refused: the record would pass BEP44's 1000 bytes or list more
/// than [`MAX_SET_MEMBERS`] registries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetFull {
    /// Live registries listed besides the one that would join.
    pub listed: usize,
    /// Bytes those take.
    pub bytes: usize,
    /// Bytes the record would take with the one that would join.
    pub needed: usize,
}

impl fmt::Display for SetFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the registry set's DHT record is full ({} registries, {} of {MAX_VALUE} bytes",
            self.listed, self.bytes
        )?;
        if self.listed >= MAX_SET_MEMBERS {
            write!(f, "; a record lists at most {MAX_SET_MEMBERS} registries)")
        } else {
            write!(f, "; with this registry it would take {} bytes)", self.needed)
        }
    }
}

impl std::error::Error for SetFull {}

/// A value that is not a record at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadRecord {
    /// Longer than BEP44 allows.
    #[error("{0} bytes, over BEP44's {MAX_VALUE}")]
    TooLong(usize),
    /// Not UTF-8 text.
    #[error("not UTF-8 text")]
    NotText,
}

impl SetRecord {
    /// Reads a record's value. Items that are neither an address nor
    /// `=SECS` (a later format's) are skipped, as old clients skip them; a
    /// `=` whose number does not parse closes its group with unknown
    /// freshness; `=SECS` closing no address is ignored.
    pub fn decode(value: &[u8]) -> Result<SetRecord, BadRecord> {
        // Bounds the work, and the members: each takes at least 8 bytes.
        if value.len() > MAX_VALUE {
            return Err(BadRecord::TooLong(value.len()));
        }
        let text = std::str::from_utf8(value).map_err(|_| BadRecord::NotText)?;
        let mut members = Vec::new();
        let mut group = Vec::new();
        for item in text.split(',').map(str::trim) {
            if let Some(secs) = item.strip_prefix('=') {
                if !group.is_empty() {
                    members
                        .push(SetMember { addrs: std::mem::take(&mut group), refreshed: secs.parse().ok() });
                }
            } else if let Ok(addr) = item.parse() {
                group.push(addr);
            }
        }
        if !group.is_empty() {
            members.push(SetMember { addrs: group, refreshed: None });
        }
        Ok(SetRecord { members })
    }

    /// The record's value. A member of unknown freshness (which
    /// [`SetRecord::merge`] never makes) is closed by a bare `=`, so that it
    /// reads back as one wherever it stands.
    pub fn encode(&self) -> String {
        let mut items: Vec<String> = Vec::new();
        for member in &self.members {
            items.extend(member.addrs.iter().map(ToString::to_string));
            items.push(member.refreshed.map_or_else(|| "=".to_owned(), |at| format!("={at}")));
        }
        items.join(",")
    }

    /// The record with `mine` in it (stamped `now_secs` if it has no time):
    /// in place of my previous entry (any member sharing an address with
    /// `mine`), else last; members that are not current
    /// ([`SetMember::is_current`]) are dropped. Refused when the result
    /// would pass [`MAX_VALUE`] bytes or [`MAX_SET_MEMBERS`] members.
    pub fn merge(self, mut mine: SetMember, now_secs: u64) -> Result<SetRecord, SetFull> {
        mine.refreshed.get_or_insert(now_secs);
        let mut place = None;
        let mut others = SetRecord::default();
        for member in self.members {
            if member.shares_addr(&mine.addrs) {
                place.get_or_insert(others.members.len());
            } else if member.is_current(now_secs) {
                others.members.push(member);
            }
        }
        let (listed, bytes) = (others.members.len(), others.encode().len());
        let mut merged = others;
        // `place` was a length of the list, which only grew since.
        merged.members.insert(place.unwrap_or(merged.members.len()), mine);
        let needed = merged.encode().len();
        if merged.members.len() > MAX_SET_MEMBERS || needed > MAX_VALUE {
            return Err(SetFull { listed, bytes, needed });
        }
        Ok(merged)
    }

    /// The record without my entry (any member sharing an address with
    /// `mine`), for a registry that stops; members that are not current are
    /// dropped too, as by [`SetRecord::merge`].
    pub fn leave(self, mine: &[SocketAddr], now_secs: u64) -> SetRecord {
        let members =
            self.members.into_iter().filter(|m| !m.shares_addr(mine) && m.is_current(now_secs)).collect();
        SetRecord { members }
    }

    /// Whether any member shares an address with `mine`.
    pub(super) fn lists(&self, mine: &[SocketAddr]) -> bool {
        self.members.iter().any(|m| m.shares_addr(mine))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) const NOW: u64 = 1_765_000_000;

    pub(crate) fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    pub(crate) fn member(addrs: &[&str], refreshed: Option<u64>) -> SetMember {
        SetMember { addrs: addrs.iter().map(|a| addr(a)).collect(), refreshed }
    }

    /// What clients of earlier builds do with a value.
    fn old_client(text: &str) -> Vec<SocketAddr> {
        text.split(',').filter_map(|a| a.trim().parse::<SocketAddr>().ok()).collect()
    }

    #[test]
    fn records_round_trip_and_old_clients_see_every_address() {
        let text = "127.0.0.1:4500,[::1]:4500,=1765000000,10.0.0.2:4500,=1765000011";
        let record = SetRecord::decode(text.as_bytes()).unwrap();
        assert_eq!(
            record.members,
            vec![
                member(&["127.0.0.1:4500", "[::1]:4500"], Some(1_765_000_000)),
                member(&["10.0.0.2:4500"], Some(1_765_000_011)),
            ]
        );
        assert_eq!(record.encode(), text);
        assert_eq!(old_client(text), vec![addr("127.0.0.1:4500"), addr("[::1]:4500"), addr("10.0.0.2:4500")]);
        // Unknown freshness reads back as such wherever it stands.
        let mixed =
            SetRecord { members: vec![member(&["10.0.0.1:1"], None), member(&["[fe80::1%7]:2"], Some(NOW))] };
        assert_eq!(mixed.encode(), "10.0.0.1:1,=,[fe80::1%7]:2,=1765000000");
        assert_eq!(SetRecord::decode(mixed.encode().as_bytes()).unwrap(), mixed);
        assert_eq!(SetRecord::decode(b"").unwrap(), SetRecord::default());
        assert_eq!(SetRecord::default().encode(), "");
    }

    #[test]
    fn an_old_builds_record_is_one_member_of_unknown_freshness() {
        let record = SetRecord::decode(b"192.0.2.7:4500, [2001:db8::7]:4500").unwrap();
        assert_eq!(record.members, vec![member(&["192.0.2.7:4500", "[2001:db8::7]:4500"], None)]);
        assert!(record.members[0].is_live(NOW), "clients dial it");
        assert!(!record.members[0].is_current(NOW));
        // A merge drops it when its time is unknown (a registry reading it
        // stamps it first: the node's tests).
        let merged = record.clone().merge(member(&["10.0.0.9:1"], None), NOW).unwrap();
        assert_eq!(merged.members, vec![member(&["10.0.0.9:1"], Some(NOW))]);
    }

    #[test]
    fn a_merge_drops_stale_members_and_keeps_fresh_ones() {
        let stale = SET_STALE.as_secs();
        let skew = CLOCK_SKEW.as_secs();
        let record = SetRecord {
            members: vec![
                member(&["10.0.0.1:1"], Some(NOW - stale)),
                member(&["10.0.0.2:1"], Some(NOW - stale - 1)),
                member(&["10.0.0.3:1"], Some(NOW + skew)),
                member(&["10.0.0.4:1"], Some(NOW + skew + 1)),
                member(&["10.0.0.5:1"], Some(0)),
                member(&["10.0.0.6:1"], Some(u64::MAX)),
            ],
        };
        let merged = record.merge(member(&["10.0.0.9:1"], Some(NOW)), NOW).unwrap();
        let kept: Vec<SocketAddr> = merged.members.iter().map(|m| m.addrs[0]).collect();
        assert_eq!(kept, vec![addr("10.0.0.1:1"), addr("10.0.0.3:1"), addr("10.0.0.9:1")]);
        // Clients are more lenient, for their own clocks.
        let client = |at| member(&["10.0.0.1:1"], Some(at)).is_live(NOW);
        assert!(client(NOW - stale - skew) && !client(NOW - stale - skew - 1));
        assert!(client(NOW + skew) && !client(NOW + skew + 1) && !client(u64::MAX));
        // A clock at the epoch sees every member far ahead: none, and no overflow.
        assert!(!member(&["10.0.0.1:1"], Some(NOW)).is_live(0));
    }

    #[test]
    fn my_old_entry_is_replaced_in_place_and_a_new_member_goes_last() {
        let record = SetRecord {
            members: vec![
                member(&["10.0.0.1:1"], Some(NOW - 10)),
                member(&["10.0.0.9:1", "[::9]:1"], Some(NOW - 60)),
                member(&["10.0.0.2:1"], Some(NOW - 20)),
            ],
        };
        // Shares one address with my old entry: it is mine.
        let mine = member(&["10.0.0.9:1"], None);
        let merged = record.clone().merge(mine.clone(), NOW).unwrap();
        assert_eq!(
            merged.members,
            vec![
                member(&["10.0.0.1:1"], Some(NOW - 10)),
                member(&["10.0.0.9:1"], Some(NOW)),
                member(&["10.0.0.2:1"], Some(NOW - 20)),
            ]
        );
        // Twice listed (two writers raced): one entry left, at the first place.
        let mut twice = record.clone();
        twice.members.push(member(&["10.0.0.9:1"], Some(NOW - 5)));
        assert_eq!(twice.merge(mine, NOW).unwrap(), merged);
        let new = record.clone().merge(member(&["10.0.0.3:1"], Some(NOW)), NOW).unwrap();
        assert_eq!(new.members.len(), 4);
        assert_eq!(new.members[3], member(&["10.0.0.3:1"], Some(NOW)));
        assert_eq!(new.members[..3], record.members[..]);
        // Leaving takes my entry out, and the stale with it.
        let mut with_stale = new.clone();
        with_stale.members.push(member(&["10.0.0.4:1"], Some(NOW - SET_STALE.as_secs() - 1)));
        let left = with_stale.leave(&[addr("[::9]:1")], NOW);
        assert_eq!(
            left.members,
            vec![new.members[0].clone(), new.members[2].clone(), new.members[3].clone()]
        );
        assert!(!left.lists(&[addr("10.0.0.9:1")]));
    }

    /// Worst-case member lengths, as the module docs count them.
    fn worst(v6: Option<u32>) -> SetMember {
        let mut addrs = vec![addr("255.255.255.255:65535")];
        if let Some(scope) = v6 {
            let ip = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap();
            addrs.push(std::net::SocketAddrV6::new(ip, 65535, 0, scope).into());
        }
        SetMember { addrs, refreshed: Some(9_999_999_999) }
    }

    /// The most members of `m`'s length that fit in BEP44's bytes.
    fn fitting(m: &SetMember) -> usize {
        let fits = |n| SetRecord { members: vec![m.clone(); n] }.encode().len() <= MAX_VALUE;
        (1..100).take_while(|&n| fits(n)).last().unwrap()
    }

    #[test]
    fn the_documented_capacity_holds() {
        assert_eq!(SetRecord { members: vec![worst(None)] }.encode().len(), 33);
        assert_eq!(fitting(&worst(None)), 29);
        assert_eq!(SetRecord { members: vec![worst(None); MAX_SET_MEMBERS] }.encode().len(), 543);
        assert_eq!(SetRecord { members: vec![worst(Some(0))] }.encode().len(), 81);
        assert_eq!(fitting(&worst(Some(0))), 12);
        assert_eq!(fitting(&worst(Some(u32::MAX))), 10);
    }

    #[test]
    fn a_full_set_refuses_and_says_by_how_much() {
        let many = |n: usize| SetRecord {
            members: (0..n).map(|i| member(&[&format!("10.0.1.{i}:4500")], Some(NOW))).collect(),
        };
        let full = many(MAX_SET_MEMBERS).merge(member(&["10.0.0.99:4500"], None), NOW).unwrap_err();
        assert_eq!(full.listed, MAX_SET_MEMBERS);
        let text = full.to_string();
        assert!(
            text.contains("(16 registries, ")
                && text.contains(" of 1000 bytes")
                && text.contains("at most 16")
        );
        // My own refresh still fits a full set.
        assert_eq!(
            many(MAX_SET_MEMBERS).merge(member(&["10.0.1.3:4500"], None), NOW).unwrap().members.len(),
            16
        );
        assert!(many(MAX_SET_MEMBERS - 1).merge(member(&["10.0.0.99:4500"], None), NOW).is_ok());

        // Bytes: members with many addresses each.
        let fat = |i: u8| SetMember {
            addrs: (0..8).map(|p| SocketAddr::from(([10, 0, i, p], 40000))).collect(),
            refreshed: Some(NOW),
        };
        let record = SetRecord { members: (0..7).map(fat).collect() };
        let bytes = record.encode().len();
        let full = record.merge(fat(7), NOW).unwrap_err();
        assert_eq!((full.listed, full.bytes), (7, bytes));
        assert!(full.needed > MAX_VALUE);
        assert_eq!(
            full.to_string(),
            format!(
                "the registry set's DHT record is full (7 registries, {bytes} of 1000 bytes; with this registry it \
                 would take {} bytes)",
                full.needed
            )
        );
        // A member too large alone is refused too, not cut.
        let huge = SetMember {
            addrs: (0..70).map(|p| SocketAddr::from(([10, 0, 0, p], 40000))).collect(),
            refreshed: None,
        };
        assert_eq!(SetRecord::default().merge(huge, NOW).unwrap_err().listed, 0);
    }

    #[test]
    fn hostile_values_are_bounded_and_never_panic() {
        assert_eq!(SetRecord::decode(&[b'1'; MAX_VALUE + 1]), Err(BadRecord::TooLong(MAX_VALUE + 1)));
        assert_eq!(SetRecord::decode(&[0xc3, 0x28]), Err(BadRecord::NotText));
        let cases: &[(&str, Vec<SetMember>)] = &[
            ("garbage,127.0.0.1:1", vec![member(&["127.0.0.1:1"], None)]),
            ("=5,=,,=", vec![]),
            (",,,,", vec![]),
            ("127.0.0.1:1,=99999999999999999999999", vec![member(&["127.0.0.1:1"], None)]),
            (
                "127.0.0.1:1,=-5,127.0.0.2:1,= 7 ",
                vec![member(&["127.0.0.1:1"], None), member(&["127.0.0.2:1"], None)],
            ),
            ("127.0.0.1:1,=+7", vec![member(&["127.0.0.1:1"], Some(7))]),
            ("127.0.0.1:1,#later,127.0.0.2:1,=9", vec![member(&["127.0.0.1:1", "127.0.0.2:1"], Some(9))]),
            ("[::1]:1,=18446744073709551615", vec![member(&["[::1]:1"], Some(u64::MAX))]),
        ];
        for (text, members) in cases {
            assert_eq!(&SetRecord::decode(text.as_bytes()).unwrap().members, members, "{text:?}");
        }
        // The most members a value can hold, and a merge into it.
        let dense = vec!["[::]:0,="; 111].join(",");
        assert!(dense.len() <= MAX_VALUE);
        let record = SetRecord::decode(dense.as_bytes()).unwrap();
        assert_eq!(record.members.len(), 111);
        assert_eq!(record.merge(member(&["10.0.0.1:1"], None), NOW).unwrap().members.len(), 1);
    }

    /// A small deterministic generator (xorshift): no dependency, and the
    /// same cases on every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Decoding never panics, and what it yields encodes and decodes back
    /// to itself; merging whatever decoded keeps the limits.
    #[test]
    fn decoding_anything_is_safe_and_round_trips() {
        const TOKENS: &[&str] = &[
            "127.0.0.1:4500",
            "[::1]:1",
            "[fe80::1%3]:9",
            "255.255.255.255:65535",
            "0.0.0.0:0",
            "=",
            "=0",
            "=1765000000",
            "=18446744073709551616",
            "=x",
            " = 5",
            "",
            " ",
            ",",
            "[",
            "]",
            ":",
            "%",
            "é",
            "1.2.3.4",
            "[::1]",
            "::1:5",
            "1.2.3.4:99999",
            "\u{0}",
            "==",
            "=1765000000=",
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..20_000 {
            let value: Vec<u8> = if case % 4 == 0 {
                (0..rng.below(MAX_VALUE + 50)).map(|_| rng.next() as u8).collect()
            } else {
                let items: Vec<&str> = (0..rng.below(120)).map(|_| TOKENS[rng.below(TOKENS.len())]).collect();
                items.join(if case % 3 == 0 { "" } else { "," }).into_bytes()
            };
            let Ok(record) = SetRecord::decode(&value) else { continue };
            assert!(record.members.iter().all(|m| !m.addrs.is_empty()));
            let text = record.encode();
            if text.len() <= MAX_VALUE {
                assert_eq!(SetRecord::decode(text.as_bytes()).as_ref(), Ok(&record), "{value:?}");
            }
            if let Ok(merged) = record.merge(member(&["10.9.9.9:1"], None), NOW) {
                assert!(merged.members.len() <= MAX_SET_MEMBERS && merged.encode().len() <= MAX_VALUE);
            }
        }
    }
}
