//! The thin tokio shell around [`Node`]: one task owns the node, the UDP socket and a single
//! timer heap (foca wants timers in order, so no task per timer); TCP repair connections run
//! in their own tasks and hand frames to the node task over a channel.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use schema::Endpoint;
use thiserror::Error;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::crypto::{KeyRing, Sealer};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::node::{Effect, MAX_DATAGRAM, Node, Timer};
use crate::repair_tcp::{self, ConnError, Repair};
use crate::sign::Signature;
use crate::snapshot::Snapshot;
use crate::view::{GossipView, MemberInfo};
use crate::view_entries::ViewCache;
use crate::{ConfigError, GossipConfig, NodeId};

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot bind gossip sockets on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("bind address {0} is unspecified: set `advertise` to the address peers should use")]
    Advertise(SocketAddr),
    #[error("the gossip task has stopped")]
    Stopped,
}

pub(crate) enum Command {
    PublishLocal(Vec<Endpoint>),
    Snapshots(Vec<(Snapshot, Option<Signature>)>),
    KeyRing(Option<KeyRing>),
    Join(Vec<SocketAddr>),
    OwnerKey(Box<crate::sign::SigningKey>),
    Certificate(Box<crate::sign::Certificate>),
    /// Stop without leaving the cluster, as a crash would.
    Crash,
    Frame {
        data: Vec<u8>,
        reply: oneshot::Sender<Option<Vec<u8>>>,
    },
}

/// The agent's handle on a running gossip node. Cheap to clone.
#[derive(Clone)]
pub struct GossipHandle {
    cmd: mpsc::Sender<Command>,
    view: watch::Receiver<Arc<GossipView>>,
    metrics: Arc<Metrics>,
    id: NodeId,
    tracker: TaskTracker,
}

impl GossipHandle {
    /// Replaces this node's own endpoints (diffed into row upserts and tombstones).
    pub async fn publish_local(&self, endpoints: Vec<Endpoint>) -> Result<(), RuntimeError> {
        self.send(Command::PublishLocal(endpoints)).await
    }

    /// Stores and gossips registry snapshots (one registry answer's), each as
    /// [`crate::Node::apply_registry_snapshot`] does; the view is republished once for all.
    pub async fn apply_registry_snapshots(
        &self,
        snapshots: Vec<Snapshot>,
    ) -> Result<(), RuntimeError> {
        let unsigned = snapshots.into_iter().map(|s| (s, None)).collect();
        self.send(Command::Snapshots(unsigned)).await
    }

    /// [`apply_registry_snapshots`](Self::apply_registry_snapshots) with the registry's
    /// signature of each listing where the answer had one
    /// ([`crate::Node::apply_registry_answer`]).
    pub async fn apply_registry_answers(
        &self,
        snapshots: Vec<(Snapshot, Option<Signature>)>,
    ) -> Result<(), RuntimeError> {
        self.send(Command::Snapshots(snapshots)).await
    }

    /// Rotates keys: the new ring's primary seals from now on, all its keys open.
    pub async fn set_key_ring(&self, ring: Option<KeyRing>) -> Result<(), RuntimeError> {
        self.send(Command::KeyRing(ring)).await
    }

    /// Adds seeds (for instance the registry's `tidings-agent` hosts) and announces to them.
    /// Gives the node its owner key ([`crate::Node::set_owner_key`]); send it before the
    /// first endpoints, so every row is signed.
    pub async fn set_owner_key(&self, key: crate::sign::SigningKey) -> Result<(), RuntimeError> {
        self.send(Command::OwnerKey(Box::new(key))).await
    }

    /// Takes a certificate from the registry ([`crate::Node::set_certificate`]).
    pub async fn set_certificate(
        &self,
        cert: crate::sign::Certificate,
    ) -> Result<(), RuntimeError> {
        self.send(Command::Certificate(Box::new(cert))).await
    }

    pub async fn join(&self, seeds: Vec<SocketAddr>) -> Result<(), RuntimeError> {
        self.send(Command::Join(seeds)).await
    }

    /// Stops the node without telling peers, like a crash (tests and chaos drills).
    pub async fn crash(&self) -> Result<(), RuntimeError> {
        self.send(Command::Crash).await
    }

    async fn send(&self, c: Command) -> Result<(), RuntimeError> {
        self.cmd.send(c).await.map_err(|_| RuntimeError::Stopped)
    }

