//! Signed gossip in the node: what a member holding the cluster key but no registry
//! certificate for the addresses it speaks for can no longer change.

use std::net::SocketAddr;
use std::num::NonZeroU16;

use schema::{Endpoint, EndpointKey, ServiceName};

use super::*;
use crate::codec::PacketKind;
use crate::repair::{Proofs, RepairPush, RepairResponse};
use crate::sign::{CertBody, Certificate, Reject};

const NOW: u64 = 1_780_000_000_000;
const HOUR: u64 = 3_600_000;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_seed([seed; 32]).unwrap()
}

fn registry() -> SigningKey {
    key(1)
}

fn addr(host: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, host], 7702))
}

fn cert(owner: &SigningKey, host: u8) -> Certificate {
    Certificate::issue(
        &registry(),
        CertBody {
            owner_key: owner.public(),
            ip: addr(host).ip(),
            services: None,
            not_before_ms: NOW - HOUR,
            not_after_ms: NOW + HOUR,
        },
    )
    .unwrap()
}

fn signed_node(host: u8, mode: SigningMode) -> Node {
    let mut cfg = GossipConfig::for_tests(addr(host));
    cfg.signing = mode;
    cfg.registry_key = Some(registry().public().to_base64());
    Node::new(cfg, NOW, u64::from(host)).unwrap()
}

fn ep(host: u8, port: u16) -> Endpoint {
    Endpoint::new(
        ServiceName::new("web").unwrap(),
        addr(host).ip(),
        NonZeroU16::new(port).unwrap(),
    )
}

fn up(owner: u8, host: u8, port: u16, version: Version) -> Row {
    let e = ep(host, port);
    Row::new(addr(owner), e.key(), RowStatus::Up(e.into()), version)
}

fn tombstone(owner: u8, host: u8, port: u16) -> Row {
    let key: EndpointKey = ep(host, port).key();
    Row::new(
        addr(owner),
        key,
        RowStatus::Deregistered,
        Version { epoch: NOW, seq: 9 },
    )
}

/// One insecure-mode Rows packet carrying `items`.
fn packet(items: &[BroadcastItem]) -> Vec<u8> {
    let mut out = vec![0, PacketKind::Rows as u8];
    for item in items {
        let bytes = item.encode().unwrap();
        out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

fn rows_of(n: &Node) -> Vec<Row> {
    n.store.rows.all_rows()
}

fn sent_items(effects: &[Effect]) -> Vec<BroadcastItem> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { packet, .. } => Some(packet),
            _ => None,
        })
        .filter(|p| p.get(1) == Some(&(PacketKind::Rows as u8)))
        .flat_map(|p| crate::spread::items(&p[2..]).unwrap_or_default())
        .filter_map(|i| codec::decode_packet::<BroadcastItem>(i).ok())
        .collect()
}

/// A repair response from node 1 carrying `rows` and `snapshots`.
fn response_from_1(rows: Vec<Row>, snapshots: Vec<Snapshot>) -> RepairResponse {
    RepairResponse {
        from: addr(1),
        buckets: Default::default(),
        rows,
        snapshots,
        owners: Vec::new(),
        snapshot_summaries: Vec::new(),
    }
}

/// The owner's rows, signed, and its certificate reach a peer: taken.
fn honest_pair(mode: SigningMode) -> (Node, Node) {
    let owner_key = key(2);
    let mut a = signed_node(1, mode);
    let mut b = signed_node(2, mode);
    a.set_owner_key(owner_key);
    a.set_certificate(NOW, cert(&key(2), 1));
    a.assume_members(NOW, [b.id()]);
    a.take_effects();
    a.publish_local(NOW, vec![ep(1, 80)]);
    let items = sent_items(&a.take_effects());
    assert!(!items.is_empty());
    let cert_item = BroadcastItem::Cert(addr(1), Box::new(cert(&key(2), 1)));
    b.handle_packet(NOW, addr(1), &packet(&[cert_item]));
    b.handle_packet(NOW, addr(1), &packet(&items));
    assert_eq!(rows_of(&b), rows_of(&a));
    (a, b)
}

