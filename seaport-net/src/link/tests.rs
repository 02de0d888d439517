//! A link between a real proxy side ([`LinkHandle`]) and a real service side
//! ([`serve`]) on loopback, through a forwarder that records what the proxy
//! sends and can cut the connection: a stream lives through cuts, and a
//! recorded resume replayed, or a resume from another key, takes nothing
//! over.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use seaport_proto::keys::{Keypair, Seed};
use seaport_proto::link::{Frame, LinkConfig, MAX_DATAGRAM, RESUME_TOKEN_LEN, Reason};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::*;
use crate::budget::Budget;
use crate::handshake::initiate;
use seaport_proto::role::Protocol;

const WAIT: Duration = Duration::from_secs(10);
/// A service's flows end after this without a datagram.
const FLOW_IDLE: Duration = Duration::from_millis(300);

fn keypair(n: u8) -> Keypair {
    Keypair::from_seed(&Seed::from_bytes([n; 32]))
}

/// Echoes every connection.
async fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A service answering links on a listener; its responder, for its table.
async fn service(keypair: Keypair, backend: SocketAddr) -> (SocketAddr, Arc<Responder>) {
    service_of(keypair, backend, Protocol::Tcp, Budget::new(64, 64)).await
}

/// A service of a TCP or UDP backend.
async fn service_of(
    keypair: Keypair,
    backend: SocketAddr,
    protocol: Protocol,
    budget: Arc<Budget>,
) -> (SocketAddr, Arc<Responder>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let responder = Arc::new(Responder {
        keypair,
        allow: Arc::new(AllowList::new(Vec::new(), None).unwrap()),
        timeout: WAIT,
        config: LinkConfig::default(),
        resumables: Arc::default(),
    });
    let backend = match protocol {
        Protocol::Tcp => Backend {
            streams: StreamBackend::Tcp(backend),
            connect_timeout: WAIT,
            budget,
            udp: None,
            proxy_protocol: None,
        },
        Protocol::Udp => {
            let udp = Some(UdpBackend { addr: backend, idle: FLOW_IDLE, budget });
            Backend {
                streams: StreamBackend::Refused,
                connect_timeout: WAIT,
                budget: Budget::new(64, 64),
                udp,
                proxy_protocol: None,
            }
        }
    };
    let (_drain_tx, drain) = watch::channel(false);
    let serving = responder.clone();
    tokio::spawn(async move {
        let _keep = _drain_tx;
        while let Ok((stream, _)) = listener.accept().await {
            let (responder, backend, drain) = (serving.clone(), backend.clone(), drain.clone());
            tokio::spawn(async move {
                let _ = serve(stream, &responder, backend, drain, None).await;
            });
        }
    });
    (addr, responder)
}

/// What one connection's client sent, kept as it goes.
type Record = Arc<Mutex<Vec<u8>>>;

/// A forwarder to `to` that keeps what each connection's client sent, and
/// can cut the connections it carries.
#[derive(Clone, Default)]
struct Forwarder {
    sent: Arc<Mutex<Vec<Record>>>,
    pipes: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Forwarder {
    async fn start(to: SocketAddr) -> (SocketAddr, Forwarder) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fwd = Forwarder::default();
        let this = fwd.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(to).await.unwrap();
                let record = Arc::new(Mutex::new(Vec::new()));
                this.sent.lock().unwrap().push(record.clone());
                let pipe = tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 65536];
                        loop {
                            let n = cr.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                break;
                            }
                            record.lock().unwrap().extend_from_slice(&buf[..n]);
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    let down = tokio::io::copy(&mut sr, &mut cw);
                    tokio::select! { () = up => {}, _ = down => {} }
                });
                this.pipes.lock().unwrap().push(pipe);
            }
        });
        (addr, fwd)
    }

    /// Cuts every connection carried now (both sockets close).
    fn cut(&self) {
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }

    /// What the client of connection `n` (in order of arrival) sent.
    fn sent(&self, n: usize) -> Vec<u8> {
        self.sent.lock().unwrap()[n].lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.sent.lock().unwrap().len()
    }
}

/// A proxy's link to the service `remote` at `to`, dialed as `local`; a
/// lost path is looked for again at the same address.
async fn direct_link(to: SocketAddr, remote: PublicKey, local: &Keypair) -> LinkHandle {
    let dialer = local.clone();
    let repath: Repath = Arc::new(move || {
        let local = dialer.clone();
        Box::pin(async move { dial(to, &local, remote).await })
    });
    let reached = dial(to, local, remote).await.unwrap();
    LinkHandle::start(reached, LinkConfig::default(), repath).unwrap()
}

