//! The sans-IO gossip node: foca SWIM + endpoint rows + snapshots + repair, driven by the
//! caller with packets, timers and a clock, answering with [`Effect`]s.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use foca::{AccumulatingRuntime, Foca, Member, NoCustomBroadcast};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use schema::codec;
use schema::{Endpoint, EndpointKey};

use crate::NodeId;
use crate::broadcast::{BroadcastItem, Store};
use crate::codec::{FocaCodec, PacketKind};
use crate::config::{ConfigError, GossipConfig, foca_config};
use crate::crypto::{KeyRing, Sealer};
use crate::metrics::Metrics;
use crate::probing::ProbeHealth;
use crate::repair::{self, Digest, Proofs, RepairFrame};
use crate::returning::Returning;
use crate::rows::{Row, RowStatus, Version};
use crate::sign::{self, Signature, SigningKey, SigningMode};
use crate::snapshot::{Snapshot, SnapshotStore};
use crate::spread::Outbox;
use crate::view::MemberInfo;

/// Largest UDP datagram we produce or accept, sealed (memberlist's 1400).
pub const MAX_DATAGRAM: usize = 1400;
/// Largest repair frame (plaintext). On TCP it travels as sealed chunks (`crate::stream`),
/// each authenticated before the next is read, so only authenticated bytes are buffered.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Broadcast items above this are left to repair, so that a packet always has room for a
/// few items.
pub(crate) const MAX_BROADCAST_ITEM: usize = 1000;
/// Most rows from one repair frame that are re-broadcast (see `Node::rebroadcast`).
const REBROADCAST_MAX: usize = 32;
/// With signed gossip on, SWIM identities dated further ahead of this node's clock are
/// refused ([`FocaCodec`]). An hour: far beyond clock error between synced hosts, and
/// room for an agent whose epoch was carried ahead of its clock by a step back
/// (`epoch::next_epoch`).
pub const MAX_EPOCH_AHEAD_MS: u64 = 3_600_000;

type Swim = Foca<NodeId, FocaCodec, StdRng, NoCustomBroadcast>;

/// A timer the caller must deliver back through [`Node::handle_timer`] (late is fine, lost
/// is not: foca's probe cycle depends on every timer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timer {
    Swim(foca::Timer<NodeId>),
    /// One dissemination round of rows and snapshots ([`crate::spread`]).
    Gossip,
    Repair,
    Housekeeping,
}

/// What the node asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send this sealed datagram over UDP.
    Send { to: SocketAddr, packet: Vec<u8> },
    /// Call `handle_timer(timer)` after `after`.
    Schedule { after: Duration, timer: Timer },
    /// Open a TCP connection to `peer`, send `frame`; feed every frame received on it to
    /// [`Node::handle_repair_frame`] and send back what that returns. Repair frames are
    /// plaintext here: the driver seals them on the wire ([`crate::stream`]).
    Repair { peer: SocketAddr, frame: Vec<u8> },
}

/// One gossip node. Not thread-safe by design: one task owns it.
pub struct Node {
    pub(crate) cfg: GossipConfig,
    pub(crate) me: NodeId,
    pub(crate) swim: Swim,
    pub(crate) rt: AccumulatingRuntime<NodeId>,
    pub(crate) store: Store,
    pub(crate) sealer: Sealer,
    pub(crate) rng: StdRng,
    pub(crate) effects: Vec<Effect>,
    pub(crate) members: BTreeMap<SocketAddr, MemberInfo>,
    /// Owners seen in SWIM membership, so their rows can go when foca forgets them.
    pub(crate) seen_owners: BTreeSet<SocketAddr>,
    /// Owners with rows but never seen in SWIM, and since when (ms).
    pub(crate) unknown_owners: BTreeMap<SocketAddr, u64>,
    pub(crate) local: BTreeMap<EndpointKey, Endpoint>,
    /// Members declared down recently, and since when (ms): announced to every tick.
    pub(crate) recently_down: BTreeMap<SocketAddr, u64>,
    pub(crate) seq: u64,
    pub(crate) now_ms: u64,
    pub(crate) started_ms: u64,
    pub(crate) sized_for: u32,
    pub(crate) membership_changes: u64,
    pub(crate) metrics: Arc<Metrics>,
    /// Rows and snapshots still to be passed on.
    pub(crate) outbox: Outbox,
    /// Outcomes of our direct probes, which set foca's number of indirect probes.
    pub(crate) probing: ProbeHealth,
    pub(crate) indirect_probes: usize,
    /// Owners back in contact whose tombstones wait for their current rows.
    pub(crate) returning: Returning,
    /// This node's owner key: signs the rows it writes (signed gossip).
    pub(crate) signer: Option<SigningKey>,
    /// The newest SWIM identity epoch accepted ([`MAX_EPOCH_AHEAD_MS`]), shared with the codec.
    pub(crate) max_epoch: Arc<AtomicU64>,
}

