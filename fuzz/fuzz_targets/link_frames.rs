//! A link fed arbitrary frames (raw bytes, and well-formed frames with
//! arbitrary fields, which reach deeper than random bytes) interleaved with
//! arbitrary driver operations and time passing. It must never panic, never
//! hold more than its link window or its stream cap, send only frames that
//! decode, and free every stream once closed. Half the inputs run a
//! resumable link, with acknowledgements, detaching and resuming at
//! arbitrary points: its resend buffer stays within its limit. Inputs with
//! an odd shape take datagrams, which never spend credit nor fill the
//! resend buffer; half take early data (a service takes `DATA` before it
//! accepts, a proxy sends some with each open).
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use seaport_proto::link::{
    EARLY_DATA, FlowId, Frame, HEADER_LEN, Incoming, Link, LinkConfig, LinkEvent, MAX_DATA, MAX_DATAGRAM, RESEND_SLACK,
    Reason, Side, StreamId,
};

#[derive(Arbitrary, Debug)]
enum Op {
    Raw(Vec<u8>),
    Open { id: u8, window: u32, client: Option<std::net::SocketAddr> },
    Accept { id: u8, window: u32 },
    Data { id: u8, len: u16 },
    End { id: u8 },
    Reset { id: u8, reason: u8 },
    Window { id: u8, increment: u32 },
    Ping { nonce: u64 },
    Pong { nonce: u64 },
    GoAway { reason: u8 },
    Ack { received: u64 },
    Datagram { flow: u8, len: u16 },
    // Driver operations.
    LocalOpen,
    LocalAccept { id: u8 },
    LocalRefuse { id: u8 },
    Send { id: u8, len: u16 },
    Schedule { id: u8 },
    NextSend,
    LocalEnd { id: u8 },
    LocalReset { id: u8 },
    Consume { id: u8, n: u16 },
    LocalGoAway,
    Closed,
    Tick { millis: u16 },
    Detach,
    Attach { received: u64 },
    SendDatagram { flow: u8, len: u16 },
}

