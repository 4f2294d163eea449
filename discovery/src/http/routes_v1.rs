//! The lyft/discovery-compatible v1 routes (Envoy v1 SDS reads `GET /v1/registration/...`).

use std::net::IpAddr;
use std::num::NonZeroU16;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use schema::api::{V1Checkin, V1Form, V1RepoListing, parse_ip, parse_port, parse_weight_body};
use schema::{RepoName, ServiceName};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Scope;
use crate::errors::ApiError;
use crate::http::answers::{self, hosts};
use crate::http::caller::{PeerAddr, caller_ip, resolve_auto_ip_form, resolve_auto_ip_json};
use crate::http::router::{ApiPath, Body, HeadersAndBody, is_json, with_view_headers};
use crate::registry::Registry;

fn store_error(registry: &Registry) -> impl Fn(crate::StoreError) -> ApiError + '_ {
    |e| ApiError::from_store(&e, registry.config().retry_after)
}

/// `GET /v1/registration/{service}`: live hosts; an unknown service is `200` with no hosts.
pub async fn list(
    State(registry): State<Registry>,
    ApiPath(service): ApiPath<String>,
) -> Result<Response, ApiError> {
    let service = ServiceName::new(service)?;
    let view = registry.read_service(&service).await?;
    let body = answers::v1_listing(&view, &service, &registry.config().env);
    answers::respond(&registry, body, &view)
}

/// `GET /v1/registration/repo/{repo}`.
pub async fn list_repo(
    State(registry): State<Registry>,
    ApiPath(repo): ApiPath<String>,
) -> Result<Response, ApiError> {
    let repo = RepoName::new(repo)?;
    let view = registry.read_repo(repo.as_str()).await?;
    let listing = V1RepoListing {
        service_repo_name: repo.to_string(),
        env: registry.config().env.clone(),
        hosts: hosts(&view),
    };
    Ok(with_view_headers(Json(listing).into_response(), &view))
}

/// `POST /v1/registration/{service}`: one check-in, form-encoded (lyft) or JSON; `200 {}`.
/// `auto_ip` stands in for a missing `ip` with the caller's address.
pub async fn register(
    State(registry): State<Registry>,
    ApiPath(service): ApiPath<String>,
    PeerAddr(peer): PeerAddr,
    HeadersAndBody(headers, body): HeadersAndBody,
) -> Result<Response, ApiError> {
    let grant = registry.inner.auth.grant(&headers)?;
    let service = ServiceName::new(service)?;
    let trusted = registry.config().trusted_proxies;
    let caller = || caller_ip(&headers, peer, trusted);
    // The body is decoded once: the endpoint and the tag keys it sent come from one parse.
    let V1Checkin {
        endpoint: ep,
        sent_tags,
    } = if is_json(&headers) {
        V1Checkin::from_json(&service, &resolve_auto_ip_json(&body, caller)?)?
    } else {
        let mut form = V1Form::decode(&body);
        resolve_auto_ip_form(&mut form, caller)?;
        V1Checkin::from_form(&service, form)?
    };
    registry.inner.auth.authorize(
        &grant,
        Scope::Hosts {
            ips: &[ep.ip],
            services: &[&ep.service],
        },
    )?;
    let admitted = registry.admit(std::slice::from_ref(&ep)).await?;
    // lyft merged a re-check-in's tags over the stored ones; v1 keeps that (v2 replaces).
    registry
        .check_in_merging_tags(&ep, &sent_tags, admitted)
        .await
        .map_err(store_error(&registry))?;
    // What `Json(json!({}))` gives, without building a map per check-in.
    let json = HeaderValue::from_static("application/json");
    Ok(([(header::CONTENT_TYPE, json)], Bytes::from_static(b"{}")).into_response())
}

#[derive(Debug, Default, Deserialize)]
struct PortQuery {
    port: Option<String>,
}

fn parse_port_query(query: Option<&str>) -> Result<Option<NonZeroU16>, ApiError> {
    let q: PortQuery = match query {
        Some(q) => serde_urlencoded::from_str(q)
            .map_err(|e| ApiError::BadRequest(format!("bad query: {e}")))?,
        None => PortQuery::default(),
    };
    Ok(q.port
        .as_deref()
        .filter(|p| !p.is_empty())
        .map(parse_port)
        .transpose()?)
}

async fn deregister_inner(
    registry: &Registry,
    headers: &HeaderMap,
    service: String,
    ip: &str,
    query: Option<&str>,
) -> Result<Json<Value>, ApiError> {
    let grant = registry.inner.auth.grant(headers)?;
    let service = ServiceName::new(service)?;
    let ip: IpAddr = parse_ip(ip)?;
    let port = parse_port_query(query)?;
    registry.inner.auth.authorize(
        &grant,
        Scope::Hosts {
            ips: &[ip],
            services: &[&service],
        },
    )?;
    let removed = registry
        .deregister(&service, ip, port)
        .await
        .map_err(store_error(registry))?;
    if removed == 0 {
        let at = port.map_or_else(
            || ip.to_string(),
            |p| std::net::SocketAddr::new(ip, p.get()).to_string(),
        );
        return Err(ApiError::NotFound(format!(
            "no endpoint of {service} on {at}"
        )));
    }
    Ok(Json(json!({})))
}

/// `DELETE /v1/registration/{service}/{ip}[?port=]`: `200 {}`, or 404 if nothing matched.
pub async fn deregister(
    State(registry): State<Registry>,
    ApiPath((service, ip)): ApiPath<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    deregister_inner(&registry, &headers, service, &ip, query.as_deref()).await
}

/// `DELETE /v1/registration/repo/{ip}`: deregistration for a service named `repo`.
pub async fn deregister_repo_service(
    State(registry): State<Registry>,
    ApiPath(ip): ApiPath<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    deregister_inner(&registry, &headers, "repo".into(), &ip, query.as_deref()).await
}

/// `POST /v1/loadbalancing/{service}`: every host of the service (operator token only).
pub async fn weight_service(
    State(registry): State<Registry>,
    ApiPath(service): ApiPath<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<StatusCode, ApiError> {
    weight(&registry, &headers, service, None, &body).await
}

/// `POST /v1/loadbalancing/{service}/{ip}`: the hosts of the service on that ip.
pub async fn weight_host(
    State(registry): State<Registry>,
    ApiPath((service, ip)): ApiPath<(String, String)>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<StatusCode, ApiError> {
    weight(&registry, &headers, service, Some(&ip), &body).await
}

/// lyft answers 204 with no body, and 404 "Host not found".
async fn weight(
    registry: &Registry,
    headers: &HeaderMap,
    service: String,
    ip: Option<&str>,
    body: &[u8],
) -> Result<StatusCode, ApiError> {
    let grant = registry.inner.auth.grant(headers)?;
    let service = ServiceName::new(service)?;
    let ip = ip.map(parse_ip).transpose()?;
    let weight = parse_weight_body(body, is_json(headers))?;
    match ip {
        Some(ip) => registry.inner.auth.authorize(
            &grant,
            Scope::Hosts {
                ips: &[ip],
                services: &[&service],
            },
        )?,
        None => registry.inner.auth.authorize(&grant, Scope::Operator)?,
    }
    let n = registry
        .set_weight(&service, ip, weight)
        .await
        .map_err(store_error(registry))?;
    if n == 0 {
        return Err(ApiError::NotFound("Host not found".into()));
    }
    Ok(StatusCode::NO_CONTENT)
}
