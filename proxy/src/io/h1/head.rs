//! Message heads on the HTTP/1.1 fast path, sans IO: parse a request or response head with
//! `httparse` into byte ranges of the buffer it arrived in, and write the head the next hop
//! gets by copying the header lines that pass, byte for byte, instead of building a header
//! map per message. Anything the fast path does not handle is reported as [`Slow`], and the
//! connection goes to hyper, which also answers malformed requests.

use std::mem::MaybeUninit;
use std::ops::Range;

use http::Method;

use crate::io::forward::is_hop_by_hop;

/// Headers per message beyond which the fast path gives up (hyper then decides).
pub const MAX_HEADERS: usize = 100;
/// Request bodies the fast path buffers (so that it can retry them); larger ones, and chunked
/// ones, go to the general path, which streams them.
pub const MAX_BODY: u64 = 64 * 1024;

/// One header line as ranges of the buffer it was parsed from.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: Range<usize>,
    pub value: Range<usize>,
}

/// Why a request leaves the fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slow {
    /// Not valid HTTP/1.x as far as `httparse` can tell, or too many headers.
    Malformed,
    /// Valid, but something the fast path leaves to hyper: HTTP/1.0, CONNECT, upgrades,
    /// `Expect`, chunked or large bodies, absolute targets, no `Host`.
    Unsupported,
}

/// A complete request head.
#[derive(Debug)]
pub struct RequestHead {
    /// Bytes of the head, final CRLF included.
    pub len: usize,
    pub method: Method,
    pub method_raw: Range<usize>,
    /// Origin-form target, query included.
    pub target: Range<usize>,
    pub host: Range<usize>,
    pub content_length: u64,
    /// The client asked to close after this exchange.
    pub close: bool,
    pub request_id: Option<Range<usize>>,
    /// A `Connection` header is present: the headers it names are not forwarded.
    pub connection: bool,
}

impl RequestHead {
    /// The path without the query; `None` if it is not UTF-8 (such a request is routed by
    /// hyper's reading of it, not by a guess here).
    pub fn path<'a>(&self, buf: &'a [u8]) -> Option<&'a str> {
        let target = std::str::from_utf8(&buf[self.target.clone()]).ok()?;
        Some(target.split_once('?').map_or(target, |(p, _)| p))
    }
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// No length: the body ends when the upstream closes.
    UntilClose,
}

/// A complete response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub reason: Range<usize>,
    pub framing: Framing,
    /// The upstream connection cannot carry another request after this one.
    pub close: bool,
    pub connection: bool,
}

