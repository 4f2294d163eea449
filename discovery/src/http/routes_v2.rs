//! The v2 routes: batch check-in, the service list, and the blocking queries agents and
//! proxies watch (`?index=I&wait=30s`, Consul-style).

use std::collections::HashSet;
use std::net::IpAddr;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::response::Response;
use schema::ServiceName;
use schema::api::{CheckInRequest, CheckInResponse};

use crate::auth::Scope;
use crate::errors::ApiError;
use crate::http::blocking::{Blocking, BlockingParams, block};
use crate::http::router::{ApiPath, HeadersAndBody};
use crate::http::{answers, listing_sigs};
use crate::registry::{Registry, View};

/// How far back a certificate's validity starts, for receivers whose clock is behind.
const CERT_BACKDATE_MS: u64 = 5 * 60 * 1000;

/// `POST /v2/checkin`: all of one host's endpoints at once.
pub async fn checkin(
    State(registry): State<Registry>,
    HeadersAndBody(headers, body): HeadersAndBody,
) -> Result<Json<CheckInResponse>, ApiError> {
    let grant = registry.inner.auth.grant(&headers)?;
    let (endpoints, gossip_key) = CheckInRequest::parse_with_key(&body)?;
    let ips: Vec<IpAddr> = endpoints
        .iter()
        .map(|e| e.ip)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let services: Vec<&ServiceName> = endpoints
        .iter()
        .map(|e| &e.service)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    // No endpoints means no ip to check the token against: refused unless operator.
    registry.inner.auth.authorize(
        &grant,
        Scope::Hosts {
            ips: &ips,
            services: &services,
        },
    )?;
    // Before any write, so a malformed key is refused with nothing stored.
    let gossip_certificate = match gossip_key {
        Some(key) => certify(&registry, &key, &ips, grant.services())?,
        None => None,
    };
    let store_err = |e| ApiError::from_store(&e, registry.config().retry_after);
    if let Err(quota) = registry.admit(&endpoints).await {
        // Still renew what is already stored: a refused newcomer must not let the rest of
        // its host's endpoints expire.
        let held = registry.held(&endpoints);
        if !held.is_empty() {
            registry.check_in(&held).await.map_err(store_err)?;
        }
        return Err(quota.into());
    }
    let out = registry.check_in(&endpoints).await.map_err(store_err)?;
    Ok(Json(CheckInResponse {
        accepted: out.accepted,
        ttl_secs: registry.config().ttl.as_secs(),
        gossip_certificate,
    }))
}

/// A certificate for the agent's gossip owner `key`, bound to the one ip the (already
/// authorized) check-in wrote and to the token's services: exactly what the host may write
/// through the registry, it may then write through gossip. None when the registry has no
/// signing key or the check-in spans several ips (a certificate speaks for one host).
fn certify(
    registry: &Registry,
    key: &str,
    ips: &[IpAddr],
    services: Option<&[ServiceName]>,
) -> Result<Option<String>, ApiError> {
    let owner_key: schema::cert::PublicKey = key
        .parse()
        .map_err(|e| ApiError::BadRequest(format!("gossip_key: {e}")))?;
    let (Some(signer), [ip]) = (&registry.inner.signer, ips) else {
        return Ok(None);
    };
    let now = registry.inner.clock.now_ms();
    let validity =
        u64::try_from(registry.config().certificate_validity.as_millis()).unwrap_or(u64::MAX);
    let body = schema::cert::CertBody {
        owner_key,
        ip: *ip,
        services: services.map(<[ServiceName]>::to_vec),
        // Receivers' clocks may run a little behind ours.
        not_before_ms: now.saturating_sub(CERT_BACKDATE_MS),
        not_after_ms: now.saturating_add(validity),
    };
    Ok(schema::cert::Certificate::issue(signer, body).and_then(|c| c.to_base64()))
}

/// `GET /v2/services`: every service with a visible endpoint, and how many.
pub async fn services(State(registry): State<Registry>) -> Result<Response, ApiError> {
    let view = registry.read_catalog().await?;
    answers::respond(&registry, answers::services(&view), &view)
}

