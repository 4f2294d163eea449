use std::collections::BTreeSet;
use std::net::IpAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use schema::{Endpoint, EndpointKey, ServiceName, Weight};

use super::*;

fn row(port: u16, last: u64) -> StoredEndpoint {
    let ep = Endpoint::new(
        ServiceName::new("web").expect("name"),
        "10.0.0.1".parse::<IpAddr>().expect("ip"),
        NonZeroU16::new(port).expect("port"),
    );
    StoredEndpoint {
        endpoint: ep,
        last_check_in_ms: last,
        weight_override: None,
    }
}

const TTL: Duration = Duration::from_secs(180);

#[test]
fn live_strictly_inside_the_ttl() {
    assert!(is_live(1_000_000, 1_000_000, TTL));
    assert!(is_live(180_000 + 999, 1_000, TTL));
    assert!(!is_live(181_000, 1_000, TTL), "exactly ttl old is expired");
    assert!(!is_live(1_000_000, 0, TTL));
    assert!(is_live(0, 5_000, TTL), "a future stamp counts as now");
}

#[test]
fn visible_filters_unless_preserving_and_sorts() {
    let rows = vec![row(2, 0), row(1, 100_000), row(3, 200_000)];
    let now = 250_000;
    let seen: Vec<u16> = visible(rows.clone(), now, TTL, false)
        .iter()
        .map(|r| r.endpoint.port.get())
        .collect();
    assert_eq!(seen, vec![1, 3]);
    let seen: Vec<u16> = visible(rows.clone(), now, TTL, true)
        .iter()
        .map(|r| r.endpoint.port.get())
        .collect();
    assert_eq!(seen, vec![1, 2, 3]);
    assert_eq!(next_expiry_ms(&rows, TTL), Some(180_000));
}

#[test]
fn visible_shared_keeps_live_lists_as_they_are() {
    let now = 250_000;
    let live: ServiceRows = vec![row(1, 100_000), row(3, 200_000)].into();
    let mixed: ServiceRows = vec![row(1, 0), row(2, 200_000)].into();
    let dead: ServiceRows = vec![row(4, 0)].into();
    let out = visible_shared(
        vec![live.clone(), mixed.clone(), dead.clone()],
        now,
        TTL,
        false,
    );
    assert_eq!(out.len(), 2, "a list left empty is dropped");
    assert!(
        ServiceRows::ptr_eq(&out[0], &live),
        "an all-live list is shared, not copied"
    );
    let ports: Vec<u16> = out[1].iter().map(|r| r.endpoint.port.get()).collect();
    assert_eq!(ports, vec![2]);
    let kept = visible_shared(vec![live.clone(), mixed, dead], now, TTL, true);
    assert_eq!(kept.len(), 3, "self-preservation shows every row");
}

fn cfg() -> RegistryConfig {
    RegistryConfig::default()
}

fn key(service: &str, i: u32) -> EndpointKey {
    EndpointKey {
        service: ServiceName::new(service).expect("name"),
        ip: IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
        port: NonZeroU16::new(80).expect("port"),
    }
}

fn keys(service: &str, range: std::ops::Range<u32>) -> BTreeSet<EndpointKey> {
    range.map(|i| key(service, i)).collect()
}

/// A count in which exactly `renewed` renewed.
fn fleet(renewed: BTreeSet<EndpointKey>) -> Fleet {
    let n = renewed.len() as u64;
    Fleet {
        census: Census {
            live: n,
            renewed: n,
            stored: n,
        },
        renewed,
    }
}

/// `n` web endpoints renewed.
fn census(n: u32) -> Fleet {
    fleet(keys("web", 0..n))
}

fn observe(p: &mut Preservation, f: &Fleet, now: u64) -> bool {
    let t = p.ticket();
    p.observe(f, t, now)
}

fn dereg(service: &str, i: u32) -> Deregistration {
    let k = key(service, i);
    Deregistration {
        service: k.service,
        ip: k.ip,
        port: None,
    }
}

#[test]
fn preservation_turns_on_below_85_percent_and_recovers() {
    let mut p = Preservation::new(&cfg(), 0, BTreeSet::new());
    assert!(!observe(&mut p, &census(100), 1_000));
    assert_eq!(p.baseline(), 100);
    assert!(!observe(&mut p, &census(86), 2_000), "86 % is fine");
    assert!(observe(&mut p, &census(84), 3_000), "84 % turns it on");
    assert!(p.active());
    assert!(
        !observe(&mut p, &census(0), 4_000),
        "total collapse stays on"
    );
    assert!(p.active());
    assert!(observe(&mut p, &census(90), 5_000), "recovery turns it off");
    assert!(!p.active());
}

