//! Anti-entropy: convergence that does not depend on any broadcast arriving.
//!
//! Every repair interval a node sends a random peer a constant-size [`Digest`] (64 buckets
//! × 8 bytes, one UDP packet) of its per-owner summaries and snapshot versions. A peer whose
//! digest differs opens a TCP exchange for the differing buckets only:
//!
//! 1. peer → node: [`RepairRequest`] — the peer's summaries for those buckets;
//! 2. node → peer: [`RepairResponse`] — every row of each owner whose summary differs (an
//!    owner's rows are few: one host's endpoints), newer snapshots, and the node's summaries;
//! 3. peer → node: [`RepairPush`] — what the node turned out to lack.
//!
//! Bytes are proportional to the owners that differ, not to the whole state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::NodeId;
use crate::broadcast::{self, BroadcastItem, Store};
use crate::rows::{OwnerSummary, Row, addr_bytes, stable_hash};
use crate::sign::{Certificate, Signature, SigningMode};
use crate::snapshot::{Snapshot, SnapshotSummary};

pub const DIGEST_BUCKETS: usize = 64;

/// How long after a registry answer repair leaves its change to the registry: every agent
/// that can reach the registry fetches a change within its blocking query's wake-up and
/// one round trip (well under this), so repair sends it only to those that could not. In
/// the simulator at 100 000 endpoints and 10 changes/s, sending in-flight changes cost
/// 8 KB/s per node; holding them back costs a node cut off from the registry this much
/// delay.
pub const REGISTRY_SPREAD_MS: u64 = 2_000;

/// Most down verdicts a digest carries.
pub const DIGEST_MAX_DOWN: usize = 8;

/// XOR of per-owner and per-service fingerprints, bucketed by owner / service (a service
/// counted by the hosts its change in flight replaced, see [`Digest::of`]), plus a few
/// members the sender knows are down: SWIM gives up on an update after max_transmissions,
/// and a node that missed a Down verdict would otherwise show a dead owner's endpoints
/// until it happens to probe that owner itself (up to N probe periods).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// Fixed 8 bytes per bucket on the wire (not varints): the digest costs the same
    /// whatever the cluster size, so steady-state bandwidth is flat in N.
    #[serde(with = "fixed_u64s")]
    pub buckets: Vec<u64>,
    pub down: Vec<NodeId>,
    /// An answer to a peer's digest (answers are not answered).
    pub reply: bool,
}

fn owner_bucket(owner: &SocketAddr) -> usize {
    (stable_hash(&[&addr_bytes(owner)]) % DIGEST_BUCKETS as u64) as usize
}

fn service_bucket(service: &str) -> usize {
    (stable_hash(&[b"svc", service.as_bytes()]) % DIGEST_BUCKETS as u64) as usize
}

fn owner_buckets(store: &Store) -> Vec<u64> {
    let mut buckets = vec![0u64; DIGEST_BUCKETS];
    for owner in store.rows.owners() {
        if let Some(s) = store.rows.summary(owner) {
            buckets[owner_bucket(owner)] ^= owner_fingerprint(&s);
        }
    }
    buckets
}

/// Each service by its hosts, or by those its change replaced if that change is younger
/// than `window_ms`.
fn add_services(store: &Store, buckets: &mut [u64], window_ms: u64) {
    for (_, s) in store.snapshots.iter() {
        let service = s.service.as_str();
        if let Some(hash) = store
            .snapshots
            .digest_hash(&s.service, store.now_ms, window_ms)
        {
            buckets[service_bucket(service)] ^= snapshot_fingerprint(service, hash);
        }
    }
}

fn owner_fingerprint(s: &OwnerSummary) -> u64 {
    stable_hash(&[
        &addr_bytes(&s.owner),
        &s.hash.to_le_bytes(),
        &s.max.epoch.to_le_bytes(),
        &s.max.seq.to_le_bytes(),
    ])
}

/// By the hosts a snapshot lists, not its date ([`crate::snapshot::Snapshot::hosts_hash`]):
/// two nodes holding the same hosts have nothing to repair, whoever fetched them last.
fn snapshot_fingerprint(service: &str, hash: u64) -> u64 {
    stable_hash(&[b"svc", service.as_bytes(), &hash.to_le_bytes()])
}

