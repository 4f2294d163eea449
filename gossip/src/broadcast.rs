//! What gossip replicates ([`Store`]) and the items that spread it ([`BroadcastItem`]): an
//! item is news, and worth passing on ([`crate::spread`]), exactly when merging it changed
//! the store; a newer version of the same row or service supersedes a queued older one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use schema::codec::{self, CodecError};
use schema::{EndpointKey, ServiceName};
use serde::{Deserialize, Serialize};

use crate::rows::{Merge, OwnerSummary, Row, RowStore, Version};
use crate::sign::{Certificate, Reject, Signature, SigningMode, Trust};
use crate::snapshot::{Snapshot, SnapshotMerge, SnapshotStore};

/// Everything gossip replicates.
#[derive(Debug, Default)]
pub struct Store {
    pub rows: RowStore,
    pub snapshots: SnapshotStore,
    /// The node's clock at its last entry point, so merges can stamp receive times.
    pub now_ms: u64,
    pub rows_received: u64,
    /// What signatures this node checks, against which registry key.
    pub trust: Trust,
    /// The newest valid certificate of each owner (docs/ARCHITECTURE.md#signed-gossip).
    pub certs: BTreeMap<SocketAddr, Certificate>,
    /// Items refused for their signature, by [`Reject::index`].
    pub rejected: [u64; Reject::ALL.len()],
    /// Each owner's signature of its whole row set ([`crate::sign::row_set_message`]), with
    /// the summary of the rows it was checked against: it vouches for what is held only
    /// while that summary is the owner's here ([`Store::row_set`]).
    pub row_sets: BTreeMap<SocketAddr, (Signature, OwnerSummary)>,
}

impl Store {
    /// The owner's row-set signature, if it covers exactly the rows held of it now.
    pub fn row_set(&self, owner: &SocketAddr) -> Option<Signature> {
        let (sig, at) = self.row_sets.get(owner)?;
        (self.rows.summary(owner).as_ref() == Some(at)).then_some(*sig)
    }

    /// Keeps `sig` as the owner's row-set signature if it is one of the rows held of it
    /// (checked by the caller, or checked here when `check`): news when it was not held.
    pub(crate) fn keep_row_set(
        &mut self,
        owner: SocketAddr,
        sig: Signature,
        check: bool,
    ) -> Option<BroadcastKey> {
        if self.row_set(&owner) == Some(sig) {
            return None;
        }
        let summary = self.rows.summary(&owner)?;
        if check {
            let cert = self.certs.get(&owner)?;
            let rows = self.rows.owner_rows(&owner);
            let items = [(rows.iter().collect(), &sig, cert, true)];
            if rows.is_empty() || !self.trust.check_batch(&items, self.now_ms) {
                // Not counted as a refusal: an honest set arrives before its rows as often
                // as a forged one, and neither changes anything here.
                return None;
            }
        }
        let max = summary.max;
        self.row_sets.insert(owner, (sig, summary));
        Some(BroadcastKey::RowSet { owner, max })
    }

    /// Tombstone collection ([`RowStore::gc_tombstones`]), keeping the tombstones
    /// that hide an entry of a registry snapshot held here.
    pub fn gc_tombstones(
        &mut self,
        now_ms: u64,
        retention_ms: u64,
        me: SocketAddr,
        live_peers: &BTreeSet<SocketAddr>,
    ) {
        let listed: BTreeSet<EndpointKey> = self
            .snapshots
            .iter()
            .flat_map(|(s, _)| s.entries.iter().map(|e| e.endpoint.key()))
            .collect();
        self.rows
            .gc_tombstones(now_ms, retention_ms, me, live_peers, &listed);
    }
}

/// One item of dissemination: a row or a registry snapshot, and (signed gossip) a row with
/// its owner's signature, an owner's certificate, a snapshot with the registry's signature.
/// New variants go last: agents from before one count it as malformed and read on, which
/// is what lets a fleet roll from unsigned to signed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BroadcastItem {
    Row(Box<Row>),
    Snapshot(Snapshot),
    SignedRow(Box<Row>, Signature),
    Cert(SocketAddr, Box<Certificate>),
    SignedSnapshot(Snapshot, Signature),
    /// An owner's signature of its whole row set, sent after the rows it covers.
    RowSet(SocketAddr, Signature),
}

