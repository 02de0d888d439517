//! Each rule of the link on its own: what a peer may not do and what
//! happens when it does, and the bookkeeping of one stream's life.

use super::*;
use config::MAX_INTERVAL;

fn t0() -> Instant {
    Instant::now()
}

fn frame(f: Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    f.encode(&mut out);
    out
}

/// Everything `link` wants to send, decoded.
fn sent(link: &mut Link) -> Vec<Frame<'static>> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while link.poll_transmit(Instant::now(), &mut buf) {
        let f = Frame::decode(&buf).unwrap();
        out.push(match f {
            Frame::Data { .. } => panic!("data from poll_transmit"),
            Frame::Open { id, window, client } => Frame::Open { id, window, client },
            Frame::Accept { id, window } => Frame::Accept { id, window },
            Frame::End { id } => Frame::End { id },
            Frame::Reset { id, reason } => Frame::Reset { id, reason },
            Frame::Window { id, increment } => Frame::Window { id, increment },
            Frame::Ping { nonce } => Frame::Ping { nonce },
            Frame::Pong { nonce } => Frame::Pong { nonce },
            Frame::GoAway { reason } => Frame::GoAway { reason },
            Frame::Ack { received } => Frame::Ack { received },
            Frame::Resume { received, token } => Frame::Resume { received, token },
            Frame::Resumed { received } => Frame::Resumed { received },
            Frame::Datagram { .. } => panic!("a datagram from poll_transmit"),
        });
        buf.clear();
    }
    out
}

fn events(link: &mut Link) -> Vec<LinkEvent> {
    std::iter::from_fn(|| link.poll_event()).collect()
}

fn small() -> LinkConfig {
    LinkConfig {
        max_streams: 2,
        initial_stream_window: 100,
        max_stream_window: 100,
        link_window: INITIAL_LINK_WINDOW,
        ..LinkConfig::default()
    }
}

/// A service link (start-up frames drained) with stream 1 opened by the
/// proxy, accepted, with `window` bytes of credit to send.
fn service_with_stream(now: Instant, window: u32) -> Link {
    let mut s = Link::new(Side::Service, small(), now);
    sent(&mut s);
    s.handle_frame(now, &frame(Frame::Open { id: StreamId::new(1), window, client: None })).unwrap();
    assert_eq!(events(&mut s), [LinkEvent::Opened { id: StreamId::new(1), client: None }]);
    s.accept(StreamId::new(1)).unwrap();
    assert_eq!(sent(&mut s), [Frame::Accept { id: StreamId::new(1), window: 100 }]);
    s
}

fn data(id: u32, len: usize) -> Vec<u8> {
    frame(Frame::Data { id: StreamId::new(id), bytes: &vec![7; len] })
}

/// Asserts `bytes` ends the link with `error`, resets every stream and says so to the peer.
fn fails(link: &mut Link, bytes: &[u8], error: LinkError) {
    let now = t0();
    let streams = link.stream_count();
    events(link);
    assert_eq!(link.handle_frame(now, bytes), Err(error.clone()));
    let got = events(link);
    let (last, resets) = got.split_last().unwrap();
    assert_eq!(last, &LinkEvent::Closed { error: error.clone() });
    assert_eq!(resets.len(), streams);
    assert!(resets.iter().all(|e| matches!(e, LinkEvent::Reset { reason: Reason::LINK_LOST, .. })));
    let goaway: Vec<_> = error.wire_reason().map(|reason| Frame::GoAway { reason }).into_iter().collect();
    assert_eq!(sent(link), goaway);
    assert!(link.is_closed() && link.stream_count() == 0 && link.buffered() == 0);
    assert_eq!(link.poll_timeout(), None);
    // Frames after the end are ignored; operations are refused.
    assert_eq!(link.handle_frame(now, &data(1, 1)), Ok(None));
    assert_eq!(link.want_send(StreamId::new(1)), Err(StreamError::LinkClosed));
}

#[test]
fn stream_state_is_small() {
    assert!(std::mem::size_of::<Stream>() <= 48, "{}", std::mem::size_of::<Stream>());
}

#[test]
fn a_new_link_raises_its_window_and_pings() {
    let now = t0();
    let mut link = Link::new(Side::Proxy, LinkConfig::default(), now);
    assert_eq!(
        sent(&mut link),
        [
            Frame::Window { id: StreamId::LINK, increment: 16 * 1024 * 1024 - INITIAL_LINK_WINDOW },
            Frame::Ping { nonce: 1 }
        ]
    );
    assert_eq!(link.poll_timeout(), Some(now + Duration::from_secs(10)));
    link.handle_frame(now + Duration::from_millis(30), &frame(Frame::Pong { nonce: 1 })).unwrap();
    assert_eq!(link.rtt(), Some(Duration::from_millis(30)));
    // A pong that answers nothing changes nothing.
    link.handle_frame(now + Duration::from_millis(90), &frame(Frame::Pong { nonce: 1 })).unwrap();
    assert_eq!(link.rtt(), Some(Duration::from_millis(30)));
}

