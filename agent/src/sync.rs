//! Registry sync: blocking queries on `/v2/catalog`; each successful answer becomes
//! per-service registry snapshots fed into gossip, and the registry's `tidings-agent`
//! listing brings in agents gossip does not know yet. The decisions — what an answer may add
//! or remove, whom to join, how long to wait before the next attempt — are pure functions
//! ([`plan`], [`seeds_to_join`], [`Pacer`]); [`run_sync`] is the IO shell.
//!
//! What an answer is authoritative for: a normal answer is the whole truth about every
//! registry-derived entry this agent holds — gossip's snapshots *and* registry entries still
//! served from the disk cache — so it adds, updates and removes, down to emptying services
//! it no longer lists. An answer from a registry that restarted empty and is still warming
//! up is only a lower bound: per service it yields the union of what we hold and what it
//! lists (its version of an entry wins), so it adds and updates and never removes. Live
//! gossip rows are not registry-derived and are never removed by either.
//!
//! On the wire the agent asks for deltas (`delta=true`, docs/API.md#catalog-deltas): it keeps
//! the registry's catalog as last taken ([`Replica`]), applies each delta to it, checks the
//! digest, and hands the rebuilt whole catalog to [`plan`] exactly where a whole answer
//! would go, so nothing downstream knows deltas exist. Any doubt — an error, a warming
//! registry, a delta from another base, a digest that does not match, or the registry no
//! longer holding our view — ends with a whole catalog, counted by reason.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use discovery::ReadMeta;
use discovery::delta::DeltaError;
use gossip::sign::Signature;
use gossip::{MemberInfo, Snapshot, SnapshotEntry};
use schema::api::Catalog;
use schema::{EndpointKey, ServiceName};
use tokio_util::sync::CancellationToken;

use crate::config::AGENT_SERVICE;
use crate::replica::{Answer, Replica};
use crate::state::Shared;
use crate::view::{Origin, Provenance};

/// What to do with one catalog answer: feed `snapshots` into gossip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The registry restarted empty and is still warming up: the answer may be incomplete,
    /// so the snapshots only add to and update what we hold.
    pub warming: bool,
    /// Services whose hosts changed; when not warming, also an empty snapshot for every
    /// service we hold that the registry no longer lists.
    pub snapshots: Vec<Snapshot>,
    /// Hosts the registry listed that do not validate (skipped, counted).
    pub invalid: usize,
    /// When not warming and the answer is whole: every key it lists, the truth the disk cache
    /// gives way to.
    pub listed: Option<BTreeSet<EndpointKey>>,
}

/// A registry entry served only from the disk cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedEntry {
    pub entry: SnapshotEntry,
    /// It came from a registry-dated snapshot, not from a lower bound: only such an entry
    /// is real registry data (see [`lower_bound_date`]).
    pub dated: bool,
}

/// Decides what a catalog answer does to what we hold: `held`, gossip's newest snapshot per
/// service, and `cached`, the registry entries still served only from the disk cache. A
/// failed answer never reaches `plan`, so it cannot replace anything.
pub fn plan(
    catalog: &Catalog,
    meta: &ReadMeta,
    held: &[impl Borrow<Snapshot>],
    cached: &[CachedEntry],
) -> Plan {
    plan_scoped(&Replica::from(catalog.clone()), meta, held, cached, None)
}