#[test]
fn signed_rows_from_their_certified_owner_are_taken_and_forgeries_are_counted() {
    let (_a, mut b) = honest_pair(SigningMode::Require);
    let before = rows_of(&b);
    let hostile = key(3);
    let own = cert(&hostile, 9);
    let forged_cert = Certificate::issue(&hostile, cert(&hostile, 1).body).unwrap();
    let next = Version { epoch: NOW, seq: 5 };
    let foreign = up(1, 1, 81, next);
    let future = up(
        1,
        1,
        80,
        Version {
            epoch: 4_102_444_800_000,
            seq: 1,
        },
    );
    let cron = tombstone(9, 5, 80);
    let sign = |r: &Row| sign::sign_row(&hostile, r).unwrap();
    let attacks = [
        // A foreign Up row: unsigned, then signed by the wrong key.
        BroadcastItem::Row(Box::new(foreign.clone())),
        BroadcastItem::SignedRow(Box::new(foreign.clone()), sign(&foreign)),
        // A self-made certificate for the victim's address.
        BroadcastItem::Cert(addr(1), Box::new(forged_cert)),
        // Its own valid certificate, then a tombstone for a cron-only host's entry.
        BroadcastItem::Cert(addr(9), Box::new(own)),
        BroadcastItem::SignedRow(Box::new(cron.clone()), sign(&cron)),
        // A far-future epoch for another member's address.
        BroadcastItem::Row(Box::new(future.clone())),
        BroadcastItem::SignedRow(Box::new(future.clone()), sign(&future)),
    ];
    b.handle_packet(NOW, addr(9), &packet(&attacks));
    assert_eq!(rows_of(&b), before);
    let m = b.metrics().snapshot();
    assert_eq!(m.rejected_unsigned, 2, "{m:?}");
    assert_eq!(m.rejected_bad_signature, 2, "{m:?}");
    assert_eq!(m.rejected_bad_certificate, 1, "{m:?}");
    assert_eq!(m.rejected_out_of_scope, 1, "{m:?}");
    assert_eq!(b.store.rejected[Reject::Unsigned.index()], 2);
    assert!(
        m.to_string()
            .contains("tidings_gossip_rejected_total{reason=\"unsigned\"} 2\n")
    );
    // A SWIM identity for the victim's address dated in 2100 is refused by the codec.
    let bound = b.max_epoch.load(Ordering::Relaxed);
    assert_eq!(bound, NOW + MAX_EPOCH_AHEAD_MS);
}

#[test]
fn repair_carries_signatures_and_a_claimed_sender_cannot_prune_its_rows() {
    let (a, mut b) = honest_pair(SigningMode::Require);
    let mut c = signed_node(3, SigningMode::Require);
    // A repair response from `a` with proofs: taken.
    let rows = rows_of(&a);
    let proofs = repair::proofs(&a.store, &rows, &[]);
    assert!(proofs.sigs.iter().all(Option::is_some));
    assert_eq!(proofs.certs.len(), 1);
    let resp = response_from_1(rows.clone(), Vec::new());
    let frame = encode_frame(&RepairFrame::SignedResponse(resp.clone(), proofs)).unwrap();
    c.handle_repair_frame(NOW, &frame);
    assert_eq!(rows_of(&c), rows);
    // The same rows without proofs: refused.
    let mut d = signed_node(4, SigningMode::Require);
    let frame = encode_frame(&RepairFrame::Response(resp)).unwrap();
    d.handle_repair_frame(NOW, &frame);
    assert!(rows_of(&d).is_empty());
    assert_eq!(d.metrics().snapshot().rejected_unsigned, 1);
    // A push that claims to come from `a` and lists none of its rows deletes nothing.
    let push = RepairPush {
        from: addr(1),
        rows: Vec::new(),
        snapshots: Vec::new(),
    };
    let frame = encode_frame(&RepairFrame::SignedPush(push, Proofs::default())).unwrap();
    b.handle_repair_frame(NOW, &frame);
    assert_eq!(rows_of(&b), rows);
}

#[test]
fn a_repair_frame_checked_in_a_batch_still_refuses_its_one_forged_row() {
    let owner_key = key(2);
    let mut a = signed_node(1, SigningMode::Require);
    a.set_owner_key(owner_key);
    a.set_certificate(NOW, cert(&key(2), 1));
    a.publish_local(NOW, (80..90).map(|p| ep(1, p)).collect());
    let mut rows = rows_of(&a);
    let mut proofs = repair::proofs(&a.store, &rows, &[]);
    // A relay changes one row's port and keeps its signature: the batch fails, each row
    // is then checked alone, and only the forged one is refused.
    let i = rows.iter().position(|r| r.key.port.get() == 85).unwrap();
    rows[i] = up(1, 1, 9999, rows[i].version());
    proofs.certs.push((addr(3), cert(&key(3), 3)));
    let resp = response_from_1(rows.clone(), Vec::new());
    let mut c = signed_node(3, SigningMode::Require);
    let frame = encode_frame(&RepairFrame::SignedResponse(resp.clone(), proofs.clone())).unwrap();
    c.handle_repair_frame(NOW, &frame);
    let mut want = rows.clone();
    want.remove(i);
    assert_eq!(rows_of(&c), want);
    assert_eq!(c.store.rejected[Reject::BadSignature.index()], 1);
    assert_eq!(
        c.store.certs.len(),
        2,
        "both certificates taken in one batch"
    );
    // A self-made certificate among good ones is refused alone.
    let mut d = signed_node(4, SigningMode::Require);
    let self_made = Certificate::issue(
        &key(9),
        CertBody {
            owner_key: key(9).public(),
            ip: addr(5).ip(),
            services: None,
            not_before_ms: NOW - HOUR,
            not_after_ms: NOW + HOUR,
        },
    )
    .unwrap();
    proofs.certs.push((addr(5), self_made));
    let frame = encode_frame(&RepairFrame::SignedResponse(resp, proofs)).unwrap();
    d.handle_repair_frame(NOW, &frame);
    assert_eq!(d.store.certs.len(), 2);
    // Counted: a refusal while applying a repair frame's certificates was not, before.
    assert_eq!(d.store.rejected[Reject::BadCertificate.index()], 1);
    assert_eq!(rows_of(&d), want);
}

