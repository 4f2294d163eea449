//! `MemoryStore`: the embedded, single-process [`Store`].
//!
//! Rows live in one map per service, each behind its own mutex, so a check-in locks only the
//! services it touches and never scans the others. The outer map (service name → shard) is
//! behind an `RwLock` that is taken for writing only when a service appears or disappears.
//! No lock is ever held across an `.await` (every method is synchronous inside).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use async_trait::async_trait;
use schema::{Endpoint, ServiceName, Weight};

use crate::store::{
    CheckInOutcome, ServiceRows, Store, StoreError, StoredEndpoint, merge_keeps, merge_tags,
};

type RowKey = (IpAddr, NonZeroU16);

/// One row as stored: the endpoint exactly as the host last sent it (the weight override is
/// kept beside it and applied on the way out, so a later override change needs no rewrite).
#[derive(Debug, Clone)]
struct Row {
    endpoint: Endpoint,
    last_check_in_ms: u64,
    weight_override: Option<Weight>,
}

impl Row {
    fn effective(&self) -> Endpoint {
        let mut ep = self.endpoint.clone();
        if let Some(w) = self.weight_override {
            ep.tags.load_balancing_weight = w;
        }
        ep
    }

    fn to_stored(&self) -> StoredEndpoint {
        StoredEndpoint {
            endpoint: self.effective(),
            last_check_in_ms: self.last_check_in_ms,
            weight_override: self.weight_override,
        }
    }

    /// Whether `new` with its tags merged into `tags` is what the row holds already.
    fn renews_as(&self, new: &Endpoint, tags: &schema::Tags) -> bool {
        self.endpoint.tags == *tags && self.same_but_tags(new)
    }

    /// Whether `new` equals the row's endpoint in every field but the tags.
    fn same_but_tags(&self, new: &Endpoint) -> bool {
        // Destructured so that a new `Endpoint` field cannot be left out of the comparison.
        let Endpoint {
            service,
            ip,
            port,
            revision,
            service_repo_name,
            tags: _,
        } = new;
        let old = &self.endpoint;
        old.revision == *revision
            && old.service_repo_name == *service_repo_name
            && (&old.service, old.ip, old.port) == (service, *ip, *port)
    }

    /// Whether replacing this row's endpoint with `new` changes what readers see.
    fn visible_change(&self, new: &Endpoint) -> bool {
        // The common renewal sends what is stored: no copies to find that out.
        if *new == self.endpoint {
            return false;
        }
        let mut new_eff = new.clone();
        if let Some(w) = self.weight_override {
            new_eff.tags.load_balancing_weight = w;
        }
        new_eff != self.effective()
    }
}

#[derive(Debug, Default)]
struct ShardRows {
    /// Read through [`ShardRows::rows`]; written only through [`ShardRows::rows_mut`], which
    /// drops `shared`.
    map: BTreeMap<RowKey, Row>,
    /// The rows as [`Store::list_all_shared`] last answered them, until the next write: an
    /// unchanged service is answered with the same allocation, which the registry then skips
    /// without comparing a row.
    shared: Option<ServiceRows>,
    /// Set once the shard has been unlinked from the outer map (it was empty). A writer that
    /// still holds the `Arc` must then look the service up again, or its write would be lost.
    dead: bool,
}

#[derive(Debug, Default)]
struct Shard(Mutex<ShardRows>);

impl ShardRows {
    fn rows(&self) -> &BTreeMap<RowKey, Row> {
        &self.map
    }

    fn rows_mut(&mut self) -> &mut BTreeMap<RowKey, Row> {
        self.shared = None;
        &mut self.map
    }