/// [`plan`] for a catalog rebuilt from a delta that touched only the services in `scope`
/// (`None`: a whole answer). Every other service is as the previous answer left it, so it is
/// neither converted nor compared again: at 100 000 endpoints that was 50 ms of the agent's
/// one worker on every answer, the empty ones the blocking query returns every 30 s
/// included — the lookup latency tail. While the disk cache still serves registry entries
/// the whole catalog is planned anyway: their keys must be confirmed or retired.
pub fn plan_scoped(
    catalog: &Replica,
    meta: &ReadMeta,
    held: &[impl Borrow<Snapshot>],
    cached: &[CachedEntry],
    scope: Option<&BTreeSet<String>>,
) -> Plan {
    let scope = scope.filter(|_| cached.is_empty());
    let in_scope = |name: &str| scope.is_none_or(|s| s.contains(name));
    let warming = catalog.warming || meta.warming;
    let at = catalog.generated_at_ms;
    let held: BTreeMap<&ServiceName, &Snapshot> = held
        .iter()
        .map(|s| (&s.borrow().service, s.borrow()))
        .collect();
    let mut cached_by: BTreeMap<&ServiceName, Vec<&CachedEntry>> = BTreeMap::new();
    for e in cached {
        cached_by
            .entry(&e.entry.endpoint.service)
            .or_default()
            .push(e);
    }
    let (listed, invalid) = catalog.listed(in_scope);
    // Only a whole answer names every key the registry lists (a delta's plan sees only the
    // services it touched).
    let keys = (!warming && scope.is_none()).then(|| {
        listed
            .values()
            .flatten()
            .map(|e| e.endpoint.key())
            .collect()
    });
    let mut fresh: BTreeMap<ServiceName, Snapshot> = BTreeMap::new();
    for (service, entries) in listed {
        let (entries, generated_at_ms) = if warming {
            let held = held.get(&service).copied();
            let cached = cached_by.get(&service);
            (
                lower_bound(held, cached, entries),
                lower_bound_date(held, cached, at),
            )
        } else {
            (entries, at)
        };
        let snapshot = Snapshot {
            service: service.clone(),
            generated_at_ms,
            entries,
        };
        fresh.insert(service, snapshot);
    }
    if !warming {
        let gone = held
            .iter()
            .filter(|(service, s)| !s.entries.is_empty() && in_scope(service.as_str()))
            .map(|(service, _)| *service)
            .chain(cached_by.keys().copied());
        empty_unlisted(&mut fresh, gone, at);
    }
    // Unchanged hosts need no new snapshot: re-check-ins only move `last_check_in`, and
    // re-gossiping every service on every answer would be pure overhead. Changed hosts get
    // one whatever the held snapshot's date: gossip stamps a direct answer after the
    // snapshot it holds, so an honest answer still replaces one from a replica whose clock
    // ran ahead. A service with entries from the disk cache always gets one from an
    // authoritative answer: only a snapshot at least as new as the cached entries makes them
    // give way, even when gossip already holds an older snapshot with the same hosts. So
    // does a service held only as a lower bound: the registry's own listing replaces the
    // union this agent made while it warmed up, and only it can carry the registry's
    // signature to peers that require one.
    let snapshots = fresh
        .into_values()
        .filter(|s| {
            let held = held.get(&s.service);
            (!warming
                && (cached_by.contains_key(&s.service) || held.is_some_and(|h| h.is_lower_bound())))
                || held.is_none_or(|old| !same_hosts(old, s))
        })
        .collect();
    Plan {
        warming,
        snapshots,
        invalid,
        listed: keys,
    }
}

/// A warming answer's entries for one service: a lower bound, so it starts from what we hold
/// (a cache entry is newer than the held snapshot, or it would have given way), then lets
/// the answer win per key.
fn lower_bound(
    held: Option<&Snapshot>,
    cached: Option<&Vec<&CachedEntry>>,
    listed: Vec<SnapshotEntry>,
) -> Vec<SnapshotEntry> {
    let mut union: BTreeMap<EndpointKey, SnapshotEntry> = BTreeMap::new();
    let ours = held.into_iter().flat_map(|s| s.entries.iter());
    let from_cache = cached.into_iter().flatten().map(|c| &c.entry);
    for e in ours.chain(from_cache).cloned().chain(listed) {
        union.insert(e.endpoint.key(), e);
    }
    union.into_values().collect()
}