#[test]
fn pings_are_answered_once_however_many_come() {
    let now = t0();
    let mut link = Link::new(Side::Service, small(), now);
    sent(&mut link);
    for nonce in 0..1000 {
        link.handle_frame(now, &frame(Frame::Ping { nonce })).unwrap();
    }
    assert_eq!(sent(&mut link), [Frame::Pong { nonce: 999 }]);
}

#[test]
fn a_full_stream_life_frees_its_state() {
    let now = t0();
    let id = StreamId::new(1);
    let mut s = service_with_stream(now, 50);
    // Data in, consumed; end both ways.
    assert_eq!(s.handle_frame(now, &data(1, 30)), Ok(Some(Incoming::Data { id, bytes: &[7; 30] })));
    assert_eq!(s.buffered(), 30);
    let mut buf = vec![0; HEADER_LEN + 50];
    assert_eq!(s.send_credit(id), 50);
    assert_eq!(s.data_header(Instant::now(), id, 50, &mut buf), Ok(HEADER_LEN));
    assert_eq!(Frame::decode(&buf), Ok(Frame::Data { id, bytes: &[0; 50] }));
    assert_eq!(s.send_credit(id), 0);
    s.end(id).unwrap();
    s.handle_frame(now, &frame(Frame::End { id })).unwrap();
    assert_eq!(events(&mut s), [LinkEvent::End { id }]);
    assert_eq!(s.stream_count(), 1, "30 bytes not consumed yet");
    s.consumed(now, id, 30).unwrap();
    assert_eq!(s.stream_count(), 0);
    assert_eq!(s.buffered(), 0);
    assert_eq!(sent(&mut s), [Frame::End { id }], "no window update for an ended direction");
    // Late frames for the stream are ignored; a consume for it is a stale call.
    s.handle_frame(now, &frame(Frame::Window { id, increment: 5 })).unwrap();
    s.handle_frame(now, &frame(Frame::Reset { id, reason: Reason::CANCELLED })).unwrap();
    assert_eq!(events(&mut s), []);
    assert_eq!(s.consumed(now, id, 1), Err(StreamError::Unknown(id)));
}

#[test]
fn windows_are_returned_in_half_window_batches_and_grow_when_drained_fast() {
    let now = t0();
    let id = StreamId::new(1);
    let mut config = small();
    config.max_stream_window = 400;
    let mut s = Link::new(Side::Service, config, now);
    sent(&mut s);
    s.handle_frame(now, &frame(Frame::Open { id, window: 0, client: None })).unwrap();
    s.accept(id).unwrap();
    sent(&mut s);
    s.handle_frame(now, &data(1, 100)).unwrap();
    assert!(matches!(s.handle_frame(now, &data(1, 1)), Err(LinkError::StreamWindowExceeded { .. })));

    let mut s = Link::new(Side::Service, LinkConfig { max_stream_window: 400, ..small() }, now);
    sent(&mut s);
    s.handle_frame(now, &frame(Frame::Open { id, window: 0, client: None })).unwrap();
    s.accept(id).unwrap();
    sent(&mut s);
    s.handle_frame(now, &data(1, 100)).unwrap();
    s.consumed(now, id, 49).unwrap();
    assert_eq!(sent(&mut s), []);
    // Half the window consumed within two RTTs of the start: the window doubles.
    s.consumed(now, id, 1).unwrap();
    assert_eq!(sent(&mut s), [Frame::Window { id, increment: 150 }]);
    s.handle_frame(now, &data(1, 150)).unwrap();
    // Slowly consumed: the window stays at 200.
    let later = now + Duration::from_secs(5);
    s.consumed(later, id, 100).unwrap();
    assert_eq!(sent(&mut s), [Frame::Window { id, increment: 100 }]);
    s.handle_frame(later, &data(1, 100)).unwrap();
    assert_eq!(s.buffered(), 200);
    assert!(matches!(
        s.handle_frame(later, &data(1, 1)),
        Err(LinkError::StreamWindowExceeded { len: 1, allowed: 0, .. })
    ));
}

#[test]
fn link_credit_is_returned_for_data_on_forgotten_streams() {
    let now = t0();
    let id = StreamId::new(1);
    let mut s = service_with_stream(now, 50);
    s.handle_frame(now, &data(1, 60)).unwrap();
    // Reset with 60 bytes unconsumed: they count as consumed for the link.
    s.reset(id, Reason::BACKEND_ERROR).unwrap();
    assert_eq!(s.buffered(), 0);
    // Data that crossed the reset.
    for _ in 0..(INITIAL_LINK_WINDOW as usize / 2 - 60) / 100 {
        assert_eq!(s.handle_frame(now, &data(1, 100)), Ok(None));
    }
    assert_eq!(sent(&mut s), [Frame::Reset { id, reason: Reason::BACKEND_ERROR }]);
    s.handle_frame(now, &data(1, 100)).unwrap();
    let update = sent(&mut s);
    assert!(
        matches!(update[..], [Frame::Window { id: StreamId::LINK, increment }] if increment >= INITIAL_LINK_WINDOW / 2)
    );
}

