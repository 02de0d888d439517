//! Reaching a service from a proxy, whatever NATs sit between them: the path
//! a link takes, chosen in the spirit of happy eyeballs, and the service's
//! side of the meetings that make punching and relaying possible
//! ([`seaport_proto::meet`] has the exchange; [`crate::meet`] the sockets).
//!
//! # Choosing a path (proxy)
//! 1. **Direct**: every address the instance reported (the one the registry
//!    observed, its LAN address, any it was given) is dialed at once.
//! 2. **Meeting**, after a head start of the direct addresses
//!    ([`MEET_AFTER_NEW`] for a service not linked before, [`MEET_AFTER`]
//!    for one whose last link went direct, none for one whose last link was
//!    punched or relayed): the proxy asks the registry for a meeting and
//!    joins it; then, at once and side by side, it **punches** toward the
//!    service's observed address from the meet connection's port, and runs
//!    the handshake through the meet connection itself: the **relay**.
//!
//! The first path whose Noise handshake completes carries the link, so the
//! first byte waits for no timer beyond the direct head start. When the
//! relay wins while the punch is still under way, the punch goes on
//! ([`Reached::better`]) and the link moves onto it, with its streams, once
//! it is up; the relay is then freed at once. Other attempts still running
//! are dropped, which closes their sockets (the service's side of a dropped
//! path sees its end and lets it go). Every path runs the same `IK`
//! handshake as initiator, so none is trusted more than a direct one. What
//! worked is remembered per service ([`PathMemo`]).
//!
//! # Answering a meeting (service)
//! [`answer_meetings`] joins each meeting it is offered (only for proxies
//! its allow list admits, at most [`MAX_MEETINGS`] at once and
//! [`MAX_MEETINGS_PER_PROXY`] per proxy key), punches toward
//! the proxy and hands both the punched socket and the meet connection
//! (when relayed) to the service's link acceptor: whichever the proxy
//! handshakes on becomes the link.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use seaport_proto::client::ProxyClient;
use seaport_proto::keys::{Keypair, PublicKey};
use seaport_proto::meet::{MeetHello, MeetSide, Ticket};
use seaport_proto::message::Instance;
use seaport_proto::session::Session;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::allow::AllowList;
use crate::control::{ControlHandle, MemberView};
use crate::dial::{self, race};
use crate::handshake::{HandshakeError, initiate};
use crate::lock::lock;
use crate::meet::{Joined, join, punch};

/// Head start of the direct addresses before a meeting is asked for, for a
/// service whose last link went direct: it most likely will again, and a
/// meeting costs the registry and the service work a direct link does not.
pub const MEET_AFTER: Duration = Duration::from_millis(150);
/// The same for a service this proxy has not linked to yet: long enough for
/// a dial on a LAN or to a public address to answer (a few ms), short
/// enough that a service behind a NAT is met, and relayed, within the
/// first-byte budget of 100 ms.
pub const MEET_AFTER_NEW: Duration = Duration::from_millis(30);
/// How long a relayed link to a service that cannot resume links (a build
/// from before them) waits for its punch before it settles for the relay:
/// the head start punching had over relaying then.
pub const OLD_PEER_PUNCH_WAIT: Duration = Duration::from_millis(500);
/// How long a service keeps punching toward a proxy.
pub const PUNCH_FOR: Duration = Duration::from_secs(5);
/// How long a proxy waits for a registry's answer to a meeting request
/// before it asks the next registry of the set (a registry answers in a
/// round trip; one that does not within this is frozen or cut off).
pub const MEET_ANSWER_WAIT: Duration = Duration::from_secs(1);
/// How long either side waits for a meeting to come together.
pub const MEET_TIMEOUT: Duration = Duration::from_secs(10);
/// Most meetings a service answers at once; more offers are let go.
pub const MAX_MEETINGS: usize = 16;
/// Most of them for one proxy key, so one proxy cannot take them all.
pub const MAX_MEETINGS_PER_PROXY: usize = 4;

