//! The check-in loop (docs/ARCHITECTURE.md#agent): every interval, at this host's stable splay offset,
//! `POST /v2/checkin` with all of the host's endpoints; failed attempts are retried with
//! backoff within the round and never stop other loops. A re-check-in is made at once (after
//! a small random delay, so a fleet does not stampede) when the registry restarted or the
//! host's endpoints changed. Scheduling is pure ([`splay`], [`next_due`]).
//!
//! One endpoint the registry refuses must not cost the host its others (they would all
//! expire): when a batch is refused with a 4xx that may concern only some of its endpoints
//! (400, 403, 413, 422), it is split — by address first, as host tokens are per address,
//! then in halves — until every endpoint is either accepted or refused on its own. A
//! refused endpoint is logged once with the registry's reason, counted in
//! `tidings_agent_checkin_refused_endpoints_total`, and from then on sent in a batch of its
//! own each round, so it comes back by itself once the registry accepts it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use discovery::ClientError;
use schema::timefmt::unix_ms_now;
use schema::{Endpoint, EndpointKey};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::state::Shared;

/// A stable offset in `[0, interval)` from the host's identity: the same host checks in at
/// the same point of every interval, and a fleet spreads evenly across it.
pub fn splay(identity: &str, interval: Duration) -> Duration {
    let max = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
    if max == 0 {
        return Duration::ZERO;
    }
    let d = Sha256::digest(identity.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    Duration::from_millis(u64::from_be_bytes(first) % max)
}

/// The first wall-clock time (ms) after `now_ms` that is `offset` into an interval: check-ins
/// stay on the host's slot across restarts.
pub fn next_due(now_ms: u64, interval: Duration, offset: Duration) -> u64 {
    let interval = u64::try_from(interval.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let offset = u64::try_from(offset.as_millis()).unwrap_or(0) % interval;
    let base = now_ms - now_ms % interval + offset;
    if base > now_ms { base } else { base + interval }
}

/// The small random delay before an unscheduled re-check-in.
fn recheck_delay(interval: Duration, jitter: f64) -> Duration {
    (interval / 4)
        .min(Duration::from_secs(1))
        .mul_f64(jitter.clamp(0.0, 1.0))
}

/// Runs until `stop`.
pub async fn run_checkin(shared: Arc<Shared>, stop: CancellationToken) {
    let interval = shared.config.check_in_interval;
    let offset = splay(&shared.gossip_addr.to_string(), interval);
    tracing::debug!(?offset, ?interval, "check-in slot");
    let mut failing = false;
    let mut refused = Refused::default();
    // First round at once: the registry should hear about a new agent without waiting.
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            () = shared.recheck.notified() => {
                let delay = recheck_delay(interval, rand::random());
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
        let outcome = tokio::select! {
            () = stop.cancelled() => return,
            r = check_in_round(&shared, interval, &mut refused) => r,
        };
        match outcome {
            Ok(n) => {
                shared.metrics.checkins_ok.increment(1);
                if failing {
                    tracing::info!(endpoints = n, "check-in succeeded again");
                    shared.registry_back.notify_one();
                }
                failing = false;
            }
            Err(e) => {
                shared.metrics.checkins_failed.increment(1);
                if !failing {
                    tracing::warn!(error = %e, "check-in failed; will retry next interval");
                }
                failing = true;
                // The registry forgot us (restarted): check in again right away.
                if e.status() == Some(404) {
                    shared.recheck.notify_one();
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            _ = retry_deregistrations(&shared) => {}
        }
        let now = unix_ms_now();
        wait = Duration::from_millis(next_due(now, interval, offset).saturating_sub(now));
    }
}

/// Endpoints the registry refused on their own, with its reason.
type Refused = BTreeMap<EndpointKey, (Endpoint, String)>;

/// Whether a refusal of a batch may concern only some of its endpoints, so that splitting
/// the batch lets the others through. (401 — a bad token — and 404 concern them all.)
fn is_partial_refusal(e: &ClientError) -> bool {
    matches!(e.status(), Some(400 | 403 | 413 | 422))
}

/// How a batch refused as a whole is split: by address while it holds several (host tokens
/// are per address), then in halves.
fn split(batch: Vec<Endpoint>) -> (Vec<Endpoint>, Vec<Endpoint>) {
    let first_ip = batch.first().map(|e| e.ip);
    let (same, other): (Vec<_>, Vec<_>) =
        batch.iter().cloned().partition(|e| Some(e.ip) == first_ip);
    if !other.is_empty() {
        return (same, other);
    }
    let mut batch = batch;
    let rest = batch.split_off(batch.len() / 2);
    (batch, rest)
}

/// What a round of check-ins ended with.
#[derive(Debug, Default)]
struct Sent {
    accepted: usize,
    refused: Vec<(Endpoint, ClientError)>,
}

/// Checks `batch` in, splitting it on partial refusals until each endpoint is accepted or
/// refused alone. Stops at the first other error (unreachable registry, 401, …).
async fn send_split(
    shared: &Shared,
    interval: Duration,
    batch: Vec<Endpoint>,
    out: &mut Sent,
) -> Result<(), ClientError> {
    let mut todo = vec![batch];
    while let Some(batch) = todo.pop() {
        if batch.is_empty() {
            continue;
        }
        match send(shared, interval, &batch).await {
            Ok(()) => out.accepted += batch.len(),
            Err(e) if is_partial_refusal(&e) => {
                if batch.len() == 1 {
                    out.refused
                        .extend(batch.into_iter().next().map(|ep| (ep, e)));
                    continue;
                }
                let (a, b) = split(batch);
                todo.push(b);
                todo.push(a);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One request, retried with jittered backoff for at most about a quarter of the interval.
async fn send(shared: &Shared, interval: Duration, batch: &[Endpoint]) -> Result<(), ClientError> {
    let backoff = ExponentialBuilder::default()
        .with_min_delay((interval / 20).clamp(Duration::from_millis(50), Duration::from_secs(1)))
        .with_max_delay((interval / 8).max(Duration::from_millis(100)))
        .with_max_times(3)
        .with_jitter();
    let key = shared.signing.get().map(|s| s.public_key());
    let attempt = || async { shared.client.check_in_with_key(batch, key).await };
    let answer = attempt
        .retry(backoff)
        .when(ClientError::is_transient)
        .await?;
    if let (Some(signing), Some(cert)) = (shared.signing.get(), &answer.gossip_certificate) {
        signing.offer(&shared.gossip, cert, unix_ms_now()).await;
    }
    Ok(())
}

/// One round: the host's endpoints in one request — those refused before in another — split
/// as [`send_split`] does when refused. Fails only when nothing was accepted.
async fn check_in_round(
    shared: &Shared,
    interval: Duration,
    refused: &mut Refused,
) -> Result<usize, ClientError> {
    let endpoints = shared.local().all();
    // A refused endpoint that changed (or went) is tried afresh with the others.
    refused.retain(|_, (ep, _)| endpoints.contains(ep));
    let (known_bad, fresh): (Vec<_>, Vec<_>) = endpoints
        .into_iter()
        .partition(|e| refused.contains_key(&e.key()));
    let mut out = Sent::default();
    send_split(shared, interval, fresh, &mut out).await?;
    let retried: Vec<EndpointKey> = known_bad.iter().map(Endpoint::key).collect();
    match send_split(shared, interval, known_bad, &mut out).await {
        Ok(()) => {
            for key in retried {
                if !out.refused.iter().any(|(ep, _)| ep.key() == key) {
                    refused.remove(&key);
                    tracing::info!(endpoint = %key, "the registry accepts the endpoint again");
                }
            }
        }
        // The others are in: the retry of the refused ones waits for the next round.
        Err(e) if out.accepted > 0 => {
            tracing::debug!(error = %e, "retrying the refused endpoints failed");
        }
        Err(e) => return Err(e),
    }
    let accepted = out.accepted;
    let mut last = None;
    for (ep, e) in out.refused {
        let reason = e.to_string();
        let known = refused.get(&ep.key()).is_some_and(|(_, r)| *r == reason);
        if !known {
            shared.metrics.checkin_refused.increment(1);
            tracing::warn!(endpoint = %ep.key(), reason = %reason, "the registry refuses this endpoint; the host's other endpoints still check in");
            refused.insert(ep.key(), (ep, reason));
        }
        last = Some(e);
    }
    match last {
        Some(e) if accepted == 0 => Err(e),
        _ => Ok(accepted),
    }
}

/// Most withdrawn endpoints remembered for retry: a host has a handful; a bug or an abusive
/// local caller must not grow the set without bound.
const MAX_PENDING_DEREGISTRATIONS: usize = 4096;

/// Remembers that `ep` was withdrawn here, so its deletion at the registry is retried until
/// confirmed ([`retry_deregistrations`]).
pub fn note_withdrawn(shared: &Shared, ep: Endpoint) {
    let mut pending = shared
        .pending_deregistrations
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if pending.len() >= MAX_PENDING_DEREGISTRATIONS && !pending.contains_key(&ep.key()) {
        tracing::warn!(endpoint = %ep.key(), "too many unconfirmed deregistrations; this one is not retried");
        return;
    }
    pending.insert(ep.key(), ep);
}

/// Sends every deregistration the registry has not confirmed yet; returns how many remain.
///
/// A deletion sent while the registry is down or paused is lost, and the row stays there
/// until it expires — longer while self-preservation holds. Gossip's tombstone hides it only
/// while its owner is alive: once this agent stops, the registry's stale listing brings the
/// withdrawn host back into every view (fault campaign seeds 4290868262447371578 and
/// 14095139250465585113). So a withdrawal is retried every check-in round until the
/// registry answers 2xx or 404, unless the endpoint was registered here again meanwhile.
pub async fn retry_deregistrations(shared: &Shared) -> usize {
    let current: BTreeSet<EndpointKey> = shared.local().all().iter().map(Endpoint::key).collect();
    let todo: Vec<Endpoint> = {
        let mut pending = shared
            .pending_deregistrations
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pending.retain(|k, _| !current.contains(k));
        pending.values().cloned().collect()
    };
    for ep in todo {
        let res = shared
            .client
            .deregister(&ep.service, ep.ip, Some(ep.port))
            .await;
        let confirmed = match res {
            Ok(()) => {
                tracing::info!(endpoint = %ep.key(), "deregistered at the registry");
                true
            }
            Err(e) if e.status() == Some(404) => true,
            Err(e) => {
                tracing::debug!(endpoint = %ep.key(), error = %e, "deregistration not confirmed; retried next round");
                false
            }
        };
        if confirmed {
            shared
                .pending_deregistrations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&ep.key());
        }
    }
    shared
        .pending_deregistrations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .len()
}

/// Best-effort deregistration of `endpoints` from the registry (on SIGTERM).
pub async fn deregister_all(shared: &Shared, endpoints: &[schema::Endpoint]) {
    for ep in endpoints {
        match shared
            .client
            .deregister(&ep.service, ep.ip, Some(ep.port))
            .await
        {
            Ok(()) => tracing::info!(endpoint = %ep.key(), "deregistered"),
            Err(e) if e.status() == Some(404) => {}
            Err(e) => tracing::warn!(endpoint = %ep.key(), error = %e, "deregistration failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splay_is_stable_bounded_and_spread() {
        let i = Duration::from_secs(60);
        assert_eq!(splay("10.0.0.1:7702", i), splay("10.0.0.1:7702", i));
        let mut buckets = [0u32; 6];
        for n in 0..6000u32 {
            let s = splay(&format!("10.0.{}.{}:7702", n / 256, n % 256), i);
            assert!(s < i);
            buckets[usize::try_from(s.as_secs() / 10).expect("small")] += 1;
        }
        assert!(
            buckets.iter().all(|&b| (850..1150).contains(&b)),
            "{buckets:?}"
        );
        assert_eq!(splay("x", Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn next_due_keeps_the_slot() {
        let i = Duration::from_secs(60);
        let off = Duration::from_secs(7);
        assert_eq!(next_due(120_000, i, off), 127_000);
        assert_eq!(next_due(127_000, i, off), 187_000);
        assert_eq!(next_due(130_000, i, off), 187_000);
        assert_eq!(next_due(0, Duration::ZERO, off), 1);
    }

    #[test]
    fn refused_batches_split_by_address_then_in_halves() {
        let ep = |ip: &str, port: u16| {
            Endpoint::new(
                schema::ServiceName::new("web").expect("name"),
                ip.parse().expect("ip"),
                std::num::NonZeroU16::new(port).expect("port"),
            )
        };
        let mixed = vec![ep("10.0.0.1", 1), ep("10.0.0.2", 2), ep("10.0.0.1", 3)];
        let (a, b) = split(mixed);
        assert_eq!(a, [ep("10.0.0.1", 1), ep("10.0.0.1", 3)]);
        assert_eq!(b, [ep("10.0.0.2", 2)]);
        let (a, b) = split(a);
        assert_eq!((a.len(), b.len()), (1, 1));
        let (a, b) = split(vec![
            ep("10.0.0.1", 1),
            ep("10.0.0.1", 2),
            ep("10.0.0.1", 3),
        ]);
        assert_eq!((a.len(), b.len()), (1, 2));
        for status in [400, 403, 413, 422] {
            let e = ClientError::Status {
                status,
                code: String::new(),
                message: String::new(),
                retry_after: None,
            };
            assert!(is_partial_refusal(&e), "{status}");
        }
        for status in [401, 404, 429, 500] {
            let e = ClientError::Status {
                status,
                code: String::new(),
                message: String::new(),
                retry_after: None,
            };
            assert!(!is_partial_refusal(&e), "{status}");
        }
    }

    #[test]
    fn rechecks_wait_a_little_at_most_a_second() {
        assert_eq!(recheck_delay(Duration::from_secs(60), 0.0), Duration::ZERO);
        assert!(recheck_delay(Duration::from_secs(60), 0.99) < Duration::from_secs(1));
        assert!(recheck_delay(Duration::from_secs(1), 0.99) < Duration::from_millis(250));
    }
}