/// A blocking query on the registry: local writes wake it through the change signal, and so
/// do other registries' writes when the store learns of them (DynamoDB, from the table's
/// stream); it also re-reads every `recheck_interval`, which notices expiries (and other
/// registries' writes where the stream is not followed: the read then queries the table).
async fn block_on<F, Fut>(
    registry: &Registry,
    query: Option<&str>,
    read: F,
) -> Result<View, ApiError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<View, ApiError>>,
{
    let params = BlockingParams::parse(query)?;
    let cfg = registry.config();
    let metrics = &registry.inner.metrics;
    let blocking = Blocking {
        waiters: &registry.inner.waiters,
        limit: cfg.max_blocking_waiters,
        max_wait: cfg.max_wait,
        recheck: Some(cfg.recheck_interval),
        coalesce: cfg.blocking_coalesce,
        draining: registry.draining(),
        refused: metrics.rejected_counter("max_blocking_waiters"),
        waiting: metrics.blocking.clone(),
    };
    block(blocking, registry.subscribe(), params, read, |v: &View| {
        v.data.index
    })
    .await
}

/// `GET /v2/services/{service}?index=I&wait=30s`: the v1 listing, blocking.
pub async fn service(
    State(registry): State<Registry>,
    ApiPath(service): ApiPath<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let service = ServiceName::new(service)?;
    let view = block_on(&registry, query.as_deref(), || {
        registry.read_service(&service)
    })
    .await?;
    let body = answers::v1_listing(&view, &service, &registry.config().env);
    answers::respond(&registry, body, &view)
}

/// `GET /v2/catalog?index=I&wait=30s[&delta=true][&signed=true]`: every service at once,
/// blocking. What agents sync. With `delta=true`, the changes since `index` when the registry
/// still holds that view, else the whole catalog marked `full`; either with the catalog's
/// digest. With `signed=true` and a signing key, the registry's signature of each listing the
/// answer gives, for agents to gossip (`listing_sigs`); none while warming, where agents make
/// lower bounds of the answer rather than take it.
pub async fn catalog(
    State(registry): State<Registry>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let flags = Flags::parse(query.as_deref())?;
    let view = block_on(&registry, query.as_deref(), || registry.read_catalog()).await?;
    let (at, warming) = (registry.now_ms(), registry.is_warming());
    let current = (flags.delta || flags.signed).then(|| registry.catalog_entry(&view));
    let base = match (&current, flags.delta) {
        (Some(_), true) => BlockingParams::parse(query.as_deref())?
            .index
            .and_then(|i| registry.catalog_base(i)),
        _ => None,
    };
    let signatures = match (&registry.inner.signer, &current) {
        (Some(signer), Some(current)) if flags.signed && !warming => {
            listing_sigs::sign(signer, current, base.as_deref(), at)
        }
        _ => Default::default(),
    };
    let body = match &current {
        Some(current) if flags.delta => {
            answers::catalog_changes(&view, current, base.as_deref(), at, warming, &signatures)
        }
        _ => answers::catalog(&view, at, warming, &signatures),
    };
    answers::respond(&registry, body, &view)
}

/// The flags of `GET /v2/catalog`, each `true`/`1` or `false`/`0`/absent.
#[derive(Debug, Default)]
struct Flags {
    delta: bool,
    signed: bool,
}

impl Flags {
    fn parse(query: Option<&str>) -> Result<Flags, ApiError> {
        #[derive(Default, serde::Deserialize)]
        struct Raw {
            delta: Option<String>,
            signed: Option<String>,
        }
        let raw: Raw = match query {
            Some(q) => serde_urlencoded::from_str(q)
                .map_err(|e| ApiError::BadRequest(format!("bad query: {e}")))?,
            None => Raw::default(),
        };
        Ok(Flags {
            delta: flag("delta", raw.delta.as_deref())?,
            signed: flag("signed", raw.signed.as_deref())?,
        })
    }
}

fn flag(name: &str, value: Option<&str>) -> Result<bool, ApiError> {
    match value.map(str::trim) {
        None | Some("" | "false" | "0") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(other) => Err(ApiError::BadRequest(format!(
            "{name} must be true or false, got {other:?}"
        ))),
    }
}
