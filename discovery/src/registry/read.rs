//! The read path of [`Registry`]: computed views of the store through the last-good read
//! cache ([`crate::cache`]), and the check-in's question to that cache (does it revive an
//! endpoint a cached answer leaves out?).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, RwLock};

use schema::{Endpoint, ServiceName};

use super::Registry;
use super::history::DeltaMemo;
use super::rows::Rows;
use super::segments::{self, Segment};
use crate::cache::{Bodies, CacheEntry, Now, Slot};
use crate::errors::ApiError;
use crate::policy;
use crate::store::{ServiceRows, StoreError, StoredEndpoint, group_by_service};

/// A computed answer: the visible rows of a service (or of every service) and their index.
#[derive(Debug)]
pub struct ViewData {
    pub rows: Rows,
    pub index: u64,
    /// Self-preservation was on: rows past the TTL are included.
    pub preserving: bool,
    /// Answer bodies encoded from this data, filled as routes first ask for them.
    pub(crate) bodies: Bodies,
    /// Catalog deltas to this data, per base index, encoded once for every client at that base.
    pub(crate) deltas: DeltaMemo,
    /// `rows` per service, with each service's content hash.
    pub(crate) segments: Vec<Segment>,
}

impl ViewData {
    /// `rows` (visible, in key order) and their content index.
    pub fn new(rows: Vec<StoredEndpoint>, preserving: bool) -> Self {
        let rows = Rows::from_vec(rows);
        let cut = segments::cut(&rows, None);
        Self::from_segments(rows, preserving, cut.segments)
    }

    fn from_segments(rows: Rows, preserving: bool, segments: Vec<Segment>) -> Self {
        ViewData {
            index: segments::index(&segments),
            rows,
            preserving,
            bodies: Bodies::default(),
            deltas: DeltaMemo::default(),
            segments,
        }
    }

    /// The data for `rows`: `previous` itself when nothing a reader sees differs from it
    /// (then the bodies it encoded are kept), else new data that reuses the content hash of
    /// every service `previous` had the same.
    fn next(rows: Rows, preserving: bool, previous: Option<&Arc<ViewData>>) -> Arc<ViewData> {
        let cut = segments::cut(&rows, previous.map(|p| (&p.rows, p.segments.as_slice())));
        match previous {
            Some(p) if cut.identical && p.preserving == preserving => p.clone(),
            _ => Arc::new(Self::from_segments(rows, preserving, cut.segments)),
        }
    }
}

/// A read as handlers see it.
#[derive(Debug, Clone)]
pub struct View {
    pub data: Arc<ViewData>,
    /// Served from the last-good cache because the store failed.
    pub from_fallback: bool,
}

impl View {
    /// Whether the answer carries `X-Tidings-Stale: true`.
    pub fn stale(&self) -> bool {
        self.from_fallback || self.data.preserving
    }
}

#[derive(Debug, Default)]
pub(super) struct ReadCache {
    /// Only services that had rows get a slot, so reads of random names cannot grow it.
    services: RwLock<HashMap<ServiceName, Arc<Slot>>>,
    catalog: Slot,
}

impl Registry {
    /// Whether a check-in the store saw as a plain renewal brings back an endpoint that a
    /// fresh cached answer leaves out (it had expired). The store cannot know that — it does
    /// not know the TTL — but readers would otherwise miss the return until the cache ages.
    pub(super) fn revives(&self, endpoints: &[Endpoint]) -> bool {
        let (generation, now) = (self.generation(), self.cache_now());
        let cache = &self.inner.cache;
        if cache.catalog.misses_any(endpoints, generation, now) {
            return true;
        }
        let services = cache
            .services
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        endpoints.iter().any(|ep| {
            services
                .get(&ep.service)
                .is_some_and(|s| s.misses_any(std::slice::from_ref(ep), generation, now))
        })
    }