impl BroadcastItem {
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode_packet(self)
    }
}

/// What foca keeps per queued broadcast, to retire superseded ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BroadcastKey {
    Row {
        owner: SocketAddr,
        key: EndpointKey,
        version: Version,
    },
    Snapshot {
        service: ServiceName,
        rank: (u64, u64),
    },
    Cert {
        owner: SocketAddr,
        not_after_ms: u64,
    },
    RowSet {
        owner: SocketAddr,
        max: Version,
    },
}

impl BroadcastKey {
    /// Whether `self` supersedes `other` (same row or service, newer).
    pub fn invalidates(&self, other: &Self) -> bool {
        match (self, other) {
            (
                Self::Row {
                    owner,
                    key,
                    version,
                },
                Self::Row {
                    owner: o2,
                    key: k2,
                    version: v2,
                },
            ) => owner == o2 && key == k2 && version > v2,
            (
                Self::Snapshot { service, rank },
                Self::Snapshot {
                    service: s2,
                    rank: r2,
                },
            ) => service == s2 && rank > r2,
            (
                Self::Cert {
                    owner,
                    not_after_ms,
                },
                Self::Cert {
                    owner: o2,
                    not_after_ms: n2,
                },
            ) => owner == o2 && not_after_ms > n2,
            (Self::RowSet { owner, max }, Self::RowSet { owner: o2, max: m2 }) => {
                owner == o2 && max > m2
            }
            _ => false,
        }
    }
}

/// Merges one item into the store: its key when it was news (it changed the store), which
/// is exactly when the node should pass it on.
pub(crate) fn merge(store: &mut Store, item: BroadcastItem) -> Option<BroadcastKey> {
    let now = store.now_ms;
    match item {
        BroadcastItem::Row(row) => merge_row(store, *row, None),
        BroadcastItem::SignedRow(row, sig) => merge_row(store, *row, Some(sig)),
        BroadcastItem::Cert(owner, cert) => merge_cert(store, owner, *cert),
        BroadcastItem::Snapshot(snap) => merge_snapshot(store, snap, None, now),
        BroadcastItem::SignedSnapshot(snap, sig) => merge_snapshot(store, snap, Some(sig), now),
        BroadcastItem::RowSet(owner, sig) if store.trust.mode != SigningMode::Off => {
            store.keep_row_set(owner, sig, true)
        }
        BroadcastItem::RowSet(..) => None,
    }
}

impl Store {
    pub(crate) fn reject(&mut self, why: Reject) {
        self.rejected[why.index()] += 1;
    }
}

/// Merges a row if it is news and its signature (when needed) holds; a refusal is counted.
pub(crate) fn merge_row(
    store: &mut Store,
    row: Row,
    sig: Option<Signature>,
) -> Option<BroadcastKey> {
    let now = store.now_ms;
    if store.trust.mode == SigningMode::Off {
        // Off: as before signing existed; a signature is neither checked nor kept.
        return apply_row(store, row, None);
    }
    if !store.rows.would_apply(&row) {
        // Old news (the unsigned copy of a signed row just taken, typically) costs no check;
        // but a signature for a version held unsigned is kept once checked.
        if let Some(sig) = sig
            && store.rows.lacks_sig(&row)
            && store
                .trust
                .check_row_stored(&row, Some(&sig), store.certs.get(&row.owner), now)
                .is_ok()
        {
            store.rows.attach_sig(&row, sig);
        }
        return None;
    }
    match store
        .trust
        .check_row_stored(&row, sig.as_ref(), store.certs.get(&row.owner), now)
    {
        Ok(()) => apply_row(store, row, sig),
        Err(why) => {
            store.reject(why);
            None
        }
    }
}

