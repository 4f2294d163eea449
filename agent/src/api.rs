//! The local API (docs/ARCHITECTURE.md#what-the-agent-answers), served from the merged view on loopback: the registry's
//! v1, v2 blocking and EDS routes, plus the agent's own routes. Every answer carries
//! `X-Tidings-Registry-Age-Ms` and `X-Tidings-Source`.
//!
//! `X-Tidings-Registry-Age-Ms` is how long, in ms, since this agent last knew its registry
//! data was current (`-1`: never). An authoritative catalog answer makes it current; so does,
//! all along, a blocking catalog query that is waiting at a registry that answered the
//! previous one (the registry would have answered had anything changed), so with a healthy
//! registry the header stays near 0 however long the query waits. Once a query fails, or has
//! been out longer than its wait plus margin, the age grows from the last moment known
//! current. Answers from a registry still warming up do not make the data current (they may
//! miss removals). A registry snapshot a peer relayed through gossip counts from its date,
//! but never from later than this agent first saw it. The disk cache keeps the moment, so a
//! restarted agent goes on counting from it (unless it lies ahead of the agent's clock,
//! which was then stepped back: `-1` until the registry answers). `/metrics` reports the same age in seconds
//! (`tidings_agent_registry_age_seconds`, `-1`: never).
//!
//! `X-Tidings-Source` is `registry`, `gossip` or `cache`: the weakest provenance among the
//! hosts of the answer — see [`crate::view`] — or, for answers that list no hosts, of the
//! whole view.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use discovery::ApiError;
use discovery::http::blocking::{self, Blocking, BlockingParams};
use schema::agent_api::{
    AgentEndpoints, AgentSelf, CacheState, Live, LocalEndpoint, Member, MemberState, Members,
    Ready, ViewSummary,
};
use schema::api::{EndpointSpec, ServiceSummary, ServicesResponse, V1Host};
use schema::eds::DiscoveryRequest;
use schema::wire::{HEADER_INDEX, HEADER_REGISTRY_AGE, HEADER_SOURCE};
use schema::{EndpointKey, ServiceName, ValidationError};
use serde::Deserialize;

use crate::answers;
use crate::state::Shared;
use crate::view::{MergedView, Provenance};

/// Longest `wait` of a blocking query (as the registry's default).
const MAX_WAIT: Duration = Duration::from_secs(300);

type AppState = Arc<Shared>;

/// The local API's router. Tests drive it with `tower::ServiceExt::oneshot`.
/// Large answers are compressed as the client's `Accept-Encoding` asks ([`serve::compression`]).
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/registration/{service}", get(v1_listing))
        .route("/v2/services", get(v2_services))
        .route("/v2/services/{service}", get(v2_service))
        .route("/v2/catalog", get(v2_catalog))
        .route("/v3/discovery:endpoints", post(eds_endpoints))
        .route("/v1/agent/members", get(members))
        .route("/v1/agent/self", get(self_info))
        .route("/v1/agent/endpoints", get(list_local).put(register))
        .route("/v1/agent/endpoints/{service}/{port}", delete(deregister))
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/ui", get(crate::ui::handler))
        .route("/ui/", get(crate::ui::handler))
        .route("/ui/{asset}", get(crate::ui::handler))
        .fallback(no_route)
        .layer(middleware::from_fn_with_state(shared.clone(), freshness))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            crate::guard::check_host,
        ))
        .layer(serve::compression())
        .with_state(shared)
}

async fn no_route(req: Request) -> ApiError {
    ApiError::NoRoute(format!("{} {}", req.method(), req.uri().path()))
}

/// Adds the freshness headers to every answer that has not set its own source.
async fn freshness(State(shared): State<AppState>, req: Request, next: Next) -> Response {
    shared.metrics.requests.increment(1);
    let mut resp = next.run(req).await;
    let age = shared
        .registry_age_ms()
        .map_or_else(|| HeaderValue::from_static("-1"), HeaderValue::from);
    let h = resp.headers_mut();
    h.insert(HEADER_REGISTRY_AGE, age);
    if !h.contains_key(HEADER_SOURCE) {
        let view = shared.current_view();
        let source = view.source_of(view.all_hosts());
        h.insert(HEADER_SOURCE, HeaderValue::from_static(source.as_str()));
    }
    resp
}

fn with_meta(mut resp: Response, index: u64, source: Provenance) -> Response {
    let h = resp.headers_mut();
    h.insert(HEADER_INDEX, HeaderValue::from(index));
    h.insert(HEADER_SOURCE, HeaderValue::from_static(source.as_str()));
    resp
}

fn service_name(s: String) -> Result<ServiceName, ApiError> {
    Ok(ServiceName::new(s)?)
}

