//! The bodies of the read routes, encoded from a view once and kept with it
//! ([`crate::cache::Bodies`]): a lookup of an unchanged service copies bytes instead of
//! encoding JSON again. A cached body holds only what is a function of the view's rows and
//! index; what changes per request or with time (the catalog's `generated_at_ms` and
//! `warming`, its `stale` flag, every header) is added per request around it — the catalog's
//! top-level fields are written around its cached `services` member. Each function gives
//! exactly the bytes `serde_json` gives for the whole answer struct; `answers/tests.rs` holds
//! them to it.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use schema::api::{ServiceSummary, ServicesResponse, V1Host, V1Listing};
use schema::{Endpoint, ServiceName, eds};
use serde::Serialize;

use crate::cache::Format;
use crate::delta;
use crate::errors::ApiError;
use crate::http::parts::Parts;
use crate::http::router::with_view_headers;
use crate::registry::{CatalogEntry, Registry, View};

/// The hosts of a view as v1 listings show them.
pub(crate) fn hosts(view: &View) -> Vec<V1Host> {
    view.data
        .rows
        .iter()
        .map(|r| V1Host::from_endpoint(&r.endpoint, r.last_check_in_ms))
        .collect()
}

fn encode<T: Serialize>(value: &T) -> Result<Bytes, serde_json::Error> {
    serde_json::to_vec(value).map(Bytes::from)
}

fn cached<T: Serialize>(
    view: &View,
    format: Format,
    make: impl FnOnce() -> T,
) -> Result<Bytes, serde_json::Error> {
    view.data.bodies.get_or_encode(format, || encode(&make()))
}

/// `GET /v1/registration/{service}` and `GET /v2/services/{service}`.
pub(crate) fn v1_listing(
    view: &View,
    service: &ServiceName,
    env: &str,
) -> Result<Bytes, serde_json::Error> {
    cached(view, Format::V1Listing, || V1Listing {
        service: service.to_string(),
        env: env.to_string(),
        hosts: hosts(view),
    })
}

/// `GET /v2/services`: every service with a visible endpoint, and how many.
pub(crate) fn services(view: &View) -> Result<Bytes, serde_json::Error> {
    cached(view, Format::Services, || {
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
        ServicesResponse {
            index: view.data.index,
            services,
        }
    })
}

/// The fields of [`schema::api::Catalog`] before `services`, in its order: they vary per
/// request, so they are never cached.
#[derive(Serialize)]
struct CatalogHead {
    index: u64,
    generated_at_ms: u64,
    warming: bool,
    stale: bool,
}

/// The `services` member of `GET /v2/catalog`, encoded once per view.
fn catalog_services(view: &View) -> Result<Bytes, serde_json::Error> {
    cached(view, Format::CatalogServices, || {
        let mut services: BTreeMap<String, Vec<V1Host>> = BTreeMap::new();
        for r in &view.data.rows {
            let host = V1Host::from_endpoint(&r.endpoint, r.last_check_in_ms);
            services
                .entry(r.endpoint.service.to_string())
                .or_default()
                .push(host);
        }
        services
    })
}

/// `head`, an encoded JSON object, without its closing brace, then `rest`: how a per-request
/// head and a cached member become one answer without encoding the member again, nor copying
/// it ([`Parts`]).
fn join(mut head: Vec<u8>, rest: impl IntoIterator<Item = Bytes>) -> Parts {
    head.pop();
    Parts::new(std::iter::once(Bytes::from(head)).chain(rest))
}

