//! `tidings checkin`: the cron one-shot. One check-in, a stable per-host splay, brief retries
//! on transient failures, and an exit code cron (and a human) can act on.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use discovery::{ClientError, RegistryClient};
use schema::api::EndpointSpec;
use schema::{Endpoint, ServiceName};
use serde_json::{Map, Value};

use crate::EXIT_USAGE;
use crate::cli::CheckinArgs;

const EXIT_REFUSED: u8 = 1;
const EXIT_UNAVAILABLE: u8 = 2;

pub async fn main(args: CheckinArgs) -> ExitCode {
    match run(args).await {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err((code, msg)) => {
            eprintln!("tidings checkin: {msg}");
            ExitCode::from(code)
        }
    }
}

async fn run(args: CheckinArgs) -> Result<String, (u8, String)> {
    let usage = |m: String| (EXIT_USAGE, m);
    let ip = match args.ip {
        Some(ip) => ip,
        None => local_ip_towards(&args.registry).map_err(usage)?,
    };
    let endpoint = build_endpoint(&args, ip).map_err(usage)?;
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| usage(format!("cannot read token file {}: {e}", path.display())))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let client =
        RegistryClient::with_ca(&args.registry, token, args.timeout, args.ca_file.as_deref())
            .map_err(|e| usage(e.to_string()))?;

    if !args.no_splay {
        // The agent's splay over name and address: the same host waits the same time every
        // minute, and a fleet spreads evenly across the window.
        let identity = format!("{}{ip}", hostname());
        tokio::time::sleep(agent::checkin::splay(&identity, args.splay)).await;
    }
    // Three tries within a few seconds: long enough to ride out a registry restart or a
    // dropped connection, short enough to finish well before the next cron minute.
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(300))
        .with_max_delay(Duration::from_secs(3))
        .with_max_times(3)
        .with_jitter();
    let attempt = || async { client.check_in(std::slice::from_ref(&endpoint)).await };
    match attempt.retry(backoff).when(ClientError::is_transient).await {
        Ok(resp) => Ok(format!(
            "checked in {} at {} (ttl {}s)",
            endpoint.service,
            endpoint.socket_addr(),
            resp.ttl_secs
        )),
        Err(e) if e.is_transient() => Err((EXIT_UNAVAILABLE, format!("registry unavailable: {e}"))),
        // An untrusted certificate, a name mismatch or a scheme mismatch fails the same way
        // every minute: like a refusal, it needs a fix (--ca-file, the URL, the certificate).
        Err(e @ ClientError::Tls { .. }) => Err((
            EXIT_REFUSED,
            format!(
                "cannot verify the registry: {e} (is --ca-file the CA that signed its certificate, and the URL's host a name in it?)"
            ),
        )),
        Err(e) => Err((EXIT_REFUSED, format!("registry refused the check-in: {e}"))),
    }
}

fn build_endpoint(args: &CheckinArgs, ip: IpAddr) -> Result<Endpoint, String> {
    let service = ServiceName::new(args.service.clone()).map_err(|e| e.to_string())?;
    let tags: Map<String, Value> = args
        .tags
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let spec = EndpointSpec {
        service: None,
        ip: Some(ip.to_string()),
        port: Value::from(args.port),
        revision: Some(args.revision.clone()),
        service_repo_name: None,
        tags: Value::Object(tags),
    };
    spec.into_endpoint(Some(&service), None)
        .map_err(|e| e.to_string())
}

/// The local address the kernel would route from towards the registry. `connect` on a UDP
/// socket only picks a route; no packet is sent.
fn local_ip_towards(registry: &str) -> Result<IpAddr, String> {
    let authority = registry
        .split("://")
        .nth(1)
        .unwrap_or(registry)
        .split('/')
        .next()
        .unwrap_or_default();
    let with_port = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let target: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&with_port)
        .map_err(|e| format!("cannot resolve registry {authority:?}: {e}; pass --ip"))?
        .next()
        .ok_or_else(|| format!("registry {authority:?} resolves to nothing; pass --ip"))?;
    let bind: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = UdpSocket::bind(bind)
        .map_err(|e| format!("cannot find the local address: {e}; pass --ip"))?;
    sock.connect(target)
        .map_err(|e| format!("no route to the registry: {e}; pass --ip"))?;
    sock.local_addr()
        .map(|a| a.ip())
        .map_err(|e| format!("cannot find the local address: {e}; pass --ip"))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_ip_is_found_without_traffic() {
        let ip = local_ip_towards("http://127.0.0.1:7700").expect("loopback route");
        assert!(ip.is_loopback());
        assert!(
            local_ip_towards("http://[::1]:7700")
                .map(|ip| ip.is_loopback())
                .unwrap_or(true)
        );
    }
}
