//! The request path: route → breaker → pick a host → pooled upstream request, with retries,
//! back-off and the route timeout around all of it → response.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::Scheme;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use tokio::time::Instant;

use crate::breaker::{Permit, Resource};
use crate::cluster::{Cluster, HostHandle, RetrySlot};
use crate::outlier::RequestResult;
use crate::retry::{self, AttemptOutcome};
use crate::upstream::{Conn, ProxyBody, UpstreamError};

mod body;
mod headers;

use self::body::{Guarded, ReqBody};
pub use self::headers::{REQUEST_ID, is_hop_by_hop, strip_hop_by_hop};

/// Bodies up to this size are buffered so idempotent requests can be retried; larger ones
/// stream through and get a single attempt.
const MAX_RETRY_BODY: u64 = 64 * 1024;

pub static OVERFLOW: HeaderName = HeaderName::from_static("x-tidings-overflow");

/// A resolved route.
pub struct Route {
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub cluster: Arc<Cluster>,
    pub timeout: Duration,
}

impl Route {
    pub fn matches(&self, host: Option<&str>, path: &str) -> bool {
        let host_ok = match (&self.host, host) {
            (None, _) => true,
            (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
            (Some(_), None) => false,
        };
        host_ok
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path.starts_with(p))
    }
}

/// What the access log records about one request beyond the request line.
#[derive(Debug, Default)]
pub struct Outcome {
    pub upstream: Option<SocketAddr>,
    pub attempts: u32,
    pub flag: Option<&'static str>,
}

/// The request's host without port, from the URI (HTTP/2 :authority) or the Host header.
pub fn request_host<B>(req: &Request<B>) -> Option<String> {
    host_of(req.uri(), req.headers().get(header::HOST)).map(str::to_string)
}

/// [`request_host`] without allocating: a view into the URI or the Host header value. A Host
/// header that is not a valid `host[:port]` authority gives `None`.
pub fn host_of<'a>(uri: &'a Uri, host_header: Option<&'a HeaderValue>) -> Option<&'a str> {
    let raw = match uri.host() {
        Some(h) => h,
        None => host_header_name(host_header?.to_str().ok()?)?,
    };
    Some(raw.trim_start_matches('[').trim_end_matches(']'))
}

/// The host part of a Host header value (`host[:port]`, IPv6 in brackets, returned without);
/// `None` when the value is not a valid authority.
pub fn host_header_name(h: &str) -> Option<&str> {
    let valid = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%:[]".contains(&b);
    if h.is_empty() || !h.bytes().all(valid) {
        return None;
    }
    let (host, port) = match h.strip_prefix('[') {
        Some(v6) => {
            let (inside, rest) = v6.split_once(']')?;
            (
                inside,
                rest.strip_prefix(':')
                    .or(Some(rest).filter(|r| r.is_empty()))?,
            )
        }
        None => h.split_once(':').unwrap_or((h, "")),
    };
    if host.is_empty() || host.contains(['[', ']']) || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(host)
}

/// A local answer in the registry's error shape.
pub fn local_reply(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::to_vec(&schema::api::ErrorBody::new(code, message)).unwrap_or_default();
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub fn full(b: Bytes) -> ProxyBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

fn overflow(cluster: &Cluster, r: Resource, out: &mut Outcome) -> Response<ProxyBody> {
    metrics::counter!("tidings_proxy_overflow_total", "cluster" => cluster.name().to_string(), "resource" => r.as_str()).increment(1);
    out.flag = Some("overflow");
    let mut resp = local_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "overflow",
        &format!("circuit breaker open: {}", r.as_str()),
    );
    resp.headers_mut()
        .insert(OVERFLOW.clone(), HeaderValue::from_static(r.as_str()));
    resp
}

