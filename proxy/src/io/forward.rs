//! The general request path (hyper, both HTTP versions): route → breaker → pick a host →
//! pooled upstream request, with retries, back-off and the route timeout around all of it →
//! response. The policy is `crate::io::attempts`'; this module is its hyper [`Transport`].

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use tokio::time::{Instant, Sleep};

use crate::cluster::{ActiveGuard, Cluster, HostHandle};
use crate::config::Scheme;
use crate::core::breaker::Permit;
pub use crate::core::policy::OVERFLOW;
use crate::core::policy::{LocalAnswer, Sent};
use crate::core::retry;
use crate::io::attempts::{self, Admission, Attempts, Transport};
use crate::io::h1::{Forwarded, RawTransport};
use crate::io::upstream::{Conn, ProxyBody, UpstreamError};

mod body;
pub(crate) mod headers;

use self::body::{Guarded, ReqBody, Upstreamed};
pub use self::headers::{REQUEST_ID, X_FORWARDED_FOR, is_hop_by_hop, strip_hop_by_hop};

/// Bodies up to this size are buffered so idempotent requests can be retried; larger ones
/// stream through and get a single attempt.
const MAX_RETRY_BODY: u64 = 64 * 1024;

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

/// A local answer as a response: the registry's error shape, and the overflow header.
pub fn answer(a: LocalAnswer) -> Response<ProxyBody> {
    let mut resp = local_reply(a.status(), a.code(), a.message());
    if let Some((name, value)) = a.header() {
        resp.headers_mut()
            .insert(name.clone(), HeaderValue::from_static(value));
    }
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
    let Admission {
        permit,
        active: _active,
    } = match attempts::admit(cluster.as_ref(), out) {
        Ok(a) => a,
        Err(a) => return answer(a),
    };
    let (mut parts, body) = req.into_parts();
    // An HTTP/1.0 request may come without a Host: each attempt then names its own upstream.
    let host_is_upstream =
        parts.uri.authority().is_none() && !parts.headers.contains_key(header::HOST);
    let bridged = parts.version == Version::HTTP_2
        && !host_is_upstream
        // HTTP/2 forbids it (the h2 crate refuses such a request); the bridge's encoding
        // relies on it, as it drops hop-by-hop fields by name only.
        && !parts.headers.contains_key(header::CONNECTION)
        && cluster.scheme == Scheme::Http
        && !cluster.config.http2
        && (body.is_end_stream() || content_length(&parts).is_some_and(|n| n <= MAX_RETRY_BODY));
    let body = match request_body(cluster, &parts, body, deadline, bridged).await {
        Ok(b) => b,
        Err(a) => return answer(a),
    };
    let hash = cluster
        .config
        .hash_header
        .as_deref()
        .and_then(|h| parts.headers.get(h))
        .map(|v| xxhash_rust::xxh64::xxh64(v.as_bytes(), 0));
    // One timer for the whole request, response body included (see `Guarded`).
    let timeout = Box::pin(tokio::time::sleep_until(deadline));
    if let (true, Some(bytes)) = (bridged, body.buffered()) {
        // HTTP/2 downstream, HTTP/1.1 upstream on the fast path's raw connections; the
        // request's bytes are written from its own headers.
        let ids = Forwarded {
            request_id,
            peer_ip,
        };
        let attempts = Attempts {
            cluster,
            method: &parts.method,
            hash,
            // The request's bytes are kept: every attempt can send them again.
            replayable: true,
            deadline,
        };
        let mut transport = RawTransport::new(cluster, &parts, ids, bytes, timeout);
        return match attempts.run(&mut transport, out).await {
            Ok((resp, guard)) => {
                let (rp, body) = resp.into_parts();
                let inner = Upstreamed::Raw(body);
                respond(rp, inner, guard, transport.timeout, permit, cluster)
            }
            Err(a) => answer(a),
        };
    }
    let downstream = std::mem::take(&mut parts.headers);
    let attempts = Attempts {
        cluster,
        method: &parts.method,
        hash,
        replayable: body.replayable(),
        deadline,
    };
    let mut transport = HyperTransport {
        cluster,
        host_is_upstream,
        downstream: Some(downstream),
        parts: &parts,
        body,
        prepared: None,
        request_id,
        peer_ip,
        timeout,
    };
    match attempts.run(&mut transport, out).await {
        Ok(((resp, conn), guard)) => {
            let (mut rp, body) = resp.into_parts();
            // The bridge leaves them out itself, as it reads the head.
            strip_hop_by_hop(&mut rp.headers);
            let inner = Upstreamed::Hyper {
                body,
                conn: Some(conn),
            };
            respond(rp, inner, guard, transport.timeout, permit, cluster)
        }
        Err(a) => answer(a),
    }
}

