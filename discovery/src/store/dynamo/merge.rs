//! lyft's v1 tag merge on DynamoDB. The tags are one JSON string attribute, which no
//! UpdateItem expression can merge into, so a merge is an optimistic compare-and-set: read
//! the row (strongly consistent), merge in memory, and write only if the stored `tags` are
//! still exactly the string read. A concurrent check-in of the same endpoint (through
//! another replica) makes the write fail its condition, and the merge is redone on what that
//! one stored: neither update is lost.

use std::collections::BTreeSet;

use aws_sdk_dynamodb::types::AttributeValue;
use schema::{Endpoint, Tags};

use super::{DynamoStore, retry, row};
use crate::store::{CheckInOutcome, StoreError, merge_tags};

/// What a check-in write requires of the stored `tags` attribute.
#[derive(Debug, Clone, Copy)]
pub(super) enum TagGuard<'a> {
    /// Nothing (a plain check-in replaces the tags).
    Any,
    /// No tags stored (nor any row).
    Absent,
    /// Exactly this JSON stored: the value a merge was computed from.
    Equals(&'a str),
}

/// A row as a tag merge reads it.
struct MergeBase {
    /// The stored `tags` string (`None`: no tags attribute).
    raw: Option<String>,
    /// The attribute is there but not a string (a foreign writer's): overwritten unguarded.
    foreign: bool,
    tags: Tags,
    last_check_in_ms: Option<u64>,
}

/// A merge that keeps losing the race to other writers of the same row gives up after this
/// many reads (each loss means another check-in of the same endpoint just landed).
const MERGE_ATTEMPTS: usize = 8;

impl DynamoStore {
    /// The row's stored tags (raw and parsed) and check-in time, read consistently, for a
    /// merge. `None`: no row.
    async fn read_for_merge(&self, ep: &Endpoint) -> Result<Option<MergeBase>, StoreError> {
        let req = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(row::key(&ep.service, ep.ip, ep.port)))
            .consistent_read(true)
            .projection_expression("#tags, #lci")
            .expression_attribute_names("#tags", row::TAGS)
            .expression_attribute_names("#lci", row::LAST_CHECK_IN);
        let out = retry::call("GetItem", || req.clone().send()).await?;
        let Some(item) = out.item.filter(|i| !i.is_empty()) else {
            return Ok(None);
        };
        let (raw, foreign) = match item.get(row::TAGS) {
            Some(AttributeValue::S(t)) => (Some(t.clone()), false),
            None | Some(AttributeValue::Null(_)) => (None, false),
            Some(_) => (None, true),
        };
        // Tags a foreign writer left unreadable are replaced rather than merged, like any
        // other unreadable row this store overwrites.
        let tags = match raw.as_deref().map(serde_json::from_str::<Tags>) {
            Some(Ok(tags)) => tags,
            Some(Err(e)) => {
                tracing::warn!(endpoint = %ep.key(), error = %e, "unreadable stored tags: replacing them");
                Tags::default()
            }
            None => Tags::default(),
        };
        let newer = match item.get(row::LAST_CHECK_IN) {
            Some(AttributeValue::N(v)) => v.parse::<u64>().ok(),
            _ => None,
        };
        Ok(Some(MergeBase {
            raw,
            foreign,
            tags,
            last_check_in_ms: newer,
        }))
    }

    /// [`crate::Store::check_in_merging_tags`] for DynamoDB.
    pub(super) async fn merge_check_in(
        &self,
        endpoint: &Endpoint,
        sent: &BTreeSet<String>,
        now_ms: u64,
    ) -> Result<CheckInOutcome, StoreError> {
        for _ in 0..MERGE_ATTEMPTS {
            let base = self.read_for_merge(endpoint).await?;
            if base
                .as_ref()
                .and_then(|b| b.last_check_in_ms)
                .is_some_and(|t| t > now_ms)
            {
                // A newer check-in is stored: like check_in, not accepted.
                return Ok(CheckInOutcome::default());
            }
            let mut merged = endpoint.clone();
            let guard = match &base {
                Some(b) => {
                    merged.tags = merge_tags(&b.tags, &endpoint.tags, sent)?;
                    match (&b.raw, b.foreign) {
                        (_, true) => TagGuard::Any,
                        (Some(raw), false) => TagGuard::Equals(raw),
                        (None, false) => TagGuard::Absent,
                    }
                }
                None => TagGuard::Absent,
            };
            if let Some(visible) = self.check_in_one(&merged, now_ms, guard).await? {
                return Ok(CheckInOutcome {
                    accepted: 1,
                    changed_services: if visible {
                        vec![endpoint.service.clone()]
                    } else {
                        Vec::new()
                    },
                });
            }
        }
        Err(StoreError::Unavailable(format!(
            "tag merge of {} lost {MERGE_ATTEMPTS} races with other writers",
            endpoint.key()
        )))
    }
}

/// Against a real moto server. moto does not evaluate a condition and apply the write as one
/// step (two requests in flight can both pass), so racing real requests cannot test the
/// compare-and-set there; this test makes the lost race happen in order instead.
#[cfg(test)]
#[path = "../../../tests/support/moto.rs"]
mod moto;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use std::num::NonZeroU16;

    use schema::{ServiceName, TagKey, TagValue};

    use super::*;
    use crate::Store;
    use crate::conformance::T0;
    use crate::dynamo::init_table;

    fn with_tag(key: &str) -> Endpoint {
        let mut ep = Endpoint::new(
            ServiceName::new("web").unwrap(),
            "10.0.0.1".parse().unwrap(),
            NonZeroU16::new(80).unwrap(),
        );
        ep.tags
            .extra
            .insert(TagKey::new(key).unwrap(), TagValue::new("v").unwrap());
        ep
    }

    fn sent(key: &str) -> BTreeSet<String> {
        [key.to_string()].into()
    }

    #[tokio::test]
    async fn a_merge_computed_from_tags_that_changed_since_is_not_written() {
        let moto = moto::Moto::start();
        let cfg = moto.config("merge-race");
        init_table(&cfg).await.unwrap();
        let store = DynamoStore::connect(&cfg).await.unwrap();
        store
            .check_in_merging_tags(&with_tag("a"), &sent("a"), T0)
            .await
            .unwrap();
        // Replica 1 reads the row and merges `b` into it...
        let base = store.read_for_merge(&with_tag("b")).await.unwrap().unwrap();
        let mut stale = with_tag("b");
        stale.tags = merge_tags(&base.tags, &stale.tags, &sent("b")).unwrap();
        // ...while replica 2 merges `c` in.
        store
            .check_in_merging_tags(&with_tag("c"), &sent("c"), T0 + 1)
            .await
            .unwrap();
        // Replica 1's write would drop `c`: its condition refuses it.
        let raw = base.raw.as_deref().unwrap();
        let write = store.check_in_one(&stale, T0 + 2, TagGuard::Equals(raw));
        assert_eq!(write.await.unwrap(), None);
        // The full merge redoes the read and keeps all three.
        let out = store
            .check_in_merging_tags(&with_tag("b"), &sent("b"), T0 + 2)
            .await
            .unwrap();
        assert_eq!(out.accepted, 1);
        let rows = store.list_all().await.unwrap();
        let keys: Vec<&str> = rows[0]
            .endpoint
            .tags
            .extra
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(keys, ["a", "b", "c"]);
    }
}
