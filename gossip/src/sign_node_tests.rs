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
    let proofs = repair::proofs(&a.store, &rows);
    assert!(proofs.sigs.iter().all(Option::is_some));
    assert_eq!(proofs.certs.len(), 1);
    let resp = RepairResponse {
        from: addr(1),
        buckets: Default::default(),
        rows: rows.clone(),
        snapshots: Vec::new(),
        owners: Vec::new(),
        snapshot_summaries: Vec::new(),
    };
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
