//! The v2 routes: batch check-in, the service list, and the blocking queries agents and
//! proxies watch (`?index=I&wait=30s`, Consul-style).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use schema::ServiceName;
use schema::api::{
    Catalog, CheckInRequest, CheckInResponse, ServiceSummary, ServicesResponse, V1Host, V1Listing,
};
use serde::Deserialize;

use crate::auth::Scope;
use crate::config::duration;
use crate::errors::ApiError;
use crate::policy;
use crate::registry::{Registry, View};
use crate::router::{ApiPath, Body, with_view_headers};
use crate::routes_v1::hosts;

/// `POST /v2/checkin`: all of one host's endpoints at once.
pub async fn checkin(
    State(registry): State<Registry>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Json<CheckInResponse>, ApiError> {
    let grant = registry.inner.auth.grant(&headers)?;
    let endpoints = CheckInRequest::parse(&body)?;
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
    }))
}

/// `GET /v2/services`: every service with a visible endpoint, and how many.
pub async fn services(State(registry): State<Registry>) -> Result<Response, ApiError> {
    let view = registry.read_catalog().await?;
    let mut counts: BTreeMap<&ServiceName, usize> = BTreeMap::new();
    for r in &view.data.rows {
        *counts.entry(&r.endpoint.service).or_default() += 1;
    }
    let services = counts
        .into_iter()
        .map(|(s, hosts)| ServiceSummary {
            service: s.to_string(),
            hosts,
        })
        .collect();
    let body = ServicesResponse {
        index: view.data.index,
        services,
    };
    Ok(with_view_headers(Json(body).into_response(), &view))
}

#[derive(Debug, Default, Deserialize)]
struct BlockingQuery {
    index: Option<String>,
    wait: Option<String>,
}

/// `index` and `wait` of a blocking query; other parameters are ignored, as Consul does.
/// Shared with the agent's local API, which answers the same queries.
pub fn blocking_params(query: Option<&str>) -> Result<(Option<u64>, Option<Duration>), ApiError> {
    let q: BlockingQuery = match query {
        Some(q) => serde_urlencoded::from_str(q)
            .map_err(|e| ApiError::BadRequest(format!("bad query: {e}")))?,
        None => BlockingQuery::default(),
    };
    let index =
        match q.index.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            Some(s) => Some(s.parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!("index must be an integer, got {s:?}"))
            })?),
            None => None,
        };
    let wait = match q.wait.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => {
            Some(duration::parse(s).map_err(|e| ApiError::BadRequest(format!("wait: {e}")))?)
        }
        None => None,
    };
    Ok((index, wait))
}

/// Answers at once unless the caller's `index` is current; then waits until the index moves,
/// the (capped, jittered) wait elapses, or the registry drains. Local writes wake it through
/// the change signal; it also re-reads every `recheck_interval`, which notices expiries and
/// writes by other registries sharing the store.
async fn block<F, Fut>(
    registry: &Registry,
    index: Option<u64>,
    wait: Option<Duration>,
    read: F,
) -> Result<View, ApiError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<View, ApiError>>,
{
    // Subscribe before the first read, so a change between the two is not missed.
    let mut changes = registry.subscribe();
    changes.borrow_and_update();
    let view = read().await?;
    let Some(index) = index else { return Ok(view) };
    if view.data.index != index {
        return Ok(view);
    }
    let cfg = registry.config();
    // Held for the whole wait and released on drop, also when the client goes away.
    let _permit = registry
        .inner
        .waiters
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            registry.inner.metrics.rejected("max_blocking_waiters");
            ApiError::TooManyWaiters {
                limit: cfg.max_blocking_waiters,
                // Jittered, so refused waiters do not all come back in the same second.
                retry_after_secs: policy::waiter_retry_after(rand::random::<f64>()),
            }
        })?;
    let wait = policy::blocking_wait(
        wait.unwrap_or(cfg.max_wait),
        cfg.max_wait,
        rand::random::<f64>(),
    );
    let deadline = tokio::time::Instant::now() + wait;
    let metrics = &registry.inner.metrics;
    metrics.blocking.increment(1.0);
    let _done = scopeguard(|| metrics.blocking.decrement(1.0));
    loop {
        let recheck = tokio::time::sleep(cfg.recheck_interval.min(wait));
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline) => return read().await,
            () = registry.draining().cancelled() => return read().await,
            res = changes.changed() => {
                if res.is_err() {
                    // The registry is gone; nothing more will change.
                    return read().await;
                }
            }
            () = recheck => {}
        }
        let view = read().await?;
        if view.data.index != index {
            return Ok(view);
        }
    }
}

struct Guard<F: FnMut()>(F);

impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Runs `f` when dropped, so the gauge is right even when the client goes away mid-wait.
fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}

/// `GET /v2/services/{service}?index=I&wait=30s`: the v1 listing, blocking.
pub async fn service(
    State(registry): State<Registry>,
    ApiPath(service): ApiPath<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let service = ServiceName::new(service)?;
    let (index, wait) = blocking_params(query.as_deref())?;
    let view = block(&registry, index, wait, || registry.read_service(&service)).await?;
    let listing = V1Listing {
        service: service.to_string(),
        env: registry.config().env.clone(),
        hosts: hosts(&view),
    };
    Ok(with_view_headers(Json(listing).into_response(), &view))
}

/// `GET /v2/catalog?index=I&wait=30s`: every service at once, blocking. What agents sync.
pub async fn catalog(
    State(registry): State<Registry>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (index, wait) = blocking_params(query.as_deref())?;
    let view = block(&registry, index, wait, || registry.read_catalog()).await?;
    let mut services: BTreeMap<String, Vec<V1Host>> = BTreeMap::new();
    for r in &view.data.rows {
        let host = V1Host::from_endpoint(&r.endpoint, r.last_check_in_ms);
        services
            .entry(r.endpoint.service.to_string())
            .or_default()
            .push(host);
    }
    let body = Catalog {
        index: view.data.index,
        generated_at_ms: registry.now_ms(),
        warming: registry.is_warming(),
        stale: view.stale(),
        services,
    };
    Ok(with_view_headers(Json(body).into_response(), &view))
}