/// A link handshake as `local` with `remote` over a new connection to `to`.
async fn dial(to: SocketAddr, local: &Keypair, remote: PublicKey) -> Result<Reached, HandshakeError> {
    let stream = TcpStream::connect(to).await?;
    let (stream, session) = initiate(stream, local, remote, WAIT).await?;
    Ok(Reached { stream, session, path: Path::Direct, addr: to, better: None })
}

/// One echo round trip on the app's end of a stream.
/// A client's stream: the app's end to write and read at, and the end a
/// link carries.
async fn client_pair() -> (TcpStream, Arc<StreamSocket>) {
    let pair = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(pair.local_addr().unwrap()).await.unwrap();
    let client = Arc::new(StreamSocket::Tcp(pair.accept().await.unwrap().0));
    (app, client)
}

async fn round_trip(app: &mut TcpStream, text: &[u8]) {
    app.write_all(text).await.unwrap();
    let mut back = vec![0u8; text.len()];
    tokio::time::timeout(WAIT, app.read_exact(&mut back)).await.expect("echo in time").unwrap();
    assert_eq!(back, text);
}

/// Waits until `f` holds.
async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_stream_lives_through_cuts_and_a_replayed_or_forged_resume_takes_nothing() {
    let (service_key, proxy_key, stranger) = (keypair(1), keypair(2), keypair(3));
    let (service_addr, responder) = service(service_key.clone(), echo_backend().await).await;
    let (via, forwarder) = Forwarder::start(service_addr).await;
    let remote = service_key.public();
    let dialer = proxy_key.clone();
    let repath: Repath = Arc::new(move || {
        let local = dialer.clone();
        Box::pin(async move { dial(via, &local, remote).await })
    });
    let link = LinkHandle::start(dial(via, &proxy_key, remote).await.unwrap(), LinkConfig::default(), repath)
        .unwrap();
    assert!(link.is_resumable());

    // A client's stream: the app writes at one end, the link carries the other.
    let (mut app, client) = client_pair().await;
    let id = link.open(client, None, WAIT).await.unwrap();
    let carrier = link.clone();
    let running = tokio::spawn(async move { carrier.run(id).await });
    round_trip(&mut app, b"before any cut").await;

    // Cut twice: the link resumes on a new connection, the stream goes on.
    for cut in 1..=2 {
        forwarder.cut();
        until("a new connection after the cut", || forwarder.connections() > cut).await;
        round_trip(&mut app, format!("after cut {cut}").as_bytes()).await;
    }
    assert_eq!(responder.resumables.len(), 1);

    // The resume connection replayed byte for byte on a new connection:
    // its handshake is answered, but its RESUME cannot be read under the
    // new session's keys, so nothing changes hands.
    let recorded = forwarder.sent(1);
    let mut replay = TcpStream::connect(service_addr).await.unwrap();
    replay.write_all(&recorded).await.unwrap();
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(WAIT, replay.read_to_end(&mut sink)).await;
    assert!(ended.is_ok(), "the service closes a replayed resume");
    round_trip(&mut app, b"after a replay").await;

    // Another key naming the link by its real token, and one with a made-up
    // token: both are told there is no such link.
    let token: [u8; RESUME_TOKEN_LEN] = *responder.resumables.tokens().first().unwrap();
    for (who, token) in [(&stranger, token), (&proxy_key, [9; RESUME_TOKEN_LEN])] {
        let reached = dial(service_addr, who, remote).await.unwrap();
        let (sealer, opener, leftover, _) = resume::split_session(reached.session).unwrap();
        let mut forged = resume::Carrier::new(reached.stream, sealer, opener, &leftover);
        forged.send(Frame::Resume { received: 0, token }).await.unwrap();
        let answer = tokio::time::timeout(WAIT, forged.receive()).await.unwrap().unwrap();
        assert_eq!(Frame::decode(&answer), Ok(Frame::GoAway { reason: Reason::UNKNOWN_LINK }));
    }
    round_trip(&mut app, b"after forgeries").await;
    assert_eq!(responder.resumables.len(), 1);
    assert_eq!(link.stream_count(), 1);

    // The stream ends cleanly, as if nothing had happened.
    app.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, app.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert!(rest.is_empty());
    let moved = tokio::time::timeout(WAIT, running).await.unwrap().unwrap().unwrap();
    let expected = ["before any cut", "after cut 1", "after cut 2", "after a replay", "after forgeries"];
    let total: usize = expected.iter().map(|t| t.len()).sum();
    assert_eq!((moved.sent, moved.received), (total as u64, total as u64));
}