#[test]
fn the_link_window_bounds_what_a_peer_can_make_us_buffer() {
    let now = t0();
    let mut config = small();
    config.max_streams = 100;
    config.initial_stream_window = 60_000;
    config.max_stream_window = 60_000;
    let mut s = Link::new(Side::Service, config, now);
    for n in 1..=2 {
        s.handle_frame(now, &frame(Frame::Open { id: StreamId::new(n), window: 0, client: None })).unwrap();
        s.accept(StreamId::new(n)).unwrap();
    }
    sent(&mut s);
    for _ in 0..6 {
        s.handle_frame(now, &data(1, 10_000)).unwrap();
    }
    s.handle_frame(now, &data(2, 5536)).unwrap();
    assert_eq!(s.buffered(), INITIAL_LINK_WINDOW as usize);
    fails(&mut s, &data(2, 1), LinkError::LinkWindowExceeded { len: 1, allowed: 0 });
}

#[test]
fn protocol_violations_end_the_link() {
    let now = t0();
    let id = StreamId::new(1);
    let kind_data = FrameKind::Data;
    let cases: Vec<(Side, Vec<Vec<u8>>, LinkError)> = vec![
        (Side::Service, vec![vec![0x42, 0, 0, 0, 1]], LinkError::Malformed(FrameError::UnknownType(0x42))),
        (
            Side::Proxy,
            vec![frame(Frame::Open { id, window: 1, client: None })],
            LinkError::WrongDirection(FrameKind::Open),
        ),
        (
            Side::Service,
            vec![frame(Frame::Accept { id, window: 1 })],
            LinkError::WrongDirection(FrameKind::Accept),
        ),
        (
            Side::Service,
            vec![
                frame(Frame::Open { id: StreamId::new(5), window: 1, client: None }),
                frame(Frame::Open { id, window: 1, client: None }),
            ],
            LinkError::StreamIdReused(id),
        ),
        (
            Side::Service,
            vec![
                frame(Frame::Open { id, window: 1, client: None }),
                frame(Frame::Open { id, window: 1, client: None }),
            ],
            LinkError::StreamIdReused(id),
        ),
        (Side::Service, vec![data(1, 1)], LinkError::UnknownStream { id, kind: kind_data }),
        (
            Side::Proxy,
            vec![frame(Frame::Window { id, increment: 1 })],
            LinkError::UnknownStream { id, kind: FrameKind::Window },
        ),
        (
            Side::Proxy,
            vec![frame(Frame::Reset { id, reason: Reason::REFUSED })],
            LinkError::UnknownStream { id, kind: FrameKind::Reset },
        ),
        (
            Side::Service,
            vec![frame(Frame::Open { id, window: 1, client: None }), data(1, 1)],
            LinkError::Unexpected { id, kind: kind_data, when: "before ACCEPT" },
        ),
        (
            Side::Service,
            vec![frame(Frame::Open { id, window: 1, client: None }), frame(Frame::End { id })],
            LinkError::Unexpected { id, kind: FrameKind::End, when: "before ACCEPT" },
        ),
        (
            Side::Service,
            vec![
                frame(Frame::Open { id, window: MAX_WINDOW, client: None }),
                frame(Frame::Window { id, increment: 1 }),
            ],
            LinkError::CreditOverflow(id),
        ),
        (
            Side::Service,
            vec![frame(Frame::Window { id: StreamId::LINK, increment: MAX_WINDOW })],
            LinkError::CreditOverflow(StreamId::LINK),
        ),
        (
            Side::Service,
            vec![frame(Frame::GoAway { reason: Reason::PROTOCOL })],
            LinkError::PeerAborted(Reason::PROTOCOL),
        ),
    ];
    for (side, frames, error) in cases {
        let mut link = Link::new(side, small(), now);
        sent(&mut link);
        let (last, before) = frames.split_last().unwrap();
        for f in before {
            link.handle_frame(now, f).unwrap();
        }
        fails(&mut link, last, error);
    }
}

#[test]
fn stream_state_violations_end_the_link() {
    let now = t0();
    let id = StreamId::new(1);
    let mut s = service_with_stream(now, 10);
    s.handle_frame(now, &frame(Frame::End { id })).unwrap();
    fails(&mut s, &data(1, 1), LinkError::Unexpected { id, kind: FrameKind::Data, when: "after END" });

    let mut s = service_with_stream(now, 10);
    s.handle_frame(now, &frame(Frame::End { id })).unwrap();
    fails(
        &mut s,
        &frame(Frame::End { id }),
        LinkError::Unexpected { id, kind: FrameKind::End, when: "after END" },
    );

    let mut p = Link::new(Side::Proxy, small(), now);
    let id = p.open(now).unwrap();
    fails(&mut p, &data(1, 1), LinkError::Unexpected { id, kind: FrameKind::Data, when: "before ACCEPT" });

    let mut p = Link::new(Side::Proxy, small(), now);
    p.open(now).unwrap();
    p.handle_frame(now, &frame(Frame::Accept { id, window: 1 })).unwrap();
    fails(
        &mut p,
        &frame(Frame::Accept { id, window: 1 }),
        LinkError::Unexpected { id, kind: FrameKind::Accept, when: "after ACCEPT" },
    );
}

