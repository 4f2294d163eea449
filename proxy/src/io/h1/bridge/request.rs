//! The upstream HTTP/1.1 request of a bridged HTTP/2 one, written straight from the
//! downstream header map: what `forward::headers::upstream_headers` does to a copy of the map
//! (hop-by-hop fields out, `Host`, `x-request-id`, `x-forwarded-for`) is done while writing,
//! so no second map is built and hashed for each request.

use http::Method;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;

use crate::io::forward::{REQUEST_ID, X_FORWARDED_FOR, is_hop_by_hop};

/// What the proxy adds to a forwarded request.
#[derive(Clone, Copy)]
pub(crate) struct Forwarded<'a> {
    pub request_id: &'a HeaderValue,
    pub peer_ip: &'a HeaderValue,
}

/// The request as HTTP/1.1 bytes: origin-form target; the downstream headers without the
/// hop-by-hop ones (the caller makes sure no `Connection` field names others; HTTP/2 forbids
/// it anyway); several `cookie` fields, which HTTP/2 allows, joined into one as HTTP/1.1
/// requires; `Host` from the authority when the request had none; our `x-request-id` in place
/// of any it had; the peer appended to the first `x-forwarded-for` (the others dropped, as
/// `upstream_headers` does); the body's length.
pub(crate) fn encode_request(parts: &Parts, ids: Forwarded<'_>, body: &[u8]) -> Vec<u8> {
    let headers: &HeaderMap = &parts.headers;
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut msg = Vec::with_capacity(256 + body.len());
    msg.extend_from_slice(parts.method.as_str().as_bytes());
    msg.push(b' ');
    msg.extend_from_slice(target.as_bytes());
    msg.extend_from_slice(b" HTTP/1.1\r\n");
    let (mut host, mut cookie, mut xff) = (false, false, false);
    for (name, value) in headers {
        if *name == header::HOST {
            host = true;
        } else if *name == header::CONTENT_LENGTH
            || *name == REQUEST_ID
            || is_hop_by_hop(name.as_str().as_bytes())
        {
            continue;
        } else if *name == header::COOKIE {
            if !std::mem::replace(&mut cookie, true) {
                msg.extend_from_slice(b"cookie: ");
                for (i, v) in headers.get_all(header::COOKIE).iter().enumerate() {
                    if i > 0 {
                        msg.extend_from_slice(b"; ");
                    }
                    msg.extend_from_slice(v.as_bytes());
                }
                msg.extend_from_slice(b"\r\n");
            }
            continue;
        } else if *name == X_FORWARDED_FOR {
            if !std::mem::replace(&mut xff, true) {
                let peer = ids.peer_ip.as_bytes();
                field(
                    &mut msg,
                    b"x-forwarded-for",
                    &[value.as_bytes(), b", ", peer],
                );
            }
            continue;
        }
        field(&mut msg, name.as_str().as_bytes(), &[value.as_bytes()]);
    }
    if !host {
        if let Some(a) = parts.uri.authority() {
            field(&mut msg, b"host", &[a.as_str().as_bytes()]);
        }
    }
    field(&mut msg, b"x-request-id", &[ids.request_id.as_bytes()]);
    if !xff {
        field(&mut msg, b"x-forwarded-for", &[ids.peer_ip.as_bytes()]);
    }
    // A length whenever there is a body, or the method usually has one (an empty POST).
    let expects_body = !matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    );
    if !body.is_empty() || expects_body {
        field(
            &mut msg,
            b"content-length",
            &[body.len().to_string().as_bytes()],
        );
    }
    msg.extend_from_slice(b"\r\n");
    msg.extend_from_slice(body);
    msg
}

/// One header line, its value given in pieces.
fn field(msg: &mut Vec<u8>, name: &[u8], value: &[&[u8]]) {
    msg.extend_from_slice(name);
    msg.extend_from_slice(b": ");
    for piece in value {
        msg.extend_from_slice(piece);
    }
    msg.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests;