impl Digest {
    /// What this node sends: a change younger than REGISTRY_SPREAD_MS counts as the hosts
    /// it replaced. Until then every agent that can reach the registry is fetching it, and
    /// nodes that have and have not yet would otherwise differ in its bucket and exchange
    /// the summaries of every owner and service in it (1 209 B/s per node at 1 000 nodes).
    /// Repair starts when the change is older, as it sends changes only then anyway.
    pub fn of(store: &Store) -> Digest {
        Digest::counting_changes_younger_than(store, REGISTRY_SPREAD_MS)
    }

    fn counting_changes_younger_than(store: &Store, window_ms: u64) -> Digest {
        let mut buckets = owner_buckets(store);
        add_services(store, &mut buckets, window_ms);
        Digest {
            buckets,
            down: Vec::new(),
            reply: false,
        }
    }

    /// Buckets of `theirs` that match no way this node may count its recent changes, or
    /// `None` if `theirs` is malformed. Each agent dates a change by its own fetch, so the
    /// moment a change stops counting as in flight differs between nodes by the spread of
    /// their fetches; a bucket equal to ours with our changes of the last two spreads
    /// counted as replaced, or with none, is not a difference. A node that never got the
    /// change still differs from every node past its spread, which is what repair is for;
    /// and past two spreads only the hosts held count. Nodes from before this send the
    /// hosts they hold, which the last form matches.
    pub fn differing(store: &Store, theirs: &[u64]) -> Option<BTreeSet<u8>> {
        if theirs.len() != DIGEST_BUCKETS {
            return None;
        }
        let owners = owner_buckets(store);
        let forms = [REGISTRY_SPREAD_MS, 2 * REGISTRY_SPREAD_MS, 0].map(|window| {
            let mut form = owners.clone();
            add_services(store, &mut form, window);
            form
        });
        Some(
            (0..DIGEST_BUCKETS)
                .filter(|&i| forms.iter().all(|f| f[i] != theirs[i]))
                .filter_map(|i| u8::try_from(i).ok())
                .collect(),
        )
    }
}

mod fixed_u64s {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u64], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        s.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        let bytes = Vec::<u8>::deserialize(d)?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairRequest {
    pub from: SocketAddr,
    pub buckets: BTreeSet<u8>,
    pub owners: Vec<OwnerSummary>,
    pub snapshots: Vec<SnapshotSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairResponse {
    pub from: SocketAddr,
    pub buckets: BTreeSet<u8>,
    pub rows: Vec<Row>,
    pub snapshots: Vec<Snapshot>,
    pub owners: Vec<OwnerSummary>,
    pub snapshot_summaries: Vec<SnapshotSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairPush {
    pub from: SocketAddr,
    pub rows: Vec<Row>,
    pub snapshots: Vec<Snapshot>,
}

/// The owners' signatures of a frame's rows (`sigs[i]` signs `rows[i]`), the certificates
/// of those owners, and the registry's signatures of its snapshots (`snapshot_sigs[i]` signs
/// `snapshots[i]`) (signed gossip).
///
/// `row_sets` holds, for owners whose every row the frame carries, the owner's signature of
/// that whole set ([`crate::sign::row_set_message`]): one verification for all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proofs {
    pub sigs: Vec<Option<Signature>>,
    pub certs: Vec<(SocketAddr, Certificate)>,
    pub snapshot_sigs: Vec<Option<Signature>>,
    pub row_sets: Vec<(SocketAddr, Signature)>,
}

/// One TCP frame of a repair exchange. The signed forms go last, so the unsigned ones keep
/// their encoding: a node sends `SignedRequest` only with signing `require` (by then every
/// peer reads it), and answers in the form it was asked in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RepairFrame {
    Request(RepairRequest),
    Response(RepairResponse),
    Push(RepairPush),
    SignedRequest(RepairRequest),
    SignedResponse(RepairResponse, Proofs),
    SignedPush(RepairPush, Proofs),
}

