//! Two ends of a link, a proxy and a service, wired in memory with one
//! virtual clock: many streams with seeded payloads are opened, accepted or
//! refused, written, half-closed and reset in random order; frames cross in
//! random batches and the receivers consume at random speeds (slow sockets).
//!
//! Checked throughout: every byte arrives once and in order, `END` comes
//! after the last byte, no frame is refused (so no window was exceeded),
//! buffered bytes stay within the link window, and each end's streams are
//! exactly the ones its driver still tracks; at the end, after a `GOAWAY`
//! drain, no state is left. Also: fairness between a bulk and a small stream,
//! and keepalive with a live and a silent peer.
//!
//! Resumable links run the same world with transports that die at random
//! points (what was in flight is lost, each end detaches) and are replaced
//! after a random delay: every byte still arrives exactly once, in order,
//! no stream is reset for it, and the resend buffers end empty.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use seaport_proto::link::{
    Frame, HEADER_LEN, Incoming, Link, LinkConfig, LinkError, LinkEvent, Reason, Side, StreamId,
};

/// The byte at `offset` of the payload sent by `from` on stream `id`: it
/// depends on all three, so a byte delivered twice, late or on the wrong
/// stream is caught.
fn byte(from: Side, id: StreamId, offset: usize) -> u8 {
    let dir = if from == Side::Proxy { 101 } else { 53 };
    (offset as u32).wrapping_mul(31).wrapping_add(id.get().wrapping_mul(7)).wrapping_add(dir).to_le_bytes()[0]
        ^ (offset >> 8) as u8
}

/// What a driver knows of one stream at one end.
#[derive(Debug, Default)]
struct Model {
    /// Bytes to send in all.
    len: usize,
    sent: usize,
    sent_end: bool,
    /// May send (proxy: `Accepted`; service: `accept` called).
    accepted: bool,
    received: usize,
    unconsumed: usize,
    got_end: bool,
}

impl Model {
    fn finished(&self) -> bool {
        self.sent_end && self.got_end && self.unconsumed == 0
    }
}

struct Peer {
    side: Side,
    link: Link,
    streams: BTreeMap<StreamId, Model>,
    /// Frames on their way to the other end, in order.
    wire: VecDeque<Vec<u8>>,
    go_away_seen: bool,
    drained: bool,
}

impl Peer {
    fn new(side: Side, config: LinkConfig, now: Instant, resumable: bool) -> Peer {
        let link = if resumable {
            Link::new_resumable(side, config, now, [1; 32])
        } else {
            Link::new(side, config, now)
        };
        Peer {
            side,
            link,
            streams: BTreeMap::new(),
            wire: VecDeque::new(),
            go_away_seen: false,
            drained: false,
        }
    }
}

struct Pair {
    now: Instant,
    rng: ChaCha8Rng,
    config: LinkConfig,
    proxy: Peer,
    service: Peer,
    /// Service streams waiting for `accept` or `refuse`.
    to_accept: Vec<StreamId>,
    /// Lengths each side will send, by (sender, stream): the receiver's check at `End`.
    lengths: HashMap<(Side, StreamId), usize>,
    refused: usize,
    completed: usize,
    /// Transports replaced so far.
    resumes: usize,
    /// The transport is dead: whatever either end sends is lost, until a
    /// new one comes.
    dead: bool,
}

impl Pair {
    fn new(seed: u64, config: LinkConfig) -> Pair {
        Pair::with_resume(seed, config, false)
    }

    fn with_resume(seed: u64, config: LinkConfig, resumable: bool) -> Pair {
        let now = Instant::now();
        let mut pair = Pair {
            now,
            rng: ChaCha8Rng::seed_from_u64(seed),
            proxy: Peer::new(Side::Proxy, config.clone(), now, resumable),
            service: Peer::new(Side::Service, config.clone(), now, resumable),
            config,
            to_accept: Vec::new(),
            lengths: HashMap::new(),
            refused: 0,
            completed: 0,
            resumes: 0,
            dead: false,
        };
        pair.flush(Side::Proxy);
        pair.flush(Side::Service);
        pair
    }

