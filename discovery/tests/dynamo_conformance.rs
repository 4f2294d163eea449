//! The one store conformance suite, run on both stores: the in-memory one and the DynamoDB
//! one against a real moto server (docs/ARCHITECTURE.md#stores: the in-memory store never stands in for
//! DynamoDB in these tests).

#[path = "support/moto.rs"]
mod moto;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use discovery::conformance;
use discovery::dynamo::init_table;
use discovery::{DynamoStore, MemoryStore};

/// A new store's first sync (stream iterators and a scan of an empty table) on moto.
const SYNC_WITHIN: Duration = Duration::from_secs(10);

#[tokio::test]
async fn memory_store_conforms() {
    conformance::run_all(|| async { MemoryStore::new() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamo_store_conforms() {
    let moto = moto::Moto::start();
    let tables = AtomicUsize::new(0);
    let started = Instant::now();
    // A fresh table per case: CreateTable is instant on moto, and cases stay independent.
    conformance::run_all(|| async {
        let cfg = moto.config(&format!(
            "conformance-{}",
            tables.fetch_add(1, Ordering::SeqCst)
        ));
        init_table(&cfg).await.expect("init_table");
        let store = DynamoStore::connect(&cfg).await.expect("connect");
        // Reads come from the mirror the table's stream keeps, as in a registry.
        store.follow_stream();
        let deadline = Instant::now() + SYNC_WITHIN;
        while !store.stream_followed() {
            assert!(Instant::now() < deadline, "the mirror did not sync");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        store
    })
    .await;
    eprintln!("DynamoDB conformance on moto took {:?}", started.elapsed());
}
