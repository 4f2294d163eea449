//! The HTTP listener every Tidings control-plane server uses (registry, agent API, proxy
//! admin): HTTP/1.1 and h2c on hyper, hardened against clients that hold connections without
//! finishing requests or without reading answers.
//!
//! - A connection cap. At the cap a new connection closes the connection that has been idle
//!   (no request in flight) the longest, so a flood of idle or half-open connections cannot
//!   lock well-behaved clients out: the newest connection always gets its chance. A
//!   connection that has not read from its socket yet is not evicted (its request may be
//!   there, unread). If no connection can be evicted, the new one is refused with a `503`
//!   and `Retry-After: 1`, written without waiting.
//! - A request head must arrive whole within `header_read_timeout` (from accept for the
//!   first request, from its first byte for later ones); a kept-alive connection with nothing
//!   in flight closes after `idle_timeout`; a connection whose writes make no progress for
//!   `write_timeout` (a client that stopped reading) closes.
//! - Accept errors (out of file descriptors) never end the loop: it backs off 10 to 100 ms
//!   and logs at most once a second.
//! - On shutdown it stops accepting, asks every connection to finish, and drops those still
//!   open after `drain`.
//!
//! - TLS, when [`Options::tls`] is set: the handshake must finish within
//!   `header_read_timeout` of accept (it is part of getting the first request head), the
//!   connection counts toward the cap from accept, and the certificate files are re-read
//!   when they change ([`ServerTls`]) without touching open connections.
//!
//! Sockets stay within the cap even under a flood of connects: after evicting, the loop
//! accepts again only once the evicted socket is closed (or 50 ms passed). Connections closed
//! with nothing owed to the client (no request yet, half a head) or for not reading are reset
//! rather than closed with a FIN, so they leave no TIME_WAIT or unsent buffer behind. Bind
//! with [`bind`]: its accept queue is long enough that a flood does not drop the SYNs of
//! well-behaved clients.
//!
//! It also holds the one response-compression policy the registry and agent APIs share
//! ([`compression`]: gzip or zstd by `Accept-Encoding`, answers of 1 KiB and up).

mod compress;
mod conn;
mod limits;
mod metrics;
pub mod tls;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::compress::{Compression, MIN_COMPRESSED_BYTES, compression};
use crate::conn::{Admission, BoxError, ConnState, Reason, Table, Tracked, Watched};
pub use crate::limits::{
    DEFAULT_MAX_CONNECTIONS, FD_MARGIN, Limits, LimitsError, LimitsTable, MIN_HEADER_BYTES,
    open_files_limit,
};
pub use crate::metrics::{ConnMetrics, Family, Handle, Registrar};
pub use crate::tls::{ServerTls, TlsError, TlsFiles};

/// What a refused connection is told, in one non-blocking write: come back in a second.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// How long accepting waits for evicted connections to close before going on regardless.
const ROOM_PATIENCE: Duration = Duration::from_millis(50);

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// One listener's settings besides the application.
#[derive(Debug, Clone)]
pub struct Options {
    /// Names the component in logs (and should match the one given to [`ConnMetrics`]).
    pub component: &'static str,
    pub limits: Limits,
    pub metrics: ConnMetrics,
    /// After shutdown, how long in-flight requests get before their connections are dropped.
    pub drain: Duration,
    /// Serve HTTPS with this (reloading) certificate; `None`: plain HTTP.
    pub tls: Option<Arc<ServerTls>>,
}

/// Serves `service` (an `axum::Router`, or any cloneable tower service of
/// `Request<Incoming>`) on `listener` until `shutdown` completes, then drains. Every request
/// carries the peer address as `axum::extract::ConnectInfo<SocketAddr>`, as with
/// `axum::serve` and `into_make_service_with_connect_info`.
///
/// Fails at once only if `options.limits` are invalid; accept errors are retried forever.
pub async fn http<S, B, F>(
    listener: TcpListener,
    service: S,
    options: Options,
    shutdown: F,
) -> io::Result<()>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    F: Future<Output = ()>,
{
    let Options {
        component,
        limits,
        metrics,
        drain,
        tls,
    } = options;
    limits
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut accepting = Accepting::new(component, limits, metrics, tls);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = match accepting.accept(&listener, &mut shutdown).await {
            Accepted::Conn(stream, peer) => (stream, peer),
            Accepted::Retry => continue,
            Accepted::Shutdown => break,
        };
        let Some((stream, conn)) = accepting.admit(stream) else {
            continue;
        };
        let task = accepting.task.clone();
        accepting
            .tracker
            .spawn(task.run(stream, peer, conn, service.clone()));
        // Let the new connection read before accepting more: until it has, it cannot be
        // evicted, and a burst of accepts would otherwise leave the cap full of connections
        // that have not looked at their requests yet (so new ones would be refused).
        tokio::task::yield_now().await;
    }
    drop(listener);
    accepting.drain(drain).await;
    Ok(())
}

