//! The mirror of a shared table, sans IO: what a registry replica holds of the DynamoDB table
//! while it follows the table's stream (docs/ARCHITECTURE.md#following-the-table).
//!
//! Two kinds of news reach it, in no fixed order between them: the stream's records (in
//! order per key, possibly delivered twice after a resync) and the replica's own writes,
//! applied as soon as DynamoDB answered them (read-your-writes). Both are [`Change`]s and
//! the mirror settles them by one last-writer-wins rule on the row's [`Stamp`]: an upsert
//! older than the held row is ignored, and so is a remove whose old image is older than the
//! held row (the row was written again after). `last_check_in` never moves backwards per
//! row and every write bumps the row's version, so the stamp orders every write of a live
//! row; that is what makes echoes and re-delivered records commute.
//!
//! A remove leaves a tombstone for a while ([`Mirror::forget_tombstones`]), so a late echo or
//! a record fetched twice of the row's earlier state does not bring it back.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU16;
use std::ops::Bound;

use schema::{EndpointKey, ServiceName};

use crate::store::{ServiceRows, StoredEndpoint};

/// The order of a row's writes: its check-in time, then its write count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    pub last_check_in_ms: u64,
    /// Bumped by every write of the row (absent on rows written before it existed: 0).
    pub version: u64,
}

/// One piece of news about one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The row as written (a stream record's new image, or the item a write returned).
    Upsert { row: StoredEndpoint, version: u64 },
    /// The row was deleted; `stamp` is its old image's.
    Remove { key: EndpointKey, stamp: Stamp },
    /// The row as written is not one reads can show (a foreign writer made it unreadable):
    /// drop it unless the held row is newer, with no tombstone, so a later check-in that
    /// repairs it is taken at once.
    Forget { key: EndpointKey, stamp: Stamp },
}

impl Change {
    pub fn key(&self) -> EndpointKey {
        match self {
            Change::Upsert { row, .. } => row.endpoint.key(),
            Change::Remove { key, .. } | Change::Forget { key, .. } => key.clone(),
        }
    }
}

/// Where a change comes from: the stream, or this replica's own write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Stream,
    Echo,
}

#[derive(Debug, Clone)]
struct Held {
    row: StoredEndpoint,
    stamp: Stamp,
}

/// The rows, keyed by `(service, ip, port)`.
#[derive(Debug, Default)]
pub struct Mirror {
    rows: BTreeMap<EndpointKey, Held>,
    /// Per service, its rows as [`Mirror::list_all_shared`] last handed them out; dropped
    /// for a service by any change to it, and for all by a rescan.
    shared: BTreeMap<ServiceName, ServiceRows>,
    /// The stamp of each recent remove, with the follower's round it was applied in (for
    /// [`Mirror::forget_tombstones`]).
    tombstones: BTreeMap<EndpointKey, (Stamp, u64)>,
    /// While a rescan reads the table: the echoes applied meanwhile, replayed over the scan.
    during_scan: Option<Vec<Change>>,
}

impl Mirror {
    /// Applies one change. Returns whether readers see a difference (a row added, removed,
    /// or changed in anything but its check-in time).
    pub fn apply(&mut self, change: Change, origin: Origin, round: u64) -> bool {
        if origin == Origin::Echo {
            if let Some(log) = &mut self.during_scan {
                log.push(change.clone());
            }
        }
        let service = match &change {
            Change::Upsert { row, .. } => &row.endpoint.service,
            Change::Remove { key, .. } | Change::Forget { key, .. } => &key.service,
        };
        self.shared.remove(service);
        match change {
            Change::Upsert { row, version } => {
                let key = row.endpoint.key();
                let stamp = Stamp {
                    last_check_in_ms: row.last_check_in_ms,
                    version,
                };
                if let Some((dead, _)) = self.tombstones.get(&key) {
                    if stamp <= *dead {
                        return false;
                    }
                    self.tombstones.remove(&key);
                }
                match self.rows.get_mut(&key) {
                    Some(held) if stamp < held.stamp => false,
                    Some(held) => {
                        let visible = held.row.endpoint != row.endpoint
                            || held.row.weight_override != row.weight_override;
                        *held = Held { row, stamp };
                        visible
                    }
                    None => {
                        self.rows.insert(key, Held { row, stamp });
                        true
                    }
                }
            }
            Change::Remove { key, stamp } => {
                // Held whatever the origin: a late echo of the row's earlier write (or a
                // record fetched twice) must not bring it back.
                let tomb = self.tombstones.entry(key.clone()).or_insert((stamp, round));
                if stamp >= tomb.0 {
                    *tomb = (stamp, round);
                }
                match self.rows.get(&key) {
                    Some(held) if stamp >= held.stamp => {
                        self.rows.remove(&key);
                        true
                    }
                    _ => false,
                }
            }
            Change::Forget { key, stamp } => match self.rows.get(&key) {
                Some(held) if stamp >= held.stamp => {
                    self.rows.remove(&key);
                    true
                }
                _ => false,
            },
        }
    }

