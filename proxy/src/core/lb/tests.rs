//! Distribution tests for the balancers: seeded RNG, no sockets, statistical bounds wide
//! enough to hold for any seed in practice (several standard deviations).

use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::*;

const SEED: u64 = 0x7d1_d165;

fn rng() -> SmallRng {
    SmallRng::seed_from_u64(SEED)
}

fn hosts(weights: &[u32]) -> Vec<LbHost> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| LbHost {
            key: format!("10.0.0.{i}:80").into(),
            weight: w,
            active: 0,
            zone: None,
        })
        .collect()
}

fn count(b: &mut Balancer, hs: &[LbHost], n: usize, rng: &mut SmallRng) -> Vec<usize> {
    let mut c = vec![0; hs.len()];
    for _ in 0..n {
        c[b.pick(hs, false, None, rng).expect("a host")] += 1;
    }
    c
}

fn assert_share(got: usize, n: usize, expected: f64, tol: f64) {
    let share = got as f64 / n as f64;
    assert!(
        (share - expected).abs() <= tol,
        "share {share:.4} expected {expected:.4}±{tol} (seed {SEED})"
    );
}

#[test]
fn round_robin_equal_weights_rotates() {
    let mut r = rng();
    let mut rr = wrr::RoundRobin::new(&[1, 1, 1], &mut r);
    let first = rr.pick().expect("pick");
    let seq: Vec<usize> = (0..6).map(|_| rr.pick().expect("pick")).collect();
    let expect: Vec<usize> = (1..7).map(|k| (first + k) % 3).collect();
    assert_eq!(seq, expect);
}

#[test]
fn round_robin_weighted_edf_is_exact_over_a_period() {
    let mut r = rng();
    let mut b = Balancer::new(LbPolicy::RoundRobin, None);
    let hs = hosts(&[1, 2, 3]);
    assert_eq!(count(&mut b, &hs, 600, &mut r), vec![100, 200, 300]);
}

#[test]
fn round_robin_weighted_interleaves() {
    let mut rr = wrr::RoundRobin::new(&[1, 3], &mut rng());
    let seq: Vec<usize> = (0..8).map(|_| rr.pick().expect("pick")).collect();
    // Deadlines: host1 at 1/3, 2/3, 1 ...; host0 at 1, 2: the light host never gets two in a row.
    assert_eq!(seq.iter().filter(|&&i| i == 0).count(), 2);
    assert!(seq.windows(2).all(|w| !(w[0] == 0 && w[1] == 0)), "{seq:?}");
}

#[test]
fn round_robin_empty_is_none() {
    let mut b = Balancer::new(LbPolicy::RoundRobin, None);
    assert_eq!(b.pick(&[], false, None, &mut rng()), None);
}

#[test]
fn random_follows_weights() {
    let mut r = rng();
    let mut b = Balancer::new(LbPolicy::Random, None);
    let hs = hosts(&[1, 3]);
    let c = count(&mut b, &hs, 40_000, &mut r);
    assert_share(c[0], 40_000, 0.25, 0.015);
}

#[test]
fn random_equal_weights_is_uniform() {
    let mut r = rng();
    let mut b = Balancer::new(LbPolicy::Random, None);
    let hs = hosts(&[5, 5, 5, 5]);
    let c = count(&mut b, &hs, 40_000, &mut r);
    for &n in &c {
        assert_share(n, 40_000, 0.25, 0.015);
    }
}

#[test]
fn p2c_picks_two_distinct_hosts_and_the_less_loaded() {
    let mut r = rng();
    // Host 0 idle, others busy: host 0 wins whenever it is one of the two (P = 1/2 with 4 hosts).
    let active = [0, 10, 10, 10];
    let n = 40_000;
    let wins = (0..n)
        .filter(|_| least_request::p2c(&active, &mut r) == Some(0))
        .count();
    assert_share(wins, n, 0.5, 0.015);
    // Two hosts: the idle one always wins, because the two draws are distinct.
    assert!((0..1000).all(|_| least_request::p2c(&[5, 0], &mut r) == Some(1)));
}

#[test]
fn p2c_busiest_host_never_chosen_when_others_exist() {
    let mut r = rng();
    let active = [1, 2, 100];
    assert!((0..5_000).all(|_| least_request::p2c(&active, &mut r) != Some(2)));
}

#[test]
fn least_request_effective_weight_matches_envoy_example() {
    // Weight 2 with 4 active requests: 2 / (4 + 1) = 0.4.
    assert!((least_request::effective_weight(2, 4, 1.0) - 0.4).abs() < 1e-12);
    // Bias 0 degenerates to weighted round robin.
    assert!((least_request::effective_weight(2, 4, 0.0) - 2.0).abs() < 1e-12);
}

