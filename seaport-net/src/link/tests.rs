//! A link between a real proxy side ([`LinkHandle`]) and a real service side
//! ([`serve`]) on loopback, through a forwarder that records what the proxy
//! sends and can cut the connection: a stream lives through cuts, and a
//! recorded resume replayed, or a resume from another key, takes nothing
//! over.

// Test code: a panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use seaport_proto::keys::{Keypair, Seed};
use seaport_proto::link::{Frame, LinkConfig, RESUME_TOKEN_LEN, Reason};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::*;
use crate::budget::Budget;
use crate::handshake::initiate;

const WAIT: Duration = Duration::from_secs(10);

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
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let responder = Arc::new(Responder {
        keypair,
        allow: Arc::new(AllowList::new(Vec::new(), None).unwrap()),
        timeout: WAIT,
        config: LinkConfig::default(),
        resumables: Arc::default(),
    });
    let backend = Backend { addr: backend, connect_timeout: WAIT, budget: Budget::new(64, 64) };
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

/// A link handshake as `local` with `remote` over a new connection to `to`.
async fn dial(to: SocketAddr, local: &Keypair, remote: PublicKey) -> Result<Reached, HandshakeError> {
    let stream = TcpStream::connect(to).await?;
    let (stream, session) = initiate(stream, local, remote, WAIT).await?;
    Ok(Reached { stream, session, path: Path::Direct, addr: to, better: None })
}

/// One echo round trip on the app's end of a stream.
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
    let pair = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut app = TcpStream::connect(pair.local_addr().unwrap()).await.unwrap();
    let client = Arc::new(pair.accept().await.unwrap().0);
    let id = link.open(client, WAIT).await.unwrap();
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
