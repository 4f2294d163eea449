use std::collections::BTreeMap;

use discovery::delta;
use proptest::prelude::*;
use schema::api::{Catalog, V1Host};
use serde_json::{Map, Value};

use super::*;

// Canonical addresses, and two the agent cannot rebuild exactly: an IPv6 address written
// uncompressed (valid, but its canonical text differs) and one that does not parse.
const IPS: [&str; 6] = [
    "10.0.0.1",
    "10.0.0.2",
    "::1",
    "fe80::2",
    "0:0:0:0:0:0:0:5",
    "10.0.0.300",
];
const SERVICES: [&str; 4] = ["api", "db", "tidings-agent", "Bad Name"];

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
            .map(|(s, hosts)| (s, hosts.into_values().collect()))
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

/// What a snapshot of each service lists, converted straight from the wire form.
fn listed_from_wire(c: &Catalog) -> (BTreeMap<ServiceName, Vec<SnapshotEntry>>, usize) {
    let mut invalid = 0;
    let mut out = BTreeMap::new();
    for (name, hosts) in c.services.iter().filter(|(_, h)| !h.is_empty()) {
        let Ok(service) = ServiceName::new(name.clone()) else {
            invalid += hosts.len();
            continue;
        };
        let mut entries = Vec::new();
        for h in hosts {
            match h.to_endpoint() {
                Ok((endpoint, last_check_in_ms)) if endpoint.service == service => {
                    entries.push(SnapshotEntry {
                        endpoint: Arc::new(endpoint),
                        last_check_in_ms,
                    });
                }
                _ => invalid += 1,
            }
        }
        entries.sort_by_key(|e| e.endpoint.key());
        out.insert(service, entries);
    }
    (out, invalid)
}

proptest! {
    /// The compact replica is the wire-form one: the same digests (so it applies every delta
    /// the registry sends) and the same listing, through any delta — hosts it cannot rebuild
    /// exactly included.
    #[test]
    fn the_compact_replica_follows_the_registry_as_the_wire_form_does(
        a in arb_catalog(),
        b in arb_catalog(),
    ) {
        let wire_a = delta::Replica::new(a.clone());
        let compact = Replica::from(a.clone());
        prop_assert_eq!(compact.digest_hex(), wire_a.digest_hex());
        let d = delta::between(&a, &b);
        let rebuilt_wire = wire_a.apply(d.clone()).expect("the wire form applies it");
        // Through the wire, as the agent receives it: the answer parsed straight into the
        // compact form.
        let json = serde_json::to_vec(&d).expect("encodes");
        let answer: Answer = serde_json::from_slice(&json).expect("decodes");
        let rebuilt = compact.apply(answer).expect("the compact form applies it");
        prop_assert_eq!(rebuilt.digest_hex(), rebuilt_wire.digest_hex());
        prop_assert_eq!(rebuilt.index, b.index);
        prop_assert_eq!(rebuilt.listed(|_| true), listed_from_wire(rebuilt_wire.catalog()));
    }

    /// A delta whose digest does not match what it rebuilds is refused.
    #[test]
    fn a_delta_rebuilding_something_else_is_refused(a in arb_catalog(), b in arb_catalog()) {
        let mut d = delta::between(&a, &b);
        d.digest = "00".repeat(32);
        let refused = matches!(Replica::from(a).apply(Answer::from(d)), Err(DeltaError::Digest { .. }));
        prop_assert!(refused);
    }
}

/// A whole answer parsed straight into the compact form is the catalog it lists, with the
/// registry's digest.
#[test]
fn a_whole_answer_parses_into_the_catalog_it_lists() {
    let c = Catalog {
        index: 4,
        generated_at_ms: 9,
        warming: false,
        stale: false,
        services: [(
            "api".to_string(),
            vec![
                host("api", "10.0.0.2", 80, "a", Some("zone-a"), 3),
                host("api", "0:0:0:0:0:0:0:5", 81, "b", None, 4),
            ],
        )]
        .into(),
        signatures: BTreeMap::new(),
    };
    let json = serde_json::json!({
        "index": 4, "generated_at_ms": 9, "warming": false, "stale": false,
        "digest": delta::Replica::new(c.clone()).digest_hex(),
        "services": c.services,
    });
    let answer: Answer = serde_json::from_value(json).expect("decodes");
    assert!(answer.full, "absent means a whole catalog");
    let digest = answer.digest.clone();
    let replica = Replica::whole(answer);
    assert_eq!(replica.digest_hex(), digest);
    assert_eq!(replica.listed(|_| true), listed_from_wire(&c));
}