    fn peer(&mut self, side: Side) -> &mut Peer {
        match side {
            Side::Proxy => &mut self.proxy,
            Side::Service => &mut self.service,
        }
    }

    fn payload_len(&mut self) -> usize {
        match self.rng.random_range(0..10) {
            0..5 => self.rng.random_range(0..1000),
            5..9 => self.rng.random_range(0..50_000),
            _ => self.rng.random_range(0..300_000),
        }
    }

    /// The driver's duty after every call: drain transmit, then events.
    fn flush(&mut self, side: Side) {
        let mut buf = Vec::new();
        let now = self.now;
        let detached = self.peer(side).link.is_detached();
        while self.peer(side).link.poll_transmit(now, &mut buf) {
            assert!(!detached, "{side:?} sent while detached");
            let frame = std::mem::take(&mut buf);
            if !self.dead {
                self.peer(side).wire.push_back(frame);
            }
        }
        while let Some(event) = self.peer(side).link.poll_event() {
            self.on_event(side, event);
        }
        let peer = self.peer(side);
        assert_eq!(peer.link.stream_count(), peer.streams.len(), "{side:?}: link and driver disagree");
        assert!(peer.link.buffered() <= peer.link.config().link_window as usize);
    }

    fn on_event(&mut self, side: Side, event: LinkEvent) {
        let other = other(side);
        match event {
            LinkEvent::Opened { id, .. } => {
                assert_eq!(side, Side::Service);
                let len = self.payload_len();
                self.lengths.insert((side, id), len);
                self.service.streams.insert(id, Model { len, ..Model::default() });
                self.to_accept.push(id);
            }
            LinkEvent::Accepted { id } => self.proxy.streams.get_mut(&id).unwrap().accepted = true,
            LinkEvent::Refused { id, reason } => {
                assert_eq!(side, Side::Proxy);
                assert!(!self.proxy.streams.remove(&id).unwrap().accepted, "{id} refused after accept");
                assert!(
                    [Reason::REFUSED, Reason::STREAM_LIMIT, Reason::GOING_AWAY, Reason::CANCELLED]
                        .contains(&reason),
                    "{reason}"
                );
                self.refused += 1;
            }
            LinkEvent::End { id } => {
                let expected = self.lengths[&(other, id)];
                let model = self.peer(side).streams.get_mut(&id).unwrap();
                assert_eq!(model.received, expected, "{side:?} {id}: END before all data");
                model.got_end = true;
                self.forget_if_finished(side, id);
            }
            LinkEvent::Reset { id, reason } => {
                assert_ne!(reason, Reason::LINK_LOST, "the link failed");
                self.peer(side).streams.remove(&id).unwrap();
                self.to_accept.retain(|a| *a != id);
            }
            LinkEvent::Writable { id } => assert!(self.peer(side).streams.contains_key(&id)),
            LinkEvent::GoAway => self.peer(side).go_away_seen = true,
            LinkEvent::Drained => self.peer(side).drained = true,
            // Found by the machine itself (frames unacknowledged too long):
            // the driver drops the transport, so nothing more crosses it.
            LinkEvent::PathLost { .. } => {
                assert!(self.peer(side).link.is_detached());
                self.proxy.wire.clear();
                self.service.wire.clear();
                self.dead = true;
            }
            other => panic!("{side:?}: {other:?}"),
        }
    }

    fn forget_if_finished(&mut self, side: Side, id: StreamId) {
        let peer = self.peer(side);
        if peer.streams.get(&id).is_some_and(Model::finished) {
            peer.streams.remove(&id);
            self.completed += 1;
        }
    }

    fn open(&mut self) {
        let now = self.now;
        match self.proxy.link.open(now) {
            Ok(id) => {
                let len = self.payload_len();
                self.lengths.insert((Side::Proxy, id), len);
                self.proxy.streams.insert(id, Model { len, ..Model::default() });
            }
            Err(e) => {
                assert!(self.proxy.streams.len() >= self.config.max_streams || self.proxy.go_away_seen, "{e}")
            }
        }
        self.flush(Side::Proxy);
    }

