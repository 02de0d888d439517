use super::requests::plausible;
use super::*;
use crate::hello::Stamp;
use crate::message::Instance;
use crate::role::RoleQuery;
use crate::testing::{Chunker, Net, Peer as _, RawPeer, keypair};

/// A registry and one raw peer with an established session to it.
fn connected(config: RegistryConfig) -> Net<RawPeer> {
    let mut net = Net::new(Registry::new(keypair(1), config), Chunker::whole());
    net.add(RawPeer::new());
    net.connect(0, &keypair(2));
    assert!(net.peers[0].peer.is_established());
    net
}

/// Sends `msgs` from the peer, pumps, and returns what came back.
fn exchange(net: &mut Net<RawPeer>, msgs: &[Message]) -> Vec<Message> {
    for msg in msgs {
        assert!(net.peers[0].peer.send(msg));
    }
    net.pump();
    net.peers[0].peer.take_messages()
}

/// Why the registry closed the last session it closed.
fn close_reason(net: &Net<RawPeer>) -> Option<CloseReason> {
    net.events.iter().rev().find_map(|e| match e {
        RegistryEvent::SessionClosed { reason, .. } => Some(reason.clone()),
        _ => None,
    })
}

/// Roles `NAME@1.0.N` for N in `range`, each with 16 tags of 64
/// characters (about 1.1 KB an instance), as registrations `N`.
fn big_registrations(name: &str, range: std::ops::Range<u32>) -> Vec<Message> {
    let tags: Vec<String> = (0..16).map(|i| format!("{i:02}{}", "t".repeat(62))).collect();
    range
        .map(|reg| {
            let role = Role::parse(&format!("{name}@1.0.{reg}")).unwrap().with_tags(tags.clone()).unwrap();
            Message::Register { id: reg, role, port: 1, addrs: vec![] }
        })
        .collect()
}

/// The instances of one whole answer to `id` at the front of `got`
/// (parts, then the last `Instances`), its `truncated`, and how many
/// messages it took; the messages are removed.
fn whole_answer(got: &mut Vec<Message>, id: u32) -> (Vec<Instance>, bool, usize) {
    let mut instances = Vec::new();
    let mut messages = 0;
    while !got.is_empty() {
        messages += 1;
        match got.remove(0) {
            Message::InstancesPart { id: got_id, instances: part } if got_id == id => instances.extend(part),
            Message::Instances { id: got_id, instances: last, truncated } if got_id == id => {
                instances.extend(last);
                return (instances, truncated, messages);
            }
            other => panic!("expected a part of answer {id}, got {other:?}"),
        }
    }
    panic!("answer {id} never ended")
}

#[test]
fn a_large_answer_comes_whole_in_parts_and_an_older_peer_gets_it_cut_and_flagged() {
    let config = RegistryConfig { max_registrations: 300, ..RegistryConfig::default() };
    let mut net = connected(config);
    assert_eq!(exchange(&mut net, &big_registrations("big", 0..300)).len(), 300);
    let query = RoleQuery::parse("big").unwrap();
    let mut answer = exchange(&mut net, &[Message::Lookup { id: 7, query: query.clone() }]);
    let (instances, truncated, messages) = whole_answer(&mut answer, 7);
    assert!(answer.is_empty(), "{answer:?}");
    assert!(messages > 1, "300 big instances do not fit one frame");
    assert!(!truncated);
    let versions: Vec<String> = instances.iter().map(|i| i.role.to_string()).collect();
    let expected: Vec<String> = (0..300).map(|n| format!("big@1.0.{n}")).collect();
    assert_eq!(versions, expected, "all of them, oldest first");

    // A peer from before parts: one message, cut, and flagged.
    let id = net.peers[0].session.unwrap();
    net.registry.set_remote_capabilities(id, Capabilities::MEET);
    let answer = exchange(&mut net, &[Message::Lookup { id: 8, query }]);
    let [Message::Instances { id: 8, instances, truncated: true }] = answer.as_slice() else {
        panic!("expected one truncated answer, got {answer:?}");
    };
    assert!(!instances.is_empty() && instances.len() < 300, "{}", instances.len());
}

/// Sends `msgs` from raw peer `i` in one read, and takes whatever the
/// registry queues without ever reporting it written: a peer that asks
/// and does not read. Returns the registry's events.
fn ask_without_reading(net: &mut Net<RawPeer>, i: usize, msgs: &[Message]) -> Vec<RegistryEvent> {
    for msg in msgs {
        assert!(net.peers[i].peer.send(msg));
    }
    let mut wire = Vec::new();
    net.peers[i].peer.poll_transmit(&mut wire);
    let id = net.peers[i].session.unwrap();
    let now = net.now;
    net.registry.handle_input(now, id, &wire);
    let mut sink = Vec::new();
    while net.registry.poll_transmit(&mut sink).is_some() {}
    std::iter::from_fn(|| net.registry.poll_event()).collect()
}

