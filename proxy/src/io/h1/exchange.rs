//! One request on the fast path: breaker, host pick, attempts with retries over pooled
//! upstream connections, the response passed through, and the request's metrics and log line.
//! The policy is the general path's, in one place (`crate::io::attempts`): the same breakers,
//! retry rules, outlier feed, outcome counters and local answers.

use std::future::Future;
use std::pin::Pin;

use http::{StatusCode, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use super::Conn;
use super::chunked::Chunked;
use super::head::{self, Field, Framing, RequestHead, ResponseHead};
use crate::cluster::{Cluster, HostHandle};
use crate::core::policy::{LocalAnswer, Sent};
use crate::core::retry;
use crate::io::attempts::{self, Attempts, Transport};
use crate::io::forward::{self, Outcome, Route};
use crate::io::server::{self, AccessEntry};
use crate::io::upstream::{ConnectError, RawConn};

/// Response heads larger than this are refused (502), as hyper's client does at its limit.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Reused connections that turn out closed, per request, before a new one is dialled.
const STALE_TRIES: usize = 4;

/// Why reading a response head failed.
pub(super) enum HeadError {
    /// Nothing came back: on a reused connection, the backend closed it while it was idle.
    Nothing,
    Bad(&'static str),
}

/// Runs `fut` until the route timer fires; `None` then.
async fn within<T>(timer: Pin<&mut Sleep>, fut: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        biased;
        r = fut => Some(r),
        () = timer => None,
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Conn<'_, IO> {
    /// Answers one request; returns whether the client connection may carry another.
    pub(super) async fn exchange(
        &mut self,
        head: &RequestHead,
        route: &Route,
        close: bool,
    ) -> bool {
        let start = Instant::now();
        self.deadline = start + route.timeout;
        self.route_timer.as_mut().reset(self.deadline);
        self.request_id.clear();
        match &head.request_id {
            Some(r) => self.request_id.extend_from_slice(&self.buf[r.clone()]),
            None => self.request_id.extend_from_slice(&self.ids.hex()),
        }
        let mut out = Outcome::default();
        let (status, keep) = match self.read_body(head).await {
            Ok(()) => self.forward(head, route, close, &mut out).await,
            Err(timed_out) => {
                let answer = if timed_out {
                    LocalAnswer::RequestBodyTimeout
                } else {
                    LocalAnswer::BadRequestBody
                };
                (self.answer(answer, true).await.0, false)
            }
        };
        let elapsed = start.elapsed();
        route.cluster.metrics().request(status, elapsed);
        if tracing::enabled!(target: server::ACCESS_LOG, tracing::Level::INFO) {
            let host = std::str::from_utf8(&self.buf[head.host.clone()]).unwrap_or("");
            server::access_log(&AccessEntry {
                request_id: std::str::from_utf8(&self.request_id).unwrap_or(""),
                peer: self.peer,
                method: head.method.as_str(),
                host: forward::host_header_name(host).unwrap_or(""),
                path: head.path(&self.buf).unwrap_or(""),
                version: Version::HTTP_11,
                status,
                cluster: route.cluster.name(),
                outcome: &out,
                elapsed,
            });
        }
        keep
    }

    /// Reads the rest of a `Content-Length` body into the buffer, within the route timeout.
    /// `Err(true)` when it timed out, `Err(false)` when the client went away.
    async fn read_body(&mut self, head: &RequestHead) -> Result<(), bool> {
        let end = head.len + head.content_length as usize;
        while self.buf.len() < end {
            self.buf.reserve(end - self.buf.len());
            let Conn {
                io,
                buf,
                route_timer,
                ..
            } = self;
            match within(route_timer.as_mut(), io.read_buf(buf)).await {
                None => return Err(true),
                Some(Ok(n)) if n > 0 => {}
                Some(_) => return Err(false),
            }
        }
        Ok(())
    }

    /// Forwards the request under the shared policy (`crate::io::attempts`) and relays the
    /// response.
    async fn forward(
        &mut self,
        head: &RequestHead,
        route: &Route,
        close: bool,
        out: &mut Outcome,
    ) -> (u16, bool) {
        let cluster = &route.cluster;
        let _admission = match attempts::admit(cluster.as_ref(), out) {
            Ok(a) => a,
            Err(a) => return self.answer(a, close).await,
        };
        let hash = cluster.config.hash_header.as_deref().and_then(|name| {
            let f = self
                .fields
                .iter()
                .find(|f| self.buf[f.name.clone()].eq_ignore_ascii_case(name.as_bytes()))?;
            Some(xxhash_rust::xxh64::xxh64(&self.buf[f.value.clone()], 0))
        });
        head::write_request(
            &mut self.msg,
            &self.buf,
            head,
            &self.fields,
            &self.request_id,
            &self.peer_ip,
        );
        let attempts = Attempts {
            cluster,
            method: &head.method,
            hash,
            // The request's bytes are kept in `msg`: every attempt can be replayed.
            replayable: true,
            deadline: self.deadline,
        };
        let mut transport = FastTransport {
            conn: self,
            cluster,
            head,
        };
        match attempts.run(&mut transport, out).await {
            Ok(((resp, up), guard)) => self.relay(resp, up, cluster, guard.host(), close).await,
            Err(a) => self.answer(a, close).await,
        }
    }

    /// Sends the request to `host` and reads the response head, within the route timeout.
    async fn attempt(
        &mut self,
        cluster: &Cluster,
        host: &HostHandle,
        head: &RequestHead,
    ) -> Sent<(ResponseHead, RawConn), FastError> {
        let Conn {
            msg,
            up,
            up_fields,
            route_timer,
            ..
        } = self;
        let tries = attempt(cluster, host, &head.method, msg, up, up_fields);
        within(route_timer.as_mut(), tries)
            .await
            .unwrap_or(Sent::Timeout)
    }

    /// Passes the response to the client: head, then the body as it is delimited, within the
    /// route timeout. The upstream connection goes back to the pool when the body ended
    /// cleanly. Returns the status and whether the client connection may go on.
    async fn relay(
        &mut self,
        resp: ResponseHead,
        mut conn: RawConn,
        cluster: &Cluster,
        host: &HostHandle,
        close: bool,
    ) -> (u16, bool) {
        let status = resp.status;
        let close = close || resp.framing == Framing::UntilClose;
        head::write_response(
            &mut self.msg,
            &self.up,
            &resp,
            &self.up_fields,
            &self.request_id,
            close,
        );
        let Conn {
            io,
            msg,
            up,
            route_timer,
            ..
        } = self;
        let body = copy_body(&mut **io, &mut conn, &resp, msg, up);
        let done = within(route_timer.as_mut(), body).await.flatten();
        if up.capacity() > 8 * super::BUF {
            *up = Vec::with_capacity(super::BUF);
        }
        match done {
            Some(clean) => {
                if clean {
                    cluster.upstream.release_raw(&host.conns, conn);
                }
                (status, !close)
            }
            // Cut short (upstream failed or stalled past the timeout, or the client left):
            // the client can only learn it from the connection closing.
            None => (status, false),
        }
    }

    /// Sends a local answer; returns its status and whether the connection may go on.
    async fn answer(&mut self, a: LocalAnswer, close: bool) -> (u16, bool) {
        let extra = a.header().map(|(name, value)| (name.as_str(), value));
        self.reply(a.status(), a.code(), a.message(), extra, close)
            .await
    }

    /// A local answer; returns its status and whether the connection may go on.
    async fn reply(
        &mut self,
        status: StatusCode,
        code: &str,
        message: &str,
        extra: Option<(&str, &str)>,
        close: bool,
    ) -> (u16, bool) {
        head::write_local_reply(
            &mut self.msg,
            status,
            code,
            message,
            extra,
            &self.request_id,
            close,
        );
        let sent = self.io.write_all(&self.msg).await.is_ok() && self.io.flush().await.is_ok();
        (status.as_u16(), sent && !close)
    }
}

/// The fast path's way of sending one attempt: the request bytes in `msg` over a raw pooled
/// connection.
struct FastTransport<'c, 'a, 'r, IO> {
    conn: &'c mut Conn<'a, IO>,
    cluster: &'r Cluster,
    head: &'r RequestHead,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Transport for FastTransport<'_, '_, '_, IO> {
    type Request = ();
    type Response = (ResponseHead, RawConn);
    type Error = FastError;

    fn prepare(&mut self, _: &HostHandle) -> Result<(), LocalAnswer> {
        Ok(())
    }

    async fn send(&mut self, host: &HostHandle, (): ()) -> Sent<Self::Response, FastError> {
        self.conn.attempt(self.cluster, host, self.head).await
    }
}

/// Sends the request in `msg` to `host` over a pooled raw connection (a new one when none is
/// idle) and reads the response head into `up`. A reused connection that gives nothing back
/// was closed by the backend while idle: an idempotent request then goes out again on another
/// (as hyper does for a request its pooled connection never sent).
pub(crate) async fn attempt(
    cluster: &Cluster,
    host: &HostHandle,
    method: &http::Method,
    msg: &[u8],
    up: &mut Vec<u8>,
    up_fields: &mut Vec<Field>,
) -> Sent<(ResponseHead, RawConn), FastError> {
    let is_head = method == http::Method::HEAD;
    let replay = retry::is_idempotent(method);
    for _ in 0..STALE_TRIES {
        let Some(mut conn) = cluster.upstream.pop_raw(&host.conns) else {
            break;
        };
        match response_head(&mut conn, msg, up, up_fields, is_head).await {
            Err(HeadError::Nothing) if replay => continue,
            r => return sent(r, conn),
        }
    }
    let mut dialled = cluster.upstream.connect_raw(host.addr).await;
    if matches!(dialled, Err(ConnectError::Overflow)) && cluster.close_an_idle_connection(host.addr)
    {
        dialled = cluster.upstream.connect_raw(host.addr).await;
    }
    let mut conn = match dialled {
        Ok(c) => c,
        Err(e) => {
            return Sent::Connect {
                overflow: matches!(e, ConnectError::Overflow),
                error: FastError::Connect(e),
            };
        }
    };
    let r = response_head(&mut conn, msg, up, up_fields, is_head).await;
    sent(r, conn)
}

/// Why a fast-path attempt got no response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FastError {
    #[error(transparent)]
    Connect(ConnectError),
    /// The upstream closed, reset or answered garbage.
    #[error("{0}")]
    Reset(&'static str),
}

/// What reading a response head on `conn` gave, as an attempt's result.
fn sent(
    r: Result<ResponseHead, HeadError>,
    conn: RawConn,
) -> Sent<(ResponseHead, RawConn), FastError> {
    match r {
        Ok(h) => {
            let status = h.status;
            Sent::Response((h, conn), status)
        }
        Err(HeadError::Nothing) => Sent::Reset(FastError::Reset("connection closed")),
        Err(HeadError::Bad(why)) => Sent::Reset(FastError::Reset(why)),
    }
}

/// Writes the response head in `msg` and the body after it, as `resp.framing` delimits it:
/// what came with the head in `up`, then what `conn` sends. `Some(clean)` once the body is
/// through, `clean` when the connection carried exactly this response and may be reused;
/// `None` when either side failed.
async fn copy_body<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    conn: &mut RawConn,
    resp: &ResponseHead,
    msg: &mut Vec<u8>,
    up: &mut Vec<u8>,
) -> Option<bool> {
    let first = &up[resp.len..];
    let mut clean = !resp.close;
    match resp.framing {
        Framing::Empty => {
            clean &= first.is_empty();
            io.write_all(msg).await.ok()?;
        }
        Framing::Length(n) => {
            let take = first.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            clean &= take == first.len();
            msg.extend_from_slice(&first[..take]);
            io.write_all(msg).await.ok()?;
            let mut left = n - take as u64;
            while left > 0 {
                if read_more(conn, up).await? == 0 {
                    return None;
                }
                let take = up.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                clean &= take == up.len();
                io.write_all(&up[..take]).await.ok()?;
                left -= take as u64;
            }
        }
        Framing::Chunked => {
            let mut chunks = Chunked::default();
            let (used, mut done) = chunks.scan(first).ok()?;
            clean &= used == first.len();
            msg.extend_from_slice(&first[..used]);
            io.write_all(msg).await.ok()?;
            while !done {
                if read_more(conn, up).await? == 0 {
                    return None;
                }
                let used;
                (used, done) = chunks.scan(up).ok()?;
                clean &= used == up.len();
                io.write_all(&up[..used]).await.ok()?;
            }
        }
        Framing::UntilClose => {
            clean = false;
            msg.extend_from_slice(first);
            io.write_all(msg).await.ok()?;
            while read_more(conn, up).await? > 0 {
                io.write_all(up).await.ok()?;
            }
        }
    }
    // TLS may hold the last record back until flushed; for TCP this is free.
    io.flush().await.ok()?;
    Some(clean)
}

/// Reads the next piece of a response body into `up`, in place of the last; `None` on error.
async fn read_more(conn: &mut RawConn, up: &mut Vec<u8>) -> Option<usize> {
    up.clear();
    up.reserve(super::BUF);
    conn.stream.read_buf(up).await.ok()
}

/// Writes the request on `conn` and reads the response head into `up`, skipping interim
/// (1xx) responses.
pub(super) async fn response_head(
    conn: &mut RawConn,
    request: &[u8],
    up: &mut Vec<u8>,
    fields: &mut Vec<Field>,
    is_head: bool,
) -> Result<ResponseHead, HeadError> {
    up.clear();
    if conn.stream.write_all(request).await.is_err() {
        return Err(HeadError::Nothing);
    }
    let mut received = false;
    loop {
        up.reserve(4096);
        match conn.stream.read_buf(up).await {
            Ok(n) if n > 0 => received = true,
            _ if !received => return Err(HeadError::Nothing),
            _ => return Err(HeadError::Bad("connection closed in the response head")),
        }
        loop {
            match head::parse_response(up, fields, is_head) {
                Ok(Some(h)) if h.status == 101 => {
                    return Err(HeadError::Bad("unrequested upgrade"));
                }
                Ok(Some(h)) if h.status < 200 => {
                    up.drain(..h.len);
                }
                Ok(Some(h)) => return Ok(h),
                Ok(None) if up.len() < MAX_RESPONSE_HEAD => break,
                Ok(None) => return Err(HeadError::Bad("response head too large")),
                Err(e) => return Err(HeadError::Bad(e.0)),
            }
        }
    }
}
