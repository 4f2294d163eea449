//! Self-preservation accounting at the registry level (memory store, manual clock, the HTTP
//! routes): what outsiders do to *other* endpoints never lowers the protection of the
//! endpoints already counted in the baseline.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use axum::http::StatusCode;
use discovery::{Clock, RegistryConfig};
use proptest::prelude::*;

use crate::common::Harness;

/// The short timings of the reproduction: 20 s TTL, 5 s check-ins (renewal window 6.25 s,
/// shelf life 15 s).
fn short() -> RegistryConfig {
    RegistryConfig {
        ttl: Duration::from_secs(20),
        check_in_interval: Duration::from_secs(5),
        ..RegistryConfig::default()
    }
}

async fn delete(h: &Harness, service: &str, ip: &str, port: u16) -> StatusCode {
    let uri = format!("/v1/registration/{service}/{ip}?port={port}");
    h.call("DELETE", &uri, &[], "").await.status
}

async fn step(h: &Harness, d: Duration) {
    h.clock.advance(d);
    h.registry.sweep_once().await.expect("sweep");
}

/// The reproduction: 20 hosts check in for 16 s, then their path to the registry breaks.
/// Self-preservation holds them. Then 31 endpoints of another service are registered and
/// deleted one after the other. Each deletion used to lower the expected renewals by one,
/// until protection was off and the 20 hosts vanished.
#[tokio::test]
async fn registering_and_deleting_other_endpoints_keeps_the_preserved_hosts() {
    let h = Harness::with_config(short());
    for _ in 0..4 {
        for i in 0..20 {
            h.register("web", &format!("10.0.0.{i}"), 80).await;
        }
        step(&h, Duration::from_secs(5)).await;
    }
    // Silence: past the renewal window, protection turns on.
    step(&h, Duration::from_secs(3)).await;
    assert!(h.registry.self_preservation_active());
    assert_eq!(h.registry.status().self_preservation.expected_renewals, 20);

    for i in 0..31u8 {
        let ip = format!("10.1.0.{i}");
        h.register("api", &ip, 9000).await;
        step(&h, Duration::from_millis(200)).await;
        assert_eq!(delete(&h, "api", &ip, 9000).await, StatusCode::OK);
        step(&h, Duration::from_millis(200)).await;
        assert!(h.registry.self_preservation_active(), "after api #{i}");
    }
    assert_eq!(h.registry.status().self_preservation.expected_renewals, 20);
    // Well past the TTL of the silent hosts: every one is still served, flagged stale.
    for _ in 0..20 {
        step(&h, Duration::from_secs(2)).await;
    }
    let r = h.get("/v1/registration/web").await;
    assert_eq!(r.hosts().len(), 20);
    assert!(r.stale());
    assert_eq!(h.store.inner.len(), 20, "the sweeper deleted nothing");

    // Deregistering counted hosts still lowers the baseline: scale-down works.
    for i in 0..20 {
        assert_eq!(
            delete(&h, "web", &format!("10.0.0.{i}"), 80).await,
            StatusCode::OK
        );
    }
    step(&h, Duration::from_secs(1)).await;
    assert!(!h.registry.self_preservation_active());
    assert_eq!(h.registry.status().self_preservation.expected_renewals, 0);
}

// ---- random sequences ----------------------------------------------------------------------

const SERVICES: [&str; 3] = ["web", "api", "db"];
/// Endpoints per service in the universe the operations pick from.
const PER_SERVICE: usize = 12;

