//! `Registry`: the policy layer between the HTTP API and a [`Store`]. It owns the clock,
//! the config, self-preservation and warm-up state, the last-good read cache, the change
//! signal blocking queries wait on, and the metrics. Cheap to clone (one `Arc`).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use schema::{Endpoint, ServiceName};
use tokio::sync::{OnceCell, Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::clock::Clock;
use crate::config::RegistryConfig;
use crate::decide::status::SweepLog;
use crate::metrics::Metrics;
use crate::policy::{self, Deregistration, Preservation};
use crate::quota::{Admitted, QuotaExceeded, Quotas, Usage};
use crate::store::{CheckInOutcome, Store, StoreError, StoredEndpoint};

mod history;
mod read;
mod rows;
mod segments;

pub(crate) use history::Entry as CatalogEntry;
use history::History;
use read::ReadCache;
pub use read::{View, ViewData};
pub use rows::Rows;

#[derive(Debug, Clone, Copy)]
struct Init {
    store_was_empty: bool,
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: RegistryConfig,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) auth: Auth,
    /// Certifies agents' gossip owner keys on check-in, when configured.
    pub(crate) signer: Option<schema::cert::SigningKey>,
    pub(crate) metrics: Metrics,
    /// [`Clock::elapsed_ms`] at start: warm-up and uptime are spans of this process, so a
    /// stepped wall clock must neither end warm-up early nor stretch it.
    pub(crate) started_ms: u64,
    /// [`Clock::elapsed_ms`] when warm-up (re)started: at start, and again on waking from a
    /// blind spot that began before warm-up was over ([`Registry::restart_warm_up_if_cut`]).
    pub(crate) warm_from_ms: AtomicU64,
    /// [`Clock::elapsed_ms`] of the last good fleet count (the start of any blind spot).
    pub(crate) census_ok_elapsed_ms: AtomicU64,
    init: OnceCell<Init>,
    pub(crate) preservation: Mutex<Preservation>,
    /// Mirrors `preservation.active()` so every read can check it without the lock.
    preserving: AtomicBool,
    /// What the last sweeps found, for `GET /v1/ops/status`.
    pub(crate) sweeps: Mutex<SweepLog>,
    /// When the fleet was last counted successfully, and when a count was last tried (ms).
    pub(crate) census_ok_ms: AtomicU64,
    pub(crate) census_try_ms: AtomicU64,
    /// One fleet count at a time (the sweeper's, or a read's after a blind spot).
    pub(crate) census_lock: tokio::sync::Mutex<()>,
    changes: watch::Sender<u64>,
    /// The store's own change signal is forwarded to `changes` (started once).
    forwarding: AtomicBool,
    /// What the table holds as far as quotas go: rebuilt at every fleet count, updated by
    /// this replica's writes in between.
    usage: Mutex<Usage>,
    quotas: Quotas,
    /// One permit per waiting blocking query (`max_blocking_waiters`).
    pub(crate) waiters: Arc<Semaphore>,
    cache: ReadCache,
    /// Recent catalog views, the bases of catalog deltas.
    history: History,
    draining: CancellationToken,
}