#[test]
fn a_peer_that_asks_faster_than_it_reads_is_dropped_at_its_cap_not_after_it() {
    let max_queued = 256 * 1024;
    let config = RegistryConfig { max_queued, max_registrations: 50, ..RegistryConfig::default() };
    let mut net = connected(config);
    exchange(&mut net, &big_registrations("big", 0..50));
    // About 55 KB an answer; 400 lookups would queue 22 MB.
    let lookups: Vec<Message> =
        (0..400).map(|id| Message::Lookup { id, query: RoleQuery::parse("big").unwrap() }).collect();
    let events = ask_without_reading(&mut net, 0, &lookups);
    let slow = events.iter().find_map(|e| match e {
        RegistryEvent::SessionClosed { reason: CloseReason::Slow(queued), .. } => Some(*queued),
        _ => None,
    });
    let queued = slow.expect("the peer is dropped as slow");
    assert!(queued <= max_queued, "{queued} bytes were queued for it, over the cap of {max_queued}");
    assert!(queued > max_queued / 2, "what fitted was queued: {queued}");
    assert_eq!(net.registry.session_count(), 0);
    assert_eq!(net.registry.queued_bytes(), 0, "nothing is counted for a dropped peer");
}

#[test]
fn churn_gives_each_watch_one_latest_update_and_drops_no_honest_watcher() {
    let config = RegistryConfig { max_registrations: 64, ..RegistryConfig::default() };
    let mut net = connected(config);
    exchange(&mut net, &big_registrations("big", 0..50));
    let query = RoleQuery::parse("big").unwrap();
    for w in 1..=10 {
        net.add(RawPeer::new());
        net.connect_established(w, &keypair(10 + w as u8));
        let mut got = net.exchange(w, &Message::Watch { id: 1, query: query.clone() });
        assert_eq!(whole_answer(&mut got, 1).0.len(), 50);
    }
    // 20 register/unregister pairs in one go: 40 changes of a 55 KB set,
    // 2.2 MB for each watcher if each change were queued.
    let mut churn = Vec::new();
    for _ in 0..20 {
        churn.extend(big_registrations("big", 50..51));
        churn.push(Message::Unregister { id: 50 });
    }
    exchange(&mut net, &churn);
    assert_eq!(net.registry.session_count(), 11, "{:?}", close_reason(&net));
    for w in 1..=10 {
        let mut got = net.peers[w].peer.take_messages();
        let (instances, truncated, _) = whole_answer(&mut got, 1);
        assert!(got.is_empty(), "watcher {w} got one update, not {}", got.len() + 1);
        assert_eq!((instances.len(), truncated), (50, false), "the latest set");
    }
}

#[test]
fn total_registrations_and_queued_bytes_are_capped_across_sessions() {
    let config = RegistryConfig {
        max_total_registrations: 3,
        max_queued: 200 * 1024,
        max_total_queued: 300 * 1024,
        ..RegistryConfig::default()
    };
    let mut net = connected(config);
    net.add(RawPeer::new());
    net.connect_established(1, &keypair(3));
    exchange(&mut net, &big_registrations("big", 0..2));
    let got = net.exchange(1, &big_registrations("big", 2..4)[0]);
    assert_eq!(got, vec![Message::Registered { id: 2 }]);
    let got = net.exchange(1, &big_registrations("big", 3..4)[0]);
    assert!(matches!(&got[..], [Message::Error { id: Some(3), code: ErrorCode::LIMIT, .. }]), "{got:?}");
    assert_eq!(net.registry.instance_count(), 3);

    // Make the answer about 40 KB: replace the three with 36 of one owner.
    net.close(1);
    let config = RegistryConfig { max_total_registrations: 100, ..net.registry.config.clone() };
    net.registry.config = config;
    exchange(&mut net, &big_registrations("big", 2..36));
    let lookup = |id| Message::Lookup { id, query: RoleQuery::parse("big").unwrap() };
    // Two peers that ask and never read fill the budget between them.
    for (i, n) in [(1, 11u8), (2, 12)] {
        net.add(RawPeer::new());
        net.connect_established(i, &keypair(n));
        let lookups: Vec<Message> = (0..4).map(lookup).collect();
        ask_without_reading(&mut net, i, &lookups);
        assert!(net.registry.queued_bytes() <= 300 * 1024, "{}", net.registry.queued_bytes());
    }
    assert!(net.registry.queued_bytes() > 200 * 1024);
    // A peer that reads is refused for now, and keeps its session.
    let got = exchange(&mut net, &[lookup(9)]);
    assert!(matches!(&got[..], [Message::Error { id: Some(9), code: ErrorCode::LIMIT, .. }]), "{got:?}");
    assert!(net.registry.session_count() >= 2);
    // Once the others are gone, there is room again.
    net.close(1);
    net.close(2);
    let mut got = exchange(&mut net, &[lookup(10)]);
    assert_eq!(whole_answer(&mut got, 10).0.len(), 36);
}

