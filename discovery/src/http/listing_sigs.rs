//! The registry's signatures of the listings agents gossip (docs/ARCHITECTURE.md#signed-gossip):
//! for a catalog answer asked `signed=true`, one signature per service the answer makes an
//! agent snapshot, over [`schema::cert::listing_message`] of that service's hosts as the agent
//! reads them, dated by the answer's `generated_at_ms`. Pure: the caller passes the key, the
//! views and the date.

use std::collections::{BTreeMap, BTreeSet};

use schema::ServiceName;
use schema::api::V1Host;
use schema::cert::{SigningKey, listing_message};

use crate::registry::CatalogEntry;

/// Signatures of the services `current` lists, or (with a `base`, a delta answer) of those
/// whose hosts differ from the base's, a service gone signed as an empty listing. A service
/// with a host the agent could not read as the registry holds it is left unsigned: its
/// signature would not verify anyway.
pub(crate) fn sign(
    signer: &SigningKey,
    current: &CatalogEntry,
    base: Option<&CatalogEntry>,
    generated_at_ms: u64,
) -> BTreeMap<String, String> {
    let digest = |e: &CatalogEntry, s: &str| e.services.get(s).map(|h| h.digest);
    let services: BTreeSet<&String> = match base {
        None => current.services.keys().collect(),
        Some(base) => current
            .services
            .keys()
            .chain(base.services.keys())
            .filter(|s| digest(current, s) != digest(base, s))
            .collect(),
    };
    services
        .into_iter()
        .filter_map(|name| {
            let hosts = current.services.get(name).map_or(&[][..], |h| &h.hosts[..]);
            let sig = sign_listing(signer, name, hosts, generated_at_ms)?;
            Some((name.clone(), sig.to_base64()))
        })
        .collect()
}

/// One service's signature, over its hosts read back as an agent reads them.
fn sign_listing(
    signer: &SigningKey,
    name: &str,
    hosts: &[V1Host],
    generated_at_ms: u64,
) -> Option<schema::cert::Signature> {
    let service = ServiceName::new(name.to_string()).ok()?;
    let endpoints = hosts
        .iter()
        .map(|h| {
            h.to_endpoint()
                .ok()
                .map(|(e, _)| e)
                .filter(|e| e.service == service)
        })
        .collect::<Option<Vec<_>>>()?;
    let msg = listing_message(&service, generated_at_ms, &endpoints)?;
    Some(signer.sign(&msg))
}