#[test]
fn accept_mode_sends_both_forms_and_takes_unsigned_rows() {
    let (mut a, mut b) = honest_pair(SigningMode::Accept);
    a.publish_local(NOW, vec![ep(1, 80), ep(1, 81)]);
    let items = sent_items(&a.take_effects());
    let signed = items
        .iter()
        .filter(|i| matches!(i, BroadcastItem::SignedRow(..)))
        .count();
    let plain = items
        .iter()
        .filter(|i| matches!(i, BroadcastItem::Row(..)))
        .count();
    assert!(
        signed > 0 && signed == plain,
        "{signed} signed, {plain} plain"
    );
    // An old agent's unsigned row is taken.
    let old = up(7, 7, 80, Version { epoch: NOW, seq: 1 });
    b.handle_packet(
        NOW,
        addr(7),
        &packet(&[BroadcastItem::Row(Box::new(old.clone()))]),
    );
    assert!(rows_of(&b).contains(&old));
    assert_eq!(b.metrics().snapshot().rejected_unsigned, 0);
}

fn web_snapshot(at: u64, hosts: &[u8]) -> Snapshot {
    Snapshot {
        service: ServiceName::new("web").unwrap(),
        generated_at_ms: at,
        entries: hosts
            .iter()
            .map(|h| crate::SnapshotEntry {
                endpoint: ep(*h, 80).into(),
                last_check_in_ms: at,
            })
            .collect(),
    }
}

fn held(n: &Node) -> Option<&Snapshot> {
    n.store.snapshots.get(&ServiceName::new("web").unwrap())
}

fn snapshot_items(items: &[BroadcastItem]) -> (usize, usize) {
    let signed = items
        .iter()
        .filter(|i| matches!(i, BroadcastItem::SignedSnapshot(..)))
        .count();
    let plain = items
        .iter()
        .filter(|i| matches!(i, BroadcastItem::Snapshot(..)))
        .count();
    (signed, plain)
}

#[test]
fn a_registry_signed_answer_travels_signed_in_broadcasts_and_repair() {
    let (mut a, mut b) = (
        signed_node(1, SigningMode::Require),
        signed_node(2, SigningMode::Require),
    );
    a.assume_members(NOW, [b.id()]);
    a.take_effects();
    // A host only the registry knows (a cron check-in), as the registry signed it.
    let snap = web_snapshot(NOW, &[5]);
    let sig = sign::sign_snapshot(&registry(), &snap);
    a.apply_registry_answer(NOW, snap.clone(), sig);
    let items = sent_items(&a.take_effects());
    assert_eq!(snapshot_items(&items), (1, 0), "signed only under require");
    b.handle_packet(NOW, addr(1), &packet(&items));
    assert_eq!(held(&b), Some(&snap));
    // Repair carries the registry's signature with the snapshot.
    let mut c = signed_node(3, SigningMode::Require);
    let snapshots = vec![snap.clone()];
    let proofs = repair::proofs(&a.store, &[], &snapshots);
    assert_eq!(proofs.snapshot_sigs, vec![sig]);
    let resp = RepairResponse {
        from: addr(1),
        buckets: Default::default(),
        rows: Vec::new(),
        snapshots,
        owners: Vec::new(),
        snapshot_summaries: Vec::new(),
    };
    let frame = encode_frame(&RepairFrame::SignedResponse(resp, proofs)).unwrap();
    c.handle_repair_frame(NOW, &frame);
    assert_eq!(held(&c), Some(&snap));
    // Tampered copies of it are refused: a host added, the date moved.
    let mut d = signed_node(4, SigningMode::Require);
    let mut added = snap.clone();
    added.entries.extend(web_snapshot(NOW, &[6]).entries);
    let mut later = snap.clone();
    later.generated_at_ms += 1;
    let sig = sig.unwrap();
    let forged = [
        BroadcastItem::SignedSnapshot(added, sig),
        BroadcastItem::SignedSnapshot(later, sig),
        BroadcastItem::Snapshot(snap),
    ];
    d.handle_packet(NOW, addr(1), &packet(&forged));
    assert_eq!(held(&d), None);
    let m = d.metrics().snapshot();
    assert_eq!((m.rejected_bad_signature, m.rejected_unsigned), (2, 1));
}