/// The signatures and certificates this node holds for `rows` and `snapshots`.
pub fn proofs(store: &Store, rows: &[Row], snapshots: &[Snapshot]) -> Proofs {
    let sigs = rows
        .iter()
        .map(|r| store.rows.sig(&r.owner, &r.key, r.version()))
        .collect();
    let owners: BTreeSet<SocketAddr> = rows.iter().map(|r| r.owner).collect();
    let certs = owners
        .iter()
        .filter_map(|o| store.certs.get(o).map(|c| (*o, c.clone())))
        .collect();
    // Repair sends every row held of an owner (`rows_they_lack`), which is what the set
    // signature held covers, if it covers what is held now.
    let row_sets = owners
        .into_iter()
        .filter_map(|o| store.row_set(&o).map(|s| (o, s)))
        .collect();
    let snapshot_sigs = snapshots
        .iter()
        .map(|s| store.snapshots.sig(&s.service).copied())
        .collect();
    Proofs {
        sigs,
        certs,
        snapshot_sigs,
        row_sets,
    }
}

/// Takes a frame's certificates (each checked), before its rows are. Their registry
/// signatures are verified as one batch; if that fails, one by one, which tells the bad ones.
pub fn apply_certs(store: &mut Store, proofs: &Proofs) {
    let fresh: Vec<&(SocketAddr, Certificate)> = proofs
        .certs
        .iter()
        .filter(|(o, c)| store.certs.get(o) != Some(c))
        .collect();
    let certs: Vec<&Certificate> = fresh.iter().map(|(_, c)| c).collect();
    let signed =
        store.trust.mode != SigningMode::Off && certs.len() > 1 && store.trust.certs_signed(&certs);
    for (owner, cert) in fresh {
        broadcast::merge_cert_checked(store, *owner, cert.clone(), signed);
    }
}

/// Which of a frame's rows were verified as one batch with their owners' stored
/// certificates: each owner with a row-set signature in `proofs` by that signature over all
/// its rows in the frame, every other row that is news by its own (`proofs.sigs[i]` signs
/// `rows[i]`). None when the batch fails: each row is then checked on its own, which counts
/// why. Old news is left out, as [`broadcast::merge_row`] checks it only to keep a
/// signature it lacks. Also returns the sets that verified (owner, signature, row count).
fn batch_verified(store: &Store, rows: &[Row], proofs: &Proofs) -> (Vec<bool>, Vec<RowSet>) {
    let mut verified = vec![false; rows.len()];
    if store.trust.mode == SigningMode::Off {
        return (verified, Vec::new());
    }
    let wanted = |row: &Row| store.rows.would_apply(row) || store.rows.lacks_sig(row);
    let mut by_owner: BTreeMap<SocketAddr, (Vec<usize>, Vec<&Row>)> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        let (is, rs) = by_owner.entry(row.owner).or_default();
        is.push(i);
        rs.push(row);
    }
    let sets: BTreeMap<SocketAddr, &Signature> =
        proofs.row_sets.iter().map(|(o, s)| (*o, s)).collect();
    let mut covered = Vec::new();
    let mut items = Vec::new();
    let mut kept = Vec::new();
    for (owner, (is, rs)) in &by_owner {
        let Some(cert) = store.certs.get(owner) else {
            continue;
        };
        if let Some(sig) = sets.get(owner) {
            if rs.iter().any(|r| wanted(r)) {
                items.push((rs.clone(), *sig, cert, true));
                covered.extend(is.iter().copied());
                kept.push((*owner, **sig, rs.len()));
            }
            continue;
        }
        for &i in is {
            if let Some(Some(sig)) = proofs.sigs.get(i)
                && wanted(&rows[i])
            {
                items.push((vec![&rows[i]], sig, cert, false));
                covered.push(i);
            }
        }
    }
    if !items.is_empty() && store.trust.check_batch(&items, store.now_ms) {
        for i in covered {
            verified[i] = true;
        }
        return (verified, kept);
    }
    (verified, Vec::new())
}

/// An owner's row-set signature and how many rows it was verified over.
type RowSet = (SocketAddr, Signature, usize);

fn owner_summaries(store: &Store, buckets: &BTreeSet<u8>) -> Vec<OwnerSummary> {
    store
        .rows
        .owners()
        .filter(|o| buckets.contains(&(owner_bucket(o) as u8)))
        .filter_map(|o| store.rows.summary(o))
        .collect()
}

fn snapshot_summaries(store: &Store, buckets: &BTreeSet<u8>) -> Vec<SnapshotSummary> {
    store
        .snapshots
        .iter()
        .filter(|(_, s)| buckets.contains(&(service_bucket(s.service.as_str()) as u8)))
        .map(|(_, s)| s.clone())
        .collect()
}

