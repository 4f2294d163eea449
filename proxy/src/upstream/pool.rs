//! Keep-alive upstream connections on `hyper::client::conn`, without hyper-util's pooled
//! client: its checkout machinery (a keyed map behind a lock, boxed futures, a task spawned per
//! request to put the connection back) cost more than the proxy's own work per request.
//!
//! HTTP/1 connections have no task of their own: the request that holds one drives it, first
//! in [`Upstream::send`] until the response head is in, then from the response body
//! ([`UpstreamBody`]), which puts the connection back on its host's bounded LIFO idle stack
//! ([`HostConns`]) once the body is complete. A proxied request thus runs in one task instead
//! of handing off to a connection task and back, and an idle connection costs nothing until
//! it is used. The price: a backend's close of an idle connection is seen only when the
//! connection is next used, which is before the request is written, so the request goes out
//! on another connection. HTTP/2 connections are multiplexed and keep their own task.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use super::{ConnectError, Connector, ProxyBody, UpstreamIo};

/// Why an upstream request got no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection: the breaker's limit, the connect timeout, a refused dial or failed TLS.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The request may have reached the host, which then reset or answered garbage.
    #[error("upstream: {0}")]
    Send(#[source] hyper::Error),
}

impl UpstreamError {
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }

    /// The connection limit was hit: this says nothing about the host.
    pub fn is_overflow(&self) -> bool {
        matches!(self, UpstreamError::Connect(ConnectError::Overflow))
    }
}

/// How many stale pooled connections one request may try before it dials a new one. A
/// backend that restarted closes every idle connection at once; the stack is walked lazily,
/// so each request drops at most this many before dialling.
const STALE_TRIES: usize = 4;

type H1Conn = http1::Connection<UpstreamIo, ProxyBody>;

/// An HTTP/1 connection: the sender and the connection future that does its IO.
struct H1 {
    tx: http1::SendRequest<ProxyBody>,
    conn: H1Conn,
}

struct Idle {
    h1: H1,
    since: Instant,
}

/// One host's connections. Dropping it closes the idle ones.
#[derive(Default)]
pub struct HostConns {
    idle: Mutex<Vec<Idle>>,
    h2: Mutex<Option<http2::SendRequest<ProxyBody>>>,
}

impl std::fmt::Debug for HostConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostConns")
            .field("idle", &self.idle_count())
            .finish_non_exhaustive()
    }
}

impl HostConns {
    fn idle(&self) -> MutexGuard<'_, Vec<Idle>> {
        // The stack holds no invariant a panic could break halfway.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn h2(&self) -> MutexGuard<'_, Option<http2::SendRequest<ProxyBody>>> {
        self.h2.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Idle HTTP/1 connections kept for reuse.
    pub fn idle_count(&self) -> usize {
        self.idle().len()
    }

    /// The most recently returned connection that has not idled past `timeout`.
    fn pop(&self, now: Instant, timeout: Duration) -> Option<H1> {
        let mut idle = self.idle();
        while let Some(c) = idle.pop() {
            if now.saturating_duration_since(c.since) < timeout {
                return Some(c.h1);
            }
        }
        None
    }

    fn push(&self, h1: H1, max: usize) {
        let since = Instant::now();
        let mut idle = self.idle();
        if idle.len() < max {
            idle.push(Idle { h1, since });
        }
    }
}

/// The connection settings of one cluster (or of its health checks): how to dial, which
/// protocol, and how long and how many idle connections per host are kept.
pub struct Upstream {
    connector: Connector,
    http2: bool,
    idle_timeout: Duration,
    max_idle_per_host: usize,
}

/// How one exchange on an HTTP/1 connection ended without a response.
enum Failed {
    /// The connection was closed before any of the request was written: send it elsewhere.
    /// (Boxed: rare, and the request is large.)
    Unsent(Box<Request<ProxyBody>>),
    Error(hyper::Error),
}

impl Upstream {
    /// `http2`: speak HTTP/2 only (prior knowledge, or ALPN over TLS).
    pub fn new(
        connector: Connector,
        http2: bool,
        idle_timeout: Duration,
        max_idle_per_host: usize,
    ) -> Self {
        Upstream {
            connector,
            http2,
            idle_timeout,
            max_idle_per_host,
        }
    }

    pub fn is_tls(&self) -> bool {
        self.connector.is_tls()
    }

    /// Sends `req` to `addr` over a pooled connection of `conns`, or a new one. `req`'s URI is
    /// sent as is over HTTP/1 (origin form) and must be absolute for HTTP/2. A request that a
    /// pooled connection gives back unsent (the backend closed it while it sat idle) goes out
    /// again on another. The connection returns to `conns` when the response body is complete.
    pub async fn send(
        &self,
        conns: &Arc<HostConns>,
        addr: SocketAddr,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        // Dialling and HTTP/2 are boxed: their futures (TLS handshake included) are large, and
        // every request would otherwise move them around in its own future.
        if self.http2 {
            let resp = Box::pin(self.send_h2(conns, addr, req)).await?;
            return Ok(resp.map(UpstreamBody::multiplexed));
        }
        let now = Instant::now();
        for _ in 0..STALE_TRIES {
            let Some(h1) = conns.pop(now, self.idle_timeout) else {
                break;
            };
            match exchange(h1, req).await {
                Ok((resp, h1)) => return Ok(self.pooled(resp, h1, conns)),
                Err(Failed::Unsent(r)) => {
                    tracing::debug!(upstream = %addr, "pooled connection closed while idle; trying another");
                    req = *r;
                }
                Err(Failed::Error(e)) => return Err(UpstreamError::Send(e)),
            }
        }
        Box::pin(self.dial(conns, addr, req)).await
    }