#[test]
fn an_answer_the_registry_did_not_sign_as_held_stays_with_the_agent_under_require() {
    let mut a = signed_node(1, SigningMode::Require);
    let b = signed_node(2, SigningMode::Require);
    a.assume_members(NOW, [b.id()]);
    a.take_effects();
    // A signature that is not of this listing: taken (it is this agent's own answer),
    // counted, and kept from peers.
    let other = sign::sign_snapshot(&registry(), &web_snapshot(NOW, &[9]));
    a.apply_registry_answer(NOW, web_snapshot(NOW, &[5]), other);
    assert_eq!(held(&a), Some(&web_snapshot(NOW, &[5])));
    assert_eq!(a.metrics().snapshot().rejected_bad_signature, 1);
    assert_eq!(snapshot_items(&sent_items(&a.take_effects())), (0, 0));
    // A signed answer dated before what is held is restamped after it: the registry did
    // not sign that date, so it stays here too. So does a lower bound.
    let early = web_snapshot(NOW - 5, &[7]);
    let sig = sign::sign_snapshot(&registry(), &early);
    a.apply_registry_answer(NOW, early, sig);
    assert_eq!(held(&a).map(|s| s.generated_at_ms), Some(NOW + 1));
    assert_eq!(snapshot_items(&sent_items(&a.take_effects())), (0, 0));
    // Nor does repair send what it holds unsigned to a peer that would drop it.
    let req = repair::RepairRequest {
        from: addr(2),
        buckets: (0..repair::DIGEST_BUCKETS as u8).collect(),
        owners: Vec::new(),
        snapshots: Vec::new(),
    };
    assert!(
        repair::respond(&a.store, addr(1), &req)
            .snapshots
            .is_empty()
    );
    // With `accept`, a signed answer goes both ways, for agents that read no signatures.
    let mut e = signed_node(5, SigningMode::Accept);
    e.assume_members(NOW, [b.id()]);
    e.take_effects();
    let snap = web_snapshot(NOW, &[5]);
    e.apply_registry_answer(NOW, snap.clone(), sign::sign_snapshot(&registry(), &snap));
    assert_eq!(snapshot_items(&sent_items(&e.take_effects())), (1, 1));
}

#[test]
fn an_owner_row_set_travels_after_its_rows_and_vouches_for_them_in_repair() {
    let (mut a, mut b) = honest_pair(SigningMode::Require);
    a.publish_local(NOW, (80..85).map(|p| ep(1, p)).collect());
    let items = sent_items(&a.take_effects());
    let set_at = items
        .iter()
        .position(|i| matches!(i, BroadcastItem::RowSet(..)))
        .expect("the row set is sent");
    assert!(
        items[..set_at]
            .iter()
            .any(|i| matches!(i, BroadcastItem::SignedRow(..))),
        "after the rows it covers"
    );
    b.handle_packet(NOW, addr(1), &packet(&items));
    assert_eq!(rows_of(&b), rows_of(&a));
    assert_eq!(b.store.row_set(&addr(1)), a.store.row_set(&addr(1)));
    assert!(b.store.row_set(&addr(1)).is_some());
    // b's repair frame carries it; a node that gets the rows with no row signatures at all
    // takes them on the set's one signature, and keeps it to pass on.
    let rows = rows_of(&b);
    let mut proofs = repair::proofs(&b.store, &rows, &[]);
    assert_eq!(proofs.row_sets.len(), 1);
    proofs.sigs = vec![None; rows.len()];
    let frame = encode_frame(&RepairFrame::SignedResponse(
        response_from_1(rows.clone(), Vec::new()),
        proofs.clone(),
    ))
    .unwrap();
    let mut c = signed_node(3, SigningMode::Require);
    c.handle_repair_frame(NOW, &frame);
    assert_eq!(rows_of(&c), rows);
    assert!(c.store.row_set(&addr(1)).is_some());
    // One row changed under the set: the set fails, and with no row signatures to fall
    // back on, nothing is taken.
    let mut forged = rows.clone();
    forged[0] = up(1, 1, 9999, forged[0].version());
    let frame = encode_frame(&RepairFrame::SignedResponse(
        response_from_1(forged, Vec::new()),
        proofs,
    ))
    .unwrap();
    let mut d = signed_node(4, SigningMode::Require);
    d.handle_repair_frame(NOW, &frame);
    assert!(rows_of(&d).is_empty());
    assert!(d.store.row_set(&addr(1)).is_none());
}
