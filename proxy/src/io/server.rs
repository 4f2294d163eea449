//! Listeners: accept, optional TLS, HTTP/1.1 or HTTP/2 (hyper-util's auto builder), with
//! header size and read-time limits, and graceful drain on shutdown.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Shared;
use crate::cluster::ClusterMetrics;
use crate::config::ListenerConfig;
use crate::core::policy::LocalAnswer;
use crate::io::forward::{self, Outcome, REQUEST_ID, Route};
use crate::io::h1;
use crate::io::upstream::ProxyBody;

/// Serves one listener until `shutdown`, then stops accepting and gives open connections
/// `drain` to finish their requests.
pub async fn serve(
    listener: TcpListener,
    cfg: ListenerConfig,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes)
        // Head and body in one buffer, one write: responses here are mostly small, and a
        // vectored write of two slices costs more to queue than the copy.
        .writev(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes as u32);
    let fast = Arc::new(h1::FastPath {
        shared: shared.clone(),
        header_read_timeout: cfg.header_read_timeout,
        max_header_bytes: cfg.max_header_bytes,
    });
    let service = move |peer: SocketAddr| {
        let shared = shared.clone();
        // x-forwarded-for, formatted once per connection rather than per request.
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        let ids = RequestIds::new();
        service_fn(move |req| {
            let rid = ids.for_request(&req);
            // Boxed: hyper's HTTP/2 server spawns a task per stream around this future and
            // copies it twice on the way (2 KB of forwarding state, 6 % of the instructions of
            // a request measured with callgrind); a box is one small allocation instead.
            Box::pin(handle(shared.clone(), req, peer, peer_ip.clone(), rid))
        })
    };
    accept_loop(
        listener,
        builder,
        tls,
        fast,
        cfg.header_read_timeout,
        service,
        shutdown,
        drain,
    )
    .await;
}

/// A hyper service answering with the proxy's bodies, that a connection task can own.
trait ProxyService:
    hyper::service::Service<
        Request<Incoming>,
        Response = Response<ProxyBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + Send
    + 'static
{
}

impl<S> ProxyService for S where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ProxyBody>,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + 'static
{
}

/// The traffic listener's accept loop (the admin listener runs on the `serve` crate).
/// Connections (plain, or TLS without HTTP/2 negotiated) start on the HTTP/1.1 fast path
/// (`fast`) and move to hyper when they need it.
#[allow(clippy::too_many_arguments)]
async fn accept_loop<F, S>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
    fast: Arc<h1::FastPath>,
    first_byte_timeout: Duration,
    make_service: F,
    shutdown: CancellationToken,
    drain: Duration,
) where
    F: Fn(SocketAddr) -> S,
    S: ProxyService,
{
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(builder);
    while let Some((stream, peer)) = accept(&listener, &shutdown).await {
        let conn = Accepted {
            peer,
            builder: builder.clone(),
            fast: fast.clone(),
            service: make_service(peer),
            watcher: graceful.watcher(),
            shutdown: shutdown.clone(),
        };
        tokio::spawn(conn.serve(stream, tls.clone(), first_byte_timeout));
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(?drain, "drain timed out; closing remaining connections");
    }
}

/// The next connection (with Nagle off), or `None` once `shutdown` is cancelled.
pub(crate) async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// One accepted connection, with what serving it needs.
struct Accepted<S> {
    peer: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    fast: Arc<h1::FastPath>,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
    shutdown: CancellationToken,
}

impl<S> Accepted<S>
where
    S: ProxyService,
{
    /// Waits for the first byte and the TLS handshake, then serves the connection: HTTP/2
    /// (ALPN) on hyper, anything else on the fast path first.
    async fn serve(
        self,
        stream: TcpStream,
        tls: Option<TlsAcceptor>,
        first_byte_timeout: Duration,
    ) {
        // A client that connects and sends nothing would otherwise hold the connection
        // forever: the HTTP/2 preface sniffing has no timer of its own.
        let mut probe = [0u8; 1];
        match tokio::time::timeout(first_byte_timeout, stream.peek(&mut probe)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
        let Some(acceptor) = tls else {
            return self.fast_then_hyper(stream).await;
        };
        let peer = self.peer;
        match tokio::time::timeout(first_byte_timeout, acceptor.accept(stream)).await {
            Ok(Ok(s)) if s.get_ref().1.alpn_protocol() == Some(b"h2") => self.hyper(s).await,
            Ok(Ok(s)) => self.fast_then_hyper(s).await,
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "tls handshake failed"),
            Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
        }
    }

    /// The fast path, then hyper from the request the fast path hands over, if any.
    async fn fast_then_hyper<I>(self, mut io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        if let h1::Ended::HandOver(read) =
            h1::serve(&mut io, self.peer, &self.fast, &self.shutdown).await
        {
            self.hyper(h1::Prefixed::new(read, io)).await
        }
    }

    async fn hyper<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        serve_conn(&self.builder, io, self.service, self.watcher, self.shutdown).await
    }
}

