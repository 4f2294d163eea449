//! Listeners: accept, optional TLS, HTTP/1.1 or HTTP/2 (hyper-util's auto builder), with
//! header size and read-time limits, and graceful drain on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rand::RngExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Shared;
use crate::config::ListenerConfig;
use crate::forward::{self, Outcome, REQUEST_ID};
use crate::upstream::ProxyBody;

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
        .max_buf_size(cfg.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes as u32);
    let service = move |peer: SocketAddr| {
        let shared = shared.clone();
        // x-forwarded-for, formatted once per connection rather than per request.
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        service_fn(move |req| handle(shared.clone(), req, peer, peer_ip.clone()))
    };
    accept_loop(
        listener,
        builder,
        tls,
        cfg.header_read_timeout,
        service,
        shutdown,
        drain,
    )
    .await;
}

/// The accept loop shared by traffic and admin listeners.
pub async fn accept_loop<F, S>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
    first_byte_timeout: Duration,
    make_service: F,
    shutdown: CancellationToken,
    drain: Duration,
) where
    F: Fn(SocketAddr) -> S,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ProxyBody>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = make_service(peer);
        let builder = builder.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            // A client that connects and sends nothing would otherwise hold the connection
            // forever: the HTTP/2 preface sniffing has no timer of its own.
            let mut probe = [0u8; 1];
            match tokio::time::timeout(first_byte_timeout, stream.peek(&mut probe)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            match tls {
                None => {
                    serve_conn(&builder, TokioIo::new(stream), service, watcher, shutdown).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(first_byte_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => {
                            serve_conn(&builder, TokioIo::new(s), service, watcher, shutdown).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "tls handshake failed"),
                        Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(?drain, "drain timed out; closing remaining connections");
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
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ProxyBody>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = builder.serve_connection(io, service).into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

fn request_id(req: &Request<Incoming>) -> HeaderValue {
    if let Some(v) = req.headers().get(&REQUEST_ID) {
        if !v.is_empty() && v.len() <= 128 {
            return v.clone();
        }
    }
    let id: u128 = rand::rng().random();
    let mut hex = [0u8; 32];
    for (i, b) in hex.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&hex).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// One downstream request: route, forward, and log.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
    peer_ip: HeaderValue,
) -> Result<Response<ProxyBody>, Infallible> {
    let start = tokio::time::Instant::now();
    let rid = request_id(&req);
    let method = req.method().clone();
    // Both share their bytes with the request, so keeping them for the log copies nothing.
    let uri = req.uri().clone();
    let host_header = req.headers().get(header::HOST).cloned();
    let host = forward::host_of(&uri, host_header.as_ref());
    let version = req.version();
    let mut out = Outcome::default();
    let route = shared.routes.iter().find(|r| r.matches(host, uri.path()));
    let mut resp = match route {
        Some(route) => {
            // Everything logged while proxying (retries, ejections) carries the request id.
            let span = tracing::debug_span!("request", request_id = rid.to_str().unwrap_or(""));
            forward::forward(route, req, &rid, &peer_ip, &mut out)
                .instrument(span)
                .await
        }
        None => {
            out.flag = Some("no_route");
            forward::local_reply(
                StatusCode::NOT_FOUND,
                "no_route",
                "no route matches this request",
            )
        }
    };
    resp.headers_mut().insert(REQUEST_ID.clone(), rid.clone());
    let elapsed = start.elapsed();
    let status = resp.status().as_u16();
    let cluster = route.map(|r| r.cluster.name()).unwrap_or("");
    match route {
        Some(r) => r.cluster.metrics.request(status, elapsed),
        None => {
            metrics::counter!("tidings_proxy_requests_total", "cluster" => "", "code" => status.to_string()).increment(1);
        }
    }
    tracing::info!(
        target: "tidings_proxy::access",
        request_id = rid.to_str().unwrap_or(""),
        peer = %peer,
        method = %method,
        host = host.unwrap_or(""),
        path = uri.path(),
        version = ?version,
        status,
        cluster,
        upstream = out.upstream.map(|a| a.to_string()).unwrap_or_default(),
        attempts = out.attempts,
        flag = out.flag.unwrap_or(""),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    Ok(resp)
}
