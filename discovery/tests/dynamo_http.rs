//! The registry's HTTP API on a DynamoStore while DynamoDB (moto) dies and comes back:
//! writes answer 503 with `Retry-After` within a bounded time, reads are served from the
//! last good answer flagged `X-Tidings-Stale: true`, and after the restart the same
//! registry writes again. Two registries on one table see each other's check-ins (through
//! the table's stream: dynamo_stream.rs has the rest of that).

#[path = "support/moto.rs"]
mod moto;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use discovery::conformance::T0;
use discovery::dynamo::init_table;
use discovery::{DynamoStore, ManualClock, Registry, RegistryConfig, router};
use http_body_util::BodyExt;
use schema::wire::HEADER_STALE;
use serde_json::Value;
use tower::ServiceExt;

/// A write against a dead store answers within the store's call deadline (2 s) plus slack.
const ANSWER_WITHIN: Duration = Duration::from_secs(4);

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    json: Value,
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    let resp = app
        .clone()
        .oneshot(req)
        .await
        .expect("router is infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        json,
    }
}

fn check_in(ip: &str, revision: &str) -> Request<Body> {
    Request::post("/v1/registration/web")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!(
            "ip={ip}&port=80&revision={revision}&tags=%7B%7D"
        )))
        .expect("request")
}

fn list() -> Request<Body> {
    Request::get("/v1/registration/web")
        .body(Body::empty())
        .expect("request")
}

fn hosts(answer: &Answer) -> Vec<String> {
    let mut ips: Vec<String> = answer.json["hosts"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .filter_map(|h| h["ip_address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ips.sort();
    ips
}

async fn registry(moto: &moto::Moto, table: &str, clock: Arc<ManualClock>) -> Router {
    let cfg = moto.config(table);
    init_table(&cfg).await.expect("init_table");
    let store = DynamoStore::connect(&cfg).await.expect("connect");
    router(Registry::new(
        Arc::new(store),
        RegistryConfig::default(),
        clock,
    ))
}

#[tokio::test]
async fn dynamodb_outage_fails_writes_503_serves_stale_reads_and_recovers() {
    let mut moto = moto::Moto::start();
    let clock = Arc::new(ManualClock::new(T0));
    let app = registry(&moto, "endpoints", clock.clone()).await;

    assert_eq!(
        send(&app, check_in("10.0.0.1", "r1")).await.status,
        StatusCode::OK
    );
    let before = send(&app, list()).await;
    assert_eq!(before.status, StatusCode::OK);
    assert_eq!(hosts(&before), ["10.0.0.1"]);
    assert_ne!(
        before.headers.get(HEADER_STALE).map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );

    moto.kill();
    // Past the read cache's lifetime, so the next read has to ask the (dead) store.
    clock.advance(Duration::from_secs(5));

    let t = Instant::now();
    let write = send(&app, check_in("10.0.0.2", "r1")).await;
    assert_eq!(
        write.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        write.json
    );
    assert!(
        write.headers.contains_key(header::RETRY_AFTER),
        "503 without Retry-After"
    );
    assert_eq!(write.json["error"]["code"], "store_unavailable");
    assert!(t.elapsed() < ANSWER_WITHIN, "write took {:?}", t.elapsed());

    let t = Instant::now();
    let read = send(&app, list()).await;
    assert_eq!(read.status, StatusCode::OK, "{:?}", read.json);
    assert_eq!(
        read.headers.get(HEADER_STALE).map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(hosts(&read), ["10.0.0.1"], "the last good answer");
    assert!(t.elapsed() < ANSWER_WITHIN, "read took {:?}", t.elapsed());

    // moto back on the same port, empty: the operator re-runs init-table; the registry and
    // its store are the same objects as before the outage.
    moto.restart();
    init_table(&moto.config("endpoints"))
        .await
        .expect("init_table after restart");
    clock.advance(Duration::from_secs(1));
    let write = send(&app, check_in("10.0.0.2", "r1")).await;
    assert_eq!(write.status, StatusCode::OK, "{:?}", write.json);
    let read = send(&app, list()).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(
        hosts(&read),
        ["10.0.0.2"],
        "moto lost 10.0.0.1 with its memory"
    );
    assert_ne!(
        read.headers.get(HEADER_STALE).map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
}

#[tokio::test]
async fn two_registries_on_one_table_see_each_others_check_ins() {
    let moto = moto::Moto::start();
    let clock = Arc::new(ManualClock::new(T0));
    let a = registry(&moto, "shared", clock.clone()).await;
    let b = registry(&moto, "shared", clock.clone()).await;

    assert_eq!(
        send(&a, check_in("10.0.0.1", "r1")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&b, check_in("10.0.0.2", "r1")).await.status,
        StatusCode::OK
    );
    // Each registry caches its reads briefly and learns of the other's writes from the
    // table's stream (within a stream poll); past that, both see both hosts.
    let deadline = Instant::now() + Duration::from_secs(15);
    for app in [&a, &b] {
        loop {
            clock.advance(Duration::from_secs(2));
            let read = send(app, list()).await;
            assert_eq!(read.status, StatusCode::OK);
            if hosts(&read) == ["10.0.0.1", "10.0.0.2"] {
                break;
            }
            assert!(Instant::now() < deadline, "{:?}", hosts(&read));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
