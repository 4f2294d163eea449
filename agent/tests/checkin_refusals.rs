//! One endpoint the registry refuses must not cost the host its others: an in-process agent
//! against a real registry with a write secret, holding a host token for its own address
//! and an endpoint on another address the token does not cover.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::{AgentConfig, parse_endpoint_flag};
use discovery::{ManualClock, MemoryStore, Registry, RegistryClient, RegistryConfig};
use schema::ServiceName;
use schema::timefmt::unix_ms_now;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

mod support;

const DEADLINE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);
const SECRET: &str = "s3cret";
const TTL: Duration = Duration::from_secs(30);

/// The `ip:port`s the registry lists as live for `service`, sorted.
async fn live(client: &RegistryClient, service: &str) -> Vec<String> {
    let name = ServiceName::new(service).expect("name");
    let listing = client.service(&name).await.expect("registry answers");
    let mut hosts: Vec<String> = listing
        .hosts
        .iter()
        .map(|h| format!("{}:{}", h.ip_address, h.port))
        .collect();
    hosts.sort();
    hosts
}

async fn wait_live(client: &RegistryClient, service: &str, want: &[&str]) {
    let started = Instant::now();
    loop {
        let hosts = live(client, service).await;
        if hosts == want {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{service}: the registry lists {hosts:?}, want {want:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The agent's `/metrics` value of a series without labels.
async fn metric(api: SocketAddr, name: &str) -> f64 {
    let mut s = TcpStream::connect(api).await.expect("connect");
    let req = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.expect("read");
    buf.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_endpoint_does_not_stop_the_hosts_others_from_checking_in() {
    // The registry's clock lags the wall clock, so no snapshot it dates is ahead of the
    // agent's; it is moved by hand past the TTL below.
    let clock = Arc::new(ManualClock::new(unix_ms_now() - 300_000));
    let registry = Registry::new(
        Arc::new(MemoryStore::new()),
        RegistryConfig {
            secret: Some(SECRET.into()),
            ttl: TTL,
            self_preservation: false,
            ..Default::default()
        },
        clock.clone(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, discovery::router(registry)).await });
    let reader = RegistryClient::new(&url, None, Duration::from_secs(2)).expect("client");

    let dir = tempfile::tempdir().expect("tempdir");
    let a: std::net::IpAddr = "127.0.0.1".parse().expect("ip");
    let config = AgentConfig {
        // A host token for A only: the endpoint on B is refused (403).
        registry_token: Some(discovery::host_token(SECRET, a)),
        host_ip: Some(a),
        endpoints: vec![
            parse_endpoint_flag("web:8080").expect("flag"),
            parse_endpoint_flag("web:8081").expect("flag"),
            parse_endpoint_flag("db:5432@10.0.0.9").expect("flag"),
        ],
        check_in_interval: Duration::from_secs(1),
        ..support::config_for(&url, dir.path())
    };
    let api_listener = TcpListener::bind("127.0.0.1:0").await.expect("api");
    let api = api_listener.local_addr().expect("api addr");
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent::run(config, api_listener, stop.clone()));

    wait_live(&reader, "web", &["127.0.0.1:8080", "127.0.0.1:8081"]).await;
    // Past the TTL of every check-in so far: A's endpoints are live again only if the agent
    // keeps checking them in.
    clock.advance(TTL + Duration::from_secs(1));
    wait_live(&reader, "web", &["127.0.0.1:8080", "127.0.0.1:8081"]).await;
    clock.advance(TTL + Duration::from_secs(1));
    wait_live(&reader, "web", &["127.0.0.1:8080", "127.0.0.1:8081"]).await;
    assert!(live(&reader, "db").await.is_empty(), "B's endpoint got in");

    // Refused once, counted once, however many rounds have passed since.
    assert_eq!(
        metric(api, "tidings_agent_checkin_refused_endpoints_total").await,
        1.0
    );
    stop.cancel();
    task.await.expect("joined").expect("agent ran");
}
