//! DynamoStore when things go wrong, against a real moto server and a fake DynamoDB: the
//! server dies and comes back, nothing listens at all, the server throttles, a foreign tool
//! wrote rows we cannot read, two registries share one table.

#[path = "support/moto.rs"]
mod moto;
#[path = "support/raw.rs"]
mod raw;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use discovery::conformance::{T0, ep, ip, svc};
use discovery::dynamo::init_table;
use discovery::{DynamoConfig, DynamoStore, Store, StoreError};
use raw::{attr, key};
use schema::{Revision, Weight};

/// A store call against a dead server must give up within the call deadline (2 s) plus
/// scheduling slack on a loaded CI machine.
const GIVE_UP_WITHIN: Duration = Duration::from_secs(4);

async fn store_on(moto: &moto::Moto, table: &str) -> DynamoStore {
    let cfg = moto.config(table);
    init_table(&cfg).await.expect("init_table");
    DynamoStore::connect(&cfg).await.expect("connect")
}

fn assert_unavailable<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, StoreError>,
    started: Instant,
) {
    match result {
        Err(StoreError::Unavailable(msg)) => {
            eprintln!("{what}: unavailable after {:?}: {msg}", started.elapsed())
        }
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    }
    assert!(
        started.elapsed() < GIVE_UP_WITHIN,
        "{what} took {:?}",
        started.elapsed()
    );
}

/// Every trait method, each expected to fail as Unavailable within the bound.
async fn assert_all_unavailable(store: &DynamoStore) {
    let web = svc("web");
    let t = Instant::now();
    assert_unavailable(
        "check_in",
        store.check_in(&[ep("web", "10.0.0.2", 80)], T0 + 1).await,
        t,
    );
    let t = Instant::now();
    assert_unavailable("list_service", store.list_service(&web).await, t);
    let t = Instant::now();
    assert_unavailable("list_all", store.list_all().await, t);
    let t = Instant::now();
    assert_unavailable("list_repo", store.list_repo("lyft/web").await, t);
    let t = Instant::now();
    assert_unavailable(
        "deregister",
        store.deregister(&web, ip("10.0.0.1"), None).await,
        t,
    );
    let t = Instant::now();
    let weight = Weight::new(5).expect("weight");
    assert_unavailable("set_weight", store.set_weight(&web, None, weight).await, t);
    let t = Instant::now();
    assert_unavailable("delete_expired", store.delete_expired(T0, 10).await, t);
}

#[tokio::test]
async fn killed_server_is_unavailable_fast_and_a_restart_is_picked_up() {
    let mut moto = moto::Moto::start();
    let store = store_on(&moto, "endpoints").await;
    let web = svc("web");
    store
        .check_in(&[ep("web", "10.0.0.1", 80)], T0)
        .await
        .expect("check_in");
    assert_eq!(store.list_service(&web).await.expect("list").len(), 1);

    // The store holds a pooled keep-alive connection to moto; the crash kills it mid-life.
    moto.kill();
    assert_all_unavailable(&store).await;

    // Same port, same store object. moto forgot everything, so the table is made again (as an
    // operator would run init-table against a fresh DynamoDB Local).
    moto.restart();
    init_table(&moto.config("endpoints"))
        .await
        .expect("init_table after restart");
    let out = store
        .check_in(&[ep("web", "10.0.0.1", 80)], T0 + 60_000)
        .await
        .expect("check_in after restart");
    assert_eq!(out.accepted, 1);
    assert_eq!(store.list_service(&web).await.expect("list").len(), 1);
}

#[tokio::test]
async fn nothing_listening_is_unavailable_fast() {
    // A port nobody listens on: bind, note it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let cfg = DynamoConfig {
        table: "endpoints".to_string(),
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: Some("us-east-1".to_string()),
        ttl: Duration::from_secs(180),
        stream_poll: DynamoConfig::DEFAULT_STREAM_POLL,
    };
    // Building the store needs no network: a registry can start while DynamoDB is down.
    let store = DynamoStore::connect(&cfg)
        .await
        .expect("connect without a server");
    assert_all_unavailable(&store).await;
    let t = Instant::now();
    assert_unavailable("init_table", init_table(&cfg).await, t);
}

