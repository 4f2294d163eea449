//! The membership watch (docs/ARCHITECTURE.md#membership-watch): blocking queries against the agent (or any
//! registry) for one service. On any error the cluster keeps its last set and the watch
//! retries with jittered exponential back-off. It asks for `draining=true`, so an agent also
//! lists hosts deregistered within the last minute, tagged `draining`; those are `Drained`
//! (finish in-flight requests, route no new ones) rather than `Absent` (where health checks
//! win). A registry ignores the parameter.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::RngExt;
use schema::api::V1Listing;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, ListedHost};
use crate::config::Scheme;

/// How long the source may hold a blocking query.
pub const WAIT: Duration = Duration::from_secs(30);
/// Listings larger than this are refused: a broken or hostile source must not exhaust memory.
const MAX_BODY: usize = 16 * 1024 * 1024;
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A source that answers at once with an unchanged index does not block; poll it gently.
const MIN_POLL: Duration = Duration::from_secs(1);

pub type WatchClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A client for `http://` and `https://` sources. `https` sources are verified against the
/// CA certificates in `ca_file` only, or the system's when it is `None` (loaded only for
/// `Scheme::Https`: a plain-HTTP watch needs no roots).
pub fn watch_client(scheme: Scheme, ca_file: Option<&Path>) -> Result<WatchClient, String> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    http.set_nodelay(true);
    http.enforce_http(false);
    let tls = match (scheme, ca_file) {
        (Scheme::Https, Some(path)) => {
            serve::tls::client_config(serve::tls::load_roots(path).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?
        }
        (Scheme::Https, None) => {
            use hyper_rustls::ConfigBuilderExt;
            rustls::ClientConfig::builder_with_provider(serve::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_native_roots()
                .map_err(|e| format!("no membership_ca_file and the system's CAs: {e}"))?
                .with_no_client_auth()
        }
        (Scheme::Http, _) => {
            serve::tls::client_config(rustls::RootCertStore::empty()).map_err(|e| e.to_string())?
        }
    };
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// One parsed answer.
#[derive(Debug)]
pub struct Answer {
    pub hosts: Vec<ListedHost>,
    pub index: Option<String>,
    pub warming: bool,
}

pub async fn watch(cluster: Arc<Cluster>, client: WatchClient, shutdown: CancellationToken) {
    let base = cluster
        .config
        .membership_url
        .trim_end_matches('/')
        .to_string();
    let service = cluster.config.service.clone();
    let mut index: Option<String> = None;
    let mut backoff = MIN_BACKOFF;
    loop {
        let url = format!(
            "{base}/v2/services/{service}?draining=true&index={}&wait={}s",
            index.as_deref().unwrap_or("0"),
            WAIT.as_secs()
        );
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(WAIT + Duration::from_secs(15), fetch(&client, &url)) => {
                r.unwrap_or_else(|_| Err("membership query timed out".to_string()))
            }
        };
        let pause = match result {
            Ok(answer) => {
                backoff = MIN_BACKOFF;
                let unchanged = answer.index.is_some() && answer.index == index;
                index = answer.index.clone();
                cluster.apply_listing(answer.hosts, answer.index, answer.warming);
                if unchanged {
                    MIN_POLL.saturating_sub(started.elapsed())
                } else {
                    Duration::ZERO
                }
            }
            Err(e) => {
                tracing::warn!(cluster = %cluster.name(), error = %e, "membership query failed; keeping the last set");
                cluster.metrics().membership_error();
                cluster.membership_error(e);
                // A new source may not know our index; start over so its first answer is immediate.
                index = None;
                let jittered = backoff.mul_f64(rand::rng().random_range(0.5..1.0));
                backoff = (backoff * 2).min(MAX_BACKOFF);
                jittered
            }
        };
        if !pause.is_zero() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

async fn fetch(client: &WatchClient, url: &str) -> Result<Answer, String> {
    let req = Request::get(url)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    // hyper's outer message ("client error (Connect)") hides the cause, a refused
    // connection or an untrusted certificate: name the innermost.
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("{url}: {e}: {}", innermost(&e)))?;
    let status = resp.status();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let index = header(schema::wire::HEADER_INDEX);
    let warming = header(schema::wire::HEADER_WARMING)
        .is_some_and(|v| v.eq_ignore_ascii_case(schema::wire::TRUE));
    if status != StatusCode::OK {
        return Err(format!("{url}: status {status}"));
    }
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("{url}: body: {e}"))?
        .to_bytes();
    let listing: V1Listing =
        serde_json::from_slice(&body).map_err(|e| format!("{url}: bad listing: {e}"))?;
    Ok(Answer {
        hosts: parse_listing(&listing),
        index,
        warming,
    })
}

fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    loop {
        if let Some(inner) = cur
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            cur = inner;
        } else if let Some(next) = cur.source() {
            cur = next;
        } else {
            return cur.to_string();
        }
    }
}

/// The hosts of a listing. Invalid entries are skipped (and logged), never fatal: one bad
/// host must not hide the good ones.
pub fn parse_listing(listing: &V1Listing) -> Vec<ListedHost> {
    listing
        .hosts
        .iter()
        .filter_map(|h| match h.to_endpoint() {
            Ok((ep, _)) => Some(ListedHost {
                addr: ep.socket_addr(),
                weight: u32::from(ep.tags.load_balancing_weight.get()),
                zone: ep.tags.zone().map(str::to_string),
                canary: ep.tags.canary,
                draining: ep.tags.extra.iter().any(|(k, v)| k.as_str() == schema::wire::tag::DRAINING && v.as_str() == schema::wire::TRUE),
            }),
            Err(e) => {
                tracing::warn!(ip = %h.ip_address, port = h.port, error = %e, "skipping invalid host in listing");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