impl Node {
    /// Builds a node. `epoch` must grow across restarts of this address (wall-clock ms at
    /// start, or persisted + 1); `rng_seed` seeds every random choice and nonce.
    pub fn new(cfg: GossipConfig, epoch: u64, rng_seed: u64) -> Result<Node, ConfigError> {
        let ring = cfg.validate()?;
        let trust = cfg.trust()?;
        let me = NodeId::new(cfg.advertise.unwrap_or(cfg.bind), epoch);
        let swim_rng = StdRng::seed_from_u64(rng_seed);
        let indirect_probes = crate::probing::MIN_INDIRECT_PROBES;
        let max_epoch = Arc::new(AtomicU64::new(u64::MAX));
        let codec = if trust.mode == SigningMode::Off {
            FocaCodec::default()
        } else {
            FocaCodec::bounded(max_epoch.clone())
        };
        let swim = Foca::new(me, foca_config(&cfg, 1, indirect_probes), swim_rng, codec);
        let store = Store {
            snapshots: SnapshotStore::with_max_skew(cfg.max_snapshot_skew_ms),
            trust,
            ..Store::default()
        };
        Ok(Node {
            sealer: Sealer::new(&cfg.cluster, ring.as_ref()),
            cfg,
            me,
            swim,
            rt: AccumulatingRuntime::new(),
            store,
            rng: StdRng::seed_from_u64(rng_seed ^ 0x9e37_79b9_7f4a_7c15),
            effects: Vec::new(),
            members: BTreeMap::new(),
            seen_owners: BTreeSet::new(),
            unknown_owners: BTreeMap::new(),
            local: BTreeMap::new(),
            recently_down: BTreeMap::new(),
            seq: 0,
            now_ms: 0,
            started_ms: 0,
            sized_for: 1,
            membership_changes: 0,
            metrics: Arc::new(Metrics::default()),
            outbox: Outbox::default(),
            probing: ProbeHealth::default(),
            indirect_probes,
            returning: Returning::default(),
            signer: None,
            max_epoch,
        })
    }