/// Rows of every owner in `buckets` whose summary is not exactly `theirs`.
fn rows_they_lack(store: &Store, buckets: &BTreeSet<u8>, theirs: &[OwnerSummary]) -> Vec<Row> {
    let theirs: BTreeMap<SocketAddr, &OwnerSummary> = theirs.iter().map(|s| (s.owner, s)).collect();
    owner_summaries(store, buckets)
        .into_iter()
        .filter(|mine| theirs.get(&mine.owner).is_none_or(|t| *t != mine))
        .flat_map(|mine| store.rows.owner_rows(&mine.owner))
        .collect()
}

fn snapshots_they_lack(
    store: &Store,
    buckets: &BTreeSet<u8>,
    theirs: &[SnapshotSummary],
) -> Vec<Snapshot> {
    let theirs: BTreeMap<_, _> = theirs
        .iter()
        .map(|s| (s.service.clone(), (s.generated_at_ms, s.hash)))
        .collect();
    // A copy with the same hosts is not sent whatever its date: they have what it lists.
    // Nor is a change younger than REGISTRY_SPREAD_MS to a peer that holds the service: it
    // is on its way to that peer from the registry, as to every agent that can reach it.
    let now = store.now_ms;
    snapshot_summaries(store, buckets)
        .into_iter()
        .filter(|mine| {
            theirs.get(&mine.service).is_none_or(|&(at, hash)| {
                // Two different lower bounds: each side sends its own, and both add them up
                // (`union_of_lower_bounds`), whichever is dated later.
                let lower = crate::snapshot::is_lower_bound_date;
                if lower(at) && lower(mine.generated_at_ms) {
                    return hash != mine.hash;
                }
                let young = now.saturating_sub(mine.generated_at_ms) < REGISTRY_SPREAD_MS;
                hash != mine.hash && (at, hash) < (mine.generated_at_ms, mine.hash) && !young
            })
        })
        // With `require`, peers drop a snapshot the registry did not sign (a lower bound, a
        // restamped answer): it stays with the agent that made it.
        .filter(|mine| {
            store.trust.mode != SigningMode::Require || store.snapshots.sig(&mine.service).is_some()
        })
        .filter_map(|mine| store.snapshots.get(&mine.service).cloned())
        .collect()
}

/// A digest answered with one "bucket" is the short answer to a digest equal to the
/// answerer's: that bucket is [`buckets_hash`] of the buckets both sides had. It saves the
/// 512 bytes of a full answer in the common case (a settled cluster) and still gives the
/// first sender its tombstone-GC evidence. Nodes from before it count it as malformed and
/// ignore it.
pub fn buckets_hash(buckets: &[u64]) -> u64 {
    let bytes: Vec<u8> = buckets.iter().flat_map(|b| b.to_le_bytes()).collect();
    stable_hash(&[b"digest", &bytes])
}

/// A short answer from `peer` (see [`buckets_hash`]): if our buckets are still those it
/// matched, `peer` holds exactly our summary of every owner. Returns whether they were.
pub fn on_equal_answer(store: &mut Store, peer: SocketAddr, hash: u64) -> bool {
    if buckets_hash(&Digest::of(store).buckets) != hash {
        // Our state moved since our digest left: the answer proves nothing about it.
        return false;
    }
    let owners: Vec<SocketAddr> = store.rows.owners().copied().collect();
    for owner in owners {
        store.rows.mark_synced(&owner, peer);
    }
    true
}

/// The digest receiver's side, given the buckets that differ ([`Digest::differing`]): which
/// buckets to ask about (and GC evidence for the rest).
pub fn on_digest(
    store: &mut Store,
    me: SocketAddr,
    peer: SocketAddr,
    diff: BTreeSet<u8>,
) -> Option<RepairRequest> {
    let owners: Vec<SocketAddr> = store.rows.owners().copied().collect();
    for owner in owners {
        if !diff.contains(&(owner_bucket(&owner) as u8)) {
            store.rows.mark_synced(&owner, peer);
        }
    }
    if diff.is_empty() {
        return None;
    }
    Some(RepairRequest {
        from: me,
        owners: owner_summaries(store, &diff),
        snapshots: snapshot_summaries(store, &diff),
        buckets: diff,
    })
}