    fn pooled(
        &self,
        resp: Response<Incoming>,
        h1: Option<H1>,
        conns: &Arc<HostConns>,
    ) -> Response<UpstreamBody> {
        resp.map(|inner| UpstreamBody {
            inner,
            h1,
            home: Some((conns.clone(), self.max_idle_per_host)),
            done: false,
        })
    }

    /// Sends `req` on a new connection.
    async fn dial(
        &self,
        conns: &Arc<HostConns>,
        addr: SocketAddr,
        req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let (io, h2) = self.connector.connect(addr).await?;
        if h2 {
            let resp = self.handshake_h2(conns, io, req).await?;
            return Ok(resp.map(UpstreamBody::multiplexed));
        }
        let (tx, conn) = http1::Builder::new()
            .writev(false)
            .handshake(io)
            .await
            .map_err(UpstreamError::Send)?;
        match exchange(H1 { tx, conn }, req).await {
            Ok((resp, h1)) => Ok(self.pooled(resp, h1, conns)),
            // A new connection that closes before the request: nothing to retry on.
            Err(Failed::Unsent(_)) => Err(UpstreamError::Connect(ConnectError::Io(
                std::io::ErrorKind::ConnectionReset.into(),
            ))),
            Err(Failed::Error(e)) => Err(UpstreamError::Send(e)),
        }
    }

    /// Drops connections idle for longer than the idle timeout, which closes them. Requests
    /// check the timeout too when they pop; this sweep frees the sockets (and breaker slots)
    /// of hosts nobody asks for.
    pub fn evict_idle(&self, conns: &HostConns) {
        let now = Instant::now();
        conns
            .idle()
            .retain(|c| now.saturating_duration_since(c.since) < self.idle_timeout);
        let mut h2 = conns.h2();
        if h2.as_ref().is_some_and(|tx| tx.is_closed()) {
            *h2 = None;
        }
    }

    async fn send_h2(
        &self,
        conns: &HostConns,
        addr: SocketAddr,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let shared = conns.h2().as_ref().filter(|tx| !tx.is_closed()).cloned();
        let mut req = req;
        if let Some(mut tx) = shared {
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => return Err(UpstreamError::Send(e.into_error())),
                },
            }
        }
        let (io, _) = self.connector.connect(addr).await?;
        self.handshake_h2(conns, io, req).await
    }

    async fn handshake_h2(
        &self,
        conns: &HostConns,
        io: UpstreamIo,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let (mut tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(UpstreamError::Send)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream http2 connection failed");
            }
        });
        // Requests that raced here dialled too; the last one's connection is kept for all.
        *conns.h2() = Some(tx.clone());
        tx.send_request(req).await.map_err(UpstreamError::Send)
    }
}

/// Polls the connection unless it has finished; `false` once it has (closed or failed).
fn drive(conn: &mut Option<H1Conn>, cx: &mut Context<'_>) -> bool {
    let Some(c) = conn else {
        return false;
    };
    match Pin::new(c).poll(cx) {
        Poll::Pending => true,
        Poll::Ready(r) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "upstream connection failed");
            }
            *conn = None;
            false
        }
    }
}

/// One request and its response head on `h1`, driving the connection meanwhile. The
/// connection comes back unless it finished (closed) on the way.
async fn exchange(
    h1: H1,
    req: Request<ProxyBody>,
) -> Result<(Response<Incoming>, Option<H1>), Failed> {
    let H1 { mut tx, conn } = h1;
    let mut conn = Some(conn);
    // A connection back from the pool may still be finishing its last exchange, or may have
    // been closed by the backend: polling it first finds out, before anything is written.
    let ready = std::future::poll_fn(|cx| {
        drive(&mut conn, cx);
        tx.poll_ready(cx)
    })
    .await;
    if ready.is_err() {
        return Err(Failed::Unsent(Box::new(req)));
    }
    let mut sent = pin!(tx.try_send_request(req));
    let result = std::future::poll_fn(|cx| {
        drive(&mut conn, cx);
        sent.as_mut().poll(cx)
    })
    .await;
    match result {
        Ok(resp) => Ok((resp, conn.map(|conn| H1 { tx, conn }))),
        Err(mut e) => match e.take_message() {
            Some(req) => Err(Failed::Unsent(Box::new(req))),
            None => Err(Failed::Error(e.into_error())),
        },
    }
}

/// An upstream response body. Over HTTP/1 it drives its connection (the response's bytes
/// arrive through it) and, once complete, puts the connection back on its host's idle stack;
/// dropped early, it closes the connection, which is mid-message.
pub struct UpstreamBody {
    inner: Incoming,
    h1: Option<H1>,
    home: Option<(Arc<HostConns>, usize)>,
    done: bool,
}

impl UpstreamBody {
    fn multiplexed(inner: Incoming) -> Self {
        UpstreamBody {
            inner,
            h1: None,
            home: None,
            done: false,
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let (Some(h1), Some((conns, max))) = (self.h1.take(), self.home.take()) {
            if self.done || self.inner.is_end_stream() {
                conns.push(h1, max);
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(h1) = &mut this.h1 {
            if let Poll::Ready(r) = Pin::new(&mut h1.conn).poll(cx) {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream connection failed");
                }
                // Finished: what it read is in `inner`; the connection cannot be reused.
                this.h1 = None;
            }
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.done = true;
        }
        polled
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