#[test]
fn weighted_least_request_idle_follows_weights() {
    let mut r = rng();
    let mut b = Balancer::new(LbPolicy::LeastRequest, None);
    let hs = hosts(&[1, 3]);
    let c = count(&mut b, &hs, 4_000, &mut r);
    assert_share(c[1], 4_000, 0.75, 0.01);
}

#[test]
fn weighted_least_request_shifts_away_from_busy_host() {
    let mut r = rng();
    let mut b = Balancer::new(LbPolicy::LeastRequest, None);
    let mut hs = hosts(&[2, 1]);
    hs[0].active = 9; // effective 2/10 = 0.2 vs 1/1 = 1.0
    let c = count(&mut b, &hs, 6_000, &mut r);
    assert_share(c[1], 6_000, 1.0 / 1.2, 0.02);
}

#[test]
fn ring_hash_is_sized_and_follows_weights() {
    let keyed: Vec<(String, u32)> = vec![("a:1".into(), 1), ("b:1".into(), 3)];
    let ring = ring_hash::Ring::build(&keyed, 1024, ring_hash::MAX_RING_SIZE);
    // Scale = ceil(0.25 × 1024) / 0.25 = 1024 points, 256 of them for the light host.
    assert_eq!(ring.len(), 1024);
    let mut r = rng();
    let mut c = [0usize; 2];
    for _ in 0..40_000 {
        c[ring.pick(rand::RngExt::random(&mut r)).expect("pick")] += 1;
    }
    assert_share(c[1], 40_000, 0.75, 0.04);
}

#[test]
fn ring_hash_is_consistent_when_a_host_leaves() {
    let keys: Vec<(String, u32)> = (0..10).map(|i| (format!("10.0.0.{i}:80"), 1)).collect();
    let full = ring_hash::Ring::build(&keys, 1 << 14, ring_hash::MAX_RING_SIZE);
    let less = ring_hash::Ring::build(&keys[..9], 1 << 14, ring_hash::MAX_RING_SIZE);
    let mut r = rng();
    let (mut moved, mut between_survivors, n) = (0, 0, 20_000);
    for _ in 0..n {
        let h: u64 = rand::RngExt::random(&mut r);
        let (a, b) = (full.pick(h).expect("pick"), less.pick(h).expect("pick"));
        if a != b {
            moved += 1;
            if a != 9 {
                between_survivors += 1;
            }
        }
    }
    // The departed host's 1/N moves, plus about as many again: Envoy's sizing keeps the ring's
    // total constant, so each survivor gains points. Modulo hashing would move 90 %.
    assert!(moved < n / 4, "moved {moved} of {n}");
    assert!(between_survivors < n * 3 / 20, "{between_survivors}");
}

#[test]
fn ring_hash_same_hash_same_host() {
    let mut b = Balancer::new(LbPolicy::RingHash, None);
    let hs = hosts(&[1, 1, 1, 1]);
    let mut r = rng();
    let first = b.pick(&hs, false, Some(42), &mut r);
    assert!((0..100).all(|_| b.pick(&hs, false, Some(42), &mut r) == first));
}

#[test]
fn maglev_weights_match_envoy_vector() {
    let keyed: Vec<(String, u32)> = vec![("a:1".into(), 1), ("b:1".into(), 2)];
    let m = maglev::Maglev::build(&keyed, maglev::TABLE_SIZE);
    assert_eq!(m.counts(2), vec![21_846, 43_691]);
}

#[test]
fn maglev_equal_weights_are_balanced_and_every_host_has_slots() {
    let keyed: Vec<(String, u32)> = (0..7).map(|i| (format!("10.0.0.{i}:80"), 1)).collect();
    let m = maglev::Maglev::build(&keyed, maglev::TABLE_SIZE);
    let counts = m.counts(7);
    let (lo, hi) = (
        counts.iter().min().copied().unwrap_or(0),
        counts.iter().max().copied().unwrap_or(0),
    );
    assert!(hi - lo <= 1, "{counts:?}");
}

#[test]
fn maglev_is_mostly_stable_when_a_host_leaves() {
    let keys: Vec<(String, u32)> = (0..10).map(|i| (format!("10.0.0.{i}:80"), 1)).collect();
    let full = maglev::Maglev::build(&keys, maglev::TABLE_SIZE);
    let less = maglev::Maglev::build(&keys[..9], maglev::TABLE_SIZE);
    let mut r = rng();
    let (mut moved_survivors, n) = (0, 20_000);
    for _ in 0..n {
        let h: u64 = rand::RngExt::random(&mut r);
        let (a, b) = (full.pick(h).expect("pick"), less.pick(h).expect("pick"));
        if a != 9 && a != b {
            moved_survivors += 1;
        }
    }
    // Maglev moves a few more keys than a ring (docs: about twice), but far from a reshuffle.
    assert!(moved_survivors < n / 10, "{moved_survivors}");
}