    fn answer_open(&mut self, accept: bool) {
        if self.to_accept.is_empty() {
            return;
        }
        let id = self.to_accept.swap_remove(self.rng.random_range(0..self.to_accept.len()));
        if accept {
            self.service.link.accept(id).unwrap();
            self.service.streams.get_mut(&id).unwrap().accepted = true;
        } else {
            self.service.link.refuse(id, Reason::REFUSED).unwrap();
            self.service.streams.remove(&id);
        }
        self.flush(Side::Service);
    }

    /// The send path of a driver: mark streams with bytes as wanting to
    /// send, then send up to `frames` frames in the link's order, reading a
    /// random amount up to the credit (a socket returns what it has).
    fn pump(&mut self, side: Side, frames: usize) {
        let peer = self.peer(side);
        let wanting: Vec<StreamId> =
            peer.streams.iter().filter(|(_, m)| m.accepted && m.sent < m.len).map(|(id, _)| *id).collect();
        for id in wanting {
            peer.link.want_send(id).unwrap();
        }
        for _ in 0..frames {
            let Some((id, credit)) = self.peer(side).link.next_send() else { break };
            let model = &self.peer(side).streams[&id];
            let left = model.len - model.sent;
            assert!(left > 0 && credit > 0);
            let n = self.rng.random_range(1..=credit.min(left));
            let (dead, now) = (self.dead, self.now);
            let peer = self.peer(side);
            let model = peer.streams.get_mut(&id).unwrap();
            let mut frame = vec![0; HEADER_LEN + n];
            for (i, b) in frame[HEADER_LEN..].iter_mut().enumerate() {
                *b = byte(side, id, model.sent + i);
            }
            assert_eq!(peer.link.data_header(now, id, n, &mut frame), Ok(HEADER_LEN));
            model.sent += n;
            // On a dead transport what is sent is lost (and kept for resending).
            if !dead {
                peer.wire.push_back(frame);
            }
            if model.sent < model.len {
                peer.link.want_send(id).unwrap();
            }
        }
        // Streams that sent everything half-close.
        let peer = self.peer(side);
        let done: Vec<StreamId> = peer
            .streams
            .iter()
            .filter(|(_, m)| m.accepted && m.sent == m.len && !m.sent_end)
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            let peer = self.peer(side);
            peer.link.end(id).unwrap();
            peer.streams.get_mut(&id).unwrap().sent_end = true;
            self.forget_if_finished(side, id);
        }
        self.flush(side);
    }

    /// Delivers up to `n` frames sent by `from`.
    fn deliver(&mut self, from: Side, n: usize) {
        let to = other(from);
        for _ in 0..n {
            let Some(frame) = self.peer(from).wire.pop_front() else { break };
            let now = self.now;
            let peer = self.peer(to);
            match peer.link.handle_frame(now, &frame) {
                Ok(Some(Incoming::Data { id, bytes })) => {
                    let model = peer.streams.get_mut(&id).expect("data for a stream the driver forgot");
                    for (i, b) in bytes.iter().enumerate() {
                        assert_eq!(
                            *b,
                            byte(from, id, model.received + i),
                            "{to:?} {id} byte {}",
                            model.received + i
                        );
                    }
                    model.received += bytes.len();
                    model.unconsumed += bytes.len();
                    assert!(model.unconsumed <= peer.link.config().max_stream_window as usize);
                }
                Ok(_) => {}
                Err(e) => panic!("{to:?} refused a frame from {from:?}: {e}"),
            }
            self.flush(to);
        }
    }

    /// A socket drains: some of one stream's delivered bytes are consumed.
    fn consume(&mut self, side: Side, all: bool) {
        let now = self.now;
        let candidates: Vec<StreamId> =
            self.peer(side).streams.iter().filter(|(_, m)| m.unconsumed > 0).map(|(id, _)| *id).collect();
        let targets = if all || candidates.is_empty() {
            candidates
        } else {
            vec![candidates[self.rng.random_range(0..candidates.len())]]
        };
        for id in targets {
            let unconsumed = self.peer(side).streams[&id].unconsumed;
            let n = if all { unconsumed } else { self.rng.random_range(1..=unconsumed) };
            let peer = self.peer(side);
            peer.link.consumed(now, id, n).unwrap();
            peer.streams.get_mut(&id).unwrap().unconsumed -= n;
            self.forget_if_finished(side, id);
        }
        self.flush(side);
    }

    fn reset_one(&mut self, side: Side) {
        let ids: Vec<StreamId> = self.peer(side).streams.keys().copied().collect();
        if ids.is_empty() {
            return;
        }
        let id = ids[self.rng.random_range(0..ids.len())];
        let peer = self.peer(side);
        // A service stream not yet answered may be reset too (its backend gave up).
        peer.link.reset(id, Reason::CANCELLED).unwrap();
        peer.streams.remove(&id);
        self.to_accept.retain(|a| *a != id);
        self.flush(side);
    }

    /// The transport dies: what was in flight is lost and both ends detach
    /// (each on its own discovery, here at once).
    fn cut(&mut self) {
        self.proxy.wire.clear();
        self.service.wire.clear();
        self.dead = true;
        for side in [Side::Proxy, Side::Service] {
            let now = self.now;
            self.peer(side).link.detach(now);
            assert!(self.peer(side).link.is_detached());
            self.flush(side);
        }
    }

    /// A new transport: each end says what it received, then both resend
    /// what the other lacks. Nothing may be sent before.
    fn reconnect(&mut self) {
        let Some(Frame::Resume { received: proxy_has, token }) = self.proxy.link.handover() else {
            panic!("no RESUME")
        };
        assert_eq!(token, [1; 32]);
        let Some(Frame::Resumed { received: service_has }) = self.service.link.handover() else {
            panic!("no RESUMED")
        };
        let now = self.now;
        self.dead = false;
        self.proxy.link.attach(now, service_has).unwrap();
        self.service.link.attach(now, proxy_has).unwrap();
        self.resumes += 1;
        self.flush(Side::Proxy);
        self.flush(Side::Service);
    }

    fn detached(&self) -> bool {
        self.proxy.link.is_detached() || self.service.link.is_detached()
    }

    fn tick(&mut self, by: Duration) {
        self.now += by;
        for side in [Side::Proxy, Side::Service] {
            let now = self.now;
            if self.peer(side).link.poll_timeout().is_some_and(|t| t <= now) {
                self.peer(side).link.handle_timeout(now);
                self.flush(side);
            }
        }
    }

    fn step(&mut self) {
        let side = if self.rng.random_bool(0.5) { Side::Proxy } else { Side::Service };
        if self.detached() {
            // A path search takes a while; the ends keep working meanwhile.
            if self.rng.random_bool(0.3) {
                if !(self.proxy.link.is_detached() && self.service.link.is_detached()) {
                    // One end found the path dead before the other noticed.
                    self.cut();
                }
                return self.reconnect();
            }
        } else if self.proxy.link.is_resumable() && self.rng.random_range(0..100) < 3 {
            return self.cut();
        }
        match self.rng.random_range(0..100) {
            0..10 => self.open(),
            10..18 => self.answer_open(true),
            18..20 => self.answer_open(false),
            20..42 => {
                let frames = self.rng.random_range(1..8);
                self.pump(side, frames);
            }
            42..68 => {
                let n = self.rng.random_range(1..12);
                self.deliver(side, n);
            }
            68..90 => self.consume(side, false),
            90..93 => self.reset_one(side),
            _ => {
                let by = Duration::from_millis(self.rng.random_range(0..200));
                self.tick(by);
            }
        }
    }

    /// No more opens; everything is answered, sent, delivered and consumed
    /// while the service drains the link.
    fn settle(&mut self) {
        if self.detached() {
            self.cut();
            self.reconnect();
        }
        self.service.link.go_away();
        self.flush(Side::Service);
        for _ in 0..100_000 {
            while !self.to_accept.is_empty() {
                self.answer_open(true);
            }
            self.pump(Side::Proxy, 64);
            self.pump(Side::Service, 64);
            self.deliver(Side::Proxy, usize::MAX);
            self.deliver(Side::Service, usize::MAX);
            self.consume(Side::Proxy, true);
            self.consume(Side::Service, true);
            self.tick(Duration::from_millis(1));
            if self.detached() {
                self.cut();
                self.reconnect();
            }
            if self.proxy.streams.is_empty()
                && self.service.streams.is_empty()
                && self.proxy.wire.is_empty()
                && self.service.wire.is_empty()
            {
                return;
            }
        }
        panic!("no progress: {:?} / {:?}", self.proxy.streams, self.service.streams);
    }
}

