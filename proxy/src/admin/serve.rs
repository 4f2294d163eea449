//! The admin listener's accept loop: every connection is entered in a [`ConnTable`], which
//! decides when it has waited too long (for a request head, or between requests) and which
//! connection makes room at the cap; this module only reports what the connection does and
//! closes what the table says to close.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::conns::{Admit, Closed, ConnTable, Limits};
use crate::Shared;
use crate::cluster::now;
use crate::upstream::ProxyBody;

type Table = Arc<Mutex<ConnTable<CancellationToken>>>;

/// How long in-flight admin requests get to finish once the listener stops.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

fn lock(t: &Mutex<ConnTable<CancellationToken>>) -> MutexGuard<'_, ConnTable<CancellationToken>> {
    // The table stays consistent across a panic elsewhere: every change is one call.
    t.lock().unwrap_or_else(|e| e.into_inner())
}

fn count_closed(reason: &'static str) {
    metrics::counter!("tidings_proxy_admin_connections_closed_total", "reason" => reason)
        .increment(1);
}

fn publish_open(n: usize) {
    metrics::gauge!("tidings_proxy_admin_connections").set(n as f64);
}

/// Serves the admin endpoints on `listener` until `stop`.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let cfg = &shared.config.admin;
    let table: Table = Arc::new(Mutex::new(ConnTable::new(Limits {
        header_read_timeout: cfg.header_read_timeout,
        idle_timeout: cfg.idle_timeout,
        max_connections: cfg.max_connections,
    })));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The table's timers replace hyper's, whose header timer also runs between requests and
    // would cut the idle timeout short.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let token = CancellationToken::new();
        let (admitted, open) = {
            let mut t = lock(&table);
            (t.admit(token.clone(), now()), t.len())
        };
        publish_open(open);
        let id = match admitted {
            Admit::Accepted { id, evicted } => {
                if let Some(old) = evicted {
                    old.cancel();
                    count_closed(Closed::Evicted.as_str());
                }
                id
            }
            Admit::Refused => {
                count_closed("refused");
                continue;
            }
        };
        tokio::spawn(connection(
            stream,
            id,
            token,
            table.clone(),
            builder.clone(),
            shared.clone(),
            graceful.watcher(),
        ));
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
    // Whatever is left (a client that never finishes its head) is closed now.
    let mut t = lock(&table);
    while let Some(token) = t.remove_any() {
        token.cancel();
    }
}

/// One admin connection, served until it ends, its timer runs out or the table evicts it.
async fn connection(
    stream: TcpStream,
    id: u64,
    token: CancellationToken,
    table: Table,
    builder: Arc<auto::Builder<TokioExecutor>>,
    shared: Arc<Shared>,
    watcher: Watcher,
) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(Tracked {
        inner: stream,
        table: table.clone(),
        id,
    });
    let t = table.clone();
    let service = service_fn(move |req| {
        let busy = Busy::start(t.clone(), id);
        let shared = shared.clone();
        async move {
            let resp = super::handle(shared, req).await?;
            // The connection counts as busy until the response body has been sent.
            let body = |b: ProxyBody| {
                b.map_frame(move |f| {
                    let _busy = &busy;
                    f
                })
                .boxed_unsync()
            };
            Ok::<_, Infallible>(resp.map(body))
        }
    });
    let conn = watcher.watch(builder.serve_connection(io, service).into_owned());
    let closed = tokio::select! {
        r = conn => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
            None
        }
        reason = watchdog(&table, id) => Some(reason),
        () = token.cancelled() => None,
    };
    let open = {
        let mut t = lock(&table);
        t.remove(id);
        t.len()
    };
    publish_open(open);
    if let Some(reason) = closed {
        tracing::debug!(reason = reason.as_str(), "admin connection closed");
        count_closed(reason.as_str());
    }
}

/// Resolves when the table says the connection's timer has run out.
async fn watchdog(table: &Mutex<ConnTable<CancellationToken>>, id: u64) -> Closed {
    loop {
        let now = now();
        let (expired, deadline, limits) = {
            let t = lock(table);
            (t.expired(id, now), t.deadline(id), t.limits())
        };
        if let Some(reason) = expired {
            return reason;
        }
        // While a request is answered no timer runs; look again later, since the idle timer
        // starts when the answer has gone.
        let recheck = limits.header_read_timeout.min(limits.idle_timeout);
        let wake = deadline.unwrap_or(now + recheck);
        tokio::time::sleep_until(wake.into()).await;
    }
}

/// Marks the connection busy from a request's head until its response is dropped.
struct Busy {
    table: Table,
    id: u64,
}

impl Busy {
    fn start(table: Table, id: u64) -> Self {
        lock(&table).request_started(id, now());
        Busy { table, id }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        lock(&self.table).request_finished(self.id, now());
    }
}

/// The client stream, reporting to the table when bytes arrive (a request head starting).
struct Tracked {
    inner: TcpStream,
    table: Table,
    id: u64,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            lock(&self.table).bytes_read(self.id, now());
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
