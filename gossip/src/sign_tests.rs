use std::num::NonZeroU16;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use proptest::prelude::*;
use schema::{Endpoint, EndpointKey, ServiceName};

use super::*;
use crate::rows::{RowStatus, Version};
use crate::snapshot::SnapshotEntry;

const NOW: u64 = 1_780_000_000_000;
const HOUR: u64 = 3_600_000;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_seed([seed; SEED_LEN]).unwrap()
}

fn service(name: &str) -> ServiceName {
    ServiceName::new(name).unwrap()
}

fn endpoint(svc: &str, ip: &str, port: u16) -> Endpoint {
    Endpoint::new(
        service(svc),
        ip.parse().unwrap(),
        NonZeroU16::new(port).unwrap(),
    )
}

fn up_row(owner: &str, svc: &str, ip: &str, port: u16, seq: u64) -> Row {
    let ep = endpoint(svc, ip, port);
    Row::new(
        owner.parse().unwrap(),
        ep.key(),
        RowStatus::Up(ep.into()),
        Version { epoch: 7, seq },
    )
}

fn tombstone(owner: &str, svc: &str, ip: &str, port: u16) -> Row {
    let key = EndpointKey {
        service: service(svc),
        ip: ip.parse().unwrap(),
        port: NonZeroU16::new(port).unwrap(),
    };
    Row::new(
        owner.parse().unwrap(),
        key,
        RowStatus::Deregistered,
        Version { epoch: 7, seq: 9 },
    )
}

fn cert(
    registry: &SigningKey,
    owner: &SigningKey,
    ip: &str,
    services: Option<&[&str]>,
) -> Certificate {
    Certificate::issue(
        registry,
        CertBody {
            owner_key: owner.public(),
            ip: ip.parse().unwrap(),
            services: services.map(|s| s.iter().map(|n| service(n)).collect()),
            not_before_ms: NOW - HOUR,
            not_after_ms: NOW + HOUR,
        },
    )
    .unwrap()
}

fn trust(registry: &SigningKey, mode: SigningMode) -> Trust {
    Trust {
        registry: Some(registry.public()),
        mode,
        grace_ms: 24 * HOUR,
    }
}

#[test]
fn keys_round_trip_through_base64_and_never_print_the_secret() {
    let k = SigningKey::generate();
    let again: SigningKey = k.to_base64().parse().unwrap();
    assert_eq!(again.public(), k.public());
    assert_eq!(
        k.public().to_base64().parse::<PublicKey>().unwrap(),
        k.public()
    );
    assert!(!format!("{k:?}").contains(&k.to_base64()));
    assert!("not base64!".parse::<SigningKey>().is_err());
    assert!(matches!(
        B64.encode([1u8; 31]).parse::<PublicKey>(),
        Err(SignKeyError::Length {
            expected: 32,
            got: 31
        })
    ));
}

#[test]
fn an_owner_row_signed_under_its_certificate_is_accepted() {
    let (registry, owner) = (key(1), key(2));
    let c = cert(&registry, &owner, "10.0.0.1", None);
    let t = trust(&registry, SigningMode::Require);
    for row in [
        up_row("10.0.0.1:7702", "web", "10.0.0.1", 80, 1),
        tombstone("10.0.0.1:7702", "web", "10.0.0.1", 81),
    ] {
        let sig = sign_row(&owner, &row).unwrap();
        assert_eq!(t.check_row(&row, Some(&sig), Some(&c), NOW), Ok(()));
        // Within the grace period after the certificate's end (registry down): still good.
        assert_eq!(
            t.check_row(&row, Some(&sig), Some(&c), NOW + 20 * HOUR),
            Ok(())
        );
        assert_eq!(
            t.check_row(&row, Some(&sig), Some(&c), NOW + 26 * HOUR),
            Err(Reject::ExpiredCertificate)
        );
        assert_eq!(
            t.check_row(&row, Some(&sig), Some(&c), NOW - 2 * HOUR),
            Err(Reject::ExpiredCertificate)
        );
    }
}

