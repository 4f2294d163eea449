//! Compressed answers from real `tidings` processes: the registry's and an agent's
//! `/v2/catalog`, with a few hundred endpoints registered, in gzip and zstd as
//! `Accept-Encoding` asks, identity otherwise; small answers never compressed; and a blocking
//! catalog query asking for gzip still answers as soon as a check-in wakes it.

use std::io::Read;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use schema::wire::{HEADER_INDEX, HEADER_REGISTRY_AGE, HEADER_SOURCE};
use serde_json::Value;
use tests::fleet::{self, checkin_body};
use tests::{Proc, START, http, poll};

/// Endpoints registered (one host, a service each): a catalog of about 50 KiB.
const SERVICES: u16 = 200;

/// The host every registered endpoint is on.
const HOST: &str = "10.15.0.1";

/// How soon a woken blocking query must answer (its `wait` is a minute).
const PROMPT: Duration = Duration::from_secs(5);

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A registry that is past its warm-up within a second, so agents take its answers.
fn registry() -> Result<(Proc, String)> {
    let proc = fleet::registry("127.0.0.1:0", "120s", "1s")?;
    let url = format!("http://{}", proc.addr("registry")?);
    Ok((proc, url))
}

/// `GET url`, with `Accept-Encoding: accept` when given; the body as sent (not decoded).
fn fetch_within(url: &str, accept: Option<&str>, timeout: Duration) -> Result<http::Response> {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("accept-encoding", a)).into_iter().collect();
    let r = http::request_with("GET", url, &headers, b"", timeout)?;
    ensure!(r.status == 200, "GET {url}: {}", r.status);
    Ok(r)
}

fn fetch(url: &str, accept: Option<&str>) -> Result<http::Response> {
    fetch_within(url, accept, REQUEST_TIMEOUT)
}

/// The body, decoded as its `Content-Encoding` says.
fn decode(r: &http::Response) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match r.header("content-encoding") {
        None => out.extend_from_slice(&r.body),
        Some("gzip") => {
            flate2::read::GzDecoder::new(&r.body[..]).read_to_end(&mut out)?;
        }
        Some("zstd") => out = zstd::decode_all(&r.body[..])?,
        Some(other) => bail!("unexpected content-encoding {other}"),
    }
    Ok(out)
}

/// A catalog's JSON without `generated_at_ms`, the one field that differs between two reads
/// of the same content.
fn content(body: &[u8]) -> Result<Value> {
    let mut v: Value = serde_json::from_slice(body)?;
    v.as_object_mut()
        .context("catalog is not an object")?
        .remove("generated_at_ms");
    Ok(v)
}

fn varies(r: &http::Response) -> bool {
    r.headers
        .get_all("vary")
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"accept-encoding"))
}

/// A v2 check-in of `endpoints` on `ip`, asking for gzip (its small ack must not be).
fn checkin(registry: &str, ip: &str, endpoints: &[(String, u16)]) -> Result<http::Response> {
    let r = http::request_with(
        "POST",
        &format!("{registry}/v2/checkin"),
        &[
            ("content-type", "application/json"),
            ("accept-encoding", "gzip, zstd"),
        ],
        checkin_body(ip, endpoints, "r1").as_bytes(),
        REQUEST_TIMEOUT,
    )?;
    ensure!(
        r.status == 200,
        "check-in: {}",
        String::from_utf8_lossy(&r.body)
    );
    Ok(r)
}

/// Registers [`SERVICES`] endpoints on [`HOST`].
fn fill(registry: &str) -> Result<()> {
    let endpoints: Vec<(String, u16)> = (0..SERVICES)
        .map(|n| (format!("svc-{n:03}"), 8000 + n))
        .collect();
    let ack = checkin(registry, HOST, &endpoints)?;
    ensure!(
        ack.header("content-encoding").is_none(),
        "a check-in ack was compressed"
    );
    Ok(())
}

