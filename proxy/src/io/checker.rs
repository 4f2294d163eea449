//! The active health checker of one host: a thin task around [`crate::core::health::HealthState`].
//! It sleeps until the state machine says the next check is due, runs one HTTP or TCP check
//! with the policy's timeout, and feeds the outcome back. It ends when the host is removed.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Empty};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Cluster;
use crate::config::{HealthCheckKind, Scheme};
use crate::core::health::CheckOutcome;
use crate::io::upstream::HostConns;

pub fn spawn(
    cluster: Arc<Cluster>,
    addr: SocketAddr,
    token: CancellationToken,
    tracker: &TaskTracker,
) {
    tracker.spawn(async move {
        // The checker's own keep-alive connection: checks neither wait for traffic's
        // connections nor count against its breaker.
        let conns = HostConns::default();
        loop {
            let Some(at) = cluster.next_check_at(addr) else {
                return;
            };
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
            }
            let outcome = tokio::select! {
                _ = token.cancelled() => return,
                o = check_once(&cluster, &conns, addr) => o,
            };
            if !cluster.record_health(addr, outcome) {
                return;
            }
        }
    });
}

async fn check_once(cluster: &Cluster, conns: &HostConns, addr: SocketAddr) -> CheckOutcome {
    let Some(policy) = cluster.health_policy() else {
        return CheckOutcome::Success;
    };
    let hc = &cluster.config.health_check;
    let check = async {
        match hc.kind {
            HealthCheckKind::None => CheckOutcome::Success,
            HealthCheckKind::Tcp => match TcpStream::connect(addr).await {
                Ok(_) => CheckOutcome::Success,
                Err(_) => CheckOutcome::NetworkFailure,
            },
            HealthCheckKind::Http => http_check(cluster, conns, addr).await,
        }
    };
    tokio::time::timeout(policy.timeout, check)
        .await
        .unwrap_or(CheckOutcome::NetworkFailure)
}

async fn http_check(cluster: &Cluster, conns: &HostConns, addr: SocketAddr) -> CheckOutcome {
    let hc = &cluster.config.health_check;
    // Host is the service name, as Envoy sends the cluster name: a backend serving several
    // services can tell which one is being checked.
    if cluster.scheme == Scheme::Http && !cluster.config.http2 {
        let request = format!(
            "GET {} HTTP/1.1\r\nhost: {}\r\nuser-agent: tidings-proxy/health-check\r\n\r\n",
            hc.path, cluster.config.service
        );
        return match crate::io::h1::health_check(&cluster.checks, conns, addr, request.as_bytes())
            .await
        {
            Some(status) if hc.expected_statuses.contains(&status) => CheckOutcome::Success,
            Some(_) => CheckOutcome::BadResponse,
            None => CheckOutcome::NetworkFailure,
        };
    }
    // HTTP/1 takes the origin form; HTTP/2 needs scheme and authority for its pseudo-headers.
    let uri = if cluster.config.http2 {
        format!("{}://{}{}", cluster.scheme, addr, hc.path)
    } else {
        hc.path.clone()
    };
    let body = Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync();
    let req = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .header(header::HOST, cluster.config.service.as_str())
        .header(header::USER_AGENT, "tidings-proxy/health-check")
        .body(body);
    let Ok(req) = req else {
        return CheckOutcome::BadResponse;
    };
    match cluster.checks.send(conns, addr, req).await {
        Ok((resp, conn)) => {
            let status = resp.status().as_u16();
            // Read the whole body so the connection can carry the next check.
            if resp.into_body().collect().await.is_ok() {
                cluster.checks.release(conns, conn);
            }
            if hc.expected_statuses.contains(&status) {
                CheckOutcome::Success
            } else {
                CheckOutcome::BadResponse
            }
        }
        Err(_) => CheckOutcome::NetworkFailure,
    }
}