fuzz_target!(|input: (bool, u8, Vec<Op>)| {
    let (proxy, shape, ops) = input;
    let side = if proxy { Side::Proxy } else { Side::Service };
    let config = LinkConfig {
        max_streams: usize::from(shape % 8),
        initial_stream_window: 1 + u32::from(shape) * 97,
        max_stream_window: 4096,
        link_window: 0,
        max_frame_shared: 100,
        max_frame_alone: 1000,
        keepalive: Duration::from_secs(1),
        dead_after: Duration::from_secs(3),
        resume_within: Duration::from_secs(2),
        resend_limit: 0,
    };
    let mut now = Instant::now();
    let resumable = shape >= 128;
    let mut link =
        if resumable { Link::new_resumable(side, config, now, [7; 32]) } else { Link::new(side, config, now) };
    if shape % 2 == 1 {
        link.allow_datagrams();
    }
    // Early data: a service takes DATA before it accepts, a proxy sends
    // some with its opens.
    if shape % 4 >= 2 {
        link.allow_early_data();
    }
    let resend_limit = link.config().resend_limit;
    let window = link.config().link_window as usize;
    let payload = vec![0x5a; MAX_DATA];
    let mut frame = Vec::new();
    let mut out = vec![0; HEADER_LEN + MAX_DATA.max(MAX_DATAGRAM + 8)];
    for op in ops.into_iter().take(512) {
        let id = |n: u8| StreamId::new(u32::from(n));
        let peer = match &op {
            Op::Open { id: n, window, client } => Some(Frame::Open { id: id(*n), window: *window, client: *client }),
            Op::Accept { id: n, window } => Some(Frame::Accept { id: id(*n), window: *window }),
            Op::Data { id: n, len } => {
                let len = usize::from(*len).clamp(1, MAX_DATA);
                Some(Frame::Data { id: id(*n), bytes: &payload[..len] })
            }
            Op::End { id: n } => Some(Frame::End { id: id(*n) }),
            Op::Reset { id: n, reason } => {
                Some(Frame::Reset { id: id(*n), reason: Reason(u32::from(*reason)) })
            }
            Op::Window { id: n, increment } => Some(Frame::Window { id: id(*n), increment: *increment }),
            Op::Ping { nonce } => Some(Frame::Ping { nonce: *nonce }),
            Op::Pong { nonce } => Some(Frame::Pong { nonce: *nonce }),
            Op::GoAway { reason } => Some(Frame::GoAway { reason: Reason(u32::from(reason % 3)) }),
            Op::Ack { received } => Some(Frame::Ack { received: *received % 64 }),
            Op::Datagram { flow, len } => Some(Frame::Datagram {
                flow: FlowId::new(u32::from(*flow)),
                bytes: &payload[..usize::from(*len).min(MAX_DATAGRAM)],
            }),
            _ => None,
        };
        if let Some(f) = peer {
            frame.clear();
            f.encode(&mut frame);
        }
        match op {
            Op::Raw(bytes) => feed(&mut link, now, &bytes),
            Op::Open { .. }
            | Op::Accept { .. }
            | Op::Data { .. }
            | Op::End { .. }
            | Op::Reset { .. }
            | Op::Window { .. }
            | Op::Ping { .. }
            | Op::Pong { .. }
            | Op::GoAway { .. }
            | Op::Ack { .. }
            | Op::Datagram { .. } => feed(&mut link, now, &frame),
            Op::Detach => link.detach(now),
            Op::Attach { received } => {
                let handover = link.handover();
                assert_eq!(handover.is_some(), link.is_resumable());
                drop(link.attach(now, received % 64));
            }
            Op::LocalOpen => drop(link.open_early(now, None, &payload[..usize::from(shape) * 97])),
            Op::LocalAccept { id: n } => drop(link.accept(id(n))),
            Op::LocalRefuse { id: n } => drop(link.refuse(id(n), Reason::REFUSED)),
            Op::Send { id: n, len } => {
                let credit = link.send_credit(id(n));
                let len = usize::from(len);
                let result = link.data_header(now, id(n), len, &mut out);
                // What send_credit promised (fairness aside) is always accepted.
                assert!(len == 0 || len > credit || result.is_ok() || credit == 0, "{result:?}");
                if let Ok(header) = result {
                    assert_eq!(
                        Frame::decode(&out[..header + len]).map(|f| f.kind()).ok(),
                        Some(seaport_proto::link::FrameKind::Data)
                    );
                }
            }
            Op::SendDatagram { flow, len } => {
                let (len, credit, kept) = (usize::from(len), link.link_credit(), link.resend_buffered());
                let result = link.datagram_header(FlowId::new(u32::from(flow)), len, &mut out);
                assert_eq!((link.link_credit(), link.resend_buffered()), (credit, kept), "a datagram spent credit");
                if let Ok(header) = result {
                    assert!(link.takes_datagrams() && len <= MAX_DATAGRAM);
                    let decoded = Frame::decode(&out[..header + len]).map(|f| f.kind()).ok();
                    assert_eq!(decoded, Some(seaport_proto::link::FrameKind::Datagram));
                }
            }
            Op::Schedule { id: n } => drop(link.want_send(id(n))),
            Op::NextSend => {
                if let Some((sid, credit)) = link.next_send() {
                    assert!(credit > 0 && credit <= 1000);
                    link.data_header(now, sid, credit, &mut out).unwrap();
                }
            }
            Op::LocalEnd { id: n } => drop(link.end(id(n))),
            Op::LocalReset { id: n } => drop(link.reset(id(n), Reason::CANCELLED)),
            Op::Consume { id: n, n: k } => drop(link.consumed(now, id(n), usize::from(k))),
            Op::LocalGoAway => link.go_away(),
            Op::Closed => link.handle_closed(),
            Op::Tick { millis } => {
                now += Duration::from_millis(u64::from(millis));
                if link.poll_timeout().is_some_and(|t| t <= now) {
                    link.handle_timeout(now);
                }
            }
        }
        // The driver's duty: drain what the link wants to send, then its events.
        let mut sent = Vec::new();
        let mut frames = 0;
        let mut opened = None;
        while link.poll_transmit(now, &mut sent) {
            let f = Frame::decode(&sent).expect("the link sent a frame that does not decode");
            // Resent data comes from here, and early data right after its
            // stream's OPEN; other new data never does.
            if let Frame::Data { id, bytes } = f {
                let early = opened == Some(id) && bytes.len() <= EARLY_DATA && link.takes_early_data();
                assert!(resumable || early, "data from poll_transmit");
            }
            opened = match f {
                Frame::Open { id, .. } => Some(id),
                _ => None,
            };
            sent.clear();
            frames += 1;
            assert!(frames <= 4096 + 16, "control queue grew without bound");
        }
        while let Some(event) = link.poll_event() {
            if let LinkEvent::Closed { .. } = event {
                assert!(link.is_closed());
            }
        }
        assert!(link.buffered() <= window);
        assert!(link.resend_buffered() <= resend_limit + RESEND_SLACK + MAX_DATA, "resend buffer unbounded");
        assert!(link.stream_count() <= link.config().max_streams);
        if link.is_closed() {
            assert_eq!(link.stream_count(), 0);
            assert_eq!(link.buffered(), 0);
        }
    }
});

/// Hands one frame to the link; data is consumed at once half the time.
fn feed(link: &mut Link, now: Instant, frame: &[u8]) {
    if let Ok(Some(Incoming::Data { id, bytes })) = link.handle_frame(now, frame) {
        assert!(!bytes.is_empty());
        if bytes.len() % 2 == 0 {
            link.consumed(now, id, bytes.len()).unwrap();
        }
    }
}