/// A kept (or computed) JSON body as an answer.
fn json_body(body: Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

#[derive(Debug, Default, Deserialize)]
struct ListingQuery {
    draining: Option<String>,
}

/// `draining=true` adds hosts deregistered within the last minute, tagged
/// `draining = "true"` (see [`crate::view::DRAIN_LISTING_MS`]); other parameters are the
/// blocking query's or ignored. The registry ignores it, so one client works with both.
fn wants_draining(query: Option<&str>) -> Result<bool, ApiError> {
    let q: ListingQuery = match query {
        Some(q) => serde_urlencoded::from_str(q)
            .map_err(|e| ApiError::BadRequest(format!("bad query: {e}")))?,
        None => ListingQuery::default(),
    };
    match q.draining.as_deref() {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(other) => Err(ApiError::BadRequest(format!(
            "draining must be true or false, got {other:?}"
        ))),
    }
}

/// `GET /v1/registration/{service}`: the v1 listing (unknown service: `hosts: []`);
/// `?draining=true` as in [`wants_draining`].
async fn v1_listing(
    State(shared): State<AppState>,
    Path(service): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let service = service_name(service)?;
    let draining = wants_draining(query.as_deref())?;
    Ok(listing_answer(
        &shared,
        &service,
        &shared.current_view(),
        draining,
    ))
}

/// The v1 listing of `service` with its index and source headers.
fn listing_answer(
    shared: &Shared,
    service: &ServiceName,
    view: &MergedView,
    draining: bool,
) -> Response {
    let body = answers::listing(view, service, &shared.config.env, draining);
    with_meta(
        json_body(body),
        view.service_index(service),
        view.source_of(view.hosts(service)),
    )
}

/// `GET /v2/services`: every service with hosts, and how many.
async fn v2_services(State(shared): State<AppState>) -> Response {
    let view = shared.current_view();
    let services = view
        .services()
        .map(|(s, h)| ServiceSummary {
            service: s.to_string(),
            hosts: h.hosts.len(),
        })
        .collect();
    let body = Json(ServicesResponse {
        index: view.index(),
        services,
    });
    with_meta(
        body.into_response(),
        view.index(),
        view.source_of(view.all_hosts()),
    )
}

/// Answers at once unless `index` is current; then waits, as the registry does, until the
/// index moves, the jittered wait elapses, or the agent drains.
async fn block(
    shared: &Shared,
    query: Option<&str>,
    index_of: impl Fn(&MergedView) -> u64,
) -> Result<Arc<MergedView>, ApiError> {
    let params = BlockingParams::parse(query)?;
    let cfg = Blocking {
        waiters: &shared.waiters,
        limit: shared.config.max_blocking_waiters,
        max_wait: MAX_WAIT,
        // The view changes only through its watch channel.
        recheck: None,
        // A local answer is cheap, and the apps reading it want a change as soon as the
        // agent has it (the registry already coalesced what it sent the agent).
        coalesce: Duration::ZERO,
        draining: &shared.draining,
        refused: shared.metrics.api_refused_waiters.clone(),
        waiting: shared.metrics.blocking.clone(),
    };
    let read = || async { Ok(shared.current_view()) };
    blocking::block(cfg, shared.view.clone(), params, read, |v| index_of(v)).await
}

/// `GET /v2/services/{service}?index=I&wait=30s`: the v1 listing, blocking.
async fn v2_service(
    State(shared): State<AppState>,
    Path(service): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let service = service_name(service)?;
    let draining = wants_draining(query.as_deref())?;
    let view = block(&shared, query.as_deref(), |v| v.service_index(&service)).await?;
    Ok(listing_answer(&shared, &service, &view, draining))
}

/// `GET /v2/catalog?index=I&wait=30s`: every service at once, blocking.
async fn v2_catalog(
    State(shared): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let view = block(&shared, query.as_deref(), MergedView::index).await?;
    // The agent's data is not confirmed by the registry right now.
    let stale = !shared.registry_ok();
    let now = schema::timefmt::unix_ms_now();
    let body = answers::catalog(&view, &shared.config.env, now, stale);
    let source = view.source_of(view.all_hosts());
    Ok(with_meta(json_body(body), view.index(), source))
}

/// `POST /v3/discovery:endpoints`: Envoy EDS; the service's index is the version, and a
/// current `version_info` is answered 304 with an empty body.
async fn eds_endpoints(State(shared): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let (req, name) = DiscoveryRequest::parse(&body)?;
    let service = service_name(name.clone())?;
    let view = shared.current_view();
    let index = view.service_index(&service);
    let version = index.to_string();
    let hosts = view.hosts(&service);
    let source = view.source_of(hosts);
    if req.version_info == version {
        return Ok(with_meta(
            StatusCode::NOT_MODIFIED.into_response(),
            index,
            source,
        ));
    }
    let body = answers::eds(&view, &service, &name);
    Ok(with_meta(json_body(body), index, source))
}

/// `GET /v1/agent/members`: the gossip members this agent knows, itself first.
async fn members(State(shared): State<AppState>) -> Json<Members> {
    let me = shared.gossip.id();
    let mut list = vec![Member {
        addr: me.addr.to_string(),
        bump: me.bump,
        epoch: me.epoch,
        is_self: true,
        state: MemberState::Alive,
    }];
    let mut others = shared.gossip.members();
    others.sort_by_key(|m| m.id.addr);
    list.extend(others.iter().map(|m| Member {
        addr: m.id.addr.to_string(),
        bump: m.id.bump,
        epoch: m.id.epoch,
        is_self: false,
        state: if m.active {
            MemberState::Alive
        } else {
            MemberState::Down
        },
    }));
    Json(Members { members: list })
}

/// `GET /v1/agent/self`: who this agent is and how fresh its view is.
async fn self_info(State(shared): State<AppState>) -> Json<AgentSelf> {
    let view = shared.current_view();
    let endpoints = shared
        .local()
        .all()
        .iter()
        .map(|e| LocalEndpoint {
            addr: e.socket_addr().to_string(),
            service: e.service.to_string(),
        })
        .collect();
    Json(AgentSelf {
        cache: CacheState {
            entries_pending: view
                .all_hosts()
                .filter(|h| h.provenance == Provenance::Cache)
                .count(),
            stored_index: shared
                .cache_index
                .load(std::sync::atomic::Ordering::Relaxed),
        },
        endpoints,
        epoch: shared.gossip.id().epoch,
        gossip_addr: shared.gossip_addr.to_string(),
        host_ip: shared.host_ip.to_string(),
        registry: shared.config.registry.clone(),
        registry_age_ms: shared.registry_age_ms(),
        registry_digest: shared.registry_digest(),
        registry_ok: shared.registry_ok(),
        view: ViewSummary {
            hosts: view.len(),
            index: view.index(),
            services: view.services().count(),
            source: view.source_of(view.all_hosts()).as_str().to_string(),
        },
        zone: shared.config.zone.clone(),
    })
}

fn local_json(shared: &Shared) -> Json<AgentEndpoints> {
    let endpoints = shared
        .local()
        .all()
        .iter()
        .map(|e| V1Host::from_endpoint(e, 0))
        .collect();
    Json(AgentEndpoints { endpoints })
}

/// `GET /v1/agent/endpoints`: this host's endpoints.
async fn list_local(State(shared): State<AppState>) -> Json<AgentEndpoints> {
    local_json(&shared)
}

/// `PUT /v1/agent/endpoints`: registers (or updates) an endpoint of this host; `ip`
/// defaults to the host's, and another address needs the operator token (403 otherwise,
/// see [`crate::guard`]). Gossiped at once and checked in right away.
async fn register(
    State(shared): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let spec: EndpointSpec = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Validation(ValidationError::Malformed(e.to_string())))?;
    let mut ep = spec.into_endpoint(None, Some(shared.host_ip))?;
    crate::guard::check_registration(&shared, ep.ip, &headers)?;
    if ep.tags.az.is_none() {
        ep.tags.az = shared
            .config
            .zone
            .clone()
            .and_then(|z| schema::TagValue::new(z).ok());
    }
    tracing::info!(endpoint = %ep.key(), "endpoint registered through the local API");
    shared.local().runtime.insert(ep.key(), ep.clone());
    shared.local_changed().await;
    Ok(Json(V1Host::from_endpoint(&ep, 0)).into_response())
}

