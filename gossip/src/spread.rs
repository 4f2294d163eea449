//! Dissemination of rows and snapshots: infection-style gossip in packets of our own, beside
//! foca's SWIM traffic rather than inside it.
//!
//! Why not foca custom broadcasts: foca fills a packet with SWIM updates first and leaves
//! custom broadcasts the rest (memberlist #299); it discards every payload addressed to an
//! identity the receiver has since renewed, and every payload from a sender it holds down;
//! and its fan-out is `num_indirect_probes`, which [`crate::probing`] raises under loss.
//! Rows are owner-versioned CRDT state, safe to merge from anyone holding the cluster key,
//! so they travel on their own, addressed by socket address.
//!
//! Mechanism (SWIM's infection style, memberlist's budget): a node that learns a new item —
//! published locally, received, or learned by repair — queues it for
//! [`retransmits`]`(N)` = λ·⌈log10(N+1)⌉ transmissions (λ = 4, memberlist's RetransmitMult).
//! It sends to [`FANOUT`] random active members at once and on every gossip tick until the
//! budget is spent; a packet carries as many queued items as fit, freshest first, and each
//! item in it counts one transmission. A newer version of a row or snapshot drops the queued
//! older one.

use std::net::SocketAddr;

use rand::seq::IndexedRandom;
use schema::codec;

use crate::broadcast::{self, BroadcastItem, BroadcastKey, Store};
use crate::codec::PacketKind;
use crate::crypto::SEAL_OVERHEAD;
use crate::metrics::Metrics;
use crate::node::{MAX_BROADCAST_ITEM, MAX_DATAGRAM, Node};
use crate::rows::Row;
use crate::sign::SigningMode;
use crate::snapshot::Snapshot;

/// Members each round sends to (memberlist's and serf's gossip fan-out).
pub const FANOUT: usize = 3;

/// memberlist's RetransmitMult: transmissions per node are λ·⌈log10(N+1)⌉.
const RETRANSMIT_MULT: u32 = 4;

/// How many times a node sends an item it learned, in a cluster of `n`. A node is missed by
/// the epidemic with probability ≈ e^(-transmissions·(1-loss)), so the budget grows with
/// log N; memberlist rounds log10 up (foca's `new_lan` rounds it down, which leaves a tail
/// at small N: N = 20 gets 5).
pub fn retransmits(n: u32) -> u32 {
    let digits = (f64::from(n.max(1)) + 1.0).log10().ceil().max(1.0);
    RETRANSMIT_MULT * digits as u32
}

struct Pending {
    key: BroadcastKey,
    /// The item's encodings, sent together: one, or (signing `accept`) the signed form and
    /// the unsigned one for agents that do not read signatures yet.
    data: Vec<Vec<u8>>,
    left: u32,
}

/// Items waiting to be sent, each with the transmissions it has left.
#[derive(Default)]
pub(crate) struct Outbox {
    queue: Vec<Pending>,
}

impl Outbox {
    /// Queues an item the node just learned; it replaces an equal or older queued one, and
    /// is dropped if a newer one is queued.
    #[cfg(test)]
    pub(crate) fn push(&mut self, key: BroadcastKey, data: Vec<u8>, budget: u32) {
        self.push_all(key, vec![data], budget);
    }