/// A response the proxy cannot pass on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid response from upstream: {0}")]
pub struct BadResponse(pub &'static str);

fn offset(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

fn collect_fields(buf: &[u8], headers: &[httparse::Header<'_>], fields: &mut Vec<Field>) {
    fields.clear();
    fields.extend(headers.iter().map(|h| Field {
        name: offset(buf, h.name.as_bytes()),
        value: offset(buf, h.value),
    }));
}

/// A `Content-Length` value: digits only, at most 18 of them.
fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The comma-separated tokens of a header value, trimmed.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',').map(<[u8]>::trim_ascii)
}

/// Parses the request head at the start of `buf`: `Ok(None)` while it is incomplete.
pub fn parse_request(buf: &[u8], fields: &mut Vec<Field>) -> Result<Option<RequestHead>, Slow> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Slow::Malformed),
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Err(Slow::Unsupported);
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| Slow::Malformed)?;
    if method == Method::CONNECT || !target.starts_with('/') {
        return Err(Slow::Unsupported);
    }
    collect_fields(buf, req.headers, fields);
    let mut head = RequestHead {
        len,
        method_raw: offset(buf, req.method.unwrap_or_default().as_bytes()),
        method,
        target: offset(buf, target.as_bytes()),
        host: 0..0,
        content_length: 0,
        close: false,
        request_id: None,
        connection: false,
    };
    let (mut host, mut length) = (None, None);
    for f in fields.iter() {
        let (name, value) = (&buf[f.name.clone()], &buf[f.value.clone()]);
        match name.len() {
            // The guard records the first Host; a second one is malformed.
            4 if name.eq_ignore_ascii_case(b"host") && host.replace(f.value.clone()).is_some() => {
                return Err(Slow::Malformed);
            }
            6 if name.eq_ignore_ascii_case(b"expect") => return Err(Slow::Unsupported),
            7 if name.eq_ignore_ascii_case(b"upgrade") => return Err(Slow::Unsupported),
            10 if name.eq_ignore_ascii_case(b"connection") => {
                head.connection = true;
                for t in tokens(value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        head.close = true;
                    } else if t.eq_ignore_ascii_case(b"upgrade") {
                        return Err(Slow::Unsupported);
                    }
                }
            }
            12 if name.eq_ignore_ascii_case(b"x-request-id")
                && (1..=128).contains(&value.len()) =>
            {
                head.request_id = Some(f.value.clone());
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                let n = content_length(value).ok_or(Slow::Malformed)?;
                if length.replace(n).is_some_and(|prev| prev != n) {
                    return Err(Slow::Malformed);
                }
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                return Err(Slow::Unsupported);
            }
            _ => {}
        }
    }
    head.host = host.ok_or(Slow::Unsupported)?;
    head.content_length = length.unwrap_or(0);
    if head.content_length > MAX_BODY {
        return Err(Slow::Unsupported);
    }
    Ok(Some(head))
}

/// Parses the response head at the start of `buf`: `Ok(None)` while it is incomplete.
/// `head_request`: the request was HEAD, so the response has no body whatever it says.
pub fn parse_response(
    buf: &[u8],
    fields: &mut Vec<Field>,
    head_request: bool,
) -> Result<Option<ResponseHead>, BadResponse> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parser = httparse::ParserConfig::default();
    let len = match parser.parse_response_with_uninit_headers(&mut resp, buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(BadResponse("malformed head")),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(BadResponse("malformed status line"));
    };
    if !(100..=599).contains(&status) {
        return Err(BadResponse("status out of range"));
    }
    collect_fields(buf, resp.headers, fields);
    let mut head = ResponseHead {
        len,
        status,
        reason: offset(buf, resp.reason.unwrap_or_default().as_bytes()),
        framing: Framing::UntilClose,
        close: version == 0,
        connection: false,
    };
    let (mut length, mut chunked, mut encoded) = (None, false, false);
    for f in fields.iter() {
        let (name, value) = (&buf[f.name.clone()], &buf[f.value.clone()]);
        match name.len() {
            10 if name.eq_ignore_ascii_case(b"connection") => {
                head.connection = true;
                for t in tokens(value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        head.close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") && version == 0 {
                        head.close = false;
                    }
                }
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                let n = content_length(value).ok_or(BadResponse("bad content-length"))?;
                if length.replace(n).is_some_and(|prev| prev != n) {
                    return Err(BadResponse("conflicting content-length"));
                }
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                encoded = true;
                // Only the last coding says how the message ends.
                chunked = tokens(value)
                    .last()
                    .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
            }
            _ => {}
        }
    }
    let (framing, both) = response_framing(status, head_request, length, encoded, chunked);
    head.framing = framing;
    // Transfer-Encoding overrides Content-Length, and a message carrying both must not leave
    // the connection open (RFC 9112 §6.3).
    head.close |= both;
    if head.framing == Framing::UntilClose {
        head.close = true;
    }
    Ok(Some(head))
}

/// How a response's body ends, from its status and framing headers (`length`: its
/// Content-Length; `encoded`: it has a Transfer-Encoding, `chunked` the last coding), and
/// whether it carries both framings.
fn response_framing(
    status: u16,
    head_request: bool,
    length: Option<u64>,
    encoded: bool,
    chunked: bool,
) -> (Framing, bool) {
    if head_request || matches!(status, 100..=199 | 204 | 304) {
        return (Framing::Empty, false);
    }
    if encoded {
        let framing = if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        };
        return (framing, length.is_some());
    }
    let framing = match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    };
    (framing, false)
}

