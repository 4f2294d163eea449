use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;

const MAX: Duration = Duration::from_secs(300);

struct Server {
    coalesce: Duration,
    waiters: Arc<Semaphore>,
    draining: CancellationToken,
    tx: watch::Sender<u64>,
}

impl Server {
    fn new(permits: usize) -> Self {
        Server {
            coalesce: Duration::ZERO,
            waiters: Arc::new(Semaphore::new(permits)),
            draining: CancellationToken::new(),
            tx: watch::channel(7).0,
        }
    }

    fn cfg(&self) -> Blocking<'_> {
        Blocking {
            waiters: &self.waiters,
            limit: 1,
            max_wait: MAX,
            recheck: None,
            coalesce: self.coalesce,
            draining: &self.draining,
            refused: Counter::noop(),
            waiting: Gauge::noop(),
        }
    }

    /// One query holding `index`, reading the channel's value as the index.
    async fn query(&self, index: Option<u64>, wait: &str) -> Result<u64, ApiError> {
        let q = format!(
            "wait={wait}&index={}",
            index.map_or(String::new(), |i| i.to_string())
        );
        let params = BlockingParams::parse(Some(&q))?;
        let rx = self.tx.subscribe();
        block(
            self.cfg(),
            rx.clone(),
            params,
            || async { Ok(*rx.borrow()) },
            |v| *v,
        )
        .await
    }
}

#[test]
fn params_parse_and_refuse() {
    let p = BlockingParams::parse(Some("index=12&wait=30s&other=x")).expect("valid");
    assert_eq!(p.index, Some(12));
    assert_eq!(p.wait, Some(Duration::from_secs(30)));
    assert_eq!(
        BlockingParams::parse(Some("index=&wait=")).expect("blank"),
        BlockingParams::default()
    );
    assert_eq!(
        BlockingParams::parse(None).expect("none"),
        BlockingParams::default()
    );
    assert!(BlockingParams::parse(Some("index=x")).is_err());
    assert!(BlockingParams::parse(Some("wait=soon")).is_err());
}

#[tokio::test(start_paused = true)]
async fn answers_at_once_without_a_current_index() {
    let s = Server::new(1);
    let t0 = Instant::now();
    assert_eq!(s.query(None, "30s").await.expect("answer"), 7);
    assert_eq!(s.query(Some(6), "30s").await.expect("answer"), 7);
    assert_eq!(t0.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn wakes_on_a_change() {
    let s = Server::new(1);
    let tx = s.tx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        tx.send_replace(8);
    });
    let t0 = Instant::now();
    assert_eq!(s.query(Some(7), "30s").await.expect("answer"), 8);
    assert_eq!(t0.elapsed(), Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn times_out_within_a_sixteenth_of_the_wait() {
    let s = Server::new(1);
    let t0 = Instant::now();
    assert_eq!(s.query(Some(7), "32s").await.expect("answer"), 7);
    let took = t0.elapsed();
    assert!(
        (Duration::from_secs(30)..=Duration::from_secs(34)).contains(&took),
        "{took:?}"
    );
    // A wait past the cap is held to it.
    let t0 = Instant::now();
    s.query(Some(7), "1h").await.expect("answer");
    assert!(t0.elapsed() <= MAX + MAX / 16, "{:?}", t0.elapsed());
}

#[tokio::test(start_paused = true)]
async fn refuses_past_the_waiter_limit_and_drains() {
    let s = Arc::new(Server::new(1));
    let first = tokio::spawn({
        let s = s.clone();
        async move { s.query(Some(7), "30s").await }
    });
    // Let the first query take the only permit.
    while s.waiters.available_permits() > 0 {
        tokio::task::yield_now().await;
    }
    let refused = s.query(Some(7), "30s").await;
    assert!(
        matches!(refused, Err(ApiError::TooManyWaiters { limit: 1, .. })),
        "{refused:?}"
    );
    let t0 = Instant::now();
    s.draining.cancel();
    assert_eq!(first.await.expect("join").expect("answer"), 7);
    assert_eq!(t0.elapsed(), Duration::ZERO);
}

/// A change sooner than the hold after the query arrived is answered when the hold ends, with
/// every change made until then; one later than the hold is answered at once.
#[tokio::test(start_paused = true)]
async fn a_change_soon_after_arrival_waits_out_the_hold_and_carries_the_rest() {
    let mut s = Server::new(1);
    s.coalesce = Duration::from_millis(200);
    let tx = s.tx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.send_replace(8);
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send_replace(9);
    });
    let t0 = Instant::now();
    assert_eq!(s.query(Some(7), "30s").await.expect("answer"), 9);
    assert_eq!(t0.elapsed(), Duration::from_millis(200));

    // The query has waited past the hold when the change comes: no delay.
    let tx = s.tx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        tx.send_replace(10);
    });
    let t0 = Instant::now();
    assert_eq!(s.query(Some(9), "30s").await.expect("answer"), 10);
    assert_eq!(t0.elapsed(), Duration::from_secs(3));
}

/// The hold ends early on drain and never outlasts the query's own wait.
#[tokio::test(start_paused = true)]
async fn the_hold_yields_to_drain_and_to_the_wait() {
    let mut s = Server::new(1);
    s.coalesce = Duration::from_secs(10);
    let s = Arc::new(s);
    let tx = s.tx.clone();
    let draining = s.draining.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.send_replace(8);
        tokio::time::sleep(Duration::from_millis(100)).await;
        draining.cancel();
    });
    let t0 = Instant::now();
    assert_eq!(s.query(Some(7), "30s").await.expect("answer"), 8);
    assert_eq!(t0.elapsed(), Duration::from_millis(110));

    let s = Server {
        coalesce: Duration::from_secs(10),
        ..Server::new(1)
    };
    let tx = s.tx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.send_replace(8);
    });
    let t0 = Instant::now();
    assert_eq!(s.query(Some(7), "1s").await.expect("answer"), 8);
    // The jittered wait is at most 1/16 over; tokio's timer fires on whole milliseconds,
    // rounding a deadline up (a wait of 1.0624999 s ends at 1.063 s: seen in CI).
    let timer_resolution = Duration::from_millis(1);
    assert!(
        t0.elapsed() <= Duration::from_secs(1) + Duration::from_secs(1) / 16 + timer_resolution
    );
}