    /// [`push`](Self::push) for an item sent in several encodings at once.
    pub(crate) fn push_all(&mut self, key: BroadcastKey, data: Vec<Vec<u8>>, budget: u32) {
        if data.is_empty() {
            return;
        }
        if self.queue.iter().any(|p| p.key.invalidates(&key)) {
            return;
        }
        self.queue
            .retain(|p| p.key != key && !key.invalidates(&p.key));
        if budget > 0 {
            self.queue.push(Pending {
                key,
                data,
                left: budget,
            });
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// The body of one packet of at most `room` bytes: `[u16 length][item]`..., freshest
    /// items (most transmissions left) first, each counted as sent. Spent items leave.
    pub(crate) fn fill(&mut self, room: usize) -> Vec<u8> {
        self.queue.sort_by_key(|p| std::cmp::Reverse(p.left));
        let mut body = Vec::new();
        for p in &mut self.queue {
            let size: usize = p.data.iter().map(|d| 2 + d.len()).sum();
            if p.data.iter().any(|d| u16::try_from(d.len()).is_err()) {
                p.left = 0;
                continue;
            }
            if body.len() + size <= room {
                for d in &p.data {
                    body.extend_from_slice(&(d.len() as u16).to_be_bytes());
                    body.extend_from_slice(d);
                }
                p.left -= 1;
            }
        }
        self.queue.retain(|p| p.left > 0);
        body
    }
}

/// Room for items in one sealed datagram after the packet-kind byte.
const ROOM: usize = MAX_DATAGRAM - SEAL_OVERHEAD - 1;

impl Node {
    /// Merges an item and, if it was news, queues it to be passed on (if small enough:
    /// bigger ones reach peers through repair only). Returns whether it was news.
    pub(crate) fn learn(&mut self, item: BroadcastItem) -> bool {
        self.learn_by(item, broadcast::merge)
    }

    /// [`Node::learn`] for a registry answer this node fetched itself: judged by
    /// [`broadcast::merge_direct`].
    pub(crate) fn learn_direct(&mut self, item: BroadcastItem) -> bool {
        self.learn_by(item, broadcast::merge_direct)
    }

    fn learn_by(
        &mut self,
        item: BroadcastItem,
        merge: fn(&mut Store, BroadcastItem) -> Option<BroadcastKey>,
    ) -> bool {
        let encodings = encodings(&item, self.store.trust.mode);
        let Some(key) = merge(&mut self.store, item) else {
            return false;
        };
        if let Some(data) = encodings {
            self.outbox.push_all(key, data, retransmits(self.sized_for));
        }
        true
    }

    /// Sends queued items to [`FANOUT`] random active members now.
    pub(crate) fn spread_now(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        let me = self.me.addr;
        let peers: Vec<SocketAddr> = self
            .members
            .values()
            .filter(|m| m.active && m.id.addr != me)
            .map(|m| m.id.addr)
            .collect();
        let chosen: Vec<SocketAddr> = peers.sample(&mut self.rng, FANOUT).copied().collect();
        for peer in chosen {
            let body = self.outbox.fill(ROOM);
            if body.is_empty() {
                break;
            }
            self.send_plain(peer, PacketKind::Rows, &body);
        }
    }

    /// Handles a packet of items from a peer.
    pub(crate) fn on_rows(&mut self, body: &[u8]) {
        let Some(items) = items(body) else {
            Metrics::bump(&self.metrics.dropped_malformed, 1);
            return;
        };
        let mut news = false;
        for item in items {
            match codec::decode_packet::<BroadcastItem>(item) {
                Ok(item) => news |= self.learn(item),
                Err(_) => Metrics::bump(&self.metrics.dropped_malformed, 1),
            }
        }
        // Relay news at once rather than at the next tick: a hop then costs one network
        // delay, not half a gossip interval. The budget bounds transmissions either way.
        if news {
            self.spread_now();
        }
    }
}

/// How an item is passed on: `None` if too big for a broadcast (repair carries it). With
/// signing off a signed row goes on unsigned (as agents before signing did); with `accept`
/// it goes signed and, for agents that do not read signatures, unsigned too; with
/// `require` signed only.
fn encodings(item: &BroadcastItem, mode: SigningMode) -> Option<Vec<Vec<u8>>> {
    let encode = |i: &BroadcastItem| i.encode().ok().filter(|b| b.len() <= MAX_BROADCAST_ITEM);
    let plain = |row: &Row| BroadcastItem::Row(Box::new(row.clone()));
    let plain_snap = |s: &Snapshot| BroadcastItem::Snapshot(s.clone());
    match (item, mode) {
        (BroadcastItem::SignedRow(row, _), SigningMode::Off) => Some(vec![encode(&plain(row))?]),
        (BroadcastItem::SignedRow(row, _), SigningMode::Accept) => {
            Some(vec![encode(item)?, encode(&plain(row))?])
        }
        (BroadcastItem::SignedSnapshot(s, _), SigningMode::Off) => {
            Some(vec![encode(&plain_snap(s))?])
        }
        (BroadcastItem::SignedSnapshot(s, _), SigningMode::Accept) => {
            Some(vec![encode(item)?, encode(&plain_snap(s))?])
        }
        (BroadcastItem::Cert(..) | BroadcastItem::RowSet(..), SigningMode::Off) => Some(Vec::new()),
        // Peers that require signatures drop unsigned snapshots (lower bounds, restamped
        // answers): no use sending them.
        (BroadcastItem::Snapshot(_), SigningMode::Require) => Some(Vec::new()),
        _ => Some(vec![encode(item)?]),
    }
}

/// The plaintext of one dissemination packet carrying `items` (seal it with
/// [`crate::crypto::Sealer`]): for tools and tests that speak gossip from outside a node.
/// `None` if an item does not encode or the whole exceeds a datagram.
pub fn rows_packet(items: &[BroadcastItem]) -> Option<Vec<u8>> {
    let mut out = vec![PacketKind::Rows as u8];
    for item in items {
        let bytes = item.encode().ok()?;
        out.extend_from_slice(&u16::try_from(bytes.len()).ok()?.to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    (out.len() <= ROOM + 1).then_some(out)
}

/// Splits a packet body into its items; `None` if the framing is broken.
pub(crate) fn items(mut body: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let (len, rest) = body.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_be_bytes(*len));
        if len == 0 || rest.len() < len {
            return None;
        }
        let (item, rest) = rest.split_at(len);
        out.push(item);
        body = rest;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::num::NonZeroU16;

    use schema::{Endpoint, ServiceName};

    use super::*;
    use crate::rows::Version;

    fn key(port: u16, seq: u64) -> BroadcastKey {
        let ep = Endpoint::new(
            ServiceName::new("web").unwrap(),
            "10.0.0.1".parse().unwrap(),
            NonZeroU16::new(port).unwrap(),
        );
        BroadcastKey::Row {
            owner: "10.0.0.1:7702".parse::<SocketAddr>().unwrap(),
            key: ep.key(),
            version: Version { epoch: 1, seq },
        }
    }

    #[test]
    fn budget_grows_with_log_n_like_memberlist() {
        assert_eq!(retransmits(1), 4);
        assert_eq!(retransmits(9), 4);
        assert_eq!(retransmits(20), 8);
        assert_eq!(retransmits(100), 12);
        assert_eq!(retransmits(1000), 16);
        assert_eq!(retransmits(10_000), 20);
    }

    #[test]
    fn items_are_sent_budget_times_freshest_first_and_newer_versions_replace_older() {
        let mut out = Outbox::default();
        out.push(key(1, 1), vec![1; 10], 2);
        out.push(key(2, 1), vec![2; 10], 3);
        // A newer version of row 1 replaces the queued one.
        out.push(key(1, 2), vec![3; 10], 3);
        assert_eq!(out.len(), 2);
        // Room for one item: the freshest goes first.
        let one = out.fill(12);
        assert_eq!(items(&one).unwrap(), vec![&[2u8; 10][..]]);
        let mut sent = 0;
        for _ in 0..10 {
            sent += items(&out.fill(1400)).unwrap().len();
        }
        // 3 + 3 transmissions in all, one of them above.
        assert_eq!(sent, 5);
        assert!(out.is_empty());
        // An older version does not join a newer queued one.
        out.push(key(1, 5), vec![4; 10], 1);
        out.push(key(1, 4), vec![5; 10], 1);
        assert_eq!(out.len(), 1);
        assert_eq!(items(&out.fill(1400)).unwrap(), vec![&[4u8; 10][..]]);
    }

    #[test]
    fn broken_framing_is_refused() {
        assert_eq!(items(&[]).unwrap().len(), 0);
        assert!(items(&[0]).is_none());
        assert!(items(&[0, 0]).is_none());
        assert!(items(&[0, 5, 1, 2]).is_none());
        assert_eq!(
            items(&[0, 1, 7, 0, 2, 8, 9]).unwrap(),
            vec![&[7u8][..], &[8, 9]]
        );
    }
}