fn other(side: Side) -> Side {
    match side {
        Side::Proxy => Side::Service,
        Side::Service => Side::Proxy,
    }
}

fn arb_config() -> impl Strategy<Value = LinkConfig> {
    (1usize..16, 1u32..64 * 1024, 0u32..256 * 1024, 0u32..256 * 1024, 1usize..4096, 0usize..16 * 1024)
        .prop_map(|(max_streams, initial, grow, link, shared, alone)| LinkConfig {
            max_streams,
            initial_stream_window: initial,
            max_stream_window: initial + grow,
            // Clamped up to INITIAL_LINK_WINDOW (64 KiB) when smaller.
            link_window: link,
            max_frame_shared: shared,
            max_frame_alone: shared + alone,
            ..LinkConfig::default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn every_byte_arrives_in_order_and_all_state_is_freed(
        seed in any::<u64>(),
        steps in 50usize..600,
        config in arb_config(),
    ) {
        let mut pair = Pair::new(seed, config);
        for _ in 0..steps {
            pair.step();
        }
        pair.settle();
        for peer in [&pair.proxy, &pair.service] {
            prop_assert_eq!(peer.link.stream_count(), 0);
            prop_assert_eq!(peer.link.buffered(), 0);
            prop_assert!(peer.drained, "{:?} did not drain", peer.side);
            prop_assert!(!peer.link.is_closed());
        }
        prop_assert!(pair.proxy.go_away_seen);
        for (sender, receiver) in [(&pair.proxy, &pair.service), (&pair.service, &pair.proxy)] {
            let window = receiver.link.config().link_window as usize;
            prop_assert_eq!(sender.link.link_credit() + receiver.link.credit_owed(), window, "link credit lost");
        }
    }

    /// The same world over transports that die at random points and are
    /// replaced after random delays.
    #[test]
    fn a_resumable_link_loses_nothing_when_its_transport_dies(
        seed in any::<u64>(),
        steps in 50usize..600,
        config in arb_config(),
        resend_limit in 0usize..512 * 1024,
    ) {
        let config = LinkConfig { resend_limit, ..config };
        let mut pair = Pair::with_resume(seed, config, true);
        for _ in 0..steps {
            pair.step();
        }
        pair.settle();
        // Acknowledge what is left, so the resend buffers can empty.
        pair.tick(Duration::from_millis(50));
        pair.deliver(Side::Proxy, usize::MAX);
        pair.deliver(Side::Service, usize::MAX);
        for peer in [&pair.proxy, &pair.service] {
            prop_assert_eq!(peer.link.stream_count(), 0);
            prop_assert_eq!(peer.link.buffered(), 0);
            prop_assert!(peer.drained, "{:?} did not drain", peer.side);
            prop_assert!(!peer.link.is_closed());
            prop_assert_eq!(peer.link.resend_buffered(), 0, "{:?} keeps acknowledged frames", peer.side);
        }
        for (sender, receiver) in [(&pair.proxy, &pair.service), (&pair.service, &pair.proxy)] {
            let window = receiver.link.config().link_window as usize;
            prop_assert_eq!(sender.link.link_credit() + receiver.link.credit_owed(), window, "link credit lost");
        }
    }

    /// A bulk stream saturating its credit and a small request that becomes
    /// ready: the request's frame goes out next but one, and while both
    /// wait, the bulk stream's frames stay within the shared cap.
    #[test]
    fn a_small_request_is_not_stuck_behind_a_bulk_stream(
        bulk_frames in 0usize..40,
        shared in 1usize..20_000,
        alone_extra in 0usize..40_000,
    ) {
        let config = LinkConfig {
            max_frame_shared: shared,
            max_frame_alone: shared + alone_extra,
            initial_stream_window: 16 << 20,
            max_stream_window: 16 << 20,
            ..LinkConfig::default()
        };
        let mut pair = Pair::new(1, config.clone());
        pair.open();
        pair.open();
        let ids: Vec<StreamId> = pair.proxy.streams.keys().copied().collect();
        let (bulk, small) = (ids[0], ids[1]);
        pair.deliver(Side::Proxy, usize::MAX);
        for id in [bulk, small] {
            pair.service.link.accept(id).unwrap();
        }
        pair.flush(Side::Service);
        pair.deliver(Side::Service, usize::MAX);
        let link = &mut pair.proxy.link;
        let alone = link.config().max_frame_alone;
        let send = |link: &mut Link, expect: Option<StreamId>| {
            let (id, credit) = link.next_send().unwrap();
            if let Some(expect) = expect {
                assert_eq!(id, expect);
            }
            link.data_header(Instant::now(), id, credit, &mut [0; HEADER_LEN]).unwrap();
            (id, credit)
        };
        for _ in 0..bulk_frames {
            link.want_send(bulk).unwrap();
            let (_, credit) = send(link, Some(bulk));
            prop_assert!(credit <= alone);
        }
        link.want_send(bulk).unwrap();
        link.want_send(small).unwrap();
        let mut frames = 0;
        loop {
            let (id, credit) = send(link, None);
            frames += 1;
            if id == small {
                break;
            }
            prop_assert!(credit <= link.config().max_frame_shared, "bulk frame of {} while a request waits", credit);
            link.want_send(bulk).unwrap();
        }
        prop_assert!(frames <= 2, "request went out as frame {}", frames);
    }
}

#[test]
fn many_transports_die_under_many_streams_and_nothing_is_lost() {
    let config = LinkConfig { resend_limit: 64 * 1024, ..LinkConfig::default() };
    let mut pair = Pair::with_resume(42, config, true);
    for _ in 0..5000 {
        pair.step();
    }
    pair.settle();
    assert!(pair.resumes >= 20, "only {} resumes", pair.resumes);
    assert!(pair.completed >= 100, "only {} streams completed", pair.completed);
    for peer in [&pair.proxy, &pair.service] {
        assert_eq!(peer.link.stream_count(), 0);
        assert!(!peer.link.is_closed());
    }
}

#[test]
fn a_live_peer_keeps_the_link_up_and_a_silent_one_is_found_dead() {
    let config = LinkConfig::default();
    let mut pair = Pair::new(7, config.clone());
    let start = pair.now;
    let id = pair.proxy.link.open(start).unwrap();
    pair.proxy.streams.insert(id, Model::default());
    pair.lengths.insert((Side::Proxy, id), 0);
    pair.flush(Side::Proxy);
    // Ten idle minutes with pings answered.
    while pair.now < start + Duration::from_secs(600) {
        let next = [&pair.proxy, &pair.service].iter().filter_map(|p| p.link.poll_timeout()).min().unwrap();
        pair.tick(next.saturating_duration_since(pair.now));
        pair.deliver(Side::Proxy, usize::MAX);
        pair.deliver(Side::Service, usize::MAX);
    }
    assert!(pair.proxy.link.rtt().is_some());
    assert!(!pair.proxy.link.is_closed() && !pair.service.link.is_closed());
    // The service goes silent: its frames are lost from now on.
    let last_heard = pair.now;
    let mut closed = None;
    while closed.is_none() {
        let deadline = pair.proxy.link.poll_timeout().unwrap();
        pair.now = deadline;
        pair.proxy.link.handle_timeout(deadline);
        let mut buf = Vec::new();
        while pair.proxy.link.poll_transmit(deadline, &mut buf) {}
        while let Some(event) = pair.proxy.link.poll_event() {
            match event {
                LinkEvent::Reset { id: reset, reason } => {
                    assert_eq!((reset, reason), (id, Reason::LINK_LOST));
                }
                LinkEvent::Closed { error } => closed = Some(error),
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(closed, Some(LinkError::Silent(config.dead_after)));
    assert!(pair.now - last_heard <= config.dead_after, "found dead after {:?}", pair.now - last_heard);
    assert_eq!(pair.proxy.link.poll_timeout(), None);
}