/// `/v2/catalog` of `base` in identity, gzip and zstd: the same content, the right headers.
fn catalog_is_compressed_as_asked(base: &str, meta: &[&str]) -> Result<()> {
    let url = format!("{base}/v2/catalog");
    let plain = fetch(&url, None)?;
    ensure!(
        plain.header("content-encoding").is_none(),
        "identity asked for"
    );
    ensure!(
        plain.header("content-length") == Some(plain.body.len().to_string().as_str()),
        "identity keeps its Content-Length"
    );
    ensure!(
        varies(&plain),
        "an answer large enough to compress varies by Accept-Encoding"
    );
    for codec in ["gzip", "zstd"] {
        let packed = fetch(&url, Some(codec))?;
        ensure!(
            packed.header("content-encoding") == Some(codec),
            "{codec} asked for"
        );
        ensure!(varies(&packed), "{codec}: no Vary: Accept-Encoding");
        ensure!(
            packed.header("content-length").is_none(),
            "{codec}: stale Content-Length"
        );
        for h in meta {
            ensure!(packed.header(h).is_some(), "{codec}: no {h}");
        }
        ensure!(
            packed.body.len() * 4 < plain.body.len(),
            "{codec}: {} bytes for {} plain",
            packed.body.len(),
            plain.body.len()
        );
        // Two reads can straddle a change of the catalog: compare reads that agree on the index.
        poll(
            &format!("{codec} catalog of {base} to decode to the identity one"),
            START,
            || {
                let plain = fetch(&url, None).ok()?;
                let packed = fetch(&url, Some(codec)).ok()?;
                let same = content(&plain.body).ok()? == content(&decode(&packed).ok()?).ok()?;
                same.then_some(())
            },
        )?;
    }
    Ok(())
}

/// Small answers (probes, errors) stay identity and carry no `Vary` even when the client
/// takes both codecs.
fn small_answers_are_not_compressed(base: &str) -> Result<()> {
    for path in ["/live", "/no-such-route"] {
        let r = http::request_with(
            "GET",
            &format!("{base}{path}"),
            &[("accept-encoding", "gzip, zstd")],
            b"",
            REQUEST_TIMEOUT,
        )?;
        ensure!(
            r.header("content-encoding").is_none(),
            "{path} was compressed"
        );
        ensure!(!varies(&r), "{path} varies");
        r.json()
            .with_context(|| format!("{path} is not plain JSON"))?;
    }
    Ok(())
}

/// A gzip blocking catalog query on `base`, seen waiting in `gauge`, then woken by a check-in
/// at `registry`: it answers compressed, with the new endpoint, within [`PROMPT`].
fn blocking_query_wakes_compressed(base: &str, registry: &str, gauge: &str) -> Result<()> {
    let url = format!("{base}/v2/catalog");
    let index = fetch(&url, None)?
        .header(HEADER_INDEX)
        .context("no index")?
        .to_string();
    let blocking = format!("{url}?index={index}&wait=60s");
    let waiter =
        thread::spawn(move || fetch_within(&blocking, Some("gzip"), Duration::from_secs(90)));
    poll(
        &format!("a blocking query waiting on {base}"),
        START,
        || (http::metric(base, gauge, "").ok()? >= 1.0).then_some(()),
    )?;
    let woken = Instant::now();
    checkin(registry, "10.15.0.2", &[("late".to_string(), 9000)])?;
    let r = waiter.join().map_err(|_| anyhow!("waiter panicked"))??;
    let took = woken.elapsed();
    ensure!(took < PROMPT, "woken query answered after {took:?}");
    ensure!(r.header("content-encoding") == Some("gzip"), "not gzip");
    ensure!(
        r.header(HEADER_INDEX) != Some(index.as_str()),
        "index did not move"
    );
    let v = content(&decode(&r)?)?;
    ensure!(v["services"]["late"].is_array(), "no `late` in {v}");
    Ok(())
}

#[test]
fn registry_compresses_the_catalog_as_asked() -> Result<()> {
    let (_reg, url) = registry()?;
    fill(&url)?;
    catalog_is_compressed_as_asked(&url, &[HEADER_INDEX])?;
    small_answers_are_not_compressed(&url)?;
    blocking_query_wakes_compressed(&url, &url, "tidings_registry_blocking_queries")
}

#[test]
fn agent_compresses_the_catalog_as_asked() -> Result<()> {
    let (_reg, reg_url) = registry()?;
    fill(&reg_url)?;
    let tmp = tempfile::tempdir()?;
    let ip = fleet::loopback(150, 1);
    let agent = fleet::local_agent("agent", &ip, &tmp.path().join("agent"), &reg_url, &[])?;
    let base = agent.url();
    poll(&format!("{base} to sync the catalog"), START, || {
        let all = fleet::catalog(&base).ok()?;
        (all.iter().filter(|e| e.contains(HOST)).count() == usize::from(SERVICES)).then_some(())
    })?;
    catalog_is_compressed_as_asked(&base, &[HEADER_INDEX, HEADER_REGISTRY_AGE, HEADER_SOURCE])?;
    small_answers_are_not_compressed(&base)?;
    blocking_query_wakes_compressed(&base, &reg_url, "tidings_agent_blocking_queries")
}
