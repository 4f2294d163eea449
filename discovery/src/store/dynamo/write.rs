//! The store's writes: the conditional single-item writes every method is made of, and
//! the echo of what each one left into the mirror (read-your-writes).

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::num::NonZeroU16;

use aws_sdk_dynamodb::types::ReturnValue;
use futures_util::StreamExt;
use schema::{Endpoint, ServiceName, Weight};

use super::merge::TagGuard;
use super::pages::{self, Filter};
use super::row::{self, Item, n, s};
use super::{DynamoStore, FAN_OUT, retry};
use crate::store::mirror::{Change, Stamp};
use crate::store::{CheckInOutcome, StoreError};

impl DynamoStore {
    /// Writes one endpoint. `Ok(None)`: a newer check-in is already stored (or, with a
    /// `guard`, the stored tags are no longer the ones it names); `Ok(Some(c))`: stored, `c`
    /// telling whether readers see a difference.
    pub(super) async fn check_in_one(
        &self,
        ep: &Endpoint,
        now_ms: u64,
        guard: TagGuard<'_>,
    ) -> Result<Option<bool>, StoreError> {
        let tags = serde_json::to_string(&ep.tags)
            .map_err(|e| StoreError::Corrupt(format!("encoding tags of {}: {e}", ep.key())))?;
        // What the write sets, as attributes: with the old item it returns, the new one.
        let set: Item = [
            (row::SERVICE, s(ep.service.as_str())),
            (row::ENDPOINT, s(row::sort_key(ep.ip, ep.port))),
            (row::IP, s(ep.ip.to_string())),
            (row::PORT, n(ep.port)),
            (row::REVISION, s(ep.revision.as_str())),
            (row::TAGS, s(tags.clone())),
            (row::LAST_CHECK_IN, n(now_ms)),
            (row::EXPIRES_AT, n(self.expires_at(now_ms))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut update =
            "SET #ip = :ip, #port = :port, #rev = :rev, #tags = :tags, #lci = :now, #exp = :exp"
                .to_string();
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(row::key(&ep.service, ep.ip, ep.port)))
            .expression_attribute_names("#ip", row::IP)
            .expression_attribute_names("#port", row::PORT)
            .expression_attribute_names("#rev", row::REVISION)
            .expression_attribute_names("#tags", row::TAGS)
            .expression_attribute_names("#lci", row::LAST_CHECK_IN)
            .expression_attribute_names("#exp", row::EXPIRES_AT)
            .expression_attribute_names("#repo", row::REPO)
            .expression_attribute_names("#ver", row::VERSION)
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":ip", s(ep.ip.to_string()))
            .expression_attribute_values(":port", n(ep.port))
            .expression_attribute_values(":rev", s(ep.revision.as_str()))
            .expression_attribute_values(":tags", s(tags))
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(":exp", n(self.expires_at(now_ms)))
            // `<=`, not `<`: a retried request with the same clock reading is still accepted
            // (if the first attempt had landed, ALL_OLD is then our own write, so that retry
            // reports no change; the registry's periodic re-read still sees it).
            // A non-numeric last_check_in (a foreign writer's) would never compare true, and
            // the row could never be checked in again; such a row is overwritten instead.
            .expression_attribute_values(":num", s("N"))
            .return_values(ReturnValue::AllOld);
        let mut condition =
            "(attribute_not_exists(#lci) OR NOT attribute_type(#lci, :num) OR #lci <= :now)"
                .to_string();
        match guard {
            TagGuard::Any => {}
            TagGuard::Absent => condition.push_str(" AND attribute_not_exists(#tags)"),
            TagGuard::Equals(old) => {
                condition.push_str(" AND #tags = :old_tags");
                req = req.expression_attribute_values(":old_tags", s(old));
            }
        }
        req = req.condition_expression(condition);
        match &ep.service_repo_name {
            Some(repo) => {
                update.push_str(", #repo = :repo");
                req = req.expression_attribute_values(":repo", s(repo.as_str()));
            }
            // A host that stops sending a repo name loses it, like any other field.
            None => update.push_str(" REMOVE #repo"),
        }
        update.push_str(" ADD #ver :one");
        let req = req.update_expression(update);
        match retry::call("UpdateItem", || req.clone().send()).await {
            Ok(out) => {
                let old = out.attributes().filter(|o| !o.is_empty());
                let repo = ep.service_repo_name.as_ref().map(|r| r.as_str());
                self.echo_upsert(&row::after_check_in(old, set, repo));
                let changed = match out.attributes() {
                    None => true,
                    Some(old) if old.is_empty() => true,
                    Some(old) => match row::decode(old) {
                        Ok(old) => row::visible_change(&old, ep),
                        Err(why) => {
                            tracing::warn!(row = %row::describe_key(old), %why, "overwrote an unreadable row");
                            true
                        }
                    },
                };
                Ok(Some(changed))
            }
            Err(e) if e.is_condition_failed() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes one item by key, under an optional condition on `last_check_in`. `Ok(true)` if
    /// an item was deleted.
    async fn delete(&self, key: Item, older_than_ms: Option<u64>) -> Result<bool, StoreError> {
        let mut req = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .return_values(ReturnValue::AllOld);
        if let Some(cutoff) = older_than_ms {
            req = req
                .condition_expression("#lci < :cutoff")
                .expression_attribute_names("#lci", row::LAST_CHECK_IN)
                .expression_attribute_values(":cutoff", n(cutoff));
        }
        match retry::call("DeleteItem", || req.clone().send()).await {
            Ok(out) => {
                let Some(old) = out.attributes().filter(|old| !old.is_empty()) else {
                    return Ok(false);
                };
                let change = match (row::decode(old), row::endpoint_key(old), row::stamp(old)) {
                    (Ok(r), _, _) => Some(Change::Remove {
                        key: r.endpoint.key(),
                        stamp: Stamp {
                            last_check_in_ms: r.last_check_in_ms,
                            version: row::version(old),
                        },
                    }),
                    (Err(_), Some(key), Some(stamp)) => Some(Change::Forget { key, stamp }),
                    _ => None,
                };
                if let Some(change) = change {
                    self.follow.echo(change);
                }
                Ok(true)
            }
            Err(e) if e.is_condition_failed() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Sets the weight override on one existing item. `Ok(false)` if it vanished meanwhile
    /// (the condition keeps UpdateItem from resurrecting it as a bare row).
    async fn set_weight_one(&self, key: Item, weight: Weight) -> Result<bool, StoreError> {
        let req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .update_expression("SET #w = :w ADD #ver :one")
            .condition_expression("attribute_exists(#s)")
            .expression_attribute_names("#w", row::WEIGHT_OVERRIDE)
            .expression_attribute_names("#s", row::SERVICE)
            .expression_attribute_names("#ver", row::VERSION)
            .expression_attribute_values(":w", n(weight.get()))
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::AllNew);
        match retry::call("UpdateItem", || req.clone().send()).await {
            Ok(out) => {
                if let Some(new) = out.attributes() {
                    self.echo_upsert(new);
                }
                Ok(true)
            }
            Err(e) if e.is_condition_failed() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs `op` on every key, [`FAN_OUT`] at a time, and counts the `true`s.
    async fn count_each<F, Fut>(&self, keys: Vec<Item>, op: F) -> Result<usize, StoreError>
    where
        F: Fn(Item) -> Fut,
        Fut: std::future::Future<Output = Result<bool, StoreError>>,
    {
        let mut results = futures_util::stream::iter(keys)
            .map(op)
            .buffer_unordered(FAN_OUT);
        let mut count = 0;
        while let Some(done) = results.next().await {
            count += usize::from(done?);
        }
        Ok(count)
    }

    /// [`Store::check_in`], before the mirror hears of a failure.
    pub(super) async fn check_in_all(
        &self,
        endpoints: &[Endpoint],
        now_ms: u64,
    ) -> Result<CheckInOutcome, StoreError> {
        // One write per key: a request naming a key twice is stored as its last occurrence
        // (as the in-memory store ends up), and each occurrence counts as accepted.
        let mut last: HashMap<(&ServiceName, IpAddr, NonZeroU16), (usize, usize)> = HashMap::new();
        for (i, ep) in endpoints.iter().enumerate() {
            let entry = last.entry((&ep.service, ep.ip, ep.port)).or_insert((i, 0));
            *entry = (i, entry.1 + 1);
        }
        // Indices, not references, go through the stream: a closure taking a borrowed
        // argument trips the higher-ranked lifetime check inside `async_trait`.
        let mut writes: Vec<(usize, usize)> = last.values().map(|&(i, times)| (i, times)).collect();
        writes.sort_by_key(|&(i, _)| endpoints[i].key());
        let mut results = futures_util::stream::iter(writes)
            .map(|(i, times)| async move {
                let written = self
                    .check_in_one(&endpoints[i], now_ms, TagGuard::Any)
                    .await;
                (i, times, written)
            })
            .buffer_unordered(FAN_OUT);
        let mut accepted = 0;
        let mut changed = BTreeSet::new();
        while let Some((i, times, result)) = results.next().await {
            if let Some(visible) = result? {
                accepted += times;
                if visible {
                    changed.insert(endpoints[i].service.clone());
                }
            }
        }
        Ok(CheckInOutcome {
            accepted,
            changed_services: changed.into_iter().collect(),
        })
    }

    pub(super) async fn deregister_rows(
        &self,
        service: &ServiceName,
        ip: IpAddr,
        port: Option<NonZeroU16>,
    ) -> Result<usize, StoreError> {
        if let Some(port) = port {
            let deleted = self.delete(row::key(service, ip, port), None).await?;
            return Ok(usize::from(deleted));
        }
        let keys: Vec<Item> = pages::query(
            &self.client,
            &self.table,
            service,
            Some(row::ip_prefix(ip)),
            true,
        )
        .await?
        .iter()
        .filter_map(row::key_of)
        .collect();
        self.count_each(keys, |key| self.delete(key, None)).await
    }

    pub(super) async fn set_weight_rows(
        &self,
        service: &ServiceName,
        ip: Option<IpAddr>,
        weight: Weight,
    ) -> Result<usize, StoreError> {
        let keys: Vec<Item> = pages::query(
            &self.client,
            &self.table,
            service,
            ip.map(row::ip_prefix),
            true,
        )
        .await?
        .iter()
        .filter_map(row::key_of)
        .collect();
        self.count_each(keys, |key| self.set_weight_one(key, weight))
            .await
    }

    pub(super) async fn delete_expired_rows(
        &self,
        cutoff_ms: u64,
        max: usize,
    ) -> Result<usize, StoreError> {
        if max == 0 {
            return Ok(0);
        }
        // The type test first: a row with a non-numeric last_check_in is not comparable
        // (DynamoDB says false, moto fails the whole Scan), and it is not ours to sweep.
        let filter = Filter {
            expression: "attribute_type(#lci, :num) AND #lci < :cutoff",
            name: ("#lci", row::LAST_CHECK_IN),
            values: vec![(":cutoff", n(cutoff_ms)), (":num", s("N"))],
        };
        let keys: Vec<Item> = pages::scan(&self.client, &self.table, Some(filter), true, max)
            .await?
            .iter()
            .filter_map(row::key_of)
            .collect();
        // Re-checked at delete: a row that checked in since the Scan stays.
        self.count_each(keys, |key| self.delete(key, Some(cutoff_ms)))
            .await
    }
}