/// Proxies one request over `route`'s cluster within the route timeout.
pub async fn forward(
    route: &Route,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    peer_ip: &HeaderValue,
    out: &mut Outcome,
) -> Response<ProxyBody> {
    let cluster = &route.cluster;
    let deadline = Instant::now() + route.timeout;
    let req_permit = match cluster.breaker.try_acquire(Resource::Requests) {
        Ok(p) => p,
        Err(r) => return overflow(cluster, r, out),
    };
    let _active = Cluster::start_request(cluster.as_ref());
    let (mut parts, body) = req.into_parts();
    let mut body = match request_body(cluster, &parts, body, deadline).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let hash = cluster
        .config
        .hash_header
        .as_deref()
        .and_then(|h| parts.headers.get(h))
        .map(|v| xxhash_rust::xxh64::xxh64(v.as_bytes(), 0));
    // One timer for the whole request, response body included (see `Guarded`).
    let mut timeout = Box::pin(tokio::time::sleep_until(deadline));
    let mut prepared = None;
    // An HTTP/1.0 request may come without a Host: each attempt then names its own upstream.
    let host_is_upstream =
        parts.uri.authority().is_none() && !parts.headers.contains_key(header::HOST);
    let mut previous = None;
    // The retry this attempt is, if it is one: its slot is held until the attempt's outcome.
    let mut retry = None;
    loop {
        let Some((addr, guard)) = cluster.pick(hash, previous) else {
            return failed(Failure::NoHealthyUpstream, out);
        };
        out.upstream = Some(addr);
        out.attempts += 1;
        let Some(up_body) = body.take() else {
            return local_reply(
                StatusCode::BAD_GATEWAY,
                "upstream_reset",
                "request body already sent",
            );
        };
        let host = guard.host();
        let headers = prepared.get_or_insert_with(|| {
            let downstream = std::mem::take(&mut parts.headers);
            headers::upstream_headers(downstream, &parts.uri, &host.authority, request_id, peer_ip)
        });
        if host_is_upstream {
            if let Ok(v) = HeaderValue::from_str(host.authority.as_str()) {
                headers.insert(header::HOST, v);
            }
        }
        // An attempt that may be followed by another sends a copy.
        let headers = if body.replayable() {
            headers.clone()
        } else {
            std::mem::take(headers)
        };
        let scheme = if cluster.scheme == "https" {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let absolute = cluster.config.http2.then_some((&scheme, &host.authority));
        let Ok(uri) = headers::target(&parts.uri, absolute) else {
            return local_reply(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "request cannot be forwarded",
            );
        };
        let up_req = headers::request(&parts.method, uri, headers, up_body);
        let pending = match cluster.breaker.try_acquire(Resource::Pending) {
            Ok(p) => p,
            Err(r) => return overflow(cluster, r, out),
        };
        let result = tokio::select! {
            biased;
            r = cluster.upstream.send(&host.conns, addr, up_req) => Some(r),
            () = timeout.as_mut() => None,
        };
        drop(pending);
        let attempt = classify(&result);
        if let Some(wait) = after_attempt(
            cluster,
            host,
            attempt,
            &parts.method,
            out.attempts,
            body.replayable(),
            deadline,
            &mut retry,
        ) {
            // A response we give up on, with its connection, is dropped here: its body was
            // not read, so the connection cannot be reused.
            drop((result, guard));
            tokio::time::sleep(wait).await;
            previous = Some(addr);
            continue;
        }
        return match result {
            Some(Ok((resp, conn))) => respond(resp, conn, guard, timeout, req_permit, cluster),
            Some(Err(e)) if e.is_overflow() => overflow(cluster, Resource::Connections, out),
            Some(Err(e)) => {
                tracing::debug!(error = %e, upstream = %addr, "upstream failed");
                let f = if e.is_connect() {
                    Failure::Connect
                } else {
                    Failure::Reset
                };
                failed(f, out)
            }
            None => failed(Failure::Timeout, out),
        };
    }
}

/// The downstream response around the upstream one: hop-by-hop headers stripped, the body
/// wrapped so it keeps its counts, its timeout and its connection until it is complete.
fn respond(
    resp: Response<Incoming>,
    conn: Conn,
    guard: crate::cluster::ActiveGuard,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    permit: Permit,
    cluster: &Arc<Cluster>,
) -> Response<ProxyBody> {
    let (mut rp, rb) = resp.into_parts();
    strip_hop_by_hop(&mut rp.headers);
    let guarded = Guarded {
        inner: rb,
        deadline,
        conn: Some(conn),
        done: false,
        guard,
        _permit: permit,
        active: Cluster::start_request(cluster.clone()),
    };
    Response::from_parts(rp, guarded.boxed_unsync())
}

/// An attempt's result; `None` when the route timeout fired first.
type AttemptResult = Option<Result<(Response<Incoming>, Conn), UpstreamError>>;

/// How an attempt ended, and whether it never left because the connection limit was hit
/// (which says nothing about the host, so outlier detection and retries ignore it).
fn classify(result: &AttemptResult) -> (AttemptOutcome, bool) {
    match result {
        None => (AttemptOutcome::Timeout, false),
        Some(Ok((resp, _))) => (AttemptOutcome::Status(resp.status().as_u16()), false),
        Some(Err(e)) if e.is_connect() => (AttemptOutcome::ConnectFailure, e.is_overflow()),
        Some(Err(_)) => (AttemptOutcome::Reset, false),
    }
}

/// What an attempt's outcome (and whether it never left because the connection limit was
/// hit) does: feeds outlier detection and the host's outcome counter, and decides whether the
/// request gets another attempt — and the back-off to wait first — under the retry policy,
/// the retry budget, the breaker's `max_retries` and the time left. Both request paths (hyper
/// and `crate::h1`) go through here.
///
/// `retry` is the request's retry in flight: the slot of the retry this attempt was is given
/// back first (the attempt has its outcome), and the slot of the next one is put there, so
/// the caller only has to keep it until the request ends.
#[allow(clippy::too_many_arguments)]
pub(crate) fn after_attempt(
    cluster: &Cluster,
    host: &HostHandle,
    (outcome, overflowed): (AttemptOutcome, bool),
    method: &Method,
    attempts: u32,
    replayable: bool,
    deadline: Instant,
    retry: &mut Option<RetrySlot>,
) -> Option<Duration> {
    *retry = None;
    if !overflowed {
        let ok = matches!(outcome, AttemptOutcome::Status(s) if s < 500);
        let result = if ok {
            RequestResult::Success
        } else {
            RequestResult::Failure
        };
        cluster.record_result(host.addr, result);
    }
    host.count_outcome(outcome_index(outcome));
    let policy = &cluster.retry_policy;
    if overflowed || !replayable || !retry::should_retry(policy, method, outcome, attempts - 1) {
        return None;
    }
    let wait = retry::backoff(policy, attempts, &mut rand::rng());
    if Instant::now() + wait >= deadline {
        return None;
    }
    match cluster.try_start_retry() {
        Ok(slot) => *retry = Some(slot),
        Err(limit) => {
            cluster.metrics.retry_overflow(limit);
            return None;
        }
    }
    metrics::counter!("tidings_proxy_retries_total", "cluster" => cluster.name().to_string())
        .increment(1);
    Some(wait)
}

/// Index of the outcome's label in [`crate::cluster::OUTCOMES`].
fn outcome_index(o: AttemptOutcome) -> usize {
    match o {
        AttemptOutcome::Status(100..=199) => 0,
        AttemptOutcome::Status(200..=299) => 1,
        AttemptOutcome::Status(300..=399) => 2,
        AttemptOutcome::Status(400..=499) => 3,
        AttemptOutcome::Status(_) => 4,
        AttemptOutcome::ConnectFailure => 5,
        AttemptOutcome::Reset => 6,
        AttemptOutcome::Timeout => 7,
    }
}

/// Why the proxy answers a request itself after looking for an upstream: the same answers
/// on both request paths (hyper's and `crate::h1`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Failure {
    NoHealthyUpstream,
    Connect,
    Reset,
    Timeout,
}

