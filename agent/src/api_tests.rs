use std::num::NonZeroU16;

use axum::body::Body;
use axum::http::Request;
use gossip::{GossipConfig, GossipView, Snapshot, SnapshotEntry, Source, ViewEntry};
use http_body_util::BodyExt;
use schema::Endpoint;
use serde_json::Value;
use tokio::sync::watch;
use tower::ServiceExt;

use super::*;
use crate::config::AgentConfig;
use crate::state::LocalEndpoints;
use crate::view::Merger;

fn ep(port: u16) -> Endpoint {
    Endpoint::new(
        ServiceName::new("web").expect("name"),
        "127.0.0.1".parse().expect("ip"),
        NonZeroU16::new(port).expect("port"),
    )
}

fn view(ports: &[u16]) -> MergedView {
    let snap = Snapshot {
        service: ServiceName::new("web").expect("name"),
        generated_at_ms: 10,
        entries: ports
            .iter()
            .map(|p| SnapshotEntry {
                endpoint: ep(*p).into(),
                last_check_in_ms: 9,
            })
            .collect(),
    };
    let g = GossipView {
        deregistered: Vec::new(),
        endpoints: ports
            .iter()
            .map(|p| ViewEntry {
                endpoint: ep(*p).into(),
                source: Source::Registry {
                    generated_at_ms: 10,
                    last_check_in_ms: 9,
                },
            })
            .collect(),
        snapshots: vec![Arc::new(snap)],
        members: Vec::new(),
    };
    Merger::new("127.0.0.1:1".parse().expect("addr"), 0, Vec::new()).merge(&g, 1)
}

pub(crate) struct Fixture {
    pub(crate) app: Router,
    pub(crate) shared: Arc<Shared>,
    pub(crate) tx: watch::Sender<Arc<MergedView>>,
    pub(crate) stop: tokio_util::sync::CancellationToken,
}

pub(crate) async fn fixture() -> Fixture {
    fixture_with(|_| {}).await
}

pub(crate) async fn fixture_with(tune: impl FnOnce(&mut AgentConfig)) -> Fixture {
    let stop = tokio_util::sync::CancellationToken::new();
    let gcfg = GossipConfig::for_tests("127.0.0.1:0".parse().expect("addr"));
    let gossip = gossip::run(gcfg, Vec::new(), stop.clone())
        .await
        .expect("gossip starts");
    let config = AgentConfig {
        registry: Some("http://127.0.0.1:9".into()),
        request_timeout: Duration::from_millis(300),
        operator_token: Some(OPERATOR.into()),
        host_ips: vec!["10.1.1.1".parse().expect("ip")],
        ..Default::default()
    };
    let mut config = config;
    tune(&mut config);
    let client = config.client().expect("client");
    let (tx, rx) = watch::channel(Arc::new(view(&[1, 2])));
    let shared = Arc::new(Shared::new(
        config,
        client,
        gossip,
        "127.0.0.1".parse().expect("ip"),
        rx,
        LocalEndpoints::default(),
        0,
        stop.child_token(),
    ));
    Fixture {
        app: router(shared.clone()),
        shared,
        tx,
        stop,
    }
}

const OPERATOR: &str = "the-operator-token";

async fn send(
    app: &Router,
    method: &str,
    uri: &str,
    body: &str,
) -> (StatusCode, HeaderMapOut, Value) {
    send_with(app, method, uri, body, &[]).await
}

async fn send_with(
    app: &Router,
    method: &str,
    uri: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMapOut, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Body::from(body.to_string())).expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, v)
}

type HeaderMapOut = axum::http::HeaderMap;

fn hdr<'a>(h: &'a HeaderMapOut, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

