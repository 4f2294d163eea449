//! Registry replicas on one DynamoDB table (moto) following the table's stream: another
//! replica's writes reach a replica's reads and blocking queries within a stream poll, from
//! its mirror rather than from a query per request; a late replica catches up; a gap (the
//! table made again under it: a new stream) forces a rescan that loses nothing.

#[path = "support/moto.rs"]
mod moto;
#[path = "support/raw.rs"]
mod raw;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{BillingMode, KeyType};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use discovery::dynamo::init_table;
use discovery::store::{FollowStats, RescanReason};
use discovery::{DynamoStore, Registry, RegistryConfig, Store, SystemClock, router};
use http_body_util::BodyExt;
use moto::STREAM_POLL;
use serde_json::Value;
use tower::ServiceExt;

/// A store's first sync, or a write reaching another replica, on a loaded CI machine: the
/// deadline of the conditions tests poll, not a time anything is expected to take.
const DEADLINE: Duration = Duration::from_secs(15);
/// Slack on top of one stream poll for a write to reach a blocked query on another replica
/// (moto's latency, the follower's round, scheduling on a loaded 2-core machine).
const SLACK: Duration = Duration::from_millis(1500);

struct Replica {
    app: Router,
    store: DynamoStore,
    registry: Registry,
}

async fn replica(moto: &moto::Moto, table: &str) -> Replica {
    let cfg = moto.config(table);
    init_table(&cfg).await.expect("init_table");
    replica_without_init(&cfg).await
}