#[test]
fn a_watch_update_waits_for_the_total_budget_and_goes_once_there_is_room() {
    let config = RegistryConfig {
        max_registrations: 100,
        max_queued: 200 * 1024,
        max_total_queued: 300 * 1024,
        ..RegistryConfig::default()
    };
    let mut net = connected(config);
    exchange(&mut net, &big_registrations("big", 0..36));
    // Peer 1 watches (and reads); peers 2 and 3 ask and never read.
    net.add(RawPeer::new());
    net.connect_established(1, &keypair(11));
    let query = RoleQuery::parse("big").unwrap();
    let mut got = net.exchange(1, &Message::Watch { id: 1, query: query.clone() });
    assert_eq!(whole_answer(&mut got, 1).0.len(), 36);
    for (i, n) in [(2, 12u8), (3, 13)] {
        net.add(RawPeer::new());
        net.connect_established(i, &keypair(n));
        let lookups: Vec<Message> = (0..4).map(|id| Message::Lookup { id, query: query.clone() }).collect();
        ask_without_reading(&mut net, i, &lookups);
    }
    let full = net.registry.queued_bytes();
    assert!(full > 250 * 1024 && full <= 300 * 1024, "{full}");
    // A change: the watcher's update does not fit the budget, so it waits.
    exchange(&mut net, &[Message::Unregister { id: 0 }]);
    assert_eq!(net.peers[1].peer.take_messages(), vec![], "no room yet");
    assert_eq!(net.registry.session_count(), 4, "no one dropped for it");
    // The non-readers leave: the update goes, with the set as it is now.
    net.close(2);
    net.close(3);
    net.pump();
    let mut got = net.peers[1].peer.take_messages();
    assert_eq!(whole_answer(&mut got, 1).0.len(), 35);
    assert!(got.is_empty(), "{got:?}");
}

/// An ACL of grants given as (keys, register, lookup); a key `0` is "*".
fn acl(grants: &[(&[u8], &[&str], &[&str])]) -> Acl {
    use crate::acl::{Grant, Grantees, Pattern};
    let patterns = |ps: &[&str]| ps.iter().map(|p| Pattern::parse(p).unwrap()).collect();
    Acl::new(
        grants
            .iter()
            .map(|(keys, register, lookup)| Grant {
                keys: if keys.contains(&0) {
                    Grantees::Anyone
                } else {
                    Grantees::Keys(keys.iter().map(|n| keypair(*n).public()).collect())
                },
                register: patterns(register),
                lookup: patterns(lookup),
            })
            .collect(),
    )
}

#[test]
fn under_an_acl_a_key_in_no_grant_holds_no_session() {
    let now = Instant::now();
    let mut registry =
        Registry::new(keypair(1), RegistryConfig { max_sessions: 2, ..RegistryConfig::default() });
    registry.set_acl(Some(acl(&[(&[2], &["db"], &[])])));
    // Strangers (keys 3..8) complete handshakes: each is told and closed.
    for n in 3..8u8 {
        let (mut hand, hello) = Hand::start(&mut registry, now, n, Stamp { process: 1, counter: 1 });
        let got = hand.feed(&mut registry, now, &hello);
        assert!(matches!(&got[..], [Message::Error { id: None, code: ErrorCode::FORBIDDEN, .. }]), "{got:?}");
    }
    let closed_forbidden = closed(&mut registry).iter().filter(|(_, r)| *r == CloseReason::Forbidden).count();
    assert_eq!(closed_forbidden, 5);
    assert_eq!(registry.session_count(), 0);
    // The granted key still gets in, slots untouched.
    let (mut granted, hello) = Hand::start(&mut registry, now, 2, Stamp { process: 1, counter: 1 });
    granted.feed(&mut registry, now, &hello);
    assert_eq!(
        granted.send(&mut registry, now, &register(1, "db@1.0.0")),
        vec![Message::Registered { id: 1 }]
    );
}

fn register(id: u32, role: &str) -> Message {
    Message::Register { id, role: Role::parse(role).unwrap(), port: 1, addrs: vec![] }
}

fn forbidden(got: &[Message], id: u32) -> bool {
    matches!(got, [Message::Error { id: Some(got_id), code: ErrorCode::FORBIDDEN, .. }] if *got_id == id)
}

