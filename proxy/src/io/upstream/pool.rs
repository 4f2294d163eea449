//! Keep-alive upstream connections on `hyper::client::conn`, without hyper-util's pooled
//! client: its checkout machinery (a keyed map behind a lock, boxed futures, a task spawned per
//! request to put the connection back) cost more than the proxy's own work per request.
//!
//! Each host keeps a bounded LIFO stack of idle HTTP/1 senders ([`HostConns`]); a request pops
//! the most recently used one (the warmest, and the least likely to have been closed by the
//! backend's keep-alive timeout) without awaiting when it is ready, or dials a new connection.
//! The caller hands the sender back with [`Upstream::release`] once the response body is
//! complete. HTTP/2 hosts share one multiplexed sender instead.

use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{ConnectError, Connector, ProxyBody, UpstreamIo};
use crate::core::breaker::Permit;

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

/// Where a response came from, to be handed back to [`Upstream::release`] once the response
/// body is complete.
pub enum Conn {
    Http1(http1::SendRequest<ProxyBody>),
    /// Multiplexed: nothing to give back.
    Http2,
}

struct Idle {
    tx: http1::SendRequest<ProxyBody>,
    since: Instant,
}

/// A plain TCP connection of the HTTP/1.1 fast path (`crate::io::h1`), which speaks HTTP on it
/// itself; it holds its breaker slot for as long as it is open.
pub struct RawConn {
    pub stream: TcpStream,
    _permit: Option<Permit>,
}

impl RawConn {
    /// Whether the peer has neither closed the connection nor sent anything unasked: an idle
    /// connection has nothing to read. Costs no system call unless the socket polled readable.
    fn is_idle_and_open(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => matches!(
                self.stream.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            ),
        }
    }
}

struct RawIdle {
    conn: RawConn,
    since: Instant,
}

/// One host's connections. Dropping it closes the idle ones.
#[derive(Default)]
pub struct HostConns {
    idle: Mutex<Vec<Idle>>,
    raw: Mutex<Vec<RawIdle>>,
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

    fn raw(&self) -> MutexGuard<'_, Vec<RawIdle>> {
        self.raw.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn h2(&self) -> MutexGuard<'_, Option<http2::SendRequest<ProxyBody>>> {
        self.h2.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Idle HTTP/1 connections kept for reuse.
    pub fn idle_count(&self) -> usize {
        self.idle().len() + self.raw().len()
    }

