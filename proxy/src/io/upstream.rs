//! Upstream connections: dialling (with a timeout, counted against the cluster's breaker,
//! optionally over TLS) and the keep-alive pool in `pool`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::core::breaker::{CircuitBreaker, Permit, Resource};

mod pool;

pub use self::pool::{Conn, HostConns, RawConn, Upstream, UpstreamError};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request and response bodies inside the proxy.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection limit reached")]
    Overflow,
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Io(#[from] io::Error),
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

    /// Dials `addr` over plain TCP, holding a breaker slot for the connection.
    pub async fn connect_tcp(
        &self,
        addr: SocketAddr,
    ) -> Result<(TcpStream, Option<Permit>), ConnectError> {
        let permit = match &self.breaker {
            Some(b) => Some(
                b.try_acquire(Resource::Connections)
                    .map_err(|_| ConnectError::Overflow)?,
            ),
            None => None,
        };
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout(self.connect_timeout))??;
        // Requests are small and latency-bound: never wait to coalesce.
        tcp.set_nodelay(true)?;
        Ok((tcp, permit))
    }

    /// Dials `addr`; the second value says whether TLS negotiated HTTP/2 (ALPN).
    pub async fn connect(&self, addr: SocketAddr) -> Result<(UpstreamIo, bool), ConnectError> {
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let (tcp, permit) = self.connect_tcp(addr).await?;
        let (stream, h2) = match &self.tls {
            None => (Stream::Plain(tcp), false),
            Some((tls, name)) => {
                let s = tokio::time::timeout_at(deadline, tls.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| ConnectError::Timeout(self.connect_timeout))??;
                let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                (Stream::Tls(Box::new(s)), h2)
            }
        };
        let io = UpstreamIo {
            inner: TokioIo::new(stream),
            _permit: permit,
        };
        Ok((io, h2))
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
    _permit: Option<Permit>,
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
