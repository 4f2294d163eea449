//! `DynamoStore`: the [`Store`] on one DynamoDB table, shared by any number of registry
//! replicas (docs/ARCHITECTURE.md#stores).
//!
//! The item layout is in `row` (partition key `service`, sort key `endpoint` = `ip:port`);
//! retries and timeouts in `retry`; table creation ([`init_table`]) in `table`. Every method is a set of
//! single-item operations guarded by condition expressions, so concurrent registries need
//! no coordination:
//!
//! - v1 check-in with lyft's tag merge: `GetItem`, merge, then the same `UpdateItem` on
//!   condition that the stored tags are still the ones read (in `merge`);
//! - check-in: `UpdateItem ... IF attribute_not_exists(last_check_in) OR last_check_in <= now`
//!   (never moves time backwards; `weight_override` is not touched, so it survives), with
//!   `ReturnValues=ALL_OLD` to tell a real change from a re-check-in;
//! - reads: eventually consistent, paginated `Query` (one service) or `Scan`;
//! - deregister, set_weight: `Query` the keys on the IP (sort-key prefix), then one
//!   conditional write per key;
//! - delete_expired: `Scan` for candidates, then `DeleteItem ... IF last_check_in < cutoff`.
//!
//! Rows this code cannot parse (written by a foreign tool) are skipped with a warning, so one
//! bad row never takes a whole service off the air.

mod merge;
mod retry;
mod row;
mod table;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::config::{Credentials, Region};
use aws_sdk_dynamodb::types::ReturnValue;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use futures_util::StreamExt;
use schema::{Endpoint, ServiceName, Weight};

use crate::store::{CheckInOutcome, Store, StoreError, StoredEndpoint};
use merge::TagGuard;
use row::{Item, n, s};

pub use table::init_table;

/// Requests in flight at once for one multi-row operation (a v2 check-in of up to 256
/// endpoints, a weight fan-out, a sweep). DynamoDB has no batch conditional update.
const FAN_OUT: usize = 16;

/// Where the table is and how long rows live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamoConfig {
    /// Table name.
    pub table: String,
    /// Endpoint URL override, for a local emulator (`http://127.0.0.1:8000`). With it and no
    /// credentials in the environment, static dummy credentials are used.
    pub endpoint: Option<String>,
    /// AWS region; `None` takes the standard chain (`AWS_REGION`, profile), or `us-east-1`
    /// when `endpoint` is set (emulators ignore it).
    pub region: Option<String>,
    /// The registry's endpoint TTL: `expires_at = last_check_in + ttl`. DynamoDB's own TTL
    /// deletion is only garbage collection (it runs up to days late); liveness is decided by
    /// the registry from `last_check_in`.
    pub ttl: Duration,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        DynamoConfig {
            table: "tidings-endpoints".to_string(),
            endpoint: None,
            region: None,
            ttl: Duration::from_secs(180),
        }
    }
}

/// The DynamoDB store. Cheap to clone (the SDK client is reference-counted).
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
    ttl: Duration,
}

impl DynamoStore {
    /// Builds a client for `cfg` (credentials from the standard AWS chain). Sends nothing to
    /// DynamoDB: a store can be built while DynamoDB is down, and works once it is back.
    pub async fn connect(cfg: &DynamoConfig) -> Result<DynamoStore, StoreError> {
        check_table_name(&cfg.table)?;
        // The SDK's own retries are off: `retry::call` is the one retry loop, so the worst
        // case of a call is known (see `retry::CALL_DEADLINE`).
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(retry::CONNECT_TIMEOUT)
            .operation_attempt_timeout(retry::ATTEMPT_TIMEOUT)
            .operation_timeout(retry::ATTEMPT_TIMEOUT)
            .build();
        // rustls on ring, not the SDK's default aws-lc-rs: the same TLS to AWS (native roots)
        // without a large C build. Used for DynamoDB and the credential providers alike.
        let https = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(https)
            .timeout_config(timeouts)
            .retry_config(RetryConfig::disabled());
        match (&cfg.region, &cfg.endpoint) {
            (Some(region), _) => loader = loader.region(Region::new(region.clone())),
            // Emulators ignore the region, and the default chain could otherwise go looking
            // for it on the EC2 metadata service.
            (None, Some(_)) => loader = loader.region(Region::from_static("us-east-1")),
            (None, None) => {}
        }
        if let Some(url) = &cfg.endpoint {
            loader = loader.endpoint_url(url);
            if !credentials_in_env() {
                let dummy = Credentials::new(
                    "tidings-local",
                    "tidings-local",
                    None,
                    None,
                    "tidings-dummy",
                );
                loader = loader.credentials_provider(dummy);
            }
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(StoreError::Unavailable(
                "no AWS region: set the DynamoDB region in the config or AWS_REGION".to_string(),
            ));
        }
        Ok(DynamoStore {
            client: Client::new(&sdk),
            table: cfg.table.clone(),
            ttl: cfg.ttl,
        })
    }

