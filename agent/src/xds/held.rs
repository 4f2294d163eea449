//! What a client holds of one resource type, as far as the server has sent it: a version
//! digest per name.
//!
//! Most of the time a client holds exactly some catalog's resources for every name it
//! wants — it has caught up. That is kept as a reference to the catalog's map of the kind,
//! shared with the catalog and every other caught-up stream, plus the names where the client
//! differs from it. Two hundred caught-up streams of 1 000 services thus share one map
//! instead of holding 2 000 (name, version) pairs each, which was most of an agent's memory
//! under many streams (ops/bench/xds.sh). A stream catching up is sent pieces in name order,
//! so while it does, what it holds is one more shared map up to a name (`front`): no entry
//! per resource sent either.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Included};
use std::sync::Arc;

use super::resources::{KindMap, Name};

/// One type's held versions on one stream.
#[derive(Debug, Default)]
pub struct Held {
    /// The client holds this map's version of every name it wants, except where `over`
    /// says otherwise; it holds nothing of names it does not want.
    base: Arc<KindMap>,
    /// Up to a name, the client holds another map's versions instead of `base`'s.
    front: Option<Front>,
    /// Where the client differs from the maps: `Some(digest)` holds that version, `None`
    /// holds nothing. Only names the client wants.
    over: BTreeMap<Name, Option<u64>>,
}

/// The client holds `map`'s version of every name it wants up to `upto` (included).
#[derive(Debug)]
struct Front {
    map: Arc<KindMap>,
    upto: Name,
}

impl Held {
    /// The version digest the client holds of `name`, a name it wants.
    pub fn get(&self, name: &str) -> Option<u64> {
        match self.over.get(name) {
            Some(v) => *v,
            None => self.under(name),
        }
    }

    /// What the maps say of `name`.
    fn under(&self, name: &str) -> Option<u64> {
        let map = match &self.front {
            Some(f) if name <= &*f.upto => &f.map,
            _ => &self.base,
        };
        map.get(name).map(|r| r.digest)
    }

    /// Records that the client holds `v` of `name` (a name it wants).
    pub fn set(&mut self, name: &Name, v: Option<u64>) {
        if v == self.under(name) {
            self.over.remove(&**name);
        } else {
            self.over.insert(name.clone(), v);
        }
    }

    /// The client now holds exactly `map`'s resources of every name it wants.
    pub fn settle(&mut self, map: &Arc<KindMap>) {
        self.base = map.clone();
        self.front = None;
        self.over.clear();
    }

    /// The client now holds `map`'s version of every name it wants up to `upto`; past it,
    /// what it held before.
    pub fn advance(&mut self, map: &Arc<KindMap>, upto: &Name, wants: impl Fn(&str) -> bool) {
        if let Some(old) = self.front.take() {
            if *old.upto > **upto {
                // The old claim reaches past the new one: keep that part name by name.
                let part = (Excluded(&**upto), Included(&*old.upto));
                for (n, r) in old.map.range::<str, _>(part) {
                    if wants(n) && !self.over.contains_key(&**n) {
                        self.over.insert(n.clone(), Some(r.digest));
                    }
                }
                for (n, _) in self.base.range::<str, _>(part) {
                    if wants(n) && !old.map.contains_key(&**n) && !self.over.contains_key(&**n) {
                        self.over.insert(n.clone(), None);
                    }
                }
            }
        }
        // Differences up to `upto` are superseded by the new claim.
        let mut after = self.over.split_off(&**upto);
        after.remove(&**upto);
        self.over = after;
        self.front = Some(Front {
            map: map.clone(),
            upto: upto.clone(),
        });
    }

    /// Whether `settle(map)` would change nothing (the client holds `map` already).
    #[cfg(test)]
    pub fn is_settled_on(&self, map: &Arc<KindMap>) -> bool {
        self.over.is_empty() && self.front.is_none() && Arc::ptr_eq(&self.base, map)
    }

