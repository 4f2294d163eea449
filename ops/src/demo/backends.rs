//! The demo's application servers: tiny HTTP services on each host's own 127.0.0.x address.
//! Each owns its connections in a `JoinSet`, so `kill` drops every socket at once, like a
//! crashed process, rather than draining politely.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

pub struct Backend {
    pub service: String,
    pub host: usize,
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start(service: &str, host: usize, ip: std::net::IpAddr) -> Result<Backend> {
        let listener = TcpListener::bind((ip, 0))
            .await
            .with_context(|| format!("cannot bind {ip}"))?;
        let addr = listener.local_addr()?;
        let body: Arc<str> = Arc::from(format!("{service} from host-{host} ({addr})\n"));
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let body = body.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let body = body.clone();
                        async move {
                            let text = if req.uri().path() == "/healthcheck" {
                                Bytes::from_static(b"OK\n")
                            } else {
                                Bytes::from(body.to_string())
                            };
                            Ok::<_, Infallible>(Response::new(Full::new(text)))
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                // Reap finished connections so the set stays small.
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Backend {
            service: service.to_string(),
            host,
            addr,
            task,
        })
    }

    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}
