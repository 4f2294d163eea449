//! The protocol state against model clients, under random catalogs and subscriptions: after
//! every response due has been taken and acknowledged, a client holds the catalog's version
//! of everything it subscribes to (and, where the protocol says the server announces
//! removals, nothing else), and no response resends a version the client already holds.
//! The catalogs follow each other as the agent's do (`seq`, changed names, shared maps), with
//! more names than one response may carry, so the pieces and the caught-up shortcut are run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::*;

const LIMITS: Limits = Limits { max_names: 10_000 };

#[derive(Debug, Clone)]
enum Op {
    /// The next catalog: (name index, new version or gone).
    Change(Vec<(usize, Option<u8>)>),
    /// A kind's subscription: wildcard, or the names whose index is in the set.
    Subscribe(usize, bool, BTreeSet<usize>),
    /// The client takes up to this many responses (acknowledging each).
    Take(usize),
}

fn ops(universe: usize) -> impl Strategy<Value = Vec<Op>> {
    let change = proptest::collection::vec((0..universe, proptest::option::of(0u8..4)), 1..12)
        .prop_map(Op::Change);
    let bulk = proptest::collection::vec(proptest::option::weighted(0.9, 0u8..2), universe)
        .prop_map(|vs| Op::Change(vs.into_iter().enumerate().collect()));
    let names = proptest::collection::btree_set(0..universe, 0..universe.min(40));
    let sub = (0usize..4, any::<bool>(), names).prop_map(|(k, w, n)| Op::Subscribe(k, w, n));
    let take = (1usize..4).prop_map(Op::Take);
    proptest::collection::vec(
        prop_oneof![3 => change, 2 => bulk, 2 => sub, 3 => take],
        1..40,
    )
}

fn name(i: usize) -> String {
    format!("s{i:03}")
}

/// Placeholder bodies are `name@version`.
fn parse(body: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(body);
    let (n, v) = text.split_once('@').expect("placeholder body");
    (n.to_string(), v.to_string())
}

/// A client's view of one type.
#[derive(Debug, Default, Clone)]
struct Sub {
    wildcard: bool,
    names: BTreeSet<String>,
    held: BTreeMap<String, String>,
    /// State of the world, routes and endpoints: names held that some catalog since lacked.
    /// The server does not announce their removal and may send them again.
    lapsed: BTreeSet<String>,
}

impl Sub {
    fn wants(&self, n: &str) -> bool {
        self.wildcard || self.names.contains(n)
    }
}

