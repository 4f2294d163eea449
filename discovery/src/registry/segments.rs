//! A view's rows cut into one segment per service, each with the hash of its content, so a
//! rebuilt view re-hashes only the services that changed. At 100 000 endpoints, hashing every
//! row on every change cost a tenth of a second of CPU (one JSON encoding per row); comparing
//! rows with the previous view's costs a few milliseconds, and the JSON is only made for the
//! services that differ.
//!
//! The view's index is then a hash over `(service, segment hash)` pairs rather than over the
//! rows themselves: the same content still gives the same index on every replica.

use std::sync::Arc;

use schema::ServiceName;
use sha2::{Digest, Sha256};

use super::rows::Rows;
use crate::delta::Hash;
use crate::store::StoredEndpoint;

/// One service of a view (the list at the same position in [`Rows::services`]) and the
/// hash of its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    pub service: ServiceName,
    /// [`content_hash`] of the service's endpoints: `last_check_in` is not part of it.
    pub hash: Hash,
}

/// The hash of a service's endpoints in key order: SHA-256 over each endpoint's JSON (tags
/// and effective weight included, `last_check_in` excluded), length-prefixed so that two
/// different sequences cannot hash the same bytes.
pub(crate) fn content_hash(rows: &[StoredEndpoint]) -> Hash {
    let mut h = Sha256::new();
    for r in rows {
        // serde_json of the derived form is deterministic (tag maps are BTreeMaps).
        let bytes = serde_json::to_vec(&r.endpoint).unwrap_or_default();
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(&bytes);
    }
    h.finalize().into()
}

/// The index of a view from its segments: the first 53 bits of a SHA-256 over each
/// service's name and hash, in service order. At most 2^53 - 1 (it survives a JSON number in
/// any client), never 0 (clients use 0 for "no index yet").
pub(crate) fn index(segments: &[Segment]) -> u64 {
    let mut h = Sha256::new();
    for s in segments {
        let name = s.service.as_str().as_bytes();
        h.update((name.len() as u64).to_be_bytes());
        h.update(name);
        h.update(s.hash);
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 11).max(1)
}

/// What cutting a view found, beside its segments.
#[derive(Debug)]
pub(crate) struct Cut {
    pub segments: Vec<Segment>,
    /// Every row equals the previous view's, check-in times included.
    pub identical: bool,
}

/// The segments of `rows`. A service whose endpoints equal those it had in `previous` (a
/// view's rows and segments) keeps its hash without encoding anything; one whose list is the
/// very allocation it had there is not even compared.
pub(crate) fn cut(rows: &Rows, previous: Option<(&Rows, &[Segment])>) -> Cut {
    let mut segments = Vec::with_capacity(rows.services().len());
    let mut identical = previous.is_some_and(|(p, _)| p.services().len() == rows.services().len());
    for (i, group) in rows.services().iter().enumerate() {
        let Some(service) = group.first().map(|r| &r.endpoint.service) else {
            continue;
        };
        let before = previous.and_then(|(prows, psegs)| {
            let j = psegs.binary_search_by(|s| s.service.cmp(service)).ok()?;
            Some((prows.services().get(j)?, psegs.get(j)?, j))
        });
        let hash = match before {
            Some((old, seg, j)) if Arc::ptr_eq(old, group) => {
                identical = identical && i == j;
                seg.hash
            }
            Some((old, seg, j))
                if old.len() == group.len()
                    && old
                        .iter()
                        .zip(group.iter())
                        .all(|(a, b)| a.endpoint == b.endpoint) =>
            {
                // Check-in times and weight overrides are outside the hash but inside the view.
                identical = identical && i == j && old[..] == group[..];
                seg.hash
            }
            _ => {
                identical = false;
                content_hash(group)
            }
        };
        segments.push(Segment {
            service: service.clone(),
            hash,
        });
    }
    Cut {
        segments,
        identical,
    }
}

#[cfg(test)]
mod tests;
