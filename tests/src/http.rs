//! A small blocking HTTP client for the end-to-end tests (hyper-util on a private runtime),
//! so a test reads like the steps an operator would take.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub struct Response {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The body as one of the typed answers (`schema::agent_api`, `schema::api`).
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "not a {} answer: {}",
                std::any::type_name::<T>(),
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("test runtime: {e}"))
    })
}

/// Sends one request and reads the whole answer, failing after `timeout`.
pub fn request(
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: &[u8],
    timeout: Duration,
) -> Result<Response> {
    let headers: &[(&str, &str)] = match content_type {
        Some(ct) => &[("content-type", ct)],
        None => &[],
    };
    request_with(method, url, headers, body, timeout)
}

/// [`request`] with any headers (e.g. `Host`, to pick a proxy route).
pub fn request_with(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response> {
    let method = Method::from_bytes(method.as_bytes())?;
    let mut req = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(Bytes::copy_from_slice(body)))?;
    runtime().block_on(async move {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let fut = async {
            let resp = client.request(req).await?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await?.to_bytes();
            anyhow::Ok(Response {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(timeout, fut)
            .await
            .context("request timed out")?
    })
}

pub fn get(url: &str) -> Result<Response> {
    request("GET", url, None, b"", Duration::from_secs(10))
}

/// The sum of the samples of `name` whose labels contain `label` (all of them if empty).
pub fn metric(url: &str, name: &str, label: &str) -> Result<f64> {
    let r = get(&format!("{url}/metrics"))?;
    let text = String::from_utf8_lossy(&r.body);
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let matches_name = key == name || key.starts_with(&format!("{name}{{"));
        if matches_name && key.contains(label) {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    Ok(sum)
}
