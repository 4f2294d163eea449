//! The attempt loop with a scripted transport: what both request paths get from it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::cluster::ListedHost;
use crate::config::{ClusterConfig, HealthCheckKind};
use crate::core::breaker::{BreakerLimits, CircuitBreaker};
use crate::io::upstream::{Connector, Upstream};

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 80))
}

/// A cluster without health checks or outlier detection whose hosts `10.0.0.<i>:80` are all
/// routable, `tune`d.
fn cluster_with(
    hosts: &[u8],
    limits: BreakerLimits,
    tune: impl FnOnce(&mut ClusterConfig),
) -> Arc<Cluster> {
    let mut cfg = ClusterConfig {
        name: "attempts".into(),
        service: "svc".into(),
        ..ClusterConfig::default()
    };
    cfg.health_check.kind = HealthCheckKind::None;
    cfg.outlier_detection.enabled = false;
    tune(&mut cfg);
    let connector = Connector::new(Duration::from_secs(1), None, None);
    let up = || Upstream::new(connector.clone(), false, Duration::from_secs(90), 8);
    let stopped = CancellationToken::new();
    stopped.cancel();
    let c = Cluster::new(
        cfg,
        None,
        CircuitBreaker::new(limits),
        up(),
        up(),
        TaskTracker::new(),
        stopped,
    );
    let listed = |&i: &u8| ListedHost {
        addr: addr(i),
        weight: 1,
        zone: None,
        canary: false,
        draining: false,
    };
    c.apply_listing(hosts.iter().map(listed).collect(), None, false);
    c
}

/// Two always-routable hosts, one retry per request.
fn cluster() -> Arc<Cluster> {
    cluster_with(&[1, 2], BreakerLimits::default(), |cfg| {
        cfg.retries.num_retries = 1;
    })
}

/// Answers each attempt with the next scripted result and records which host it went to.
#[derive(Default)]
struct Script {
    answers: VecDeque<Sent<u16, &'static str>>,
    hosts: Vec<SocketAddr>,
}

impl Transport for Script {
    type Request = ();
    type Response = u16;
    type Error = &'static str;

    fn prepare(&mut self, _: &HostHandle) -> Result<(), LocalAnswer> {
        Ok(())
    }

    async fn send(&mut self, host: &HostHandle, (): ()) -> Sent<u16, &'static str> {
        self.hosts.push(host.addr);
        self.answers.pop_front().unwrap_or(Sent::Timeout)
    }
}

async fn run(
    c: &Cluster,
    method: &Method,
    answers: Vec<Sent<u16, &'static str>>,
) -> (Result<u16, LocalAnswer>, Outcome, Vec<SocketAddr>) {
    let attempts = Attempts {
        cluster: c,
        method,
        hash: None,
        replayable: true,
        deadline: Instant::now() + Duration::from_secs(60),
    };
    let mut script = Script {
        answers: answers.into(),
        ..Script::default()
    };
    let mut out = Outcome::default();
    let result = attempts.run(&mut script, &mut out).await;
    (result.map(|(r, _)| r), out, script.hosts)
}

#[tokio::test(start_paused = true)]
async fn a_failed_attempt_is_retried_on_the_other_host() {
    let c = cluster();
    let answers = vec![Sent::Response(503, 503), Sent::Response(200, 200)];
    let (result, out, hosts) = run(&c, &Method::GET, answers).await;
    assert_eq!(result, Ok(200));
    assert_eq!(out.attempts, 2);
    assert_eq!(hosts.len(), 2);
    assert_ne!(hosts[0], hosts[1], "the retry avoids the host that failed");
    assert_eq!(out.upstream, Some(hosts[1]));
    assert_eq!(out.flag, None);
    assert_eq!(c.retries_in_flight(), 0, "the retry's slot is given back");
}

#[tokio::test(start_paused = true)]
async fn the_last_attempts_failure_is_answered_locally() {
    let c = cluster();
    let answers = vec![Sent::Reset("reset"), Sent::Reset("reset again")];
    let (result, out, _) = run(&c, &Method::GET, answers).await;
    assert_eq!(result, Err(LocalAnswer::UpstreamReset));
    assert_eq!((out.attempts, out.flag), (2, Some("upstream_reset")));

    // A POST is not retried: its one 503 is the answer.
    let (result, out, _) = run(&c, &Method::POST, vec![Sent::Response(503, 503)]).await;
    assert_eq!((result, out.attempts), (Ok(503), 1));
}

