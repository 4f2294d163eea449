//! In-process agents against real registries on loopback sockets: what a registry answer
//! may add and remove (warm-up, restart from the disk cache), and how the registry-age
//! header behaves while a blocking query waits and after the registry dies.
//!
//! Each registry runs on its own small tokio runtime, so "killing" it is shutting that
//! runtime down: its listener and every open connection close at once, as when the process
//! dies. Registry clocks are manual and set in the past, so no snapshot is ever dated ahead
//! of the agents' wall clock.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU16;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::{AgentConfig, LocalEndpoints, MergedView, Shared};
use axum::body::Body;
use axum::http::Request;
use discovery::ManualClock;
use gossip::GossipConfig;
use http_body_util::BodyExt;
use schema::ServiceName;
use schema::timefmt::unix_ms_now;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warming_registry_adds_hosts_at_once_and_removes_none_until_warm_up_ends() {
    let now = unix_ms_now();
    let mut first = TestRegistry::start("127.0.0.1:0".parse().expect("addr"), now - 300_000).await;
    first.clock.advance(Duration::from_secs(70)); // past its warm-up
    let cron = first.client();
    cron.check_in(&[ep("web", "10.0.0.1", 80), ep("web", "10.0.0.2", 80)])
        .await
        .expect("check-in");
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = RunningAgent::start(config(&first, dir.path())).await;
    wait_listed(agent.api, "web", &["10.0.0.1:80", "10.0.0.2:80"], |_| {}).await;

    // The registry restarts with an empty store, on the same address, and warms up.
    let addr = first.addr;
    first.kill();
    let second = TestRegistry::start(addr, now - 200_000).await;
    let cron = second.client();
    // A cron host checks in for the first time, and web:1 checks in again.
    cron.check_in(&[ep("web", "10.0.0.3", 80), ep("web", "10.0.0.1", 80)])
        .await
        .expect("check-in");
    let keeps_old = |hosts: &[String]| {
        for old in ["10.0.0.1:80", "10.0.0.2:80"] {
            assert!(hosts.iter().any(|h| h == old), "{old} dropped: {hosts:?}");
        }
    };
    wait_listed(
        agent.api,
        "web",
        &["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"],
        keeps_old,
    )
    .await;
    let (_, source) = listed(agent.api, "web").await;
    assert_eq!(source, "registry");

    // Warm-up ends: the first authoritative answer removes web:2, which never came back.
    second.clock.advance(Duration::from_secs(61));
    wait_listed(agent.api, "web", &["10.0.0.1:80", "10.0.0.3:80"], |_| {}).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_drops_cached_hosts_the_registry_no_longer_lists() {
    let now = unix_ms_now();
    let registry = TestRegistry::start("127.0.0.1:0".parse().expect("addr"), now - 200_000).await;
    registry.clock.advance(Duration::from_secs(70)); // past its warm-up
    let cron = registry.client();
    cron.check_in(&[
        ep("web", "10.0.0.9", 80),
        ep("db", "10.0.0.9", 5432),
        ep("db", "10.0.0.10", 5432),
    ])
    .await
    .expect("check-in");
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = RunningAgent::start(config(&registry, dir.path())).await;
    wait_listed(agent.api, "web", &["10.0.0.9:80"], |_| {}).await;
    wait_listed(
        agent.api,
        "db",
        &["10.0.0.10:5432", "10.0.0.9:5432"],
        |_| {},
    )
    .await;
    // Stopped: the final cache write keeps all three.
    agent.stop().await;

    // While it is down, web's only host and one db host are deregistered.
    registry.clock.advance(Duration::from_secs(1));
    let web = ServiceName::new("web").expect("name");
    let db = ServiceName::new("db").expect("name");
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    cron.deregister(&web, ip("10.0.0.9"), NonZeroU16::new(80))
        .await
        .expect("deregistered");
    cron.deregister(&db, ip("10.0.0.10"), NonZeroU16::new(5432))
        .await
        .expect("deregistered");

    // Restarted from its cache, with the registry up: the registry's answer is the truth,
    // for a service it no longer lists at all as for one that merely shrank.
    let agent = RunningAgent::start(config(&registry, dir.path())).await;
    wait_listed(agent.api, "web", &[], |_| {}).await;
    wait_listed(agent.api, "db", &["10.0.0.9:5432"], |_| {}).await;
    let (_, source) = listed(agent.api, "db").await;
    assert_eq!(source, "registry");
    agent.stop().await;
}

/// The registry age an answer of the local API carries, and the metric, in ms.
async fn ages(app: &axum::Router) -> (i64, i64) {
    let req = |uri: &str| {
        Request::builder()
            .uri(uri)
            .body(Body::empty())
            .expect("request")
    };
    let resp = app
        .clone()
        .oneshot(req("/v1/registration/web"))
        .await
        .expect("infallible");
    let header = resp
        .headers()
        .get(schema::wire::HEADER_REGISTRY_AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("age header");
    let resp = app
        .clone()
        .oneshot(req("/metrics"))
        .await
        .expect("infallible");
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    let metric: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("tidings_agent_registry_age_seconds ")?
                .parse()
                .ok()
        })
        .expect("age metric");
    (header, (metric * 1000.0).round() as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_age_stays_low_while_a_blocking_query_waits_and_grows_once_the_registry_dies()
{
    let now = unix_ms_now();
    let mut registry =
        TestRegistry::start("127.0.0.1:0".parse().expect("addr"), now - 200_000).await;
    registry.clock.advance(Duration::from_secs(70)); // past its warm-up
    registry
        .client()
        .check_in(&[ep("web", "10.0.0.1", 80)])
        .await
        .expect("check-in");

    // The agent's sync loop alone, with a clock the test moves.
    let stop = CancellationToken::new();
    let gossip = gossip::run(
        GossipConfig::for_tests("127.0.0.1:0".parse().expect("addr")),
        Vec::new(),
        stop.clone(),
    )
    .await
    .expect("gossip starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = AgentConfig {
        sync_wait: Duration::from_secs(60),
        ..config(&registry, dir.path())
    };
    let client = config.client().expect("client");
    let clock = Arc::new(ManualClock::new(now));
    let (_view_tx, view_rx) = watch::channel(Arc::new(MergedView::default()));
    let shared = Arc::new(
        Shared::new(
            config,
            client,
            gossip,
            "127.0.0.1".parse().expect("ip"),
            view_rx,
            LocalEndpoints::default(),
            0,
            stop.child_token(),
        )
        .with_clock(clock.clone()),
    );
    let app = agent::api::router(shared.clone());
    let sync = tokio::spawn(agent::sync::run_sync(shared.clone(), stop.clone()));

    // Synced once, and now a blocking query waits at the registry.
    let started = Instant::now();
    while registry.blocking_queries() < 1.0 {
        assert!(started.elapsed() < DEADLINE, "no blocking query");
        tokio::time::sleep(POLL).await;
    }
    assert!(shared.registry_ok());
    for _ in 0..5 {
        clock.advance(Duration::from_secs(5));
        let (header, metric) = ages(&app).await;
        assert!(
            header < 1_000,
            "healthy registry, query waiting: {header} ms"
        );
        assert_eq!(header, metric, "the metric says what the header says");
    }

    // The registry dies: the query fails, and the age counts from the last known moment.
    registry.kill();
    let started = Instant::now();
    while shared.registry_ok() {
        assert!(started.elapsed() < DEADLINE, "the sync never noticed");
        tokio::time::sleep(POLL).await;
    }
    clock.advance(Duration::from_secs(10));
    let (header, metric) = ages(&app).await;
    assert_eq!(
        header, 35_000,
        "known current when the waiting query was sent"
    );
    assert_eq!(metric, 35_000);
    clock.advance(Duration::from_secs(60));
    let (header, _) = ages(&app).await;
    assert_eq!(
        header, 95_000,
        "grows with time while the registry stays down"
    );

    stop.cancel();
    sync.await.expect("sync stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_drops_cached_rows_of_an_owner_gone_for_good_once_the_registry_answers() {
    // The registry is down at first: a port nothing listens on yet.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let url = format!("http://{addr}");
    let config = |dir: &Path, seeds: Vec<SocketAddr>| {
        let mut c = config_for(&url, dir);
        c.gossip.seeds = seeds;
        c
    };

    // Agent A serves api:9000; agent B learns it through gossip only, and caches it.
    let dir_a = tempfile::tempdir().expect("tempdir");
    let mut config_a = config(dir_a.path(), Vec::new());
    config_a.endpoints = vec![agent::parse_endpoint_flag("api:9000").expect("flag")];
    let a = RunningAgent::start(config_a).await;
    let (_, _, me) = get(a.api, "/v1/agent/self").await;
    let me: schema::agent_api::AgentSelf = serde_json::from_value(me).expect("self answer");
    let gossip_a: SocketAddr = me.gossip_addr.parse().expect("gossip addr");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let b = RunningAgent::start(config(dir_b.path(), vec![gossip_a])).await;
    wait_listed(b.api, "api", &["127.0.0.1:9000"], |_| {}).await;
    b.stop().await;
    // A's host is decommissioned for good.
    a.stop().await;

    // B restarts from its cache; the registry is up now and has never heard of api:9000.
    let now = unix_ms_now();
    let registry = TestRegistry::start(addr, now - 200_000).await;
    registry.clock.advance(Duration::from_secs(70)); // past its warm-up
    let b = RunningAgent::start(config(dir_b.path(), vec![gossip_a])).await;
    wait_listed(b.api, "api", &[], |_| {}).await;
    b.stop().await;
}

/// An agent's gossip address, from its API.
async fn gossip_addr(api: SocketAddr) -> SocketAddr {
    let (_, _, me) = get(api, "/v1/agent/self").await;
    me["gossip_addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("the agent's gossip address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_without_its_cache_during_warm_up_takes_no_host_from_its_peers() {
    // Campaign seed 12860982494713673050: an agent restarted without its disk cache while
    // the registry warmed up published the warming answer, a lower bound, dated newer than
    // its peers' fuller snapshots; gossip spread it over them and they lost every host that
    // had not checked in again.
    let now = unix_ms_now();
    let mut first = TestRegistry::start("127.0.0.1:0".parse().expect("addr"), now - 300_000).await;
    first.clock.advance(Duration::from_secs(70)); // past its warm-up
    first
        .client()
        .check_in(&[ep("web", "10.0.0.1", 80), ep("web", "10.0.0.2", 80)])
        .await
        .expect("check-in");
    let dir_a = tempfile::tempdir().expect("tempdir");
    let a = RunningAgent::start(config(&first, dir_a.path())).await;
    let a_gossip = gossip_addr(a.api).await;
    // The registry's address stays the same across its restart.
    let mut seeded = config(&first, dir_a.path());
    seeded.gossip.seeds = vec![a_gossip];
    let with_seed = |dir: &Path| AgentConfig {
        data_dir: dir.to_path_buf(),
        ..seeded.clone()
    };
    let dir_b = tempfile::tempdir().expect("tempdir");
    let b = RunningAgent::start(with_seed(dir_b.path())).await;
    let both = ["10.0.0.1:80", "10.0.0.2:80"];
    wait_listed(a.api, "web", &both, |_| {}).await;
    wait_listed(b.api, "web", &both, |_| {}).await;

    // The registry restarts empty and warms up (its clock never moves: for the whole test);
    // only a new cron host checks in. Agent b restarts without its cache.
    let addr = first.addr;
    first.kill();
    let second = TestRegistry::start(addr, now - 200_000).await;
    second
        .client()
        .check_in(&[ep("web", "10.0.0.3", 80)])
        .await
        .expect("check-in");
    b.stop().await;
    let dir_b = tempfile::tempdir().expect("a new, empty data dir");
    let b = RunningAgent::start(with_seed(dir_b.path())).await;

    // a keeps web:1 and web:2 all along; both end with all three.
    let all = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"];
    let started = Instant::now();
    loop {
        let (on_a, _) = listed(a.api, "web").await;
        for old in both {
            assert!(on_a.iter().any(|h| h == old), "a dropped {old}: {on_a:?}");
        }
        let (on_b, _) = listed(b.api, "web").await;
        if on_a == all && on_b == all {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "a lists {on_a:?}, b lists {on_b:?}, want {all:?} on both"
        );
        tokio::time::sleep(POLL).await;
    }
    a.stop().await;
    b.stop().await;
}
