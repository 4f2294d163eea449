//! A backend for the proxy to route to: a small HTTP/1 server on a tokio runtime the test
//! owns, answering `/healthcheck` (and anything else) with 200 and its name, and `/slow`
//! after [`SLOW`] so a request can be in flight when the proxy is told to stop.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// How long a `/slow` request takes at a backend: long enough to be in flight at SIGTERM.
pub const SLOW: Duration = Duration::from_millis(2500);

/// A one-thread runtime for a test's backends.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    /// `/slow` requests that reached this backend.
    pub slow_started: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Backend {
    /// Binds `ip:port` (0: any free port) and serves until [`Backend::kill`]. Call it on the
    /// runtime that should run the backend.
    pub async fn start_on(ip: &str, port: u16, name: &str) -> Result<Backend> {
        let listener = TcpListener::bind((ip, port)).await?;
        let addr = listener.local_addr()?;
        let slow_started = Arc::new(AtomicU64::new(0));
        let (body, slow) = (Bytes::from(name.to_string()), slow_started.clone());
        let task = tokio::spawn(async move {
            // Connections live in this set, so aborting the task closes every one of them
            // along with the listener: the backend is gone, as if its process died.
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (body, slow) = (body.clone(), slow.clone());
                let service = service_fn(move |req: Request<Incoming>| {
                    let (body, slow) = (body.clone(), slow.clone());
                    async move {
                        if req.uri().path() == "/slow" {
                            slow.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(SLOW).await;
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(body)))
                    }
                });
                conns.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Backend {
            name: name.to_string(),
            addr,
            slow_started,
            task,
        })
    }

    /// [`Backend::start_on`] a free port.
    pub async fn start(ip: &str, name: &str) -> Result<Backend> {
        Backend::start_on(ip, 0, name).await
    }

    /// Closes the listener and every open connection, and waits until they are closed.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// One `web` backend on port 8080 of each host `1..=hosts` (`ip(h)`, answering `host-<h>`),
/// and the set of their `ip:8080` addresses.
pub fn start_web(
    rt: &tokio::runtime::Runtime,
    hosts: u8,
    ip: impl Fn(u8) -> String,
) -> Result<(Vec<Backend>, std::collections::BTreeSet<String>)> {
    let mut backends = Vec::new();
    for h in 1..=hosts {
        backends.push(rt.block_on(Backend::start_on(&ip(h), 8080, &format!("host-{h}")))?);
    }
    let all = (1..=hosts).map(|h| format!("{}:8080", ip(h))).collect();
    Ok((backends, all))
}
