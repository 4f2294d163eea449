//! The request path: route → breaker → pick a host → pooled upstream request, with retries,
//! back-off and the route timeout around all of it → response.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

use crate::breaker::{Permit, Resource};
use crate::cluster::{ActiveGuard, Cluster};
use crate::outlier::RequestResult;
use crate::retry::{self, AttemptOutcome};
use crate::upstream::{BoxError, ConnectError, ProxyBody};

/// Bodies up to this size are buffered so idempotent requests can be retried; larger ones
/// stream through and get a single attempt.
const MAX_RETRY_BODY: u64 = 64 * 1024;

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static OVERFLOW: HeaderName = HeaderName::from_static("x-tidings-overflow");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

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
        None => {
            let h = host_header?.to_str().ok()?;
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
            if host.is_empty()
                || host.contains(['[', ']'])
                || !port.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            host
        }
    };
    Some(raw.trim_start_matches('[').trim_end_matches(']'))
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

enum ReqBody {
    Buffered(Bytes),
    Streamed(Option<Incoming>),
}

impl ReqBody {
    fn take(&mut self) -> Option<ProxyBody> {
        match self {
            ReqBody::Buffered(b) => Some(full(b.clone())),
            ReqBody::Streamed(s) => s
                .take()
                .map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()),
        }
    }
    fn replayable(&self) -> bool {
        matches!(self, ReqBody::Buffered(_))
    }
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
    let scheme = if cluster.scheme == "https" {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    };
    let deadline = Instant::now() + route.timeout;
    let req_permit = match cluster.breaker.try_acquire(Resource::Requests) {
        Ok(p) => p,
        Err(r) => return overflow(cluster, r, out),
    };
    cluster.active_requests.fetch_add(1, Ordering::AcqRel);
    let _active = CountGuard(cluster);
    let (parts, body) = req.into_parts();
    let policy = &cluster.retry_policy;
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
    let mut previous = None;
    let mut _retry_permit: Option<Permit> = None;
    loop {
        let Some((addr, guard)) = cluster.pick(hash, previous) else {
            out.flag = Some("no_healthy_upstream");
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_healthy_upstream",
                "no healthy upstream",
            );
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
        let target = (&scheme, &guard.host().authority);
        let Ok(up_req) = upstream_request(&parts, up_body, target, request_id, peer_ip) else {
            return local_reply(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "request cannot be forwarded",
            );
        };
        let pending = match cluster.breaker.try_acquire(Resource::Pending) {
            Ok(p) => p,
            Err(r) => return overflow(cluster, r, out),
        };
        let result = tokio::time::timeout_at(deadline, cluster.client.request(up_req)).await;
        drop(pending);
        let (outcome, overflowed) = classify(&result);
        if !overflowed {
            let ok = matches!(outcome, AttemptOutcome::Status(s) if s < 500);
            cluster.record_result(
                addr,
                if ok {
                    RequestResult::Success
                } else {
                    RequestResult::Failure
                },
            );
        }
        guard.host().count_outcome(outcome_index(outcome));
        if !overflowed
            && body.replayable()
            && retry::should_retry(policy, &parts.method, outcome, out.attempts - 1)
        {
            if let Some(permit) = retry_permit(cluster) {
                let wait = retry::backoff(policy, out.attempts, &mut rand::rng());
                if Instant::now() + wait < deadline {
                    metrics::counter!("tidings_proxy_retries_total", "cluster" => cluster.name().to_string()).increment(1);
                    drop((result, guard));
                    tokio::time::sleep(wait).await;
                    previous = Some(addr);
                    _retry_permit = Some(permit);
                    continue;
                }
            }
        }
        return match result {
            Ok(Ok(resp)) => {
                let (mut rp, rb) = resp.into_parts();
                strip_hop_by_hop(&mut rp.headers);
                cluster.active_requests.fetch_add(1, Ordering::AcqRel);
                let guarded = Guarded {
                    inner: rb,
                    deadline: Box::pin(tokio::time::sleep_until(deadline)),
                    _guard: guard,
                    _permit: req_permit,
                    _count: cluster.clone(),
                };
                Response::from_parts(rp, guarded.boxed_unsync())
            }
            Ok(Err(_)) if overflowed => overflow(cluster, Resource::Connections, out),
            Ok(Err(e)) => failure_reply(&e, addr, out),
            Err(_) => {
                out.flag = Some("upstream_timeout");
                local_reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    "upstream request timeout",
                )
            }
        };
    }
}

type AttemptResult = Result<
    Result<Response<Incoming>, hyper_util::client::legacy::Error>,
    tokio::time::error::Elapsed,
>;

