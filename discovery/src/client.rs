//! `RegistryClient`: the registry's HTTP/1.1 client (plain or TLS), for the agent and
//! `tidings checkin`. Errors say in one line what went wrong — could not connect, TLS failed,
//! the registry refused (with its JSON message), or the answer was unreadable — and whether
//! retrying may help.

use std::net::IpAddr;
use std::num::NonZeroU16;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::{ClientConfig, RootCertStore};
use schema::api::{
    Catalog, CatalogChanges, CheckInRequest, CheckInResponse, ErrorBody, ServicesResponse,
    V1Listing,
};
use schema::{Endpoint, ServiceName, Weight};
use serde::de::DeserializeOwned;
use thiserror::Error;

use schema::wire::{HEADER_INDEX, HEADER_STALE, HEADER_WARMING};

/// Largest answer the client reads (a catalog of tens of thousands of endpoints).
const MAX_RESPONSE: usize = 64 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("invalid registry url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot connect to the registry at {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The TLS handshake failed: an untrusted or mismatched certificate, or TLS spoken to a
    /// plain-HTTP server (or the reverse). Configuration, not luck: retrying will not help.
    #[error("TLS with the registry at {url} failed: {reason}")]
    Tls { url: String, reason: String },
    #[error("cannot load the CA file: {0}")]
    CaFile(String),
    #[error("the registry did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection to the registry failed: {0}")]
    Transport(String),
    #[error("the registry answered {status}: {message}")]
    Status {
        status: u16,
        code: String,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("cannot read the registry's answer: {0}")]
    Decode(String),
    #[error("cannot encode the request: {0}")]
    Encode(String),
}

impl ClientError {
    /// Whether the same request may succeed later: connection failures, timeouts, 429 and
    /// 5xx. A 4xx (bad input, auth) will fail again.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Timeout(_) | ClientError::Transport(_) => {
                true
            }
            ClientError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// The HTTP status, when the registry answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Metadata of a read, from the answer's headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadMeta {
    /// `X-Tidings-Index`: pass it back as `index` to block until it changes.
    pub index: Option<u64>,
    /// `X-Tidings-Stale`: self-preservation is on or the registry's store failed.
    pub stale: bool,
    /// `X-Tidings-Warming`: the registry restarted empty; don't replace a view with this.
    pub warming: bool,
}

impl ReadMeta {
    fn from_headers(h: &HeaderMap) -> Self {
        let flag = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        };
        let index = h
            .get(HEADER_INDEX)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        ReadMeta {
            index,
            stale: flag(HEADER_STALE),
            warming: flag(HEADER_WARMING),
        }
    }
}

/// A client for one registry base URL (`http://host:port` or `https://host:port`). Cheap to
/// clone; connections are pooled and kept alive.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    token: Option<HeaderValue>,
    timeout: Duration,
}

impl RegistryClient {
    /// `base_url` is `http[s]://host[:port][/prefix]`; `token` is sent as `Authorization:
    /// Bearer` on writes; `timeout` bounds each request (blocking reads get their wait on top).
    /// An `https://` registry is verified against the system's roots: see [`Self::with_ca`].
    pub fn new(
        base_url: &str,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        Self::with_ca(base_url, token, timeout, None)
    }