impl Replica {
    async fn send(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let resp = self.app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            headers,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn check_in(&self, service: &str, ip: &str) {
        let req = Request::post(format!("/v1/registration/{service}"))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!(
                "ip={ip}&port=80&revision=r1&tags=%7B%7D"
            )))
            .expect("request");
        let (status, _, body) = self.send(req).await;
        assert_eq!(status, StatusCode::OK, "check-in: {body}");
    }

    /// `(ip, weight)` of the service's hosts, sorted, and the index.
    async fn hosts(&self, service: &str) -> (Vec<(String, u64)>, String) {
        let req = Request::get(format!("/v2/services/{service}"))
            .body(Body::empty())
            .expect("request");
        let (status, headers, body) = self.send(req).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let index = headers
            .get("x-tidings-index")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        (host_list(&body), index)
    }

    /// Starts the registry (and so its stream follower) and waits until the mirror answers.
    async fn followed(&self) {
        self.hosts("web").await;
        poll_until("the mirror syncs", || async {
            self.store.stream_followed()
        })
        .await;
    }

    fn stats(&self) -> FollowStats {
        self.store.follow_stats().expect("a DynamoDB store follows")
    }

    fn rescans(&self, reason: RescanReason) -> u64 {
        self.stats()
            .rescans
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

/// Replicas `a` and `b` on `table`: web on 10.0.0.1 and 10.0.0.2 checked in through `a`,
/// and `b` following the stream and listing both.
async fn two_hosts_seen_by_b(moto: &moto::Moto, table: &str) -> (Replica, Replica) {
    let a = replica(moto, table).await;
    let b = replica(moto, table).await;
    for ip in ["10.0.0.1", "10.0.0.2"] {
        a.check_in("web", ip).await;
    }
    b.followed().await;
    poll_until("b sees both hosts", || async {
        ips(&b.hosts("web").await.0) == ["10.0.0.1", "10.0.0.2"]
    })
    .await;
    (a, b)
}

/// After a gap: `b` rescans for `reason` and follows the stream again, a check-in of `ip`
/// through `a` after that reaches it, and its mirror ends as the table.
async fn rescan_then_level(
    moto: &moto::Moto,
    a: &Replica,
    b: &Replica,
    table: &str,
    reason: RescanReason,
    ip: &str,
) {
    poll_until("b rescans and follows the stream again", || async {
        b.rescans(reason) >= 1 && b.store.stream_followed()
    })
    .await;
    a.check_in("web", ip).await;
    poll_until("b's mirror equals the table", || {
        mirror_equals_table(moto, &b.store, table)
    })
    .await;
}

fn host_list(body: &Value) -> Vec<(String, u64)> {
    let mut hosts: Vec<(String, u64)> = body["hosts"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    (
                        h["ip_address"].as_str().unwrap_or_default().to_string(),
                        h["tags"]["load_balancing_weight"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    hosts.sort();
    hosts
}

fn ips(hosts: &[(String, u64)]) -> Vec<&str> {
    hosts.iter().map(|(ip, _)| ip.as_str()).collect()
}

/// Polls `cond` until it holds; fails the test at [`DEADLINE`].
async fn poll_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !cond().await {
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every row the table holds, read from the table itself (a store that does not follow).
async fn table_rows(moto: &moto::Moto, table: &str) -> Vec<discovery::StoredEndpoint> {
    let store = DynamoStore::connect(&moto.config(table))
        .await
        .expect("connect");
    let mut rows = store.list_all().await.expect("scan");
    rows.sort_by_key(|r| r.endpoint.key());
    rows
}

/// Whether `store` answers from its mirror, and the mirror holds exactly the table's rows.
async fn mirror_equals_table(moto: &moto::Moto, store: &DynamoStore, table: &str) -> bool {
    if !store.stream_followed() {
        return false;
    }
    let mut mirror = store.list_all().await.expect("list_all");
    mirror.sort_by_key(|r| r.endpoint.key());
    store.stream_followed() && mirror == table_rows(moto, table).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_in_through_a_wakes_a_blocking_query_on_b_from_its_mirror() {
    let moto = moto::Moto::start();
    let a = replica(&moto, "shared").await;
    let b = replica(&moto, "shared").await;
    a.check_in("web", "10.0.0.1").await;
    b.followed().await;
    poll_until("b sees a's first host", || async {
        ips(&b.hosts("web").await.0) == ["10.0.0.1"]
    })
    .await;
    let (_, index) = b.hosts("web").await;
    let before = b.stats();

    let waiter = {
        let app = b.app.clone();
        tokio::spawn(async move {
            let req = Request::get(format!("/v2/services/web?index={index}&wait=30s"))
                .body(Body::empty())
                .expect("request");
            let resp = app.oneshot(req).await.expect("infallible");
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            (
                Instant::now(),
                serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
            )
        })
    };
    poll_until("the query blocks on b", || async {
        b.registry
            .render_metrics()
            .contains("tidings_registry_blocking_queries 1")
    })
    .await;
    let written = Instant::now();
    a.check_in("web", "10.0.0.2").await;
    let (answered, body) = tokio::time::timeout(DEADLINE, waiter)
        .await
        .expect("the blocking query answered")
        .expect("waiter task");
    let took = answered.duration_since(written);
    eprintln!("a's check-in reached b's blocking query after {took:?}");
    assert_eq!(ips(&host_list(&body)), ["10.0.0.1", "10.0.0.2"]);
    assert!(
        took < STREAM_POLL + SLACK,
        "took {took:?}, more than a stream poll ({STREAM_POLL:?}) and {SLACK:?}"
    );
    let after = b.stats();
    eprintln!(
        "b while the query waited: {} table reads, {} mirror reads, {} records applied",
        after.table_reads - before.table_reads,
        after.mirror_reads - before.mirror_reads,
        after.records_applied - before.records_applied
    );
    assert!(after.followed, "b still follows the stream");
    assert_eq!(
        after.table_reads, before.table_reads,
        "b answered its reads from the mirror, without querying the table"
    );
    assert!(after.mirror_reads > before.mirror_reads);
    assert!(after.records_applied > before.records_applied);
    let metrics = b.registry.render_metrics();
    assert!(
        metrics.contains("tidings_registry_stream_followed 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tidings_registry_stream_rescans_total{reason=\"start\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_late_catches_up() {
    let moto = moto::Moto::start();
    let a = replica(&moto, "late").await;
    for ip in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        a.check_in("web", ip).await;
    }
    a.check_in("api", "10.0.1.1").await;
    let b = replica(&moto, "late").await;
    b.followed().await;
    assert_eq!(
        ips(&b.hosts("web").await.0),
        ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
        "what was written before b started"
    );
    a.check_in("web", "10.0.0.4").await;
    a.check_in("api", "10.0.1.2").await;
    let gone = Request::delete("/v1/registration/web/10.0.0.2")
        .body(Body::empty())
        .expect("request");
    assert_eq!(a.send(gone).await.0, StatusCode::OK);
    poll_until("b sees what was written after it started", || async {
        ips(&b.hosts("web").await.0) == ["10.0.0.1", "10.0.0.3", "10.0.0.4"]
            && ips(&b.hosts("api").await.0) == ["10.0.1.1", "10.0.1.2"]
    })
    .await;
    assert!(
        mirror_equals_table(&moto, &b.store, "late").await,
        "b answers from its mirror, which holds what the table does"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistration_and_weights_through_a_show_on_b() {
    let moto = moto::Moto::start();
    let (a, b) = two_hosts_seen_by_b(&moto, "ops").await;
    let before = b.stats();
    let gone = Request::delete("/v1/registration/web/10.0.0.1")
        .body(Body::empty())
        .expect("request");
    assert_eq!(a.send(gone).await.0, StatusCode::OK);
    let weigh = Request::post("/v1/loadbalancing/web/10.0.0.2")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("load_balancing_weight=7"))
        .expect("request");
    assert_eq!(a.send(weigh).await.0, StatusCode::NO_CONTENT);
    // a reads its own writes at once.
    assert_eq!(a.hosts("web").await.0, [("10.0.0.2".to_string(), 7)]);
    poll_until(
        "b drops the deregistered host and shows the weight",
        || async { b.hosts("web").await.0 == [("10.0.0.2".to_string(), 7)] },
    )
    .await;
    let after = b.stats();
    assert_eq!(after.table_reads, before.table_reads, "from b's mirror");
    assert!(after.followed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_stream_under_a_replica_forces_a_rescan_that_loses_nothing() {
    let moto = moto::Moto::start();
    let (a, b) = two_hosts_seen_by_b(&moto, "gap").await;
    assert_eq!(b.rescans(RescanReason::StreamChanged), 0);

    // The table is made again under the replicas: its stream is another one (a new ARN), and
    // b's iterators read the old stream, where nothing more will come.
    raw::client(&moto.endpoint())
        .delete_table()
        .table_name("gap")
        .send()
        .await
        .expect("delete table");
    init_table(&moto.config("gap")).await.expect("init_table");
    for ip in ["10.0.0.3", "10.0.0.4"] {
        a.check_in("web", ip).await;
    }
    rescan_then_level(
        &moto,
        &a,
        &b,
        "gap",
        RescanReason::StreamChanged,
        "10.0.0.5",
    )
    .await;
    // The old table's hosts went with it; every new one is there.
    poll_until("b's registry answers the new table", || async {
        ips(&b.hosts("web").await.0) == ["10.0.0.3", "10.0.0.4", "10.0.0.5"]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iterators_the_stream_refuses_force_a_rescan_that_loses_nothing() {
    let moto = moto::Moto::start();
    let a = replica(&moto, "spoilt").await;
    let b = replica(&moto, "spoilt").await;
    a.check_in("web", "10.0.0.1").await;
    b.followed().await;
    assert_eq!(b.rescans(RescanReason::Doubt), 0);
    b.store.spoil_stream_iterators();
    // Written while b cannot read the stream.
    a.check_in("web", "10.0.0.2").await;
    a.check_in("api", "10.0.1.1").await;
    rescan_then_level(&moto, &a, &b, "spoilt", RescanReason::Doubt, "10.0.0.3").await;
    poll_until("b's registry lists every host", || async {
        ips(&b.hosts("web").await.0) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    })
    .await;
}

#[tokio::test]
async fn init_table_enables_the_stream_on_a_table_made_without_one() {
    let moto = moto::Moto::start();
    let client = raw::client(&moto.endpoint());
    client
        .create_table()
        .table_name("old")
        .attribute_definitions(raw::attr("service"))
        .attribute_definitions(raw::attr("endpoint"))
        .key_schema(raw::key("service", KeyType::Hash))
        .key_schema(raw::key("endpoint", KeyType::Range))
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .expect("an old init-table's table");
    let cfg = moto.config("old");
    let store = DynamoStore::connect(&cfg).await.expect("connect");
    assert!(!store.has_stream().await.expect("describe"));
    // A replica on it keeps reading the table.
    let old = replica_without_init(&cfg).await;
    old.check_in("web", "10.0.0.1").await;
    assert_eq!(ips(&old.hosts("web").await.0), ["10.0.0.1"]);
    assert!(!old.store.stream_followed());
    init_table(&cfg).await.expect("init_table");
    assert!(store.has_stream().await.expect("describe"));
    init_table(&cfg)
        .await
        .expect("init_table again changes nothing");
    assert!(store.has_stream().await.expect("describe"));
}

async fn replica_without_init(cfg: &discovery::DynamoConfig) -> Replica {
    let store = DynamoStore::connect(cfg).await.expect("connect");
    let registry = Registry::new(
        Arc::new(store.clone()),
        RegistryConfig::default(),
        Arc::new(SystemClock),
    );
    Replica {
        app: router(registry.clone()),
        store,
        registry,
    }
}