/// Answers every datagram with its sender's port (2 bytes) and the datagram.
async fn udp_echo_backend() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let reply = [&from.port().to_be_bytes()[..], &buf[..n]].concat();
            let _ = socket.send_to(&reply, from).await;
        }
    });
    addr
}

/// A client's datagram through the flow: the reply's payload, and the
/// port the backend saw it from.
async fn udp_round_trip(client: &UdpSocket, text: &[u8]) -> u16 {
    client.send(text).await.unwrap();
    let mut back = vec![0u8; 70_000];
    let n = tokio::time::timeout(WAIT, client.recv(&mut back)).await.expect("reply in time").unwrap();
    assert_eq!(&back[2..n], text);
    u16::from_be_bytes([back[0], back[1]])
}

#[tokio::test]
async fn udp_flows_carry_whole_datagrams_to_their_own_clients_and_end_when_idle() {
    let (service_key, proxy_key) = (keypair(1), keypair(2));
    let budget = Budget::new(2, 2);
    let (service_addr, _) =
        service_of(service_key.clone(), udp_echo_backend().await, Protocol::Udp, budget.clone()).await;
    let link = direct_link(service_addr, service_key.public(), &proxy_key).await;

    // The proxy's port: one socket; each client its own flow.
    let port = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let forward = {
        let (port, link) = (port.clone(), link.clone());
        let flows: Arc<Mutex<HashMap<SocketAddr, FlowId>>> = Arc::default();
        tokio::spawn(async move {
            loop {
                port.readable().await.unwrap();
                let _ = recv_with(&port, |bytes, from| {
                    let flow = *flows
                        .lock()
                        .unwrap()
                        .entry(from)
                        .or_insert_with(|| link.open_flow(port.clone(), from).unwrap());
                    let _ = link.send_datagram(flow, bytes);
                });
            }
        })
    };
    let client = |_: u8| async {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(port.local_addr().unwrap()).await.unwrap();
        c
    };
    let (a, b) = (client(1).await, client(2).await);
    let seen_a = udp_round_trip(&a, b"from a").await;
    let seen_b = udp_round_trip(&b, b"from b").await;
    assert_ne!(seen_a, seen_b, "each flow has its own socket toward the backend");
    assert_eq!(udp_round_trip(&a, b"again from a").await, seen_a, "a flow keeps its socket");
    // The largest datagram and an empty one arrive whole. (65,507 bytes
    // leave 2 for the echo's port prefix within what IPv4 carries, so the
    // largest sent through is 2 less.)
    let big: Vec<u8> = (0..MAX_DATAGRAM - 2).map(|i| i as u8).collect();
    assert_eq!(udp_round_trip(&a, &big).await, seen_a);
    assert_eq!(udp_round_trip(&b, b"").await, seen_b);

    // The budget caps flows: a third client gets nothing while two live.
    let c = client(3).await;
    c.send(b"third").await.unwrap();
    let mut buf = [0u8; 64];
    let answered = tokio::time::timeout(Duration::from_millis(200), c.recv(&mut buf)).await;
    assert!(answered.is_err(), "a flow beyond --max-flows is dropped");
    assert_eq!(budget.streams(), 2);

    // Idle flows end at the service; a flow used again gets a new socket.
    until("idle flows end", || budget.streams() == 0).await;
    assert_ne!(udp_round_trip(&a, b"after idle").await, seen_a);

    // A stream to a UDP service is refused as the wrong protocol.
    let (_app, tcp_client) = client_pair().await;
    match link.open(tcp_client, None, WAIT).await {
        Err(OpenError::Refused(reason)) => assert_eq!(reason, Reason::WRONG_PROTOCOL),
        other => panic!("a stream to a UDP service: {other:?}"),
    }
    forward.abort();
}