/// How a link reached its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// To one of the addresses the service reported or was observed at.
    Direct,
    /// Through both NATs, by a TCP simultaneous open the registry timed.
    Punched,
    /// Spliced through the registry (which sees only ciphertext).
    Relayed,
}

impl Path {
    /// The name in logs, events and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Punched => "punched",
            Path::Relayed => "relayed",
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The path each service's last link took, so the next link starts with
/// what worked.
#[derive(Default)]
pub struct PathMemo(Mutex<HashMap<PublicKey, Path>>);

impl PathMemo {
    /// What worked last for `service`.
    pub fn get(&self, service: &PublicKey) -> Option<Path> {
        lock(&self.0).get(service).copied()
    }

    /// `path` worked for `service`.
    pub fn set(&self, service: PublicKey, path: Path) {
        lock(&self.0).insert(service, path);
    }

    /// Forgets services not in `keys` (they left the registry).
    pub fn retain(&self, keys: &[PublicKey]) {
        lock(&self.0).retain(|k, _| keys.contains(k));
    }
}

type Answer = oneshot::Sender<Result<Ticket, String>>;

/// A registry's answer to a meeting request: the slot of the registry, the
/// request's id, and the ticket or why not.
pub type MeetAnswer = (usize, u32, Result<Ticket, String>);

/// A proxy's way to meetings: asks over a control session to a registry of
/// the set where both sides have a session (the service is listed there),
/// matches the registries' answers to the askers, and joins the meeting.
/// Meetings are spread over the registries that can arrange them (each new
/// one starts at the next), and one that fails at a registry is asked for
/// at the next, within the same deadline.
pub struct Introducer {
    control: ControlHandle<ProxyClient>,
    /// Askers waiting for an answer, by registry slot and request id.
    pending: Arc<Mutex<HashMap<(usize, u32), Answer>>>,
    /// Where the next meeting starts among the registries that can arrange it.
    turn: AtomicUsize,
    /// How long after a meeting punching starts (0: at once).
    punch_after: Duration,
}

impl Introducer {
    /// Meetings through the sessions of `control`. The registries' answers
    /// arrive on `answers`, which the proxy's event handler feeds from
    /// `ProxyEvent::MeetReady` and `ProxyEvent::MeetRefused`.
    pub fn new(
        control: ControlHandle<ProxyClient>,
        mut answers: mpsc::UnboundedReceiver<MeetAnswer>,
    ) -> Introducer {
        let pending: Arc<Mutex<HashMap<(usize, u32), Answer>>> = Arc::default();
        let route = pending.clone();
        tokio::spawn(async move {
            while let Some((slot, id, answer)) = answers.recv().await {
                if let Some(asker) = lock(&route).remove(&(slot, id)) {
                    let _ = asker.send(answer);
                }
            }
        });
        // A random first turn: proxies started together do not all begin
        // with the same registry.
        let turn = AtomicUsize::new(crate::identity::random_u64() as usize);
        Introducer { control, pending, turn, punch_after: Duration::ZERO }
    }

    /// Punches only `after` a meeting came together (the relay still starts
    /// at its usual time): a link then starts relayed and moves to the
    /// punched path once it is up. For testing that move, or to keep
    /// punching out of the first moment of a connection.
    pub fn with_punch_after(mut self, after: Duration) -> Introducer {
        self.punch_after = after;
        self
    }

