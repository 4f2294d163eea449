use std::net::IpAddr;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use bytes::Bytes;
use discovery::{
    CheckInOutcome, ManualClock, MemoryStore, Registry, RegistryConfig, Store, StoreError,
    StoredEndpoint, router,
};
use http_body_util::BodyExt;
use schema::wire::{HEADER_INDEX, HEADER_STALE, HEADER_WARMING, TRUE};
use schema::{Endpoint, ServiceName, Weight};
use serde_json::Value;
use tower::ServiceExt;

/// A plausible epoch-ms start for the manual clock.
pub const T0: u64 = 1_767_225_600_000;

/// A `MemoryStore` that can be told to fail every call, as an unreachable DynamoDB would, or
/// to yield inside `list_all` as a networked store does; it counts `list_all` calls.
#[derive(Default)]
pub struct FlakyStore {
    pub inner: MemoryStore,
    pub failing: AtomicBool,
    pub slow: AtomicBool,
    /// Every call hangs forever (a blackholed network path).
    pub hang: AtomicBool,
    /// Only `list_all` (the fleet count's scan) fails: a throttled or failing scan while
    /// single-service reads still work.
    pub scans_failing: AtomicBool,
    pub list_all_calls: AtomicUsize,
}

impl FlakyStore {
    pub fn fail(&self, on: bool) {
        self.failing.store(on, Ordering::SeqCst);
    }

    async fn check(&self) -> Result<(), StoreError> {
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.failing.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("injected failure".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Store for FlakyStore {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn check_in(
        &self,
        endpoints: &[Endpoint],
        now_ms: u64,
    ) -> Result<CheckInOutcome, StoreError> {
        self.check().await?;
        self.inner.check_in(endpoints, now_ms).await
    }
    async fn check_in_merging_tags(
        &self,
        endpoint: &Endpoint,
        sent: &std::collections::BTreeSet<String>,
        now_ms: u64,
    ) -> Result<CheckInOutcome, StoreError> {
        self.check().await?;
        self.inner
            .check_in_merging_tags(endpoint, sent, now_ms)
            .await
    }
    async fn list_service(&self, service: &ServiceName) -> Result<Vec<StoredEndpoint>, StoreError> {
        self.check().await?;
        self.inner.list_service(service).await
    }
    async fn list_all(&self) -> Result<Vec<StoredEndpoint>, StoreError> {
        self.list_all_calls.fetch_add(1, Ordering::SeqCst);
        if self.slow.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        self.check().await?;
        if self.scans_failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected scan failure".into()));
        }
        self.inner.list_all().await
    }
    async fn list_repo(&self, repo: &str) -> Result<Vec<StoredEndpoint>, StoreError> {
        self.check().await?;
        self.inner.list_repo(repo).await
    }
    async fn deregister(
        &self,
        service: &ServiceName,
        ip: IpAddr,
        port: Option<NonZeroU16>,
    ) -> Result<usize, StoreError> {
        self.check().await?;
        self.inner.deregister(service, ip, port).await
    }
    async fn set_weight(
        &self,
        service: &ServiceName,
        ip: Option<IpAddr>,
        weight: Weight,
    ) -> Result<usize, StoreError> {
        self.check().await?;
        self.inner.set_weight(service, ip, weight).await
    }
    async fn delete_expired(&self, cutoff_ms: u64, max: usize) -> Result<usize, StoreError> {
        self.check().await?;
        self.inner.delete_expired(cutoff_ms, max).await
    }
}

pub struct Harness {
    pub registry: Registry,
    pub clock: Arc<ManualClock>,
    pub store: Arc<FlakyStore>,
    pub app: Router,
}

#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn index(&self) -> u64 {
        self.header(HEADER_INDEX)
            .and_then(|v| v.parse().ok())
            .expect("X-Tidings-Index")
    }

    pub fn stale(&self) -> bool {
        self.header(HEADER_STALE) == Some(TRUE)
    }

    pub fn warming(&self) -> bool {
        self.header(HEADER_WARMING) == Some(TRUE)
    }

    /// `(ip, port)` of every host in a v1 listing.
    pub fn hosts(&self) -> Vec<(String, u16)> {
        let v = self.json();
        v["hosts"]
            .as_array()
            .expect("hosts")
            .iter()
            .map(|h| {
                (
                    h["ip_address"].as_str().expect("ip").to_string(),
                    h["port"].as_u64().expect("port") as u16,
                )
            })
            .collect()
    }

    /// Asserts the body is the JSON error shape with `code`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status.as_u16(),
            status,
            "{:?}",
            String::from_utf8_lossy(&self.body)
        );
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
    }
}

impl Harness {
    pub fn new() -> Self {
        Self::with_config(RegistryConfig::default())
    }

    pub fn with_config(config: RegistryConfig) -> Self {
        Self::with_store(config, Arc::new(FlakyStore::default()))
    }

    pub fn with_store(config: RegistryConfig, store: Arc<FlakyStore>) -> Self {
        config.validate().expect("valid test config");
        let clock = Arc::new(ManualClock::new(T0));
        let registry = Registry::new(store.clone(), config, clock.clone());
        let app = router(registry.clone());
        Harness {
            registry,
            clock,
            store,
            app,
        }
    }

    pub async fn send(&self, req: Request<Body>) -> Resp {
        send(self.app.clone(), req).await
    }

    pub async fn call(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Resp {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(body.into()).expect("request")).await
    }

    pub async fn get(&self, uri: &str) -> Resp {
        self.call("GET", uri, &[], Body::empty()).await
    }

    pub async fn post_form(&self, uri: &str, body: &str) -> Resp {
        let ct = [("content-type", "application/x-www-form-urlencoded")];
        self.call("POST", uri, &ct, body.to_string()).await
    }

    pub async fn post_json(&self, uri: &str, body: &Value) -> Resp {
        self.call(
            "POST",
            uri,
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await
    }

    /// A form check-in of `service` on `ip`:80 with `authorization`; asserts it succeeded.
    pub async fn register_with(&self, authorization: &str, service: &str, ip: &str) {
        let headers = [
            ("content-type", "application/x-www-form-urlencoded"),
            ("authorization", authorization),
        ];
        let uri = format!("/v1/registration/{service}");
        let r = self
            .call("POST", &uri, &headers, format!("ip={ip}&port=80"))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }

    /// A lyft-style form check-in; asserts it succeeded.
    pub async fn register(&self, service: &str, ip: &str, port: u16) {
        let r = self
            .post_form(
                &format!("/v1/registration/{service}"),
                &format!("ip={ip}&port={port}"),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{:?}",
            String::from_utf8_lossy(&r.body)
        );
    }
}

pub async fn send(app: Router, req: Request<Body>) -> Resp {
    let resp = app.oneshot(req).await.expect("infallible");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub fn get_req(uri: &str) -> Request<Body> {
    Request::builder()
        .uri(uri)
        .body(Body::empty())
        .expect("request")
}

/// `web` on 10.0.0.{i}:80 for every `i` in `hosts`, in one v2 check-in; asserts it succeeded.
pub async fn fleet_check_in(h: &Harness, hosts: std::ops::Range<u8>) {
    let endpoints: Vec<_> = hosts
        .map(|i| serde_json::json!({"service": "web", "ip": format!("10.0.0.{i}"), "port": 80}))
        .collect();
    let r = h
        .post_json(
            "/v2/checkin",
            &serde_json::json!({ "endpoints": endpoints }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
}
