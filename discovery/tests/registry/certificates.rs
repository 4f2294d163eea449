//! Gossip certificates on check-in (issue #17): a check-in carrying an agent's owner key is
//! answered with the registry's certificate for exactly what its token covers.

use std::time::Duration;

use axum::http::StatusCode;
use discovery::{RegistryConfig, operator_token, scoped_token};
use schema::ServiceName;
use schema::cert::{Certificate, SigningKey};
use serde_json::json;

use crate::common::Harness;

const SECRET: &str = "s3cret-s3cret-s3cret";
const JSON: (&str, &str) = ("content-type", "application/json");

fn signing(key: Option<&SigningKey>) -> Harness {
    Harness::with_config(RegistryConfig {
        secret: Some(SECRET.into()),
        signing_key: key.map(SigningKey::to_base64),
        ..Default::default()
    })
}

fn body(ips: &[&str], gossip_key: Option<&str>) -> String {
    let eps: Vec<_> = ips
        .iter()
        .map(|ip| json!({"service": "web", "ip": ip, "port": 80}))
        .collect();
    match gossip_key {
        Some(k) => json!({"endpoints": eps, "gossip_key": k}),
        None => json!({"endpoints": eps}),
    }
    .to_string()
}

#[tokio::test]
async fn a_check_in_with_an_owner_key_gets_a_certificate_scoped_like_its_token() {
    let registry = SigningKey::generate();
    let owner = SigningKey::generate();
    let h = signing(Some(&registry));
    let web = ServiceName::new("web").expect("name");
    let token = format!(
        "Bearer {}",
        scoped_token(
            SECRET,
            "10.0.0.7".parse().expect("ip"),
            std::slice::from_ref(&web)
        )
    );
    let auth = [JSON, ("authorization", token.as_str())];
    let key = owner.public().to_base64();
    let r = h
        .call(
            "POST",
            "/v2/checkin",
            &auth,
            body(&["10.0.0.7"], Some(&key)),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let text = r.json()["gossip_certificate"].as_str().map(str::to_string);
    let cert = Certificate::from_base64(&text.expect("a certificate")).expect("decodes");
    assert!(cert.signed_by(&registry.public()));
    assert_eq!(cert.body.owner_key, owner.public());
    assert_eq!(
        cert.body.ip,
        "10.0.0.7".parse::<std::net::IpAddr>().expect("ip")
    );
    assert_eq!(cert.body.services, Some(vec![web]));
    let validity = cert.body.not_after_ms - cert.body.not_before_ms;
    assert_eq!(
        validity,
        (Duration::from_secs(24 * 3600) + Duration::from_secs(300)).as_millis() as u64
    );

    // Without a key (cron, older agents): no certificate, nothing else changes.
    let r = h
        .call("POST", "/v2/checkin", &auth, body(&["10.0.0.7"], None))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json().get("gossip_certificate").is_none());
    // A malformed key is refused.
    h.call(
        "POST",
        "/v2/checkin",
        &auth,
        body(&["10.0.0.7"], Some("nope")),
    )
    .await
    .assert_error(400, "bad_request");
}

#[tokio::test]
async fn no_certificate_for_several_ips_or_without_a_signing_key() {
    let registry = SigningKey::generate();
    let key = SigningKey::generate().public().to_base64();
    let op = format!("Bearer {}", operator_token(SECRET));
    let auth = [JSON, ("authorization", op.as_str())];
    let two = body(&["10.0.0.7", "10.0.0.8"], Some(&key));
    let r = signing(Some(&registry))
        .call("POST", "/v2/checkin", &auth, two)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json().get("gossip_certificate").is_none());
    let one = body(&["10.0.0.7"], Some(&key));
    let r = signing(None).call("POST", "/v2/checkin", &auth, one).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json().get("gossip_certificate").is_none());
}
