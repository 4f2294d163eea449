use serde_json::json;

use super::*;

fn listing(hosts: serde_json::Value) -> V1Listing {
    serde_json::from_value(json!({"service": "svc", "env": "prod", "hosts": hosts}))
        .expect("listing")
}

fn host(ip: &str, port: u16, tags: serde_json::Value) -> serde_json::Value {
    json!({"service": "svc", "ip_address": ip, "port": port, "revision": "r1",
           "last_check_in": "2026-01-01T00:00:00Z", "tags": tags})
}

#[test]
fn listing_hosts_carry_weight_zone_canary_and_draining() {
    let l = listing(json!([
        host(
            "10.0.0.1",
            80,
            json!({"az": "a", "load_balancing_weight": 7, "canary": true})
        ),
        host("10.0.0.2", 81, json!({"draining": "true"})),
    ]));
    let hosts = parse_listing(&l);
    assert_eq!(hosts.len(), 2);
    assert_eq!(hosts[0].addr.to_string(), "10.0.0.1:80");
    assert_eq!(
        (
            hosts[0].weight,
            hosts[0].zone.as_deref(),
            hosts[0].canary,
            hosts[0].draining
        ),
        (7, Some("a"), true, false)
    );
    assert_eq!((hosts[1].weight, hosts[1].draining), (100, true));
}

#[test]
fn invalid_hosts_are_skipped_not_fatal() {
    let l = listing(json!([
        host("not-an-ip", 80, json!({})),
        host("10.0.0.1", 0, json!({})),
        host("10.0.0.2", 80, json!({"load_balancing_weight": 1000})),
        host("10.0.0.3", 80, json!({})),
    ]));
    let hosts = parse_listing(&l);
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].addr.to_string(), "10.0.0.3:80");
}