#[test]
fn opens_beyond_the_limit_or_after_go_away_are_reset_not_fatal() {
    let now = t0();
    let mut s = Link::new(Side::Service, small(), now);
    sent(&mut s);
    for n in 1..=3 {
        s.handle_frame(now, &frame(Frame::Open { id: StreamId::new(n), window: 1, client: None })).unwrap();
    }
    assert_eq!(s.stream_count(), 2);
    assert_eq!(sent(&mut s), [Frame::Reset { id: StreamId::new(3), reason: Reason::STREAM_LIMIT }]);
    // Data crossing that reset is dropped quietly.
    assert_eq!(s.handle_frame(now, &data(3, 10)), Ok(None));
    s.go_away();
    s.handle_frame(now, &frame(Frame::Open { id: StreamId::new(4), window: 1, client: None })).unwrap();
    assert_eq!(
        sent(&mut s),
        [
            Frame::GoAway { reason: Reason::NO_ERROR },
            Frame::Reset { id: StreamId::new(4), reason: Reason::GOING_AWAY }
        ]
    );
    // Drained once the open streams are gone.
    s.refuse(StreamId::new(1), Reason::REFUSED).unwrap();
    assert!(!events(&mut s).contains(&LinkEvent::Drained));
    s.refuse(StreamId::new(2), Reason::UNREACHABLE).unwrap();
    assert_eq!(events(&mut s).last(), Some(&LinkEvent::Drained));
    assert!(!s.is_closed());
}

#[test]
fn a_peer_that_opens_without_reading_is_cut_off() {
    let now = t0();
    let mut s = Link::new(Side::Service, LinkConfig { max_streams: 0, ..small() }, now);
    sent(&mut s);
    let mut result = Ok(());
    for n in 1..=CONTROL_BACKLOG as u32 + 1 {
        result = s
            .handle_frame(now, &frame(Frame::Open { id: StreamId::new(n), window: 1, client: None }))
            .map(|_| ());
        if result.is_err() {
            break;
        }
    }
    assert_eq!(result, Err(LinkError::Flooded));
    assert_eq!(s.stream_count(), 0);
}

#[test]
fn proxy_sees_refusal_before_accept_and_reset_after() {
    let now = t0();
    let mut p = Link::new(Side::Proxy, small(), now);
    sent(&mut p);
    let a = p.open(now).unwrap();
    let b = p.open(now).unwrap();
    assert_eq!((a, b), (StreamId::new(1), StreamId::new(2)));
    assert_eq!(p.open(now), Err(StreamError::StreamLimit));
    assert_eq!(
        sent(&mut p),
        [Frame::Open { id: a, window: 100, client: None }, Frame::Open { id: b, window: 100, client: None }]
    );
    assert_eq!(p.send_credit(a), 0);
    assert_eq!(p.want_send(a), Err(StreamError::NotAccepted(a)));
    assert_eq!(p.data_header(Instant::now(), a, 1, &mut [0; 8]), Err(StreamError::NotAccepted(a)));
    assert_eq!(p.end(a), Err(StreamError::NotAccepted(a)));
    assert_eq!(p.accept(a), Err(StreamError::WrongSide));
    p.handle_frame(now, &frame(Frame::Reset { id: a, reason: Reason::REFUSED })).unwrap();
    p.handle_frame(now, &frame(Frame::Accept { id: b, window: 10 })).unwrap();
    p.handle_frame(now, &frame(Frame::Reset { id: b, reason: Reason::BACKEND_ERROR })).unwrap();
    assert_eq!(
        events(&mut p),
        [
            LinkEvent::Refused { id: a, reason: Reason::REFUSED },
            LinkEvent::Accepted { id: b },
            LinkEvent::Reset { id: b, reason: Reason::BACKEND_ERROR }
        ]
    );
    // Ids are never reused.
    assert_eq!(p.open(now), Ok(StreamId::new(3)));
    // The service's go-away stops opens.
    p.handle_frame(now, &frame(Frame::GoAway { reason: Reason::NO_ERROR })).unwrap();
    assert_eq!(p.open(now), Err(StreamError::GoingAway));
    assert_eq!(events(&mut p), [LinkEvent::GoAway]);
    p.reset(StreamId::new(3), Reason::CANCELLED).unwrap();
    assert_eq!(events(&mut p), [LinkEvent::Drained]);
}

#[test]
fn misuse_is_an_error_value_and_changes_nothing() {
    let now = t0();
    let id = StreamId::new(1);
    let mut s = service_with_stream(now, 10);
    assert_eq!(s.open(now), Err(StreamError::WrongSide));
    assert_eq!(s.accept(id), Err(StreamError::AlreadyAccepted(id)));
    assert_eq!(s.refuse(id, Reason::REFUSED), Err(StreamError::AlreadyAccepted(id)));
    assert_eq!(s.accept(StreamId::new(9)), Err(StreamError::Unknown(StreamId::new(9))));
    assert_eq!(
        s.data_header(Instant::now(), id, 11, &mut [0; 32]),
        Err(StreamError::NoCredit { id, len: 11, credit: 10 })
    );
    assert_eq!(
        s.data_header(Instant::now(), id, 0, &mut [0; 32]),
        Err(StreamError::NoCredit { id, len: 0, credit: 10 })
    );
    assert_eq!(s.data_header(Instant::now(), id, 1, &mut [0; 4]), Err(StreamError::BufferTooSmall));
    assert_eq!(s.consumed(now, id, 1), Err(StreamError::OverConsumed { id, n: 1, unconsumed: 0 }));
    assert_eq!(s.send_credit(id), 10);
    s.end(id).unwrap();
    assert_eq!(s.end(id), Err(StreamError::Ended(id)));
    assert_eq!(s.want_send(id), Err(StreamError::Ended(id)));
    assert_eq!(s.data_header(Instant::now(), id, 1, &mut [0; 32]), Err(StreamError::Ended(id)));
    assert_eq!(s.send_credit(id), 0);
    s.reset(id, Reason::CANCELLED).unwrap();
    assert_eq!(s.reset(id, Reason::CANCELLED), Err(StreamError::Unknown(id)));
}

