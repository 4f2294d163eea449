//! Real nodes on 127.0.0.1 UDP/TCP sockets (port 0): propagation, a crash and a rejoin with
//! a new epoch, a late node catching up through repair, hostile input, key rotation.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use gossip::{
    GossipConfig, GossipHandle, KeyRing, NodeId, Snapshot, SnapshotEntry, Source, generate_key, run,
};
use schema::{Endpoint, ServiceName};
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

fn endpoint(i: usize) -> Endpoint {
    let service = ServiceName::new(format!("svc-{i}")).unwrap();
    Endpoint::new(
        service,
        "10.9.0.1".parse().unwrap(),
        NonZeroU16::new(8000 + i as u16).unwrap(),
    )
}

fn config(keys: &[String], seeds: Vec<SocketAddr>, bind: SocketAddr) -> GossipConfig {
    GossipConfig {
        keys: keys.to_vec(),
        insecure: false,
        seeds,
        ..GossipConfig::for_tests(bind)
    }
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Polls `cond` until it holds or `limit` passes; panics with `what` on timeout.
async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        sleep(Duration::from_millis(20)).await;
    }
}

fn sees(h: &GossipHandle, ep: &Endpoint) -> bool {
    h.view()
        .borrow()
        .endpoints
        .iter()
        .any(|e| *e.endpoint == *ep && matches!(e.source, Source::Gossip { .. }))
}