#[test]
fn collapse_never_lowers_the_baseline_but_gradual_scale_down_is_absorbed() {
    let refresh = cfg().baseline_refresh.as_millis() as u64;
    let mut p = Preservation::new(&cfg(), 0, BTreeSet::new());
    observe(&mut p, &census(100), 0);
    // A collapse that outlasts several refresh periods: the baseline holds.
    for i in 1..5 {
        observe(&mut p, &census(10), i * refresh);
        assert_eq!(p.baseline(), 100);
        assert!(p.active());
    }
    // Gradual scale-down, 10 % per refresh period: absorbed each time, never preserving.
    let mut p = Preservation::new(&cfg(), 0, BTreeSet::new());
    let mut n = 100u32;
    observe(&mut p, &census(n), 0);
    for i in 1..10 {
        n = n * 9 / 10;
        assert!(!observe(&mut p, &census(n), i * refresh) || !p.active());
        assert!(!p.active(), "step {i}: {n} of {}", p.baseline());
        assert_eq!(p.baseline(), u64::from(n));
    }
}

#[test]
fn deregistration_lowers_the_baseline_at_once() {
    let mut p = Preservation::new(&cfg(), 0, BTreeSet::new());
    observe(&mut p, &census(100), 0);
    for i in 50..100 {
        assert_eq!(p.on_deregister(dereg("web", i)), 1);
    }
    observe(&mut p, &census(50), 1);
    assert!(!p.active());
    assert_eq!(p.baseline(), 50);
}

/// The fault this accounting was rebuilt for: 20 hosts preserved after their check-ins
/// stopped, then 31 endpoints of another service registered and deleted one after the
/// other. Each deletion used to take one off the expectation, until protection was off.
#[test]
fn churn_of_other_endpoints_never_lowers_the_protection_of_counted_ones() {
    let mut p = Preservation::new(&cfg(), 0, BTreeSet::new());
    observe(&mut p, &census(20), 0);
    assert!(
        observe(&mut p, &census(0), 10_000),
        "collapse: protection on"
    );
    for i in 0..31 {
        let t = 20_000 + u64::from(i) * 1_000;
        observe(&mut p, &fleet(keys("api", i..i + 1)), t);
        assert!(p.active(), "registration {i}");
        assert_eq!(p.baseline(), 21);
        assert_eq!(p.on_deregister(dereg("api", i)), 1);
        observe(&mut p, &census(0), t + 500);
        assert!(p.active(), "deletion {i}");
        assert_eq!(p.baseline(), 20, "deletion {i}");
    }
    // Deleting what was never counted takes nothing out.
    assert_eq!(p.on_deregister(dereg("api", 999)), 0);
    assert_eq!(p.baseline(), 20);
}

#[test]
fn new_endpoints_add_to_the_expectation_and_never_replace_silent_ones() {
    let refresh = cfg().baseline_refresh.as_millis() as u64;
    let mut p = Preservation::new(&cfg(), 0, BTreeSet::new());
    observe(&mut p, &census(20), 0);
    // The 20 go silent and more new endpoints than that start renewing, across a refresh.
    let api = fleet(keys("api", 0..30));
    observe(&mut p, &api, 1_000);
    observe(&mut p, &api, refresh + 1_000);
    assert_eq!(p.baseline(), 50);
    assert!(p.active(), "30 of 50 renew");
    for i in 0..20 {
        assert!(p.counts(&key("web", i)));
    }
}

#[test]
fn a_count_read_before_a_deregistration_does_not_undo_it() {
    let mut p = Preservation::new(&cfg(), 0, BTreeSet::new());
    observe(&mut p, &census(20), 0);
    let ticket = p.ticket();
    // The rows were read (all 20 renewed), then 10 were deregistered, then the count lands.
    for i in 10..20 {
        p.on_deregister(dereg("web", i));
    }
    p.observe(&census(20), ticket, 1_000);
    assert_eq!(p.baseline(), 10);
    // A later count that still lists them (re-registered) counts them again.
    observe(&mut p, &census(20), 2_000);
    assert_eq!(p.baseline(), 20);
}

#[test]
fn a_restart_after_a_long_outage_preserves_old_rows() {
    // The store holds 100 rows, none renewed recently: the registry was down past the TTL.
    let silent = Fleet {
        census: Census {
            live: 0,
            renewed: 0,
            stored: 100,
        },
        renewed: BTreeSet::new(),
    };
    let mut p = Preservation::new(&cfg(), 0, BTreeSet::new());
    let t = p.ticket();
    p.start(keys("web", 0..100), &silent, t, 1);
    assert!(p.active());
    assert_eq!(p.baseline(), 100);
    let disabled = RegistryConfig {
        self_preservation: false,
        ..cfg()
    };
    let mut p = Preservation::new(&disabled, 0, keys("web", 0..100));
    observe(&mut p, &silent, 1);
    assert!(!p.active());
}

#[test]
fn a_hold_keeps_preservation_on_until_it_ends_but_needs_a_baseline() {
    let mut p = Preservation::new(&cfg(), 0, BTreeSet::new());
    p.hold(5_000);
    observe(&mut p, &census(0), 1_000);
    assert!(!p.active(), "no baseline yet: nothing to preserve");
    observe(&mut p, &census(100), 2_000);
    p.hold(5_000);
    observe(&mut p, &census(100), 3_000);
    assert!(p.active(), "held although every host renewed");
    assert!(observe(&mut p, &census(100), 5_000), "the hold ends");
    assert!(!p.active());
    let disabled = RegistryConfig {
        self_preservation: false,
        ..cfg()
    };
    let mut p = Preservation::new(&disabled, 0, keys("web", 0..100));
    p.hold(5_000);
    observe(&mut p, &census(0), 1_000);
    assert!(!p.active(), "disabled means disabled");
}