#[derive(Debug, Clone)]
enum Op {
    /// These registered endpoints check in (a bit mask over the registered ones, in order).
    CheckIn(u64),
    /// Every registered endpoint checks in.
    CheckInAll,
    /// An endpoint of the universe (new, or deregistered before) checks in.
    Register(usize),
    /// The n-th registered endpoint (modulo their number) is deregistered.
    Deregister(usize),
    /// Time passes with no check-in.
    Silence(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let universe = SERVICES.len() * PER_SERVICE;
    prop_oneof![
        2 => any::<u64>().prop_map(Op::CheckIn),
        1 => Just(Op::CheckInAll),
        2 => (0..universe).prop_map(Op::Register),
        2 => any::<usize>().prop_map(Op::Deregister),
        4 => (100u64..=5_000).prop_map(Op::Silence),
    ]
}

fn endpoint(i: usize) -> (&'static str, String, u16) {
    let service = SERVICES[i / PER_SERVICE];
    (
        service,
        format!("10.0.{}.{}", i / PER_SERVICE, i % PER_SERVICE),
        80,
    )
}

/// The rule, stated independently of the registry's code: the baseline is every endpoint
/// that renewed at some count and was not deregistered since; protection should be on
/// while fewer than 85 % of those renewed within the window.
#[derive(Default)]
struct Model {
    /// Registered endpoints → last check-in (ms). Expired ones may already be swept.
    stored: BTreeMap<usize, u64>,
    counted: BTreeSet<usize>,
    /// While protection should be on: the endpoints that were live when it began.
    protected: Option<BTreeSet<usize>>,
}

impl Model {
    fn renewed(&self, now: u64, window: u64) -> BTreeSet<usize> {
        self.stored
            .iter()
            .filter(|&(_, &last)| now.saturating_sub(last) < window)
            .map(|(&i, _)| i)
            .collect()
    }
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let cfg = RegistryConfig {
        // No periodic refresh within a run: the baseline moves only by the rules under test.
        baseline_refresh: Duration::from_secs(24 * 3600),
        ..short()
    };
    let (ttl, window) = (20_000u64, 6_250u64);
    let h = Harness::with_config(cfg);
    let mut m = Model::default();
    // A fleet to protect, renewing for a while.
    for _ in 0..3 {
        for i in 0..PER_SERVICE {
            let (s, ip, port) = endpoint(i);
            h.register(s, &ip, port).await;
            m.stored.insert(i, h.clock.now_ms());
        }
        step(&h, Duration::from_secs(4)).await;
        let now = h.clock.now_ms();
        m.counted.extend(m.renewed(now, window));
    }
    for (n, op) in ops.into_iter().enumerate() {
        let registered: Vec<usize> = m.stored.keys().copied().collect();
        let check_in = |h: &Harness, m: &mut Model, i: usize| {
            m.stored.insert(i, h.clock.now_ms());
            i
        };
        match op {
            Op::CheckIn(mask) => {
                for (bit, &i) in registered.iter().enumerate() {
                    if mask >> (bit % 64) & 1 == 1 {
                        let (s, ip, port) = endpoint(check_in(&h, &mut m, i));
                        h.register(s, &ip, port).await;
                    }
                }
            }
            Op::CheckInAll => {
                for &i in &registered {
                    let (s, ip, port) = endpoint(check_in(&h, &mut m, i));
                    h.register(s, &ip, port).await;
                }
            }
            Op::Register(i) => {
                let (s, ip, port) = endpoint(check_in(&h, &mut m, i));
                h.register(s, &ip, port).await;
            }
            Op::Deregister(k) => {
                if !registered.is_empty() {
                    let i = registered[k % registered.len()];
                    let (s, ip, port) = endpoint(i);
                    let status = delete(&h, s, &ip, port).await;
                    let last = m.stored.remove(&i).unwrap_or_default();
                    // 404: the sweeper already deleted it, which it may do only once it
                    // had expired (the model does not track sweeps).
                    prop_assert!(
                        status == StatusCode::OK
                            || (status == StatusCode::NOT_FOUND && h.clock.now_ms() - last >= ttl),
                        "deregistering {} {}: {}",
                        s,
                        ip,
                        status
                    );
                    m.counted.remove(&i);
                    if let Some(p) = &mut m.protected {
                        p.remove(&i);
                    }
                }
            }
            Op::Silence(ms) => h.clock.advance(Duration::from_millis(ms)),
        }
        // The sweeper runs between operations (well within the shelf life).
        h.clock.advance(Duration::from_millis(50));
        h.registry.sweep_once().await.expect("sweep");
        let now = h.clock.now_ms();
        let renewed = m.renewed(now, window);
        m.counted.extend(renewed.iter().copied());
        let should_protect =
            !m.counted.is_empty() && (renewed.len() as f64) < 0.85 * m.counted.len() as f64;
        if !should_protect {
            m.protected = None;
            continue;
        }
        let protected = m.protected.get_or_insert_with(|| {
            m.stored
                .iter()
                .filter(|&(_, &last)| now.saturating_sub(last) < ttl)
                .map(|(&i, _)| i)
                .collect()
        });
        let view = h.registry.read_catalog().await.expect("catalog");
        let visible: BTreeSet<(String, String)> = view
            .data
            .rows
            .iter()
            .map(|r| (r.endpoint.service.to_string(), r.endpoint.ip.to_string()))
            .collect();
        for &i in protected.iter() {
            let (s, ip, _) = endpoint(i);
            prop_assert!(
                visible.contains(&(s.to_string(), ip.clone())),
                "step {}: {} {} expired while {} of {} counted endpoints renewed",
                n,
                s,
                ip,
                renewed.len(),
                m.counted.len()
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// While renewals stay below the threshold, no endpoint that was live when protection
    /// began is filtered out, whatever is registered, renewed or deleted meanwhile.
    #[test]
    fn nothing_live_at_the_start_of_protection_expires_while_it_should_hold(
        ops in proptest::collection::vec(op(), 1..80)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run(ops))?;
    }
}
