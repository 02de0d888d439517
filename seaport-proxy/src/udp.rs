//! A proxy's UDP ports (`--udp`, `--map ROLE@RANGE=PORT/udp`): each client
//! address is a **flow**, carried as datagrams on the link to one instance
//! of the role, chosen as a TCP connection's instance is (balance strategy,
//! pinned keys, failed instances last).
//!
//! A flow sticks to its instance while the link to it carries flows; when
//! the instance goes (the registries no longer list it, its link ended),
//! the flow's next datagram picks an instance anew. Flows end after
//! `--flow-idle` without a datagram either way.
//!
//! Invariants:
//! - The flows of all UDP ports together are capped (`--max-flows`); a
//!   datagram that would open one more is dropped, and counted. A flow
//!   whose link is being found holds at most [`PENDING`] datagrams.
//! - Reading the port never waits on a link: a new flow's instance is found
//!   in a task of its own, while the port goes on serving other clients.
//! - Nothing is cut: a datagram too large for a link is dropped whole.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use seaport_net::allow::AllowList;
use seaport_net::clock;
use seaport_net::identity::random_u64;
use seaport_net::link::{LinkHandle, recv_with};
use seaport_net::lock::lock;
use seaport_net::metrics::{DatagramDrop, metrics};
use seaport_net::pool::Links;
use seaport_proto::client::SetView;
use seaport_proto::link::{FlowId, MAX_DATAGRAM};
use seaport_proto::role::Protocol;
use tokio::net::UdpSocket;

/// Most datagrams a new flow holds while its instance is being reached.
pub const PENDING: usize = 16;
/// Most bytes a new flow holds meanwhile: 4,096 flows being set up hold at
/// most 256 MiB, not 16 largest datagrams each.
pub const PENDING_BYTES: usize = 64 * 1024;
/// Most datagrams read from the port in one turn, so that sweeping idle
/// flows and shutting down are never starved by a flood.
const READ_BURST: usize = 256;

/// The flows of every UDP port of the proxy, against `--max-flows`.
#[derive(Debug)]
pub struct FlowCap {
    open: AtomicUsize,
    max: usize,
}

impl FlowCap {
    /// At most `max` flows at once.
    pub fn new(max: usize) -> Arc<FlowCap> {
        Arc::new(FlowCap { open: AtomicUsize::new(0), max })
    }

    fn take(self: &Arc<Self>) -> Option<FlowSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| FlowSlot(self.clone()))
    }
}

/// One flow's place under the cap; given back on drop.
struct FlowSlot(Arc<FlowCap>);

impl Drop for FlowSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One client address's flow.
struct Entry {
    state: FlowState,
    _slot: FlowSlot,
}

enum FlowState {
    /// Its instance is being reached (since when); what it sent meanwhile.
    Pending(std::time::Instant, Vec<Vec<u8>>),
    /// Carried on `link` as `flow`.
    Ready { link: LinkHandle, flow: FlowId },
}

type Table = Arc<Mutex<HashMap<SocketAddr, Entry>>>;

/// One UDP port's mapping: what its flows need.
#[derive(Clone)]
pub struct UdpPort {
    /// Which of the proxy's queries the port serves.
    pub query: usize,
    /// The query, for messages.
    pub name: String,
    /// The union of the registries' answers, and how to choose from it.
    pub view: Arc<Mutex<SetView>>,
    pub links: Arc<Links>,
    /// The service keys this proxy trusts (`--service-key`).
    pub pinned: Arc<AllowList>,
    /// How long a flow lives without a datagram.
    pub idle: Duration,
    /// The proxy's flows in all.
    pub cap: Arc<FlowCap>,
    /// Whether "no UDP instance" was said since the last flow that found one.
    pub warned: Arc<AtomicBool>,
}

impl UdpPort {
    /// Serves the port until `stop` resolves; its flows end then.
    pub async fn serve(self, socket: UdpSocket, stop: impl std::future::Future<Output = ()>) {
        let socket = Arc::new(socket);
        let table: Table = Arc::default();
        let mut sweep =
            tokio::time::interval((self.idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = sweep.tick() => self.sweep(&table),
                ready = socket.readable() => {
                    if let Err(e) = ready {
                        tracing::error!("UDP port failed: {e}");
                        break;
                    }
                    for _ in 0..READ_BURST {
                        match recv_with(&socket, |bytes, from| self.take(&table, &socket, bytes, from)) {
                            Some(Ok(())) => {}
                            None => break,
                            // An ICMP error for an earlier reply to a client
                            // that has gone: nothing to do but go on.
                            Some(Err(e)) => {
                                tracing::debug!("UDP port: {e}");
                                break;
                            }
                        }
                    }
                }
            }
        }
        for (_, entry) in lock(&table).drain() {
            if let FlowState::Ready { link, flow } = entry.state {
                link.close_flow(flow);
            }
        }
    }