    /// As [`Self::new`], verifying an `https://` registry against the CA certificates in
    /// `ca_file` (PEM) only, when given. The server name checked is the URL's host. Unused
    /// for `http://`.
    pub fn with_ca(
        base_url: &str,
        token: Option<String>,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let invalid = |reason: &str| ClientError::InvalidUrl {
            url: base_url.to_string(),
            reason: reason.to_string(),
        };
        let uri: Uri = base_url.parse().map_err(|_| invalid("not a URL"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(invalid("must start with http:// or https://")),
        };
        if uri.authority().is_none() {
            return Err(invalid("missing host"));
        }
        if uri.query().is_some() {
            return Err(invalid("must not have a query"));
        }
        let token = match token {
            Some(t) => Some(
                HeaderValue::from_str(&format!("Bearer {}", t.trim())).map_err(|_| {
                    ClientError::InvalidUrl {
                        url: base_url.to_string(),
                        reason: "the token has characters a header cannot carry".into(),
                    }
                })?,
            ),
            None => None,
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        connector.enforce_http(false);
        let tls = client_tls(https, ca_file)?;
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let http = Client::builder(TokioExecutor::new()).build(connector);
        Ok(RegistryClient {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            token,
            timeout,
        })
    }

    /// `POST /v2/checkin` with every endpoint in one request.
    pub async fn check_in(&self, endpoints: &[Endpoint]) -> Result<CheckInResponse, ClientError> {
        self.check_in_with_key(endpoints, None).await
    }

    /// [`check_in`](Self::check_in), asking the registry to certify `gossip_key` (an
    /// agent's gossip owner key, base64). Only sent when set: registries older than the
    /// field refuse unknown fields.
    pub async fn check_in_with_key(
        &self,
        endpoints: &[Endpoint],
        gossip_key: Option<&str>,
    ) -> Result<CheckInResponse, ClientError> {
        let mut req = CheckInRequest::from_endpoints(endpoints);
        req.gossip_key = gossip_key.map(str::to_string);
        let body = serde_json::to_vec(&req).map_err(|e| ClientError::Encode(e.to_string()))?;
        let (_, bytes) = self
            .send(
                Method::POST,
                "/v2/checkin",
                Some((body, "application/json")),
                self.timeout,
            )
            .await?;
        decode(&bytes)
    }

    /// `GET /v1/registration/{service}`.
    pub async fn service(&self, service: &ServiceName) -> Result<V1Listing, ClientError> {
        let path = format!("/v1/registration/{service}");
        let (_, bytes) = self.send(Method::GET, &path, None, self.timeout).await?;
        decode(&bytes)
    }

    /// `GET /v2/services/{service}?index=&wait=`: blocks while `index` is current.
    pub async fn service_blocking(
        &self,
        service: &ServiceName,
        index: Option<u64>,
        wait: Option<Duration>,
    ) -> Result<(V1Listing, ReadMeta), ClientError> {
        let path = format!("/v2/services/{service}{}", blocking_query(index, wait));
        let (headers, bytes) = self
            .send(Method::GET, &path, None, self.blocking_timeout(index, wait))
            .await?;
        Ok((decode(&bytes)?, ReadMeta::from_headers(&headers)))
    }

    /// `GET /v2/catalog?index=&wait=`: every service; blocks while `index` is current.
    pub async fn catalog(
        &self,
        index: Option<u64>,
        wait: Option<Duration>,
    ) -> Result<(Catalog, ReadMeta), ClientError> {
        let path = format!("/v2/catalog{}", blocking_query(index, wait));
        let (headers, bytes) = self
            .send(Method::GET, &path, None, self.blocking_timeout(index, wait))
            .await?;
        Ok((decode(&bytes)?, ReadMeta::from_headers(&headers)))
    }

    /// `GET /v2/catalog?delta=true&index=&wait=`: the changes since `index` when the registry
    /// still holds that view, else the whole catalog (`full`); blocks while `index` is
    /// current. Apply it with [`crate::delta::Replica`]. With `signed`, also the registry's
    /// signatures of the listings (`signatures`), from a registry with a signing key.
    pub async fn catalog_changes(
        &self,
        index: Option<u64>,
        wait: Option<Duration>,
        signed: bool,
    ) -> Result<(CatalogChanges, ReadMeta), ClientError> {
        self.catalog_changes_as(index, wait, signed).await
    }

    /// [`RegistryClient::catalog_changes`] decoded into the caller's own form of the answer
    /// (the agent parses a whole catalog straight into what it keeps, one service at a
    /// time, rather than into a `CatalogChanges` of the whole catalog first).
    pub async fn catalog_changes_as<T: DeserializeOwned>(
        &self,
        index: Option<u64>,
        wait: Option<Duration>,
        signed: bool,
    ) -> Result<(T, ReadMeta), ClientError> {
        let query = blocking_query(index, wait);
        let sep = if query.is_empty() { '?' } else { '&' };
        let signed = if signed { "&signed=true" } else { "" };
        let path = format!("/v2/catalog{query}{sep}delta=true{signed}");
        let (headers, bytes) = self
            .send(Method::GET, &path, None, self.blocking_timeout(index, wait))
            .await?;
        Ok((decode(&bytes)?, ReadMeta::from_headers(&headers)))
    }

    /// `GET /v2/services`.
    pub async fn services(&self) -> Result<ServicesResponse, ClientError> {
        let (_, bytes) = self
            .send(Method::GET, "/v2/services", None, self.timeout)
            .await?;
        decode(&bytes)
    }

    /// `DELETE /v1/registration/{service}/{ip}[?port=]`. Unknown endpoints are a 404 error.
    pub async fn deregister(
        &self,
        service: &ServiceName,
        ip: IpAddr,
        port: Option<NonZeroU16>,
    ) -> Result<(), ClientError> {
        let port = port.map(|p| format!("?port={p}")).unwrap_or_default();
        let path = format!("/v1/registration/{service}/{ip}{port}");
        self.send(Method::DELETE, &path, None, self.timeout)
            .await
            .map(|_| ())
    }

    /// `POST /v1/loadbalancing/{service}[/{ip}]`.
    pub async fn set_weight(
        &self,
        service: &ServiceName,
        ip: Option<IpAddr>,
        weight: Weight,
    ) -> Result<(), ClientError> {
        let path = match ip {
            Some(ip) => format!("/v1/loadbalancing/{service}/{ip}"),
            None => format!("/v1/loadbalancing/{service}"),
        };
        let body = format!("load_balancing_weight={}", weight.get()).into_bytes();
        self.send(
            Method::POST,
            &path,
            Some((body, "application/x-www-form-urlencoded")),
            self.timeout,
        )
        .await
        .map(|_| ())
    }

    /// A blocking read may be held for `wait` (plus the server's 1/16 jitter) before the
    /// answer even starts.
    fn blocking_timeout(&self, index: Option<u64>, wait: Option<Duration>) -> Duration {
        match (index, wait) {
            (Some(_), Some(w)) => self.timeout + w + w / 16,
            // No wait given: the server's default is its max_wait (5 min by default).
            (Some(_), None) => self.timeout + Duration::from_secs(5 * 60 + 20),
            _ => self.timeout,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &'static str)>,
        timeout: Duration,
    ) -> Result<(HeaderMap, Bytes), ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(&url)
            .header(header::ACCEPT, "application/json");
        if method != Method::GET {
            if let Some(t) = &self.token {
                req = req.header(header::AUTHORIZATION, t.clone());
            }
        }
        let payload = match body {
            Some((bytes, ct)) => {
                req = req.header(header::CONTENT_TYPE, ct);
                Bytes::from(bytes)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|e| ClientError::InvalidUrl {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let exchange = async {
            let resp = self.http.request(req).await.map_err(|e| {
                if let Some(reason) = tls_failure(&e) {
                    ClientError::Tls {
                        url: self.base.clone(),
                        reason,
                    }
                } else if e.is_connect() {
                    ClientError::Connect {
                        url: self.base.clone(),
                        reason: root_cause(&e),
                    }
                } else {
                    ClientError::Transport(root_cause(&e))
                }
            })?;
            let (parts, body) = resp.into_parts();
            let bytes = read_body(&parts.headers, body).await?;
            Ok::<_, ClientError>((parts, bytes))
        };
        let (parts, bytes) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout(timeout))??;
        if !parts.status.is_success() {
            return Err(status_error(parts.status, &parts.headers, &bytes));
        }
        Ok((parts.headers, bytes))
    }
}

/// The TLS settings: for `https`, the CA file's certificates as the only roots, or the
/// system's (found by rustls-native-certs, through hyper-rustls); for plain HTTP nothing is
/// ever verified, so no roots are loaded.
fn client_tls(https: bool, ca_file: Option<&Path>) -> Result<ClientConfig, ClientError> {
    use hyper_rustls::ConfigBuilderExt;
    let ca_err = |e: String| ClientError::CaFile(e);
    match (https, ca_file) {
        (true, Some(path)) => {
            let roots = serve::tls::load_roots(path).map_err(|e| ca_err(e.to_string()))?;
            serve::tls::client_config(roots).map_err(|e| ca_err(e.to_string()))
        }
        (true, None) => Ok(ClientConfig::builder_with_provider(serve::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ca_err(e.to_string()))?
            .with_native_roots()
            .map_err(|e| ca_err(format!("no --ca-file given and the system's CAs: {e}")))?
            .with_no_client_auth()),
        (false, _) => {
            serve::tls::client_config(RootCertStore::empty()).map_err(|e| ca_err(e.to_string()))
        }
    }
}

/// The TLS error behind a failed request, if it was one. rustls reports it wrapped in
/// `io::Error` (sometimes twice), whose `source()` skips the wrapped error: so step into each
/// `io::Error`'s payload rather than its source.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        cur = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

fn blocking_query(index: Option<u64>, wait: Option<Duration>) -> String {
    let mut q = Vec::new();
    if let Some(i) = index {
        q.push(format!("index={i}"));
    }
    if let Some(w) = wait {
        q.push(format!("wait={}ms", w.as_millis()));
    }
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

/// Reads a whole body into one buffer, reserved from `Content-Length` (capped at
/// [`MAX_RESPONSE`]). `collect()` holds every chunk until the end and then copies them into
/// one buffer: twice the body at once, 50 MB for a whole catalog of 100 000 endpoints.
async fn read_body(
    headers: &HeaderMap,
    mut body: hyper::body::Incoming,
) -> Result<Bytes, ClientError> {
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut out = Vec::with_capacity(announced.min(MAX_RESPONSE));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ClientError::Transport(root_cause(&e)))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if out.len() + data.len() > MAX_RESPONSE {
            return Err(ClientError::Transport(format!(
                "response body over the limit of {MAX_RESPONSE} bytes"
            )));
        }
        if out.is_empty() && http_body::Body::is_end_stream(&body) {
            // One chunk holds the whole (small) body: no copy.
            return Ok(data);
        }
        out.extend_from_slice(&data);
    }
    Ok(Bytes::from(out))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes).map_err(|e| ClientError::Decode(e.to_string()))
}

fn status_error(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> ClientError {
    let retry_after = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let (code, message) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => (e.error.code, e.error.message),
        Err(_) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_string();
            let reason = status.canonical_reason().unwrap_or("error").to_string();
            (String::new(), if text.is_empty() { reason } else { text })
        }
    };
    ClientError::Status {
        status: status.as_u16(),
        code,
        message,
        retry_after,
    }
}

/// The innermost error's message ("Connection refused (os error 111)"), which is what an
/// operator needs; hyper's outer layers only say "client error (Connect)".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