/// Hyper's way of sending one attempt: a pooled hyper client connection per host.
struct HyperTransport<'a> {
    cluster: &'a Cluster,
    parts: &'a Parts,
    /// The downstream headers, until the first attempt turns them into upstream ones.
    downstream: Option<HeaderMap>,
    prepared: Option<HeaderMap>,
    host_is_upstream: bool,
    body: ReqBody,
    request_id: &'a HeaderValue,
    peer_ip: &'a HeaderValue,
    timeout: Pin<Box<Sleep>>,
}

impl Transport for HyperTransport<'_> {
    type Request = Request<ProxyBody>;
    type Response = (Response<Incoming>, Conn);
    type Error = UpstreamError;

    fn prepare(&mut self, host: &HostHandle) -> Result<Request<ProxyBody>, LocalAnswer> {
        let Some(up_body) = self.body.take() else {
            return Err(LocalAnswer::BodyAlreadySent);
        };
        let parts = self.parts;
        let (downstream, request_id, peer_ip) =
            (&mut self.downstream, self.request_id, self.peer_ip);
        let headers = self.prepared.get_or_insert_with(|| {
            let downstream = downstream.take().unwrap_or_default();
            headers::upstream_headers(
                downstream,
                &parts.uri,
                Some(&host.authority),
                request_id,
                peer_ip,
            )
        });
        if self.host_is_upstream {
            if let Ok(v) = HeaderValue::from_str(host.authority.as_str()) {
                headers.insert(header::HOST, v);
            }
        }
        // An attempt that may be followed by another sends a copy.
        let headers = if self.body.replayable() {
            headers.clone()
        } else {
            std::mem::take(headers)
        };
        let scheme = self.cluster.scheme.to_http();
        let absolute = self
            .cluster
            .config
            .http2
            .then_some((&scheme, &host.authority));
        let uri = headers::target(&parts.uri, absolute).map_err(|_| LocalAnswer::Unforwardable)?;
        Ok(headers::request(&parts.method, uri, headers, up_body))
    }

    async fn send(
        &mut self,
        host: &HostHandle,
        req: Request<ProxyBody>,
    ) -> Sent<Self::Response, UpstreamError> {
        let result = tokio::select! {
            biased;
            r = self.cluster.upstream.send(&host.conns, host.addr, req) => r,
            () = self.timeout.as_mut() => return Sent::Timeout,
        };
        match result {
            Ok((resp, conn)) => {
                let status = resp.status().as_u16();
                Sent::Response((resp, conn), status)
            }
            Err(e) if e.is_connect() => Sent::Connect {
                overflow: e.is_overflow(),
                error: e,
            },
            Err(e) => Sent::Reset(e),
        }
    }
}

/// The downstream response around the upstream one's head (hop-by-hop headers stripped): the
/// body wrapped so it keeps its counts, its timeout and its connection until it is complete.
fn respond(
    rp: http::response::Parts,
    inner: Upstreamed,
    guard: ActiveGuard,
    deadline: Pin<Box<Sleep>>,
    permit: Permit,
    cluster: &Arc<Cluster>,
) -> Response<ProxyBody> {
    let guarded = Guarded {
        inner,
        deadline,
        done: false,
        guard,
        _permit: permit,
        active: Cluster::start_request(cluster.clone()),
    };
    Response::from_parts(rp, guarded.boxed_unsync())
}

/// The request's `Content-Length`, if it has a valid one.
fn content_length(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
}

/// Buffers small bodies of retryable requests so they can be sent again, and every body of a
/// request that goes on a raw connection (`keep`, where the caller checked its size);
/// everything else streams through with a single attempt.
async fn request_body(
    cluster: &Cluster,
    parts: &Parts,
    body: Incoming,
    deadline: Instant,
    keep: bool,
) -> Result<ReqBody, LocalAnswer> {
    let small = content_length(parts).is_some_and(|n| n <= MAX_RETRY_BODY)
        || (body.is_end_stream() && !parts.headers.contains_key(header::TRANSFER_ENCODING));
    let retryable =
        cluster.retry_policy.num_retries > 0 && retry::is_idempotent(&parts.method) && small;
    if !keep && !retryable {
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
        Ok(Err(_)) => Err(LocalAnswer::BadRequestBody),
        Err(_) => Err(LocalAnswer::RequestBodyTimeout),
    }
}

#[cfg(test)]
mod tests;