    /// The most recently returned live connection that has not idled past `timeout`.
    fn pop(&self, now: Instant, timeout: Duration) -> Option<http1::SendRequest<ProxyBody>> {
        let mut idle = self.idle();
        while let Some(c) = idle.pop() {
            if !c.tx.is_closed() && now.saturating_duration_since(c.since) < timeout {
                return Some(c.tx);
            }
        }
        None
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
    /// again on another.
    pub async fn send(
        &self,
        conns: &HostConns,
        addr: SocketAddr,
        mut req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Conn), UpstreamError> {
        // Dialling and HTTP/2 are boxed: their futures (TLS handshake included) are large, and
        // every request would otherwise move them around in its own future.
        if self.http2 {
            return Box::pin(self.send_h2(conns, addr, req)).await;
        }
        let now = Instant::now();
        for _ in 0..STALE_TRIES {
            let Some(mut tx) = conns.pop(now, self.idle_timeout) else {
                break;
            };
            // Just handed back: its connection task may not have finished the last exchange.
            if !tx.is_ready() && tx.ready().await.is_err() {
                continue;
            }
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Conn::Http1(tx))),
                Err(e) => req = unsent(e)?,
            }
        }
        Box::pin(self.dial(conns, addr, req)).await
    }

    /// Sends `req` on a new connection.
    async fn dial(
        &self,
        conns: &HostConns,
        addr: SocketAddr,
        req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Conn), UpstreamError> {
        let (io, h2) = self.connector.connect(addr).await?;
        if h2 {
            return self.handshake_h2(conns, io, req).await;
        }
        let (mut tx, conn) = http1::Builder::new()
            .writev(false)
            .handshake(io)
            .await
            .map_err(UpstreamError::Send)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %addr, error = %e, "upstream connection failed");
            }
        });
        let resp = tx.send_request(req).await.map_err(UpstreamError::Send)?;
        Ok((resp, Conn::Http1(tx)))
    }

    /// Puts a connection whose response is complete back on `conns`' idle stack, unless the
    /// stack is full or the connection closed (then it is dropped, which closes it).
    pub fn release(&self, conns: &HostConns, conn: Conn) {
        let Conn::Http1(tx) = conn else {
            return;
        };
        if tx.is_closed() {
            return;
        }
        let since = Instant::now();
        let mut idle = conns.idle();
        if idle.len() < self.max_idle_per_host {
            idle.push(Idle { tx, since });
        }
    }

    /// The most recently returned fast-path connection that is still open, if any. Idle time
    /// is left to [`Upstream::evict_idle`]: a connection the backend closed in the meantime
    /// shows as readable and is dropped here.
    pub fn pop_raw(&self, conns: &HostConns) -> Option<RawConn> {
        let mut idle = conns.raw();
        while let Some(c) = idle.pop() {
            if c.conn.is_idle_and_open() {
                return Some(c.conn);
            }
        }
        None
    }

    /// Closes the least recently used idle fast-path connection of `conns`, which frees its
    /// breaker slot at once; false if there was none.
    pub fn close_one_idle(&self, conns: &HostConns) -> bool {
        let mut idle = conns.raw();
        if idle.is_empty() {
            return false;
        }
        idle.remove(0);
        true
    }

    /// Dials a new fast-path connection, counted against the breaker.
    pub async fn connect_raw(&self, addr: SocketAddr) -> Result<RawConn, ConnectError> {
        let (stream, permit) = self.connector.connect_tcp(addr).await?;
        Ok(RawConn {
            stream,
            _permit: permit,
        })
    }

    /// Puts a fast-path connection whose response is complete back on the idle stack,
    /// unless the stack is full.
    pub fn release_raw(&self, conns: &HostConns, conn: RawConn) {
        let since = Instant::now();
        let mut idle = conns.raw();
        if idle.len() < self.max_idle_per_host {
            idle.push(RawIdle { conn, since });
        }
    }

    /// Closes connections idle for longer than the idle timeout. Requests check it too when
    /// they pop; this sweep frees the sockets (and breaker slots) of hosts nobody asks for.
    pub fn evict_idle(&self, conns: &HostConns) {
        let now = Instant::now();
        conns.idle().retain(|c| {
            !c.tx.is_closed() && now.saturating_duration_since(c.since) < self.idle_timeout
        });
        conns.raw().retain(|c| {
            c.conn.is_idle_and_open() && now.saturating_duration_since(c.since) < self.idle_timeout
        });
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
    ) -> Result<(Response<Incoming>, Conn), UpstreamError> {
        let shared = conns.h2().as_ref().filter(|tx| !tx.is_closed()).cloned();
        let mut req = req;
        if let Some(mut tx) = shared {
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Conn::Http2)),
                Err(e) => req = unsent(e)?,
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
    ) -> Result<(Response<Incoming>, Conn), UpstreamError> {
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
        let resp = tx.send_request(req).await.map_err(UpstreamError::Send)?;
        Ok((resp, Conn::Http2))
    }
}

/// The request back from a connection that closed before writing any of it, or the error.
fn unsent(mut e: TrySendError<Request<ProxyBody>>) -> Result<Request<ProxyBody>, UpstreamError> {
    match e.take_message() {
        Some(req) => {
            tracing::debug!(error = %e.error(), "pooled connection closed before the request; retrying on another");
            Ok(req)
        }
        None => Err(UpstreamError::Send(e.into_error())),
    }
}

#[cfg(test)]
mod tests;