/// A stream whose local end is in this process (the gateway's): bytes both
/// ways, each end's end of file seen as end of file.
#[tokio::test]
async fn an_in_process_stream_carries_bytes_both_ways_and_ends_cleanly() {
    let (service_key, proxy_key) = (keypair(1), keypair(2));
    let (service_addr, _responder) = service(service_key.clone(), echo_backend().await).await;
    let link = direct_link(service_addr, service_key.public(), &proxy_key).await;
    let (ours, app) = StreamSocket::pair();
    let ours = Arc::new(ours);
    let id = link.open(ours, None, WAIT).await.unwrap();
    let carried = tokio::spawn({
        let link = link.clone();
        async move { link.run(id).await }
    });
    let big: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
    let (mut rd, mut wr) = tokio::io::split(app);
    let write = async {
        wr.write_all(&big).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let read = rd.read_to_end(&mut back);
    let ((), read) = tokio::time::timeout(WAIT, async { tokio::join!(write, read) }).await.expect("in time");
    read.unwrap();
    assert!(back == big, "{} bytes back of {}", back.len(), big.len());
    let moved = tokio::time::timeout(WAIT, carried).await.unwrap().unwrap().unwrap();
    assert_eq!((moved.sent, moved.received), (big.len() as u64, big.len() as u64));
}

/// A client's first bytes, sent before its stream opened, go with the
/// `OPEN` as early data: a service whose backend is down refuses the stream
/// and they stay in the client's socket, peeked; the next service's backend
/// gets them once, in order, then the rest.
#[tokio::test]
async fn a_clients_first_bytes_go_early_and_stay_for_the_next_instance_after_a_refusal() {
    let (service_key, refusing_key, proxy_key) = (keypair(1), keypair(4), keypair(2));
    let down = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let (refusing_addr, _) = service(refusing_key.clone(), down).await;
    let (service_addr, _) = service(service_key.clone(), echo_backend().await).await;
    let refusing = direct_link(refusing_addr, refusing_key.public(), &proxy_key).await;
    let link = direct_link(service_addr, service_key.public(), &proxy_key).await;
    assert!(link.shared.lock().link.takes_early_data());
    refusing.send_early_data();
    link.send_early_data();

    let (mut app, client) = client_pair().await;
    app.write_all(b"first bytes, ").await.unwrap();
    client.readable().await.unwrap();
    let refused = refusing.open(client.clone(), None, WAIT).await;
    assert!(matches!(refused, Err(OpenError::Refused(Reason::REFUSED))), "{refused:?}");
    assert_eq!(client.peek_waiting(100), b"first bytes, ");

    let id = link.open(client.clone(), None, WAIT).await.unwrap();
    // Accepted: the early bytes are off the client's socket.
    assert_eq!(client.peek_waiting(100), b"");
    let carrier = link.clone();
    let running = tokio::spawn(async move { carrier.run(id).await });
    app.write_all(b"then the rest").await.unwrap();
    let mut back = vec![0u8; 26];
    tokio::time::timeout(WAIT, app.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, b"first bytes, then the rest");
    app.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, app.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert!(rest.is_empty());
    let moved = tokio::time::timeout(WAIT, running).await.unwrap().unwrap().unwrap();
    assert_eq!((moved.sent, moved.received), (26, 26));
}

/// A stream whose early data went out and that then fails without a
/// refusal (here: no answer in time, its service still connecting a
/// backend that does not take connections) may have reached a backend: the
/// proxy must not send the same bytes to another instance.
#[tokio::test]
async fn an_open_that_fails_after_its_early_data_went_is_not_tried_elsewhere() {
    // A backend whose accept queue is full: connects to it hang.
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    full.listen(0).unwrap();
    let backend = full.local_addr().unwrap().as_socket().unwrap();
    let _queued: Vec<std::net::TcpStream> = (0..2)
        .filter_map(|_| std::net::TcpStream::connect_timeout(&backend, Duration::from_millis(200)).ok())
        .collect();
    let (service_key, proxy_key) = (keypair(1), keypair(2));
    let (service_addr, _) = service(service_key.clone(), backend).await;
    let link = direct_link(service_addr, service_key.public(), &proxy_key).await;
    link.send_early_data();

    let (mut app, client) = client_pair().await;
    app.write_all(b"POST /once").await.unwrap();
    client.readable().await.unwrap();
    let failed = link.open(client.clone(), None, Duration::from_millis(300)).await;
    assert!(matches!(failed, Err(OpenError::MaybeDelivered(_))), "{failed:?}");
    assert!(!failed.unwrap_err().may_try_another());

    // Without early data the same failure is an ordinary timeout.
    let (_quiet, client) = client_pair().await;
    let failed = link.open(client, None, Duration::from_millis(300)).await;
    assert!(matches!(failed, Err(OpenError::Timeout(_))), "{failed:?}");
    assert!(failed.unwrap_err().may_try_another());
}