/// What one turn of the accept loop got.
enum Accepted {
    Conn(TcpStream, SocketAddr),
    /// Accepting failed (after any backoff): try again.
    Retry,
    Shutdown,
}

/// The accept loop's state: the template every connection task is cloned from, and what
/// stops them all.
struct Accepting {
    component: &'static str,
    task: ConnTask,
    closing: CancellationToken,
    tracker: TaskTracker,
    accept_errors: AcceptErrors,
}

impl Accepting {
    /// The loop's state for already validated `limits`; with TLS, also starts the
    /// certificate watcher.
    fn new(
        component: &'static str,
        limits: Limits,
        metrics: ConnMetrics,
        tls: Option<Arc<ServerTls>>,
    ) -> Accepting {
        limits::warn_if_fd_limit_low(component, &limits);
        let limits = Arc::new(limits);
        let builder = Arc::new(builder(&limits));
        let accepting = Accepting {
            component,
            task: ConnTask {
                builder,
                limits,
                metrics,
                table: Arc::new(Table::default()),
                // Cancelled when the drain time is over: drops what is still open.
                hard: CancellationToken::new(),
                tls,
            },
            // Cancelled on shutdown: every connection's close token is a child of it.
            closing: CancellationToken::new(),
            tracker: TaskTracker::new(),
            accept_errors: AcceptErrors::default(),
        };
        if let Some(tls) = &accepting.task.tls {
            accepting.tracker.spawn(tls.clone().watch(
                component,
                tls::RELOAD_INTERVAL,
                accepting.closing.clone(),
            ));
        }
        accepting
    }

    /// Waits for room under the cap, then for a connection; backs off after an accept error.
    async fn accept<F: Future<Output = ()>>(
        &mut self,
        listener: &TcpListener,
        shutdown: &mut Pin<&mut F>,
    ) -> Accepted {
        let limits = &self.task.limits;
        let table = &self.task.table;
        tokio::select! {
            () = shutdown.as_mut() => Accepted::Shutdown,
            accepted = async {
                table.room(limits.max_connections, ROOM_PATIENCE).await;
                listener.accept().await
            } => match accepted {
                Ok((stream, peer)) => {
                    self.accept_errors.reset();
                    Accepted::Conn(stream, peer)
                }
                Err(e) => {
                    self.task.metrics.accept_errors.increment(1);
                    if let Some(pause) = self.accept_errors.failed(self.component, &e) {
                        tokio::select! {
                            () = shutdown.as_mut() => return Accepted::Shutdown,
                            () = tokio::time::sleep(pause) => {}
                        }
                    }
                    Accepted::Retry
                }
            },
        }
    }

    /// Admits the connection (evicting an idle one at the cap) and hands it back with its
    /// state, or refuses it (answered and closed): `None`.
    fn admit(&self, stream: TcpStream) -> Option<(TcpStream, Arc<ConnState>)> {
        let metrics = &self.task.metrics;
        let conn = match self
            .task
            .table
            .admit(self.task.limits.max_connections, &self.closing)
        {
            Admission::Admitted { conn, evicted } => {
                if evicted.is_some() {
                    metrics.evicted_idle.increment(1);
                }
                conn
            }
            Admission::Refused => {
                metrics.refused.increment(1);
                refuse(stream);
                return None;
            }
        };
        metrics.open.increment(1.0);
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        Some((stream, conn))
    }

    /// Stops every connection: asks them to finish, then drops those still open after `drain`.
    async fn drain(self, drain: Duration) {
        self.closing.cancel();
        self.tracker.close();
        if tokio::time::timeout(drain, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                component = self.component,
                ?drain,
                open = self.task.table.len(),
                "drain time over; dropping remaining connections"
            );
            self.task.hard.cancel();
            self.tracker.wait().await;
        }
    }
}

/// Accept-queue length for [`bind`]; the kernel caps it at `net.core.somaxconn`.
pub const BACKLOG: u32 = 4096;

/// Binds a listener the way a server under load needs it: `SO_REUSEADDR` (restart without
/// waiting out old connections) and a long accept queue. `TcpListener::bind` queues only 128
/// connections; under a flood of connects the kernel drops further SYNs, and a well-behaved
/// client then waits a full second (the SYN retransmit) or more before it is even accepted.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Our own header timer replaces hyper's, which also runs while a kept-alive
        // connection waits for its next request and would cut `idle_timeout` short.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Tells a refused client to retry, without waiting on it, and closes.
fn refuse(stream: TcpStream) {
    // Best effort: a full socket buffer or a reset just means the client sees the close.
    let _ = stream.try_write(REFUSAL);
}