#[test]
fn the_acl_lets_a_key_register_and_look_up_only_what_it_is_granted() {
    // Peer 0 is key 2, the real service; peer 1 is key 3, an attacker;
    // peer 2 is key 4, a proxy that may look up couchdb only.
    let mut net = connected(RegistryConfig::default());
    net.registry.set_acl(Some(acl(&[
        (&[2], &["couchdb", "@acme/*"], &[]),
        (&[4], &[], &["couchdb"]),
        (&[0], &[], &["public"]),
    ])));
    net.add(RawPeer::new());
    net.connect_established(1, &keypair(3));
    net.add(RawPeer::new());
    net.connect_established(2, &keypair(4));

    let got = net.exchange(1, &register(1, "couchdb@3.2.2"));
    assert!(forbidden(&got, 1), "{got:?}");
    let Message::Error { text, .. } = &got[0] else { unreachable!() };
    assert!(text.contains("couchdb@3.2.2") && text.contains(&keypair(3).public().to_string()), "{text}");
    assert!(net.events.iter().any(|e| matches!(e, RegistryEvent::Forbidden { .. })));
    let got = exchange(&mut net, &[register(1, "couchdb@3.2.2"), register(2, "@acme/web@1.0.0")]);
    assert_eq!(got, vec![Message::Registered { id: 1 }, Message::Registered { id: 2 }]);
    assert!(forbidden(&exchange(&mut net, &[register(3, "redis@7.0.0")]), 3));
    assert_eq!(net.registry.instance_count(), 2);
    assert_eq!(net.registry.session_count(), 3, "refusals keep sessions");

    // Lookups and watches: only granted names; the watch sees couchdb alone.
    let query = |q: &str| RoleQuery::parse(q).unwrap();
    assert!(forbidden(&net.exchange(2, &Message::Lookup { id: 5, query: query("@acme/web") }), 5));
    assert!(forbidden(&net.exchange(2, &Message::Watch { id: 6, query: query("@acme/web") }), 6));
    assert!(forbidden(&net.exchange(1, &Message::Watch { id: 6, query: query("couchdb") }), 6));
    let mut got = net.exchange(2, &Message::Watch { id: 7, query: query("couchdb") });
    let (instances, _, _) = whole_answer(&mut got, 7);
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].key, keypair(2).public());
    // "*" names any key, for what it grants.
    let got = net.exchange(1, &Message::Lookup { id: 8, query: query("public") });
    assert!(matches!(&got[..], [Message::Instances { id: 8, .. }]), "{got:?}");
    // A meeting only with a service the asker may look up; to others it is
    // unknown, exactly as one that is not registered.
    let service = keypair(2).public();
    let got = net.exchange(1, &Message::Meet { id: 9, service, role: Role::parse("couchdb@3.2.2").unwrap() });
    assert!(matches!(&got[..], [Message::Error { id: Some(9), code: ErrorCode::UNKNOWN, .. }]), "{got:?}");
    let got =
        net.exchange(2, &Message::Meet { id: 10, service, role: Role::parse("couchdb@3.2.2").unwrap() });
    assert!(matches!(&got[..], [Message::MeetReady { id: 10, .. }]), "{got:?}");
}

#[test]
fn a_new_acl_withdraws_what_it_no_longer_grants_and_tells_everyone() {
    let mut net = connected(RegistryConfig::default());
    net.registry.set_acl(Some(acl(&[(&[2], &["couchdb", "web"], &[]), (&[4], &[], &["couchdb", "web"])])));
    let got = exchange(&mut net, &[register(1, "couchdb@3.2.2"), register(2, "web@1.0.0")]);
    assert_eq!(got.len(), 2);
    net.add(RawPeer::new());
    net.connect_established(1, &keypair(4));
    let query = |q: &str| RoleQuery::parse(q).unwrap();
    assert_eq!(net.exchange(1, &Message::Watch { id: 1, query: query("couchdb") }).len(), 1);
    assert_eq!(net.exchange(1, &Message::Watch { id: 2, query: query("web") }).len(), 1);

    // Key 2 may no longer register couchdb; key 4 may no longer watch web.
    net.registry.set_acl(Some(acl(&[(&[2], &["web"], &[]), (&[4], &[], &["couchdb"])])));
    net.pump();
    let service = net.peers[0].peer.take_messages();
    assert!(forbidden(&service, 1), "the service hears its registration was revoked: {service:?}");
    let proxy = net.peers[1].peer.take_messages();
    assert!(
        proxy.iter().any(|m| matches!(m, Message::Error { id: Some(2), code: ErrorCode::FORBIDDEN, .. })),
        "the web watch ends with an error: {proxy:?}"
    );
    assert!(
        proxy.contains(&Message::Instances { id: 1, instances: vec![], truncated: false }),
        "the couchdb watcher is told its instance left: {proxy:?}"
    );
    assert_eq!(net.registry.instance_count(), 1);
    assert_eq!(net.registry.directory().watch_count(net.peers[1].session.unwrap()), 1);
    assert!(net.events.iter().any(|e| matches!(e, RegistryEvent::Unregistered { .. })));
    assert_eq!(net.registry.session_count(), 2, "sessions go on");

    // No list at all: anyone may do anything again.
    net.registry.set_acl(None);
    assert_eq!(exchange(&mut net, &[register(1, "couchdb@3.2.2")]), vec![Message::Registered { id: 1 }]);
}