#[tokio::test(start_paused = true)]
async fn a_connection_limit_overflow_is_neither_retried_nor_blamed_on_the_host() {
    let c = cluster();
    let overflow = Sent::Connect {
        error: "limit",
        overflow: true,
    };
    let (result, out, _) = run(&c, &Method::GET, vec![overflow]).await;
    assert_eq!(result, Err(LocalAnswer::Overflow(Resource::Connections)));
    assert_eq!((out.attempts, out.flag), (1, Some("overflow")));

    let (result, out, _) = run(&c, &Method::GET, vec![Sent::Timeout]).await;
    assert_eq!(result, Err(LocalAnswer::UpstreamTimeout));
    assert_eq!(out.flag, Some("upstream_timeout"));
}

#[tokio::test(start_paused = true)]
async fn a_full_request_breaker_refuses_before_any_attempt() {
    let c = cluster();
    let mut out = Outcome::default();
    let held: Vec<_> = std::iter::from_fn(|| c.try_acquire(Resource::Requests).ok()).collect();
    assert!(!held.is_empty());
    let refused = admit(c.as_ref(), &mut out).err();
    assert_eq!(refused, Some(LocalAnswer::Overflow(Resource::Requests)));
    assert_eq!((out.attempts, out.flag), (0, Some("overflow")));
    drop(held);
    assert!(admit(c.as_ref(), &mut out).is_ok());
}

/// Three always-routable hosts, `num_retries` per request.
fn three_hosts(num_retries: u32) -> Arc<Cluster> {
    cluster_with(&[1, 2, 3], BreakerLimits::default(), |cfg| {
        cfg.retries.num_retries = num_retries;
    })
}

/// An attempt whose connection was refused: nothing was sent.
fn refused() -> Sent<u16, &'static str> {
    Sent::Connect {
        error: "connection refused",
        overflow: false,
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_connect_goes_on_to_every_host_not_tried_yet() {
    // Two of three hosts dead at once (campaign seed 12732142971970251098 killed two of eight):
    // with one retry, the first try and the retry may both land on dead hosts. A refused
    // connect sent nothing, so the request goes on to the hosts it has not tried.
    let c = three_hosts(1);
    let answers = vec![refused(), refused(), Sent::Response(200, 200)];
    let (result, out, hosts) = run(&c, &Method::GET, answers).await;
    assert_eq!(result, Ok(200));
    assert_eq!(out.attempts, 3);
    let mut distinct = hosts.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "each host tried once: {hosts:?}");
    assert_eq!(c.retries_in_flight(), 0);

    // Nothing was sent, so even a POST goes on.
    let (result, out, _) = run(&c, &Method::POST, vec![refused(), Sent::Response(201, 201)]).await;
    assert_eq!((result, out.attempts), (Ok(201), 2));
}

#[tokio::test(start_paused = true)]
async fn when_every_host_refuses_the_request_ends_after_one_counted_retry() {
    let c = three_hosts(1);
    // Three failovers' worth of hosts, then the policy's one retry (after a back-off, in
    // case a host is back), then the answer.
    let answers = (0..10).map(|_| refused()).collect();
    let (result, out, hosts) = run(&c, &Method::GET, answers).await;
    assert_eq!(result, Err(LocalAnswer::UpstreamConnect));
    assert_eq!(
        (out.attempts, out.flag),
        (4, Some("upstream_connect_failure"))
    );
    assert_eq!(hosts.len(), 4);

    // Retries turned off: no failover either.
    let c = three_hosts(0);
    let (result, out, _) = run(&c, &Method::GET, vec![refused(), Sent::Response(200, 200)]).await;
    assert_eq!(
        (result, out.attempts),
        (Err(LocalAnswer::UpstreamConnect), 1)
    );
}

mod retry_budget {
    use std::sync::Arc;
    use std::time::Duration;

    use http::Method;
    use tokio::time::Instant;

    use crate::cluster::{Cluster, RetrySlot};
    use crate::core::breaker::BreakerLimits;
    use crate::core::policy::Next;
    use crate::core::retry::AttemptOutcome;
    use crate::io::attempts::{Done, after_attempt};

