//! The xDS protocol state of one ADS stream, sans IO: subscriptions per type, what the
//! client holds, nonces, ACK and NACK. The gRPC shell ([`super::server`]) feeds it requests
//! and catalogs and sends what [`StreamState::next_sotw`] / [`StreamState::next_delta`]
//! return, one response at a time, so a slow client never queues more than one: whatever
//! changes meanwhile is folded into the next response (only the latest version matters).
//!
//! Rules (docs/API.md#xds):
//! - A request whose `response_nonce` is not the last one sent for its type is stale and
//!   ignored whole, as the protocol allows. A request with the current nonce acknowledges
//!   (ACK) or, with `error_detail`, rejects (NACK) that response; the client keeps its last
//!   accepted version, and the same resources are not sent again: only a later change is.
//! - The first request of a type with no names subscribes listeners and clusters to every
//!   resource (legacy wildcard); the name `*` does so for any type.
//! - A name the catalog lacks is remembered and answered once the service appears.
//! - State of the world: every listener and cluster response holds every subscribed
//!   resource; route and endpoint responses hold only the resources that changed (the
//!   protocol lets clients keep the others). Incremental: changed resources, and the names
//!   of removed ones.

use std::collections::BTreeSet;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    self as pb, DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use thiserror::Error;

use super::held::Held;
use super::resources::{Catalog, Kind, Name, Resource, digest};

/// The wildcard resource name.
pub const WILDCARD: &str = "*";

/// Bounds on what one stream may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Names one type's subscription may hold (and one request may carry).
    pub max_names: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error(
        "unknown type_url {0:?}: this server serves only Listener, RouteConfiguration, Cluster and ClusterLoadAssignment (v3)"
    )]
    UnknownType(String),
    #[error("{kind} subscription of {got} resource names is over the limit of {max}")]
    TooManyNames {
        kind: &'static str,
        got: usize,
        max: usize,
    },
}

/// What a request was, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A first request of its type, or a change of subscription.
    Subscribe(Kind),
    Ack(Kind),
    /// A rejection: the client keeps `kept` (the version it last accepted, if any).
    Nack {
        kind: Kind,
        kept: Option<String>,
        error: String,
    },
    /// A request answering an older response than the last one sent: ignored.
    Stale(Kind),
}

/// One type's subscription on a stream.
#[derive(Debug, Default)]
struct TypeState {
    wildcard: bool,
    /// Explicitly subscribed names (the catalog's shared copy where it has the name).
    names: BTreeSet<Name>,
    /// What the client holds (as far as we sent it).
    have: Held,
    /// The last nonce sent for this type.
    nonce: Option<String>,
    /// State of the world: the `version_info` the client last accepted.
    accepted: Option<String>,
    /// Answer even if nothing changed (a first request, a changed subscription).
    must_answer: bool,
    /// The catalog (by `seq`) everything due from was sent: from the next one, only its
    /// changed names need a look.
    synced: Option<u64>,
}

/// What is due to a client: resources to send, and held names that are gone.
type Changes<'a> = (Vec<(&'a Name, &'a Arc<Resource>)>, Vec<Name>);

