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
//! - reads: from the mirror of the table its stream keeps (in `follow`, fed by `stream`)
//!   while that is current; else eventually consistent, paginated `Query` (one service) or
//!   `Scan` (in `pages`);
//! - deregister, set_weight: `Query` the keys on the IP (sort-key prefix), then one
//!   conditional write per key;
//! - delete_expired: `Scan` for candidates, then `DeleteItem ... IF last_check_in < cutoff`.
//!
//! Every write returns the item it left or removed, and the store applies it to its mirror at
//! once, so a replica reads its own writes without waiting for the stream.
//!
//! Rows this code cannot parse (written by a foreign tool) are skipped with a warning, so one
//! bad row never takes a whole service off the air.

mod follow;
mod merge;
mod pages;
mod retry;
mod row;
mod stream;
mod table;
mod write;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::config::{Credentials, Region};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use schema::{Endpoint, ServiceName, Weight};

use crate::store::mirror::{Change, Mirror};
use crate::store::{
    CheckInOutcome, FollowStats, ServiceRows, Store, StoreError, StoredEndpoint, group_by_service,
};
use follow::Follow;
use pages::{Filter, decode_all};
use row::{Item, s};

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
    /// How often the table's stream is read for other replicas' writes (`stream_poll`).
    pub stream_poll: Duration,
}

impl DynamoConfig {
    /// The default [`DynamoConfig::stream_poll`].
    pub const DEFAULT_STREAM_POLL: Duration = Duration::from_secs(1);
}

impl Default for DynamoConfig {
    fn default() -> Self {
        DynamoConfig {
            table: "tidings-endpoints".to_string(),
            endpoint: None,
            region: None,
            ttl: Duration::from_secs(180),
            stream_poll: Self::DEFAULT_STREAM_POLL,
        }
    }
}

/// The DynamoDB store. Cheap to clone (the SDK clients are reference-counted); clones share
/// one mirror and one stream follower.
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    streams: aws_sdk_dynamodbstreams::Client,
    table: String,
    ttl: Duration,
    follow: Arc<Follow>,
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
            streams: aws_sdk_dynamodbstreams::Client::new(&sdk),
            table: cfg.table.clone(),
            ttl: cfg.ttl,
            follow: Arc::new(Follow::new(cfg.stream_poll)),
        })
    }

    /// Starts following the table's stream (once; later calls only subscribe): from then on
    /// reads are answered from the mirror whenever it is current. The returned signal moves
    /// when the stream brings a change readers can see. A store that is never asked to
    /// follow reads the table on every call.
    pub fn follow_stream(&self) -> tokio::sync::watch::Receiver<u64> {
        let changes = self.follow.subscribe();
        if !self
            .follow
            .started
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let link = stream::Link {
                db: self.client.clone(),
                streams: self.streams.clone(),
                table: self.table.clone(),
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(stream::run(link, Arc::downgrade(&self.follow)));
                }
                Err(_) => {
                    tracing::warn!("no async runtime: not following the DynamoDB stream");
                    self.follow
                        .started
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
        changes
    }

    /// Test support (feature `conformance`): the follower's next round reads the stream with
    /// iterators the service refuses, a gap it must recover from without losing a write.
    #[cfg(any(test, feature = "conformance"))]
    #[doc(hidden)]
    pub fn spoil_stream_iterators(&self) {
        self.follow.spoil_iterators();
    }

    /// Whether reads are answered from the mirror now (the stream is followed and current).
    pub fn stream_followed(&self) -> bool {
        self.follow.fresh()
    }

    /// A store call's result; a table that failed to answer puts the mirror in doubt.
    fn watch<T>(&self, res: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Unavailable(_)) = &res {
            self.follow.suspect();
        }
        res
    }

    /// Applies a write's returned item to the mirror.
    fn echo_upsert(&self, item: &Item) {
        match row::decode(item) {
            Ok(stored) => self.follow.echo(Change::Upsert {
                version: row::version(item),
                row: stored,
            }),
            Err(_) => {
                if let (Some(key), Some(stamp)) = (row::endpoint_key(item), row::stamp(item)) {
                    self.follow.echo(Change::Forget { key, stamp });
                }
            }
        }
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

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.follow_stream())
    }

    fn follow_stats(&self) -> Option<FollowStats> {
        Some(self.follow.stats())
    }

    async fn check_in(
        &self,
        endpoints: &[Endpoint],
        now_ms: u64,
    ) -> Result<CheckInOutcome, StoreError> {
        self.watch(self.check_in_all(endpoints, now_ms).await)
    }

    async fn check_in_merging_tags(
        &self,
        endpoint: &Endpoint,
        sent: &BTreeSet<String>,
        now_ms: u64,
    ) -> Result<CheckInOutcome, StoreError> {
        self.watch(self.merge_check_in(endpoint, sent, now_ms).await)
    }

    async fn list_service(&self, service: &ServiceName) -> Result<Vec<StoredEndpoint>, StoreError> {
        if let Some(rows) = self.follow.read(|m| m.list_service(service)) {
            return Ok(rows);
        }
        let items = pages::query(&self.client, &self.table, service, None, false).await;
        self.watch(items.map(|i| decode_all(&i)))
    }

    async fn list_all(&self) -> Result<Vec<StoredEndpoint>, StoreError> {
        if let Some(rows) = self.follow.read(|m| m.list_all()) {
            return Ok(rows);
        }
        let items = pages::scan(&self.client, &self.table, None, false, usize::MAX).await;
        self.watch(items.map(|i| decode_all(&i)))
    }

    async fn list_all_shared(&self) -> Result<Vec<ServiceRows>, StoreError> {
        if let Some(lists) = self.follow.read_mut(Mirror::list_all_shared) {
            return Ok(lists);
        }
        Ok(group_by_service(self.list_all().await?))
    }

    async fn list_repo(&self, repo: &str) -> Result<Vec<StoredEndpoint>, StoreError> {
        if let Some(rows) = self.follow.read(|m| m.list_repo(repo)) {
            return Ok(rows);
        }
        // A filtered Scan rather than a GSI: the repo route is rare (lyft/discovery left it
        // uncached for that reason), while a GSI would double the write cost of every check-in.
        let filter = Filter {
            expression: "#repo = :repo",
            name: ("#repo", row::REPO),
            values: vec![(":repo", s(repo))],
        };
        let items = pages::scan(&self.client, &self.table, Some(filter), false, usize::MAX).await;
        self.watch(items.map(|i| decode_all(&i)))
    }

    async fn deregister(
        &self,
        service: &ServiceName,
        ip: IpAddr,
        port: Option<NonZeroU16>,
    ) -> Result<usize, StoreError> {
        self.watch(self.deregister_rows(service, ip, port).await)
    }

    async fn set_weight(
        &self,
        service: &ServiceName,
        ip: Option<IpAddr>,
        weight: Weight,
    ) -> Result<usize, StoreError> {
        self.watch(self.set_weight_rows(service, ip, weight).await)
    }

    async fn delete_expired(&self, cutoff_ms: u64, max: usize) -> Result<usize, StoreError> {
        self.follow.count_table_read();
        self.watch(self.delete_expired_rows(cutoff_ms, max).await)
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
}