/// The registry. Build one per process (or per test) with [`Registry::new`], then serve it
/// with [`crate::router()`] / [`crate::serve`].
#[derive(Clone)]
pub struct Registry {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// `config` should have passed [`RegistryConfig::validate`]. Nothing is read from the
    /// store here: the first request or sweep looks at it (to decide warm-up and the
    /// self-preservation baseline), so construction cannot fail.
    pub fn new(store: Arc<dyn Store>, config: RegistryConfig, clock: Arc<dyn Clock>) -> Registry {
        let now = clock.now_ms();
        let preservation = Preservation::new(&config, now, BTreeSet::new());
        let inner = Inner {
            store,
            auth: Auth::new(config.secret.as_deref()),
            // `validate` has parsed it already; an unparsable key issues nothing.
            signer: config.signing_key.as_deref().and_then(|k| k.parse().ok()),
            started_ms: clock.elapsed_ms(),
            warm_from_ms: AtomicU64::new(clock.elapsed_ms()),
            census_ok_elapsed_ms: AtomicU64::new(clock.elapsed_ms()),
            preservation: Mutex::new(preservation),
            preserving: AtomicBool::new(false),
            sweeps: Mutex::default(),
            census_ok_ms: AtomicU64::new(now),
            census_try_ms: AtomicU64::new(now),
            census_lock: tokio::sync::Mutex::new(()),
            changes: watch::Sender::new(0),
            forwarding: AtomicBool::new(false),
            usage: Mutex::default(),
            quotas: Quotas::from_config(&config),
            waiters: Arc::new(Semaphore::new(
                config.max_blocking_waiters.min(Semaphore::MAX_PERMITS),
            )),
            cache: ReadCache::default(),
            history: History::new(
                config.delta_views,
                u64::try_from(config.delta_max_age.as_millis()).unwrap_or(u64::MAX),
            ),
            draining: CancellationToken::new(),
            metrics: Metrics::new(),
            init: OnceCell::new(),
            config,
            clock,
        };
        Registry {
            inner: Arc::new(inner),
        }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.inner.config
    }