impl TypeState {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// Requested resources the catalog holds, by name.
    fn current<'a>(
        &'a self,
        kind: Kind,
        catalog: &'a Catalog,
    ) -> Box<dyn Iterator<Item = (&'a Name, &'a Arc<Resource>)> + 'a> {
        let all = catalog.all(kind);
        if self.wildcard {
            Box::new(all.iter())
        } else {
            Box::new(self.names.iter().filter_map(|n| all.get_key_value(n)))
        }
    }

    /// The resources whose version the client does not hold, and the names it holds that
    /// are gone.
    fn changes<'a>(&'a self, kind: Kind, catalog: &'a Catalog) -> Changes<'a> {
        let seq = catalog.seq();
        let all = catalog.all(kind);
        if !self.must_answer && seq >= 2 && self.synced == Some(seq - 1) {
            // Caught up with the previous catalog: only what changed since can be due.
            let names = catalog.changed(kind).iter().filter(|n| self.wants(n));
            let mut updated = Vec::new();
            let mut removed = Vec::new();
            for n in names {
                let held = self.have.get(n);
                match all.get_key_value(n) {
                    Some((n, r)) if held != Some(r.digest) => updated.push((n, r)),
                    Some(_) => {}
                    None if held.is_some() => removed.push(n.clone()),
                    None => {}
                }
            }
            return (updated, removed);
        }
        if !self.must_answer && self.synced == Some(seq) && seq >= 1 {
            return (Vec::new(), Vec::new());
        }
        let updated = self
            .current(kind, catalog)
            .filter(|(n, r)| self.have.get(n) != Some(r.digest))
            .collect();
        let removed = self
            .have
            .iter(|n| self.wants(n))
            .filter(|(n, _)| !all.contains_key(&***n))
            .map(|(n, _)| n.clone())
            .collect();
        (updated, removed)
    }

    /// The client was sent `sent` and told (or may assume) `removed` are gone; `done`: that
    /// was everything due from `catalog`.
    fn sent(&mut self, kind: Kind, catalog: &Catalog, sent: &[Name], removed: &[Name], done: bool) {
        if done {
            self.have.settle(catalog.all(kind));
        } else {
            // A piece: the first resources due in name order, so up to its last name the
            // client holds the catalog's version of everything it wants.
            if let Some(last) = sent.last() {
                let (wildcard, names) = (self.wildcard, &self.names);
                let wants = |n: &str| wildcard || names.contains(n);
                self.have.advance(catalog.all(kind), last, wants);
            }
            for n in removed {
                self.have.set(n, None);
            }
        }
        self.synced = done.then_some(catalog.seq());
    }

    /// A new subscription: what the client holds of names it drops is no longer held.
    fn subscribe(&mut self, wildcard: bool, names: BTreeSet<Name>) {
        let (was_wildcard, was) = (self.wildcard, std::mem::take(&mut self.names));
        self.have.resubscribe(
            |n| was_wildcard || was.contains(n),
            |n| wildcard || names.contains(n),
        );
        self.wildcard = wildcard;
        self.names = names;
        self.synced = None;
    }
}

/// The catalog's own copy of `name` where it has the service (one allocation shared by
/// every stream), else a new one.
fn name_of(catalog: &Catalog, name: &str) -> Name {
    catalog.name(name).unwrap_or_else(|| Name::from(name))
}

/// Most resources in one response where the protocol allows a part (state-of-the-world
/// routes and endpoints, every incremental response): a stream catching up with a large
/// catalog sends it in pieces, so what waits to be sent stays small.
pub const MAX_PER_RESPONSE: usize = 100;
/// Most bytes of resource bodies in one such response (at least one resource goes): what
/// a stream has in flight stays small however large each assignment is.
pub const MAX_RESPONSE_BYTES: usize = 32 << 10;

/// How many of `updated` go in one piece: at most [`MAX_PER_RESPONSE`] resources and
/// [`MAX_RESPONSE_BYTES`] of bodies, and at least one.
fn piece(updated: &[(&Name, &Arc<Resource>)]) -> usize {
    let mut bytes = 0;
    let fits = updated.iter().take(MAX_PER_RESPONSE).take_while(|(_, r)| {
        bytes += r.body.value.len() + r.body.type_url.len();
        bytes <= MAX_RESPONSE_BYTES
    });
    fits.count().max(1).min(updated.len())
}

/// The protocol state of one stream (either variant).
#[derive(Debug)]
pub struct StreamState {
    types: [Option<TypeState>; 4],
    nonces: u64,
    limits: Limits,
    catalog: Arc<Catalog>,
}

impl StreamState {
    pub fn new(limits: Limits, catalog: Arc<Catalog>) -> Self {
        StreamState {
            types: Default::default(),
            nonces: 0,
            limits,
            catalog,
        }
    }

    /// A new view: the next responses are made from it.
    pub fn set_catalog(&mut self, catalog: Arc<Catalog>) {
        self.catalog = catalog;
    }

    fn kind(&self, type_url: &str) -> Result<Kind, ProtocolError> {
        Kind::of_type_url(type_url).ok_or_else(|| {
            // A type URL from a client can be anything: keep the error (and log line) short.
            let shown: String = type_url.chars().take(200).collect();
            ProtocolError::UnknownType(shown)
        })
    }