#[tokio::test]
async fn every_answer_says_how_fresh_it_is() {
    let f = fixture().await;
    for uri in [
        "/v1/registration/web",
        "/v1/registration/unknown",
        "/v2/services",
        "/v2/catalog",
        "/v1/agent/members",
        "/v1/agent/self",
        "/live",
        "/ready",
        "/metrics",
        "/nope",
    ] {
        let (_, h, _) = send(&f.app, "GET", uri, "").await;
        assert_eq!(hdr(&h, HEADER_REGISTRY_AGE), "-1", "{uri}: never synced");
        assert_eq!(hdr(&h, HEADER_SOURCE), "registry", "{uri}");
    }
    let (status, _, v) = send(&f.app, "GET", "/v1/registration/web", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["hosts"].as_array().map(Vec::len), Some(2));
    let (status, _, v) = send(&f.app, "GET", "/v1/registration/Bad%20Name", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(v["error"]["code"].is_string());
    let (status, _, v) = send(&f.app, "GET", "/nope", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "route_not_found");
    f.stop.cancel();
}

#[tokio::test]
async fn blocking_waiters_past_the_bound_get_429_at_once_and_reads_still_answer() {
    let f = fixture_with(|c| c.max_blocking_waiters = 1).await;
    let (_, h, _) = send(&f.app, "GET", "/v2/catalog", "").await;
    let index: u64 = hdr(&h, HEADER_INDEX).parse().expect("index");
    let uri = format!("/v2/catalog?index={index}&wait=30s");
    let app = f.app.clone();
    let first = {
        let uri = uri.clone();
        tokio::spawn(async move { send(&app, "GET", &uri, "").await })
    };
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!first.is_finished(), "the first waiter waits");
    let (status, h, v) = send(&f.app, "GET", &uri, "").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["code"], "too_many_waiters");
    let retry: u64 = hdr(&h, "retry-after").parse().expect("Retry-After");
    assert!((1..=5).contains(&retry), "{retry}");
    // Reads that do not wait are not bounded.
    let (status, _, _) = send(&f.app, "GET", "/v2/catalog", "").await;
    assert_eq!(status, StatusCode::OK);
    // The first waiter answers on a change and gives its permit back.
    f.tx.send_replace(Arc::new(view(&[1, 2, 3])));
    let (status, _, _) = first.await.expect("joined");
    assert_eq!(status, StatusCode::OK);
    let (_, h, _) = send(&f.app, "GET", "/v2/catalog", "").await;
    let index = hdr(&h, HEADER_INDEX).to_string();
    let (status, _, _) = send(
        &f.app,
        "GET",
        &format!("/v2/catalog?index={index}&wait=50ms"),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "a freed permit admits a new waiter");
    f.stop.cancel();
}