#[test]
fn a_service_may_name_its_own_and_private_addresses_but_no_third_party() {
    let public: SocketAddr = "203.0.113.21:4000".parse().unwrap();
    let local: SocketAddr = "127.0.0.1:4000".parse().unwrap();
    let yes = |a: &str, o| assert!(plausible(a.parse().unwrap(), o), "{a} from {o}");
    let no = |a: &str, o| assert!(!plausible(a.parse().unwrap(), o), "{a} from {o}");
    yes("203.0.113.21:7000", public);
    yes("192.168.1.2:7000", public);
    yes("10.1.2.3:7000", public);
    yes("172.16.0.9:7000", public);
    yes("100.64.0.1:7000", public);
    yes("[fd00::1]:7000", public);
    yes("127.0.0.1:7000", local);
    no("198.51.100.7:443", public);
    no("127.0.0.1:22", public);
    no("[2001:db8::1]:80", public);
    no("100.128.0.1:7000", public);

    let mut net = connected(RegistryConfig::default());
    let role = Role::parse("db@1.0.0").unwrap();
    let addrs = vec!["192.168.1.2:7000".parse().unwrap(), "198.51.100.7:443".parse().unwrap()];
    exchange(&mut net, &[Message::Register { id: 1, role, port: 7000, addrs }]);
    let got = exchange(&mut net, &[Message::Lookup { id: 2, query: RoleQuery::parse("db").unwrap() }]);
    let [Message::Instances { instances, .. }] = &got[..] else { panic!("{got:?}") };
    let expected: Vec<SocketAddr> =
        vec![SocketAddr::new(crate::testing::observed(0).ip(), 7000), "192.168.1.2:7000".parse().unwrap()];
    assert_eq!(instances[0].addrs, expected);
}

#[test]
fn silent_connections_from_one_source_cannot_keep_a_service_out() {
    let config = RegistryConfig {
        max_sessions: 2,
        max_handshakes: 8,
        max_handshakes_per_source: 3,
        ..RegistryConfig::default()
    };
    let mut net = connected(config.clone());
    let now = net.now;
    let attacker: SocketAddr = "198.51.100.9:1".parse().unwrap();
    for n in 0..3u8 {
        net.registry.accept(now, SocketAddr::new(attacker.ip(), u16::from(n)), [n; 32]).unwrap();
    }
    assert_eq!(net.registry.accept(now, attacker, [9; 32]), Err(Full::Source(Source::of(attacker.ip()), 3)));
    // A service from elsewhere still gets in and registers.
    net.add(RawPeer::new());
    net.connect(1, &keypair(3));
    let role = Role::parse("db@1.0.0").unwrap();
    let got = net.exchange(1, &Message::Register { id: 1, role, port: 1, addrs: vec![] });
    assert_eq!(got, vec![Message::Registered { id: 1 }]);
    // Two sessions are the limit: a third is refused, handshakes or not.
    assert_eq!(net.registry.accept(now, "192.0.2.1:1".parse().unwrap(), [1; 32]), Err(Full::Sessions(2)));
    // The silent ones time out and free their source's slots.
    net.advance(now + config.handshake_timeout + Duration::from_secs(2));
    net.close(1);
    assert!(net.registry.accept(net.now, attacker, [9; 32]).is_ok());
}

#[test]
fn a_newer_peers_unknown_request_is_refused_and_the_session_goes_on() {
    let mut net = connected(RegistryConfig::default());
    // Kind 40, request id 9, then fields this build cannot read.
    let mut newer = postcard::to_allocvec(&(40u32, 9u32)).unwrap();
    newer.extend_from_slice(b"\x03new");
    assert!(net.peers[0].peer.send_plain(&newer));
    let role = Role::parse("db@1.0.0").unwrap();
    let got = exchange(&mut net, &[Message::Register { id: 1, role, port: 1, addrs: vec![] }]);
    assert!(
        matches!(
            &got[..],
            [Message::Error { id: Some(9), code: ErrorCode::UNSUPPORTED, .. }, Message::Registered { id: 1 }]
        ),
        "{got:?}"
    );
    assert_eq!(net.registry.session_count(), 1);
    assert_eq!(net.registry.instance_count(), 1);
    // A known kind that is malformed still ends the session.
    assert!(net.peers[0].peer.send_plain(&[3, 1]));
    let got = exchange(&mut net, &[]);
    assert!(matches!(&got[..], [Message::Error { id: None, code: ErrorCode::MALFORMED, .. }]), "{got:?}");
    assert_eq!(net.registry.session_count(), 0);
}