/// [`merge_row`] of a row whose signature was verified (in a batch, with its certificate's
/// dates and scope): no second check.
pub(crate) fn merge_verified_row(
    store: &mut Store,
    row: Row,
    sig: Option<Signature>,
) -> Option<BroadcastKey> {
    if !store.rows.would_apply(&row) {
        if let Some(sig) = sig
            && store.rows.lacks_sig(&row)
        {
            store.rows.attach_sig(&row, sig);
        }
        return None;
    }
    apply_row(store, row, sig)
}

fn apply_row(store: &mut Store, row: Row, sig: Option<Signature>) -> Option<BroadcastKey> {
    let key = BroadcastKey::Row {
        owner: row.owner,
        key: row.key.clone(),
        version: row.version(),
    };
    let applied = store.rows.merge_signed(row, sig, store.now_ms) == Merge::Applied;
    store.rows_received += u64::from(applied);
    applied.then_some(key)
}

/// Keeps an owner's certificate if the registry signed it for the owner's ip and it is
/// newer than the one held. Certificates matter only when signatures are checked.
pub(crate) fn merge_cert(
    store: &mut Store,
    owner: SocketAddr,
    cert: Certificate,
) -> Option<BroadcastKey> {
    merge_cert_checked(store, owner, cert, false)
}

/// [`merge_cert`], told whether the registry's signature was already verified (in a batch).
pub(crate) fn merge_cert_checked(
    store: &mut Store,
    owner: SocketAddr,
    cert: Certificate,
    signed: bool,
) -> Option<BroadcastKey> {
    if store.trust.mode == SigningMode::Off {
        return None;
    }
    if store.certs.get(&owner) == Some(&cert) {
        return None;
    }
    let now = store.now_ms;
    let checked = if signed {
        store.trust.check_cert_signed(owner, &cert, now)
    } else {
        store.trust.check_cert(owner, &cert, now)
    };
    // Checked before it is compared, so a forged one is counted whatever its dates.
    if let Err(why) = checked {
        store.reject(why);
        return None;
    }
    if store
        .certs
        .get(&owner)
        .is_some_and(|held| held.body.not_after_ms >= cert.body.not_after_ms)
    {
        return None;
    }
    let key = BroadcastKey::Cert {
        owner,
        not_after_ms: cert.body.not_after_ms,
    };
    store.certs.insert(owner, cert);
    Some(key)
}

fn merge_snapshot(
    store: &mut Store,
    snap: Snapshot,
    sig: Option<Signature>,
    now: u64,
) -> Option<BroadcastKey> {
    if let Err(why) = store.trust.check_snapshot(&snap, sig.as_ref()) {
        store.reject(why);
        return None;
    }
    // Kept only when checked: with signing off a signature is neither checked nor passed on.
    let sig = sig.filter(|_| store.trust.mode != SigningMode::Off);
    let key = snapshot_key(&snap);
    (store.snapshots.merge_signed(snap, sig, now) == SnapshotMerge::Applied).then_some(key)
}

/// [`merge`] for a registry answer this node fetched itself ([`SnapshotStore::merge_direct`]).
/// A signature comes checked (`Node::apply_registry_answer`).
///
/// [`SnapshotStore::merge_direct`]: crate::snapshot::SnapshotStore::merge_direct
pub(crate) fn merge_direct(store: &mut Store, item: BroadcastItem) -> Option<BroadcastKey> {
    let (snap, sig) = match item {
        BroadcastItem::Snapshot(snap) => (snap, None),
        BroadcastItem::SignedSnapshot(snap, sig) => (snap, Some(sig)),
        row => return merge(store, row),
    };
    let key = snapshot_key(&snap);
    let now = store.now_ms;
    (store.snapshots.merge_direct(snap, sig, now) == SnapshotMerge::Applied).then_some(key)
}

fn snapshot_key(snap: &Snapshot) -> BroadcastKey {
    let s = snap.summary();
    BroadcastKey::Snapshot {
        service: s.service,
        rank: (s.generated_at_ms, s.hash),
    }
}