/// The date of a warming answer's lower bound for one service: the answer's own when this
/// agent holds real registry data of the service (the union then holds everything it knew),
/// else [`gossip::LOWER_BOUND_MS`]. An agent restarted without its disk cache holds nothing
/// before gossip repair brings its peers' snapshots; dated like the answer, the lower bound
/// alone would outrank their fuller snapshots and spread over them, hiding every host that
/// had not checked in again since the registry restarted (fault campaign, seed
/// 12860982494713673050). Dated at the start of time it is served here at once, fills the
/// service on peers that hold nothing of it either (a whole fleet started cold), and gives
/// way to any snapshot a registry dated. Cached entries count as knowing only when they came
/// from a registry-dated snapshot: an agent restarted with a cache of lower bounds knows no
/// more than its peers' lower bounds, which may hold hosts its cache lacks.
fn lower_bound_date(held: Option<&Snapshot>, cached: Option<&Vec<&CachedEntry>>, at: u64) -> u64 {
    let knows = held.is_some_and(|s| !s.is_lower_bound())
        || cached.is_some_and(|c| c.iter().any(|c| c.dated));
    if knows { at } else { gossip::LOWER_BOUND_MS }
}

/// Adds an empty snapshot, dated `at`, for each of the `gone` services the answer did not
/// list: an authoritative answer empties them.
fn empty_unlisted<'a>(
    fresh: &mut BTreeMap<ServiceName, Snapshot>,
    gone: impl Iterator<Item = &'a ServiceName>,
    at: u64,
) {
    for service in gone {
        if !fresh.contains_key(service) {
            let empty = Snapshot {
                service: service.clone(),
                generated_at_ms: at,
                entries: Vec::new(),
            };
            fresh.insert(service.clone(), empty);
        }
    }
}

/// The registry entries the view serves only from the disk cache: what an authoritative
/// answer must confirm or remove, and what a warming answer must not drop.
fn cached_registry_entries(view: &crate::view::MergedView) -> Vec<CachedEntry> {
    view.all_hosts()
        .filter(|h| h.provenance == Provenance::Cache)
        .filter_map(|h| match h.origin {
            Origin::Registry { generated_at_ms } => Some(CachedEntry {
                entry: SnapshotEntry {
                    endpoint: h.endpoint.clone(),
                    last_check_in_ms: h.last_check_in_ms,
                },
                dated: !gossip::is_lower_bound_date(generated_at_ms),
            }),
            Origin::Row { .. } => None,
        })
        .collect()
}

fn same_hosts(a: &Snapshot, b: &Snapshot) -> bool {
    let mut x: Vec<_> = a.entries.iter().map(|e| &e.endpoint).collect();
    let mut y: Vec<_> = b.entries.iter().map(|e| &e.endpoint).collect();
    x.sort_by_key(|e| e.key());
    y.sort_by_key(|e| e.key());
    x == y
}

/// Agents the registry lists that gossip should announce to: all of them when this agent is
/// alone, else those SWIM has never heard of (e.g. two halves that started while the
/// registry was down, each without seeds).
pub fn seeds_to_join(catalog: &Replica, me: SocketAddr, members: &[MemberInfo]) -> Vec<SocketAddr> {
    let alone = !members.iter().any(|m| m.active);
    let known: BTreeSet<SocketAddr> = members.iter().map(|m| m.id.addr).collect();
    let (agents, _) = catalog.listed(|s| s == AGENT_SERVICE);
    agents
        .into_values()
        .flatten()
        .map(|e| e.endpoint.socket_addr())
        .filter(|a| *a != me && (alone || !known.contains(a)))
        .collect()
}

/// Pacing of sync attempts. `jitter` arguments are uniform in `[0, 1)`.
#[derive(Debug, Clone)]
pub struct Pacer {
    pub poll_interval: Duration,
    pub retry_max: Duration,
    failures: u32,
}

impl Pacer {
    pub fn new(poll_interval: Duration, retry_max: Duration) -> Self {
        Pacer {
            poll_interval,
            retry_max,
            failures: 0,
        }
    }

