use std::net::IpAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use schema::{Endpoint, ServiceName, Weight};

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

fn cfg() -> RegistryConfig {
    RegistryConfig::default()
}

fn census(renewed: u64) -> Census {
    Census {
        live: renewed,
        renewed,
        stored: renewed,
    }
}

#[test]
fn preservation_turns_on_below_85_percent_and_recovers() {
    let mut p = Preservation::new(&cfg(), 0, 0);
    assert!(!p.observe(census(100), 1_000));
    assert_eq!(p.baseline(), 100);
    assert!(!p.observe(census(86), 2_000), "86 % is fine");
    assert!(p.observe(census(84), 3_000), "84 % turns it on");
    assert!(p.active());
    assert!(!p.observe(census(0), 4_000), "total collapse stays on");
    assert!(p.active());
    assert!(p.observe(census(90), 5_000), "recovery turns it off");
    assert!(!p.active());
}

#[test]
fn collapse_never_lowers_the_baseline_but_gradual_scale_down_is_absorbed() {
    let refresh = cfg().baseline_refresh.as_millis() as u64;
    let mut p = Preservation::new(&cfg(), 0, 0);
    p.observe(census(100), 0);
    // A collapse that outlasts several refresh periods: the baseline holds.
    for i in 1..5 {
        p.observe(census(10), i * refresh);
        assert_eq!(p.baseline(), 100);
        assert!(p.active());
    }
    // Gradual scale-down, 10 % per refresh period: absorbed each time, never preserving.
    let mut p = Preservation::new(&cfg(), 0, 0);
    let mut n = 100u64;
    p.observe(census(n), 0);
    for i in 1..10 {
        n = n * 9 / 10;
        assert!(!p.observe(census(n), i * refresh) || !p.active());
        assert!(!p.active(), "step {i}: {n} of {}", p.baseline());
        assert_eq!(p.baseline(), n);
    }
}

#[test]
fn deregistration_lowers_the_baseline_at_once() {
    let mut p = Preservation::new(&cfg(), 0, 0);
    p.observe(census(100), 0);
    p.on_deregister(50);
    p.observe(census(50), 1);
    assert!(!p.active());
    assert_eq!(p.baseline(), 50);
}

#[test]
fn a_restart_after_a_long_outage_preserves_old_rows() {
    // The store holds 100 rows, none renewed recently: the registry was down past the TTL.
    let mut p = Preservation::new(&cfg(), 0, 100);
    p.observe(
        Census {
            live: 0,
            renewed: 0,
            stored: 100,
        },
        1,
    );
    assert!(p.active());
    let disabled = RegistryConfig {
        self_preservation: false,
        ..cfg()
    };
    let mut p = Preservation::new(&disabled, 0, 100);
    p.observe(
        Census {
            live: 0,
            renewed: 0,
            stored: 100,
        },
        1,
    );
    assert!(!p.active());
}

#[test]
fn a_hold_keeps_preservation_on_until_it_ends_but_needs_a_baseline() {
    let mut p = Preservation::new(&cfg(), 0, 0);
    p.hold(5_000);
    p.observe(census(0), 1_000);
    assert!(!p.active(), "no baseline yet: nothing to preserve");
    p.observe(census(100), 2_000);
    p.hold(5_000);
    p.observe(census(100), 3_000);
    assert!(p.active(), "held although every host renewed");
    assert!(p.observe(census(100), 5_000), "the hold ends");
    assert!(!p.active());
    let disabled = RegistryConfig {
        self_preservation: false,
        ..cfg()
    };
    let mut p = Preservation::new(&disabled, 0, 100);
    p.hold(5_000);
    p.observe(census(0), 1_000);
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
    assert_eq!(startup_baseline(&[], TTL), 0);
    // The newest check-in was an hour before the restart; two rows were live then, one had
    // expired long before and is junk the sweeper had not reached.
    let hour_ago = 10_000_000;
    let rows = vec![
        row(1, hour_ago),
        row(2, hour_ago - 60_000),
        row(3, hour_ago - 1_000_000),
    ];
    assert_eq!(startup_baseline(&rows, TTL), 2);
}