    fn check_count(&self, kind: Kind, got: usize) -> Result<(), ProtocolError> {
        if got > self.limits.max_names {
            return Err(ProtocolError::TooManyNames {
                kind: kind.label(),
                got,
                max: self.limits.max_names,
            });
        }
        Ok(())
    }

    /// Whether a request with `nonce` answers the last response of its type; `None`: the
    /// request is stale. An empty nonce is a (re)subscription.
    fn classify(
        state: &TypeState,
        kind: Kind,
        nonce: &str,
        error: Option<String>,
        version: Option<&str>,
    ) -> Option<Received> {
        if nonce.is_empty() {
            return Some(Received::Subscribe(kind));
        }
        if state.nonce.as_deref() != Some(nonce) {
            return None;
        }
        Some(match error {
            Some(error) => Received::Nack {
                kind,
                kept: version
                    .map(str::to_string)
                    .or_else(|| state.accepted.clone()),
                error,
            },
            None => Received::Ack(kind),
        })
    }

    /// A state-of-the-world request.
    pub fn on_sotw(&mut self, req: &DiscoveryRequest) -> Result<Received, ProtocolError> {
        let kind = self.kind(&req.type_url)?;
        self.check_count(kind, req.resource_names.len())?;
        let first = self.types[kind as usize].is_none();
        let state = self.types[kind as usize].get_or_insert_with(TypeState::default);
        let error = req.error_detail.as_ref().map(|s| s.message.clone());
        let version = Some(req.version_info.as_str()).filter(|v| !v.is_empty());
        let Some(received) = Self::classify(state, kind, &req.response_nonce, error, version)
        else {
            return Ok(Received::Stale(kind));
        };
        match &received {
            Received::Ack(_) => state.accepted = version.map(str::to_string),
            Received::Nack { kept, .. } => state.accepted.clone_from(kept),
            _ => {}
        }
        // Every state-of-the-world request carries the whole subscription.
        let wildcard = req.resource_names.iter().any(|n| n == WILDCARD)
            || (req.resource_names.is_empty()
                && kind.wildcard_by_default()
                && (first || state.wildcard));
        // Clients repeat the whole subscription in every ACK: compare before building.
        let explicit = || req.resource_names.iter().filter(|n| *n != WILDCARD);
        let same = explicit().count() == state.names.len()
            && explicit().all(|n| state.names.contains(n.as_str()));
        if first || !same || wildcard != state.wildcard {
            // The client drops what it no longer asks for.
            let names = explicit().map(|n| name_of(&self.catalog, n)).collect();
            state.subscribe(wildcard, names);
            state.must_answer = true;
            if !matches!(received, Received::Subscribe(_) | Received::Nack { .. }) {
                return Ok(Received::Subscribe(kind));
            }
        }
        Ok(received)
    }

    /// An incremental request.
    pub fn on_delta(&mut self, req: &DeltaDiscoveryRequest) -> Result<Received, ProtocolError> {
        let kind = self.kind(&req.type_url)?;
        let asked = req.resource_names_subscribe.len()
            + req.resource_names_unsubscribe.len()
            + req.initial_resource_versions.len();
        self.check_count(kind, asked)?;
        let first = self.types[kind as usize].is_none();
        let state = self.types[kind as usize].get_or_insert_with(TypeState::default);
        let error = req.error_detail.as_ref().map(|s| s.message.clone());
        let Some(received) = Self::classify(state, kind, &req.response_nonce, error, None) else {
            return Ok(Received::Stale(kind));
        };
        if first {
            state.wildcard = req.resource_names_subscribe.is_empty() && kind.wildcard_by_default();
            // What a reconnecting client still holds: only what differs is sent.
            for (n, v) in &req.initial_resource_versions {
                state.have.set(&name_of(&self.catalog, n), Some(digest(v)));
            }
        }
        let resubscribes = first
            || !req.resource_names_subscribe.is_empty()
            || !req.resource_names_unsubscribe.is_empty();
        if resubscribes {
            let (mut wildcard, mut names) = (state.wildcard, state.names.clone());
            for n in &req.resource_names_subscribe {
                if n == WILDCARD {
                    wildcard = true;
                } else {
                    names.insert(name_of(&self.catalog, n));
                }
            }
            for n in &req.resource_names_unsubscribe {
                if n == WILDCARD {
                    wildcard = false;
                } else {
                    names.remove(n.as_str());
                }
            }
            if names.len() > self.limits.max_names {
                return Err(ProtocolError::TooManyNames {
                    kind: kind.label(),
                    got: names.len(),
                    max: self.limits.max_names,
                });
            }
            state.subscribe(wildcard, names);
            for n in &req.resource_names_unsubscribe {
                // The client forgets it itself (even one a wildcard still covers); it is
                // not announced as removed.
                state.have.set(&name_of(&self.catalog, n), None);
            }
        }
        state.synced = None;
        Ok(received)
    }