const SERVICES_KEY: Bytes = Bytes::from_static(br#","services":"#);
const CLOSE: Bytes = Bytes::from_static(b"}");

/// The `signatures` member that ends a catalog answer (the last field of both answer
/// structs), with its leading comma; empty when there are none, as serde skips it.
fn signatures_member(signatures: &BTreeMap<String, String>) -> Result<Bytes, serde_json::Error> {
    if signatures.is_empty() {
        return Ok(Bytes::new());
    }
    let mut out = br#","signatures":"#.to_vec();
    serde_json::to_writer(&mut out, signatures)?;
    Ok(Bytes::from(out))
}

/// `GET /v2/catalog` as of `generated_at_ms`, with the registry warming or not, and the
/// listings' `signatures` if any.
pub(crate) fn catalog(
    view: &View,
    generated_at_ms: u64,
    warming: bool,
    signatures: &BTreeMap<String, String>,
) -> Result<Parts, serde_json::Error> {
    let services = catalog_services(view)?;
    let head = serde_json::to_vec(&CatalogHead {
        index: view.data.index,
        generated_at_ms,
        warming,
        stale: view.stale(),
    })?;
    // `{"index":…,"stale":…}` loses its closing brace and gains `,"services":{…}}`.
    let sigs = signatures_member(signatures)?;
    Ok(join(head, [SERVICES_KEY, services, sigs, CLOSE]))
}

/// The fields of [`schema::api::CatalogChanges`] before `services`, in its order.
#[derive(Serialize)]
struct ChangesHead<'a> {
    index: u64,
    generated_at_ms: u64,
    warming: bool,
    stale: bool,
    full: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<u64>,
    digest: &'a str,
}

/// `GET /v2/catalog?delta=true`: the changes from `base` to `view` (whose history entry is
/// `current`), or the whole catalog when there is no base. The changes are encoded once per
/// base and view, for every client waiting at that base.
pub(crate) fn catalog_changes(
    view: &View,
    current: &CatalogEntry,
    base: Option<&CatalogEntry>,
    generated_at_ms: u64,
    warming: bool,
    signatures: &BTreeMap<String, String>,
) -> Result<Parts, serde_json::Error> {
    let sigs = signatures_member(signatures)?;
    let head = serde_json::to_vec(&ChangesHead {
        index: view.data.index,
        generated_at_ms,
        warming,
        stale: view.stale(),
        full: base.is_none(),
        from: base.map(|b| b.index),
        digest: current.digest_hex(),
    })?;
    let Some(base) = base else {
        let services = catalog_services(view)?;
        return Ok(join(head, [SERVICES_KEY, services, sigs, CLOSE]));
    };
    let fresh = || encode(&delta::diff(&base.services, &current.services));
    let memo = view.data.deltas.cell(base.index);
    let changes = match memo
        .as_deref()
        .and_then(|c| c.get_or_init(|| fresh().ok()).clone())
    {
        Some(b) => b,
        None => fresh()?,
    };
    // `{"services":…}` loses its opening brace and follows the head's fields, and its
    // closing brace, which the signatures (if any) go before.
    let members = match changes.len() {
        n if n >= 2 => changes.slice(1..n - 1),
        _ => Bytes::new(),
    };
    Ok(join(head, [Bytes::from_static(b","), members, sigs, CLOSE]))
}

/// `POST /v3/discovery:endpoints` for `service` at its current version (the index).
pub(crate) fn eds(view: &View, service: &ServiceName) -> Result<Bytes, serde_json::Error> {
    cached(view, Format::Eds, || {
        let endpoints: Vec<Endpoint> = view.data.rows.iter().map(|r| r.endpoint.clone()).collect();
        eds::response(
            service.as_str(),
            &view.data.index.to_string(),
            &endpoints,
            None,
        )
    })
}

/// A JSON answer of `body` with the view's headers (index, stale), as `Json` would give it.
/// Encoding these types cannot fail (string keys, derived impls); if it ever did, the answer
/// is a 503 the client retries rather than a panic or a 500.
pub(crate) fn respond(
    registry: &Registry,
    body: Result<impl Into<Parts>, serde_json::Error>,
    view: &View,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::Unavailable {
        message: format!("cannot encode the answer: {e}"),
        retry_after: registry.config().retry_after,
    })?;
    // The content type `axum::Json` sets.
    let json = HeaderValue::from_static("application/json");
    let resp = ([(header::CONTENT_TYPE, json)], Body::new(body.into())).into_response();
    Ok(with_view_headers(resp, view))
}

#[cfg(test)]
mod tests;