#[test]
fn accepted_stream_sends_only_once_accept_is_out_and_wakes_on_credit() {
    let now = t0();
    let id = StreamId::new(1);
    let mut s = Link::new(Side::Service, small(), now);
    sent(&mut s);
    s.handle_frame(now, &frame(Frame::Open { id, window: 10, client: None })).unwrap();
    s.accept(id).unwrap();
    s.want_send(id).unwrap();
    assert_eq!(s.next_send(), None, "ACCEPT not transmitted yet");
    assert_eq!(s.data_header(Instant::now(), id, 1, &mut [0; 8]), Err(StreamError::NotAccepted(id)));
    sent(&mut s);
    assert_eq!(events(&mut s), [LinkEvent::Opened { id, client: None }, LinkEvent::Writable { id }]);
    assert_eq!(s.next_send(), Some((id, 10)));
    s.data_header(Instant::now(), id, 10, &mut [0; 8]).unwrap();
    s.want_send(id).unwrap();
    assert_eq!(s.next_send(), None);
    s.handle_frame(now, &frame(Frame::Window { id, increment: 4 })).unwrap();
    assert_eq!(events(&mut s), [LinkEvent::Writable { id }]);
    assert_eq!(s.next_send(), Some((id, 4)));
}

#[test]
fn streams_blocked_on_the_link_window_wake_when_it_opens() {
    let now = t0();
    let mut config = small();
    config.initial_stream_window = MAX_WINDOW;
    let mut p = Link::new(Side::Proxy, config, now);
    let (a, b) = (p.open(now).unwrap(), p.open(now).unwrap());
    for id in [a, b] {
        p.handle_frame(now, &frame(Frame::Accept { id, window: MAX_WINDOW })).unwrap();
    }
    let mut buf = vec![0; HEADER_LEN];
    let mut total = 0;
    while let Some(credit) = Some(p.send_credit(a)).filter(|c| *c > 0) {
        p.data_header(Instant::now(), a, credit, &mut buf).unwrap();
        total += credit;
    }
    assert_eq!(total, INITIAL_LINK_WINDOW as usize);
    assert_eq!(p.send_credit(b), 0);
    events(&mut p);
    p.handle_frame(now, &frame(Frame::Window { id: StreamId::LINK, increment: 100 })).unwrap();
    assert_eq!(events(&mut p), [LinkEvent::Writable { id: a }, LinkEvent::Writable { id: b }]);
}

#[test]
fn round_robin_caps_frames_while_others_wait() {
    let now = t0();
    let mut p = Link::new(Side::Proxy, LinkConfig::default(), now);
    let ids: Vec<_> = (0..3).map(|_| p.open(now).unwrap()).collect();
    for &id in &ids {
        p.handle_frame(now, &frame(Frame::Accept { id, window: MAX_WINDOW })).unwrap();
    }
    p.handle_frame(now, &frame(Frame::Window { id: StreamId::LINK, increment: 1 << 30 })).unwrap();
    p.want_send(ids[0]).unwrap();
    assert_eq!(p.next_send(), Some((ids[0], MAX_DATA)), "alone: a full frame");
    for &id in &ids {
        p.want_send(id).unwrap();
    }
    let mut order = Vec::new();
    for _ in 0..6 {
        let (id, credit) = p.next_send().unwrap();
        order.push(id);
        p.data_header(Instant::now(), id, credit, &mut [0; HEADER_LEN]).unwrap();
        p.want_send(id).unwrap();
        assert!(credit <= 16 * 1024);
    }
    assert_eq!(order, [ids[0], ids[1], ids[2], ids[0], ids[1], ids[2]]);
    // A reset stream leaves the rotation at once.
    p.reset(ids[0], Reason::CANCELLED).unwrap();
    assert_eq!(p.schedule.len(), 2);
    assert_eq!(p.next_send().map(|(id, _)| id), Some(ids[1]));
}

#[test]
fn silence_kills_the_link_and_resets_its_streams() {
    let now = t0();
    let mut p = Link::new(Side::Proxy, LinkConfig::default(), now);
    let id = p.open(now).unwrap();
    sent(&mut p);
    let mut at = now;
    let mut pings = 0;
    while let Some(deadline) = p.poll_timeout() {
        at = deadline;
        p.handle_timeout(at);
        pings += sent(&mut p).len();
    }
    assert_eq!(at, now + Duration::from_secs(30));
    assert_eq!(pings, 2, "pings at 10 s and 20 s");
    assert_eq!(
        events(&mut p),
        [
            LinkEvent::Reset { id, reason: Reason::LINK_LOST },
            LinkEvent::Closed { error: LinkError::Silent(Duration::from_secs(30)) }
        ]
    );
    assert_eq!(p.open(now), Err(StreamError::LinkClosed));
}

