//! Bodies on the request path: the request body as attempts see it, and the upstream response
//! body, which holds the request's counts and its upstream connection until it is complete.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::cluster::{ActiveGuard, ActiveRequest, Cluster};
use crate::core::breaker::Permit;
use crate::io::h1::RawBody;
use crate::io::upstream::{BoxError, Conn, ProxyBody};

use super::full;

pub(super) enum ReqBody {
    Buffered(Bytes),
    Streamed(Option<Incoming>),
}

impl ReqBody {
    pub(super) fn take(&mut self) -> Option<ProxyBody> {
        match self {
            // Boxing an empty body allocates nothing: the common GET costs no allocation here.
            ReqBody::Buffered(b) if b.is_empty() => {
                Some(Empty::new().map_err(|never| match never {}).boxed_unsync())
            }
            ReqBody::Buffered(b) => Some(full(b.clone())),
            ReqBody::Streamed(s) => s
                .take()
                .map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()),
        }
    }

    /// The body, if it was read whole.
    pub(super) fn buffered(&self) -> Option<&Bytes> {
        match self {
            ReqBody::Buffered(b) => Some(b),
            ReqBody::Streamed(_) => None,
        }
    }

    pub(super) fn replayable(&self) -> bool {
        matches!(self, ReqBody::Buffered(_))
    }
}

/// Where a response body comes from: hyper's client (with the pooled connection to give
/// back), or a raw connection of the fast path's (`crate::io::h1::bridge`), which the body
/// reads itself.
pub(crate) enum Upstreamed {
    Hyper { body: Incoming, conn: Option<Conn> },
    Raw(RawBody),
}

/// The upstream response body. It holds the host's active count, the request's breaker slot
/// and a cluster active-request count until the body is done, so draining hosts are removed
/// only after their responses have been delivered; and the connection it came on, which goes
/// back to the host's pool once the body is complete (never earlier: HTTP/1 cannot start the
/// next request while this one is being read).
pub(super) struct Guarded {
    pub(super) inner: Upstreamed,
    /// The route timeout runs until the response is complete, as in Envoy: a backend that
    /// sends headers and then stalls cannot hold the stream forever.
    pub(super) deadline: Pin<Box<tokio::time::Sleep>>,
    pub(super) done: bool,
    pub(super) guard: ActiveGuard,
    pub(super) _permit: Permit,
    pub(super) active: ActiveRequest<Arc<Cluster>>,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let cluster = self.active.cluster();
        let conns = &self.guard.host().conns;
        match &mut self.inner {
            // A body dropped half-read leaves the connection mid-message: hyper closes it.
            Upstreamed::Hyper { body, conn } => {
                if let Some(conn) = conn.take() {
                    if self.done || body.is_end_stream() {
                        cluster.upstream.release(conns, conn);
                    }
                }
            }
            Upstreamed::Raw(body) => body.release(cluster, conns),
        }
    }
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Upstreamed::Hyper { body, .. } => Pin::new(body)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
            Upstreamed::Raw(body) => Pin::new(body).poll_frame(cx),
        };
        match polled {
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(
                    "route timeout while streaming the response".into(),
                ))),
                Poll::Pending => Poll::Pending,
            },
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            ready => ready,
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Upstreamed::Hyper { body, .. } => body.is_end_stream(),
            Upstreamed::Raw(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Upstreamed::Hyper { body, .. } => body.size_hint(),
            Upstreamed::Raw(body) => body.size_hint(),
        }
    }
}
