//! The registry's read cache: per service and for the catalog, the last answer built from the
//! store. It is reused for a short time (or until a local write changes something) and kept
//! indefinitely as the fail-static fallback when the store is down. Rebuilds are
//! single-flight: when a change wakes a thousand blocked catalog queries at once, one of them
//! reads the store and the others share its answer. Each cached view also keeps the answer
//! bodies encoded from it ([`Bodies`]), so repeated reads copy bytes instead of encoding JSON.

use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use bytes::Bytes;
use schema::Endpoint;
use tokio::sync::OnceCell;

use crate::registry::ViewData;

#[derive(Debug, Clone)]
pub(crate) struct CacheEntry {
    pub data: Arc<ViewData>,
    /// The change generation the answer was built at.
    pub generation: u64,
    /// Reusable without asking the store until then (registry wall clock, ms): never past
    /// the moment one of its rows expires.
    pub fresh_until_ms: u64,
    /// ...and until then on the process's monotonic clock ([`crate::Clock::elapsed_ms`]).
    /// The wall bound alone is not enough: a cache built while the wall clock ran ahead
    /// would, once the clock is stepped back, be reused for as long as the step, blind to
    /// every write other replicas make to the shared table meanwhile.
    pub fresh_until_elapsed_ms: u64,
}

/// When a cached answer is judged: the registry's wall clock and its monotonic clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub wall_ms: u64,
    pub elapsed_ms: u64,
}

impl CacheEntry {
    pub fn fresh(&self, generation: u64, now: Now) -> bool {
        self.generation == generation
            && now.wall_ms < self.fresh_until_ms
            && now.elapsed_ms < self.fresh_until_elapsed_ms
    }
}

/// The answer formats encoded from a view. Every body of one format is a function of the
/// view's rows and index alone (plus the service it is a view of, and the registry's fixed
/// `env`): whatever varies per request or with time is added around it by the route.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Format {
    /// `GET /v1/registration/{service}` and `GET /v2/services/{service}`.
    V1Listing,
    /// `GET /v2/services`.
    Services,
    /// The `services` member of `GET /v2/catalog` (the rest changes per request).
    CatalogServices,
    /// `POST /v3/discovery:endpoints` when the version differs.
    Eds,
}

impl Format {
    const COUNT: usize = 4;
}

/// Bodies encoded from one view, each at most once (two racing first readers may both
/// encode; one result is kept, and both are the same bytes).
#[derive(Debug, Default)]
pub(crate) struct Bodies([OnceLock<Bytes>; Format::COUNT]);

impl Bodies {
    /// The body of `format`, encoding it with `encode` the first time. An encoding error is
    /// returned and nothing is kept.
    pub fn get_or_encode<E>(
        &self,
        format: Format,
        encode: impl FnOnce() -> Result<Bytes, E>,
    ) -> Result<Bytes, E> {
        let cell = &self.0[format as usize];
        if let Some(b) = cell.get() {
            return Ok(b.clone());
        }
        let b = encode()?;
        Ok(cell.get_or_init(|| b).clone())
    }
}

/// One store read in progress; everyone who needs the same answer awaits the same cell.
/// The error is a message: every waiter falls back to the cache on its own.
#[derive(Debug)]
pub(crate) struct Flight {
    generation: u64,
    pub cell: OnceCell<Result<CacheEntry, String>>,
}

/// The cached answer for one key, and the read in flight for it.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    entry: RwLock<Option<CacheEntry>>,
    flight: Mutex<Option<Arc<Flight>>>,
}

impl Slot {
    pub fn entry(&self) -> Option<CacheEntry> {
        self.entry
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stores `new` unless a newer answer got there first.
    pub fn store(&self, new: CacheEntry) {
        let mut e = self.entry.write().unwrap_or_else(PoisonError::into_inner);
        if e.as_ref()
            .is_none_or(|old| old.generation <= new.generation)
        {
            *e = Some(new);
        }
    }

    /// Joins the read in flight for `generation`, or starts a new one. A finished flight is
    /// never joined: its answer is in the cache already, or was an error worth retrying.
    pub fn flight(&self, generation: u64) -> Arc<Flight> {
        let mut f = self.flight.lock().unwrap_or_else(PoisonError::into_inner);
        match &*f {
            Some(cur) if cur.generation == generation && !cur.cell.initialized() => cur.clone(),
            _ => {
                let new = Arc::new(Flight {
                    generation,
                    cell: OnceCell::new(),
                });
                *f = Some(new.clone());
                new
            }
        }
    }

    /// Whether any cached answer here is fresh and leaves out one of `eps`.
    pub fn misses_any(&self, eps: &[Endpoint], generation: u64, now: Now) -> bool {
        let e = self.entry.read().unwrap_or_else(PoisonError::into_inner);
        e.as_ref().is_some_and(|c| {
            c.fresh(generation, now) && eps.iter().any(|ep| !c.data.rows.contains(ep))
        })
    }
}
