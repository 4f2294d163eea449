//! Header rewriting between the hops. Header maps hash every name they look up, so the
//! request's own map is rewritten in place once per request (attempts clone it, which copies
//! without rehashing) and the hop-by-hop list is checked by one walk that compares names,
//! hashing only for headers that are actually there.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Uri};

use crate::io::upstream::ProxyBody;

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Connection-specific headers (RFC 9110 §7.6.1) besides those `Connection` names, for both
/// request paths (hyper's and `crate::io::h1`).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Whether a header name (any case) is in [`HOP_BY_HOP`]. The lengths of the names rule out
/// most headers before any comparison.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    matches!(name.len(), 2 | 7 | 10 | 16..=19)
        && HOP_BY_HOP
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// Removes connection-specific headers, including those named by `Connection`: they describe
/// one hop, and HTTP/2 forbids them outright.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Which of the fixed list are present, as bits: most messages carry one or none of them,
    // and comparing names costs far less than a hashed lookup per name. The lengths of the
    // names in the list rule out most headers before any comparison.
    let mut present = 0u16;
    for name in headers.keys() {
        if !is_hop_by_hop(name.as_str().as_bytes()) {
            continue;
        }
        // Names in a map are lower case already.
        if let Some(i) = HOP_BY_HOP.iter().position(|h| *h == name.as_str()) {
            present |= 1 << i;
        }
    }
    if present & 1 != 0 {
        strip_named_by_connection(headers);
        present &= !1;
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
}

/// Removes `Connection` and the headers it names.
fn strip_named_by_connection(headers: &mut HeaderMap) {
    let header::Entry::Occupied(e) = headers.entry(&header::CONNECTION) else {
        return;
    };
    let (_, mut values) = e.remove_entry_mult();
    let first = values.next();
    // Several Connection lines are rare; only they cost an allocation.
    let more: Vec<HeaderValue> = values.collect();
    for v in first.iter().chain(&more) {
        // By &str, which (unlike building a HeaderName) allocates nothing.
        for n in v.to_str().unwrap_or_default().split(',') {
            let n = n.trim();
            // The usual values: `keep-alive` is in the fixed list, `close` names no header.
            if !n.eq_ignore_ascii_case("close") && !n.eq_ignore_ascii_case("keep-alive") {
                headers.remove(n);
            }
        }
    }
}

/// Turns the downstream request's headers into those every attempt sends: hop-by-hop headers
/// stripped, `Host` kept (or taken from the request's authority, else the upstream's if
/// given, as HTTP/1.1 requires one), `x-request-id` set, the peer appended to `x-forwarded-for`.
pub fn upstream_headers(
    mut headers: HeaderMap,
    uri: &Uri,
    upstream: Option<&Authority>,
    request_id: &HeaderValue,
    peer_ip: &HeaderValue,
) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    if !headers.contains_key(header::HOST) {
        let host = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .or_else(|| HeaderValue::from_str(upstream?.as_str()).ok());
        if let Some(host) = host {
            headers.insert(header::HOST, host);
        }
    }
    headers.insert(REQUEST_ID.clone(), request_id.clone());
    match headers.entry(&X_FORWARDED_FOR) {
        header::Entry::Occupied(mut e) => {
            let prev = e.get();
            let mut v = Vec::with_capacity(prev.len() + 2 + peer_ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer_ip.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                e.insert(v);
            }
        }
        header::Entry::Vacant(e) => {
            e.insert(peer_ip.clone());
        }
    }
    headers
}

/// The request target: origin form (`/path?query`) for HTTP/1, which is what servers expect
/// from a proxy in front of them; absolute for HTTP/2, whose `:scheme` and `:authority`
/// pseudo-headers come from it. Built from parts that share their bytes with the request.
pub fn target(
    uri: &Uri,
    absolute: Option<(&Scheme, &Authority)>,
) -> Result<Uri, http::uri::InvalidUriParts> {
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let Some((scheme, authority)) = absolute else {
        return Ok(Uri::from(path));
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(path);
    Uri::from_parts(parts)
}

/// One attempt's request.
pub fn request(
    method: &Method,
    uri: Uri,
    headers: HeaderMap,
    body: ProxyBody,
) -> Request<ProxyBody> {
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    req
}