    /// A rescan starts reading the table: echoes from now on are kept to replay over it.
    pub fn begin_scan(&mut self) {
        self.during_scan = Some(Vec::new());
    }

    /// The rescan read `rows` (with their versions): they replace the mirror, and the echoes
    /// made while it read are applied again on top (the scan may have passed their rows
    /// before they were written). Returns whether readers see a difference.
    pub fn finish_scan(&mut self, rows: Vec<(StoredEndpoint, u64)>, round: u64) -> bool {
        let replay = self.during_scan.take().unwrap_or_default();
        let before: Vec<StoredEndpoint> = self.list_all();
        self.rows.clear();
        self.shared.clear();
        for (row, version) in rows {
            self.apply(Change::Upsert { row, version }, Origin::Stream, round);
        }
        for change in replay {
            self.apply(change, Origin::Echo, round);
        }
        !same_view(&before, &self.list_all())
    }

    /// Drops tombstones made before `before_round`: by then every record and echo older than
    /// them has long been applied (a follower round is one poll interval).
    pub fn forget_tombstones(&mut self, before_round: u64) {
        self.tombstones.retain(|_, (_, made)| *made >= before_round);
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Every row, in key order.
    pub fn list_all(&self) -> Vec<StoredEndpoint> {
        self.rows.values().map(|h| h.row.clone()).collect()
    }

    /// Every row as one shared list per service (services in name order, each in key order):
    /// a service no change touched since the last call is the same allocation
    /// ([`crate::store::Store::list_all_shared`]).
    pub fn list_all_shared(&mut self) -> Vec<ServiceRows> {
        let mut out = Vec::new();
        let mut from: Bound<EndpointKey> = Bound::Unbounded;
        while let Some(first) = self.rows.range((from.clone(), Bound::Unbounded)).next() {
            let service = first.0.service.clone();
            let list = match self.shared.get(&service) {
                Some(list) => list.clone(),
                None => {
                    let list: ServiceRows = self.list_service(&service).into();
                    self.shared.insert(service.clone(), list.clone());
                    list
                }
            };
            out.push(list);
            // Past the highest key the service can have.
            from = Bound::Excluded(EndpointKey {
                service,
                ip: IpAddr::V6(Ipv6Addr::from(u128::MAX)),
                port: NonZeroU16::MAX,
            });
        }
        out
    }

    /// The rows of one service, in key order.
    pub fn list_service(&self, service: &ServiceName) -> Vec<StoredEndpoint> {
        // Keys sort by service first: the service's rows are one range from its lowest key.
        let first = EndpointKey {
            service: service.clone(),
            ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: NonZeroU16::MIN,
        };
        self.rows
            .range(first..)
            .take_while(|(k, _)| k.service == *service)
            .map(|(_, h)| h.row.clone())
            .collect()
    }

    /// The rows whose `service_repo_name` is `repo`.
    pub fn list_repo(&self, repo: &str) -> Vec<StoredEndpoint> {
        self.rows
            .values()
            .filter(|h| {
                h.row
                    .endpoint
                    .service_repo_name
                    .as_ref()
                    .is_some_and(|r| r.as_str() == repo)
            })
            .map(|h| h.row.clone())
            .collect()
    }
}

/// Whether two listings show the same thing to readers (check-in times aside).
fn same_view(a: &[StoredEndpoint], b: &[StoredEndpoint]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.endpoint == y.endpoint && x.weight_override == y.weight_override)
}

#[cfg(test)]
mod tests;