    fn nonce(&mut self) -> String {
        self.nonces += 1;
        self.nonces.to_string()
    }

    /// The next state-of-the-world response due, if any (listeners first, so a client
    /// learns of a service's listener before its endpoints).
    pub fn next_sotw(&mut self) -> Option<DiscoveryResponse> {
        for kind in Kind::ALL {
            let catalog = self.catalog.clone();
            let Some(state) = self.types[kind as usize].as_ref() else {
                continue;
            };
            let (mut updated, removed) = state.changes(kind, &catalog);
            let full = matches!(kind, Kind::Listener | Kind::Cluster);
            let due = state.must_answer || !updated.is_empty() || (full && !removed.is_empty());
            let n = if full { updated.len() } else { piece(&updated) };
            let more = updated.len() > n;
            updated.truncate(n);
            let send: Vec<_> = match (due, full) {
                (false, _) => Vec::new(),
                (true, true) => state.current(kind, &catalog).collect(),
                (true, false) => updated,
            };
            let resources = send.iter().map(|(_, r)| r.body.clone()).collect();
            let sent: Vec<Name> = send.iter().map(|(n, _)| (*n).clone()).collect();
            let nonce = due.then(|| self.nonce());
            let state = self.types[kind as usize].as_mut()?;
            // Routes and endpoints that are gone are not announced in this variant: the
            // client may drop them (their cluster or listener goes).
            state.sent(kind, &catalog, &sent, &removed, !more);
            let Some(nonce) = nonce else {
                continue;
            };
            state.nonce = Some(nonce.clone());
            state.must_answer = false;
            return Some(DiscoveryResponse {
                version_info: catalog.version().to_string(),
                resources,
                type_url: kind.type_url().to_string(),
                nonce,
                ..Default::default()
            });
        }
        None
    }

    /// The next incremental response due, if any.
    pub fn next_delta(&mut self) -> Option<DeltaDiscoveryResponse> {
        for kind in Kind::ALL {
            let catalog = self.catalog.clone();
            let Some(state) = self.types[kind as usize].as_ref() else {
                continue;
            };
            // Names the client holds but no longer asks for were dropped on unsubscribe;
            // what is left in `removed` is gone from the catalog.
            let (mut updated, removed) = state.changes(kind, &catalog);
            let n = piece(&updated);
            let more = updated.len() > n;
            updated.truncate(n);
            let resources: Vec<pb::Resource> = updated
                .iter()
                .map(|(n, r)| pb::Resource {
                    name: n.to_string(),
                    version: r.version.clone(),
                    resource: Some(r.body.clone()),
                    ..Default::default()
                })
                .collect();
            let sent: Vec<Name> = updated.iter().map(|(n, _)| (*n).clone()).collect();
            let due = !resources.is_empty() || !removed.is_empty();
            let nonce = due.then(|| self.nonce());
            let state = self.types[kind as usize].as_mut()?;
            state.sent(kind, &catalog, &sent, &removed, !more);
            let Some(nonce) = nonce else {
                continue;
            };
            state.nonce = Some(nonce.clone());
            return Some(DeltaDiscoveryResponse {
                system_version_info: catalog.version().to_string(),
                resources,
                type_url: kind.type_url().to_string(),
                removed_resources: removed.iter().map(|n| n.to_string()).collect(),
                nonce,
                ..Default::default()
            });
        }
        None
    }
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "protocol_props.rs"]
mod props;
