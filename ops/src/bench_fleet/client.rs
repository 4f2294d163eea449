//! One fleet client: an agent's registry sync loop (`agent/src/sync.rs`) on its own keep-alive
//! connection, counting every byte the registry sends it. Delta protocol: blocking
//! `GET /v2/catalog?delta=true&index=I`, each delta applied to the held view, the whole
//! catalog again on any doubt (an error, a delta from another base, a digest mismatch, a
//! warming registry). Full protocol: blocking `GET /v2/catalog?index=I`, every answer whole.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::header;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::Fleet;
use super::view::{Answer, View};

/// A TCP stream that adds every byte it reads to a counter: the bytes on the wire, headers,
/// chunk framing and compressed bodies included.
struct Counting {
    inner: TcpStream,
    read: Arc<AtomicU64>,
}

impl AsyncRead for Counting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl AsyncWrite for Counting {
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
}

type Conn = SendRequest<Empty<Bytes>>;

/// Answers of at most this many bytes (by `Content-Length`) are read without a body permit.
const SMALL_BODY: u64 = 256 * 1024;

/// Reconnect attempts after the first failure before a client gives up.
const MAX_RECONNECTS: u32 = 20;

async fn connect(authority: &str, read: Arc<AtomicU64>) -> Result<Conn, String> {
    let tcp = TcpStream::connect(authority)
        .await
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let io = TokioIo::new(Counting { inner: tcp, read });
    let (send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        // Ends when the connection closes; a failure shows up as the next request's error.
        let _ = conn.await;
    });
    Ok(send)
}

/// What one exchange gave.
enum Reply {
    Answer(Arc<Answer>),
    /// 429: wait this long, keep the state.
    Busy(Duration),
}

/// What the client holds between answers, as `SyncState` in the agent.
struct State {
    index: Option<u64>,
    view: Option<Arc<View>>,
    /// The view's digest matched: it is a base for deltas.
    verified: bool,
    /// The lowest change not yet seen in this client's view.
    next_change: usize,
    synced: bool,
}