#[test]
fn the_hostile_member_cases_are_refused_with_a_reason() {
    let (registry, owner, hostile) = (key(1), key(2), key(3));
    let t = trust(&registry, SigningMode::Require);
    let victim = cert(&registry, &owner, "10.0.0.1", None);
    let own = cert(&registry, &hostile, "10.0.0.9", None);
    let forged = cert(&hostile, &hostile, "10.0.0.1", None);

    // A foreign Up row, unsigned, signed by the wrong key, or under a self-made certificate.
    let row = up_row("10.0.0.1:7702", "web", "10.0.0.1", 80, 1);
    assert_eq!(
        t.check_row(&row, None, Some(&victim), NOW),
        Err(Reject::Unsigned)
    );
    let bad = sign_row(&hostile, &row).unwrap();
    assert_eq!(
        t.check_row(&row, Some(&bad), Some(&victim), NOW),
        Err(Reject::BadSignature)
    );
    assert_eq!(
        t.check_row(&row, Some(&bad), Some(&forged), NOW),
        Err(Reject::BadCertificate)
    );
    assert_eq!(
        t.check_row(&row, Some(&bad), None, NOW),
        Err(Reject::NoCertificate)
    );
    // Its own valid certificate does not reach another IP: not as owner, not as endpoint,
    // so a tombstone for a cron-only host's registry entry is refused.
    let theirs = up_row("10.0.0.9:7702", "web", "10.0.0.1", 80, 1);
    let sig = sign_row(&hostile, &theirs).unwrap();
    assert_eq!(
        t.check_row(&theirs, Some(&sig), Some(&own), NOW),
        Err(Reject::OutOfScope)
    );
    let cron = tombstone("10.0.0.9:7702", "web", "10.0.0.5", 80);
    let sig = sign_row(&hostile, &cron).unwrap();
    assert_eq!(
        t.check_row(&cron, Some(&sig), Some(&own), NOW),
        Err(Reject::OutOfScope)
    );
    // A far-future epoch under another member's address.
    let mut future = up_row("10.0.0.1:7702", "web", "10.0.0.9", 80, 1);
    future.reg.marker.epoch = u64::MAX;
    let sig = sign_row(&hostile, &future).unwrap();
    assert_eq!(
        t.check_row(&future, Some(&sig), Some(&own), NOW),
        Err(Reject::OutOfScope)
    );
    assert_eq!(
        t.check_cert("10.0.0.1:7702".parse().unwrap(), &own, NOW),
        Err(Reject::OutOfScope)
    );
    assert_eq!(
        t.check_cert("10.0.0.9:7702".parse().unwrap(), &own, NOW),
        Ok(())
    );
}

#[test]
fn a_service_scoped_certificate_covers_only_its_services() {
    let (registry, owner) = (key(1), key(2));
    let c = cert(&registry, &owner, "10.0.0.1", Some(&["web"]));
    let t = trust(&registry, SigningMode::Require);
    let web = up_row("10.0.0.1:7702", "web", "10.0.0.1", 80, 1);
    let db = up_row("10.0.0.1:7702", "db", "10.0.0.1", 5432, 2);
    let sig = sign_row(&owner, &web).unwrap();
    assert_eq!(t.check_row(&web, Some(&sig), Some(&c), NOW), Ok(()));
    let sig = sign_row(&owner, &db).unwrap();
    assert_eq!(
        t.check_row(&db, Some(&sig), Some(&c), NOW),
        Err(Reject::OutOfScope)
    );
}

#[test]
fn modes_off_and_accept_take_unsigned_items_and_accept_still_checks_signed_ones() {
    let (registry, owner, hostile) = (key(1), key(2), key(3));
    let c = cert(&registry, &owner, "10.0.0.1", None);
    let row = up_row("10.0.0.1:7702", "web", "10.0.0.1", 80, 1);
    let bad = sign_row(&hostile, &row).unwrap();
    let off = trust(&registry, SigningMode::Off);
    let accept = trust(&registry, SigningMode::Accept);
    assert_eq!(off.check_row(&row, Some(&bad), Some(&c), NOW), Ok(()));
    assert_eq!(accept.check_row(&row, None, None, NOW), Ok(()));
    assert_eq!(
        accept.check_row(&row, Some(&bad), Some(&c), NOW),
        Err(Reject::BadSignature)
    );
    assert_eq!("require".parse::<SigningMode>(), Ok(SigningMode::Require));
    assert!("maybe".parse::<SigningMode>().is_err());
}