impl Failure {
    /// Status, error code (also the access log's flag) and message of the local answer.
    pub(crate) fn answer(self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Failure::NoHealthyUpstream => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no_healthy_upstream",
                "no healthy upstream",
            ),
            Failure::Connect => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_connect_failure",
                "upstream connect error",
            ),
            Failure::Reset => (
                StatusCode::BAD_GATEWAY,
                "upstream_reset",
                "upstream reset or sent an invalid response",
            ),
            Failure::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "upstream request timeout",
            ),
        }
    }
}

fn failed(f: Failure, out: &mut Outcome) -> Response<ProxyBody> {
    let (status, code, message) = f.answer();
    out.flag = Some(code);
    local_reply(status, code, message)
}

/// Buffers small bodies of retryable requests so they can be sent again; everything else
/// streams through with a single attempt.
async fn request_body(
    cluster: &Cluster,
    parts: &Parts,
    body: Incoming,
    deadline: Instant,
) -> Result<ReqBody, Response<ProxyBody>> {
    let small = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n <= MAX_RETRY_BODY)
        || (body.is_end_stream() && !parts.headers.contains_key(header::TRANSFER_ENCODING));
    if cluster.retry_policy.num_retries == 0 || !retry::is_idempotent(&parts.method) || !small {
        return Ok(ReqBody::Streamed(Some(body)));
    }
    if body.is_end_stream() {
        // The common GET: nothing to read.
        return Ok(ReqBody::Buffered(Bytes::new()));
    }
    match tokio::time::timeout_at(
        deadline,
        Limited::new(body, MAX_RETRY_BODY as usize).collect(),
    )
    .await
    {
        Ok(Ok(c)) => Ok(ReqBody::Buffered(c.to_bytes())),
        Ok(Err(_)) => Err(local_reply(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "could not read the request body",
        )),
        Err(_) => Err(local_reply(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "request body not received in time",
        )),
    }
}

#[cfg(test)]
mod tests;
