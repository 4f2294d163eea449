//! The keep-alive pool against a loopback backend served by plain threads and blocking
//! sockets, so the test decides exactly when the backend closes a connection: nothing on the
//! test's runtime runs in between.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};

use super::*;
use crate::core::breaker::{BreakerLimits, CircuitBreaker, Resource};

const HOST: &str = "backend.test";

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    requests: AtomicUsize,
    closed: AtomicUsize,
}

/// Answers every request with 200 and a 2-byte body; `close` adds `Connection: close` and
/// closes after the response.
struct Backend {
    addr: SocketAddr,
    counts: Arc<Counts>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Backend {
    fn start(close: bool) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let counts = Arc::new(Counts::default());
        let open = Arc::new(Mutex::new(Vec::new()));
        let (c, o) = (counts.clone(), open.clone());
        // Ends with the test process; each connection thread ends when its socket closes or
        // after a read timeout.
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                c.accepted.fetch_add(1, Ordering::SeqCst);
                if let Ok(s) = stream.try_clone() {
                    o.lock().expect("open").push(s);
                }
                let c = c.clone();
                thread::spawn(move || serve(stream, close, &c));
            }
        });
        Backend { addr, counts, open }
    }

    fn count(&self, f: impl Fn(&Counts) -> &AtomicUsize) -> usize {
        f(&self.counts).load(Ordering::SeqCst)
    }

    /// Closes every connection now, as a backend restart or keep-alive timeout would.
    fn close_all(&self) {
        for s in self.open.lock().expect("open").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn serve(mut s: TcpStream, close: bool, c: &Counts) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk) {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => {
                    c.closed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
        }
        buf.clear();
        c.requests.fetch_add(1, Ordering::SeqCst);
        let resp: &[u8] = if close {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        };
        if s.write_all(resp).is_err() || close {
            let _ = s.shutdown(Shutdown::Both);
            c.closed.fetch_add(1, Ordering::SeqCst);
            return;
        }
    }
}

fn upstream(breaker: Option<CircuitBreaker>, max_idle: usize, idle: Duration) -> Upstream {
    Upstream::new(
        Connector::new(Duration::from_secs(2), None, breaker),
        false,
        idle,
        max_idle,
    )
}

fn request() -> Request<ProxyBody> {
    let body = Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut req = Request::new(body);
    *req.uri_mut() = http::Uri::from_static("/");
    req.headers_mut()
        .insert(http::header::HOST, http::HeaderValue::from_static(HOST));
    req
}

/// One complete exchange; the connection is handed back to the caller.
async fn get(up: &Upstream, conns: &HostConns, addr: SocketAddr) -> Conn {
    let (resp, conn) = up.send(conns, addr, request()).await.expect("response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"ok");
    conn
}

/// Polls `cond` every 10 ms (letting connection tasks run) until it holds, for at most 5 s.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn first_idle(conns: &HostConns, f: impl Fn(&http1::SendRequest<ProxyBody>) -> bool) -> bool {
    conns.idle().first().is_some_and(|c| f(&c.tx))
}

#[tokio::test]
async fn a_kept_alive_connection_is_reused() {
    let b = Backend::start(false);
    let up = upstream(None, 8, Duration::from_secs(90));
    let conns = HostConns::default();
    for _ in 0..3 {
        let conn = get(&up, &conns, b.addr).await;
        up.release(&conns, conn);
        assert_eq!(conns.idle_count(), 1);
    }
    assert_eq!(b.count(|c| &c.requests), 3);
    assert_eq!(
        b.count(|c| &c.accepted),
        1,
        "one connection carried all three"
    );
}

#[tokio::test]
async fn a_connection_the_backend_closed_is_not_reused() {
    // Closed with `Connection: close` after the response.
    let b = Backend::start(true);
    let up = upstream(None, 8, Duration::from_secs(90));
    let conns = HostConns::default();
    let conn = get(&up, &conns, b.addr).await;
    up.release(&conns, conn);
    get(&up, &conns, b.addr).await;
    assert_eq!(b.count(|c| &c.accepted), 2);

    // Closed while idle in the pool, and the pool has seen it.
    let b = Backend::start(false);
    let conns = HostConns::default();
    let conn = get(&up, &conns, b.addr).await;
    up.release(&conns, conn);
    b.close_all();
    eventually("the pooled connection sees the close", || {
        first_idle(&conns, |tx| tx.is_closed())
    })
    .await;
    get(&up, &conns, b.addr).await;
    assert_eq!(b.count(|c| &c.accepted), 2);
    assert_eq!(b.count(|c| &c.requests), 2);
}