    fn shared(&mut self) -> ServiceRows {
        self.shared
            .get_or_insert_with(|| self.map.values().map(Row::to_stored).collect())
            .clone()
    }
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, ShardRows> {
        // A panic while holding the lock cannot leave a row half-written (every mutation is a
        // single map operation), so a poisoned lock is still consistent.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The in-memory store. Cheap to share behind an `Arc`; all state is lost on restart (the
/// registry answers `X-Tidings-Warming` until hosts have checked in again).
#[derive(Debug, Default)]
pub struct MemoryStore {
    services: RwLock<HashMap<ServiceName, Arc<Shard>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, service: &ServiceName) -> Option<Arc<Shard>> {
        let map = self.services.read().unwrap_or_else(PoisonError::into_inner);
        map.get(service).cloned()
    }

    fn shard_or_create(&self, service: &ServiceName) -> Arc<Shard> {
        if let Some(shard) = self.shard(service) {
            return shard;
        }
        let mut map = self
            .services
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        map.entry(service.clone()).or_default().clone()
    }

    fn all_shards(&self) -> Vec<(ServiceName, Arc<Shard>)> {
        let map = self.services.read().unwrap_or_else(PoisonError::into_inner);
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Unlinks `service` if its shard is empty, so deleted services don't accumulate.
    fn unlink_if_empty(&self, service: &ServiceName) {
        let mut map = self
            .services
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(shard) = map.get(service).cloned() else {
            return;
        };
        let mut rows = shard.lock();
        if rows.rows().is_empty() {
            rows.dead = true;
            map.remove(service);
        }
    }

    /// Applies `f` to the rows of `service`, creating the shard if needed and retrying if it
    /// was unlinked between lookup and lock.
    fn with_rows_mut<T>(
        &self,
        service: &ServiceName,
        mut f: impl FnMut(&mut BTreeMap<RowKey, Row>) -> T,
    ) -> T {
        loop {
            let shard = self.shard_or_create(service);
            let mut rows = shard.lock();
            if !rows.dead {
                return f(rows.rows_mut());
            }
        }
    }

    /// Number of rows, expired or not (tests and metrics).
    pub fn len(&self) -> usize {
        self.all_shards()
            .iter()
            .map(|(_, s)| s.lock().rows().len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Upserts `ep` into `rows`; returns (accepted, visible change).
fn upsert(rows: &mut BTreeMap<RowKey, Row>, ep: &Endpoint, now_ms: u64) -> (bool, bool) {
    match rows.get_mut(&(ep.ip, ep.port)) {
        Some(row) if row.last_check_in_ms > now_ms => (false, false),
        Some(row) => {
            let changed = row.visible_change(ep);
            if changed {
                row.endpoint = ep.clone();
            }
            row.last_check_in_ms = now_ms;
            (true, changed)
        }
        None => {
            let row = Row {
                endpoint: ep.clone(),
                last_check_in_ms: now_ms,
                weight_override: None,
            };
            rows.insert((ep.ip, ep.port), row);
            (true, true)
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn answers_at_once(&self) -> bool {
        true
    }

    async fn check_in(
        &self,
        endpoints: &[Endpoint],
        now_ms: u64,
    ) -> Result<CheckInOutcome, StoreError> {
        let mut out = CheckInOutcome::default();
        // Group by service so each shard is locked once per request (a host usually checks in
        // a handful of endpoints of a few services).
        let mut by_service: BTreeMap<&ServiceName, Vec<&Endpoint>> = BTreeMap::new();
        for ep in endpoints {
            by_service.entry(&ep.service).or_default().push(ep);
        }
        for (service, eps) in by_service {
            let (accepted, changed) = self.with_rows_mut(service, |rows| {
                eps.iter().fold((0, false), |(n, ch), ep| {
                    let (a, c) = upsert(rows, ep, now_ms);
                    (n + usize::from(a), ch || c)
                })
            });
            out.accepted += accepted;
            if changed {
                out.changed_services.push(service.clone());
            }
        }
        Ok(out)
    }

    async fn check_in_merging_tags(
        &self,
        endpoint: &Endpoint,
        sent: &BTreeSet<String>,
        now_ms: u64,
    ) -> Result<CheckInOutcome, StoreError> {
        // Merged and written under the shard lock: no other write to the row in between.
        let (accepted, changed) = self.with_rows_mut(&endpoint.service, |rows| {
            let merged = match rows.get_mut(&(endpoint.ip, endpoint.port)) {
                Some(row) if row.last_check_in_ms > now_ms => return Ok((false, false)),
                // A plain renewal (every minute per host) that sends the tags it sent
                // before: only the time moves, and nothing is copied to find that out.
                Some(row)
                    if row.same_but_tags(endpoint)
                        && merge_keeps(&row.endpoint.tags, &endpoint.tags, sent) =>
                {
                    row.last_check_in_ms = now_ms;
                    return Ok((true, false));
                }
                Some(row) => {
                    let tags = merge_tags(&row.endpoint.tags, &endpoint.tags, sent)?;
                    if row.renews_as(endpoint, &tags) {
                        // A plain renewal (every minute per host): only the time moves.
                        row.last_check_in_ms = now_ms;
                        return Ok((true, false));
                    }
                    let mut merged = endpoint.clone();
                    merged.tags = tags;
                    merged
                }
                None => endpoint.clone(),
            };
            Ok::<_, StoreError>(upsert(rows, &merged, now_ms))
        })?;
        Ok(CheckInOutcome {
            accepted: usize::from(accepted),
            changed_services: if changed {
                vec![endpoint.service.clone()]
            } else {
                Vec::new()
            },
        })
    }

    async fn list_service(&self, service: &ServiceName) -> Result<Vec<StoredEndpoint>, StoreError> {
        let Some(shard) = self.shard(service) else {
            return Ok(Vec::new());
        };
        let rows = shard.lock();
        Ok(rows.rows().values().map(Row::to_stored).collect())
    }

    async fn list_all(&self) -> Result<Vec<StoredEndpoint>, StoreError> {
        let mut shards = self.all_shards();
        shards.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::new();
        for (_, shard) in shards {
            out.extend(shard.lock().rows().values().map(Row::to_stored));
        }
        Ok(out)
    }

    async fn list_all_shared(&self) -> Result<Vec<ServiceRows>, StoreError> {
        let mut shards = self.all_shards();
        shards.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(shards
            .iter()
            .map(|(_, shard)| shard.lock().shared())
            .filter(|rows| !rows.is_empty())
            .collect())
    }

    async fn list_repo(&self, repo: &str) -> Result<Vec<StoredEndpoint>, StoreError> {
        // A full scan, like lyft's InMemory secondary index: the repo route is low-rate.
        let mut shards = self.all_shards();
        shards.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::new();
        for (_, shard) in shards {
            let rows = shard.lock();
            let hits = rows.rows().values().filter(|r| {
                r.endpoint
                    .service_repo_name
                    .as_ref()
                    .is_some_and(|n| n.as_str() == repo)
            });
            out.extend(hits.map(Row::to_stored));
        }
        Ok(out)
    }

    async fn deregister(
        &self,
        service: &ServiceName,
        ip: IpAddr,
        port: Option<NonZeroU16>,
    ) -> Result<usize, StoreError> {
        let Some(shard) = self.shard(service) else {
            return Ok(0);
        };
        let (removed, now_empty) = {
            let mut rows = shard.lock();
            let rows = rows.rows_mut();
            let before = rows.len();
            rows.retain(|(rip, rport), _| !(*rip == ip && port.is_none_or(|p| p == *rport)));
            (before - rows.len(), rows.is_empty())
        };
        if now_empty {
            self.unlink_if_empty(service);
        }
        Ok(removed)
    }

    async fn set_weight(
        &self,
        service: &ServiceName,
        ip: Option<IpAddr>,
        weight: Weight,
    ) -> Result<usize, StoreError> {
        let Some(shard) = self.shard(service) else {
            return Ok(0);
        };
        let mut rows = shard.lock();
        let mut n = 0;
        for ((rip, _), row) in rows.rows_mut().iter_mut() {
            if ip.is_none_or(|ip| ip == *rip) {
                row.weight_override = Some(weight);
                n += 1;
            }
        }
        Ok(n)
    }

    async fn delete_expired(&self, cutoff_ms: u64, max: usize) -> Result<usize, StoreError> {
        let mut deleted = 0;
        for (service, shard) in self.all_shards() {
            if deleted >= max {
                break;
            }
            let now_empty = {
                let mut rows = shard.lock();
                // The check happens under the shard lock, so a row that checked in after the
                // caller computed `cutoff_ms` is never removed.
                let expired: Vec<RowKey> = rows
                    .rows()
                    .iter()
                    .filter(|(_, r)| r.last_check_in_ms < cutoff_ms)
                    .map(|(k, _)| *k)
                    .take(max - deleted)
                    .collect();
                if !expired.is_empty() {
                    let rows = rows.rows_mut();
                    for k in &expired {
                        rows.remove(k);
                    }
                }
                deleted += expired.len();
                !expired.is_empty() && rows.rows().is_empty()
            };
            if now_empty {
                self.unlink_if_empty(&service);
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests;