    /// The table this store reads and writes.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// `expires_at` for a check-in at `now_ms`: epoch seconds, rounded up.
    fn expires_at(&self, now_ms: u64) -> u64 {
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        now_ms.saturating_add(ttl_ms).div_ceil(1000)
    }

    /// Writes one endpoint. `Ok(None)`: a newer check-in is already stored (or, with a
    /// `guard`, the stored tags are no longer the ones it names); `Ok(Some(c))`: stored, `c`
    /// telling whether readers see a difference.
    async fn check_in_one(
        &self,
        ep: &Endpoint,
        now_ms: u64,
        guard: TagGuard<'_>,
    ) -> Result<Option<bool>, StoreError> {
        let tags = serde_json::to_string(&ep.tags)
            .map_err(|e| StoreError::Corrupt(format!("encoding tags of {}: {e}", ep.key())))?;
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
        let req = req.update_expression(update);
        match retry::call("UpdateItem", || req.clone().send()).await {
            Ok(out) => {
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

    /// Every item of one service, or only those whose sort key starts with `prefix`.
    /// `keys_only` fetches just the primary keys.
    async fn query(
        &self,
        service: &ServiceName,
        prefix: Option<String>,
        keys_only: bool,
    ) -> Result<Vec<Item>, StoreError> {
        let mut req = self
            .client
            .query()
            .table_name(&self.table)
            .expression_attribute_names("#s", row::SERVICE)
            .expression_attribute_values(":s", s(service.as_str()));
        // DynamoDB rejects names that no expression uses, so `#e` is declared only when the
        // key condition or the projection needs it.
        if prefix.is_some() || keys_only {
            req = req.expression_attribute_names("#e", row::ENDPOINT);
        }
        let mut condition = "#s = :s".to_string();
        if let Some(prefix) = prefix {
            condition.push_str(" AND begins_with(#e, :p)");
            req = req.expression_attribute_values(":p", s(prefix));
        }
        if keys_only {
            req = req.projection_expression("#s, #e");
        }
        let req = req.key_condition_expression(condition);
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page_req = req.clone().set_exclusive_start_key(start.clone());
            let page = retry::call("Query", || page_req.clone().send()).await?;
            items.extend(page.items.unwrap_or_default());
            match next_page(start, page.last_evaluated_key)? {
                Some(next) => start = Some(next),
                None => return Ok(items),
            }
        }
    }

    /// Every item of the table matching `filter` (a `FilterExpression` over the given names
    /// and values), stopping once `max` items were collected.
    async fn scan(
        &self,
        filter: Option<Filter>,
        keys_only: bool,
        max: usize,
    ) -> Result<Vec<Item>, StoreError> {
        let mut req = self.client.scan().table_name(&self.table);
        if keys_only {
            req = req
                .projection_expression("#s, #e")
                .expression_attribute_names("#s", row::SERVICE)
                .expression_attribute_names("#e", row::ENDPOINT);
        }
        if let Some(f) = filter {
            req = req
                .filter_expression(f.expression)
                .expression_attribute_names(f.name.0, f.name.1);
            for (placeholder, value) in f.values {
                req = req.expression_attribute_values(placeholder, value);
            }
        }
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page_req = req.clone().set_exclusive_start_key(start.clone());
            let page = retry::call("Scan", || page_req.clone().send()).await?;
            items.extend(page.items.unwrap_or_default());
            if items.len() >= max {
                items.truncate(max);
                return Ok(items);
            }
            match next_page(start, page.last_evaluated_key)? {
                Some(next) => start = Some(next),
                None => return Ok(items),
            }
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
            Ok(out) => Ok(out.attributes().is_some_and(|old| !old.is_empty())),
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
            .update_expression("SET #w = :w")
            .condition_expression("attribute_exists(#s)")
            .expression_attribute_names("#w", row::WEIGHT_OVERRIDE)
            .expression_attribute_names("#s", row::SERVICE)
            .expression_attribute_values(":w", n(weight.get()));
        match retry::call("UpdateItem", || req.clone().send()).await {
            Ok(_) => Ok(true),
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
}

/// One `FilterExpression` with its name and value placeholders.
struct Filter {
    expression: &'static str,
    name: (&'static str, &'static str),
    values: Vec<(&'static str, aws_sdk_dynamodb::types::AttributeValue)>,
}

/// The next page's start key. A server that hands back the key it was given would loop us
/// forever; treat that as unavailable rather than trust it.
fn next_page(sent: Option<Item>, got: Option<Item>) -> Result<Option<Item>, StoreError> {
    match got {
        Some(key) if key.is_empty() => Ok(None),
        Some(key) if Some(&key) == sent.as_ref() => Err(StoreError::Unavailable(
            "DynamoDB returned the same page key twice".to_string(),
        )),
        other => Ok(other),
    }
}

/// Parses items, skipping (and logging) the ones a foreign writer left.
fn decode_all(items: &[Item]) -> Vec<StoredEndpoint> {
    items
        .iter()
        .filter_map(|item| match row::decode(item) {
            Ok(stored) => Some(stored),
            Err(why) => {
                tracing::warn!(row = %row::describe_key(item), %why, "skipping unreadable DynamoDB row");
                None
            }
        })
        .collect()
}

/// Whether the environment names credentials for the standard chain. Only consulted with an
/// endpoint override: an emulator accepts any key, but the chain would otherwise end at the
/// EC2 metadata service and fail slowly.
fn credentials_in_env() -> bool {
    [
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ]
    .iter()
    .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()))
}

/// DynamoDB's table-name rule (3–255 of `[A-Za-z0-9_.-]`), checked up front so a typo in the
/// config is a clear error rather than a ValidationException on the first check-in.
fn check_table_name(name: &str) -> Result<(), StoreError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
    if (3..=255).contains(&name.len()) && name.chars().all(ok_char) {
        Ok(())
    } else {
        Err(StoreError::Unavailable(format!(
            "invalid DynamoDB table name {name:?}: 3-255 characters of A-Z a-z 0-9 _ . -"
        )))
    }
}

#[async_trait]
impl Store for DynamoStore {
    fn kind(&self) -> &'static str {
        "dynamodb"
    }

    async fn check_in(
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

    async fn check_in_merging_tags(
        &self,
        endpoint: &Endpoint,
        sent: &BTreeSet<String>,
        now_ms: u64,
    ) -> Result<CheckInOutcome, StoreError> {
        self.merge_check_in(endpoint, sent, now_ms).await
    }

    async fn list_service(&self, service: &ServiceName) -> Result<Vec<StoredEndpoint>, StoreError> {
        Ok(decode_all(&self.query(service, None, false).await?))
    }

    async fn list_all(&self) -> Result<Vec<StoredEndpoint>, StoreError> {
        Ok(decode_all(&self.scan(None, false, usize::MAX).await?))
    }

    async fn list_repo(&self, repo: &str) -> Result<Vec<StoredEndpoint>, StoreError> {
        // A filtered Scan rather than a GSI: the repo route is rare (lyft/discovery left it
        // uncached for that reason), while a GSI would double the write cost of every check-in.
        let filter = Filter {
            expression: "#repo = :repo",
            name: ("#repo", row::REPO),
            values: vec![(":repo", s(repo))],
        };
        Ok(decode_all(
            &self.scan(Some(filter), false, usize::MAX).await?,
        ))
    }

    async fn deregister(
        &self,
        service: &ServiceName,
        ip: IpAddr,
        port: Option<NonZeroU16>,
    ) -> Result<usize, StoreError> {
        if let Some(port) = port {
            let deleted = self.delete(row::key(service, ip, port), None).await?;
            return Ok(usize::from(deleted));
        }
        let keys: Vec<Item> = self
            .query(service, Some(row::ip_prefix(ip)), true)
            .await?
            .iter()
            .filter_map(row::key_of)
            .collect();
        self.count_each(keys, |key| self.delete(key, None)).await
    }

    async fn set_weight(
        &self,
        service: &ServiceName,
        ip: Option<IpAddr>,
        weight: Weight,
    ) -> Result<usize, StoreError> {
        let keys: Vec<Item> = self
            .query(service, ip.map(row::ip_prefix), true)
            .await?
            .iter()
            .filter_map(row::key_of)
            .collect();
        self.count_each(keys, |key| self.set_weight_one(key, weight))
            .await
    }

    async fn delete_expired(&self, cutoff_ms: u64, max: usize) -> Result<usize, StoreError> {
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
        let keys: Vec<Item> = self
            .scan(Some(filter), true, max)
            .await?
            .iter()
            .filter_map(row::key_of)
            .collect();
        // Re-checked at delete: a row that checked in since the Scan stays.
        self.count_each(keys, |key| self.delete(key, Some(cutoff_ms)))
            .await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn table_names_follow_dynamodb_rules() {
        assert!(check_table_name("tidings-endpoints").is_ok());
        assert!(check_table_name("a.b_c-1").is_ok());
        for bad in ["", "ab", "has space", "slash/no", &"x".repeat(256)] {
            assert!(check_table_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_repeated_page_key_is_an_error_not_a_loop() {
        let key = row::key(
            &ServiceName::new("web").unwrap(),
            "10.0.0.1".parse().unwrap(),
            NonZeroU16::MIN,
        );
        assert!(next_page(Some(key.clone()), Some(key.clone())).is_err());
        assert_eq!(next_page(None, Some(key.clone())).unwrap(), Some(key));
        assert_eq!(next_page(None, Some(Item::new())).unwrap(), None);
        assert_eq!(next_page(None, None).unwrap(), None);
    }
}