#[test]
fn close_reasons_say_what_the_peer_did() {
    let mut net = connected(RegistryConfig::default());
    assert!(net.peers[0].peer.send_plain(&[3, 1]));
    exchange(&mut net, &[]);
    assert!(matches!(close_reason(&net), Some(CloseReason::Malformed(MessageError::Malformed(_)))));

    let mut net = connected(RegistryConfig::default());
    exchange(&mut net, &[Message::Registered { id: 1 }]);
    let reason = close_reason(&net).unwrap();
    assert_eq!(reason, CloseReason::WrongDirection("Registered"));
    assert_eq!(reason.to_string(), "peer sent a Registered message, which only a registry sends");

    let mut net = connected(RegistryConfig::default());
    exchange(&mut net, &[Message::Error { id: None, code: ErrorCode::LIMIT, text: "bye".into() }]);
    let reason = close_reason(&net).unwrap();
    assert_eq!(reason, CloseReason::PeerError { code: ErrorCode::LIMIT, text: "bye".into() });
    assert_eq!(reason.to_string(), "peer reported an error: limit: bye");
}

#[test]
fn limits_refuse_without_ending_the_session() {
    let config = RegistryConfig { max_registrations: 1, max_watches: 1, ..RegistryConfig::default() };
    let mut net = connected(config);
    let role = Role::parse("db@1.0.0").unwrap();
    let query = RoleQuery::parse("db").unwrap();
    let got = exchange(
        &mut net,
        &[
            Message::Register { id: 1, role: role.clone(), port: 1, addrs: vec![] },
            Message::Register { id: 2, role, port: 1, addrs: vec![] },
            Message::Watch { id: 1, query: query.clone() },
            Message::Watch { id: 2, query },
        ],
    );
    let limits = got.iter().filter(|m| matches!(m, Message::Error { code: ErrorCode::LIMIT, .. })).count();
    assert_eq!(limits, 2, "{got:?}");
    assert_eq!(net.registry.instance_count(), 1);
    assert_eq!(net.registry.session_count(), 1);
}

#[test]
fn the_testing_shortcut_opens_a_session_like_a_handshake_does() {
    let mut net = connected(RegistryConfig::default());
    net.add(RawPeer::new());
    net.connect_established(1, &keypair(3));
    let opened = net.events.iter().filter(|e| matches!(e, RegistryEvent::SessionOpened { .. })).count();
    assert_eq!(opened, 2);
    let got = net.exchange(1, &Message::Ping { nonce: 5 });
    assert_eq!(got, vec![Message::Pong { nonce: 5 }]);
    // Same identity as peer 0 (both unstamped: one process): it
    // supersedes that session, once it has said something.
    net.exchange(0, &Message::Ping { nonce: 4 });
    net.connect_established(1, &keypair(2));
    assert_eq!(net.registry.session_count(), 2, "no supersede on the handshake alone");
    net.exchange(1, &Message::Ping { nonce: 6 });
    assert_eq!(close_reason(&net), Some(CloseReason::Superseded));
    assert_eq!(net.registry.session_count(), 1);
}

/// A stamped session of `who` driven by hand: its first message, and a
/// way to feed it the registry's answers.
struct Hand {
    session: Session,
    id: SessionId,
}

impl Hand {
    fn start(registry: &mut Registry, now: Instant, who: u8, stamp: Stamp) -> (Hand, Vec<u8>) {
        let id = registry.accept(now, crate::testing::observed(usize::from(who)), [who; 32]).unwrap();
        let mut session = Session::initiate_stamped(
            now,
            &keypair(who),
            &registry.public_key(),
            Intent::Control,
            [who ^ 0x55; 32],
            Duration::from_secs(10),
            Some(stamp),
        )
        .unwrap();
        let mut first = Vec::new();
        session.poll_transmit(&mut first);
        (Hand { session, id }, first)
    }

    /// Feeds `bytes` to the registry as this session's, then everything
    /// the registry sends back to the session.
    fn feed(&mut self, registry: &mut Registry, now: Instant, bytes: &[u8]) -> Vec<Message> {
        registry.handle_input(now, self.id, bytes);
        let mut buf = Vec::new();
        while let Some(to) = registry.poll_transmit(&mut buf) {
            if to == self.id {
                let _ = self.session.handle_input(now, &buf);
            }
            buf.clear();
        }
        std::iter::from_fn(|| self.session.poll_message()).map(|p| Message::decode(&p).unwrap()).collect()
    }

    fn send(&mut self, registry: &mut Registry, now: Instant, msg: &Message) -> Vec<Message> {
        let mut plain = Vec::new();
        msg.encode(&mut plain).unwrap();
        self.session.send(&plain).unwrap();
        let mut wire = Vec::new();
        self.session.poll_transmit(&mut wire);
        self.feed(registry, now, &wire)
    }
}

