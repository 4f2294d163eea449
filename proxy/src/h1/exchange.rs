//! One request on the fast path: breaker, host pick, attempts with retries over pooled
//! upstream connections, the response passed through, and the request's metrics and log line.
//! The policy is the general path's (`crate::forward`): the same breakers, retry rules,
//! outlier feed, outcome counters and local answers.

use std::future::Future;
use std::pin::Pin;

use http::{StatusCode, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use super::Conn;
use super::chunked::Chunked;
use super::head::{self, Field, Framing, RequestHead, ResponseHead};
use crate::breaker::Resource;
use crate::cluster::{Cluster, HostHandle};
use crate::forward::{self, Failure, OVERFLOW, Outcome, Route};
use crate::retry::{self, AttemptOutcome};
use crate::server::{self, AccessEntry};
use crate::upstream::{ConnectError, RawConn};

/// Response heads larger than this are refused (502), as hyper's client does at its limit.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Reused connections that turn out closed, per request, before a new one is dialled.
const STALE_TRIES: usize = 4;

/// How one attempt ended.
enum Attempt {
    Response(ResponseHead, RawConn),
    Connect(ConnectError),
    /// The upstream closed, reset or answered garbage.
    Reset(&'static str),
    Timeout,
}

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
                let (status, code, message) = if timed_out {
                    (
                        StatusCode::REQUEST_TIMEOUT,
                        "request_timeout",
                        "request body not received in time",
                    )
                } else {
                    (
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "could not read the request body",
                    )
                };
                self.reply(status, code, message, None, true).await;
                (status.as_u16(), false)
            }
        };
        let elapsed = start.elapsed();
        route.cluster.metrics.request(status, elapsed);
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

    /// The attempt loop of `crate::forward::forward`, on fast-path connections.
    async fn forward(
        &mut self,
        head: &RequestHead,
        route: &Route,
        close: bool,
        out: &mut Outcome,
    ) -> (u16, bool) {
        let cluster = &route.cluster;
        let _req_permit = match cluster.breaker.try_acquire(Resource::Requests) {
            Ok(p) => p,
            Err(r) => return self.overflow(cluster, r, out, close).await,
        };
        let _active = Cluster::start_request(cluster.as_ref());
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
        let mut previous = None;
        // The retry this attempt is, if it is one: its slot is held until the attempt's outcome.
        let mut retry = None;
        loop {
            let Some((addr, guard)) = cluster.pick(hash, previous) else {
                return self.failed(Failure::NoHealthyUpstream, out, close).await;
            };
            out.upstream = Some(addr);
            out.attempts += 1;
            let pending = match cluster.breaker.try_acquire(Resource::Pending) {
                Ok(p) => p,
                Err(r) => return self.overflow(cluster, r, out, close).await,
            };
            let result = self.attempt(cluster, guard.host(), head).await;
            drop(pending);
            let attempt = match &result {
                Attempt::Response(h, _) => (AttemptOutcome::Status(h.status), false),
                Attempt::Connect(e) => (
                    AttemptOutcome::ConnectFailure,
                    matches!(e, ConnectError::Overflow),
                ),
                Attempt::Reset(_) => (AttemptOutcome::Reset, false),
                Attempt::Timeout => (AttemptOutcome::Timeout, false),
            };
            // The request's bytes are kept in `msg`: every attempt can be replayed.
            let (method, attempts, deadline) = (&head.method, out.attempts, self.deadline);
            if let Some(wait) = forward::after_attempt(
                cluster,
                guard.host(),
                attempt,
                method,
                attempts,
                true,
                deadline,
                &mut retry,
            ) {
                // A response given up on goes with its connection: its body is unread.
                drop((result, guard));
                tokio::time::sleep(wait).await;
                previous = Some(addr);
                continue;
            }
            return match result {
                Attempt::Response(resp, up) => {
                    self.relay(resp, up, cluster, guard.host(), close).await
                }
                Attempt::Connect(ConnectError::Overflow) => {
                    self.overflow(cluster, Resource::Connections, out, close)
                        .await
                }
                Attempt::Connect(e) => {
                    tracing::debug!(error = %e, upstream = %addr, "upstream connect failed");
                    self.failed(Failure::Connect, out, close).await
                }
                Attempt::Reset(why) => {
                    tracing::debug!(error = why, upstream = %addr, "upstream failed");
                    self.failed(Failure::Reset, out, close).await
                }
                Attempt::Timeout => self.failed(Failure::Timeout, out, close).await,
            };
        }
    }

    /// Sends the request to `host` and reads the response head, within the route timeout.
    /// A reused connection that gives nothing back was closed by the backend while idle: an
    /// idempotent request then goes out again on another (as hyper does for a request its
    /// pooled connection never sent).
    async fn attempt(
        &mut self,
        cluster: &Cluster,
        host: &HostHandle,
        head: &RequestHead,
    ) -> Attempt {
        let Conn {
            msg,
            up,
            up_fields,
            route_timer,
            ..
        } = self;
        let is_head = head.method == http::Method::HEAD;
        let replay = retry::is_idempotent(&head.method);
        let tries = async {
            for _ in 0..STALE_TRIES {
                let Some(mut conn) = cluster.upstream.pop_raw(&host.conns) else {
                    break;
                };
                match response_head(&mut conn, msg, up, up_fields, is_head).await {
                    Ok(h) => return Attempt::Response(h, conn),
                    Err(HeadError::Nothing) if replay => continue,
                    Err(HeadError::Nothing) => return Attempt::Reset("connection closed"),
                    Err(HeadError::Bad(why)) => return Attempt::Reset(why),
                }
            }
            let mut dialled = cluster.upstream.connect_raw(host.addr).await;
            if matches!(dialled, Err(ConnectError::Overflow))
                && cluster.close_an_idle_connection(host.addr)
            {
                dialled = cluster.upstream.connect_raw(host.addr).await;
            }
            let mut conn = match dialled {
                Ok(c) => c,
                Err(e) => return Attempt::Connect(e),
            };
            match response_head(&mut conn, msg, up, up_fields, is_head).await {
                Ok(h) => Attempt::Response(h, conn),
                Err(HeadError::Nothing) => Attempt::Reset("connection closed"),
                Err(HeadError::Bad(why)) => Attempt::Reset(why),
            }
        };
        within(route_timer.as_mut(), tries)
            .await
            .unwrap_or(Attempt::Timeout)
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
        let body = async {
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
                        up.clear();
                        up.reserve(super::BUF);
                        if conn.stream.read_buf(up).await.ok()? == 0 {
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
                        up.clear();
                        up.reserve(super::BUF);
                        if conn.stream.read_buf(up).await.ok()? == 0 {
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
                    loop {
                        up.clear();
                        up.reserve(super::BUF);
                        if conn.stream.read_buf(up).await.ok()? == 0 {
                            break;
                        }
                        io.write_all(up).await.ok()?;
                    }
                }
            }
            // TLS may hold the last record back until flushed; for TCP this is free.
            io.flush().await.ok()?;
            Some(clean)
        };
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

    /// The local answer to a request no upstream answered.
    async fn failed(&mut self, f: Failure, out: &mut Outcome, close: bool) -> (u16, bool) {
        let (status, code, message) = f.answer();
        out.flag = Some(code);
        self.reply(status, code, message, None, close).await
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

    async fn overflow(
        &mut self,
        cluster: &Cluster,
        r: Resource,
        out: &mut Outcome,
        close: bool,
    ) -> (u16, bool) {
        metrics::counter!("tidings_proxy_overflow_total", "cluster" => cluster.name().to_string(), "resource" => r.as_str()).increment(1);
        out.flag = Some("overflow");
        let message = format!("circuit breaker open: {}", r.as_str());
        let extra = Some((OVERFLOW.as_str(), r.as_str()));
        self.reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "overflow",
            &message,
            extra,
            close,
        )
        .await
    }
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
