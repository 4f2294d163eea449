//! The agent on catalog deltas (docs/API.md#catalog-deltas): it follows the registry by
//! deltas, and whatever is lost on the way — the registry's history trimmed, the registry
//! replaced by a replica, the agent itself stopped mid-stream — it ends holding exactly the
//! registry's catalog, as the digests say.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use discovery::{MemoryStore, RegistryConfig};
use schema::agent_api::AgentSelf;
use schema::timefmt::unix_ms_now;

mod support;

use support::*;

/// The registry's digest now, as a client asking for the whole catalog sees it.
async fn registry_digest(registry: &TestRegistry) -> String {
    let (c, _) = registry
        .client()
        .catalog_changes(None, None, false)
        .await
        .expect("catalog");
    assert!(c.full);
    c.digest
}

/// Polls until the agent's last catalog has the registry's digest.
async fn wait_same_digest(api: SocketAddr, registry: &TestRegistry) {
    let started = Instant::now();
    loop {
        let want = registry_digest(registry).await;
        let (_, _, v) = get(api, "/v1/agent/self").await;
        let me: AgentSelf = serde_json::from_value(v).expect("self answer");
        if me.registry_digest.as_deref() == Some(want.as_str()) {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "agent digest {:?}, registry {want}",
            me.registry_digest
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A counter of the agent's `/metrics` (0 when absent).
async fn metric(api: SocketAddr, line_start: &str) -> f64 {
    let (status, _, text) = get_text(api, "/metrics").await;
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn full_syncs(api: SocketAddr, reason: &str) -> f64 {
    metric(
        api,
        &format!("tidings_agent_registry_full_syncs_total{{reason=\"{reason}\"}}"),
    )
    .await
}

async fn deltas(api: SocketAddr) -> f64 {
    metric(api, "tidings_agent_registry_deltas_total").await
}

/// A registry past its warm-up, with `web` on 10.0.0.1 and .2 and `db` on .3.
async fn registry(config: RegistryConfig, store: Arc<MemoryStore>) -> TestRegistry {
    let now = unix_ms_now();
    let addr = "127.0.0.1:0".parse().expect("addr");
    let r = TestRegistry::start_on(addr, now - 200_000, config, store).await;
    r.clock.advance(Duration::from_secs(70));
    r.client()
        .check_in(&[
            ep("web", "10.0.0.1", 80),
            ep("web", "10.0.0.2", 80),
            ep("db", "10.0.0.3", 5432),
        ])
        .await
        .expect("check-in");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_follows_the_registry_by_deltas() {
    let registry = registry(RegistryConfig::default(), Arc::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = RunningAgent::start(config(&registry, dir.path())).await;
    wait_listed(agent.api, "web", &["10.0.0.1:80", "10.0.0.2:80"], |_| {}).await;
    wait_same_digest(agent.api, &registry).await;
    let mut want = vec!["10.0.0.1:80".to_string(), "10.0.0.2:80".to_string()];
    for k in 0..3 {
        let ip = format!("10.0.1.{k}");
        registry
            .client()
            .check_in(&[ep("web", &ip, 80)])
            .await
            .expect("check-in");
        want.push(format!("{ip}:80"));
        want.sort();
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        wait_listed(agent.api, "web", &want, |_| {}).await;
        wait_same_digest(agent.api, &registry).await;
    }
    assert!(deltas(agent.api).await >= 3.0, "changes came as deltas");
    assert_eq!(full_syncs(agent.api, "start").await, 1.0);
    // (`error` is left out: a loaded machine may time a request out.)
    for reason in ["unknown_index", "base", "digest", "decode"] {
        assert_eq!(full_syncs(agent.api, reason).await, 0.0, "{reason}");
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_trimmed_from_the_registry_history_ends_in_a_whole_catalog() {
    // A history of one view: every change trims the view the agent waits at.
    let config_one = RegistryConfig {
        delta_views: 1,
        ..Default::default()
    };
    let registry = registry(config_one, Arc::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = RunningAgent::start(config(&registry, dir.path())).await;
    wait_same_digest(agent.api, &registry).await;
    registry
        .client()
        .check_in(&[ep("web", "10.0.0.7", 80)])
        .await
        .expect("check-in");
    wait_listed(
        agent.api,
        "web",
        &["10.0.0.1:80", "10.0.0.2:80", "10.0.0.7:80"],
        |_| {},
    )
    .await;
    wait_same_digest(agent.api, &registry).await;
    assert!(full_syncs(agent.api, "unknown_index").await >= 1.0);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_taking_over_and_an_agent_restart_end_with_the_registry_view() {
    let store = Arc::new(MemoryStore::new());
    let mut first = registry(RegistryConfig::default(), store.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = RunningAgent::start(config(&first, dir.path())).await;
    wait_same_digest(agent.api, &first).await;

    // The replica the agent talks to dies while a change goes through another one sharing
    // its table, which then takes over its address.
    let addr = first.addr;
    first.kill();
    let clock_ms = unix_ms_now() - 100_000;
    let second = TestRegistry::start_on(addr, clock_ms, RegistryConfig::default(), store).await;
    let web = schema::ServiceName::new("web").expect("name");
    second
        .client()
        .deregister(&web, "10.0.0.2".parse().expect("ip"), None)
        .await
        .expect("deregistered");
    second
        .client()
        .check_in(&[ep("api", "10.0.0.8", 9000)])
        .await
        .expect("check-in");
    wait_listed(agent.api, "web", &["10.0.0.1:80"], |_| {}).await;
    wait_same_digest(agent.api, &second).await;

    // The agent stops mid-stream; a change goes by; it starts again with a whole catalog.
    agent.stop().await;
    second
        .client()
        .check_in(&[ep("web", "10.0.0.5", 80)])
        .await
        .expect("check-in");
    let agent = RunningAgent::start(config(&second, dir.path())).await;
    wait_listed(agent.api, "web", &["10.0.0.1:80", "10.0.0.5:80"], |_| {}).await;
    wait_same_digest(agent.api, &second).await;
    assert_eq!(full_syncs(agent.api, "start").await, 1.0);
    agent.stop().await;
}