    /// Every name held, with its version digest, given what the client wants.
    pub fn iter<'a>(
        &'a self,
        wants: impl Fn(&str) -> bool + 'a,
    ) -> impl Iterator<Item = (&'a Name, u64)> + 'a {
        let own = self.over.iter().filter_map(|(n, v)| v.map(|v| (n, v)));
        let front = self.front.iter().flat_map(|f| {
            f.map
                .range::<str, _>((std::ops::Bound::Unbounded, Included(&*f.upto)))
                .map(|(n, r)| (n, r.digest))
        });
        let past = match &self.front {
            Some(f) => self
                .base
                .range::<str, _>((Excluded(&*f.upto), std::ops::Bound::Unbounded)),
            None => self.base.range::<str, _>(..),
        };
        let maps = front
            .chain(past.map(|(n, r)| (n, r.digest)))
            .filter(move |(n, _)| wants(n) && !self.over.contains_key(&***n));
        own.chain(maps)
    }

    /// The subscription changes from `was` to `wants`: what the client holds of names it
    /// keeps stays, what it drops is no longer held, and a name newly wanted is not held
    /// until sent. Spelled out name by name until the next `settle`.
    pub fn resubscribe(&mut self, was: impl Fn(&str) -> bool, wants: impl Fn(&str) -> bool) {
        let kept: BTreeMap<Name, Option<u64>> = self
            .iter(was)
            .filter(|(n, _)| wants(n))
            .map(|(n, v)| (n.clone(), Some(v)))
            .collect();
        self.base = Arc::default();
        self.front = None;
        self.over = kept;
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::google::protobuf::Any;

    use super::super::resources::Resource;
    use super::*;

    fn map(entries: &[(&str, &str)]) -> Arc<KindMap> {
        Arc::new(
            entries
                .iter()
                .map(|(n, v)| {
                    let r = Resource::new((*v).to_string(), Any::default());
                    (Name::from(*n), Arc::new(r))
                })
                .collect(),
        )
    }

    fn d(v: &str) -> Option<u64> {
        Some(super::super::resources::digest(v))
    }

    #[test]
    fn a_settled_stream_holds_the_map_of_what_it_wants_and_records_differences() {
        let m = map(&[("a", "1"), ("b", "1"), ("c", "1")]);
        let mut h = Held::default();
        assert_eq!(h.get("a"), None);
        h.settle(&m);
        assert!(h.is_settled_on(&m));
        assert_eq!(h.get("a"), d("1"));
        assert_eq!(
            h.iter(|n| n != "a").count(),
            2,
            "an unwanted name is not held"
        );
        h.set(&Name::from("a"), d("2"));
        h.set(&Name::from("b"), None);
        assert_eq!((h.get("a"), h.get("b")), (d("2"), None));
        assert!(!h.is_settled_on(&m));
        h.set(&Name::from("a"), d("1"));
        h.set(&Name::from("b"), d("1"));
        assert!(h.is_settled_on(&m), "back to the map: no difference kept");
        let held: Vec<_> = h.iter(|n| n != "c").map(|(n, _)| n.to_string()).collect();
        assert_eq!(held, ["a", "b"]);
    }

    #[test]
    fn resubscribing_keeps_what_stays_wanted_and_holds_nothing_new() {
        let m = map(&[("a", "1"), ("b", "1"), ("c", "1")]);
        let mut h = Held::default();
        h.settle(&m);
        // Was: a and b. Now: b and c. The client dropped a and never got c.
        h.resubscribe(|n| n != "c", |n| n != "a");
        assert_eq!(h.iter(|n| n != "a").count(), 1, "a is dropped");
        assert_eq!(h.get("b"), d("1"));
        assert_eq!(h.get("c"), None, "newly wanted: not held until sent");
    }

    /// A piece from a newer catalog that ends before the last one did: past its end the
    /// client still holds the older piece's versions, and past that, the base's.
    #[test]
    fn a_shorter_piece_keeps_the_longer_ones_claim_past_it() {
        let base = map(&[("a", "0"), ("d", "0"), ("e", "0")]);
        let first = map(&[("a", "1"), ("b", "1"), ("c", "1"), ("e", "1")]);
        let second = map(&[("a", "2"), ("b", "2"), ("c", "2"), ("e", "2")]);
        let mut h = Held::default();
        h.settle(&base);
        h.advance(&first, &Name::from("d"), |_| true);
        assert_eq!((h.get("a"), h.get("d"), h.get("e")), (d("1"), None, d("0")));
        h.advance(&second, &Name::from("a"), |_| true);
        assert_eq!(h.get("a"), d("2"));
        assert_eq!(
            (h.get("b"), h.get("c")),
            (d("1"), d("1")),
            "the first piece's"
        );
        assert_eq!(h.get("d"), None, "gone in the first piece's catalog");
        assert_eq!(h.get("e"), d("0"), "past both pieces: the base");
        let held: Vec<_> = h.iter(|_| true).map(|(n, _)| n.to_string()).collect();
        assert_eq!(held.len(), 4, "{held:?}");
    }
}