/// Backoff and log rate for failed accepts.
#[derive(Default)]
struct AcceptErrors {
    backoff: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    fn reset(&mut self) {
        self.backoff = Duration::ZERO;
    }

    /// Logs (at most once a second) and returns how long to pause, if at all.
    fn failed(&mut self, component: &str, e: &io::Error) -> Option<Duration> {
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            tracing::warn!(component, error = %e, failures = self.unlogged, "accept failed");
            self.last_log = Some(now);
            self.unlogged = 0;
        }
        // A client that reset before we accepted it says nothing about our state.
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionRefused
        ) {
            return None;
        }
        self.backoff = (self.backoff * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
        Some(self.backoff)
    }
}

/// Everything one connection's task needs from its listener.
#[derive(Clone)]
struct ConnTask {
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: Arc<Limits>,
    metrics: ConnMetrics,
    table: Arc<Table>,
    hard: CancellationToken,
    tls: Option<Arc<ServerTls>>,
}

impl ConnTask {
    async fn run<S, B>(self, stream: TcpStream, peer: SocketAddr, state: Arc<ConnState>, service: S)
    where
        S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let watched = Watched::new(stream, state.clone());
        match &self.tls {
            None => self.drive(watched, peer, &state, service).await,
            Some(tls) => {
                // Each handshake takes the config in use now; a reload later does not touch
                // this connection.
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                if let Some(stream) = self.handshake(acceptor.accept(watched), &state).await {
                    self.drive(stream, peer, &state, service).await;
                }
            }
        }
        self.table.remove(state.id);
        self.metrics.open.decrement(1.0);
    }

    /// The TLS handshake, bounded like the first request head (it comes before it), and
    /// abandoned on eviction or shutdown. `None` if the connection is done.
    async fn handshake<I>(
        &self,
        accept: tokio_rustls::Accept<I>,
        state: &ConnState,
    ) -> Option<tokio_rustls::server::TlsStream<I>>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let deadline = state.deadline(&self.limits, None).map(|(at, _)| at);
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = self.hard.cancelled() => None,
            () = state.close.cancelled() => {
                // Nothing was owed to this client yet.
                state.reset_on_close();
                None
            }
            res = accept => match res {
                Ok(stream) => Some(stream),
                Err(e) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    state.reset_on_close();
                    None
                }
            },
            () = sleep => {
                self.metrics.timed_out_header.increment(1);
                state.reset_on_close();
                None
            }
        }
    }

    /// Serves HTTP on an accepted (and, with TLS, handshaken) connection until it closes.
    async fn drive<I, S, B>(&self, io: I, peer: SocketAddr, state: &Arc<ConnState>, service: S)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let io = TokioIo::new(io);
        let svc = Tracked {
            inner: service,
            state: state.clone(),
            peer,
        };
        let conn = self.builder.serve_connection(io, svc);
        tokio::pin!(conn);
        let mut graceful_since: Option<Instant> = None;
        loop {
            let deadline = state.deadline(&self.limits, graceful_since);
            let sleep = async {
                match deadline {
                    Some((at, _)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Closing first: an evicted connection must not start a request first.
                biased;
                () = self.hard.cancelled() => break,
                () = state.close.cancelled(), if graceful_since.is_none() => {
                    if state.nothing_to_lose() {
                        state.reset_on_close();
                        break;
                    }
                    conn.as_mut().graceful_shutdown();
                    graceful_since = Some(Instant::now());
                }
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    break;
                }
                () = state.wake.notified() => {}
                () = sleep => match deadline.map(|(_, why)| why) {
                    Some(Reason::Idle) if graceful_since.is_none() => {
                        self.metrics.timed_out_idle.increment(1);
                        conn.as_mut().graceful_shutdown();
                        graceful_since = Some(Instant::now());
                    }
                    Some(Reason::Header) => {
                        self.metrics.timed_out_header.increment(1);
                        state.reset_on_close();
                        break;
                    }
                    Some(Reason::Write) => {
                        self.metrics.timed_out_write.increment(1);
                        state.reset_on_close();
                        break;
                    }
                    _ => break,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_from_10_to_100_ms_and_skips_client_resets() {
        let mut errors = AcceptErrors::default();
        let emfile = io::Error::from_raw_os_error(24);
        let pauses: Vec<_> = (0..6)
            .map(|_| errors.failed("test", &emfile).map(|d| d.as_millis()))
            .collect();
        assert_eq!(
            pauses,
            [Some(10), Some(20), Some(40), Some(80), Some(100), Some(100)]
        );
        let reset = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(errors.failed("test", &reset), None);
        errors.reset();
        assert_eq!(errors.failed("test", &emfile), Some(ACCEPT_BACKOFF_MIN));
    }
}