#[tokio::test]
async fn a_server_that_never_answers_is_cut_off() {
    // Accepts connections and reads requests, but never answers (a hung process, a
    // half-open path): only the attempt timeouts and the call deadline can end the wait.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let store = DynamoStore::connect(&fake_config(format!("http://{addr}")))
        .await
        .expect("connect");
    let t = Instant::now();
    assert_unavailable(
        "hung list_service",
        store.list_service(&svc("web")).await,
        t,
    );
    let t = Instant::now();
    assert_unavailable(
        "hung check_in",
        store.check_in(&[ep("web", "10.0.0.1", 80)], T0).await,
        t,
    );
}

#[tokio::test]
async fn init_table_is_idempotent_and_enables_ttl() {
    let moto = moto::Moto::start();
    let cfg = moto.config("endpoints");
    init_table(&cfg).await.expect("first init_table");
    init_table(&cfg).await.expect("second init_table");
    let store = DynamoStore::connect(&cfg).await.expect("connect");
    assert_eq!(
        store
            .ttl_attribute()
            .await
            .expect("describe ttl")
            .as_deref(),
        Some("expires_at")
    );

    // expires_at is written in epoch seconds, last_check_in + ttl, for DynamoDB's TTL.
    store
        .check_in(&[ep("web", "10.0.0.1", 80)], T0 + 1)
        .await
        .expect("check_in");
    let item = raw_item(&moto, "endpoints", "web", "10.0.0.1:80").await;
    assert_eq!(
        item.get("last_check_in"),
        Some(&AttributeValue::N((T0 + 1).to_string()))
    );
    assert_eq!(
        item.get("expires_at"),
        Some(&AttributeValue::N((T0 / 1000 + 1 + 180).to_string()))
    );
    assert_eq!(
        item.get("ip"),
        Some(&AttributeValue::S("10.0.0.1".to_string()))
    );
    assert_eq!(item.get("port"), Some(&AttributeValue::N("80".to_string())));

    // A table keyed differently (lyft/discovery's (service, ip_address)) is refused.
    let client = raw_client(&moto).await;
    client
        .create_table()
        .table_name("lyft-hosts")
        .attribute_definitions(attr("service"))
        .attribute_definitions(attr("ip_address"))
        .key_schema(key("service", aws_sdk_dynamodb::types::KeyType::Hash))
        .key_schema(key("ip_address", aws_sdk_dynamodb::types::KeyType::Range))
        .billing_mode(aws_sdk_dynamodb::types::BillingMode::PayPerRequest)
        .send()
        .await
        .expect("create foreign table");
    match init_table(&moto.config("lyft-hosts")).await {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("key schema"), "{msg}"),
        other => panic!("foreign key schema accepted: {other:?}"),
    }
}

#[tokio::test]
async fn two_stores_on_one_table_see_each_other() {
    let moto = moto::Moto::start();
    let a = store_on(&moto, "shared").await;
    let b = DynamoStore::connect(&moto.config("shared"))
        .await
        .expect("second store");
    let web = svc("web");

    a.check_in(&[ep("web", "10.0.0.1", 80)], T0)
        .await
        .expect("a check_in");
    assert_eq!(
        b.list_service(&web).await.expect("b list").len(),
        1,
        "b sees a's check-in"
    );
    let out = b
        .check_in(&[ep("web", "10.0.0.1", 80)], T0 + 60_000)
        .await
        .expect("b check_in");
    assert!(
        out.changed_services.is_empty(),
        "b's re-check-in of a's row is no change"
    );

    let weight = Weight::new(9).expect("weight");
    assert_eq!(
        b.set_weight(&web, None, weight)
            .await
            .expect("b set_weight"),
        1
    );
    let rows = a.list_service(&web).await.expect("a list");
    assert_eq!(rows[0].weight_override, Some(weight), "a sees b's override");

    // a's clock lags b's: its check-in must not move the row back in time.
    let mut lagging = ep("web", "10.0.0.1", 80);
    lagging.revision = Revision::new("lagging").expect("revision");
    assert_eq!(
        a.check_in(&[lagging], T0 + 30_000)
            .await
            .expect("a check_in")
            .accepted,
        0
    );
    assert_eq!(
        b.list_service(&web).await.expect("b list")[0].last_check_in_ms,
        T0 + 60_000
    );

    assert_eq!(
        a.delete_expired(T0 + 60_001, 10).await.expect("a sweeps"),
        1
    );
    assert!(b.list_all().await.expect("b list_all").is_empty());
}

