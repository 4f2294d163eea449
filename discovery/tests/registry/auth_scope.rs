//! Auth that says what it does: open registries say so, an empty check-in proves nothing,
//! and scoped tokens limit a host to the services they name.

use axum::body::Body;
use axum::http::StatusCode;
use discovery::{RegistryConfig, host_token, operator_token, scoped_token};
use schema::ServiceName;
use serde_json::json;

use crate::common::Harness;

const SECRET: &str = "s3cret-s3cret-s3cret";
const JSON: (&str, &str) = ("content-type", "application/json");
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

fn secured() -> Harness {
    Harness::with_config(RegistryConfig {
        secret: Some(SECRET.into()),
        ..Default::default()
    })
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn auth<'a>(content_type: (&'a str, &'a str), token: &'a str) -> [(&'a str, &'a str); 2] {
    [content_type, ("authorization", token)]
}

fn batch(endpoints: &[(&str, &str)]) -> String {
    let eps: Vec<_> = endpoints
        .iter()
        .map(|(s, ip)| json!({"service": s, "ip": ip, "port": 80}))
        .collect();
    json!({ "endpoints": eps }).to_string()
}

#[tokio::test]
async fn status_says_whether_writes_are_open() {
    let open = Harness::new().get("/v1/ops/status").await.json();
    assert_eq!(open["auth"], "open", "{open}");
    let tokens = secured().get("/v1/ops/status").await.json();
    assert_eq!(tokens["auth"], "tokens", "{tokens}");
    let doc = Harness::new().get("/openapi.json").await.json();
    let auth = &doc["components"]["schemas"]["Status"]["properties"]["auth"];
    assert_eq!(auth["enum"], json!(["open", "tokens"]), "{auth}");
    let js = Harness::new().get("/ui/app.js").await;
    assert!(String::from_utf8_lossy(&js.body).contains("s.auth"));
}

#[tokio::test]
async fn an_empty_check_in_with_a_host_token_is_refused() {
    let h = secured();
    let host = bearer(&host_token(SECRET, "10.0.0.7".parse().expect("ip")));
    // Any well-formed token used to pass: with no endpoints there was no ip to check it on.
    let forged = bearer(&"ab".repeat(32));
    for token in [&host, &forged] {
        h.call(
            "POST",
            "/v2/checkin",
            &[JSON, ("authorization", token)],
            batch(&[]),
        )
        .await
        .assert_error(403, "forbidden");
    }
    let op = bearer(&operator_token(SECRET));
    let r = h
        .call(
            "POST",
            "/v2/checkin",
            &[JSON, ("authorization", &op)],
            batch(&[]),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // Without a secret an empty check-in is as harmless as before.
    let r = Harness::new()
        .call("POST", "/v2/checkin", &[JSON], batch(&[]))
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn scoped_tokens_write_only_their_services_on_their_ip() {
    let h = secured();
    let ip = "10.0.0.7";
    let names = [
        ServiceName::new("web").expect("name"),
        ServiceName::new("api").expect("name"),
    ];
    let scoped = bearer(&scoped_token(SECRET, ip.parse().expect("ip"), &names));

    let r = h
        .call(
            "POST",
            "/v2/checkin",
            &auth(JSON, &scoped),
            batch(&[("web", ip), ("api", ip)]),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // Another service on the same ip, or the same service on another ip: 403, whole batch.
    for refused in [
        batch(&[("web", ip), ("db", ip)]),
        batch(&[("web", "10.0.0.8")]),
    ] {
        h.call("POST", "/v2/checkin", &auth(JSON, &scoped), refused)
            .await
            .assert_error(403, "forbidden");
    }
    assert!(h.get("/v1/registration/db").await.hosts().is_empty());

    // v1 writes are scoped the same way: check-in, weight and deregistration.
    h.call(
        "POST",
        "/v1/registration/db",
        &auth(FORM, &scoped),
        format!("ip={ip}&port=80"),
    )
    .await
    .assert_error(403, "forbidden");
    let r = h
        .call(
            "POST",
            "/v1/registration/web",
            &auth(FORM, &scoped),
            format!("ip={ip}&port=81"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    h.call(
        "POST",
        &format!("/v1/loadbalancing/db/{ip}"),
        &auth(FORM, &scoped),
        "weight=5",
    )
    .await
    .assert_error(403, "forbidden");
    let r = h
        .call(
            "POST",
            &format!("/v1/loadbalancing/web/{ip}"),
            &auth(FORM, &scoped),
            "weight=5",
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    h.call(
        "POST",
        "/v1/loadbalancing/web",
        &auth(FORM, &scoped),
        "weight=5",
    )
    .await
    .assert_error(403, "forbidden");
    h.register_with(&bearer(&operator_token(SECRET)), "db", ip)
        .await;
    h.call(
        "DELETE",
        &format!("/v1/registration/db/{ip}"),
        &[("authorization", &scoped)],
        Body::empty(),
    )
    .await
    .assert_error(403, "forbidden");
    let r = h
        .call(
            "DELETE",
            &format!("/v1/registration/api/{ip}"),
            &[("authorization", &scoped)],
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);

    // An IP-only host token keeps working for every service on its ip.
    let host = bearer(&host_token(SECRET, ip.parse().expect("ip")));
    let r = h
        .call(
            "POST",
            "/v2/checkin",
            &auth(JSON, &host),
            batch(&[("db", ip), ("web", ip)]),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
}