async fn serve_conn<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: TokioIo<I>,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
    _shutdown: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: ProxyService,
{
    let conn = builder.serve_connection(io, service).into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Request ids for one connection. Ids need to be unique, not unpredictable: a small
/// generator per connection, seeded from the thread's, costs a few instructions per id where
/// the thread's cryptographic generator costs hundreds.
pub(crate) struct RequestIds(RefCell<SmallRng>);

impl RequestIds {
    pub(crate) fn new() -> Self {
        RequestIds(RefCell::new(SmallRng::from_rng(&mut rand::rng())))
    }

    /// A new random 128-bit id in hex.
    pub(crate) fn hex(&self) -> [u8; 32] {
        let id: u128 = self.0.borrow_mut().random();
        let mut hex = [0u8; 32];
        for (i, b) in hex.iter_mut().enumerate() {
            *b = b"0123456789abcdef"[((id >> (124 - 4 * i)) & 0xf) as usize];
        }
        hex
    }

    /// The request's own id when it has a usable one, else a new random 128-bit hex id.
    fn for_request(&self, req: &Request<Incoming>) -> HeaderValue {
        if let Some(v) = req.headers().get(&REQUEST_ID) {
            if !v.is_empty() && v.len() <= 128 {
                return v.clone();
            }
        }
        HeaderValue::from_bytes(&self.hex()).unwrap_or_else(|_| HeaderValue::from_static("0"))
    }
}

/// The first route that matches; the Host header is parsed only if some route looks at it.
fn route_for<'a>(routes: &'a [Route], req: &Request<Incoming>) -> Option<&'a Route> {
    matching_route(
        routes,
        || forward::host_of(req.uri(), req.headers().get(header::HOST)),
        req.uri().path(),
    )
}

/// The first route that matches `path` and the host `host` gives, which is asked for only if
/// some route looks at the host.
pub(crate) fn matching_route<'a, 'h>(
    routes: &'a [Route],
    host: impl FnOnce() -> Option<&'h str>,
    path: &str,
) -> Option<&'a Route> {
    let mut host = Some(host);
    let mut parsed = None;
    routes.iter().find(|r| {
        let h = match r.host {
            None => None,
            Some(_) => *parsed.get_or_insert_with(|| host.take().and_then(|f| f())),
        };
        r.matches(h, path)
    })
}

/// What the access log records about the request line, kept only while the log is on.
struct RequestLine {
    method: Method,
    // Both share their bytes with the request, so keeping them copies nothing.
    uri: Uri,
    host_header: Option<HeaderValue>,
    version: Version,
}

/// The request counters of requests no route took (`cluster=""`), registered once.
static UNROUTED: LazyLock<ClusterMetrics> = LazyLock::new(|| ClusterMetrics::new(Arc::from("")));

pub(crate) const ACCESS_LOG: &str = "tidings_proxy::access";

/// One line of the access log.
pub(crate) struct AccessEntry<'a> {
    pub request_id: &'a str,
    pub peer: SocketAddr,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub version: Version,
    pub status: u16,
    pub cluster: &'a str,
    pub outcome: &'a Outcome,
    pub elapsed: Duration,
}

pub(crate) fn access_log(e: &AccessEntry<'_>) {
    tracing::info!(
        target: ACCESS_LOG,
        request_id = e.request_id,
        peer = %e.peer,
        method = e.method,
        host = e.host,
        path = e.path,
        version = ?e.version,
        status = e.status,
        cluster = e.cluster,
        upstream = e.outcome.upstream.map(|a| a.to_string()).unwrap_or_default(),
        attempts = e.outcome.attempts,
        flag = e.outcome.flag.unwrap_or(""),
        duration_ms = e.elapsed.as_secs_f64() * 1000.0,
        "request"
    );
}

/// One downstream request: route, forward, and log.
async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
    peer_ip: HeaderValue,
    rid: HeaderValue,
) -> Result<Response<ProxyBody>, Infallible> {
    let start = tokio::time::Instant::now();
    let line = tracing::enabled!(target: ACCESS_LOG, tracing::Level::INFO).then(|| RequestLine {
        method: req.method().clone(),
        uri: req.uri().clone(),
        host_header: req.headers().get(header::HOST).cloned(),
        version: req.version(),
    });
    let mut out = Outcome::default();
    let route = route_for(&shared.routes, &req);
    let mut resp = match route {
        Some(route) => {
            // Everything logged while proxying (retries, ejections) carries the request id.
            let span = tracing::debug_span!("request", request_id = rid.to_str().unwrap_or(""));
            forward::forward(route, req, &rid, &peer_ip, &mut out)
                .instrument(span)
                .await
        }
        None => {
            out.flag = LocalAnswer::NoRoute.flag();
            forward::answer(LocalAnswer::NoRoute)
        }
    };
    let elapsed = start.elapsed();
    let status = resp.status().as_u16();
    let cluster = route.map(|r| r.cluster.name()).unwrap_or("");
    match route {
        Some(r) => r.cluster.metrics().request(status, elapsed),
        // Counted under `cluster=""`, without a duration.
        None => UNROUTED.count(status),
    }
    if let Some(line) = line {
        access_log(&AccessEntry {
            request_id: rid.to_str().unwrap_or(""),
            peer,
            method: line.method.as_str(),
            host: forward::host_of(&line.uri, line.host_header.as_ref()).unwrap_or(""),
            path: line.uri.path(),
            version: line.version,
            status,
            cluster,
            outcome: &out,
            elapsed,
        });
    }
    let mut rid = rid;
    // Unique to this response: in an HTTP/2 header table it would only push out the fields
    // that do repeat, so HPACK is told never to index it.
    rid.set_sensitive(true);
    resp.headers_mut().insert(REQUEST_ID.clone(), rid);
    Ok(resp)
}
