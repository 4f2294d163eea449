//! One real socket: `serve` on 127.0.0.1:0, the real client, and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use discovery::{
    ClientError, MemoryStore, Registry, RegistryClient, RegistryConfig, SystemClock, serve,
};
use schema::{Endpoint, ServiceName};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn serve_client_and_graceful_shutdown() {
    let cfg = RegistryConfig {
        shutdown_delay: Duration::from_millis(50),
        drain_timeout: Duration::from_secs(2),
        secret: Some("k".into()),
        ..Default::default()
    };
    let registry = Registry::new(Arc::new(MemoryStore::new()), cfg, Arc::new(SystemClock));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(listener, registry.clone(), shutdown.clone()));

    let base = format!("http://{addr}");
    let ip = "127.0.0.1".parse().expect("ip");
    let token = discovery::host_token("k", ip);
    let client = RegistryClient::new(&base, Some(token), Duration::from_secs(5)).expect("client");
    let web = ServiceName::new("web").expect("name");
    let ep = Endpoint::new(
        web.clone(),
        ip,
        std::num::NonZeroU16::new(8080).expect("port"),
    );
    let resp = client
        .check_in(std::slice::from_ref(&ep))
        .await
        .expect("check in");
    assert_eq!((resp.accepted, resp.ttl_secs), (1, 180));

    let listing = client.service(&web).await.expect("listing");
    assert_eq!(listing.hosts.len(), 1);
    let (catalog, meta) = client.catalog(None, None).await.expect("catalog");
    assert_eq!(catalog.services["web"][0].port, 8080);
    assert_eq!(meta.index, Some(catalog.index));
    assert!(meta.warming);
    assert!(!meta.stale);

    // The registry's JSON error comes through as a one-line reason.
    let other = RegistryClient::new(&base, None, Duration::from_secs(5)).expect("client");
    let err = other
        .check_in(std::slice::from_ref(&ep))
        .await
        .expect_err("no token");
    assert!(
        matches!(err, ClientError::Status { status: 401, .. }),
        "{err}"
    );
    assert!(!err.is_transient());
    assert!(err.to_string().contains("missing bearer token"), "{err}");
    let err = client
        .deregister(
            &web,
            "127.0.0.1".parse().expect("ip"),
            std::num::NonZeroU16::new(9),
        )
        .await;
    assert!(
        matches!(err, Err(ClientError::Status { status: 404, .. })),
        "{err:?}"
    );

    // A blocked catalog query is released by the shutdown, which then completes.
    let waiter = {
        let client = client.clone();
        let index = catalog.index;
        tokio::spawn(async move {
            client
                .catalog(Some(index), Some(Duration::from_secs(60)))
                .await
        })
    };
    // Poll (bounded) until the query is blocked in the server.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !registry
        .render_metrics()
        .contains("tidings_registry_blocking_queries 1")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the query never blocked"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shutdown.cancel();
    let (c, _) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("released")
        .expect("join")
        .expect("ok");
    assert_eq!(c.index, catalog.index);
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("stopped in time")
        .expect("join")
        .expect("ok");
    assert!(!registry.is_ready());

    let err = client.service(&web).await.expect_err("server is gone");
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    assert!(err.is_transient());
}

#[test]
fn client_refuses_bad_urls() {
    for url in ["not a url", "ftp://x", "http://x?y=1", "https://x?y=1"] {
        assert!(
            RegistryClient::new(url, None, Duration::from_secs(1)).is_err(),
            "{url}"
        );
    }
}