    /// The merged gossip view; changes whenever rows, snapshots or membership change.
    pub fn view(&self) -> watch::Receiver<Arc<GossipView>> {
        self.view.clone()
    }

    pub fn members(&self) -> Vec<MemberInfo> {
        self.view.borrow().members.clone()
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// This node's identity; `id().addr` is its UDP and TCP address.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Waits until every task of this node has finished (after shutdown or a crash).
    pub async fn closed(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Wall-clock milliseconds since the Unix epoch: the default epoch of a starting node
/// (one that persists nothing; the agent uses [`crate::epoch::next_epoch`]).
pub fn epoch_now() -> u64 {
    schema::timefmt::unix_ms_now()
}

/// Starts a gossip node with `epoch_now()` as its epoch. See [`run_with_epoch`].
pub async fn run(
    config: GossipConfig,
    local: Vec<Endpoint>,
    shutdown: CancellationToken,
) -> Result<GossipHandle, RuntimeError> {
    run_with_epoch(config, epoch_now(), local, shutdown).await
}

/// Binds UDP and TCP on `config.bind` (same port; port 0 picks one), starts the node task
/// and returns its handle. `epoch` must exceed every epoch this address used before (the
/// agent persists it with [`crate::epoch::next_epoch`]; wall-clock ms alone works only while
/// clocks don't jump back). On `shutdown` the node leaves the cluster and its tasks stop.
pub async fn run_with_epoch(
    mut config: GossipConfig,
    epoch: u64,
    local: Vec<Endpoint>,
    shutdown: CancellationToken,
) -> Result<GossipHandle, RuntimeError> {
    let ring = config.validate()?;
    let (sealer_tx, sealer_rx) =
        watch::channel(Arc::new(Sealer::new(&config.cluster, ring.as_ref())));
    let (udp, tcp) = bind_pair(config.bind).await?;
    let bound = udp.local_addr().map_err(|source| RuntimeError::Bind {
        addr: config.bind,
        source,
    })?;
    let advertise = config.advertise.unwrap_or(bound);
    if advertise.ip().is_unspecified() {
        return Err(RuntimeError::Advertise(advertise));
    }
    config.advertise = Some(advertise);
    let cluster = config.cluster.clone();
    let limits = config.clone();
    let mut node = Node::new(config, epoch, rand::random())?;
    let now = now_ms();
    node.start(now);
    node.publish_local(now, local);
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (view_tx, view_rx) = watch::channel(Arc::new(GossipView::default()));
    let tracker = TaskTracker::new();
    let handle = GossipHandle {
        cmd: cmd_tx.clone(),
        view: view_rx,
        metrics: node.metrics(),
        id: node.id(),
        tracker: tracker.clone(),
    };
    let stop = shutdown.child_token();
    let repair = Repair::new(&limits, cmd_tx.clone(), handle.metrics.clone(), sealer_rx);
    let task = NodeTask {
        node,
        udp: Arc::new(udp),
        repair: repair.clone(),
        cluster,
        sealer_tx,
        timers: Timers::default(),
        view_tx,
        last_gen: u64::MAX,
        view_cache: ViewCache::default(),
        tracker: tracker.clone(),
    };
    let tcp = Arc::new(tcp);
    let accept = move || {
        let tcp = tcp.clone();
        async move { tcp.accept().await }
    };
    tracker.spawn(repair_tcp::accept_loop(
        accept,
        repair,
        stop.clone(),
        tracker.clone(),
    ));
    tracker.spawn(task.run(cmd_rx, stop));
    tracker.close();
    tracing::info!(addr = %advertise, epoch, "gossip started");
    Ok(handle)
}

async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), RuntimeError> {
    let err = |source| RuntimeError::Bind { addr, source };
    // With port 0 the UDP port is picked first and TCP must get the same number; retry if
    // that TCP port happens to be taken.
    let mut last = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(addr).await.map_err(err)?;
        let port = udp.local_addr().map_err(err)?.port();
        match TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(e) => return Err(err(e)),
        }
    }
    Err(err(last.unwrap_or_else(|| {
        std::io::Error::other("no free port pair")
    })))
}

fn now_ms() -> u64 {
    epoch_now()
}

#[derive(Default)]
struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    timers: HashMap<u64, Timer>,
    seq: u64,
}