#[derive(Debug, Default, Deserialize)]
struct IpQuery {
    ip: Option<String>,
}

/// `DELETE /v1/agent/endpoints/{service}/{port}[?ip=]`: withdraws an endpoint registered at
/// runtime: a tombstone in gossip and a deregistration in the registry.
async fn deregister(
    State(shared): State<AppState>,
    Path((service, port)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let q: IpQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("bad query: {e}")))?;
    let key = EndpointKey {
        service: service_name(service)?,
        ip: match q.ip {
            Some(ip) => schema::api::parse_ip(&ip)?,
            None => shared.host_ip,
        },
        port: schema::api::parse_port(&port)?,
    };
    let removed = shared.local().runtime.remove(&key);
    let Some(ep) = removed else {
        return Err(ApiError::NotFound(format!(
            "{key} is not an endpoint registered through this agent's API"
        )));
    };
    tracing::info!(endpoint = %key, "endpoint deregistered through the local API");
    shared.local_changed().await;
    // In the background: the local answer must not wait on a slow or absent registry. A
    // failed deletion is retried every check-in round until the registry confirms it.
    crate::checkin::note_withdrawn(&shared, ep);
    let bg = shared.clone();
    tokio::spawn(async move { crate::checkin::retry_deregistrations(&bg).await });
    Ok(local_json(&shared).into_response())
}

async fn live() -> Json<Live> {
    Json(Live::new())
}

/// `GET /ready`: 503 once draining. The view is ready from the start — served from the
/// disk cache, gossip or the registry, whichever is first.
async fn ready(State(shared): State<AppState>) -> Response {
    if shared.draining.is_cancelled() {
        let body = schema::api::ErrorBody::new("draining", "the agent is shutting down");
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    let view = shared.current_view();
    Json(Ready::new(view.len())).into_response()
}

async fn metrics(State(shared): State<AppState>) -> Response {
    let mut resp = shared.render_metrics().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
#[path = "api_tests.rs"]
pub(crate) mod tests;