#[tokio::test]
async fn eds_answers_304_when_current() {
    let f = fixture().await;
    let body = r#"{"version_info":"","resource_names":["web"]}"#;
    let (status, h, v) = send(&f.app, "POST", "/v3/discovery:endpoints", body).await;
    assert_eq!(status, StatusCode::OK);
    let version = v["version_info"].as_str().expect("version").to_string();
    assert_eq!(hdr(&h, HEADER_INDEX), version);
    assert_eq!(v["resources"][0]["cluster_name"], "web");
    let again = format!(r#"{{"version_info":"{version}","resource_names":["web"]}}"#);
    let (status, _, _) = send(&f.app, "POST", "/v3/discovery:endpoints", &again).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    let (status, _, _) = send(&f.app, "POST", "/v3/discovery:endpoints", "{").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    f.stop.cancel();
}

#[tokio::test]
async fn blocking_queries_wake_on_change_and_time_out_otherwise() {
    let f = fixture().await;
    let (_, h, _) = send(&f.app, "GET", "/v2/services/web", "").await;
    let index: u64 = hdr(&h, HEADER_INDEX).parse().expect("index");
    // Nothing changes: answered after the wait with the same index.
    let uri = format!("/v2/services/web?index={index}&wait=100ms");
    let (_, h, _) = send(&f.app, "GET", &uri, "").await;
    assert_eq!(hdr(&h, HEADER_INDEX), index.to_string());
    // A new view with the same endpoints does not wake it; a real change does.
    let uri = format!("/v2/services/web?index={index}&wait=30s");
    let app = f.app.clone();
    let waiter = tokio::spawn(async move { send(&app, "GET", &uri, "").await });
    f.tx.send_replace(Arc::new(view(&[1, 2])));
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    f.tx.send_replace(Arc::new(view(&[1, 2, 3])));
    let (_, h, v) = waiter.await.expect("joined");
    assert_ne!(hdr(&h, HEADER_INDEX), index.to_string());
    assert_eq!(v["hosts"].as_array().map(Vec::len), Some(3));
    let (status, _, _) = send(&f.app, "GET", "/v2/catalog?index=x", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    f.stop.cancel();
}

#[tokio::test]
async fn endpoints_register_and_deregister_at_runtime() {
    let f = fixture().await;
    let (status, _, v) = send(
        &f.app,
        "PUT",
        "/v1/agent/endpoints",
        r#"{"service":"api","port":9000,"tags":{"az":"zone-b"}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["ip_address"], "127.0.0.1", "the host's ip by default");
    let (_, _, v) = send(&f.app, "GET", "/v1/agent/endpoints", "").await;
    assert_eq!(v["endpoints"].as_array().map(Vec::len), Some(1));
    let (status, _, _) = send(&f.app, "PUT", "/v1/agent/endpoints", r#"{"port":0}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = send(&f.app, "DELETE", "/v1/agent/endpoints/api/9000", "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = send(&f.app, "DELETE", "/v1/agent/endpoints/api/9000", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, _, v) = send(&f.app, "GET", "/v1/agent/endpoints", "").await;
    assert_eq!(v["endpoints"].as_array().map(Vec::len), Some(0));
    f.stop.cancel();
}

/// A stand-in registry on loopback that refuses deletions with 503 while `down`, and
/// counts the ones it accepted.
async fn deleting_registry(
    down: Arc<std::sync::atomic::AtomicBool>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
) -> String {
    use std::sync::atomic::Ordering;
    let app = Router::new().route(
        "/v1/registration/{service}/{ip}",
        axum::routing::delete(move || {
            let (down, accepted) = (down.clone(), accepted.clone());
            async move {
                if down.load(Ordering::SeqCst) {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A withdrawal the registry could not take (down, paused) is not forgotten: it is sent
/// again until the registry confirms it, so no stale row outlives the tombstone's owner.
#[tokio::test]
async fn a_deregistration_the_registry_missed_is_retried_until_confirmed() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let down = Arc::new(AtomicBool::new(true));
    let accepted = Arc::new(AtomicUsize::new(0));
    let url = deleting_registry(down.clone(), accepted.clone()).await;
    let f = fixture_with(|c| c.registry = Some(url)).await;
    let body = r#"{"service":"api","port":9000}"#;
    let (status, _, _) = send(&f.app, "PUT", "/v1/agent/endpoints", body).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = send(&f.app, "DELETE", "/v1/agent/endpoints/api/9000", "").await;
    assert_eq!(status, StatusCode::OK);
    // The registry is down: the deletion stays pending, round after round.
    assert_eq!(crate::checkin::retry_deregistrations(&f.shared).await, 1);
    assert_eq!(crate::checkin::retry_deregistrations(&f.shared).await, 1);
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    // Back: the next round confirms it, and nothing more is sent after.
    down.store(false, Ordering::SeqCst);
    assert_eq!(crate::checkin::retry_deregistrations(&f.shared).await, 0);
    let sent = accepted.load(Ordering::SeqCst);
    assert!(sent >= 1, "the registry never got the deletion");
    assert_eq!(crate::checkin::retry_deregistrations(&f.shared).await, 0);
    assert_eq!(accepted.load(Ordering::SeqCst), sent);
    // Registered again before the registry heard of the withdrawal: nothing to delete.
    down.store(true, Ordering::SeqCst);
    send(&f.app, "PUT", "/v1/agent/endpoints", body).await;
    send(&f.app, "DELETE", "/v1/agent/endpoints/api/9000", "").await;
    send(&f.app, "PUT", "/v1/agent/endpoints", body).await;
    assert_eq!(crate::checkin::retry_deregistrations(&f.shared).await, 0);
    f.stop.cancel();
}

/// A local process may register endpoints only on this host's addresses: anything else
/// would be gossiped to every agent as this host's row. The operator token lifts that.
#[tokio::test]
async fn registrations_on_other_addresses_need_the_operator_token() {
    let f = fixture().await;
    let foreign = r#"{"service":"api","port":9000,"ip":"10.9.9.9"}"#;
    for headers in [
        &[][..],
        &[("authorization", "Bearer not-the-token")][..],
        &[("authorization", "the-operator-token")][..],
    ] {
        let (status, _, v) =
            send_with(&f.app, "PUT", "/v1/agent/endpoints", foreign, headers).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{headers:?}: {v}");
        assert_eq!(v["error"]["code"], "forbidden", "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(
            msg.contains("10.9.9.9") && msg.contains("operator token"),
            "{msg}"
        );
    }
    let (_, _, v) = send(&f.app, "GET", "/v1/agent/endpoints", "").await;
    assert_eq!(v["endpoints"].as_array().map(Vec::len), Some(0), "{v}");
    // The host's own addresses: the host ip (default), the gossip ip, `host_ips`.
    for body in [
        r#"{"service":"api","port":9001}"#,
        r#"{"service":"api","port":9002,"ip":"127.0.0.1"}"#,
        r#"{"service":"api","port":9003,"ip":"10.1.1.1"}"#,
    ] {
        let (status, _, v) = send(&f.app, "PUT", "/v1/agent/endpoints", body).await;
        assert_eq!(status, StatusCode::OK, "{body}: {v}");
    }
    let auth = format!("Bearer {OPERATOR}");
    let (status, _, v) = send_with(
        &f.app,
        "PUT",
        "/v1/agent/endpoints",
        foreign,
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["ip_address"], "10.9.9.9");
    let (_, _, v) = send(&f.app, "GET", "/v1/agent/endpoints", "").await;
    assert_eq!(v["endpoints"].as_array().map(Vec::len), Some(4), "{v}");
    f.stop.cancel();
}

/// DNS rebinding: a request whose Host names some site is refused, whatever the route;
/// `localhost`, address literals and no Host at all are served.
#[tokio::test]
async fn requests_whose_host_names_another_site_are_refused() {
    let f = fixture().await;
    for host in [
        "evil.example:7701",
        "evil.example",
        "localhost.evil.example",
    ] {
        for (method, uri, body) in [
            ("GET", "/v1/registration/web", ""),
            ("GET", "/ui/", ""),
            (
                "PUT",
                "/v1/agent/endpoints",
                r#"{"service":"api","port":9000}"#,
            ),
        ] {
            let (status, _, v) = send_with(&f.app, method, uri, body, &[("host", host)]).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{host} {method} {uri}: {v}");
            assert_eq!(v["error"]["code"], "forbidden", "{v}");
        }
    }
    let (_, _, v) = send(&f.app, "GET", "/v1/agent/endpoints", "").await;
    assert_eq!(v["endpoints"].as_array().map(Vec::len), Some(0), "{v}");
    for host in [
        "localhost:7701",
        "127.0.0.1:7701",
        "[::1]:7701",
        "localhost",
    ] {
        let (status, _, v) =
            send_with(&f.app, "GET", "/v1/registration/web", "", &[("host", host)]).await;
        assert_eq!(status, StatusCode::OK, "{host}: {v}");
    }
    let (status, _, _) = send(&f.app, "GET", "/v1/registration/web", "").await;
    assert_eq!(status, StatusCode::OK, "no Host header");
    f.stop.cancel();
}

#[tokio::test]
async fn draining_hosts_are_listed_only_on_request_and_tagged() {
    let f = fixture().await;
    let owner: std::net::SocketAddr = "127.0.0.2:7702".parse().expect("addr");
    let rows = |ports: &[u16], deregistered: Vec<EndpointKey>| GossipView {
        deregistered,
        endpoints: ports
            .iter()
            .map(|p| ViewEntry {
                endpoint: ep(*p).into(),
                source: Source::Gossip { owner },
            })
            .collect(),
        snapshots: Vec::new(),
        members: vec![gossip::MemberInfo {
            id: gossip::NodeId::new(owner, 1),
            active: true,
        }],
    };
    let mut m = Merger::new("127.0.0.1:1".parse().expect("addr"), 0, Vec::new());
    m.merge(&rows(&[1, 2], Vec::new()), 1);
    f.tx.send_replace(Arc::new(m.merge(&rows(&[1], vec![ep(2).key()]), 2)));

    let port_tags = |v: &Value| -> Vec<(u64, Value)> {
        v["hosts"]
            .as_array()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h["port"].as_u64().unwrap_or(0),
                            h["tags"]["draining"].clone(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    for uri in ["/v1/registration/web", "/v2/services/web"] {
        let (status, _, v) = send(&f.app, "GET", uri, "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            port_tags(&v),
            vec![(1, Value::Null)],
            "{uri}: plain listing"
        );
        for q in ["draining=true", "draining=1&index=0"] {
            let (status, _, v) = send(&f.app, "GET", &format!("{uri}?{q}"), "").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                port_tags(&v),
                vec![(1, Value::Null), (2, serde_json::json!("true"))],
                "{uri}?{q}"
            );
        }
        let (status, _, v) = send(&f.app, "GET", &format!("{uri}?draining=maybe"), "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {v}");
        assert!(v.to_string().contains("draining"), "{v}");
    }
    f.stop.cancel();
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_agent_and_gossip_series() {
    let f = fixture().await;
    for _ in 0..3 {
        send(&f.app, "GET", "/v1/registration/web", "").await;
    }
    let req = Request::builder()
        .uri("/metrics")
        .body(Body::empty())
        .expect("request");
    let resp = f.app.clone().oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    let value = |series: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    };
    // The three listings, counted before /metrics itself was answered.
    assert!(
        value("tidings_agent_requests_total").is_some_and(|v| v >= 3.0),
        "{text}"
    );
    assert_eq!(value("tidings_agent_view_endpoints"), Some(2.0), "{text}");
    assert_eq!(
        value("tidings_agent_draining_endpoints"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value("tidings_agent_registry_age_seconds"),
        Some(-1.0),
        "{text}"
    );
    assert!(
        value("tidings_gossip_dropped_unknown_key_total").is_some(),
        "{text}"
    );
    assert!(
        text.contains("# TYPE tidings_agent_checkins_total counter"),
        "{text}"
    );
    f.stop.cancel();
}

#[tokio::test]
async fn the_dashboard_and_its_assets_are_served_with_a_strict_csp() {
    let f = fixture().await;
    for (uri, ct, needle) in [
        (
            "/ui",
            "text/html; charset=utf-8",
            "<title>Tidings agent</title>",
        ),
        ("/ui/", "text/html; charset=utf-8", "/ui/app.js"),
        (
            "/ui/app.js",
            "text/javascript; charset=utf-8",
            "/v1/agent/members",
        ),
        (
            "/ui/common.js",
            "text/javascript; charset=utf-8",
            "textContent",
        ),
        ("/ui/ui.css", "text/css; charset=utf-8", "table"),
    ] {
        let req = Request::builder()
            .uri(uri)
            .body(Body::empty())
            .expect("request");
        let resp = f.app.clone().oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK, "{uri}");
        let h = resp.headers().clone();
        assert_eq!(hdr(&h, "content-type"), ct, "{uri}");
        let csp = hdr(&h, "content-security-policy");
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe"),
            "{uri}: {csp}"
        );
        assert_eq!(hdr(&h, "cache-control"), "no-store", "{uri}");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains(needle),
            "{uri} lacks {needle}"
        );
    }
    let (status, _, v) = send(&f.app, "GET", "/ui/missing.js", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(v["error"]["code"], "route_not_found");
    f.stop.cancel();
}
