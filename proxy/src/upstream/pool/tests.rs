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
use crate::breaker::{BreakerLimits, CircuitBreaker, Resource};

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

/// One complete exchange: the body is read, which puts the connection back in the pool.
async fn get(up: &Upstream, conns: &Arc<HostConns>, addr: SocketAddr) {
    let resp = up.send(conns, addr, request()).await.expect("response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"ok");
}

/// Polls `cond` every 10 ms (letting connection tasks run) until it holds, for at most 5 s.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_kept_alive_connection_is_reused() {
    let b = Backend::start(false);
    let up = upstream(None, 8, Duration::from_secs(90));
    let conns = Arc::new(HostConns::default());
    for _ in 0..3 {
        get(&up, &conns, b.addr).await;
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
async fn a_response_dropped_before_its_body_is_read_does_not_return_its_connection() {
    let b = Backend::start(false);
    let up = upstream(None, 8, Duration::from_secs(90));
    let conns = Arc::new(HostConns::default());
    let resp = up.send(&conns, b.addr, request()).await.expect("response");
    drop(resp);
    assert_eq!(conns.idle_count(), 0);
    get(&up, &conns, b.addr).await;
    assert_eq!(b.count(|c| &c.accepted), 2);
}

#[tokio::test]
async fn a_connection_the_backend_closed_is_not_reused() {
    // Closed with `Connection: close` after the response.
    let b = Backend::start(true);
    let up = upstream(None, 8, Duration::from_secs(90));
    let conns = Arc::new(HostConns::default());
    get(&up, &conns, b.addr).await;
    get(&up, &conns, b.addr).await;
    assert_eq!(b.count(|c| &c.accepted), 2);
    assert_eq!(b.count(|c| &c.requests), 2);
}

#[tokio::test]
async fn a_request_on_a_connection_closed_while_idle_goes_out_on_a_fresh_one() {
    let b = Backend::start(false);
    let up = upstream(None, 8, Duration::from_secs(90));
    let conns = Arc::new(HostConns::default());
    get(&up, &conns, b.addr).await;
    assert_eq!(conns.idle_count(), 1);
    // The backend closes it (as at its keep-alive timeout, or a restart). The close is in the
    // socket when `close_all` returns; one turn of the runtime lets its IO driver record it,
    // as it would have long since for a connection that sat idle.
    b.close_all();
    tokio::task::yield_now().await;
    get(&up, &conns, b.addr).await;
    assert_eq!(b.count(|c| &c.accepted), 2);
    assert_eq!(
        b.count(|c| &c.requests),
        2,
        "the closed connection never saw it"
    );
    assert_eq!(conns.idle_count(), 1);
}

#[tokio::test]
async fn the_idle_stack_never_holds_more_than_its_bound() {
    let b = Backend::start(false);
    let up = upstream(None, 2, Duration::from_secs(90));
    let conns = Arc::new(HostConns::default());
    // Four at once: none finds an idle connection, so each dials its own.
    tokio::join!(
        get(&up, &conns, b.addr),
        get(&up, &conns, b.addr),
        get(&up, &conns, b.addr),
        get(&up, &conns, b.addr)
    );
    assert_eq!(b.count(|c| &c.accepted), 4);
    assert_eq!(conns.idle_count(), 2);
    eventually("the two extra connections are closed", || {
        b.count(|c| &c.closed) == 2
    })
    .await;
}

#[tokio::test]
async fn a_connection_idle_past_the_timeout_is_not_reused_and_the_sweep_closes_it() {
    let b = Backend::start(false);
    let idle = Duration::from_secs(30);
    let up = upstream(None, 8, idle);
    let conns = Arc::new(HostConns::default());
    get(&up, &conns, b.addr).await;

    tokio::time::pause();
    tokio::time::advance(idle + Duration::from_millis(1)).await;
    tokio::time::resume();
    // A request skips it (and drops it) ...
    get(&up, &conns, b.addr).await;
    assert_eq!(b.count(|c| &c.accepted), 2);
    eventually("the expired connection is closed", || {
        b.count(|c| &c.closed) == 1
    })
    .await;

    // ... and so does the sweep, for hosts no request asks for.
    up.evict_idle(&conns);
    assert_eq!(conns.idle_count(), 1, "not yet idle for the timeout");
    tokio::time::pause();
    tokio::time::advance(idle + Duration::from_millis(1)).await;
    tokio::time::resume();
    up.evict_idle(&conns);
    assert_eq!(conns.idle_count(), 0);
    eventually("the swept connection is closed", || {
        b.count(|c| &c.closed) == 2
    })
    .await;
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
    let conns = Arc::new(HostConns::default());
    get(&up, &conns, b.addr).await;
    assert_eq!(breaker.current(Resource::Connections), 1);
    // The one slot is taken by the idle connection, which serves the next request; a second
    // connection at the same time would overflow.
    let held = up.send(&conns, b.addr, request()).await.expect("reused");
    let err = up.send(&conns, b.addr, request()).await.err();
    assert!(err.is_some_and(|e| e.is_overflow()));
    // Dropped mid-response: the connection closes and frees its slot.
    drop(held);
    assert_eq!(breaker.current(Resource::Connections), 0);
}