#[test]
fn a_closed_transport_resets_every_stream() {
    let now = t0();
    let mut p = Link::new(Side::Proxy, LinkConfig::default(), now);
    let ids: Vec<_> = (0..3).map(|_| p.open(now).unwrap()).collect();
    sent(&mut p);
    p.handle_closed();
    let mut expected: Vec<_> =
        ids.iter().map(|&id| LinkEvent::Reset { id, reason: Reason::LINK_LOST }).collect();
    expected.push(LinkEvent::Closed { error: LinkError::Closed });
    assert_eq!(events(&mut p), expected);
    assert_eq!(sent(&mut p), [], "nothing to say on a closed transport");
}

#[test]
fn config_is_clamped() {
    let now = t0();
    let config = LinkConfig {
        initial_stream_window: 0,
        max_stream_window: 0,
        link_window: 1,
        max_frame_alone: usize::MAX,
        max_frame_shared: usize::MAX,
        keepalive: Duration::ZERO,
        dead_after: Duration::MAX,
        ..LinkConfig::default()
    };
    let link = Link::new(Side::Proxy, config, now);
    let c = link.config();
    assert_eq!((c.initial_stream_window, c.max_stream_window, c.link_window), (1, 1, INITIAL_LINK_WINDOW));
    assert_eq!((c.max_frame_alone, c.max_frame_shared), (MAX_DATA, MAX_DATA));
    assert_eq!(c.keepalive, Duration::from_millis(1));
    assert_eq!(c.dead_after, MAX_INTERVAL);
}

#[test]
fn a_link_without_resumption_speaks_the_old_wire() {
    // A peer that did not advertise RESUME (a build from before it): no
    // frame of the resumable kinds goes to it, one from it is an error, and
    // a lost transport ends the link as it always did.
    let now = t0();
    let mut s = service_with_stream(now, 100);
    assert!(!s.is_resumable());
    assert_eq!(s.handover(), None);
    assert_eq!(s.resume_token(), None);
    s.handle_frame(now, &data(1, 50)).unwrap();
    s.consumed(now, StreamId::new(1), 50).unwrap();
    s.handle_timeout(now + Duration::from_secs(1));
    let out = sent(&mut s);
    assert!(
        out.iter().all(|f| !matches!(f, Frame::Ack { .. } | Frame::Resume { .. } | Frame::Resumed { .. })),
        "{out:?}"
    );
    assert_eq!(s.resend_buffered(), 0);
    let ack = frame(Frame::Ack { received: 1 });
    fails(&mut s, &ack, LinkError::NotResumable(FrameKind::Ack));

    let mut p = Link::new(Side::Proxy, small(), now);
    sent(&mut p);
    p.detach(now);
    assert!(p.is_closed() && !p.is_detached());
    assert_eq!(events(&mut p), [LinkEvent::Closed { error: LinkError::Closed }]);
}

#[test]
fn datagrams_go_only_where_both_ends_take_them_and_whole() {
    let now = t0();
    let flow = FlowId::new(3);
    let mut p = Link::new(Side::Proxy, small(), now);
    sent(&mut p);
    let mut out = vec![0u8; HEADER_LEN + 10];
    // Not offered: refused on the way out, and a protocol error on the way in.
    assert_eq!(p.datagram_header(flow, 10, &mut out), Err(StreamError::NoDatagrams));
    let mut s = Link::new(Side::Service, small(), now);
    sent(&mut s);
    fails(&mut s, &frame(Frame::Datagram { flow, bytes: b"x" }), LinkError::NoDatagrams);

    let mut s = Link::new(Side::Service, small(), now);
    sent(&mut s);
    p.allow_datagrams();
    s.allow_datagrams();
    for len in [0, 1, 1400, MAX_DATAGRAM] {
        let mut buf = vec![0u8; HEADER_LEN + len];
        buf[HEADER_LEN..].fill(len as u8);
        assert_eq!(p.datagram_header(flow, len, &mut buf), Ok(HEADER_LEN));
        let got = s.handle_frame(now, &buf).unwrap();
        assert_eq!(got, Some(Incoming::Datagram { flow, bytes: &buf[HEADER_LEN..] }));
    }
    // Too long is refused, never cut; nothing is queued by either side.
    let mut buf = vec![0u8; HEADER_LEN + MAX_DATAGRAM + 1];
    assert_eq!(
        p.datagram_header(flow, MAX_DATAGRAM + 1, &mut buf),
        Err(StreamError::DatagramTooLong(MAX_DATAGRAM + 1))
    );
    // Flow 0 names no flow: the peer would refuse it, so it is never sent.
    assert_eq!(p.datagram_header(FlowId::new(0), 1, &mut buf), Err(StreamError::ZeroFlow));
    assert_eq!(sent(&mut p), []);
    assert_eq!(events(&mut s), []);
    // The service sends them back on the same flow.
    let mut back = vec![0u8; HEADER_LEN + 4];
    s.datagram_header(flow, 4, &mut back).unwrap();
    assert_eq!(p.handle_frame(now, &back).unwrap(), Some(Incoming::Datagram { flow, bytes: &[0; 4] }));
}

