//! Requests that hyper's server took (HTTP/2 clients) sent over the fast path's raw upstream
//! connections instead of hyper's HTTP/1.1 client.
//!
//! Why: with HTTP/2 downstream, hyper's client was 44 % of the proxy's CPU (a task per
//! upstream connection, each request handed to it over a channel and its response handed
//! back over another, a header map encoded per request). Here the request's own task writes
//! the request bytes on a pooled connection and reads the response head, as the fast path
//! does; the body is read by the response body itself as hyper's server polls it, with the
//! chunk framing taken off, and the connection goes back to the pool when the body ended
//! cleanly.
//!
//! Taken only for what it handles completely (`crate::io::forward` decides): HTTP/2 requests
//! with an authority, a body known to be at most 64 KB (buffered, so every attempt can send
//! it again), to a plain HTTP/1 cluster. Trailers of chunked responses are dropped.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

mod request;

pub(crate) use self::request::{Forwarded, encode_request};
use super::chunked::Chunked;
use super::exchange::{self, FastError};
use super::head::{Field, Framing, ResponseHead};
use crate::cluster::{Cluster, HostHandle};
use crate::core::policy::{LocalAnswer, Sent};
use crate::io::attempts::Transport;
use crate::io::forward::{is_hop_by_hop, strip_hop_by_hop};
use crate::io::upstream::{BoxError, HostConns, RawConn};

/// Read size for response bodies.
const READ: usize = 8 * 1024;

/// One request's attempts over raw connections: its HTTP/1.1 bytes, encoded once, and the
/// buffers its response heads are read into.
pub(crate) struct RawTransport<'a> {
    cluster: &'a Cluster,
    method: &'a Method,
    msg: Vec<u8>,
    up: Vec<u8>,
    up_fields: Vec<Field>,
    /// The route timeout, which goes on into the response body (`forward::Guarded`).
    pub(crate) timeout: Pin<Box<Sleep>>,
}

impl<'a> RawTransport<'a> {
    /// `parts` are the downstream request's, headers included (see [`encode_request`]).
    pub(crate) fn new(
        cluster: &'a Cluster,
        parts: &'a Parts,
        ids: Forwarded<'_>,
        body: &[u8],
        timeout: Pin<Box<Sleep>>,
    ) -> Self {
        RawTransport {
            cluster,
            method: &parts.method,
            msg: encode_request(parts, ids, body),
            up: Vec::new(),
            // Room for a usual response's fields without growing.
            up_fields: Vec::with_capacity(16),
            timeout,
        }
    }
}

impl Transport for RawTransport<'_> {
    type Request = ();
    type Response = Response<RawBody>;
    type Error = FastError;

    fn prepare(&mut self, _: &HostHandle) -> Result<(), LocalAnswer> {
        Ok(())
    }

    async fn send(&mut self, host: &HostHandle, (): ()) -> Sent<Response<RawBody>, FastError> {
        let RawTransport {
            cluster,
            method,
            msg,
            up,
            up_fields,
            timeout,
        } = self;
        let sent = tokio::select! {
            biased;
            s = exchange::attempt(cluster, host, method, msg, up, up_fields) => s,
            () = timeout.as_mut() => return Sent::Timeout,
        };
        sent.then(|(head, conn)| {
            // The read bytes become the response's: its header values and the body's first
            // bytes are slices of them, copied nowhere.
            response(&head, Bytes::from(std::mem::take(up)), up_fields, conn)
                .ok_or(FastError::Reset("response header not valid for HTTP/2"))
        })
    }
}

/// The downstream response: the upstream's status and headers without the hop-by-hop ones,
/// and a body that reads the rest from `conn`. `None` when a header cannot be carried.
fn response(
    head: &ResponseHead,
    up: Bytes,
    fields: &[Field],
    conn: RawConn,
) -> Option<Response<RawBody>> {
    let mut headers = HeaderMap::with_capacity(fields.len());
    // Hop-by-hop fields are left out as they are met (cheaper than adding and removing
    // them); only a `Connection` that names other fields needs the general strip.
    let mut names_others = false;
    for f in fields {
        let name = &up[f.name.clone()];
        if is_hop_by_hop(name) {
            if !name.eq_ignore_ascii_case(b"connection") || only_persistence(&up[f.value.clone()]) {
                continue;
            }
            names_others = true;
        }
        let name = HeaderName::from_bytes(name).ok()?;
        let value = HeaderValue::from_maybe_shared(up.slice(f.value.clone())).ok()?;
        headers.append(name, value);
    }
    if names_others {
        strip_hop_by_hop(&mut headers);
    }
    let mut resp = Response::new(RawBody::new(head, up.slice(head.len..), conn));
    *resp.status_mut() = StatusCode::from_u16(head.status).ok()?;
    *resp.headers_mut() = headers;
    Some(resp)
}