#[tokio::test]
async fn the_idle_stack_never_holds_more_than_its_bound() {
    let b = Backend::start(false);
    let up = upstream(None, 2, Duration::from_secs(90));
    let conns = HostConns::default();
    // Four at once: none finds an idle connection, so each dials its own.
    let (a, b2, c, d) = tokio::join!(
        get(&up, &conns, b.addr),
        get(&up, &conns, b.addr),
        get(&up, &conns, b.addr),
        get(&up, &conns, b.addr)
    );
    assert_eq!(b.count(|c| &c.accepted), 4);
    for conn in [a, b2, c, d] {
        up.release(&conns, conn);
    }
    assert_eq!(conns.idle_count(), 2);
    eventually("the two extra connections are closed", || {
        b.count(|c| &c.closed) == 2
    })
    .await;
}

/// Moves the paused clock just past `d`; real time (and the sockets) run on around it.
async fn outlast(d: Duration) {
    tokio::time::pause();
    tokio::time::advance(d + Duration::from_millis(1)).await;
    tokio::time::resume();
}

#[tokio::test]
async fn a_connection_idle_past_the_timeout_is_not_reused_and_the_sweep_closes_it() {
    let b = Backend::start(false);
    let idle = Duration::from_secs(30);
    let up = upstream(None, 8, idle);
    let conns = HostConns::default();
    let conn = get(&up, &conns, b.addr).await;
    up.release(&conns, conn);

    outlast(idle).await;
    // A request skips it (and drops it) ...
    let conn = get(&up, &conns, b.addr).await;
    up.release(&conns, conn);
    assert_eq!(b.count(|c| &c.accepted), 2);
    eventually("the expired connection is closed", || {
        b.count(|c| &c.closed) == 1
    })
    .await;

    // ... and so does the sweep, for hosts no request asks for.
    up.evict_idle(&conns);
    assert_eq!(conns.idle_count(), 1, "not yet idle for the timeout");
    outlast(idle).await;
    up.evict_idle(&conns);
    assert_eq!(conns.idle_count(), 0);
    eventually("the swept connection is closed", || {
        b.count(|c| &c.closed) == 2
    })
    .await;
}

#[tokio::test]
async fn a_request_on_a_stale_connection_that_never_left_goes_out_on_a_fresh_one() {
    let b = Backend::start(false);
    let up = upstream(None, 8, Duration::from_secs(90));
    let conns = HostConns::default();
    // A pooled connection over an in-memory pipe, so that its close is seen exactly when the
    // test says (a socket's close reaches the connection task only after the IO driver runs).
    let (client, server) = tokio::io::duplex(4096);
    let (tx, conn) = http1::handshake(hyper_util::rt::TokioIo::new(client))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    conns.idle().push(Idle {
        tx,
        since: Instant::now(),
    });
    eventually("the pooled connection is ready", || {
        first_idle(&conns, |tx| tx.is_ready())
    })
    .await;
    // The peer goes away; the connection task has not run since, so the pool still sees a
    // live, ready connection and hands the request to it. Hyper finds the close before
    // writing anything (a write would fail on the closed pipe) and gives the request back.
    drop(server);
    assert!(first_idle(&conns, |tx| !tx.is_closed() && tx.is_ready()));
    get(&up, &conns, b.addr).await;
    assert_eq!(conns.idle_count(), 0);
    assert_eq!(b.count(|c| &c.accepted), 1, "the retry dialled the backend");
    assert_eq!(b.count(|c| &c.requests), 1);
}

#[tokio::test]
async fn pooled_connections_hold_their_breaker_slot_until_closed() {
    let b = Backend::start(false);
    let breaker = CircuitBreaker::new(BreakerLimits {
        max_connections: 1,
        ..BreakerLimits::default()
    });
    let idle = Duration::from_secs(30);
    let up = upstream(Some(breaker.clone()), 8, idle);
    let conns = HostConns::default();
    let conn = get(&up, &conns, b.addr).await;
    up.release(&conns, conn);
    assert_eq!(breaker.current(Resource::Connections), 1);
    // The one slot is taken by the idle connection, which serves the next request; a second
    // connection at the same time would overflow.
    let (resp, held) = up.send(&conns, b.addr, request()).await.expect("reused");
    let err = up.send(&conns, b.addr, request()).await.err();
    assert!(err.is_some_and(|e| e.is_overflow()));
    drop((resp, held));
    eventually("the dropped connection frees its slot", || {
        breaker.current(Resource::Connections) == 0
    })
    .await;
}