pub fn respond(store: &Store, me: SocketAddr, req: &RepairRequest) -> RepairResponse {
    RepairResponse {
        from: me,
        buckets: req.buckets.clone(),
        rows: rows_they_lack(store, &req.buckets, &req.owners),
        snapshots: snapshots_they_lack(store, &req.buckets, &req.snapshots),
        owners: owner_summaries(store, &req.buckets),
        snapshot_summaries: snapshot_summaries(store, &req.buckets),
    }
}

/// Applies rows and snapshots from a peer, each checked as a broadcast one would be, against
/// the frame's `proofs` (empty for an unsigned frame). A peer's full row set of its *own* rows is authoritative:
/// rows of it we hold and it no longer has were deleted — except with signing `require`,
/// where `from` is only the frame's word and a member holding the cluster key could
/// otherwise delete another's rows by claiming to be it.
pub fn apply(
    store: &mut Store,
    from: SocketAddr,
    rows: Vec<Row>,
    snapshots: Vec<Snapshot>,
    proofs: &Proofs,
) -> usize {
    let sigs = &proofs.sigs;
    let (verified, sets) = batch_verified(store, &rows, proofs);
    let mut applied = 0;
    let mut own: Option<BTreeSet<_>> = None;
    let mut applied_of: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for (i, row) in rows.into_iter().enumerate() {
        if row.owner == from {
            own.get_or_insert_default().insert(row.key.clone());
        }
        let owner = row.owner;
        let sig = sigs.get(i).copied().flatten();
        // A row vouched for by its owner's set signature keeps its own signature unchecked,
        // to pass on; a relay that spoiled it only spoils its own broadcasts of the row.
        let merged = if verified[i] {
            broadcast::merge_verified_row(store, row, sig)
        } else {
            broadcast::merge_row(store, row, sig)
        };
        applied += usize::from(merged.is_some());
        if verified[i] && merged.is_some() {
            *applied_of.entry(owner).or_default() += 1;
        }
    }
    for (owner, sig, count) in sets {
        // Kept (with no second check) when every row it covers was taken and nothing else
        // is held of the owner: then what is held is the set it signed. A set kept wrongly
        // would only cost its receivers the fallback, as they check it against what they get.
        let all = applied_of.get(&owner) == Some(&count);
        if all && store.rows.row_count(&owner) == count {
            store.keep_row_set(owner, sig, false);
        }
    }
    if store.trust.mode == SigningMode::Require {
        own = None;
    }
    if let (Some(present), Some(max)) = (own, store.rows.max_version(&from)) {
        store.rows.prune_to_authoritative(&from, &present, max);
        // We now hold exactly what the owner holds of itself.
        store.rows.mark_synced(&from, from);
    }
    for (i, snap) in snapshots.into_iter().enumerate() {
        let item = match proofs.snapshot_sigs.get(i).copied().flatten() {
            Some(sig) => BroadcastItem::SignedSnapshot(snap, sig),
            None => BroadcastItem::Snapshot(snap),
        };
        let news = broadcast::merge(store, item).is_some();
        store.rows_received += u64::from(news);
        applied += usize::from(news);
    }
    applied
}

/// `from` told us its summaries (in a request or a response): if its summary of *itself*
/// equals ours, we hold every row it has written — the evidence a returning owner's
/// tombstones wait for (`Node::settle_returning`).
pub fn note_own_summary(store: &mut Store, from: SocketAddr, owners: &[OwnerSummary]) {
    let own = owners.iter().find(|s| s.owner == from);
    if own.is_some() && own.copied() == store.rows.summary(&from) {
        store.rows.mark_synced(&from, from);
    }
}

/// The requester's side after the response: merge, then push what the responder lacks.
pub fn on_response(
    store: &mut Store,
    me: SocketAddr,
    resp: RepairResponse,
    proofs: &Proofs,
) -> Option<RepairPush> {
    let RepairResponse {
        from,
        buckets,
        rows,
        snapshots,
        owners,
        snapshot_summaries,
    } = resp;
    apply(store, from, rows, snapshots, proofs);
    note_own_summary(store, from, &owners);
    let push = RepairPush {
        from: me,
        rows: rows_they_lack(store, &buckets, &owners),
        snapshots: snapshots_they_lack(store, &buckets, &snapshot_summaries),
    };
    (!push.rows.is_empty() || !push.snapshots.is_empty()).then_some(push)
}

#[cfg(test)]
#[path = "repair_tests.rs"]
mod tests;