/// Whether a `Connection` value only says `keep-alive` or `close`, naming no other field.
fn only_persistence(value: &[u8]) -> bool {
    value.split(|&b| b == b',').all(|t| {
        let t = t.trim_ascii();
        t.is_empty() || t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close")
    })
}

/// Where a response body stands.
enum State {
    /// Bytes of a `Content-Length` body still to come.
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

/// A response body read from its raw upstream connection as the downstream side asks for it.
pub(crate) struct RawBody {
    conn: Option<RawConn>,
    /// Body bytes of a `Content-Length` response that came with its head, not yet given out
    /// (a slice of the head's buffer).
    first: Bytes,
    /// Read from the connection, not yet given out.
    buf: BytesMut,
    state: State,
    /// The connection may carry another request once the body is done: the upstream did not
    /// say close, and sent nothing past the body.
    reusable: bool,
}

impl RawBody {
    fn new(head: &ResponseHead, first: Bytes, conn: RawConn) -> Self {
        let state = match head.framing {
            Framing::Empty => State::Done,
            Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunked::default()),
            Framing::UntilClose => State::UntilClose,
        };
        let reusable = !head.close && head.framing != Framing::UntilClose;
        let mut body = RawBody {
            conn: Some(conn),
            first: Bytes::new(),
            buf: BytesMut::new(),
            state,
            reusable,
        };
        match body.state {
            State::Done => body.reusable &= first.is_empty(),
            // The usual small body came whole with the head: given out as it is.
            State::Length(_) => body.first = first,
            _ => body.buf.extend_from_slice(&first),
        }
        body
    }

    /// Gives the connection back to the host's pool if the body was read whole and nothing
    /// else came on it; otherwise it is closed (dropped).
    pub(crate) fn release(&mut self, cluster: &Cluster, conns: &HostConns) {
        if let Some(conn) = self.conn.take() {
            if matches!(self.state, State::Done) && self.reusable {
                cluster.upstream.release_raw(conns, conn);
            }
        }
    }

    /// The next piece of the body from what has been read, if any.
    fn take(&mut self) -> Result<Option<Bytes>, BoxError> {
        match &mut self.state {
            State::Done => Ok(None),
            State::Length(left) => {
                let n = |len: usize| len.min(usize::try_from(*left).unwrap_or(usize::MAX));
                let data = if !self.first.is_empty() {
                    self.first.split_to(n(self.first.len()))
                } else if !self.buf.is_empty() {
                    self.buf.split_to(n(self.buf.len())).freeze()
                } else {
                    return Ok(None);
                };
                *left -= data.len() as u64;
                if *left == 0 {
                    self.state = State::Done;
                    self.reusable &= self.buf.is_empty() && self.first.is_empty();
                }
                Ok(Some(data))
            }
            _ if self.buf.is_empty() => Ok(None),
            State::UntilClose => Ok(Some(self.buf.split().freeze())),
            State::Chunked(chunks) => {
                let mut ranges = Vec::new();
                let (used, done) = chunks.decode(&self.buf, |r| ranges.push(r))?;
                let scanned = self.buf.split_to(used).freeze();
                let data = match ranges.as_slice() {
                    [] => Bytes::new(),
                    [one] => scanned.slice(one.clone()),
                    more => {
                        let mut joined = BytesMut::new();
                        for r in more {
                            joined.extend_from_slice(&scanned[r.clone()]);
                        }
                        joined.freeze()
                    }
                };
                if done {
                    self.state = State::Done;
                    self.reusable &= self.buf.is_empty();
                }
                Ok(Some(data))
            }
        }
    }
}

impl Body for RawBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match this.take() {
                Ok(Some(data)) if !data.is_empty() => {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(_) if matches!(this.state, State::Done) => return Poll::Ready(None),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(Some(Err("upstream connection gone".into())));
            };
            this.buf.reserve(READ);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.stream),
                cx,
                &mut this.buf
            ));
            match n {
                Ok(0) if matches!(this.state, State::UntilClose) => {
                    this.state = State::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return Poll::Ready(Some(Err("upstream closed mid-body".into()))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}