    /// One always-routable host, five retries allowed per request, the given budget and
    /// `max_retries`.
    fn cluster(budget_percent: u32, min: u32, max_retries: u32) -> Arc<Cluster> {
        let limits = BreakerLimits {
            max_retries,
            ..BreakerLimits::default()
        };
        super::cluster_with(&[1], limits, |cfg| {
            cfg.retries.num_retries = 5;
            cfg.retries.budget_percent = budget_percent;
            cfg.retries.min_retry_concurrency = min;
        })
    }

    /// Attempt number `attempts` of one request ended with `status`: does it get a retry?
    fn after(c: &Cluster, status: u16, attempts: u32, retry: &mut Option<RetrySlot>) -> bool {
        let (_, guard) = c.pick(None, &[]).expect("a routable host");
        let far = Instant::now() + Duration::from_secs(60);
        let done = Done {
            attempt: (AttemptOutcome::Status(status), false),
            retries: attempts - 1,
            untried_left: false,
        };
        after_attempt(c, guard.host(), done, (&Method::GET, true), far, retry) != Next::Stop
    }

    #[tokio::test]
    async fn retries_in_flight_are_counted_and_bounded_by_the_budget() {
        let c = cluster(20, 3, 1_000);
        let mut active: Vec<_> = (0..30).map(|_| Cluster::start_request(c.clone())).collect();
        assert_eq!(c.active_requests(), 30);
        // 20 % of 30 active requests: six retries at once, whoever asks.
        let mut slots: Vec<Option<RetrySlot>> = (0..10).map(|_| None).collect();
        let granted: Vec<bool> = slots.iter_mut().map(|s| after(&c, 503, 1, s)).collect();
        assert_eq!(granted.iter().filter(|g| **g).count(), 6, "{granted:?}");
        assert_eq!(c.retries_in_flight(), 6);
        assert!(slots[..6].iter().all(Option::is_some) && slots[6..].iter().all(Option::is_none));
        assert_eq!(c.snapshot().active_retries, 6);

        // A retried attempt that succeeds gives its slot back, and another request may retry.
        assert!(!after(&c, 200, 2, &mut slots[0]));
        assert!(slots[0].is_none());
        assert_eq!(c.retries_in_flight(), 5);
        assert!(after(&c, 503, 1, &mut slots[6]));
        assert_eq!(c.retries_in_flight(), 6);
        // A retried attempt that fails again swaps its slot for the next retry's: a request
        // never holds two, so it does not crowd itself out.
        assert!(after(&c, 503, 2, &mut slots[1]));
        assert_eq!(c.retries_in_flight(), 6);

        // Requests that end early (a local answer, a client gone) drop their slots.
        slots.clear();
        assert_eq!(c.retries_in_flight(), 0);
        // Fewer active requests, smaller budget: 20 % of 10 is 2, the floor of 3 applies.
        active.truncate(10);
        assert_eq!(c.active_requests(), 10);
        let mut slots: Vec<Option<RetrySlot>> = (0..5).map(|_| None).collect();
        let granted = slots
            .iter_mut()
            .map(|s| after(&c, 503, 1, s))
            .filter(|g| *g)
            .count();
        assert_eq!(granted, 3);
        drop(active);
        assert_eq!(c.active_requests(), 0);
    }

    #[tokio::test]
    async fn max_retries_bounds_the_same_count() {
        // A budget far above the breaker's limit: the breaker decides.
        let c = cluster(100, 50, 2);
        let _active: Vec<_> = (0..50).map(|_| Cluster::start_request(c.clone())).collect();
        let mut slots: Vec<Option<RetrySlot>> = (0..5).map(|_| None).collect();
        let granted = slots
            .iter_mut()
            .map(|s| after(&c, 503, 1, s))
            .filter(|g| *g)
            .count();
        assert_eq!(granted, 2);
        assert_eq!(c.retries_in_flight(), 2);
        // Attempts out of retries, or not retryable, never take a slot.
        let mut none = None;
        assert!(!after(&c, 503, 6, &mut none));
        assert!(!after(&c, 404, 1, &mut none));
        assert_eq!(c.retries_in_flight(), 2);
    }
}