    /// After a failed attempt: 1 s, 2 s, 4 s … up to `retry_max`, ± 10 %.
    pub fn after_failure(&mut self, jitter: f64) -> Duration {
        let base = Duration::from_secs(1)
            .saturating_mul(1u32 << self.failures.min(16))
            .min(self.retry_max);
        self.failures = self.failures.saturating_add(1);
        spread(base, jitter)
    }

    /// After a success. Returns whether the previous attempts had failed (the registry is
    /// back: worth a re-check-in).
    pub fn after_success(&mut self) -> bool {
        std::mem::take(&mut self.failures) > 0
    }

    /// When the registry answered at once although we passed a current index, it cannot
    /// block: poll every `poll_interval` ± 10 % instead.
    pub fn poll(&self, jitter: f64) -> Duration {
        spread(self.poll_interval, jitter)
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// `base` ± 10 %.
fn spread(base: Duration, jitter: f64) -> Duration {
    base.mul_f64(0.9 + 0.2 * jitter.clamp(0.0, 1.0))
}

/// While the registry warms up, ask again this often (± 10 %, so agents that saw the
/// restart together do not poll in step). Warm-up ends by time, not by an index change, so
/// a blocking query would sleep through its end; and during warm-up nearly every check-in
/// moves the index, so blocking queries would return after each one, from every agent.
/// A plain poll bounds the load at one catalog read per agent per period, and a host that
/// checks in is listed by every agent one poll later.
fn warming_poll(check_in_interval: Duration, jitter: f64) -> Duration {
    let base = (check_in_interval / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    spread(base, jitter)
}

/// The sync loop, and a watcher that notes when gossip brings a newer registry snapshot
/// (for the freshness header): both run until `stop`.
pub async fn run_sync(shared: Arc<Shared>, stop: CancellationToken) {
    tokio::join!(sync_loop(&shared, &stop), watch_relayed(&shared, &stop));
}

async fn watch_relayed(shared: &Shared, stop: &CancellationToken) {
    let mut rx = shared.gossip.view();
    loop {
        shared.note_relayed();
        tokio::select! {
            () = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

async fn sync_loop(shared: &Shared, stop: &CancellationToken) {
    let cfg = &shared.config;
    let mut state = SyncState {
        pacer: Pacer::new(cfg.poll_interval, cfg.sync_retry_max),
        index: None,
        replica: None,
        full_reason: "start",
        warming_noted: false,
    };
    // Only a signing agent asks for the registry's signatures: they cost the registry one
    // signature per listing it sends.
    let signed = cfg.gossip.signing != gossip::sign::SigningMode::Off;
    loop {
        let started = Instant::now();
        let sent_ms = shared.now_ms();
        shared.freshness().query_sent(
            sent_ms,
            state.index.map(|_| cfg.sync_wait),
            cfg.request_timeout,
        );
        let answer = tokio::select! {
            () = stop.cancelled() => return,
            r = shared.client.catalog_changes_as::<Answer>(state.index, Some(cfg.sync_wait), signed) => r,
        };
        let pause = match answer {
            Err(e) => Some(state.failed(shared, &e)),
            // A delta that cannot be applied: fetch the whole catalog at once.
            Ok((changes, meta)) => match state.take(shared, changes) {
                None => None,
                Some(t) => {
                    let sent = Sent {
                        at_ms: sent_ms,
                        started,
                    };
                    let catalog = &t.replica;
                    let scope = t.scope.as_ref();
                    let pause = state.answered(shared, catalog, &meta, sent, scope).await;
                    state.keep(shared, t.replica, t.verified);
                    pause
                }
            },
        };
        if let Some(pause) = pause {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
                // A successful check-in after failures: the registry is back, sync now.
                () = shared.registry_back.notified() => {}
            }
        }
    }
}

/// What the sync loop carries from one answer to the next.
struct SyncState {
    pacer: Pacer,
    /// The index to block on; `None`: ask for the catalog as it is now.
    index: Option<u64>,
    /// The registry's catalog at `index`, verified by its digest: the base of the next delta.
    replica: Option<Replica>,
    /// Why the next whole catalog will be fetched, if one is (see
    /// [`crate::metrics::FULL_REASONS`]).
    full_reason: &'static str,
    /// The registry's warm-up was logged (and a re-check-in asked for) since it last ended.
    warming_noted: bool,
}

/// The registry's catalog as an answer leaves it (see [`SyncState::take`]).
struct Taken {
    replica: Replica,
    /// Its digest matched the registry's.
    verified: bool,
    /// The services a delta touched; `None` for a whole catalog.
    scope: Option<BTreeSet<String>>,
}

/// When a catalog query went out: registry clock (ms) for freshness, and local time.
struct Sent {
    at_ms: u64,
    started: Instant,
}

impl SyncState {
    /// A failed query: serve the last view, and retry after a backoff (returned).
    fn failed(&mut self, shared: &Shared, e: &discovery::ClientError) -> Duration {
        shared.freshness().failed();
        shared.metrics.sync_errors.increment(1);
        shared.set_registry_ok(false);
        self.forget(match e {
            discovery::ClientError::Decode(_) => "decode",
            _ => "error",
        });
        let pause = self.pacer.after_failure(rand::random());
        if self.pacer.failures() == 1 {
            tracing::warn!(error = %e, retry_in = ?pause, "registry sync failed; serving the last view");
        } else {
            tracing::debug!(error = %e, retry_in = ?pause, "registry sync failed again");
        }
        pause
    }

    /// Asks for the whole catalog next, without blocking, counted under `reason`.
    fn forget(&mut self, reason: &'static str) {
        self.index = None;
        self.replica = None;
        self.full_reason = reason;
    }

    /// The registry's catalog an answer gives — whole, or the held one with the delta applied
    /// — and whether its digest matched. `None`: a delta that could not be applied (from
    /// another base, or rebuilding something else than the registry holds).
    fn take(&mut self, shared: &Shared, mut changes: Answer) -> Option<Taken> {
        let held = self.replica.take();
        if changes.full {
            let reason = if held.is_some() {
                "unknown_index"
            } else {
                self.full_reason
            };
            shared.metrics.full_sync(reason);
            let digest = std::mem::take(&mut changes.digest);
            let replica = Replica::whole(changes);
            let verified = replica.digest_hex() == digest;
            if !verified {
                // Still the registry's whole answer, taken as before deltas existed; it is
                // just no base for one (an empty digest: a registry from before deltas).
                tracing::debug!(digest, "whole catalog without a matching digest");
            }
            return Some(Taken {
                replica,
                verified,
                scope: None,
            });
        }
        let Some(held) = held else {
            // No verified base: after a whole catalog without a matching digest, say so.
            let digest = self.full_reason == "digest";
            self.forget(if digest { "digest" } else { "base" });
            return None;
        };
        let scope = changes.scope();
        match held.apply(changes) {
            Ok(replica) => {
                shared.metrics.sync_deltas.increment(1);
                Some(Taken {
                    replica,
                    verified: true,
                    scope: Some(scope),
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "registry delta not applied; fetching the whole catalog");
                self.forget(match e {
                    DeltaError::Digest { .. } => "digest",
                    _ => "base",
                });
                None
            }
        }
    }

    /// After an answer was handed on: keep its catalog as the base of the next delta when it
    /// is verified and the next query blocks on its index.
    fn keep(&mut self, shared: &Shared, replica: Replica, verified: bool) {
        shared.set_registry_digest(Some(replica.digest_hex()));
        if !verified {
            self.full_reason = "digest";
        } else if self.index == Some(replica.index) {
            self.replica = Some(replica);
        }
    }

    /// An answer: plans it, feeds it into gossip, and returns the pause before the next
    /// query (`None`: at once).
    async fn answered(
        &mut self,
        shared: &Shared,
        catalog: &Replica,
        meta: &ReadMeta,
        sent: Sent,
        scope: Option<&BTreeSet<String>>,
    ) -> Option<Duration> {
        let received_ms = shared.now_ms();
        if self.pacer.after_success() {
            tracing::info!("registry reachable again");
            shared.recheck.notify_one();
        }
        shared.set_registry_ok(true);
        let held = shared.gossip.view().borrow().snapshots.clone();
        let cached = cached_registry_entries(&shared.current_view());
        let plan = plan_scoped(catalog, meta, &held, &cached, scope);
        shared
            .freshness()
            .answered(received_ms, sent.at_ms, !plan.warming);
        if plan.invalid > 0 {
            tracing::warn!(
                invalid = plan.invalid,
                "registry listed hosts that do not validate; skipped"
            );
        }
        let members = shared.gossip.members();
        // Joining more agents is harmless, so a warming listing is good enough.
        let join = seeds_to_join(catalog, shared.gossip_addr, &members);
        let snapshots = crate::signing::registry_signatures(plan.snapshots, catalog, plan.warming);
        let changed = snapshots.len();
        feed_gossip(shared, snapshots, join, plan.listed).await;
        if plan.warming {
            Some(self.warming(shared, changed))
        } else {
            self.applied(shared, catalog, meta, sent.started, changed)
        }
    }

    /// After a warming answer: note the warm-up once, and poll again soon without blocking.
    fn warming(&mut self, shared: &Shared, changed: usize) -> Duration {
        shared.metrics.sync_warming.increment(1);
        if !self.warming_noted {
            self.warming_noted = true;
            tracing::info!(
                "registry is warming up (restarted empty): taking only additions and updates from it, re-checking in"
            );
            shared.recheck.notify_one();
        }
        tracing::debug!(changed, "warming registry answer merged");
        self.forget("warming");
        warming_poll(shared.config.check_in_interval, rand::random())
    }

    /// After an applied answer: block on its index next; pause only when the registry
    /// answered the same index quickly (it does not block).
    fn applied(
        &mut self,
        shared: &Shared,
        catalog: &Replica,
        meta: &ReadMeta,
        started: Instant,
        changed: usize,
    ) -> Option<Duration> {
        self.warming_noted = false;
        shared.metrics.sync_applied.increment(1);
        tracing::debug!(index = catalog.index, changed, "registry snapshot applied");
        let same = self.index == Some(catalog.index);
        let quick = started.elapsed() < shared.config.sync_wait / 2;
        self.index = Some(meta.index.unwrap_or(catalog.index));
        (same && quick).then(|| self.pacer.poll(rand::random()))
    }
}

/// Feeds an answer into gossip: its snapshots, the agents to join, then the keys it lists.
async fn feed_gossip(
    shared: &Shared,
    snapshots: Vec<(Snapshot, Option<Signature>)>,
    join: Vec<SocketAddr>,
    listed: Option<BTreeSet<EndpointKey>>,
) {
    // One batch: gossip republishes its view once per answer, not once per service.
    if !snapshots.is_empty()
        && shared
            .gossip
            .apply_registry_answers(snapshots)
            .await
            .is_err()
    {
        tracing::warn!("gossip has stopped; registry snapshots not applied");
    }
    if !join.is_empty() {
        tracing::info!(seeds = ?join, "joining agents the registry lists");
        if shared.gossip.join(join).await.is_err() {
            tracing::warn!("gossip has stopped; cannot join");
        }
    }
    // Only a view still serving disk-cache entries needs the keys; once the cache is spent
    // they are dropped (at 100 000 endpoints the set was 8 MB kept for nothing).
    if !shared.current_view().holds_cache() {
        shared.registry_listed.send_replace(None);
    } else if let Some(keys) = listed {
        // After the snapshots: a listed cache entry waits for its snapshot.
        shared.registry_listed.send_replace(Some(Arc::new(keys)));
    }
}

#[cfg(test)]
#[path = "sync_tests.rs"]
mod tests;
