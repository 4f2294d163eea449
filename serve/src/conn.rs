//! What the listener knows about each open connection: whether a request is in flight, since
//! when it has been idle, when the client started its next request head, and since when its
//! writes have been stuck. The socket wrapper ([`Watched`]) and the service wrapper
//! ([`Tracked`]) keep it up to date; the connection's task turns it into deadlines.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::Limits;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a connection asked to close gracefully may stay open with nothing in flight
/// before it is dropped (an HTTP/1 client half-way through its first head ignores a graceful
/// close; HTTP/2 clients get a GOAWAY and this long to hang up).
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Timing {
    in_flight: u32,
    /// Requests completed (response body sent or dropped).
    served: u64,
    /// When the last request finished, or the connection was accepted.
    idle_since: Instant,
    /// First byte received while idle: the client is sending its next request head.
    head_started: Option<Instant>,
    /// A write has been waiting on the socket since then, with no progress.
    write_blocked_since: Option<Instant>,
    /// Chosen to be closed (eviction); no longer counts toward the cap or as a victim.
    closing: bool,
    /// The connection has tried to read at least once. Until then its request may be sitting
    /// unread in the socket: it has had no chance yet, so it is not evicted.
    polled: bool,
}

/// Why a connection's deadline closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    Header,
    Idle,
    Write,
    Grace,
}

pub(crate) struct ConnState {
    pub(crate) id: u64,
    accepted: Instant,
    timing: Mutex<Timing>,
    /// Wakes the connection's task when a deadline may have moved earlier.
    pub(crate) wake: Notify,
    /// Cancelled to ask the connection to close (eviction, or shutdown through its parent).
    pub(crate) close: CancellationToken,
    /// Close with a reset rather than a FIN: see [`ConnState::reset_on_close`].
    reset: AtomicBool,
}

impl ConnState {
    fn timing(&self) -> MutexGuard<'_, Timing> {
        // A panic while holding this lock leaves plain data behind: keep using it.
        self.timing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True if nothing is in flight and nothing was ever served, or the client is part-way
    /// through a head: closing loses nothing, so there is no point being gentle.
    pub(crate) fn nothing_to_lose(&self) -> bool {
        let t = self.timing();
        t.in_flight == 0 && (t.served == 0 || t.head_started.is_some())
    }

    /// Have the socket closed with a reset, for connections closed with nothing owed to the
    /// client (a partial or missing request head) or that stopped reading. A FIN would leave
    /// the kernel trying to deliver an unsent buffer for minutes, or keep the socket in
    /// TIME_WAIT on our side: under a flood of such connections both cost memory, and
    /// TIME_WAIT entries collide with clients reusing ports.
    pub(crate) fn reset_on_close(&self) {
        self.reset.store(true, Ordering::Relaxed);
    }

    /// The earliest deadline that applies now and why, or `None`.
    pub(crate) fn deadline(
        &self,
        limits: &Limits,
        graceful_since: Option<Instant>,
    ) -> Option<(Instant, Reason)> {
        let t = self.timing();
        let mut best: Option<(Instant, Reason)> = None;
        let mut consider = |at: Instant, why: Reason| {
            if best.is_none_or(|(b, _)| at < b) {
                best = Some((at, why));
            }
        };
        if let Some(since) = t.write_blocked_since {
            consider(since + limits.write_timeout, Reason::Write);
        }
        if t.in_flight == 0 {
            if t.served == 0 {
                // The first head must arrive within the header timeout of accept.
                consider(self.accepted + limits.header_read_timeout, Reason::Header);
            } else if let Some(started) = t.head_started {
                consider(started + limits.header_read_timeout, Reason::Header);
            } else {
                consider(t.idle_since + limits.idle_timeout, Reason::Idle);
            }
            if let Some(since) = graceful_since {
                consider(since.max(t.idle_since) + CLOSE_GRACE, Reason::Grace);
            }
        }
        best
    }

    fn on_read_attempt(&self) {
        let mut t = self.timing();
        t.polled = true;
    }

    fn on_read(&self) {
        let mut t = self.timing();
        t.polled = true;
        if t.in_flight == 0 && t.head_started.is_none() {
            t.head_started = Some(Instant::now());
            drop(t);
            self.wake.notify_one();
        }
    }