#[test]
fn zone_plan_matches_envoy_vector() {
    // local 40/40/20, upstream 25/50/25 => 62.5 % local; residual capacity 2:1 to zones 1:2.
    let plan = zone::plan(&[4, 4, 2], &[5, 10, 5], 6);
    let ZonePlan::Residual {
        local_percent,
        residual_cum,
    } = plan.clone()
    else {
        panic!("{plan:?}")
    };
    assert_eq!(local_percent, 6250);
    assert_eq!(residual_cum, vec![0, 1000, 1500]);
    let mut r = rng();
    let mut c = [0usize; 3];
    let n = 40_000;
    for _ in 0..n {
        c[zone::pick_zone(&plan, &mut r).expect("zone")] += 1;
    }
    assert_share(c[0], n, 0.625, 0.015);
    let remote = (c[1] + c[2]) as f64;
    assert!((c[1] as f64 / remote - 2.0 / 3.0).abs() < 0.02, "{c:?}");
}

#[test]
fn zone_plan_direct_when_local_has_capacity() {
    assert_eq!(zone::plan(&[1, 1], &[5, 3], 6), ZonePlan::Direct);
}

#[test]
fn zone_plan_all_zones_on_failure_or_small_cluster() {
    assert_eq!(zone::plan(&[1, 1], &[0, 8], 6), ZonePlan::AllZones);
    assert_eq!(zone::plan(&[1, 1], &[2, 2], 6), ZonePlan::AllZones);
    assert_eq!(zone::plan(&[1], &[8], 6), ZonePlan::AllZones);
    assert_eq!(zone::plan(&[1, 1, 1], &[4, 4], 6), ZonePlan::AllZones);
}

fn zoned(spec: &[(&str, usize)]) -> Vec<LbHost> {
    let mut out = Vec::new();
    for (z, n) in spec {
        for i in 0..*n {
            out.push(LbHost {
                key: format!("{z}-{i}:80").into(),
                weight: 1,
                active: 0,
                zone: Some((*z).into()),
            });
        }
    }
    out
}

#[test]
fn balancer_prefers_local_zone_with_capacity() {
    let hs = zoned(&[("a", 4), ("b", 4)]);
    let mut b = Balancer::new(LbPolicy::RoundRobin, Some("a".into()));
    let mut r = rng();
    for _ in 0..1000 {
        let i = b.pick(&hs, false, None, &mut r).expect("pick");
        assert_eq!(hs[i].zone.as_deref(), Some("a"));
    }
}

#[test]
fn balancer_overflows_in_proportion_to_capacity() {
    // Local zone holds 2 of 10 hosts while proxies are assumed even over 2 zones:
    // local share 2000 vs 5000 => 40 % stays local.
    let hs = zoned(&[("a", 2), ("b", 8)]);
    let mut b = Balancer::new(LbPolicy::Random, Some("a".into()));
    let mut r = rng();
    let n = 20_000;
    let local = (0..n)
        .filter(|_| {
            hs[b.pick(&hs, false, None, &mut r).expect("pick")]
                .zone
                .as_deref()
                == Some("a")
        })
        .count();
    assert_share(local, n, 0.4, 0.02);
}

#[test]
fn balancer_uses_all_zones_in_panic_or_when_local_is_empty() {
    let mut r = rng();
    let hs = zoned(&[("b", 4), ("c", 4)]);
    let mut b = Balancer::new(LbPolicy::RoundRobin, Some("a".into()));
    let c = count(&mut b, &hs, 800, &mut r);
    assert!(c.iter().all(|&n| n == 100), "{c:?}");
    let hs = zoned(&[("a", 4), ("b", 4)]);
    let mut b = Balancer::new(LbPolicy::RoundRobin, Some("a".into()));
    let remote = (0..800)
        .filter(|_| {
            hs[b.pick(&hs, true, None, &mut r).expect("pick")]
                .zone
                .as_deref()
                == Some("b")
        })
        .count();
    assert_eq!(remote, 400);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_policy_picks_a_valid_index(weights in proptest::collection::vec(1u32..=100, 1..12), seed: u64, hash: u64) {
            let hs = hosts(&weights);
            let mut r = SmallRng::seed_from_u64(seed);
            for policy in [LbPolicy::RoundRobin, LbPolicy::LeastRequest, LbPolicy::Random, LbPolicy::RingHash] {
                let mut b = Balancer::new(policy, None);
                for _ in 0..20 {
                    let i = b.pick(&hs, false, Some(hash), &mut r).expect("pick");
                    prop_assert!(i < hs.len());
                }
            }
        }
    }
}