/// Whether `name` is listed by one of the message's `Connection` headers.
fn named_by_connection(buf: &[u8], fields: &[Field], name: &[u8]) -> bool {
    fields
        .iter()
        .filter(|f| buf[f.name.clone()].eq_ignore_ascii_case(b"connection"))
        .any(|f| tokens(&buf[f.value.clone()]).any(|t| t.eq_ignore_ascii_case(name)))
}

/// The header lines of a message that are passed on: hop-by-hop ones and those `skip` names
/// are left out.
fn copy_fields(
    out: &mut Vec<u8>,
    buf: &[u8],
    fields: &[Field],
    connection: bool,
    skip: impl Fn(&[u8]) -> bool,
) {
    for f in fields {
        let name = &buf[f.name.clone()];
        if is_hop_by_hop(name)
            || skip(name)
            || (connection && named_by_connection(buf, fields, name))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(&buf[f.value.clone()]);
        out.extend_from_slice(b"\r\n");
    }
}

/// Writes the request every attempt sends upstream: the request line and headers as they
/// came, without hop-by-hop headers, with `x-request-id` set and the peer appended to
/// `x-forwarded-for`, followed by the body.
pub fn write_request(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &RequestHead,
    fields: &[Field],
    request_id: &[u8],
    peer_ip: &[u8],
) {
    out.clear();
    out.extend_from_slice(&buf[head.method_raw.clone()]);
    out.push(b' ');
    out.extend_from_slice(&buf[head.target.clone()]);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let is = |name: &[u8], want: &[u8]| name.len() == want.len() && name.eq_ignore_ascii_case(want);
    copy_fields(out, buf, fields, head.connection, |n| {
        is(n, b"x-request-id") || is(n, b"x-forwarded-for")
    });
    out.extend_from_slice(b"x-request-id: ");
    out.extend_from_slice(request_id);
    out.extend_from_slice(b"\r\nx-forwarded-for: ");
    for f in fields
        .iter()
        .filter(|f| is(&buf[f.name.clone()], b"x-forwarded-for"))
    {
        out.extend_from_slice(&buf[f.value.clone()]);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer_ip);
    out.extend_from_slice(b"\r\n\r\n");
    let body = head.len..head.len + head.content_length as usize;
    out.extend_from_slice(&buf[body]);
}

/// Writes the response head the client gets: the upstream's status and headers without
/// hop-by-hop ones, the framing the body is passed on with, and `x-request-id`.
pub fn write_response(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &ResponseHead,
    fields: &[Field],
    request_id: &[u8],
    close: bool,
) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (head.status / 100) as u8,
        b'0' + (head.status / 10 % 10) as u8,
        b'0' + (head.status % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(&buf[head.reason.clone()]);
    out.extend_from_slice(b"\r\n");
    copy_fields(out, buf, fields, head.connection, |n| {
        n.len() == 12 && n.eq_ignore_ascii_case(b"x-request-id")
    });
    if head.framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close || head.framing == Framing::UntilClose {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"x-request-id: ");
    out.extend_from_slice(request_id);
    out.extend_from_slice(b"\r\n\r\n");
}

/// Writes a whole local answer in the registry's error shape.
pub fn write_local_reply(
    out: &mut Vec<u8>,
    status: http::StatusCode,
    code: &str,
    message: &str,
    extra: Option<(&str, &str)>,
    request_id: &[u8],
    close: bool,
) {
    let body = serde_json::to_vec(&schema::api::ErrorBody::new(code, message)).unwrap_or_default();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    if let Some((name, value)) = extra {
        out.extend_from_slice(format!("\r\n{name}: {value}").as_bytes());
    }
    if close {
        out.extend_from_slice(b"\r\nconnection: close");
    }
    out.extend_from_slice(b"\r\nx-request-id: ");
    out.extend_from_slice(request_id);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&body);
}

#[cfg(test)]
mod tests;