#[test]
fn snapshots_verify_only_under_the_registry_key() {
    let (registry, hostile) = (key(1), key(3));
    let snap = Snapshot {
        service: service("web"),
        generated_at_ms: NOW,
        entries: vec![SnapshotEntry {
            endpoint: endpoint("web", "10.0.0.5", 80).into(),
            last_check_in_ms: NOW,
        }],
    };
    let t = trust(&registry, SigningMode::Require);
    let sig = sign_snapshot(&registry, &snap).unwrap();
    assert_eq!(t.check_snapshot(&snap, Some(&sig)), Ok(()));
    assert_eq!(t.check_snapshot(&snap, None), Err(Reject::Unsigned));
    let forged = sign_snapshot(&hostile, &snap).unwrap();
    assert_eq!(
        t.check_snapshot(&snap, Some(&forged)),
        Err(Reject::BadSignature)
    );
    // The 2100 snapshot: a signature of today's snapshot does not carry over to it.
    let mut later = snap.clone();
    later.generated_at_ms = 4_102_444_800_000;
    assert_eq!(
        t.check_snapshot(&later, Some(&sig)),
        Err(Reject::BadSignature)
    );
}

proptest! {
    /// Any change to a signed row — owner, endpoint, value or version — breaks the
    /// signature, and so does any flipped bit of the signature.
    #[test]
    fn no_tampering_with_a_signed_row_verifies(
        port in 1u16..,
        seq in 0u64..1_000,
        epoch in any::<u64>(),
        bit in 0usize..512,
        which in 0u8..4,
    ) {
        let (registry, owner) = (key(1), key(2));
        let c = cert(&registry, &owner, "10.0.0.1", None);
        let t = trust(&registry, SigningMode::Require);
        let row = up_row("10.0.0.1:7702", "web", "10.0.0.1", 80, 1);
        let sig = sign_row(&owner, &row).unwrap();
        let mut forged = row.clone();
        match which {
            0 => forged.reg.marker = Version { epoch, seq: seq + 2 },
            1 => forged.owner.set_port(port.max(2).wrapping_add(u16::from(port == 7702))),
            2 => forged = tombstone("10.0.0.1:7702", "web", "10.0.0.1", 80),
            _ => {
                let ep = endpoint("web", "10.0.0.1", port.max(81));
                forged = Row::new(row.owner, ep.key(), RowStatus::Up(ep.into()), row.version());
            }
        }
        prop_assume!(forged != row);
        prop_assert_eq!(t.check_row(&forged, Some(&sig), Some(&c), NOW), Err(Reject::BadSignature));
        let mut bytes = sig.to_bytes();
        bytes[bit / 8] ^= 1 << (bit % 8);
        let flipped = Signature::from_slice(&bytes).unwrap();
        prop_assert!(t.check_row(&row, Some(&flipped), Some(&c), NOW).is_err());
    }

    /// A certificate with any field changed after signing is refused.
    #[test]
    fn no_tampering_with_a_certificate_verifies(last in 0u8..=255, days in 1u64..10_000) {
        let (registry, owner) = (key(1), key(2));
        let t = trust(&registry, SigningMode::Require);
        let good = cert(&registry, &owner, "10.0.0.1", Some(&["web"]));
        let mut c = good.clone();
        c.body.not_after_ms += days * 24 * HOUR;
        prop_assert_eq!(c.check(&registry.public(), NOW, 0), Err(Reject::BadCertificate));
        let mut c = good.clone();
        c.body.ip = format!("10.0.1.{last}").parse().unwrap();
        prop_assert_eq!(c.check(&registry.public(), NOW, 0), Err(Reject::BadCertificate));
        let mut c = good;
        c.body.services = None;
        prop_assert_eq!(t.check_cert("10.0.0.1:1".parse().unwrap(), &c, NOW), Err(Reject::BadCertificate));
    }
}