    pub fn id(&self) -> NodeId {
        self.me
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Takes the effects produced so far; call after every entry point.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    pub(crate) fn set_now(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        self.store.now_ms = self.now_ms;
        self.max_epoch.store(
            self.now_ms.saturating_add(MAX_EPOCH_AHEAD_MS),
            Ordering::Relaxed,
        );
    }

    /// Schedules the node's own timers and announces to the seeds.
    pub fn start(&mut self, now_ms: u64) {
        self.set_now(now_ms);
        self.started_ms = now_ms;
        let jitter = self.rng.random_range(0..self.cfg.repair_interval_ms.max(1));
        self.schedule(Duration::from_millis(jitter), Timer::Repair);
        let jitter = self.rng.random_range(0..self.cfg.gossip_interval_ms.max(1));
        self.schedule(Duration::from_millis(jitter), Timer::Gossip);
        self.schedule(self.cfg.probe_period(), Timer::Housekeeping);
        self.announce_to_seeds();
        self.drain();
    }

    fn schedule(&mut self, after: Duration, timer: Timer) {
        self.effects.push(Effect::Schedule { after, timer });
    }

    /// Adds seeds (e.g. from the registry's `tidings-agent` listing) and announces to them.
    pub fn join(&mut self, now_ms: u64, seeds: &[SocketAddr]) {
        self.set_now(now_ms);
        for seed in seeds {
            if !self.cfg.seeds.contains(seed) {
                self.cfg.seeds.push(*seed);
            }
        }
        self.announce_to_seeds();
        self.drain();
    }

    pub(crate) fn announce_to_seeds(&mut self) {
        for seed in self.cfg.seeds.clone() {
            if seed != self.me.addr
                && let Err(e) = self.swim.announce(NodeId::seed(seed), &mut self.rt)
            {
                tracing::debug!(%seed, error = %e, "announce failed");
            }
        }
    }

    /// Feeds identities known from elsewhere (disk cache, a simulator's roster) as alive,
    /// without broadcasting them.
    pub fn assume_members(&mut self, now_ms: u64, ids: impl IntoIterator<Item = NodeId>) {
        self.set_now(now_ms);
        let members = ids
            .into_iter()
            .filter(|id| id.addr != self.me.addr)
            .map(Member::alive);
        if let Err(e) = self.swim.apply_many(members, false, &mut self.rt) {
            tracing::debug!(error = %e, "apply_many failed");
        }
        self.drain();
    }

    /// Replaces the key ring (rotation). Takes effect for the next packet.
    pub fn set_key_ring(&mut self, ring: Option<&KeyRing>) {
        self.sealer = Sealer::new(&self.cfg.cluster, ring);
    }

    /// Handles one UDP datagram from `from`.
    pub fn handle_packet(&mut self, now_ms: u64, from: SocketAddr, data: &[u8]) {
        self.set_now(now_ms);
        Metrics::bump(&self.metrics.packets_in, 1);
        Metrics::bump(&self.metrics.bytes_in, data.len() as u64);
        if data.len() > MAX_DATAGRAM {
            Metrics::bump(&self.metrics.dropped_oversize, 1);
            return;
        }
        let plain = match self.sealer.open(data) {
            Ok(p) => p,
            Err(e) => {
                self.metrics.dropped(e);
                return;
            }
        };
        match plain
            .split_first()
            .and_then(|(k, body)| PacketKind::from_byte(*k).map(|k| (k, body)))
        {
            Some((PacketKind::Swim, body)) => {
                if let Err(e) = self.swim.handle_data(body, &mut self.rt) {
                    let counter = match e {
                        foca::Error::Decode(_)
                        | foca::Error::MalformedPacket
                        | foca::Error::CustomBroadcast(_) => &self.metrics.dropped_malformed,
                        _ => &self.metrics.swim_errors,
                    };
                    Metrics::bump(counter, 1);
                    tracing::trace!(%from, error = %e, "swim packet not handled");
                }
            }
            Some((PacketKind::Rows, body)) => self.on_rows(body),
            Some((PacketKind::Digest, body)) => match codec::decode_packet::<Digest>(body) {
                Ok(d) => self.on_digest(from, &d),
                Err(_) => Metrics::bump(&self.metrics.dropped_malformed, 1),
            },
            None => Metrics::bump(&self.metrics.dropped_malformed, 1),
        }
        self.drain();
    }

    fn on_digest(&mut self, from: SocketAddr, digest: &Digest) {
        let down = digest
            .down
            .iter()
            .take(repair::DIGEST_MAX_DOWN)
            .copied()
            .map(Member::down);
        if let Err(e) = self.swim.apply_many(down, true, &mut self.rt) {
            tracing::debug!(%from, error = %e, "down verdicts from digest not applied");
        }
        // A digest from a member we think is down means it is back (a healed partition):
        // announcing makes SWIM sort it out now rather than at the next periodic announce.
        if let Some(m) = self.members.get(&from)
            && !m.active
            && let Err(e) = self.swim.announce(m.id, &mut self.rt)
        {
            tracing::debug!(%from, error = %e, "announce to returning member failed");
        }
        if digest.reply && digest.buckets.len() == 1 {
            repair::on_equal_answer(&mut self.store, from, digest.buckets[0]);
            return;
        }
        // The exchange is symmetric for down verdicts and tombstone evidence; only the side
        // that received the first digest starts a repair, so a mismatch costs one exchange.
        // Counted once for both uses: three passes over every snapshot held.
        let diff = Digest::differing(&self.store, &digest.buckets);
        if !digest.reply {
            let equal = diff.as_ref().is_some_and(BTreeSet::is_empty);
            self.digest_to(from, true, equal.then_some(&digest.buckets[..]));
        }
        let req = diff
            .and_then(|diff| repair::on_digest(&mut self.store, self.me.addr, from, diff))
            .filter(|_| !digest.reply);
        match req {
            Some(req) => {
                // Only `require` asks for signatures: nodes from before signing cannot read
                // the signed request, and by `require` every node can.
                let frame = if self.store.trust.mode == SigningMode::Require {
                    RepairFrame::SignedRequest(req)
                } else {
                    RepairFrame::Request(req)
                };
                if let Some(frame) = encode_frame(&frame) {
                    Metrics::bump(&self.metrics.repair_exchanges, 1);
                    self.effects.push(Effect::Repair { peer: from, frame });
                }
            }
            None if digest.buckets.len() != repair::DIGEST_BUCKETS => {
                Metrics::bump(&self.metrics.dropped_malformed, 1);
            }
            None => {}
        }
    }

    /// Handles one repair frame received over TCP, already authenticated and opened by the
    /// driver ([`crate::stream`]); returns the plaintext reply, if any.
    pub fn handle_repair_frame(&mut self, now_ms: u64, data: &[u8]) -> Option<Vec<u8>> {
        self.set_now(now_ms);
        let frame = match codec::decode::<RepairFrame, MAX_FRAME>(data) {
            Ok(f) => f,
            Err(_) => {
                Metrics::bump(&self.metrics.dropped_malformed, 1);
                return None;
            }
        };
        let before = self.store.rows_received;
        if let RepairFrame::SignedResponse(_, proofs) | RepairFrame::SignedPush(_, proofs) = &frame
        {
            repair::apply_certs(&mut self.store, proofs);
        }
        // Rows refused while being re-broadcast are refused (and counted) again when the
        // frame is applied below: count them there only (certificates, above, once).
        let rejected = self.store.rejected;
        match &frame {
            RepairFrame::Response(r) => self.rebroadcast(&r.rows, &[]),
            RepairFrame::Push(p) => self.rebroadcast(&p.rows, &[]),
            RepairFrame::SignedResponse(r, proofs) => self.rebroadcast(&r.rows, &proofs.sigs),
            RepairFrame::SignedPush(p, proofs) => self.rebroadcast(&p.rows, &proofs.sigs),
            RepairFrame::Request(_) | RepairFrame::SignedRequest(_) => {}
        }
        self.store.rejected = rejected;
        let reply = {
            let store = &mut self.store;
            let me = self.me.addr;
            let reply = match frame {
                RepairFrame::Request(req) => {
                    repair::note_own_summary(store, req.from, &req.owners);
                    Some(RepairFrame::Response(repair::respond(store, me, &req)))
                }
                RepairFrame::SignedRequest(req) => {
                    repair::note_own_summary(store, req.from, &req.owners);
                    let resp = repair::respond(store, me, &req);
                    let proofs = repair::proofs(store, &resp.rows, &resp.snapshots);
                    Some(RepairFrame::SignedResponse(resp, proofs))
                }
                RepairFrame::Response(resp) => {
                    repair::on_response(store, me, resp, &Proofs::default()).map(RepairFrame::Push)
                }
                RepairFrame::SignedResponse(resp, proofs) => {
                    repair::on_response(store, me, resp, &proofs).map(|push| {
                        let proofs = repair::proofs(store, &push.rows, &push.snapshots);
                        RepairFrame::SignedPush(push, proofs)
                    })
                }
                RepairFrame::Push(p) => {
                    repair::apply(store, p.from, p.rows, p.snapshots, &Proofs::default());
                    None
                }
                RepairFrame::SignedPush(p, proofs) => {
                    repair::apply(store, p.from, p.rows, p.snapshots, &proofs);
                    None
                }
            };
            Metrics::bump(
                &self.metrics.repair_rows_applied,
                store.rows_received - before,
            );
            reply
        };
        self.drain();
        reply.as_ref().and_then(encode_frame)
    }

    /// A few rows learned by repair are news to the rest of our side too (typically after a
    /// partition heals): queue them to be passed on, so the epidemic spreads them in about a
    /// second instead of repair doing it pairwise over several periods. Catch-ups (more
    /// than `REBROADCAST_MAX` rows, or a node in its first two repair periods) are not
    /// re-broadcast: everyone else already has those rows.
    fn rebroadcast(&mut self, rows: &[Row], sigs: &[Option<Signature>]) {
        // A node in its first repair periods is catching up on old news: don't re-spread it.
        let catching_up = self.now_ms < self.started_ms + 2 * self.cfg.repair_interval_ms;
        if catching_up || rows.is_empty() || rows.len() > REBROADCAST_MAX {
            return;
        }
        let mut news = false;
        for (i, row) in rows.iter().enumerate() {
            let row = Box::new(row.clone());
            news |= self.learn(match sigs.get(i).copied().flatten() {
                Some(sig) => BroadcastItem::SignedRow(row, sig),
                None => BroadcastItem::Row(row),
            });
        }
        if news {
            self.spread_now();
        }
    }

    /// Delivers a timer scheduled through [`Effect::Schedule`].
    pub fn handle_timer(&mut self, now_ms: u64, timer: Timer) {
        self.set_now(now_ms);
        match timer {
            Timer::Swim(t) => {
                let probe_stage = matches!(t, foca::Timer::SendIndirectProbe { .. });
                let suspicion_end = match &t {
                    foca::Timer::ChangeSuspectToDown { member_id, .. } => Some(member_id.addr),
                    _ => None,
                };
                if let Err(e) = self.swim.handle_timer(t, &mut self.rt) {
                    Metrics::bump(&self.metrics.swim_errors, 1);
                    tracing::trace!(error = %e, "swim timer");
                }
                // At this stage foca sends ping-reqs, and only if the direct ping got no
                // ack: the one outcome it does not report, and the loss measure behind the
                // number of indirect probes (`probing`).
                if probe_stage {
                    self.probing.record(self.rt.backlog() > 0);
                }
                if let Some(addr) = suspicion_end {
                    self.drop_spurious_turn_undead(addr);
                }
            }
            Timer::Gossip => {
                let every = Duration::from_millis(self.cfg.gossip_interval_ms);
                self.schedule(every, Timer::Gossip);
                self.spread_now();
            }
            Timer::Repair => {
                self.schedule(
                    Duration::from_millis(self.cfg.repair_interval_ms),
                    Timer::Repair,
                );
                self.send_digest();
            }
            Timer::Housekeeping => {
                self.schedule(self.cfg.probe_period(), Timer::Housekeeping);
                self.tick(now_ms);
            }
        }
        self.drain();
    }

    fn send_digest(&mut self) {
        // Down members are candidates too (memberlist's "gossip to the dead"): after a
        // partition heals, repair crosses it before SWIM has rejoined the halves.
        let peers: Vec<SocketAddr> = self.members.keys().copied().collect();
        if peers.is_empty() {
            return;
        }
        let peer = peers[self.rng.random_range(0..peers.len())];
        self.digest_to(peer, false, None);
    }

    /// Sends our digest to `peer`; as an answer to `theirs` when given, in its short form
    /// when the buckets are equal.
    pub(crate) fn digest_to(&mut self, peer: SocketAddr, reply: bool, equal_to: Option<&[u64]>) {
        let mut digest = match equal_to {
            // Equal as far as repair goes: the hash of the buckets the asker sent, which it
            // checks against its own (`repair::on_equal_answer`).
            Some(theirs) => Digest {
                buckets: vec![repair::buckets_hash(theirs)],
                down: Vec::new(),
                reply,
            },
            None => Digest::of(&self.store),
        };
        digest.down = self.down_sample();
        digest.reply = reply;
        if let Ok(body) = codec::encode_packet(&digest) {
            self.send_plain(peer, PacketKind::Digest, &body);
        }
    }

    pub(crate) fn send_plain(&mut self, to: SocketAddr, kind: PacketKind, body: &[u8]) {
        let mut plain = Vec::with_capacity(1 + body.len());
        plain.push(kind as u8);
        plain.extend_from_slice(body);
        let packet = self.sealer.seal(&plain, &mut self.rng);
        Metrics::bump(&self.metrics.packets_out, 1);
        Metrics::bump(&self.metrics.bytes_out, packet.len() as u64);
        self.effects.push(Effect::Send { to, packet });
    }

    pub(crate) fn drain(&mut self) {
        while let Some((to, data)) = self.rt.to_send() {
            self.send_plain(to.addr, PacketKind::Swim, &data);
        }
        while let Some((after, t)) = self.rt.to_schedule() {
            self.schedule(after, Timer::Swim(t));
        }
        while let Some(n) = self.rt.to_notify() {
            self.on_notification(n);
        }
        self.settle_returning();
        // Every entry point ends here: refusals counted by the store reach the metrics.
        let refused = self.store.snapshots.refusals();
        let m = &self.metrics;
        m.snapshots_refused_future
            .store(refused.future, Ordering::Relaxed);
        m.snapshots_refused_inconsistent
            .store(refused.inconsistent, Ordering::Relaxed);
        m.set_rejected(&self.store.rejected);
    }

    /// Publishes this node's own endpoints: diffs them against the last call into row
    /// upserts and tombstones, each with the next `seq`.
    pub fn publish_local(&mut self, now_ms: u64, endpoints: Vec<Endpoint>) {
        self.set_now(now_ms);
        let new: BTreeMap<EndpointKey, Endpoint> =
            endpoints.into_iter().map(|e| (e.key(), e)).collect();
        let mut changes: Vec<(EndpointKey, RowStatus)> = new
            .iter()
            .filter(|(k, e)| self.local.get(*k) != Some(*e))
            .map(|(k, e)| (k.clone(), RowStatus::Up(e.clone().into())))
            .collect();
        changes.extend(
            self.local
                .keys()
                .filter(|k| !new.contains_key(*k))
                .map(|k| (k.clone(), RowStatus::Deregistered)),
        );
        self.local = new;
        let changed = !changes.is_empty();
        for (key, status) in changes {
            self.seq += 1;
            let version = Version {
                epoch: self.me.epoch,
                seq: self.seq,
            };
            let row = Box::new(Row::new(self.me.addr, key, status, version));
            let sig = match (&self.signer, self.store.trust.mode) {
                (Some(k), SigningMode::Accept | SigningMode::Require) => sign::sign_row(k, &row),
                _ => None,
            };
            self.learn(match sig {
                Some(sig) => BroadcastItem::SignedRow(row, sig),
                None => BroadcastItem::Row(row),
            });
        }
        if changed {
            self.sign_row_set();
        }
        self.spread_now();
        self.drain();
    }

    /// Stores and gossips a registry snapshot this agent just fetched from the registry;
    /// the newest per service wins everywhere.
    ///
    /// A fresh direct answer supersedes whatever this node holds for the service: it is
    /// stamped `max(generated_at_ms, held + 1)`, a hybrid logical clock. Without it, after
    /// a replica running a little ahead (within the skew bound) answered, the next honest
    /// answer would be dated older than what is held and ignored until real time caught
    /// up. The stamp runs ahead of real time by at most what was already accepted within
    /// the bound. An answer dated beyond the bound ahead of the registry data held is refused
    /// and counted (see [`crate::snapshot::SnapshotStore::merge_direct`]), so a replica far
    /// ahead changes nothing, and the first answer after it is back wins.
    pub fn apply_registry_snapshot(&mut self, now_ms: u64, snapshot: Snapshot) {
        self.apply_registry_answer(now_ms, snapshot, None);
    }

    /// [`apply_registry_snapshot`](Self::apply_registry_snapshot) with the registry's
    /// signature of the listing, if the answer had one: the snapshot then travels signed
    /// (see [`Node::registry_sig`]).
    pub fn apply_registry_answer(
        &mut self,
        now_ms: u64,
        mut snapshot: Snapshot,
        sig: Option<Signature>,
    ) {
        self.set_now(now_ms);
        let answered_at = snapshot.generated_at_ms;
        if let Some(held) = self.store.snapshots.summary(&snapshot.service) {
            snapshot.generated_at_ms = answered_at.max(held.generated_at_ms.saturating_add(1));
        }
        let (service, at) = (snapshot.service.clone(), snapshot.generated_at_ms);
        let restamped = at != answered_at;
        let item = match self.registry_sig(&snapshot, sig, restamped) {
            Some(sig) => BroadcastItem::SignedSnapshot(snapshot, sig),
            None => BroadcastItem::Snapshot(snapshot),
        };
        let refusals = self.store.snapshots.refusals().future;
        self.learn_direct(item);
        if self.store.snapshots.refusals().future > refusals {
            tracing::warn!(
                %service,
                generated_at_ms = at,
                now_ms = self.now_ms,
                max_skew_ms = self.cfg.max_snapshot_skew_ms,
                "registry answer dated too far ahead of the registry data held, refused (a registry replica has a wrong clock)"
            );
        }
        self.spread_now();
        self.drain();
    }

    /// Leaves the cluster gracefully (peers see us down at once, not after suspicion).
    pub fn leave(&mut self, now_ms: u64) {
        self.set_now(now_ms);
        if let Err(e) = self.swim.leave_cluster(&mut self.rt) {
            tracing::debug!(error = %e, "leave failed");
        }
        self.drain();
    }
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;

/// A repair frame's plaintext (the driver seals it on the wire); `None` if it is too large.
fn encode_frame(frame: &RepairFrame) -> Option<Vec<u8>> {
    match codec::encode::<_, MAX_FRAME>(frame) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            tracing::warn!(error = %e, "repair frame not sent");
            None
        }
    }
}

#[cfg(test)]
#[path = "sign_node_tests.rs"]
mod sign_tests;
