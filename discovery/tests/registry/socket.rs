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

/// Serves one connection on a loopback listener: reads the request head, then writes
/// `head` and the chunks `body` yields (chunked transfer coding), and stops when a write
/// fails (the client hung up).
async fn one_chunked_answer(
    listener: TcpListener,
    body: impl Iterator<Item = Vec<u8>> + Send + 'static,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok((mut conn, _)) = listener.accept().await else {
        return;
    };
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let answer =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    if conn.write_all(answer).await.is_err() {
        return;
    }
    for chunk in body {
        let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
        framed.extend_from_slice(&chunk);
        framed.extend_from_slice(b"\r\n");
        if conn.write_all(&framed).await.is_err() {
            return;
        }
    }
    let _ = conn.write_all(b"0\r\n\r\n").await;
}

/// The client reads a body chunk by chunk into one buffer: a many-chunk answer arrives
/// whole, and an endless one stops at the response limit with an error (no panic, no
/// unbounded buffer).
#[tokio::test]
async fn chunked_answers_are_read_whole_and_endless_ones_stop_at_the_limit() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let json = br#"{"index":7,"services":[{"service":"web","hosts":3}]}"#.to_vec();
    let pieces: Vec<Vec<u8>> = json.chunks(5).map(<[u8]>::to_vec).collect();
    let server = tokio::spawn(one_chunked_answer(listener, pieces.into_iter()));
    let client = RegistryClient::new(&base, None, Duration::from_secs(10)).expect("client");
    let services = client.services().await.expect("a many-chunk answer");
    assert_eq!((services.index, services.services.len()), (7, 1));
    server.await.expect("server");

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    // 1 MiB chunks, 80 of them: past the client's 64 MiB limit, bounded all the same.
    let endless = std::iter::repeat_n(vec![b' '; 1 << 20], 80);
    let server = tokio::spawn(one_chunked_answer(listener, endless));
    let client = RegistryClient::new(&base, None, Duration::from_secs(20)).expect("client");
    let err = client.services().await.expect_err("over the limit");
    assert!(
        matches!(&err, ClientError::Transport(m) if m.contains("over the limit")),
        "{err}"
    );
    server.abort();
}