#[test]
fn shelf_life_is_the_ttl_less_one_interval() {
    assert_eq!(shelf_life(&cfg()), Duration::from_secs(120));
}

#[test]
fn census_counts_live_and_renewed() {
    let now = 1_000_000;
    let rows = vec![
        row(1, now),
        row(2, now - 70_000),
        row(3, now - 100_000),
        row(4, now - 200_000),
    ];
    let c = Census::take(&rows, now, &cfg());
    assert_eq!(
        c,
        Census {
            live: 3,
            renewed: 2,
            stored: 4
        }
    );
}

#[test]
fn warming_lasts_one_interval_and_only_after_an_empty_start() {
    let i = Duration::from_secs(60);
    assert!(warming(true, 0, 59_999, i));
    assert!(!warming(true, 0, 60_000, i));
    assert!(!warming(false, 0, 0, i));
}

#[test]
fn index_ignores_check_in_time_but_sees_tags_and_weights() {
    let a = row(1, 0);
    let b = row(1, 99_999);
    assert_eq!(content_index([&a.endpoint]), content_index([&b.endpoint]));
    let mut c = a.clone();
    c.endpoint.tags.load_balancing_weight = Weight::new(5).expect("w");
    assert_ne!(content_index([&a.endpoint]), content_index([&c.endpoint]));
    let d = row(2, 0);
    assert_ne!(
        content_index([&a.endpoint]),
        content_index([&a.endpoint, &d.endpoint])
    );
    assert_ne!(content_index(std::iter::empty()), 0);
    // Exact in a JSON number (an f64) for every client.
    for idx in [content_index([&a.endpoint]), content_index([&c.endpoint])] {
        assert!(idx < 1 << 53, "{idx}");
        assert_eq!(idx as f64 as u64, idx);
    }
}

#[test]
fn blocking_wait_is_capped_and_jittered_by_a_sixteenth() {
    let max = Duration::from_secs(300);
    assert_eq!(
        blocking_wait(Duration::from_secs(32), max, 0.5),
        Duration::from_secs(32)
    );
    assert_eq!(
        blocking_wait(Duration::from_secs(32), max, 0.0),
        Duration::from_secs(30)
    );
    assert_eq!(
        blocking_wait(Duration::from_secs(32), max, 1.0),
        Duration::from_secs(34)
    );
    assert!(blocking_wait(Duration::from_secs(3600), max, 1.0) <= max + max / 16);
    assert_eq!(blocking_wait(Duration::ZERO, max, 0.7), Duration::ZERO);
}

#[test]
fn startup_baseline_counts_the_fleet_as_last_seen() {
    assert!(startup_baseline(&[], TTL).is_empty());
    // The newest check-in was an hour before the restart; two rows were live then, one had
    // expired long before and is junk the sweeper had not reached.
    let hour_ago = 10_000_000;
    let rows = vec![
        row(1, hour_ago),
        row(2, hour_ago - 60_000),
        row(3, hour_ago - 1_000_000),
    ];
    let counted = startup_baseline(&rows, TTL);
    assert_eq!(counted.len(), 2);
    assert!(counted.contains(&rows[0].endpoint.key()) && counted.contains(&rows[1].endpoint.key()));
}

proptest::proptest! {
    /// A deregistration takes exactly the baseline keys it matches (the range lookup agrees
    /// with testing every key).
    #[test]
    fn deregistration_removes_exactly_its_matches(
        keys in proptest::collection::btree_set((0..3usize, 0u8..4, 1u16..4), 0..40),
        (s, ip, port) in (0..3usize, 0u8..4, proptest::option::of(1u16..4)),
    ) {
        let names = ["api", "db", "web"];
        let make = |s: usize, ip: u8, port: u16| EndpointKey {
            service: ServiceName::new(names[s]).expect("name"),
            ip: IpAddr::from([10, 0, 0, ip]),
            port: NonZeroU16::new(port).expect("port"),
        };
        let counted: BTreeSet<EndpointKey> = keys.iter().map(|&(s, ip, p)| make(s, ip, p)).collect();
        let d = Deregistration {
            service: ServiceName::new(names[s]).expect("name"),
            ip: IpAddr::from([10, 0, 0, ip]),
            port: port.map(|p| NonZeroU16::new(p).expect("port")),
        };
        let mut expected = counted.clone();
        expected.retain(|k| !d.matches(k));
        let mut p = Preservation::new(&cfg(), 0, counted.clone());
        let left = p.on_deregister(d);
        proptest::prop_assert_eq!(left, counted.len() - expected.len());
        proptest::prop_assert_eq!(&p.counted, &expected);
    }
}