    /// A cache entry for `rows` read at `now`. When the visible rows are exactly those of
    /// `previous` (same endpoints, same check-in times, same flag), its data is kept, and with
    /// it the bodies already encoded: an unchanged service costs no new index and no new
    /// encoding when its entry ages out.
    fn build(
        &self,
        rows: Vec<ServiceRows>,
        at: Now,
        generation: u64,
        previous: Option<&Arc<ViewData>>,
    ) -> CacheEntry {
        let now = at.wall_ms;
        let cfg = &self.inner.config;
        let preserving = self.self_preservation_active() || self.decision_outdated(now);
        let rows = Rows::from_services(policy::visible_shared(rows, now, cfg.ttl, preserving));
        let cache_ms = u64::try_from(cfg.read_cache_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut fresh_until_ms = now.saturating_add(cache_ms);
        if !preserving {
            // Never serve a cached answer past the moment one of its rows expires.
            if let Some(t) = policy::next_expiry_ms(&rows, cfg.ttl) {
                fresh_until_ms = fresh_until_ms.min(t);
            }
        }
        let data = ViewData::next(rows, preserving, previous);
        // The same span on the monotonic clock, from the same moment.
        let span = fresh_until_ms.saturating_sub(now);
        CacheEntry {
            data,
            generation,
            fresh_until_ms,
            fresh_until_elapsed_ms: at.elapsed_ms.saturating_add(span),
        }
    }

    /// The moment cached answers are judged at (see [`CacheEntry::fresh`]).
    fn cache_now(&self) -> Now {
        Now {
            wall_ms: self.now_ms(),
            elapsed_ms: self.inner.clock.elapsed_ms(),
        }
    }

    /// Whether the self-preservation decision is older than the shelf life at `now`: the
    /// last good fleet count is that old (the count before this read failed — the store
    /// answers reads but not scans — or the process froze after its blind-spot check). A
    /// TTL verdict needs a fresh decision, so rows past the TTL are kept, flagged, as a
    /// blind count would keep them.
    fn decision_outdated(&self, now: u64) -> bool {
        let inner = &self.inner;
        let shelf =
            u64::try_from(policy::shelf_life(&inner.config).as_millis()).unwrap_or(u64::MAX);
        inner.config.self_preservation
            && now.saturating_sub(inner.census_ok_ms.load(Ordering::Relaxed)) >= shelf
    }

    /// Answers from `slot` while it is fresh; else reads the store (one read in flight per
    /// slot, shared by everyone waiting); when the store fails, serves the last good answer
    /// flagged stale, or 503 if there is none.
    async fn read_through<F>(&self, slot: &Slot, fetch: F) -> Result<(View, bool), ApiError>
    where
        F: Future<Output = Result<Vec<ServiceRows>, StoreError>>,
    {
        let generation = self.generation();
        let cached = slot.entry();
        if let Some(c) = &cached {
            if c.fresh(generation, self.cache_now()) {
                return Ok((
                    View {
                        data: c.data.clone(),
                        from_fallback: false,
                    },
                    false,
                ));
            }
        }
        let previous = cached.as_ref().map(|c| &c.data);
        let flight = slot.flight(generation);
        let res = flight
            .cell
            .get_or_init(|| async {
                let now = self.cache_now();
                fetch
                    .await
                    .map(|rows| self.build(rows, now, generation, previous))
                    .map_err(|e| e.to_string())
            })
            .await
            .clone();
        match res {
            Ok(entry) => {
                let data = entry.data.clone();
                slot.store(entry);
                Ok((
                    View {
                        data,
                        from_fallback: false,
                    },
                    true,
                ))
            }
            Err(message) => match slot.entry() {
                Some(c) => {
                    self.inner.metrics.stale_reads.increment(1);
                    Ok((
                        View {
                            data: c.data,
                            from_fallback: true,
                        },
                        false,
                    ))
                }
                None => Err(ApiError::Unavailable {
                    message,
                    retry_after: self.inner.config.retry_after,
                }),
            },
        }
    }

    /// The visible rows of one service, through the read cache.
    pub async fn read_service(&self, service: &ServiceName) -> Result<View, ApiError> {
        let _ = self.ensure_init().await;
        self.recount_if_blind().await;
        let cache = &self.inner.cache;
        let existing = cache
            .services
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(service)
            .cloned();
        let slot = existing.clone().unwrap_or_default();
        let fetch = async {
            let rows = self
                .store_call("list_service", self.inner.store.list_service(service))
                .await?;
            Ok(group_by_service(rows))
        };
        let (view, fetched) = self.read_through(&slot, fetch).await?;
        if fetched && existing.is_none() && !view.data.rows.is_empty() {
            let mut map = cache
                .services
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            map.entry(service.clone()).or_insert(slot);
        }
        Ok(view)
    }

    /// Every visible row of every service, through the read cache.
    pub async fn read_catalog(&self) -> Result<View, ApiError> {
        let _ = self.ensure_init().await;
        self.recount_if_blind().await;
        let fetch = self.store_call("list_all", self.inner.store.list_all_shared());
        Ok(self.read_through(&self.inner.cache.catalog, fetch).await?.0)
    }

    /// The visible rows of one repo. Not cached (lyft's repo route is low-rate); when the
    /// store fails it falls back to the cached catalog.
    pub async fn read_repo(&self, repo: &str) -> Result<View, ApiError> {
        let _ = self.ensure_init().await;
        self.recount_if_blind().await;
        let now = self.cache_now();
        match self
            .store_call("list_repo", self.inner.store.list_repo(repo))
            .await
        {
            Ok(rows) => Ok(View {
                data: self
                    .build(group_by_service(rows), now, self.generation(), None)
                    .data,
                from_fallback: false,
            }),
            Err(e) => {
                let Some(c) = self.inner.cache.catalog.entry() else {
                    return Err(ApiError::from_store(&e, self.inner.config.retry_after));
                };
                let rows: Vec<StoredEndpoint> = c
                    .data
                    .rows
                    .iter()
                    .filter(|r| {
                        r.endpoint
                            .service_repo_name
                            .as_ref()
                            .is_some_and(|n| n.as_str() == repo)
                    })
                    .cloned()
                    .collect();
                self.inner.metrics.stale_reads.increment(1);
                Ok(View {
                    data: Arc::new(ViewData::new(rows, c.data.preserving)),
                    from_fallback: true,
                })
            }
        }
    }
}