async fn start(
    keys: &[String],
    seeds: Vec<SocketAddr>,
    bind: SocketAddr,
    local: Vec<Endpoint>,
    stop: &CancellationToken,
) -> GossipHandle {
    run(config(keys, seeds, bind), local, stop.child_token())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_propagate_hide_on_crash_return_on_rejoin_and_late_node_repairs() {
    let keys = vec![generate_key()];
    let stop = CancellationToken::new();
    let first = start(&keys, vec![], any_port(), vec![endpoint(0)], &stop).await;
    let seed = first.id().addr;
    let mut nodes = vec![first];
    for i in 1..5 {
        nodes.push(start(&keys, vec![seed], any_port(), vec![endpoint(i)], &stop).await);
    }
    eventually("all rows everywhere", Duration::from_secs(20), || {
        nodes.iter().all(|h| (0..5).all(|i| sees(h, &endpoint(i))))
    })
    .await;

    // Crash node 4: once SWIM declares it down its row disappears everywhere.
    let victim = nodes.pop().unwrap();
    let victim_id: NodeId = victim.id();
    victim.crash().await.unwrap();
    victim.closed().await;
    eventually(
        "crashed owner's row hidden",
        Duration::from_secs(20),
        || nodes.iter().all(|h| !sees(h, &endpoint(4))),
    )
    .await;

    // It comes back on the same address with a new epoch: visible again.
    let back = start(&keys, vec![seed], victim_id.addr, vec![endpoint(4)], &stop).await;
    assert!(back.id().epoch > victim_id.epoch);
    nodes.push(back);
    eventually(
        "rejoined owner's row visible",
        Duration::from_secs(20),
        || nodes.iter().all(|h| sees(h, &endpoint(4))),
    )
    .await;

    // A node started now has missed every broadcast: it catches up through repair.
    let late = start(&keys, vec![], any_port(), vec![], &stop).await;
    late.join(vec![seed]).await.unwrap();
    eventually("late node has every row", Duration::from_secs(20), || {
        (0..5).all(|i| sees(&late, &endpoint(i)))
    })
    .await;
    assert!(late.metrics().repair_rows_applied > 0, "{}", late.metrics());
    for h in nodes.iter().chain([&late]) {
        assert_eq!(h.metrics().dropped_total(), 0, "{}", h.metrics());
    }
    stop.cancel();
    for h in nodes.iter().chain([&late]) {
        h.closed().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_dropped_and_counted() {
    let keys = vec![generate_key()];
    let stop = CancellationToken::new();
    let a = start(&keys, vec![], any_port(), vec![endpoint(0)], &stop).await;
    let addr = a.id().addr;
    let sock = tokio::net::UdpSocket::bind(any_port()).await.unwrap();
    // Random bytes, a truncated packet, a packet sealed under an unknown key.
    sock.send_to(&[7u8; 300], addr).await.unwrap();
    sock.send_to(&[1, 2, 3], addr).await.unwrap();
    let other = GossipConfig {
        keys: vec![generate_key()],
        ..config(&[], vec![addr], any_port())
    };
    let b = run(other, vec![], stop.child_token()).await.unwrap();
    eventually("udp drops counted", Duration::from_secs(10), || {
        let m = a.metrics();
        m.dropped_unknown_key >= 2 && m.dropped_truncated >= 1
    })
    .await;
    // TCP: an old-style length prefix claiming 4 GiB (not the stream's hello), a chunk
    // length beyond one chunk, and a chunk no key opens. Each is refused before more than
    // one chunk buffer is spent on it.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let mut s2 = tokio::net::TcpStream::connect(addr).await.unwrap();
    s2.write_all(b"TDR\x02challnge\xff\xff").await.unwrap();
    let mut s3 = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut junk = b"TDR\x02challnge\x00\x64".to_vec();
    junk.extend_from_slice(&[9u8; 100]);
    s3.write_all(&junk).await.unwrap();
    eventually("tcp drops counted", Duration::from_secs(10), || {
        let m = a.metrics();
        m.dropped_bad_stream >= 1 && m.dropped_oversize >= 1 && m.dropped_unknown_key >= 3
    })
    .await;
    assert!(
        b.members().is_empty(),
        "a node with the wrong key never joins"
    );
    // Still healthy: a node with the right key joins and learns its row.
    let c = start(&keys, vec![addr], any_port(), vec![], &stop).await;
    eventually("still serving", Duration::from_secs(10), || {
        sees(&c, &endpoint(0))
    })
    .await;
    stop.cancel();
    a.closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_loses_nothing() {
    let (old, new) = (generate_key(), generate_key());
    let stop = CancellationToken::new();
    let old_only = vec![old.clone()];
    let first = start(&old_only, vec![], any_port(), vec![endpoint(0)], &stop).await;
    let seed = first.id().addr;
    let mut nodes = vec![first];
    for i in 1..4 {
        nodes.push(start(&old_only, vec![seed], any_port(), vec![endpoint(i)], &stop).await);
    }
    let all_see = |nodes: &[GossipHandle], n: usize| {
        nodes.iter().all(|h| (0..n).all(|i| sees(h, &endpoint(i))))
    };
    eventually("initial rows", Duration::from_secs(20), || {
        all_see(&nodes, 4)
    })
    .await;
    let steps = [
        vec![old.clone(), new.clone()],
        vec![new.clone(), old.clone()],
        vec![new.clone()],
    ];
    for (step, ring) in steps.iter().enumerate() {
        for h in &nodes {
            h.set_key_ring(Some(KeyRing::parse(ring).unwrap()))
                .await
                .unwrap();
        }
        // A change during each step must still reach everyone.
        let i = 4 + step;
        nodes[step]
            .publish_local(vec![endpoint(step), endpoint(i)])
            .await
            .unwrap();
        eventually(
            "row published during rotation",
            Duration::from_secs(20),
            || nodes.iter().all(|h| sees(h, &endpoint(i))),
        )
        .await;
    }
    // Let SWIM traffic run on the new key alone for a while.
    let seen: Vec<u64> = nodes.iter().map(|h| h.metrics().packets_in).collect();
    eventually("traffic under the new key", Duration::from_secs(10), || {
        nodes
            .iter()
            .zip(&seen)
            .all(|(h, before)| h.metrics().packets_in >= before + 20)
    })
    .await;
    for h in &nodes {
        let m = h.metrics();
        assert_eq!(m.dropped_total(), 0, "{m}");
        assert_eq!(
            h.members().iter().filter(|m| m.active).count(),
            3,
            "nobody was declared down"
        );
    }
    stop.cancel();
}

/// A registry answer of many services reaches gossip as one batch: every snapshot is held,
/// and the view is republished once for the batch, not once per service.
#[tokio::test]
async fn a_batch_of_registry_snapshots_is_one_view_publish() {
    let stop = CancellationToken::new();
    let node = start(
        &[generate_key()],
        vec![],
        any_port(),
        vec![endpoint(300)],
        &stop,
    )
    .await;
    eventually("the first view", Duration::from_secs(5), || {
        node.metrics().views_published >= 1
    })
    .await;
    let before = node.metrics().views_published;
    let batch: Vec<Snapshot> = (0..200)
        .map(|i| {
            let ep = endpoint(i);
            Snapshot {
                service: ep.service.clone(),
                generated_at_ms: gossip::epoch_now(),
                entries: vec![SnapshotEntry {
                    endpoint: ep.into(),
                    last_check_in_ms: 1,
                }],
            }
        })
        .collect();
    node.apply_registry_snapshots(batch).await.unwrap();
    eventually("every snapshot held", Duration::from_secs(5), || {
        node.view().borrow().snapshots.len() == 200
    })
    .await;
    assert_eq!(node.metrics().views_published - before, 1);
    stop.cancel();
}
