//! A tiny server for the crate's process-level tests: serves `GET /live` with the listener's
//! limits, prints `listening <addr>` on stdout, and stops when stdin closes.
//!
//! Usage: `serve-probe MAX_CONNECTIONS`

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let max: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        Some(Ok(n)) => n,
        _ => {
            eprintln!("usage: serve-probe MAX_CONNECTIONS");
            std::process::exit(2);
        }
    };
    let listener = serve::bind(([127, 0, 0, 1], 0).into())?;
    println!("listening {}", listener.local_addr()?);
    let app = tower::service_fn(|_req: Request<Incoming>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"live\n"))))
    });
    let options = serve::Options {
        component: "probe",
        limits: serve::Limits::with_max_connections(max),
        metrics: serve::ConnMetrics::default(),
        drain: Duration::from_secs(1),
        tls: None,
    };
    let stdin_closed = async {
        let mut buf = [0u8; 64];
        let mut stdin = tokio::io::stdin();
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    serve::http(listener, app, options, stdin_closed).await
}
