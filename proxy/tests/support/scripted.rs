//! A backend speaking HTTP/1.1 by hand, answering in every framing (and some wrong ones) by
//! path, for the tests of the proxy's raw upstream connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const BIG: usize = 1 << 20;

pub fn big_body() -> Vec<u8> {
    (0..BIG).map(|i| (i % 251) as u8).collect()
}

/// Connections a scripted backend accepted, and those it has closed.
#[derive(Clone, Default)]
pub struct Counts {
    pub accepted: Arc<AtomicU64>,
    pub closed: Arc<AtomicU64>,
}

/// A backend speaking HTTP/1.1 by hand, so that it can answer in every framing, including
/// wrong ones. Counts the connections it accepted and closed.
pub async fn scripted_backend() -> (SocketAddr, Counts) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let counts = Counts::default();
    let c = counts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.accepted.fetch_add(1, Ordering::SeqCst);
            let closed = c.closed.clone();
            tokio::spawn(async move {
                // The stream is dropped, so closed, when this returns.
                serve_scripted(stream).await;
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

async fn serve_scripted(mut s: TcpStream) {
    let mut buf = Vec::new();
    // Bounded: a test connection carries a few hundred requests at most.
    for _ in 0..10_000 {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let length = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        // A chunked upload is consumed up to its last chunk (the tests send no trailers),
        // undecoded: left in the buffer it would read as the next request's head, and its
        // echo would answer whatever request the proxy sends next on this pooled connection
        // (a CI run saw `GET /old` answered with "3\r\nabc\r\n0\r\n\r\n").
        let chunked = head.lines().any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.eq_ignore_ascii_case("transfer-encoding")
                    && v.trim().eq_ignore_ascii_case("chunked")
            })
        });
        let length = if chunked {
            loop {
                if let Some(i) = buf[head_end..].windows(5).position(|w| w == b"0\r\n\r\n") {
                    break i + 5;
                }
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        } else {
            length
        };
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_end..head_end + length].to_vec();
        buf.drain(..head_end + length);
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let reply: Vec<u8> = match path.as_str() {
            "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nx-trailer: t\r\n\r\n".to_vec(),
            "/until-close" => {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nstreamed until close").await;
                return;
            }
            "/head" => b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n".to_vec(),
            "/204" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            "/early" => b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            "/big" => {
                let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n").into_bytes();
                r.extend_from_slice(&big_body());
                r
            }
            "/close-after" => {
                // Claims keep-alive, then closes: the proxy's pooled connection goes stale.
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
                return;
            }
            // More than the length said, in the same write: bytes of no request's, which
            // must reach nobody (the connection cannot be reused).
            "/overlong" => b"HTTP/1.1 200 OK\r\nX-Custom: kept as sent\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale".to_vec(),
            // Fields of one hop only, the first time with a Connection that names another.
            "/hop-named" => b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nX-Kept: k\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            "/hop" => b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Kept: k\r\nTrailer: x-t\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            "/cut" => {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc").await;
                return;
            }
            _ => {
                let mut echo = head.into_bytes();
                echo.extend_from_slice(&body);
                let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", echo.len()).into_bytes();
                r.extend_from_slice(&echo);
                r
            }
        };
        if s.write_all(&reply).await.is_err() {
            return;
        }
    }
}