impl Timers {
    fn push(&mut self, after: Duration, timer: Timer) {
        self.seq += 1;
        self.heap.push(Reverse((Instant::now() + after, self.seq)));
        self.timers.insert(self.seq, timer);
    }

    fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    fn pop_due(&mut self, now: Instant) -> Vec<Timer> {
        let mut due = Vec::new();
        while let Some(Reverse((at, seq))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            due.extend(self.timers.remove(&seq));
        }
        due
    }
}

struct NodeTask {
    node: Node,
    udp: Arc<UdpSocket>,
    repair: Repair,
    cluster: String,
    /// The TCP side seals and opens with the same keys as the node.
    sealer_tx: watch::Sender<Arc<Sealer>>,
    timers: Timers,
    view_tx: watch::Sender<Arc<GossipView>>,
    last_gen: u64,
    /// Each service's view entries as last published: a change rebuilds only its services.
    view_cache: ViewCache,
    tracker: TaskTracker,
}

impl NodeTask {
    async fn run(mut self, mut cmd_rx: mpsc::Receiver<Command>, stop: CancellationToken) {
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        self.apply_effects().await;
        loop {
            let next = self
                .timers
                .next()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = stop.cancelled() => {
                    self.node.leave(now_ms());
                    self.apply_effects().await;
                    break;
                }
                r = self.udp.recv_from(&mut buf) => match r {
                    Ok((n, from)) => self.node.handle_packet(now_ms(), from, &buf[..n]),
                    Err(e) => tracing::debug!(error = %e, "udp receive failed"),
                },
                () = sleep_until(next) => {
                    for t in self.timers.pop_due(Instant::now()) {
                        self.node.handle_timer(now_ms(), t);
                    }
                }
                cmd = cmd_rx.recv() => match cmd {
                    None | Some(Command::Crash) => break,
                    Some(Command::PublishLocal(eps)) => self.node.publish_local(now_ms(), eps),
                    Some(Command::Snapshots(batch)) => {
                        let now = now_ms();
                        for (s, sig) in batch {
                            self.node.apply_registry_answer(now, s, sig);
                        }
                    }
                    Some(Command::KeyRing(r)) => {
                        self.node.set_key_ring(r.as_ref());
                        self.sealer_tx.send_replace(Arc::new(Sealer::new(&self.cluster, r.as_ref())));
                    }
                    Some(Command::Join(seeds)) => self.node.join(now_ms(), &seeds),
                    Some(Command::OwnerKey(k)) => self.node.set_owner_key(*k),
                    Some(Command::Certificate(c)) => self.node.set_certificate(now_ms(), *c),
                    Some(Command::Frame { data, reply }) => {
                        let _ = reply.send(self.node.handle_repair_frame(now_ms(), &data));
                    }
                },
            }
            self.apply_effects().await;
            self.publish_view();
        }
        stop.cancel();
    }

    async fn apply_effects(&mut self) {
        for effect in self.node.take_effects() {
            match effect {
                Effect::Send { to, packet } => {
                    if let Err(e) = self.udp.send_to(&packet, to).await {
                        tracing::debug!(%to, error = %e, "udp send failed");
                    }
                }
                Effect::Schedule { after, timer } => self.timers.push(after, timer),
                Effect::Repair { peer, frame } => {
                    let repair = self.repair.clone();
                    self.tracker.spawn(async move {
                        match repair_tcp::initiate(&repair, peer, frame).await {
                            Ok(()) | Err(ConnError::Busy) => {}
                            Err(e) => {
                                Metrics::bump(&repair.metrics.repair_failures, 1);
                                tracing::debug!(%peer, error = %e, "repair exchange failed");
                            }
                        }
                    });
                }
            }
        }
    }

    fn publish_view(&mut self) {
        let generation = self.node.view_generation();
        if generation == self.last_gen {
            return;
        }
        self.last_gen = generation;
        let view = GossipView {
            endpoints: self.node.view_entries(&mut self.view_cache),
            snapshots: self.node.snapshots(),
            members: self.node.members(),
            deregistered: self.node.deregistered_keys(),
        };
        let published = self.view_tx.send_if_modified(|cur| {
            let changed = **cur != view;
            if changed {
                *cur = Arc::new(view);
            }
            changed
        });
        if published {
            Metrics::bump(&self.node.metrics().views_published, 1);
        }
    }
}