fn closed(registry: &mut Registry) -> Vec<(SessionId, CloseReason)> {
    std::iter::from_fn(|| registry.poll_event())
        .filter_map(|e| match e {
            RegistryEvent::SessionClosed { id, reason, .. } => Some((id, reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_replayed_first_message_is_refused_and_leaves_the_real_session_alone() {
    let now = Instant::now();
    let mut registry = Registry::new(keypair(1), RegistryConfig::default());
    let stamp = Stamp { process: 7, counter: 1 };
    let (mut real, first) = Hand::start(&mut registry, now, 2, stamp);
    real.feed(&mut registry, now, &first);
    let role = Role::parse("db@1.0.0").unwrap();
    let got = real.send(&mut registry, now, &Message::Register { id: 1, role, port: 1, addrs: vec![] });
    assert_eq!(got, vec![Message::Registered { id: 1 }]);
    closed(&mut registry);

    // The captured first message, replayed on new connections.
    for n in 0..5u8 {
        let replay = registry.accept(now, crate::testing::observed(50 + usize::from(n)), [n; 32]).unwrap();
        registry.handle_input(now, replay, &first);
        assert_eq!(closed(&mut registry), vec![(replay, CloseReason::Replayed)]);
        let mut buf = Vec::new();
        assert_ne!(registry.poll_transmit(&mut buf), Some(replay), "a replayer is told nothing");
    }
    assert_eq!(registry.session_count(), 1);
    assert_eq!(registry.instance_count(), 1);
    assert_eq!(real.send(&mut registry, now, &Message::Ping { nonce: 1 }), vec![Message::Pong { nonce: 1 }]);

    // The same process's next session is newer: it takes over once it speaks.
    let (mut next, first) = Hand::start(&mut registry, now, 2, Stamp { process: 7, counter: 2 });
    next.feed(&mut registry, now, &first);
    assert!(closed(&mut registry).is_empty(), "not on the handshake alone");
    next.send(&mut registry, now, &Message::Ping { nonce: 2 });
    assert_eq!(closed(&mut registry), vec![(real.id, CloseReason::Superseded)]);
    assert_eq!(registry.session_count(), 1);
}

#[test]
fn handshakes_completing_past_the_session_limit_never_free_a_slot() {
    let now = Instant::now();
    let config = RegistryConfig { max_sessions: 2, ..RegistryConfig::default() };
    let mut registry = Registry::new(keypair(1), config);
    let (mut first, hello) = Hand::start(&mut registry, now, 2, Stamp { process: 1, counter: 1 });
    first.feed(&mut registry, now, &hello);
    // Three handshakes start while a slot is free; all complete.
    let started: Vec<_> =
        (3..6u8).map(|n| Hand::start(&mut registry, now, n, Stamp { process: 1, counter: 1 })).collect();
    for (mut hand, hello) in started {
        hand.feed(&mut registry, now, &hello);
    }
    let refused = closed(&mut registry).iter().filter(|(_, r)| *r == CloseReason::Full(2)).count();
    assert_eq!(refused, 2, "one took the last slot, two were refused");
    assert_eq!(registry.session_count(), 2);
    // Still full: the refused ones gave back nothing they did not hold.
    let again = registry.accept(now, crate::testing::observed(9), [9; 32]);
    assert_eq!(again, Err(Full::Sessions(2)));
}

#[test]
fn two_processes_of_one_identity_keep_their_own_sessions_and_registrations() {
    let now = Instant::now();
    let mut registry = Registry::new(keypair(1), RegistryConfig::default());
    let mut hands = Vec::new();
    for (process, role) in [(1, "couchdb@3.2.2"), (2, "redis@7.0.0")] {
        let (mut hand, first) = Hand::start(&mut registry, now, 2, Stamp { process, counter: 1 });
        hand.feed(&mut registry, now, &first);
        let role = Role::parse(role).unwrap();
        let got = hand.send(&mut registry, now, &Message::Register { id: 0, role, port: 1, addrs: vec![] });
        assert_eq!(got, vec![Message::Registered { id: 0 }]);
        hands.push(hand);
    }
    // Again and again, as two supervised units would: nothing is superseded.
    for hand in &mut hands {
        assert_eq!(
            hand.send(&mut registry, now, &Message::Ping { nonce: 3 }),
            vec![Message::Pong { nonce: 3 }]
        );
    }
    assert!(closed(&mut registry).is_empty());
    assert_eq!(registry.session_count(), 2);
    assert_eq!(registry.instance_count(), 2);
}

#[test]
fn a_meeting_is_arranged_only_with_a_registered_service_and_within_budget() {
    let config = RegistryConfig {
        meet: MeetConfig { burst: 2, per_session: 2, ..MeetConfig::default() },
        ..RegistryConfig::default()
    };
    let mut net = connected(config);
    let service = keypair(2);
    net.add(RawPeer::new());
    net.connect(1, &keypair(3));
    let proxy = keypair(3).public();
    // Not registered yet: unknown.
    let role = Role::parse("db@1.0.0").unwrap();
    let got = net.exchange(1, &Message::Meet { id: 1, service: service.public(), role: role.clone() });
    assert!(matches!(&got[..], [Message::Error { id: Some(1), code: ErrorCode::UNKNOWN, .. }]), "{got:?}");
    exchange(&mut net, &[Message::Register { id: 1, role: role.clone(), port: 1, addrs: vec![] }]);

    let got = net.exchange(1, &Message::Meet { id: 2, service: service.public(), role: role.clone() });
    let [Message::MeetReady { id: 2, ticket }] = got[..] else { panic!("{got:?}") };
    let offered = net.peers[0].peer.take_messages();
    let [Message::MeetOffer { ticket: offered, proxy: asker }] = offered[..] else { panic!("{offered:?}") };
    assert_eq!(asker, proxy, "the service hears who asked");
    let (at_service, at_proxy) = (crate::testing::observed(0).ip(), crate::testing::observed(1).ip());
    assert!(net.events.iter().any(|e| matches!(e, RegistryEvent::MeetArranged { .. })));

    // Both sides arrive; the meeting is then used up.
    let now = net.now;
    let first = net.registry.arrive(now, ticket, MeetSide::Proxy, at_proxy);
    assert!(matches!(first, Ok(Arrival::First { .. })), "{first:?}");
    let second = net.registry.arrive(now, offered, MeetSide::Service, at_service);
    assert!(matches!(second, Ok(Arrival::Second { .. })), "{second:?}");
    assert_eq!(net.registry.arrive(now, offered, MeetSide::Service, at_service), Err(ArrivalError::Unknown));

    // The budget: one more, then refused, and the session goes on.
    let got = net.exchange(1, &Message::Meet { id: 3, service: service.public(), role: role.clone() });
    let [Message::MeetReady { id: 3, ticket: waiting }] = got[..] else { panic!("{got:?}") };
    let got = net.exchange(1, &Message::Meet { id: 4, service: service.public(), role });
    assert!(matches!(&got[..], [Message::Error { id: Some(4), code: ErrorCode::LIMIT, .. }]), "{got:?}");
    assert_eq!(net.registry.session_count(), 2);

    // A meeting goes with the service's session.
    net.close(0);
    assert_eq!(net.registry.arrive(now, waiting, MeetSide::Proxy, at_proxy), Err(ArrivalError::Unknown));
}

#[test]
fn only_a_registry_sends_meeting_answers_and_offers() {
    let mut net = connected(RegistryConfig::default());
    exchange(&mut net, &[Message::MeetOffer { ticket: Ticket([1; 16]), proxy: keypair(9).public() }]);
    assert_eq!(close_reason(&net), Some(CloseReason::WrongDirection("MeetOffer")));
}

#[test]
fn many_addresses_of_one_ipv6_slash_64_fill_only_that_sources_share_of_handshakes() {
    // The attack: 1,100 addresses of one /64, each stalling mid-handshake.
    let config =
        RegistryConfig { max_handshakes: 1024, max_handshakes_per_source: 16, ..RegistryConfig::default() };
    let mut net = connected(config);
    let now = net.now;
    let mut refused = 0;
    for n in 0..1100u16 {
        let addr = SocketAddr::new(format!("2001:db8:7:7::{n:x}").parse().unwrap(), 4000);
        match net.registry.accept(now, addr, [1; 32]) {
            Ok(_) => {}
            Err(Full::Source(source, 16)) => {
                assert_eq!(source.to_string(), "2001:db8:7:7::/64");
                refused += 1;
            }
            Err(other) => panic!("refused as {other:?}, not per source"),
        }
    }
    assert_eq!(refused, 1100 - 16, "one /64 holds at most its 16 handshakes");
    // Another /64 (and IPv4) still start handshakes.
    assert!(net.registry.accept(now, "[2001:db8:7:8::1]:1".parse().unwrap(), [2; 32]).is_ok());
    assert!(net.registry.accept(now, "192.0.2.1:1".parse().unwrap(), [3; 32]).is_ok());
}

#[test]
fn a_key_cannot_meet_itself() {
    // The attack: one key registers a role, then asks for a meeting with
    // its own registration, to have the registry splice two of its sockets.
    let mut net = connected(RegistryConfig::default());
    let role = Role::parse("db@1.0.0").unwrap();
    exchange(&mut net, &[Message::Register { id: 1, role: role.clone(), port: 1, addrs: vec![] }]);
    let me = keypair(2).public();
    let got = exchange(&mut net, &[Message::Meet { id: 2, service: me, role }]);
    assert!(
        matches!(&got[..], [Message::Error { id: Some(2), code: ErrorCode::UNSUPPORTED, text }] if text.contains("itself")),
        "{got:?}"
    );
    assert!(!net.events.iter().any(|e| matches!(e, RegistryEvent::MeetArranged { .. })));
    assert_eq!(net.registry.session_count(), 1, "the session goes on");
}