#[tokio::test]
async fn unreadable_rows_are_skipped_not_fatal() {
    let moto = moto::Moto::start();
    let store = store_on(&moto, "endpoints").await;
    store
        .check_in(&[ep("web", "10.0.0.1", 80), ep("web", "10.0.0.2", 80)], T0)
        .await
        .expect("check_in");
    let client = raw_client(&moto).await;
    let foreign: [&[(&str, AttributeValue)]; 4] = [
        // lyft/discovery's shape: no port in the sort key, a string timestamp.
        &[
            ("endpoint", s("10.0.0.3")),
            ("last_check_in", s("2026-01-01T00:00:00")),
        ],
        &[
            ("endpoint", s("10.0.0.4:80")),
            ("last_check_in", n(T0)),
            ("tags", s("[1,2]")),
        ],
        &[
            ("endpoint", s("10.0.0.5:80")),
            ("last_check_in", n(T0)),
            ("weight_override", n(500)),
        ],
        &[
            ("endpoint", s("10.0.0.6:80")),
            ("last_check_in", s("yesterday")),
        ],
    ];
    for attrs in foreign {
        let mut item: HashMap<String, AttributeValue> = attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        item.insert("service".to_string(), s("web"));
        client
            .put_item()
            .table_name("endpoints")
            .set_item(Some(item))
            .send()
            .await
            .expect("put foreign row");
    }
    assert_eq!(
        store.list_service(&svc("web")).await.expect("list").len(),
        2
    );
    assert_eq!(store.list_all().await.expect("list_all").len(), 2);
    assert_eq!(
        store.list_repo("lyft/web").await.expect("list_repo").len(),
        0
    );

    // A check-in over an unreadable row at its key repairs it.
    let out = store
        .check_in(&[ep("web", "10.0.0.6", 80)], T0)
        .await
        .expect("check_in over a foreign row");
    assert_eq!((out.accepted, out.changed_services), (1, vec![svc("web")]));
    assert_eq!(
        store.list_service(&svc("web")).await.expect("list").len(),
        3
    );

    // The sweeper removes old rows, readable or not, as long as last_check_in is a number;
    // a row whose last_check_in is text is not its to judge.
    assert_eq!(
        store
            .delete_expired(T0 + 1, 100)
            .await
            .expect("delete_expired"),
        5
    );
    let left = raw_client(&moto)
        .await
        .scan()
        .table_name("endpoints")
        .send()
        .await
        .expect("scan");
    assert_eq!(left.count, 1);
}

/// A fake DynamoDB that throttles the first `throttle` requests, then answers an empty
/// Query. Counts requests.
async fn fake_dynamodb(throttle: usize) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let json = [(axum::http::header::CONTENT_TYPE, "application/x-amz-json-1.0")];
            if n < throttle {
                let body = r#"{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException","message":"Rate of requests exceeds the allowed throughput."}"#;
                (axum::http::StatusCode::BAD_REQUEST, json, body)
            } else {
                (axum::http::StatusCode::OK, json, r#"{"Count":0,"Items":[],"ScannedCount":0}"#)
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), hits)
}

fn fake_config(endpoint: String) -> DynamoConfig {
    DynamoConfig {
        table: "endpoints".to_string(),
        endpoint: Some(endpoint),
        region: None,
        ttl: Duration::from_secs(180),
        stream_poll: DynamoConfig::DEFAULT_STREAM_POLL,
    }
}

#[tokio::test]
async fn throttling_is_retried_with_backoff_and_bounded() {
    let (url, hits) = fake_dynamodb(2).await;
    let store = DynamoStore::connect(&fake_config(url))
        .await
        .expect("connect");
    let rows = store
        .list_service(&svc("web"))
        .await
        .expect("succeeds after two throttles");
    assert!(rows.is_empty());
    assert_eq!(hits.load(Ordering::SeqCst), 3);

    let (url, hits) = fake_dynamodb(usize::MAX).await;
    let store = DynamoStore::connect(&fake_config(url))
        .await
        .expect("connect");
    let t = Instant::now();
    assert_unavailable("always throttled", store.list_service(&svc("web")).await, t);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        4,
        "one attempt and three retries, no more"
    );
}

// ---- raw access, for what a foreign tool would do -----------------------------------------

async fn raw_client(moto: &moto::Moto) -> aws_sdk_dynamodb::Client {
    raw::client(&moto.endpoint())
}

async fn raw_item(
    moto: &moto::Moto,
    table: &str,
    service: &str,
    endpoint: &str,
) -> HashMap<String, AttributeValue> {
    raw_client(moto)
        .await
        .get_item()
        .table_name(table)
        .key("service", s(service))
        .key("endpoint", s(endpoint))
        .send()
        .await
        .expect("get_item")
        .item
        .expect("item exists")
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}