    /// A datagram from `from`: onto its flow, or the first of a new one.
    fn take(&self, table: &Table, socket: &Arc<UdpSocket>, bytes: &[u8], from: SocketAddr) {
        if bytes.len() > MAX_DATAGRAM {
            tracing::debug!(client = %from, len = bytes.len(), "datagram too large for a link: dropped");
            metrics().drop_datagram(DatagramDrop::TooLarge);
            return;
        }
        let mut flows = lock(table);
        match flows.get_mut(&from).map(|e| &mut e.state) {
            Some(FlowState::Ready { link, flow }) if link.carries_flows() => {
                let _ = link.send_datagram(*flow, bytes);
                return;
            }
            Some(FlowState::Ready { link, flow }) => {
                // Its instance went: the flow moves to another.
                tracing::debug!(client = %from, "flow's link ended: finding another instance");
                link.close_flow(*flow);
                flows.remove(&from);
            }
            Some(FlowState::Pending(_, held)) => {
                let bytes_held: usize = held.iter().map(Vec::len).sum();
                if held.len() < PENDING && bytes_held + bytes.len() <= PENDING_BYTES {
                    held.push(bytes.to_vec());
                } else {
                    metrics().drop_datagram(DatagramDrop::NoPath);
                }
                return;
            }
            None => {}
        }
        let Some(slot) = self.cap.take() else {
            tracing::debug!(client = %from, "at --max-flows: datagram dropped");
            metrics().drop_datagram(DatagramDrop::FlowLimit);
            return;
        };
        flows.insert(
            from,
            Entry { state: FlowState::Pending(clock::now(), vec![bytes.to_vec()]), _slot: slot },
        );
        drop(flows);
        tokio::spawn(self.clone().start_flow(table.clone(), socket.clone(), from));
    }

    /// Finds the flow of `from` an instance: the first in the strategy's
    /// order whose link takes it. Its held datagrams go first.
    async fn start_flow(self, table: Table, socket: Arc<UdpSocket>, from: SocketAddr) {
        let (order, others) = {
            let mut view = lock(&self.view);
            let mut order = view.choose_for(self.query, clock::now(), random_u64());
            order.retain(|i| self.pinned.admits(&i.key));
            let all = order.len();
            order.retain(|i| i.role.protocol() == Protocol::Udp);
            (order, all)
        };
        if order.is_empty() && !self.warned.swap(true, Ordering::Relaxed) {
            if others > 0 {
                tracing::warn!(query = %self.name, "its instances forward TCP, not UDP: serve it on a TCP port (drop --udp or /udp)");
            } else {
                tracing::warn!(query = %self.name, "no instance known: datagrams are dropped until one is");
            }
        }
        for instance in order {
            let link = match self.links.link_for(&instance).await {
                Ok(link) => link,
                Err(e) => {
                    tracing::warn!(service = %instance.key, "instance failed, trying the next: {e}");
                    lock(&self.view).report_failure(clock::now(), instance.key);
                    continue;
                }
            };
            let Some(flow) = link.open_flow(socket.clone(), from) else {
                tracing::warn!(service = %instance.key, "the service does not take datagrams (an older build, or its link is ending): trying the next");
                continue;
            };
            self.warned.store(false, Ordering::Relaxed);
            seaport_net::serve::record_peer_key(&instance.key);
            let mut flows = lock(&table);
            let Some(entry) = flows.get_mut(&from) else {
                // Shut down meanwhile.
                link.close_flow(flow);
                return;
            };
            let held = std::mem::replace(&mut entry.state, FlowState::Ready { link: link.clone(), flow });
            match held {
                FlowState::Pending(_, held) => {
                    for datagram in held {
                        let _ = link.send_datagram(flow, &datagram);
                    }
                }
                // A search for a later entry of the same client (this one's
                // was swept) finished first: the newer flow stands.
                FlowState::Ready { link: other, flow: other_flow } => {
                    link.close_flow(flow);
                    entry.state = FlowState::Ready { link: other, flow: other_flow };
                }
            }
            tracing::debug!(client = %from, service = %instance.key, "flow started");
            return;
        }
        if let Some(entry) = lock(&table).remove(&from)
            && let FlowState::Pending(_, held) = entry.state
        {
            for _ in held {
                metrics().drop_datagram(DatagramDrop::NoPath);
            }
        }
    }

    /// Ends the flows idle for `idle`, those whose link has ended, and
    /// those still looking for an instance after `idle` (their slot goes
    /// back; their search, once it ends, finds them gone).
    fn sweep(&self, table: &Table) {
        let now = clock::now();
        lock(table).retain(|from, entry| {
            let (link, flow) = match &entry.state {
                FlowState::Ready { link, flow } => (link, flow),
                FlowState::Pending(since, _) => return now.saturating_duration_since(*since) < self.idle,
            };
            let live = link
                .flow_active_at(*flow)
                .is_some_and(|last| now.saturating_duration_since(last) < self.idle);
            if !live {
                tracing::debug!(client = %from, "flow ended");
                link.close_flow(*flow);
            }
            live
        });
    }
}
