//! The HTTP/1.1 fast path (plain TCP, or TLS without HTTP/2 negotiated): one task per client
//! connection parses each request head with `httparse`, forwards it over a pooled upstream TCP
//! connection of its own, and passes the response through, headers copied as bytes.
//!
//! Why not hyper for this hop: the proxy's cost per request was a third above HAProxy's, and
//! the profile put it in hyper's machinery on both hops, not in the proxy's own work: two
//! tasks and three channels per request (client dispatch, response, body), a header map built
//! and re-encoded per message on each side, an 8 KB read buffer allocated per request. Here a
//! request costs no task switch, no channel and no allocation in the common case.
//!
//! The fast path takes only what it handles completely: HTTP/1.1 requests with a Host header,
//! an origin-form target, no body or a `Content-Length` body of at most 64 KB, routed to a
//! plain HTTP/1 cluster. Anything else — HTTP/2 (ALPN or prior knowledge), HTTP/1.0, upgrades,
//! `Expect`, chunked or large request bodies, malformed or oversized heads, requests no route
//! takes — hands the connection to hyper at a request boundary, the bytes read so far
//! replayed ([`Prefixed`]), and it stays there. Malformed requests therefore get hyper's
//! answers, as before. HTTP/2 requests that hyper's server takes still go upstream on this
//! path's raw connections when they can (`bridge`).

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::config::Scheme;
use crate::io::forward::{self, Route};
use crate::io::server::{self, RequestIds};

mod bridge;
mod chunked;
mod exchange;
mod head;
mod prefixed;
mod probe;

pub(crate) use self::bridge::{Forwarded, RawBody, RawTransport};
use self::head::{Field, RequestHead};
pub use self::prefixed::Prefixed;
pub use self::probe::health_check;

/// What a listener's fast path needs.
pub struct FastPath {
    pub shared: Arc<Shared>,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

/// How a connection left the fast path.
pub enum Ended {
    Closed,
    /// Continue with hyper; these bytes were read from the client and not yet answered.
    HandOver(Vec<u8>),
}

/// What waiting for the next request gave.
enum Next {
    Head(RequestHead),
    Closed,
    Slow,
}

/// Read buffers start here and are shrunk back to it after a larger message.
const BUF: usize = 8 * 1024;

/// One client connection on the fast path (plain TCP or TLS), with the buffers its requests
/// reuse.
struct Conn<'a, IO> {
    io: &'a mut IO,
    fast: &'a FastPath,
    peer: SocketAddr,
    peer_ip: Vec<u8>,
    /// Bytes from the client not yet answered.
    buf: Vec<u8>,
    fields: Vec<Field>,
    /// The upstream request (kept for retries), then the response head for the client.
    msg: Vec<u8>,
    /// Bytes from the upstream.
    up: Vec<u8>,
    up_fields: Vec<Field>,
    request_id: Vec<u8>,
    ids: RequestIds,
    /// Armed when the connection waits for a request head (slowloris, idle keep-alive).
    head_timer: Pin<Box<Sleep>>,
    /// The route timeout of the request in progress, response body included.
    route_timer: Pin<Box<Sleep>>,
    deadline: Instant,
}

/// Serves `io` until the client closes, a request needs hyper, or `shutdown`.
pub async fn serve<IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut IO,
    peer: SocketAddr,
    fast: &FastPath,
    shutdown: &CancellationToken,
) -> Ended {
    let now = Instant::now();
    let mut conn = Conn {
        io,
        fast,
        peer,
        peer_ip: peer.ip().to_string().into_bytes(),
        buf: Vec::with_capacity(BUF),
        fields: Vec::with_capacity(16),
        msg: Vec::new(),
        up: Vec::new(),
        up_fields: Vec::with_capacity(16),
        request_id: Vec::with_capacity(32),
        ids: RequestIds::new(),
        // Timers are created once per connection and moved later for each request, which
        // tokio does without touching its timer wheel.
        head_timer: Box::pin(tokio::time::sleep_until(now + fast.header_read_timeout)),
        route_timer: Box::pin(tokio::time::sleep_until(now)),
        deadline: now,
    };
    let mut cancelled = std::pin::pin!(shutdown.cancelled());
    loop {
        let head = match conn.next_head(cancelled.as_mut()).await {
            Next::Head(h) => h,
            Next::Closed => return Ended::Closed,
            Next::Slow => return Ended::HandOver(conn.buf),
        };
        let Some(route) = conn.route(&head) else {
            return Ended::HandOver(conn.buf);
        };
        let close = head.close || shutdown.is_cancelled();
        if !conn.exchange(&head, route, close).await || close {
            return Ended::Closed;
        }
        let used = head.len + head.content_length as usize;
        conn.buf.drain(..used.min(conn.buf.len()));
        if conn.buf.capacity() > 8 * BUF && conn.buf.len() < BUF {
            conn.buf.shrink_to(BUF);
        }
    }
}

impl<'a, IO: AsyncRead + AsyncWrite + Unpin> Conn<'a, IO> {
    /// Waits for the next complete request head. The header timer runs from the moment the
    /// connection starts waiting: it bounds both a slow head and an idle keep-alive gap.
    async fn next_head(
        &mut self,
        mut cancelled: Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
    ) -> Next {
        let mut armed = false;
        loop {
            if !self.buf.is_empty() {
                match head::parse_request(&self.buf, &mut self.fields) {
                    Ok(Some(h)) => return Next::Head(h),
                    Ok(None) if self.buf.len() < self.fast.max_header_bytes => {}
                    Ok(None) | Err(_) => return Next::Slow,
                }
            }
            self.buf.reserve(4096);
            let idle = self.buf.is_empty();
            let timeout = self.fast.header_read_timeout;
            let Conn {
                io,
                buf,
                head_timer,
                ..
            } = self;
            let read = poll_fn(|cx| {
                if let Poll::Ready(r) = tokio_util::io::poll_read_buf(Pin::new(&mut **io), cx, buf)
                {
                    return Poll::Ready(Some(r));
                }
                // Only now, about to wait, is the timer worth its clock read.
                if !armed {
                    head_timer.as_mut().reset(Instant::now() + timeout);
                    armed = true;
                }
                if head_timer.as_mut().poll(cx).is_ready()
                    || (idle && cancelled.as_mut().poll(cx).is_ready())
                {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await;
            match read {
                Some(Ok(n)) if n > 0 => {}
                // Closed, reset, timed out mid-head or idle, or shutting down while idle.
                _ => return Next::Closed,
            }
        }
    }

    /// The request's route, if the fast path can serve it: a plain-text HTTP/1 cluster.
    fn route(&self, head: &RequestHead) -> Option<&'a Route> {
        let fast: &'a FastPath = self.fast;
        let buf = &self.buf;
        let host = || {
            std::str::from_utf8(&buf[head.host.clone()])
                .ok()
                .and_then(forward::host_header_name)
        };
        let route = server::matching_route(&fast.shared.routes, host, head.path(buf)?)?;
        let cluster = &route.cluster;
        (cluster.scheme == Scheme::Http && !cluster.config.http2).then_some(route)
    }
}