/// How an attempt ended, and whether it never left because the connection limit was hit
/// (which says nothing about the host, so outlier detection and retries ignore it).
fn classify(result: &AttemptResult) -> (AttemptOutcome, bool) {
    match result {
        Err(_) => (AttemptOutcome::Timeout, false),
        Ok(Ok(resp)) => (AttemptOutcome::Status(resp.status().as_u16()), false),
        Ok(Err(e)) if e.is_connect() => (AttemptOutcome::ConnectFailure, is_overflow(e)),
        Ok(Err(_)) => (AttemptOutcome::Reset, false),
    }
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

fn failure_reply(
    e: &hyper_util::client::legacy::Error,
    addr: SocketAddr,
    out: &mut Outcome,
) -> Response<ProxyBody> {
    tracing::debug!(error = %e, upstream = %addr, "upstream failed");
    if e.is_connect() {
        out.flag = Some("upstream_connect_failure");
        local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_connect_failure",
            "upstream connect error",
        )
    } else {
        out.flag = Some("upstream_reset");
        local_reply(
            StatusCode::BAD_GATEWAY,
            "upstream_reset",
            "upstream reset or sent an invalid response",
        )
    }
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

/// A retry may start if the budget and the retries breaker both allow it.
fn retry_permit(cluster: &Cluster) -> Option<Permit> {
    let active = cluster.active_requests.load(Ordering::Acquire);
    let retries = cluster.active_retries.load(Ordering::Acquire);
    if !retry::budget_allows(&cluster.retry_policy, active, retries) {
        metrics::counter!("tidings_proxy_overflow_total", "cluster" => cluster.name().to_string(), "resource" => "retry_budget").increment(1);
        return None;
    }
    match cluster.breaker.try_acquire(Resource::Retries) {
        Ok(p) => Some(p),
        Err(r) => {
            metrics::counter!("tidings_proxy_overflow_total", "cluster" => cluster.name().to_string(), "resource" => r.as_str()).increment(1);
            None
        }
    }
}

fn is_overflow(e: &hyper_util::client::legacy::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if matches!(
            s.downcast_ref::<ConnectError>(),
            Some(ConnectError::Overflow)
        ) {
            return true;
        }
        src = s.source();
    }
    false
}

fn upstream_request(
    parts: &Parts,
    body: ProxyBody,
    (scheme, authority): (&Scheme, &Authority),
    request_id: &HeaderValue,
    peer_ip: &HeaderValue,
) -> Result<Request<ProxyBody>, http::Error> {
    // Built from parts that share their bytes with the request: no formatting, no re-parsing.
    let mut target = http::uri::Parts::default();
    target.scheme = Some(scheme.clone());
    target.authority = Some(authority.clone());
    target.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = Uri::from_parts(target)?;
    let headers = req.headers_mut();
    // Room for what we add, so the map is allocated once and never grows.
    headers.reserve(parts.headers.len() + 3);
    for (name, value) in &parts.headers {
        headers.append(name.clone(), value.clone());
    }
    strip_hop_by_hop(headers);
    if !headers.contains_key(header::HOST) {
        if let Some(auth) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(header::HOST, auth);
        }
    }
    headers.insert(REQUEST_ID.clone(), request_id.clone());
    let xff = match headers.get(&X_FORWARDED_FOR) {
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + peer_ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer_ip.as_bytes());
            HeaderValue::from_bytes(&v).ok()
        }
        None => Some(peer_ip.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    Ok(req)
}

/// Removes connection-specific headers (RFC 9110 §7.6.1), including those named by
/// `Connection`: they describe one hop, and HTTP/2 forbids them outright.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.get_all(header::CONNECTION).iter().nth(1).is_some() {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    } else if let Some(v) = headers.remove(header::CONNECTION) {
        // One Connection header, the usual case: remove what it names by &str, which
        // (unlike building a HeaderName) allocates nothing.
        for n in v.to_str().unwrap_or_default().split(',') {
            headers.remove(n.trim());
        }
    }
    for n in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TRANSFER_ENCODING,
        &header::TE,
        &header::TRAILER,
        &header::UPGRADE,
        &header::PROXY_AUTHORIZATION,
        &header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(n);
    }
}

struct CountGuard<'a>(&'a Cluster);

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.active_requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The upstream response body; it holds the host's active count, the request's breaker slot
/// and a cluster active-request count until the body is done, so draining hosts are removed
/// only after their responses have been delivered.
struct Guarded {
    inner: Incoming,
    /// The route timeout runs until the response is complete, as in Envoy: a backend that
    /// sends headers and then stalls cannot hold the stream forever.
    deadline: Pin<Box<tokio::time::Sleep>>,
    _guard: ActiveGuard,
    _permit: Permit,
    _count: Arc<Cluster>,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self._count.active_requests.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(
                    "route timeout while streaming the response".into(),
                ))),
                Poll::Pending => Poll::Pending,
            },
            ready => ready.map_err(|e| Box::new(e) as BoxError),
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
