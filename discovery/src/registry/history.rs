//! The recent catalog views the registry can answer deltas from (docs/API.md#catalog-deltas):
//! a ring bounded by count (`delta_views`) and age (`delta_max_age`). A view is held as one
//! shared entry per service ([`ServiceHosts`]); a new view takes the previous one's entry
//! for every service whose hosts did not change, so the ring costs one copy of the catalog
//! plus the services that changed within it. Views are keyed by their content index, which
//! equal content gives on every replica: a delta from a view another replica served is
//! answered when this one held the same content.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytes::Bytes;
use schema::api::V1Host;

use super::{Registry, View, ViewData};
use crate::delta::{self, Hash, ServiceHosts};

/// One catalog view as the ring holds it.
#[derive(Debug)]
pub(crate) struct Entry {
    pub index: u64,
    /// [`crate::Clock::elapsed_ms`] when the view was recorded, for the age bound.
    recorded_ms: u64,
    pub services: BTreeMap<String, Arc<ServiceHosts>>,
    /// Each service's content hash (`registry/segments.rs`), in service order: what a later
    /// view compares to share the service's entry.
    content: Vec<(String, Hash)>,
    pub digest: Hash,
    digest_hex: OnceLock<String>,
}

impl Entry {
    pub fn digest_hex(&self) -> &str {
        self.digest_hex.get_or_init(|| hex::encode(self.digest))
    }
}

/// At most this many encoded deltas are kept per view: one per base index a client named,
/// and only bases still in the ring are answered, so the ring's size bounds it already.
const MAX_MEMO: usize = 256;

/// The encoded changes (see `http::answers::catalog_changes`) from one base index to one
/// view, computed once for every client waiting at that base: the first computes, the others
/// wait for it. `None` in a cell: the encoding failed (then each request tries on its own).
#[derive(Debug, Default)]
pub(crate) struct DeltaMemo(Mutex<HashMap<u64, Arc<OnceLock<Option<Bytes>>>>>);

impl DeltaMemo {
    /// The cell for changes from `from`; `None` when the memo is full (then encode per request).
    pub fn cell(&self, from: u64) -> Option<Arc<OnceLock<Option<Bytes>>>> {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = m.get(&from) {
            return Some(c.clone());
        }
        (m.len() < MAX_MEMO).then(|| m.entry(from).or_default().clone())
    }
}

#[derive(Debug)]
pub(crate) struct History {
    views: usize,
    max_age_ms: u64,
    ring: Mutex<VecDeque<Arc<Entry>>>,
}

impl History {
    pub fn new(views: usize, max_age_ms: u64) -> Self {
        History {
            views,
            max_age_ms,
            ring: Mutex::default(),
        }
    }

    /// The entry of `data`, recording it as the newest view unless it already is; trims the
    /// ring. Only a change of index builds anything (once per change, not per request).
    pub fn record(&self, data: &ViewData, now_ms: u64) -> Arc<Entry> {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(head) = ring.back().filter(|h| h.index == data.index) {
            return head.clone();
        }
        let entry = Arc::new(build(data, ring.back().map(|h| &**h), now_ms));
        ring.push_back(entry.clone());
        // The newest view always stays: it is the base of the next delta.
        while ring.len() > self.views.max(1)
            || ring.front().is_some_and(|e| {
                ring.len() > 1 && now_ms.saturating_sub(e.recorded_ms) > self.max_age_ms
            })
        {
            ring.pop_front();
        }
        entry
    }

    /// The view with content index `index`, if the ring still holds it and deltas are on.
    pub fn find(&self, index: u64) -> Option<Arc<Entry>> {
        if self.views == 0 {
            return None;
        }
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.iter().rev().find(|e| e.index == index).cloned()
    }
}

/// The entry for `data`, sharing every service whose content (all but check-in times) is
/// what `previous` had: only the services that changed are converted to hosts and digested.
fn build(data: &ViewData, previous: Option<&Entry>, now_ms: u64) -> Entry {
    let mut services = BTreeMap::new();
    let mut content = Vec::with_capacity(data.segments.len());
    for (seg, rows) in data.segments.iter().zip(data.rows.services()) {
        let name = seg.service.to_string();
        let same = previous.and_then(|p| {
            let i = p
                .content
                .binary_search_by(|(s, _)| s.as_str().cmp(&name))
                .ok()?;
            let (_, hash) = p.content.get(i)?;
            (*hash == seg.hash).then(|| p.services.get(&name).cloned())?
        });
        let shared = match same {
            Some(old) => old,
            None => {
                let hosts = rows
                    .iter()
                    .map(|r| V1Host::from_endpoint(&r.endpoint, r.last_check_in_ms))
                    .collect();
                Arc::new(ServiceHosts::new(&name, hosts))
            }
        };
        content.push((name.clone(), seg.hash));
        services.insert(name, shared);
    }
    let digest = delta::catalog_digest(services.values().map(|s| &s.digest));
    Entry {
        index: data.index,
        recorded_ms: now_ms,
        services,
        content,
        digest,
        digest_hex: OnceLock::new(),
    }
}

impl Registry {
    /// The history's entry for a catalog view served in delta mode (recorded if new).
    pub(crate) fn catalog_entry(&self, view: &View) -> Arc<Entry> {
        let now = self.inner.clock.elapsed_ms();
        self.inner.history.record(&view.data, now)
    }

    /// The view a client at `index` holds, if the history still has it.
    pub(crate) fn catalog_base(&self, index: u64) -> Option<Arc<Entry>> {
        self.inner.history.find(index)
    }
}
