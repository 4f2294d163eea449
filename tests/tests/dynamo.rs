//! The DynamoDB store through the real binary, as an operator runs it: `tidings registry
//! init-table` against a DynamoDB-compatible server (moto), two registries on one table behind
//! nothing but their own ports, the cron check-in, and DynamoDB dying under them.

// One moto launcher for the whole workspace: discovery's test harness, compiled into this
// test too (it needs only std and `discovery::DynamoConfig`, a dev-dependency here).
#[path = "../../discovery/tests/support/moto.rs"]
mod moto;

use std::time::Duration;

use schema::wire::HEADER_STALE;
use tests::{Proc, http, poll, run};

/// A registry start, or a one-shot command, on a loaded 2-core CI machine.
const START: Duration = Duration::from_secs(30);
const TABLE: &str = "tidings-e2e";

fn init_table(endpoint: &str) -> anyhow::Result<(i32, String, String)> {
    run(
        &[
            "registry",
            "init-table",
            "--dynamodb-table",
            TABLE,
            "--dynamodb-endpoint",
            endpoint,
            "--region",
            "us-east-1",
        ],
        START,
    )
}

fn registry(name: &str, endpoint: &str) -> anyhow::Result<(Proc, String)> {
    let args = [
        "registry",
        "--listen",
        "127.0.0.1:0",
        "--store",
        "dynamodb",
        "--dynamodb-table",
        TABLE,
        "--dynamodb-endpoint",
        endpoint,
        "--region",
        "us-east-1",
    ];
    let proc = Proc::start(name, &args, 1, START)?;
    let url = format!("http://{}", proc.addr("registry")?);
    Ok((proc, url))
}

/// `tidings checkin` of web on `ip`:8080 into the registry at `url`.
fn checkin(url: &str, ip: &str) -> anyhow::Result<(i32, String, String)> {
    run(
        &[
            "checkin",
            "--registry",
            url,
            "--service",
            "web",
            "--port",
            "8080",
            "--ip",
            ip,
            "--tag",
            "az=zone-a",
            "--no-splay",
            "--timeout",
            "5s",
        ],
        START,
    )
}

/// The sorted IPs a v1 listing of web from `url` shows, with whether it was flagged stale.
fn web_hosts(url: &str) -> anyhow::Result<(u16, Vec<String>, bool)> {
    let resp = http::get(&format!("{url}/v1/registration/web"))?;
    let stale = resp.header(HEADER_STALE) == Some("true");
    let mut ips: Vec<String> = resp.json()?["hosts"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .filter_map(|h| h["ip_address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ips.sort();
    Ok((resp.status, ips, stale))
}

/// Polls until the registry at `url` lists exactly `want` for web, fresh.
fn wait_for_hosts(url: &str, want: &[&str]) -> anyhow::Result<()> {
    poll(&format!("{url} to list {want:?}"), START, || {
        let (status, ips, stale) = web_hosts(url).ok()?;
        (status == 200 && !stale && ips == want).then_some(())
    })
}

#[test]
fn registries_share_a_dynamodb_table_and_serve_stale_when_it_dies() -> anyhow::Result<()> {
    let mut moto = moto::Moto::start();
    let endpoint = moto.endpoint();

    // Creating the table, then again: the second run finds it and changes nothing.
    for attempt in ["first", "second"] {
        let (code, out, err) = init_table(&endpoint)?;
        assert_eq!(code, 0, "{attempt} init-table: {out}\n{err}");
        assert!(out.contains(&format!("table {TABLE} is ready")), "{out}");
    }

    let (a, url_a) = registry("registry-a", &endpoint)?;
    let (b, url_b) = registry("registry-b", &endpoint)?;

    // Horizontal scale: a host checks in through one registry, the other one lists it.
    let (code, out, err) = checkin(&url_a, "127.0.0.5")?;
    assert_eq!(code, 0, "check-in into a: {out}\n{err}\n{}", a.log_text());
    wait_for_hosts(&url_b, &["127.0.0.5"])?;
    let (code, out, err) = checkin(&url_b, "127.0.0.6")?;
    assert_eq!(code, 0, "check-in into b: {out}\n{err}\n{}", b.log_text());
    wait_for_hosts(&url_a, &["127.0.0.5", "127.0.0.6"])?;
    wait_for_hosts(&url_b, &["127.0.0.5", "127.0.0.6"])?;

    moto.kill();

    // Writes cannot be stored: the registry answers 503 and cron hears "transient, exit 2".
    let (code, _, err) = checkin(&url_a, "127.0.0.7")?;
    assert_eq!(code, 2, "check-in with DynamoDB down: {err}");
    assert!(err.contains("unavailable"), "{err}");

    // Reads of what each registry has read before go on, flagged stale.
    // (Polled: an answer still inside the read cache's short freshness is not stale yet.)
    for url in [&url_a, &url_b] {
        let (status, ips) = poll(&format!("a stale answer from {url}"), START, || {
            let (status, ips, stale) = web_hosts(url).ok()?;
            stale.then_some((status, ips))
        })?;
        assert_eq!(status, 200, "{url}");
        assert_eq!(ips, ["127.0.0.5", "127.0.0.6"], "{url}");
    }
    Ok(())
}