#[test]
fn a_batch_of_rows_verifies_only_when_every_row_would_alone() {
    let (registry, owner) = (key(1), key(2));
    let t = trust(&registry, SigningMode::Require);
    let c = cert(&registry, &owner, "10.0.0.5", None);
    let rows: Vec<Row> = (80..90)
        .map(|p| up_row("10.0.0.5:7702", "web", "10.0.0.5", p, 1))
        .collect();
    let sigs: Vec<Signature> = rows.iter().map(|r| sign_row(&owner, r).unwrap()).collect();
    let batch = |rows: &[Row], sigs: &[Signature]| {
        let items: Vec<_> = rows.iter().zip(sigs).map(|(r, s)| (r, s, &c)).collect();
        t.check_rows_batch(&items, NOW)
    };
    assert!(batch(&rows, &sigs));
    // One signature of another row, one row changed after signing, one out of scope, one
    // under a certificate past its grace: each alone fails the batch.
    let mut swapped = sigs.clone();
    swapped.swap(0, 1);
    assert!(!batch(&rows, &swapped));
    let mut changed = rows.clone();
    changed[3] = up_row("10.0.0.5:7702", "web", "10.0.0.5", 9999, 1);
    assert!(!batch(&changed, &sigs));
    let mut foreign = rows.clone();
    foreign[2] = up_row("10.0.0.5:7702", "web", "10.0.0.6", 80, 1);
    let mut foreign_sigs = sigs.clone();
    foreign_sigs[2] = sign_row(&owner, &foreign[2]).unwrap();
    assert!(!batch(&foreign, &foreign_sigs));
    let items: Vec<_> = rows.iter().zip(&sigs).map(|(r, s)| (r, s, &c)).collect();
    assert!(!t.check_rows_batch(&items, NOW + 30 * HOUR));
    // Certificates: the registry's batch holds, a self-made one breaks it.
    let other = cert(&registry, &key(3), "10.0.0.6", None);
    assert!(t.certs_signed(&[&c, &other]));
    let self_made = cert(&owner, &owner, "10.0.0.7", None);
    assert!(!t.certs_signed(&[&c, &self_made]));
}

#[test]
fn a_batch_refuses_a_weak_key_as_strict_verification_does() {
    // The identity point (small order): any signature (R = identity, s = 0) verifies
    // under it with the unstrict equation.
    let mut weak = [0u8; PUBLIC_KEY_LEN];
    weak[0] = 1;
    let weak = PublicKey(weak);
    let mut sig = [0u8; SIGNATURE_LEN];
    sig[0] = 1;
    let sig = Signature::from_slice(&sig).unwrap();
    let good = key(2);
    let good_sig = good.sign(b"m");
    assert!(schema::cert::verify_all(&[(
        &good.public(),
        b"m",
        &good_sig
    )]));
    assert!(!weak.verifies(b"anything", &sig));
    let items = [
        (&good.public(), &b"m"[..], &good_sig),
        (&weak, &b"anything"[..], &sig),
    ];
    assert!(!schema::cert::verify_all(&items));
}

#[test]
fn an_owner_signs_its_row_set_once_and_any_change_to_the_set_breaks_it() {
    let (registry, owner) = (key(1), key(2));
    let t = trust(&registry, SigningMode::Require);
    let c = cert(&registry, &owner, "10.0.0.5", None);
    let me: SocketAddr = "10.0.0.5:7702".parse().unwrap();
    let mut rows: Vec<Row> = (80..85)
        .map(|p| up_row("10.0.0.5:7702", "web", "10.0.0.5", p, u64::from(p)))
        .collect();
    rows.push(tombstone("10.0.0.5:7702", "web", "10.0.0.5", 79));
    let sig = sign_row_set(&owner, me, &rows).unwrap();
    let check = |rows: &[Row]| {
        let items = [(rows.iter().collect(), &sig, &c, true)];
        t.check_batch(&items, NOW)
    };
    assert!(check(&rows));
    let reversed: Vec<Row> = rows.iter().rev().cloned().collect();
    assert!(check(&reversed), "in any order");
    assert!(!check(&rows[1..]), "a row left out");
    let mut added = rows.clone();
    added.push(up_row("10.0.0.5:7702", "web", "10.0.0.5", 99, 1));
    assert!(!check(&added), "a row added");
    let mut older = rows.clone();
    older[0] = up_row("10.0.0.5:7702", "web", "10.0.0.5", 80, 1);
    assert!(!check(&older), "a row's version moved");
    // Another owner's row cannot be slipped into the set.
    let mut foreign = rows.clone();
    foreign.push(up_row("10.0.0.6:7702", "web", "10.0.0.5", 77, 1));
    assert!(!check(&foreign));
    // Nor is it a row signature, or the reverse.
    let one = [(vec![&rows[0]], &sig, &c, false)];
    assert!(!t.check_batch(&one, NOW));
}