    fn on_write_progress(&self) {
        let mut t = self.timing();
        t.write_blocked_since = None;
    }

    fn on_write_blocked(&self) {
        let mut t = self.timing();
        if t.write_blocked_since.is_none() {
            t.write_blocked_since = Some(Instant::now());
            drop(t);
            self.wake.notify_one();
        }
    }

    fn begin_request(self: &Arc<Self>) -> Busy {
        let mut t = self.timing();
        t.in_flight += 1;
        t.head_started = None;
        Busy(self.clone())
    }
}

/// Held while a request is in flight: from its head being parsed until its response body is
/// sent or dropped.
pub(crate) struct Busy(Arc<ConnState>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut t = self.0.timing();
        t.in_flight = t.in_flight.saturating_sub(1);
        if t.in_flight == 0 {
            t.served += 1;
            t.idle_since = Instant::now();
            t.head_started = None;
            drop(t);
            self.0.wake.notify_one();
        }
    }
}

/// The open connections of one listener, for the cap and for choosing whom to evict.
#[derive(Default)]
pub(crate) struct Table {
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    /// Signalled whenever a connection is gone.
    removed: Notify,
}

pub(crate) enum Admission {
    /// Under the cap; or at it, with `evicted` (idle the longest) asked to close.
    Admitted {
        conn: Arc<ConnState>,
        evicted: Option<Arc<ConnState>>,
    },
    /// At the cap and nothing idle to close.
    Refused,
}

impl Table {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Arc<ConnState>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection, closing the oldest idle one if at `cap`.
    /// `close` is the parent of the new connection's close token (shutdown).
    pub(crate) fn admit(&self, cap: usize, close: &CancellationToken) -> Admission {
        let mut conns = self.conns();
        let mut live = 0usize;
        let mut victim: Option<(Instant, &Arc<ConnState>)> = None;
        for c in conns.values() {
            let t = c.timing();
            if t.closing {
                continue;
            }
            live += 1;
            let idle = t.in_flight == 0 && t.polled;
            if idle && victim.is_none_or(|(since, _)| t.idle_since < since) {
                victim = Some((t.idle_since, c));
            }
        }
        let evicted = if live < cap {
            None
        } else {
            let Some((_, v)) = victim else {
                return Admission::Refused;
            };
            let v = v.clone();
            v.timing().closing = true;
            v.close.cancel();
            Some(v)
        };
        let now = Instant::now();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(ConnState {
            id,
            accepted: now,
            timing: Mutex::new(Timing {
                in_flight: 0,
                served: 0,
                idle_since: now,
                head_started: None,
                write_blocked_since: None,
                closing: false,
                polled: false,
            }),
            wake: Notify::new(),
            close: close.child_token(),
            reset: AtomicBool::new(false),
        });
        conns.insert(id, conn.clone());
        Admission::Admitted { conn, evicted }
    }

    pub(crate) fn remove(&self, id: u64) {
        self.conns().remove(&id);
        self.removed.notify_waiters();
    }

