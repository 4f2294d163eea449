//! The local API's two guards against other local software.
//!
//! - **DNS rebinding**: a web page on an attacker's site can make its own name resolve to
//!   127.0.0.1 and then script requests to the agent as if same-origin. Such a request still
//!   names the attacker's site in its `Host` header, so only requests whose `Host` is
//!   `localhost` or an IP address literal are served (a literal is never resolved through
//!   DNS, so it cannot be rebound; this keeps the dashboard working through a port-forward
//!   or a reverse proxy on the host's address); no `Host` at all (HTTP/1.0, raw clients) is
//!   allowed; `api_host_names` adds names. The port is not compared: the name is what a rebinding attack cannot forge,
//!   and a tunnel legitimately changes the port.
//! - **Foreign registrations**: every endpoint registered through the API is gossiped as
//!   this agent's own row, so a local process could otherwise inject endpoints on any
//!   address into every agent's view. Registrations are accepted only on this host's own
//!   addresses — `host_ip`, the gossip address, `host_ips` and the configured endpoints'
//!   addresses (the agent does not enumerate interfaces: what the operator configured is the
//!   truth) — unless the request bears the operator token.

use std::collections::BTreeSet;
use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use discovery::ApiError;
use sha2::{Digest, Sha256};

use crate::state::Shared;

/// Whether a `Host` header value names this API (`localhost`, an address, or one of
/// `extra`) rather than some site's DNS name.
pub fn host_allowed(host: &str, extra: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`
        match rest.split_once(']') {
            Some((v6, tail)) if tail.is_empty() || tail.starts_with(':') => v6,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let is = |n: &str| name.eq_ignore_ascii_case(n.strip_suffix('.').unwrap_or(n));
    if is("localhost") || extra.iter().any(|n| is(n)) {
        return true;
    }
    name.parse::<IpAddr>().is_ok()
}

/// Refuses (403) a request whose `Host` names another site; see the module docs.
pub async fn check_host(
    State(shared): State<std::sync::Arc<Shared>>,
    req: Request,
    next: Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("\u{0}"))
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    match host {
        Some(h) if !host_allowed(h, &shared.config.api_host_names) => {
            shared.metrics.api_refused_host.increment(1);
            let shown: String = h.chars().take(100).collect();
            ApiError::Forbidden(format!(
                "the Host header {shown:?} does not name this agent's local API (use localhost or {}): refused as a possible DNS-rebinding attack",
                shared.config.api
            ))
            .into_response()
        }
        _ => next.run(req).await,
    }
}

/// The addresses local processes may register endpoints on without the operator token.
pub fn own_ips(shared: &Shared) -> BTreeSet<IpAddr> {
    let mut ips: BTreeSet<IpAddr> = [shared.host_ip, shared.gossip_addr.ip()].into();
    ips.extend(shared.config.host_ips.iter().copied());
    ips.extend(shared.local().configured.iter().map(|e| e.ip));
    ips
}

/// Whether the request bears the configured operator token (`Authorization: Bearer …`).
fn bears_operator_token(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(want) = shared.config.operator_token.as_deref() else {
        return false;
    };
    let Some(got) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Comparing digests keeps the comparison's timing independent of the token's bytes.
    Sha256::digest(got.trim().as_bytes()) == Sha256::digest(want.as_bytes())
}

/// Allows a registration on `ip` if it is this host's or the operator token is present.
pub fn check_registration(
    shared: &Shared,
    ip: IpAddr,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let own = own_ips(shared);
    if own.contains(&ip) || bears_operator_token(shared, headers) {
        return Ok(());
    }
    shared.metrics.api_refused_ip.increment(1);
    let own: Vec<String> = own.iter().map(ToString::to_string).collect();
    Err(ApiError::Forbidden(format!(
        "{ip} is not an address of this host ({}): endpoints on other addresses need the operator token (Authorization: Bearer …)",
        own.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_naming_this_api_pass_and_others_do_not() {
        for ok in [
            "127.0.0.1:7701",
            "localhost:7701",
            "LOCALHOST",
            "localhost.:7701",
            "[::1]:7701",
            "[::1]",
            "127.0.0.5:7701",
            "127.0.0.5",
            "localhost:8080",
            "10.0.0.1:7701",
        ] {
            assert!(host_allowed(ok, &[]), "{ok} refused");
        }
        for bad in [
            "evil.example:7701",
            "evil.example",
            "localhost.evil.example:7701",
            "[::1",
            "[::1]x",
            "::1",
            "localhost:port",
            "",
        ] {
            assert!(!host_allowed(bad, &[]), "{bad} allowed");
        }
        let extra = ["Agent.Internal.".to_string()];
        assert!(host_allowed("agent.internal:7701", &extra));
        assert!(host_allowed("AGENT.internal.", &extra));
        assert!(!host_allowed("evil.example", &extra));
    }
}
