//! Metrics hygiene: a host the proxy forgets takes its gauges out of `/metrics` (they are
//! not left at their last value forever), while live hosts keep theirs; and every metric the
//! proxy exposes carries its description.
//!
//! The exporter measures idleness with its own clock, not tokio's, so this test cannot pause
//! time: it polls real time, bounded by the idle timeout plus a margin.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use proxy::telemetry::GAUGE_IDLE_TIMEOUT;
use support::*;

const HOST_GAUGES: [&str; 4] = [
    "tidings_proxy_host_active_requests",
    "tidings_proxy_host_ejected",
    "tidings_proxy_host_routable",
    "tidings_proxy_host_healthy",
];

/// The `/metrics` lines of `name` for host `addr`.
fn series<'m>(metrics: &'m str, name: &str, addr: SocketAddr) -> Vec<&'m str> {
    let host = format!("host=\"{addr}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(&host))
        .collect()
}

fn has_all_gauges(metrics: &str, addr: SocketAddr) -> bool {
    HOST_GAUGES
        .iter()
        .all(|g| !series(metrics, g, addr).is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_hosts_gauges_leave_and_live_hosts_keep_theirs() {
    let (a, b, m, p) = two_routed().await;
    for _ in 0..10 {
        assert_eq!(p.get("/").await.status, 200);
    }
    assert!(a.hits() > 0 && b.hits() > 0, "both hosts served traffic");
    eventually(
        Duration::from_secs(5),
        "both hosts' gauges published",
        || async {
            let metrics = p.admin("/metrics").await.1;
            has_all_gauges(&metrics, a.addr) && has_all_gauges(&metrics, b.addr)
        },
    )
    .await;

    // Deregistered, then no longer listed: the proxy drains `a` and forgets it once idle.
    m.set(vec![Listed::draining(a.addr), Listed::up(b.addr)]);
    eventually(Duration::from_secs(5), "a forgotten", || async {
        p.host(a.addr).await.is_none()
    })
    .await;
    m.set(vec![Listed::up(b.addr)]);

    let within = GAUGE_IDLE_TIMEOUT + Duration::from_secs(10);
    eventually(within, "a's gauges gone from /metrics", || async {
        let metrics = p.admin("/metrics").await.1;
        HOST_GAUGES
            .iter()
            .all(|g| series(&metrics, g, a.addr).is_empty())
    })
    .await;

    let metrics = p.admin("/metrics").await.1;
    assert!(
        has_all_gauges(&metrics, b.addr),
        "a live host keeps its gauges: {metrics}"
    );
    assert!(
        metrics.contains("tidings_proxy_cluster_routable_hosts{cluster=\"c\"} 1"),
        "the cluster's gauges stay and count one host: {metrics}"
    );
    // Counters are totals: a's stay, so rates over the window it served remain right.
    assert!(
        !series(&metrics, "tidings_proxy_upstream_requests_total", a.addr).is_empty(),
        "{metrics}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_proxy_metric_is_described() {
    let (_a, _b, _m, p) = two_routed().await;
    for _ in 0..10 {
        assert_eq!(p.get("/").await.status, 200);
    }
    let metrics = eventually_metrics(&p).await;
    // Family names as exposed: a histogram's series carry `_bucket`/`_sum`/`_count`.
    let mut families: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tidings_proxy_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
        })
        .collect();
    families.sort_unstable();
    families.dedup();
    assert!(families.len() >= 8, "{families:?}");
    for f in families {
        assert!(
            metrics.contains(&format!("# HELP {f} ")),
            "{f} has no HELP line: {metrics}"
        );
    }
    p.stop().await;
}

/// `/metrics` once the cluster's gauges and a request's counters are in it.
async fn eventually_metrics(p: &Running) -> String {
    eventually(
        Duration::from_secs(5),
        "gauges and counters published",
        || async {
            let metrics = p.admin("/metrics").await.1;
            metrics.contains("tidings_proxy_cluster_routable_hosts")
                && metrics.contains("tidings_proxy_requests_total")
        },
    )
    .await;
    p.admin("/metrics").await.1
}