    /// Waits, at most `patience`, until no more than `cap` sockets are open. Evicted
    /// connections close as soon as their task runs; accepting before they have would let a
    /// flood of new connections hold far more sockets than the cap (and run the process out
    /// of files). The bound keeps one slow graceful close from stalling the accept loop.
    pub(crate) async fn room(&self, cap: usize, patience: Duration) {
        let deadline = Instant::now() + patience;
        loop {
            let removed = self.removed.notified();
            tokio::pin!(removed);
            removed.as_mut().enable();
            if self.len() <= cap {
                return;
            }
            if tokio::time::timeout_at(deadline, removed).await.is_err() {
                return;
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.conns().len()
    }
}

pin_project_lite::pin_project! {
    /// The socket, reporting reads and write progress to the connection's state.
    pub(crate) struct Watched {
        #[pin]
        io: TcpStream,
        state: Arc<ConnState>,
    }

    impl PinnedDrop for Watched {
        fn drop(this: Pin<&mut Self>) {
            if this.state.reset.load(Ordering::Relaxed) {
                if let Err(e) = this.io.set_zero_linger() {
                    tracing::debug!(error = %e, "cannot set SO_LINGER to reset a stalled connection");
                }
            }
        }
    }
}

impl Watched {
    pub(crate) fn new(io: TcpStream, state: Arc<ConnState>) -> Self {
        Watched { io, state }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.io.poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.state.on_read();
        } else {
            this.state.on_read_attempt();
        }
        res
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.io.poll_write(cx, buf);
        note_write(this.state, &res);
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.io.poll_write_vectored(cx, bufs);
        note_write(this.state, &res);
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

fn note_write(state: &ConnState, res: &Poll<io::Result<usize>>) {
    match res {
        Poll::Ready(Ok(n)) if *n > 0 => state.on_write_progress(),
        Poll::Pending => state.on_write_blocked(),
        _ => {}
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its connection busy until sent or dropped.
    pub(crate) struct TrackedBody<B> {
        #[pin]
        inner: B,
        busy: Busy,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The application's tower service as a hyper service that marks its connection busy.
pub(crate) struct Tracked<S> {
    pub(crate) inner: S,
    pub(crate) state: Arc<ConnState>,
    /// Given to handlers as `axum::extract::ConnectInfo<SocketAddr>`.
    pub(crate) peer: SocketAddr,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = Response<TrackedBody<B>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let busy = self.state.begin_request();
        let svc = self.inner.clone();
        Box::pin(async move {
            let resp = svc.oneshot(req).await.map_err(Into::into)?;
            Ok(resp.map(|inner| TrackedBody { inner, busy }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(a: Admission) -> (Arc<ConnState>, Option<Arc<ConnState>>) {
        match a {
            Admission::Admitted { conn, evicted } => (conn, evicted),
            Admission::Refused => panic!("refused"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_idle_polled_connection_makes_room_and_busy_or_unread_ones_never_do() {
        let table = Table::default();
        let shutdown = CancellationToken::new();
        let (a, _) = admitted(table.admit(3, &shutdown));
        tokio::time::advance(Duration::from_secs(1)).await;
        let (b, _) = admitted(table.admit(3, &shutdown));
        tokio::time::advance(Duration::from_secs(1)).await;
        let (c, _) = admitted(table.admit(3, &shutdown));

        // At the cap, nobody has read yet: their requests may be waiting unread. Refuse.
        assert!(matches!(table.admit(3, &shutdown), Admission::Refused));

        for conn in [&a, &b, &c] {
            conn.on_read_attempt();
        }
        // A is busy: B, idle since it was accepted, is the oldest idle.
        let _busy = a.begin_request();
        let (d, evicted) = admitted(table.admit(3, &shutdown));
        let evicted = evicted.expect("someone makes room");
        assert_eq!(evicted.id, b.id);
        assert!(b.close.is_cancelled());
        assert!(!a.close.is_cancelled() && !c.close.is_cancelled());

        // B is still in the table until its task removes it, but no longer counts: C (older
        // than D, which has not read yet) goes next.
        let (_e, evicted) = admitted(table.admit(3, &shutdown));
        assert_eq!(evicted.expect("room").id, c.id);
        assert!(!d.close.is_cancelled());
        // A busy, D unread, E unread: refuse.
        assert!(matches!(table.admit(3, &shutdown), Admission::Refused));
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_connection_state() {
        let limits = Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            ..Limits::default()
        };
        let table = Table::default();
        let (conn, _) = admitted(table.admit(8, &CancellationToken::new()));
        let t0 = Instant::now();
        // First request: its head is due within the header timeout of accept.
        assert_eq!(
            conn.deadline(&limits, None),
            Some((t0 + limits.header_read_timeout, Reason::Header))
        );
        let busy = conn.begin_request();
        assert_eq!(
            conn.deadline(&limits, None),
            None,
            "a request in flight has no deadline"
        );
        conn.on_write_blocked();
        assert_eq!(
            conn.deadline(&limits, None),
            Some((t0 + limits.write_timeout, Reason::Write))
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        conn.on_write_progress();
        drop(busy);
        let t1 = Instant::now();
        // Kept alive: idle until the next head starts, then the header timeout again.
        assert_eq!(
            conn.deadline(&limits, None),
            Some((t1 + limits.idle_timeout, Reason::Idle))
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        conn.on_read();
        assert_eq!(
            conn.deadline(&limits, None),
            Some((
                t1 + Duration::from_secs(20) + limits.header_read_timeout,
                Reason::Header
            ))
        );
    }
}
