use std::collections::BTreeMap;

use proptest::prelude::*;
use schema::api::{Catalog, CatalogChanges, V1Host};
use serde_json::{Map, Value};

use super::*;

fn host(service: &str, ip: &str, port: u16, rev: &str, az: Option<&str>, at: u64) -> V1Host {
    let mut tags = Map::new();
    if let Some(az) = az {
        tags.insert("az".into(), Value::String(az.into()));
    }
    tags.insert("load_balancing_weight".into(), Value::from(100));
    V1Host {
        service: service.into(),
        ip_address: ip.into(),
        port,
        revision: rev.into(),
        service_repo_name: None,
        last_check_in: format!("2026-12-04T15:44:{:02}.000Z", at % 60),
        tags,
    }
}

const IPS: [&str; 5] = ["10.0.0.1", "10.0.0.2", "9.255.0.1", "::1", "fe80::2"];
const SERVICES: [&str; 4] = ["api", "db", "tidings-agent", "web"];

fn arb_catalog() -> impl Strategy<Value = Catalog> {
    let one = (
        0..SERVICES.len(),
        0..IPS.len(),
        1u16..4,
        0..3usize,
        proptest::option::of(0..2usize),
        0u64..60,
    );
    (proptest::collection::vec(one, 0..24), 1u64..1000).prop_map(|(hosts, index)| {
        let mut by: BTreeMap<String, BTreeMap<(usize, u16), V1Host>> = BTreeMap::new();
        for (s, ip, port, rev, az, at) in hosts {
            let az = az.map(|z| ["zone-a", "zone-b"][z]);
            let h = host(SERVICES[s], IPS[ip], port, ["a", "b", "c"][rev], az, at);
            by.entry(SERVICES[s].to_string())
                .or_default()
                .insert((ip, port), h);
        }
        let services = by
            .into_iter()
            .map(|(s, hosts)| {
                let mut hosts: Vec<V1Host> = hosts.into_values().collect();
                hosts.sort_by(host_order);
                (s, hosts)
            })
            .collect();
        Catalog {
            index,
            generated_at_ms: 7,
            warming: false,
            stale: false,
            services,
            signatures: BTreeMap::new(),
        }
    })
}

/// The delta answer that takes `a` to `b`, as the registry would send it.
fn delta(a: &Catalog, b: &Catalog) -> CatalogChanges {
    between(a, b)
}

/// `b` as a replica of `a` rebuilds it: a host unchanged but for `last_check_in` keeps the
/// time it had in `a`.
fn expected(a: &Catalog, b: &Catalog) -> Catalog {
    let mut want = b.clone();
    for (service, hosts) in &mut want.services {
        for h in hosts {
            let mut old = a.services.get(service).into_iter().flatten();
            if let Some(o) = old.find(|o| same_host(o, h)) {
                h.last_check_in = o.last_check_in.clone();
            }
        }
    }
    want
}

proptest! {
    #[test]
    fn a_delta_rebuilds_the_target_and_its_digest(a in arb_catalog(), b in arb_catalog()) {
        let d = delta(&a, &b);
        // Through the wire form, as a client receives it.
        let wire = serde_json::to_vec(&d).expect("encodes");
        let d: CatalogChanges = serde_json::from_slice(&wire).expect("decodes");
        let rebuilt = Replica::new(a.clone()).apply(d).expect("applies");
        prop_assert_eq!(rebuilt.catalog(), &expected(&a, &b));
        prop_assert_eq!(rebuilt.digest(), Replica::new(b.clone()).digest());
    }

    #[test]
    fn a_delta_from_another_base_or_with_another_digest_is_refused(
        a in arb_catalog(), b in arb_catalog(), c in arb_catalog(),
    ) {
        let mut d = delta(&a, &b);
        d.from = Some(a.index + 1);
        let wrong_base = Replica::new(a.clone()).apply(d.clone());
        prop_assert!(
            matches!(wrong_base, Err(DeltaError::WrongBase { .. })),
            "wrong base applied"
        );
        d.from = Some(a.index);
        d.digest = "00".repeat(32);
        let wrong_digest = Replica::new(a.clone()).apply(d);
        prop_assert!(
            matches!(wrong_digest, Err(DeltaError::Digest { .. })),
            "wrong digest applied"
        );
        // A delta computed from another catalog, sent with the index we hold: applied to
        // what we hold, it rebuilds something else unless the two agree where it matters.
        let mut stray = delta(&c, &b);
        stray.from = Some(a.index);
        if let Ok(r) = Replica::new(a.clone()).apply(stray) {
            prop_assert_eq!(r.digest(), Replica::new(b.clone()).digest());
        }
    }

    #[test]
    fn an_arbitrary_answer_never_panics(
        a in arb_catalog(), b in arb_catalog(), junk in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut d = delta(&a, &b);
        d.removed.insert("web".into(), vec![HostKey { ip_address: "nonsense".into(), port: 0 }]);
        d.removed_services.push("absent".into());
        d.services.entry("api".into()).or_default().push(b.services.values().flatten().next().cloned().unwrap_or_else(|| host("x", "1.1.1.1", 1, "", None, 0)));
        let _ = Replica::new(a.clone()).apply(d);
        let _ = serde_json::from_slice::<CatalogChanges>(&junk);
    }
}

#[test]
fn the_digest_matches_a_fixed_value() {
    // Pinned so a change to the digest (which other clients implement) is deliberate.
    let mut c = Catalog {
        index: 1,
        generated_at_ms: 0,
        warming: false,
        stale: false,
        services: BTreeMap::new(),
        signatures: BTreeMap::new(),
    };
    assert_eq!(
        Replica::new(c.clone()).digest_hex(),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "an empty catalog is SHA-256 of nothing"
    );
    c.services.insert(
        "web".into(),
        vec![host(
            "web",
            "10.0.0.7",
            8080,
            "abc123",
            Some("us-east-1a"),
            0,
        )],
    );
    // docs/API.md's example: web on 10.0.0.7:8080, revision abc123, az us-east-1a, weight 100.
    assert_eq!(
        Replica::new(c).digest_hex(),
        "9fe34bf6cd908ceeec937795198e1806d89081793c869768e0ab5a32aea2b92c"
    );
}

#[test]
fn a_host_changed_only_in_its_check_in_time_is_not_sent() {
    let a = host("web", "10.0.0.1", 80, "r", None, 1);
    let b = host("web", "10.0.0.1", 80, "r", None, 2);
    let old = BTreeMap::from([("web".to_string(), vec![a])]);
    let new = BTreeMap::from([("web".to_string(), vec![b])]);
    assert_eq!(diff(&old, &new), Changes::default());
}

#[test]
fn shared_services_are_skipped_without_looking() {
    let shared = Arc::new(ServiceHosts::new(
        "web",
        vec![host("web", "10.0.0.1", 80, "r", None, 1)],
    ));
    let old = BTreeMap::from([("web".to_string(), shared.clone())]);
    let new = BTreeMap::from([("web".to_string(), shared)]);
    assert_eq!(diff(&old, &new), Changes::default());
    let gone: BTreeMap<String, Arc<ServiceHosts>> = BTreeMap::new();
    assert_eq!(diff(&old, &gone).removed_services, vec!["web".to_string()]);
}