    /// Asks for a meeting with `instance` and joins it, by `deadline`: at
    /// each registry that lists it in turn, until one works.
    /// Skips the registries in the slots `except` (ones that met but did
    /// not relay). Returns the slot of the registry that arranged the meeting.
    async fn meet(
        &self,
        instance: &Instance,
        deadline: Instant,
        except: &[usize],
    ) -> Result<(usize, Joined), HandshakeError> {
        let mut members: Vec<MemberView<ProxyClient>> = self
            .control
            .members()
            .into_iter()
            .filter(|m| !except.contains(&m.slot))
            .filter(|m| m.is_connected() && lock(&m.client).lists(&instance.key, &instance.role))
            .collect();
        if members.is_empty() {
            return Err(HandshakeError::NoMeeting(
                "no registry of the set that lists the service has a session with this proxy".into(),
            ));
        }
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % members.len();
        members.rotate_left(start);
        let mut why = Vec::new();
        for (i, member) in members.iter().enumerate() {
            // A registry that holds its session but does not answer (frozen,
            // cut off) must leave the next one time to: only the last waits
            // out the whole deadline for its answer.
            let answer_by = if i + 1 == members.len() {
                deadline
            } else {
                deadline.min(Instant::now() + MEET_ANSWER_WAIT)
            };
            match self.meet_at(member, instance, answer_by, deadline).await {
                Ok(joined) => return Ok((member.slot, joined)),
                Err(e) => {
                    tracing::info!(registry = %member.member, service = %instance.key, "no meeting there: {e}");
                    why.push(format!("at {}: {e}", member.member));
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        Err(HandshakeError::NoMeeting(why.join("; ")))
    }

    /// Asks `member`'s registry for a meeting with `instance`, waits for
    /// its answer until `answer_by`, and joins it by `deadline`.
    async fn meet_at(
        &self,
        member: &MemberView<ProxyClient>,
        instance: &Instance,
        answer_by: Instant,
        deadline: Instant,
    ) -> Result<Joined, HandshakeError> {
        let no_meeting = |why: &str| HandshakeError::NoMeeting(why.to_owned());
        let addr = (*member.registry.borrow()).ok_or_else(|| no_meeting("not connected to the registry"))?;
        let (tx, rx) = oneshot::channel();
        {
            // Both locks at once, so the answer cannot overtake the asker.
            let mut client = lock(&member.client);
            let id = client.meet(instance.key, instance.role.clone()).ok_or_else(|| {
                no_meeting("the registry cannot arrange meetings (or too many are pending)")
            })?;
            lock(&self.pending).insert((member.slot, id), tx);
        }
        member.poke.notify_one();
        let ticket = tokio::time::timeout_at(answer_by, rx)
            .await
            .map_err(|_| no_meeting("the registry did not answer in time"))?
            .map_err(|_| no_meeting("the registry session ended"))?
            .map_err(|why| HandshakeError::NoMeeting(format!("the registry refused: {why}")))?;
        let left = deadline.saturating_duration_since(Instant::now());
        Ok(join(addr, MeetHello { ticket, side: MeetSide::Proxy }, left).await?)
    }
}

/// A link's handshake completed on a path.
pub struct Reached {
    /// The stream, handshake done.
    pub stream: TcpStream,
    /// Its session, to hand to the link driver.
    pub session: Session,
    /// Which path.
    pub path: Path,
    /// Where it goes (the registry's address for a relayed link).
    pub addr: SocketAddr,
    /// A relayed path's punch, still under way when the relay won: the
    /// link moves onto it if it succeeds.
    pub better: Option<Search>,
}

/// Whether the service on the other end of `reached` can resume links.
fn resumable(reached: &Reached) -> bool {
    reached.session.remote_capabilities().contains(seaport_proto::hello::Capabilities::RESUME)
}

/// A search for a path to a service, under way.
pub type Search = std::pin::Pin<Box<dyn Future<Output = Result<Reached, HandshakeError>> + Send>>;

/// Finds a path to `instance` and runs the link handshake on it, within
/// `timeout` (see the module docs), starting with what worked `last`.
/// Without an `introducer` only direct paths are tried; without `relay`,
/// no relayed one.
pub async fn establish(
    instance: &Instance,
    local: &Keypair,
    timeout: Duration,
    introducer: Option<&Introducer>,
    last: Option<Path>,
    relay: bool,
) -> Result<Reached, HandshakeError> {
    let remote = instance.key;
    let direct = async {
        let attempt = |addr| {
            let local = local.clone();
            async move { initiate(dial::connect(addr, timeout).await?, &local, remote, timeout).await }
        };
        let (addr, (stream, session)) =
            race(&instance.addrs, attempt).await.map_err(HandshakeError::Unreachable)?;
        Ok(Reached { stream, session, path: Path::Direct, addr, better: None })
    };
    let Some(introducer) = introducer else { return direct.await };
    let deadline = Instant::now() + timeout;
    let meet_after = match last {
        Some(Path::Direct) => MEET_AFTER,
        Some(Path::Punched | Path::Relayed) => Duration::ZERO,
        None => MEET_AFTER_NEW,
    };
    let via_meeting = async {
        tokio::time::sleep(meet_after).await;
        let (slot, Joined { stream: meet, local: port, peer }) =
            introducer.meet(instance, deadline, &[]).await?;
        let (punch_from, punch_to, owned, punch_after) =
            (port, peer.addr, local.clone(), introducer.punch_after);
        let punched = async move {
            tokio::time::sleep(punch_after).await;
            // Counted once it ends: a punch abandoned with its meeting is uncounted.
            let punched = punch(punch_from, punch_to, deadline).await;
            crate::metrics::metrics().punch(punched.is_ok());
            let stream = punched?;
            let (stream, session) = initiate(stream, &owned, remote, timeout).await?;
            Ok(Reached { stream, session, path: Path::Punched, addr: punch_to, better: None })
        };
        let relayed = async {
            if !relay {
                return Err(HandshakeError::NoMeeting("not relayed: looking for a better path".into()));
            }
            let meet = if peer.relaying {
                meet
            } else {
                // This registry does not relay (--no-relay, or at its relay
                // limits): the others of the set may, each asked in turn
                // (at most once: the set is small). The first meeting's
                // connection stays open meanwhile, while its punch goes on.
                let mut refused = vec![slot];
                loop {
                    let (other, joined) = introducer.meet(instance, deadline, &refused).await.map_err(|e| {
                        HandshakeError::NoMeeting(format!(
                            "no registry of the set relays this link (--no-relay, or at their relay limits): {e}"
                        ))
                    })?;
                    if joined.peer.relaying {
                        break joined.stream;
                    }
                    refused.push(other);
                }
            };
            let registry = meet.peer_addr()?;
            let (stream, session) = initiate(meet, local, remote, timeout).await?;
            Ok(Reached { stream, session, path: Path::Relayed, addr: registry, better: None })
        };
        // The relay may win while the punch is still under way: the punch
        // goes on, and the link moves onto it if it comes up.
        let mut punched: Option<Search> = Some(Box::pin(punched));
        let (mut punch_err, mut relay_err) = (None, None);
        tokio::pin!(relayed);
        loop {
            tokio::select! {
                done = async { match punched.as_mut() { Some(p) => p.await, None => std::future::pending().await } }, if punched.is_some() => {
                    punched = None;
                    match done {
                        Ok(won) => return Ok(won),
                        Err(e) => punch_err = Some(e),
                    }
                }
                done = &mut relayed, if relay_err.is_none() => match done {
                    Ok(mut won) if resumable(&won) || punched.is_none() => {
                        won.better = punched.take();
                        return Ok(won);
                    }
                    Ok(won) => {
                        // A service from before resumable links cannot move
                        // the link later: give the punch the head start it
                        // had then, and take the relay only if it fails.
                        let punch = punched.take();
                        return match punch {
                            Some(p) => match tokio::time::timeout_at((Instant::now() + OLD_PEER_PUNCH_WAIT).min(deadline), p).await {
                                Ok(Ok(better)) => Ok(better),
                                _ => Ok(won),
                            },
                            None => Ok(won),
                        };
                    }
                    Err(e) => relay_err = Some(e),
                },
            }
            if punch_err.is_some() && relay_err.is_some() {
                let (punch, relay) = (punch_err.take(), relay_err.take());
                let missing = || HandshakeError::NoMeeting("no attempt".into());
                return Err(HandshakeError::Meeting {
                    punch: Box::new(punch.unwrap_or_else(missing)),
                    relay: Box::new(relay.unwrap_or_else(missing)),
                });
            }
        }
    };
    let via_meeting = async {
        tokio::time::timeout_at(deadline, via_meeting).await.map_err(|_| HandshakeError::Timeout(timeout))?
    };
    first_ok(direct, via_meeting).await.map_err(|(direct, meeting)| HandshakeError::NoPath {
        direct: Box::new(direct),
        meeting: Box::new(meeting),
    })
}

/// The first of two attempts to succeed; both errors if neither does.
async fn first_ok<T, E>(
    a: impl Future<Output = Result<T, E>>,
    b: impl Future<Output = Result<T, E>>,
) -> Result<T, (E, E)> {
    tokio::pin!(a, b);
    let (mut a_err, mut b_err) = (None, None);
    loop {
        tokio::select! {
            done = &mut a, if a_err.is_none() => match done {
                Ok(won) => return Ok(won),
                Err(e) => a_err = Some(e),
            },
            done = &mut b, if b_err.is_none() => match done {
                Ok(won) => return Ok(won),
                Err(e) => b_err = Some(e),
            },
        }
        match (a_err.take(), b_err.take()) {
            (Some(a), Some(b)) => return Err((a, b)),
            (a, b) => (a_err, b_err) = (a, b),
        }
    }
}

/// A service's side of the meetings the registries offer: for each offer from
/// a proxy `allow` admits, joins the meeting at the registry that offered
/// it, and hands `links` the meet connection (when relayed) and a punched
/// socket (when punching works) as candidate links, each with the address
/// it runs over.
pub async fn answer_meetings(
    mut offers: mpsc::Receiver<(Ticket, PublicKey, SocketAddr)>,
    allow: Arc<AllowList>,
    links: mpsc::Sender<(TcpStream, SocketAddr)>,
) {
    // Owned here, so that they end with this task (at shutdown).
    let mut meetings = tokio::task::JoinSet::new();
    let mut per_proxy: HashMap<PublicKey, usize> = HashMap::new();
    loop {
        let offer = tokio::select! {
            offer = offers.recv() => offer,
            Some(done) = meetings.join_next(), if !meetings.is_empty() => {
                if let Ok(proxy) = done
                    && let Some(n) = per_proxy.get_mut(&proxy)
                {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        per_proxy.remove(&proxy);
                    }
                }
                continue;
            }
        };
        let Some((ticket, proxy, addr)) = offer else { return };
        if !allow.admits(&proxy) {
            tracing::debug!(%proxy, "meeting offer from a proxy not allowed here: ignored");
            continue;
        }
        let theirs = per_proxy.get(&proxy).copied().unwrap_or(0);
        if meetings.len() >= MAX_MEETINGS || theirs >= MAX_MEETINGS_PER_PROXY {
            tracing::warn!(%proxy, "{} meetings under way ({theirs} with this proxy): this one is let go", meetings.len());
            continue;
        }
        *per_proxy.entry(proxy).or_default() += 1;
        let links = links.clone();
        meetings.spawn(async move {
            answer(addr, ticket, proxy, links).await;
            proxy
        });
    }
}

/// Joins one meeting and hands on its candidate links.
async fn answer(
    addr: SocketAddr,
    ticket: Ticket,
    proxy: PublicKey,
    links: mpsc::Sender<(TcpStream, SocketAddr)>,
) {
    let joined = match join(addr, MeetHello { ticket, side: MeetSide::Service }, MEET_TIMEOUT).await {
        Ok(joined) => joined,
        Err(e) => {
            tracing::info!(%proxy, "meeting failed: {e}");
            return;
        }
    };
    tracing::debug!(%proxy, peer = %joined.peer.addr, relaying = joined.peer.relaying, "meeting joined");
    let Joined { stream, local, peer } = joined;
    // Unrelayed, the meet connection is still held while punching: it keeps
    // the NAT's mapping of our port alive.
    let held = if peer.relaying {
        let _ = links.send((stream, addr)).await;
        None
    } else {
        Some(stream)
    };
    let punched = punch(local, peer.addr, Instant::now() + PUNCH_FOR).await;
    crate::metrics::metrics().punch(punched.is_ok());
    match punched {
        Ok(stream) => {
            let _ = links.send((stream, peer.addr)).await;
        }
        Err(e) => tracing::debug!(%proxy, "no punched path: {e}"),
    }
    drop(held);
}