/// Runs `ops` on a server state and a model client; `delta` picks the variant.
fn run(ops: &[Op], delta: bool) -> Result<(), TestCaseError> {
    let mut services: BTreeMap<String, String> = BTreeMap::new();
    let mut catalog = Arc::new(Catalog::default());
    let mut server = StreamState::new(LIMITS, catalog.clone());
    let mut subs: [Option<Sub>; 4] = Default::default();
    let mut last_nonce: [String; 4] = Default::default();
    for op in ops.iter().chain(std::iter::once(&Op::Take(usize::MAX))) {
        match op {
            Op::Change(changes) => {
                for (i, v) in changes {
                    match v {
                        Some(v) => services.insert(name(*i), format!("v{v}")),
                        None => services.remove(&name(*i)),
                    };
                }
                catalog = Arc::new(Catalog::derive(&catalog, &services));
                for sub in subs.iter_mut().flatten() {
                    let gone = sub.held.keys().filter(|n| !services.contains_key(*n));
                    sub.lapsed.extend(gone.cloned());
                }
                server.set_catalog(catalog.clone());
            }
            Op::Subscribe(k, wildcard, idx) => {
                let kind = Kind::ALL[*k];
                let names: BTreeSet<String> = idx.iter().map(|i| name(*i)).collect();
                let first = subs[*k].is_none();
                let sub = subs[*k].get_or_insert_with(Sub::default);
                // An empty first subscription to listeners or clusters is every resource.
                let legacy = names.is_empty() && kind.wildcard_by_default();
                if delta {
                    let add: Vec<String> = names.difference(&sub.names).cloned().collect();
                    let drop: Vec<String> = sub.names.difference(&names).cloned().collect();
                    let mut req = DeltaDiscoveryRequest {
                        type_url: kind.type_url().into(),
                        resource_names_subscribe: add,
                        resource_names_unsubscribe: drop.clone(),
                        response_nonce: last_nonce[*k].clone(),
                        ..Default::default()
                    };
                    if *wildcard != sub.wildcard {
                        let w = WILDCARD.to_string();
                        if *wildcard {
                            req.resource_names_subscribe.push(w);
                        } else {
                            req.resource_names_unsubscribe.push(w);
                        }
                    }
                    server
                        .on_delta(&req)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let stays = !first && sub.wildcard;
                    let w = if *wildcard == sub.wildcard {
                        stays || (first && req.resource_names_subscribe.is_empty() && legacy)
                    } else {
                        *wildcard
                    };
                    // The client forgets what it unsubscribes from.
                    for n in &drop {
                        sub.held.remove(n);
                    }
                    if !w {
                        let explicit = &names;
                        sub.held.retain(|n, _| explicit.contains(n));
                    }
                    sub.wildcard = w;
                } else {
                    let mut resource_names: Vec<String> = names.iter().cloned().collect();
                    if *wildcard {
                        resource_names.push(WILDCARD.into());
                    }
                    let req = DiscoveryRequest {
                        type_url: kind.type_url().into(),
                        resource_names,
                        response_nonce: last_nonce[*k].clone(),
                        ..Default::default()
                    };
                    server
                        .on_sotw(&req)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let w = *wildcard || (legacy && (first || sub.wildcard));
                    sub.held.retain(|n, _| w || names.contains(n));
                    sub.wildcard = w;
                }
                sub.names = names;
            }
            Op::Take(n) => {
                for _ in 0..*n {
                    if delta {
                        let Some(r) = server.next_delta() else { break };
                        take_delta(&r, &mut subs, &mut last_nonce)?;
                        let ack = DeltaDiscoveryRequest {
                            type_url: r.type_url.clone(),
                            response_nonce: r.nonce.clone(),
                            ..Default::default()
                        };
                        let got = server.on_delta(&ack);
                        prop_assert!(matches!(got, Ok(Received::Ack(_))), "{:?}", got);
                    } else {
                        let Some(r) = server.next_sotw() else { break };
                        take_sotw(&r, &mut subs, &mut last_nonce)?;
                        let kind = Kind::of_type_url(&r.type_url).expect("known type");
                        let sub = subs[kind as usize].as_ref().expect("subscribed");
                        // An ACK repeats the subscription.
                        let mut resource_names: Vec<String> = sub.names.iter().cloned().collect();
                        if sub.wildcard
                            && !(resource_names.is_empty() && kind.wildcard_by_default())
                        {
                            resource_names.push(WILDCARD.into());
                        }
                        let ack = DiscoveryRequest {
                            type_url: r.type_url.clone(),
                            resource_names,
                            version_info: r.version_info.clone(),
                            response_nonce: r.nonce.clone(),
                            ..Default::default()
                        };
                        let got = server.on_sotw(&ack);
                        prop_assert!(matches!(got, Ok(Received::Ack(_))), "{:?}", got);
                    }
                }
            }
        }
    }
    // Everything due was taken: the client holds the catalog.
    for (k, sub) in subs.iter().enumerate() {
        let Some(sub) = sub else { continue };
        let kind = Kind::ALL[k];
        let all = catalog.all(kind);
        for (n, r) in all.iter().filter(|(n, _)| sub.wants(n)) {
            prop_assert_eq!(sub.held.get(&**n), Some(&r.version), "{:?} {}", kind, n);
        }
        let announced = delta || matches!(kind, Kind::Listener | Kind::Cluster);
        if announced {
            for n in sub.held.keys() {
                prop_assert!(all.contains_key(n.as_str()), "{:?} {} is gone", kind, n);
            }
        }
    }
    Ok(())
}

fn take_sotw(
    r: &DiscoveryResponse,
    subs: &mut [Option<Sub>; 4],
    nonces: &mut [String; 4],
) -> Result<(), TestCaseError> {
    let kind = Kind::of_type_url(&r.type_url).expect("known type");
    let sub = subs[kind as usize].get_or_insert_with(Sub::default);
    let got: Vec<(String, String)> = r.resources.iter().map(|a| parse(&a.value)).collect();
    if matches!(kind, Kind::Listener | Kind::Cluster) {
        sub.held = got.into_iter().collect();
    } else {
        for (n, v) in got {
            if !sub.lapsed.remove(&n) {
                prop_assert_ne!(
                    sub.held.get(&n),
                    Some(&v),
                    "{} resent at the same version",
                    n
                );
            }
            sub.held.insert(n, v);
        }
    }
    nonces[kind as usize].clone_from(&r.nonce);
    Ok(())
}

fn take_delta(
    r: &DeltaDiscoveryResponse,
    subs: &mut [Option<Sub>; 4],
    nonces: &mut [String; 4],
) -> Result<(), TestCaseError> {
    let kind = Kind::of_type_url(&r.type_url).expect("known type");
    let sub = subs[kind as usize].get_or_insert_with(Sub::default);
    for res in &r.resources {
        let (n, v) = parse(&res.resource.as_ref().expect("a body").value);
        prop_assert_eq!(&res.version, &v);
        prop_assert_ne!(
            sub.held.get(&n),
            Some(&v),
            "{} resent at the same version",
            n
        );
        sub.held.insert(n, v);
    }
    for n in &r.removed_resources {
        prop_assert!(sub.held.remove(n).is_some(), "{} removed but not held", n);
    }
    nonces[kind as usize].clone_from(&r.nonce);
    Ok(())
}

fn check(delta: bool) {
    let mut runner = TestRunner::new(Config {
        cases: 256,
        ..Config::default()
    });
    let cases =
        prop_oneof![Just(6usize), Just(MAX_PER_RESPONSE + 30)].prop_flat_map(|u| (Just(u), ops(u)));
    runner
        .run(&cases, |(_, ops)| run(&ops, delta))
        .expect("a client converges on the catalog without resends");
}

#[test]
fn state_of_the_world_clients_converge_without_resends() {
    check(false);
}

#[test]
fn incremental_clients_converge_without_resends() {
    check(true);
}