#[test]
fn datagrams_take_no_credit_and_are_not_numbered() {
    // A stream with no credit left does not hold a datagram back, and on a
    // resumable link a datagram is neither kept nor counted.
    let now = t0();
    let token = [5; RESUME_TOKEN_LEN];
    let mut p = Link::new_resumable(Side::Proxy, small(), now, token);
    let mut s = Link::new_resumable(Side::Service, small(), now, token);
    p.allow_datagrams();
    s.allow_datagrams();
    sent(&mut p);
    sent(&mut s);
    let received = s.frames_received();
    let kept = p.resend_buffered();
    let mut buf = vec![0u8; HEADER_LEN + 100];
    for _ in 0..1000 {
        p.datagram_header(FlowId::new(1), 100, &mut buf).unwrap();
        s.handle_frame(now, &buf).unwrap();
    }
    assert_eq!(s.frames_received(), received, "datagrams are not numbered");
    assert_eq!(p.resend_buffered(), kept, "datagrams are not kept for resending");
    assert_eq!(p.link_credit(), INITIAL_LINK_WINDOW as usize, "no credit spent");
    // Between paths a datagram would come late: it is refused (and dropped).
    p.detach(now);
    assert!(p.is_detached());
    assert_eq!(p.datagram_header(FlowId::new(1), 100, &mut buf), Err(StreamError::Detached));
    // A closed link carries none.
    s.handle_closed();
    assert_eq!(s.datagram_header(FlowId::new(1), 1, &mut buf), Err(StreamError::LinkClosed));
}

/// The client's address goes only to a service that advertised taking it
/// (an older one would refuse the longer `OPEN`), and comes out of the
/// service's machine with the stream.
#[test]
fn the_client_address_goes_only_to_a_service_that_takes_it() {
    let now = t0();
    let client: std::net::SocketAddr = "198.51.100.4:6000".parse().unwrap();
    let mut p = Link::new(Side::Proxy, small(), now);
    sent(&mut p);
    let old = p.open_from(now, Some(client)).unwrap();
    assert_eq!(sent(&mut p), [Frame::Open { id: old, window: 100, client: None }]);
    p.allow_client_addresses();
    let new = p.open_from(now, Some(client)).unwrap();
    let frames = sent(&mut p);
    assert_eq!(frames, [Frame::Open { id: new, window: 100, client: Some(client) }]);

    let mut s = Link::new(Side::Service, small(), now);
    events(&mut s);
    s.handle_frame(now, &frame(frames[0])).unwrap();
    assert_eq!(events(&mut s), [LinkEvent::Opened { id: new, client: Some(client) }]);

    // An OPEN as a proxy from before the capability writes it, byte for
    // byte (type, id, window, nothing after): a stream with no address.
    let older = [0x01, 0, 0, 0, 9, 0, 0, 0, 100];
    s.handle_frame(now, &older).unwrap();
    assert_eq!(events(&mut s), [LinkEvent::Opened { id: StreamId::new(9), client: None }]);
}

/// Every frame `link` wants to send, as bytes (early data included).
fn transmitted(link: &mut Link) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while link.poll_transmit(Instant::now(), &mut buf) {
        out.push(std::mem::take(&mut buf));
    }
    out
}

/// A proxy and a service that take early data, start-up frames drained.
fn early_pair(now: Instant) -> (Link, Link) {
    let mut p = Link::new(Side::Proxy, small(), now);
    let mut s = Link::new(Side::Service, small(), now);
    transmitted(&mut p);
    transmitted(&mut s);
    p.allow_early_data();
    s.allow_early_data();
    (p, s)
}

