//! Upstream connections: a connector for hyper-util's pooled legacy client that dials with a
//! timeout, counts connections against the cluster's breaker and optionally speaks TLS.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::breaker::{CircuitBreaker, Permit, Resource};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request and response bodies inside the proxy.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;
pub type UpstreamClient = Client<Connector, ProxyBody>;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection limit reached")]
    Overflow,
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Io(#[from] io::Error),
    #[error("upstream uri has no ip address and port: {0}")]
    BadUri(String),
}

#[derive(Clone)]
pub struct Connector {
    connect_timeout: Duration,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Connections count against the breaker only for traffic, not for health checks.
    breaker: Option<CircuitBreaker>,
}

impl Connector {
    pub fn new(
        connect_timeout: Duration,
        tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
        breaker: Option<CircuitBreaker>,
    ) -> Self {
        let tls = tls.map(|(cfg, name)| (TlsConnector::from(cfg), name));
        Connector {
            connect_timeout,
            tls,
            breaker,
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// A pooled client over `connector`; `http2` speaks HTTP/2 only (prior knowledge or ALPN).
pub fn client(connector: Connector, http2: bool) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .http2_only(http2)
        .build(connector)
}

fn addr_of(uri: &Uri) -> Result<SocketAddr, ConnectError> {
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let ip = host
        .parse()
        .map_err(|_| ConnectError::BadUri(uri.to_string()))?;
    let port = uri
        .port_u16()
        .ok_or_else(|| ConnectError::BadUri(uri.to_string()))?;
    Ok(SocketAddr::new(ip, port))
}

impl tower::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr = addr_of(&uri)?;
            let permit = match &this.breaker {
                Some(b) => Some(
                    b.try_acquire(Resource::Connections)
                        .map_err(|_| ConnectError::Overflow)?,
                ),
                None => None,
            };
            let timeout = this.connect_timeout;
            let dial = async {
                let tcp = TcpStream::connect(addr).await?;
                // Requests are small and latency-bound: never wait to coalesce.
                tcp.set_nodelay(true)?;
                match &this.tls {
                    None => Ok::<_, io::Error>((Stream::Plain(tcp), false)),
                    Some((tls, name)) => {
                        let s = tls.connect(name.clone(), tcp).await?;
                        let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                        Ok((Stream::Tls(Box::new(s)), h2))
                    }
                }
            };
            let (stream, h2) = tokio::time::timeout(timeout, dial)
                .await
                .map_err(|_| ConnectError::Timeout(timeout))??;
            Ok(UpstreamIo {
                inner: TokioIo::new(stream),
                h2,
                _permit: permit,
            })
        })
    }
}

pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One upstream connection; holds its breaker slot for as long as it is open.
pub struct UpstreamIo {
    inner: TokioIo<Stream>,
    h2: bool,
    _permit: Option<Permit>,
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        if self.h2 {
            Connected::new().negotiated_h2()
        } else {
            Connected::new()
        }
    }
}

impl Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