    pub fn now_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// Runs a store call under the store timeout (unless the store answers at once), counting
    /// failures.
    pub(crate) async fn store_call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let res = if self.inner.store.answers_at_once() {
            fut.await
        } else {
            match tokio::time::timeout(self.inner.config.store_timeout, fut).await {
                Ok(res) => res,
                Err(_) => Err(StoreError::Unavailable(format!("{op} timed out"))),
            }
        };
        // A refused write is the client's fault, not the store's.
        if let Err(e @ (StoreError::Unavailable(_) | StoreError::Corrupt(_))) = &res {
            self.inner.metrics.store_error(op);
            // Debug, not warn: with the store down this fires on every request. The counter
            // carries the rate, and the sweeper warns every pass while it lasts.
            tracing::debug!(op, error = %e, "store call failed");
        }
        res
    }

    /// Looks at the store once, before the first read or write: was it empty (warm-up), and
    /// what fleet did it last see (the self-preservation baseline, and whether preservation
    /// must hold from the first answer on). Retried until it works.
    pub(crate) async fn ensure_init(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        // Before the first read, so no change between that read and the subscription is lost.
        self.forward_store_changes();
        inner
            .init
            .get_or_try_init(|| async {
                let ticket = self.preservation().ticket();
                let rows = self.store_call("list_all", inner.store.list_all()).await?;
                let now = self.now_ms();
                let fleet = policy::Fleet::take(&rows, now, &inner.config);
                let counted = policy::startup_baseline(&rows, inner.config.ttl);
                self.recount_usage(&rows);
                // Rows the starting baseline leaves out (they expired before the newest
                // check-in in the store). With one registry those are junk the sweeper had
                // not reached. With replicas sharing the store they are also the hosts that
                // were checking in to *this* replica while it was down, which another
                // replica may be preserving: the newest check-in is recent (the other
                // replica's hosts), so they fall outside the baseline, renewals look
                // healthy, and expiring them now would delete rows from the shared table
                // under that replica's feet. This process was blind for a span it cannot
                // measure: hold, as after any blind spot, for one renewal window, the time
                // those hosts need to find this replica again.
                let left_out = rows.len().saturating_sub(counted.len());
                let preserving = {
                    let mut p = self.preservation();
                    if left_out > 0 {
                        let window = policy::renewal_window(inner.config.check_in_interval);
                        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
                        p.hold(now.saturating_add(window_ms));
                    }
                    p.start(counted, &fleet, ticket, now);
                    p.active()
                };
                inner.census_ok_ms.store(now, Ordering::Relaxed);
                inner
                    .census_ok_elapsed_ms
                    .store(inner.clock.elapsed_ms(), Ordering::Relaxed);
                inner.census_try_ms.store(now, Ordering::Relaxed);
                if preserving {
                    tracing::warn!(
                        left_out,
                        "store holds old check-ins at start: self-preservation ON"
                    );
                }
                self.set_preserving(preserving);
                if rows.is_empty() {
                    tracing::info!("store empty at start: warming up for one check-in interval");
                }
                Ok::<_, StoreError>(Init {
                    store_was_empty: rows.is_empty(),
                })
            })
            .await
            .map(|_| ())
    }

    /// Subscribes, once, to the store's own change signal (a DynamoDB store learns of other
    /// replicas' writes from the table's stream): each move drops the read cache and wakes
    /// blocking queries, as a local write does. The task ends with the registry.
    fn forward_store_changes(&self) {
        if self.inner.forwarding.swap(true, Ordering::Relaxed) {
            return;
        }
        let Some(mut changes) = self.inner.store.changes() else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                Registry { inner }.notify_change();
            }
        });
    }

    /// True while the registry started on an empty store less than one check-in interval
    /// ago: its answers may be incomplete (`X-Tidings-Warming: true`).
    pub fn is_warming(&self) -> bool {
        let inner = &self.inner;
        let empty = inner.init.get().is_some_and(|i| i.store_was_empty);
        // Asked on every answer: read the clock only when the answer can depend on it.
        empty
            && policy::warming(
                empty,
                inner.warm_from_ms.load(Ordering::Relaxed),
                inner.clock.elapsed_ms(),
                inner.config.check_in_interval,
            )
    }

    /// Called when a count finds the registry was blind (paused, starved): if that began
    /// before warm-up was over, warm-up did not see a whole interval of check-ins, so it
    /// starts again from now. Its answers stay non-authoritative (add, never remove) until
    /// the registry has been able to see for one interval.
    pub(crate) fn restart_warm_up_if_cut(&self) {
        let inner = &self.inner;
        let empty = inner.init.get().is_some_and(|i| i.store_was_empty);
        let blind_from = inner.census_ok_elapsed_ms.load(Ordering::Relaxed);
        let warm_from = inner.warm_from_ms.load(Ordering::Relaxed);
        if policy::warming(empty, warm_from, blind_from, inner.config.check_in_interval) {
            inner
                .warm_from_ms
                .store(inner.clock.elapsed_ms(), Ordering::Relaxed);
            tracing::warn!("paused during warm-up: warming up again for one check-in interval");
        }
    }

    pub(crate) fn preservation(&self) -> std::sync::MutexGuard<'_, Preservation> {
        self.inner
            .preservation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// True while self-preservation holds (as of the last sweep).
    pub fn self_preservation_active(&self) -> bool {
        self.inner.preserving.load(Ordering::Relaxed)
    }

    pub(crate) fn set_preserving(&self, on: bool) {
        if self.inner.preserving.swap(on, Ordering::Relaxed) != on {
            self.inner.metrics.preserving.set(f64::from(u8::from(on)));
            self.notify_change();
        }
    }

    /// Wakes blocking queries and invalidates cached answers.
    pub(crate) fn notify_change(&self) {
        self.inner.changes.send_modify(|g| *g = g.wrapping_add(1));
    }

    fn generation(&self) -> u64 {
        *self.inner.changes.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// `/ready`: false once draining has started.
    pub fn is_ready(&self) -> bool {
        !self.inner.draining.is_cancelled()
    }

    /// Fails readiness and releases every blocking query at once (graceful shutdown).
    pub fn start_draining(&self) {
        self.inner.draining.cancel();
    }

    pub(crate) fn draining(&self) -> &CancellationToken {
        &self.inner.draining
    }

    /// The Prometheus text for this registry's metrics.
    pub fn render_metrics(&self) -> String {
        self.inner
            .metrics
            .warming
            .set(f64::from(u8::from(self.is_warming())));
        if let Some(stats) = self.inner.store.follow_stats() {
            self.inner.metrics.follow(&stats);
        }
        self.inner.metrics.render()
    }

    /// Stores a check-in at the registry clock's now and wakes watchers if anything visible
    /// changed. Authorisation is the caller's job (the HTTP layer).
    pub async fn check_in(&self, endpoints: &[Endpoint]) -> Result<CheckInOutcome, StoreError> {
        // Warm-up depends on whether the store was empty *before* the first write.
        if let Err(e) = self.ensure_init().await {
            tracing::debug!(error = %e, "init deferred");
        }
        let now = self.now_ms();
        let out = self
            .store_call("check_in", self.inner.store.check_in(endpoints, now))
            .await?;
        {
            let mut usage = self.usage();
            for ep in endpoints {
                usage.record(ep);
            }
        }
        self.inner.metrics.checkins.increment(out.accepted as u64);
        if !out.changed_services.is_empty() || self.revives(endpoints) {
            self.notify_change();
        }
        Ok(out)
    }

    /// A v1 check-in of one endpoint: as [`Registry::check_in`], with its tags merged over
    /// the stored ones (only the keys named in `sent` change), as lyft/discovery did.
    /// `admitted` is what [`Registry::admit`] said of `endpoint`.
    pub async fn check_in_merging_tags(
        &self,
        endpoint: &Endpoint,
        sent: &std::collections::BTreeSet<String>,
        admitted: Admitted,
    ) -> Result<CheckInOutcome, StoreError> {
        if let Err(e) = self.ensure_init().await {
            tracing::debug!(error = %e, "init deferred");
        }
        let now = self.now_ms();
        let out = self
            .store_call(
                "check_in",
                self.inner.store.check_in_merging_tags(endpoint, sent, now),
            )
            .await?;
        // A held key whose row the store found unchanged (it existed, so a removal in
        // between would have shown as a change) moves no count: the common renewal skips the
        // second search. Otherwise the merged row may be a little larger than what was sent:
        // approximate is enough.
        if !(admitted.renewal && out.changed_services.is_empty()) {
            self.usage().record(endpoint);
        }
        self.inner.metrics.checkins.increment(out.accepted as u64);
        if !out.changed_services.is_empty() || self.revives(std::slice::from_ref(endpoint)) {
            self.notify_change();
        }
        Ok(out)
    }

    fn usage(&self) -> MutexGuard<'_, Usage> {
        self.inner
            .usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the quota counts with what a full read of the table found.
    pub(crate) fn recount_usage(&self, rows: &[StoredEndpoint]) {
        *self.usage() = Usage::from_endpoints(rows.iter().map(|r| &r.endpoint));
    }

    /// Whether storing `endpoints` keeps every quota (renewals always do); a refusal is
    /// counted by limit. Looks at the store first if nothing has been counted yet, so a
    /// restarted replica does not admit everything.
    pub(crate) async fn admit(&self, endpoints: &[Endpoint]) -> Result<Admitted, QuotaExceeded> {
        if let Err(e) = self.ensure_init().await {
            tracing::debug!(error = %e, "init deferred; quotas use the counts so far");
        }
        let res = self.usage().admit(endpoints, &self.inner.quotas);
        if let Err(e) = &res {
            self.inner.metrics.rejected(e.limit);
        }
        res
    }

    /// The endpoints of `endpoints` the registry already holds (renewals).
    pub(crate) fn held(&self, endpoints: &[Endpoint]) -> Vec<Endpoint> {
        let usage = self.usage();
        endpoints
            .iter()
            .filter(|e| usage.holds(e))
            .cloned()
            .collect()
    }

    pub(crate) async fn deregister(
        &self,
        service: &ServiceName,
        ip: std::net::IpAddr,
        port: Option<std::num::NonZeroU16>,
    ) -> Result<usize, StoreError> {
        let n = self
            .store_call("deregister", self.inner.store.deregister(service, ip, port))
            .await?;
        if n > 0 {
            self.usage().remove(service, ip, port);
            self.preservation().on_deregister(Deregistration {
                service: service.clone(),
                ip,
                port,
            });
            self.notify_change();
        }
        Ok(n)
    }

    pub(crate) async fn set_weight(
        &self,
        service: &ServiceName,
        ip: Option<std::net::IpAddr>,
        weight: schema::Weight,
    ) -> Result<usize, StoreError> {
        let n = self
            .store_call(
                "set_weight",
                self.inner.store.set_weight(service, ip, weight),
            )
            .await?;
        if n > 0 {
            self.notify_change();
        }
        Ok(n)
    }
}
