//! lyft/discovery quirks the v1 routes keep: `auto_ip` (the caller's address stands in for a
//! missing `ip`) and tags merged, not replaced, on re-check-in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use discovery::{MemoryStore, Registry, RegistryConfig, SystemClock, serve};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::common::{Harness, Resp};
use crate::v1::urlencode;

/// A form check-in from `peer`, as the connection-info layer of `serve` would mark it.
async fn form_from(h: &Harness, peer: &str, xff: &[&str], body: &str) -> Resp {
    let mut b = Request::builder()
        .method("POST")
        .uri("/v1/registration/web")
        .header("content-type", "application/x-www-form-urlencoded");
    for hop in xff {
        b = b.header("x-forwarded-for", *hop);
    }
    let mut req = b.body(Body::from(body.to_string())).expect("request");
    let peer: SocketAddr = peer.parse().expect("peer");
    req.extensions_mut().insert(ConnectInfo(peer));
    h.send(req).await
}

#[tokio::test]
async fn auto_ip_takes_the_peer_address() {
    let h = Harness::new();
    let r = form_from(&h, "10.4.4.4:51000", &["6.6.6.6"], "auto_ip=true&port=80").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    // Without trusted proxies the header is the client's word and is ignored.
    assert_eq!(
        h.get("/v1/registration/web").await.hosts(),
        vec![("10.4.4.4".to_string(), 80)]
    );
    // An explicit ip wins over auto_ip, as in lyft.
    let r = form_from(
        &h,
        "10.4.4.4:51000",
        &[],
        "auto_ip=true&ip=10.5.5.5&port=81",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(h.get("/v1/registration/web").await.hosts().len(), 2);
    // JSON bodies too.
    let mut req = Request::builder()
        .method("POST")
        .uri("/v1/registration/web")
        .header("content-type", "application/json")
        .body(Body::from(json!({"auto_ip": true, "port": 82}).to_string()))
        .expect("request");
    req.extensions_mut().insert(ConnectInfo(
        "10.6.6.6:1".parse::<SocketAddr>().expect("peer"),
    ));
    assert_eq!(h.send(req).await.status, StatusCode::OK);
    assert!(
        h.get("/v1/registration/web")
            .await
            .hosts()
            .contains(&("10.6.6.6".to_string(), 82))
    );
    // A bad flag and no ip at all are clear 400s.
    form_from(&h, "10.4.4.4:1", &[], "auto_ip=perhaps&port=80")
        .await
        .assert_error(400, "bad_request");
    form_from(&h, "10.4.4.4:1", &[], "auto_ip=false&port=80")
        .await
        .assert_error(400, "invalid_request");
}

#[tokio::test]
async fn auto_ip_behind_trusted_proxies_takes_their_hop_of_x_forwarded_for() {
    let h = Harness::with_config(RegistryConfig {
        trusted_proxies: 1,
        ..RegistryConfig::default()
    });
    // The client forged a first hop; the one proxy appended the real address last.
    let r = form_from(
        &h,
        "10.0.0.254:4000",
        &["6.6.6.6, 192.168.7.7"],
        "auto_ip=true&port=80",
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        h.get("/v1/registration/web").await.hosts(),
        vec![("192.168.7.7".to_string(), 80)]
    );
    let two = Harness::with_config(RegistryConfig {
        trusted_proxies: 2,
        ..RegistryConfig::default()
    });
    let r = form_from(
        &two,
        "10.0.0.254:4000",
        &["6.6.6.6, 192.168.7.7", "10.0.0.9"],
        "auto_ip=true&port=80",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        two.get("/v1/registration/web").await.hosts(),
        vec![("192.168.7.7".to_string(), 80)]
    );
    // Malformed or missing X-Forwarded-For: 400 with a message that says why.
    for xff in [&["not-an-ip"][..], &["1.2.3.4, "], &[]] {
        let r = form_from(&h, "10.0.0.254:4000", xff, "auto_ip=true&port=80").await;
        r.assert_error(400, "bad_request");
        let msg = r.json()["error"]["message"].to_string();
        assert!(msg.contains("X-Forwarded-For"), "{msg}");
    }
    form_from(
        &two,
        "10.0.0.254:4000",
        &["1.2.3.4"],
        "auto_ip=true&port=80",
    )
    .await
    .assert_error(400, "bad_request");
}

/// Over a real socket: `serve` hands the handler the peer address.
#[tokio::test]
async fn auto_ip_over_a_socket_uses_the_connection_peer() {
    let cfg = RegistryConfig {
        shutdown_delay: Duration::from_millis(10),
        ..Default::default()
    };
    let registry = Registry::new(Arc::new(MemoryStore::new()), cfg, Arc::new(SystemClock));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(listener, registry, shutdown.clone()));

    let body = "auto_ip=true&port=8080";
    let req = format!(
        "POST /v1/registration/web HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
         content-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    conn.write_all(req.as_bytes()).await.expect("write");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let get = "GET /v1/registration/web HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    conn.write_all(get.as_bytes()).await.expect("write");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.expect("read");
    assert!(answer.contains(r#""ip_address":"127.0.0.1""#), "{answer}");

    shutdown.cancel();
    server.await.expect("join").expect("serve");
}

fn tags_form(ip: &str, tags: &serde_json::Value) -> String {
    format!("ip={ip}&port=80&tags={}", urlencode(&tags.to_string()))
}

#[tokio::test]
async fn v1_re_check_in_merges_tags_like_lyft() {
    let h = Harness::new();
    let first = json!({"az": "us-east-1a", "instance_id": "i-1", "region": "us-east-1",
        "team": "core", "canary": true, "load_balancing_weight": 40});
    let r = h
        .post_form("/v1/registration/web", &tags_form("10.0.0.1", &first))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // The cron line sends only the zone (and changes it): everything else is kept.
    let r = h
        .post_form(
            "/v1/registration/web",
            &tags_form("10.0.0.1", &json!({"az": "us-east-1b"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let tags = h.get("/v1/registration/web").await.json()["hosts"][0]["tags"].clone();
    assert_eq!(
        tags,
        json!({"az": "us-east-1b", "instance_id": "i-1", "region": "us-east-1",
            "team": "core", "canary": true, "load_balancing_weight": 40})
    );
    // No tags at all keeps them all; a sent key takes its new value.
    assert_eq!(
        h.post_form("/v1/registration/web", "ip=10.0.0.1&port=80")
            .await
            .status,
        StatusCode::OK
    );
    let r = h
        .post_form(
            "/v1/registration/web",
            &tags_form("10.0.0.1", &json!({"canary": false, "team": "edge"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let tags = h.get("/v1/registration/web").await.json()["hosts"][0]["tags"].clone();
    assert_eq!(tags["instance_id"], "i-1");
    assert_eq!(tags["canary"], false);
    assert_eq!(tags["team"], "edge");
    assert_eq!(tags["load_balancing_weight"], 40);
    // JSON v1 bodies merge too.
    let r = h
        .post_json(
            "/v1/registration/web",
            &json!({"ip": "10.0.0.1", "port": 80, "tags": {"x": "1"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let tags = h.get("/v1/registration/web").await.json()["hosts"][0]["tags"].clone();
    assert_eq!(
        (tags["x"].clone(), tags["az"].clone()),
        (json!("1"), json!("us-east-1b"))
    );
}

#[tokio::test]
async fn v2_check_in_still_replaces_tags() {
    let h = Harness::new();
    let r = h
        .post_form(
            "/v1/registration/web",
            &tags_form("10.0.0.1", &json!({"az": "a", "team": "core"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = h
        .post_json(
            "/v2/checkin",
            &json!({"endpoints": [{"service": "web", "ip": "10.0.0.1", "port": 80, "tags": {"az": "b"}}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let tags = h.get("/v1/registration/web").await.json()["hosts"][0]["tags"].clone();
    assert_eq!(tags["az"], "b");
    assert!(tags.get("team").is_none(), "{tags}");
}

#[tokio::test]
async fn a_merge_past_the_tag_limit_is_a_400_and_changes_nothing() {
    let h = Harness::new();
    let many: serde_json::Map<String, serde_json::Value> =
        (0..32).map(|i| (format!("k{i}"), json!("v"))).collect();
    let r = h
        .post_form(
            "/v1/registration/web",
            &tags_form("10.0.0.1", &serde_json::Value::Object(many)),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = h
        .post_form(
            "/v1/registration/web",
            &tags_form("10.0.0.1", &json!({"one_more": "v"})),
        )
        .await;
    r.assert_error(400, "invalid_request");
    let tags = h.get("/v1/registration/web").await.json()["hosts"][0]["tags"].clone();
    assert!(tags.get("one_more").is_none());
}