/// Early data goes right after its `OPEN`, comes out of the service's
/// machine before it accepts, and the `ACCEPT`'s window covers it: the
/// proxy may send the window less what went early.
#[test]
fn early_data_follows_its_open_and_the_accept_covers_it() {
    let now = t0();
    let (mut p, mut s) = early_pair(now);
    let link_credit = p.link_credit();
    let (id, taken) = p.open_early(now, None, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(taken, 18);
    assert_eq!(p.link_credit(), link_credit - 18);
    let frames = transmitted(&mut p);
    assert_eq!(Frame::decode(&frames[0]).unwrap(), Frame::Open { id, window: 100, client: None });
    assert_eq!(Frame::decode(&frames[1]).unwrap(), Frame::Data { id, bytes: b"GET / HTTP/1.1\r\n\r\n" });
    assert_eq!(frames.len(), 2);
    // The service: opened, its early data delivered before the backend is up.
    s.handle_frame(now, &frames[0]).unwrap();
    assert!(s.is_opening(id));
    assert_eq!(
        s.handle_frame(now, &frames[1]).unwrap(),
        Some(Incoming::Data { id, bytes: b"GET / HTTP/1.1\r\n\r\n" })
    );
    s.accept(id).unwrap();
    assert!(!s.is_opening(id));
    s.consumed(now, id, 18).unwrap();
    // Its windows start at EARLY_DATA at least, so the ACCEPT covers it.
    let accept = transmitted(&mut s);
    assert_eq!(Frame::decode(&accept[0]).unwrap(), Frame::Accept { id, window: EARLY_DATA as u32 });
    p.handle_frame(now, &accept[0]).unwrap();
    assert_eq!(events(&mut p).last(), Some(&LinkEvent::Accepted { id }));
    assert_eq!(p.send_credit(id), EARLY_DATA - 18);
}

/// Without the capability no early data goes, and a service that does not
/// take it ends a link that sends some anyway; a service that does takes at
/// most EARLY_DATA before it accepts.
#[test]
fn early_data_goes_only_where_it_is_taken_and_no_more_than_its_limit() {
    let now = t0();
    let mut p = Link::new(Side::Proxy, small(), now);
    transmitted(&mut p);
    let (id, taken) = p.open_early(now, None, b"hello").unwrap();
    assert_eq!(taken, 0);
    assert_eq!(sent(&mut p), [Frame::Open { id, window: 100, client: None }]);

    let mut old = Link::new(Side::Service, small(), now);
    old.handle_frame(now, &frame(Frame::Open { id: StreamId::new(1), window: 100, client: None })).unwrap();
    let when = "before ACCEPT";
    fails(&mut old, &data(1, 5), LinkError::Unexpected { id: StreamId::new(1), kind: FrameKind::Data, when });

    // A proxy takes at most EARLY_DATA of what it is given.
    let (mut p, mut s) = early_pair(now);
    let (id, taken) = p.open_early(now, None, &vec![1; EARLY_DATA + 100]).unwrap();
    assert_eq!(taken, EARLY_DATA);
    let frames = transmitted(&mut p);
    assert_eq!(frames.len(), 2);
    s.handle_frame(now, &frames[0]).unwrap();
    s.handle_frame(now, &frames[1]).unwrap();
    // One byte more before the ACCEPT is the proxy's error.
    fails(&mut s, &data(id.get(), 1), LinkError::Unexpected { id, kind: FrameKind::Data, when });
}

/// A stream cancelled before its `OPEN` went sends no early data and gives
/// its link credit back; a refused one tells the proxy so, which still has
/// the bytes to send elsewhere (the link has none of them).
#[test]
fn early_data_of_a_cancelled_or_refused_stream() {
    let now = t0();
    let (mut p, mut s) = early_pair(now);
    let link_credit = p.link_credit();
    let (id, _) = p.open_early(now, None, b"abc").unwrap();
    p.reset(id, Reason::CANCELLED).unwrap();
    assert_eq!(p.link_credit(), link_credit);
    let kinds: Vec<FrameKind> =
        transmitted(&mut p).iter().map(|f| Frame::decode(f).unwrap().kind()).collect();
    assert_eq!(kinds, [FrameKind::Open, FrameKind::Reset]);

    let (id, _) = p.open_early(now, None, b"abc").unwrap();
    for f in transmitted(&mut p) {
        s.handle_frame(now, &f).unwrap();
    }
    s.refuse(id, Reason::REFUSED).unwrap();
    for f in transmitted(&mut s) {
        p.handle_frame(now, &f).unwrap();
    }
    assert_eq!(events(&mut p).last(), Some(&LinkEvent::Refused { id, reason: Reason::REFUSED }));
    // The service credited the refused stream's early bytes back to the link.
    assert_eq!(s.buffered(), 0);
}

/// On a resumable link early data takes the resend room it will need: opens
/// queued together never promise more than the journal may keep, and an
/// `ACCEPT` that overtakes the early data (a resumed link resending its
/// `OPEN`) still grants the window less it.
#[test]
fn early_data_counts_against_the_resend_room_and_the_window_from_the_open() {
    let now = t0();
    let config = LinkConfig { resend_limit: 0, ..LinkConfig::default() };
    let mut p = Link::new_resumable(Side::Proxy, config, now, [3; RESUME_TOKEN_LEN]);
    p.allow_early_data();
    let room = p.config().resend_limit;
    let mut taken = 0;
    for _ in 0..20 {
        taken += p.open_early(now, None, &[1; EARLY_DATA]).unwrap().1;
    }
    assert!(taken <= room, "{taken} bytes promised early, the journal keeps {room}");
    assert!(taken > 0);
    transmitted(&mut p);
    assert!(p.resend_buffered() <= room + resume::RESEND_SLACK, "{}", p.resend_buffered());

    let (mut p, _) = early_pair(now);
    let (id, taken) = p.open_early(now, None, b"early").unwrap();
    // The ACCEPT is handled before the early data was transmitted.
    p.handle_frame(now, &frame(Frame::Accept { id, window: EARLY_DATA as u32 })).unwrap();
    assert_eq!(p.send_credit(id), EARLY_DATA - taken);
    // The driver drains poll_transmit before it sends stream data: the
    // early data still goes first.
    let frames = transmitted(&mut p);
    assert!(frames.iter().any(|f| Frame::decode(f) == Ok(Frame::Data { id, bytes: b"early" })));
}