/// Runs client `id` against `authority` (`host:port`) until the fleet stops.
pub async fn run(fleet: Arc<Fleet>, id: usize, authority: String) {
    let mut state = State {
        index: None,
        view: None,
        verified: false,
        next_change: 0,
        synced: false,
    };
    let mut conn: Option<Conn> = None;
    let mut failures = 0u32;
    while !fleet.stop.is_cancelled() && failures <= MAX_RECONNECTS {
        let c = match conn.take() {
            Some(c) if !c.is_closed() => c,
            _ => match connect(&authority, fleet.bytes_in.clone()).await {
                Ok(c) => c,
                Err(e) => {
                    failures += 1;
                    fleet.note_error(id, &e);
                    pause(&fleet, Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let started = Instant::now();
        let asked = state.index;
        let reply = tokio::select! {
            () = fleet.stop.cancelled() => return,
            r = exchange(&fleet, c, &authority, state.index) => r,
        };
        match reply {
            Ok((c, Reply::Busy(after))) => {
                conn = Some(c);
                pause(&fleet, after).await;
            }
            Ok((c, Reply::Answer(answer))) => {
                conn = Some(c);
                failures = 0;
                fleet.answers.fetch_add(1, Ordering::Relaxed);
                take(&fleet, &mut state, &answer);
                let quick = started.elapsed() < fleet.wait / 2;
                if let Some(view) = &state.view {
                    seen(&fleet, &mut state.next_change, view);
                    if !state.synced {
                        state.synced = true;
                        fleet.synced.fetch_add(1, Ordering::Relaxed);
                    }
                    // As the agent: a registry that answers a current index at once does not
                    // block, so poll instead of spinning.
                    if asked == Some(view.index) && quick {
                        pause(&fleet, Duration::from_secs(1)).await;
                    }
                } else if matches!(&*answer, Answer::Whole { warming: true, .. }) {
                    pause(&fleet, Duration::from_millis(250)).await;
                }
            }
            Err(e) => {
                // The agent's `failed`: forget the base, back off, then a whole catalog.
                failures += 1;
                fleet.note_error(id, &e);
                state.index = None;
                state.view = None;
                pause(&fleet, Duration::from_secs(1)).await;
            }
        }
    }
}

async fn pause(fleet: &Fleet, d: Duration) {
    tokio::select! {
        () = fleet.stop.cancelled() => {}
        () = tokio::time::sleep(d) => {}
    }
}

/// Takes an answer into the state, as the agent's `SyncState::take` and `keep` do.
fn take(fleet: &Fleet, state: &mut State, answer: &Answer) {
    match answer {
        Answer::Whole {
            view,
            verified,
            warming,
        } => {
            fleet.full_syncs.fetch_add(1, Ordering::Relaxed);
            if *warming {
                // The agent merges a warming answer and asks again without an index.
                state.index = None;
                state.view = None;
                return;
            }
            state.index = Some(view.index);
            // Without a matching digest the view is served but is no base for a delta:
            // the next delta will not apply, and the client fetches whole again.
            let unverified = !verified && !fleet.full_protocol;
            fleet
                .unverified
                .fetch_add(u64::from(unverified), Ordering::Relaxed);
            state.verified = *verified;
            state.view = Some(view.clone());
        }
        Answer::Delta { changes, applied } => {
            let Some(base) = state.view.take().filter(|_| state.verified) else {
                state.index = None;
                return;
            };
            let result = if changes.from == Some(base.index) {
                applied
                    .get_or_init(|| base.apply(changes).map(Arc::new))
                    .clone()
            } else {
                base.apply(changes).map(Arc::new)
            };
            match result {
                Ok(view) => {
                    fleet.deltas.fetch_add(1, Ordering::Relaxed);
                    state.index = Some(view.index);
                    state.view = Some(view);
                }
                Err(_) => {
                    fleet.failed_deltas.fetch_add(1, Ordering::Relaxed);
                    state.index = None;
                }
            }
        }
    }
}

/// Notes every change this view shows for the first time. Changes are applied in order and
/// each touches its own endpoint, so a view shows a prefix of them: stop at the first missing.
fn seen(fleet: &Fleet, next: &mut usize, view: &View) {
    let published = fleet.published.load(Ordering::Acquire);
    while *next < published {
        let change = &fleet.changes[*next];
        if !change.shown_by(view) {
            break;
        }
        fleet.arrived(*next);
        *next += 1;
    }
}

/// One catalog query on `conn`. Returns the connection for reuse.
async fn exchange(
    fleet: &Fleet,
    mut conn: Conn,
    authority: &str,
    index: Option<u64>,
) -> Result<(Conn, Reply), String> {
    let blocking = index.map(|i| format!("index={i}&wait={}ms", fleet.wait.as_millis()));
    let path = match (fleet.full_protocol, blocking) {
        (false, Some(b)) => format!("/v2/catalog?delta=true&{b}"),
        (false, None) => "/v2/catalog?delta=true".to_string(),
        (true, Some(b)) => format!("/v2/catalog?{b}"),
        (true, None) => "/v2/catalog".to_string(),
    };
    let mut req = Request::get(path)
        .header(header::HOST, authority)
        .header(header::ACCEPT, "application/json");
    if let Some(enc) = &fleet.accept_encoding {
        req = req.header(header::ACCEPT_ENCODING, enc.as_str());
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    // The agent's bound: the wait plus the server's jitter plus a margin; a whole catalog
    // may also queue for a body permit.
    let limit = fleet.wait + fleet.wait / 16 + Duration::from_secs(120);
    let work = async {
        // A query without an index is answered whole at once: a few at a time, so the
        // registry does not hold a thousand copies of a 20 MB catalog (the first sync).
        let early = match index {
            None => Some(fleet.bodies.acquire().await.map_err(|e| e.to_string())?),
            Some(_) => None,
        };
        conn.ready().await.map_err(|e| e.to_string())?;
        let resp = conn.send_request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        if parts.status == StatusCode::TOO_MANY_REQUESTS {
            let after = parts
                .headers
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(1);
            body.collect().await.map_err(|e| e.to_string())?;
            return Ok(Reply::Busy(Duration::from_secs(after.min(10))));
        }
        let small = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n <= SMALL_BODY);
        // Whole catalogs are read a few at a time so a thousand of them do not sit in memory
        // at once; the registry meanwhile waits on a full socket, as with a slow agent.
        let _permit = match early {
            Some(p) => Some(p),
            None if small => None,
            None => Some(fleet.bodies.acquire().await.map_err(|e| e.to_string())?),
        };
        let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        if !parts.status.is_success() {
            return Err(format!("HTTP {}", parts.status));
        }
        let gzip = parts
            .headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let answer = fleet
            .answers_seen
            .get(bytes, gzip, fleet.full_protocol)
            .await?;
        Ok::<Reply, String>(Reply::Answer(answer))
    };
    let reply = tokio::time::timeout(limit, work)
        .await
        .map_err(|_| format!("no answer within {limit:?}"))??;
    Ok((conn, reply))
}
