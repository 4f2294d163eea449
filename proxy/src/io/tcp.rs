//! TCP listeners (docs/ARCHITECTURE.md#tcp-listeners): every accepted connection goes to the
//! listener's cluster and bytes are copied both ways until both sides have closed.
//!
//! The connection is made by the same attempt loop as an HTTP request (`attempts`): the
//! cluster's balancer picks, outlier detection hears every connect failure, a refused connect
//! fails over at once to a host not tried yet and a failed one is retried under the retry
//! policy, and the breaker's `max_connections` bounds the upstream connections (each holds its
//! slot until closed). Half-closes pass through: a client that shuts its sending side down
//! still reads the upstream's reply to the end.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Method;
use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::{ActiveGuard, Cluster, HostHandle};
use crate::core::lb::LbPolicy;
use crate::core::policy::{LocalAnswer, Sent};
use crate::io::attempts::{Attempts, Transport};
use crate::io::forward::Outcome;
use crate::io::server::{ACCESS_LOG, accept};
use crate::io::upstream::{ConnectError, RawConn};

/// Copy buffer per direction: HAProxy's default `tune.bufsize`. Larger buffers gain little
/// over loopback and cost memory per connection.
const BUFFER: usize = 16 * 1024;

/// A connection attempt sends nothing before it connects, so the retry policy may repeat it
/// as it would an idempotent request.
const CONNECT_ATTEMPT: Method = Method::GET;

/// Serves one TCP listener until `shutdown`, then stops accepting and gives open connections
/// `drain` to finish before closing them.
pub(crate) async fn serve(
    listener: TcpListener,
    cluster: Arc<Cluster>,
    idle_timeout: Duration,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let sessions = TaskTracker::new();
    let cut = CancellationToken::new();
    while let Some((stream, peer)) = accept(&listener, &shutdown).await {
        sessions.spawn(session(
            cluster.clone(),
            stream,
            peer,
            idle_timeout,
            cut.clone(),
        ));
    }
    drop(listener);
    sessions.close();
    if tokio::time::timeout(drain, sessions.wait()).await.is_err() {
        tracing::warn!(
            ?drain,
            open = sessions.len(),
            "drain timed out; closing remaining TCP connections"
        );
        cut.cancel();
        sessions.wait().await;
    }
}

/// How a proxied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Both sides closed.
    Closed,
    /// One side reset or failed.
    Error,
    /// No byte either way for the idle timeout.
    Idle,
    /// The drain timeout ran out at shutdown.
    Drained,
    /// No upstream connection could be made.
    Refused,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Error => "error",
            End::Idle => "idle_timeout",
            End::Drained => "drained",
            End::Refused => "refused",
        }
    }
}

/// One downstream connection: connect upstream, relay, log.
async fn session(
    cluster: Arc<Cluster>,
    mut client: TcpStream,
    peer: SocketAddr,
    idle_timeout: Duration,
    cut: CancellationToken,
) {
    let start = Instant::now();
    let metrics = cluster.metrics();
    metrics.tcp_connection();
    // Counted as a request in flight: the gauges and the retry budget see TCP sessions too.
    let _active = Cluster::start_request(&*cluster);
    let mut out = Outcome::default();
    let (end, bytes) = match connect(&cluster, peer, &mut out).await {
        Ok((mut upstream, _host)) => {
            relay(
                &mut client,
                &mut upstream.stream,
                idle_timeout,
                &cluster,
                &cut,
            )
            .await
        }
        Err(answer) => {
            tracing::debug!(%peer, cluster = %cluster.name(), answer = answer.code(), "no upstream connection");
            (End::Refused, (0, 0))
        }
    };
    if end == End::Idle {
        metrics.tcp_idle_timeout();
    }
    tracing::info!(
        target: ACCESS_LOG,
        peer = %peer,
        cluster = cluster.name(),
        upstream = out.upstream.map(|a| a.to_string()).unwrap_or_default(),
        attempts = out.attempts,
        flag = out.flag.unwrap_or(""),
        end = end.as_str(),
        received = bytes.0,
        sent = bytes.1,
        duration_ms = start.elapsed().as_secs_f64() * 1000.0,
        "tcp connection"
    );
}

/// The upstream connection, made within `connect_timeout × (1 + num_retries)`.
async fn connect(
    cluster: &Cluster,
    peer: SocketAddr,
    out: &mut Outcome,
) -> Result<(RawConn, ActiveGuard), LocalAnswer> {
    let tries = cluster.retry_policy.num_retries.saturating_add(1);
    let attempts = Attempts {
        cluster,
        method: &CONNECT_ATTEMPT,
        hash: client_hash(cluster, peer),
        replayable: true,
        deadline: Instant::now() + cluster.config.connect_timeout.saturating_mul(tries),
    };
    attempts.run(&mut Dial { cluster }, out).await
}

/// Hash balancers keep a client on one host by its address (Envoy's `tcp_proxy` hashes the
/// source IP the same way).
fn client_hash(cluster: &Cluster, peer: SocketAddr) -> Option<u64> {
    match cluster.config.lb_policy {
        LbPolicy::RingHash | LbPolicy::Maglev => Some(xxhash_rust::xxh64::xxh64(
            peer.ip().to_string().as_bytes(),
            0,
        )),
        _ => None,
    }
}

/// A TCP listener's attempt: dial the host.
struct Dial<'a> {
    cluster: &'a Cluster,
}

impl Transport for Dial<'_> {
    type Request = ();
    type Response = RawConn;
    type Error = ConnectError;

    fn prepare(&mut self, _: &HostHandle) -> Result<(), LocalAnswer> {
        Ok(())
    }

    async fn send(&mut self, host: &HostHandle, (): ()) -> Sent<RawConn, ConnectError> {
        match self.cluster.upstream.connect_raw(host.addr).await {
            Ok(conn) => Sent::Connected(conn),
            Err(error) => Sent::Connect {
                overflow: matches!(error, ConnectError::Overflow),
                error,
            },
        }
    }
}

/// Copies both ways until both sides have closed, the idle timeout or `cut`; returns how it
/// ended and the bytes (received from the client, sent to it).
async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle_timeout: Duration,
    cluster: &Cluster,
    cut: &CancellationToken,
) -> (End, (u64, u64)) {
    let activity = Activity::new();
    let (received, sent) = cluster.metrics().tcp_bytes();
    let mut down = Metered::new(client, received, &activity);
    let mut up = Metered::new(upstream, sent, &activity);
    let end = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, BUFFER, BUFFER) => {
            if r.is_ok() { End::Closed } else { End::Error }
        }
        () = activity.idle_for(idle_timeout) => End::Idle,
        () = cut.cancelled() => End::Drained,
    };
    (end, (down.bytes, up.bytes))
}

/// When a byte last moved either way, for the idle timeout: milliseconds since `epoch`, so
/// both directions update it without a lock.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Returns once no byte has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            tokio::time::sleep_until(self.last() + idle).await;
            if self.last() + idle <= Instant::now() {
                return;
            }
        }
    }
}

/// One side of a relay: counts the bytes read from it and notes the activity.
struct Metered<'a> {
    io: &'a mut TcpStream,
    counter: Counter,
    bytes: u64,
    activity: &'a Activity,
}

impl<'a> Metered<'a> {
    fn new(io: &'a mut TcpStream, counter: Counter, activity: &'a Activity) -> Self {
        Metered {
            io,
            counter,
            bytes: 0,
            activity,
        }
    }
}

impl AsyncRead for Metered<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut *this.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.bytes += n;
            this.counter.increment(n);
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Metered<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
