//! Creating the table (`tidings registry init-table`): idempotent, safe to run from several
//! places at once, and it refuses a table with someone else's key schema.

use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    StreamSpecification, StreamViewType, TableDescription, TableStatus, TimeToLiveSpecification,
    TimeToLiveStatus,
};
use tokio::time::Instant;

use super::retry::{self, ErrorClass};
use super::row;
use super::{DynamoConfig, DynamoStore};
use crate::store::StoreError;

/// Real DynamoDB takes seconds to tens of seconds to make a new table ACTIVE.
const ACTIVE_DEADLINE: Duration = Duration::from_secs(120);

/// Creates `cfg.table` (on-demand capacity, with a stream of new and old images) if it does
/// not exist, waits until it is ACTIVE, enables that stream on a table made before replicas
/// followed it, and makes `expires_at` its TTL attribute. Running it again changes nothing.
pub async fn init_table(cfg: &DynamoConfig) -> Result<(), StoreError> {
    DynamoStore::connect(cfg).await?.ensure_table().await
}

impl DynamoStore {
    /// [`init_table`] for this store's table.
    pub async fn ensure_table(&self) -> Result<(), StoreError> {
        match self.describe_table().await? {
            Some(table) => check_key_schema(&self.table, &table)?,
            None => self.create_table().await?,
        }
        self.wait_active().await?;
        self.ensure_stream().await?;
        self.ensure_ttl().await
    }

    /// Enables the table's stream with both images (replicas follow it to keep their
    /// mirrors: docs/ARCHITECTURE.md#following-the-table) unless it already has it.
    async fn ensure_stream(&self) -> Result<(), StoreError> {
        let spec = self
            .describe_table()
            .await?
            .and_then(|t| t.stream_specification);
        match spec {
            Some(s) if s.stream_enabled() => {
                if s.stream_view_type() == Some(&StreamViewType::NewAndOldImages) {
                    return Ok(());
                }
                // DynamoDB cannot change a stream's view type in place, and disabling the
                // stream under running replicas is the operator's call, not ours.
                Err(StoreError::Unavailable(format!(
                    "table {} has a stream of {:?}, not NEW_AND_OLD_IMAGES; disable it \
                     (aws dynamodb update-table --stream-specification StreamEnabled=false) and \
                     run init-table again",
                    self.table,
                    s.stream_view_type().map(|v| v.as_str())
                )))
            }
            _ => {
                let req = self
                    .client
                    .update_table()
                    .table_name(&self.table)
                    .stream_specification(stream_spec()?);
                retry::call("UpdateTable", || req.clone().send()).await?;
                tracing::info!(table = %self.table, "enabled the DynamoDB stream (NEW_AND_OLD_IMAGES)");
                self.wait_active().await
            }
        }
    }

    /// Whether the table has the stream replicas follow (tests, diagnostics).
    pub async fn has_stream(&self) -> Result<bool, StoreError> {
        Ok(self
            .describe_table()
            .await?
            .and_then(|t| t.stream_specification)
            .is_some_and(|s| {
                s.stream_enabled() && s.stream_view_type() == Some(&StreamViewType::NewAndOldImages)
            }))
    }

    async fn describe_table(&self) -> Result<Option<TableDescription>, StoreError> {
        let req = self.client.describe_table().table_name(&self.table);
        match retry::call("DescribeTable", || req.clone().send()).await {
            Ok(out) => Ok(out.table),
            Err(e) if e.class == ErrorClass::TableMissing => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn create_table(&self) -> Result<(), StoreError> {
        let build = |e: aws_sdk_dynamodb::error::BuildError| {
            StoreError::Unavailable(format!("CreateTable request: {e}"))
        };
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(build)
        };
        let key = |name: &str, kind| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
                .map_err(build)
        };
        let req = self
            .client
            .create_table()
            .table_name(&self.table)
            .attribute_definitions(attr(row::SERVICE)?)
            .attribute_definitions(attr(row::ENDPOINT)?)
            .key_schema(key(row::SERVICE, KeyType::Hash)?)
            .key_schema(key(row::ENDPOINT, KeyType::Range)?)
            .billing_mode(BillingMode::PayPerRequest)
            .stream_specification(stream_spec()?);
        tracing::info!(table = %self.table, "creating DynamoDB table");
        match retry::call("CreateTable", || req.clone().send()).await {
            Ok(_) => Ok(()),
            // Another init-table got there first; wait_active and the TTL step still apply.
            Err(e) if e.class == ErrorClass::TableInUse => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn wait_active(&self) -> Result<(), StoreError> {
        let deadline = Instant::now() + ACTIVE_DEADLINE;
        let mut pause = Duration::from_millis(50);
        loop {
            // Right after CreateTable, DescribeTable may still say "not found" for a moment
            // (the control plane is eventually consistent too), so a missing table is waited on.
            let status = self.describe_table().await?.and_then(|t| t.table_status);
            if status == Some(TableStatus::Active) {
                return Ok(());
            }
            if Instant::now() + pause > deadline {
                return Err(StoreError::Unavailable(format!(
                    "table {} not ACTIVE after {ACTIVE_DEADLINE:?} (status {status:?})",
                    self.table
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    async fn ensure_ttl(&self) -> Result<(), StoreError> {
        let req = self.client.describe_time_to_live().table_name(&self.table);
        let out = retry::call("DescribeTimeToLive", || req.clone().send()).await?;
        let desc = out.time_to_live_description;
        let status = desc.as_ref().and_then(|d| d.time_to_live_status.clone());
        let attr = desc.as_ref().and_then(|d| d.attribute_name.as_deref());
        match status {
            Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
                if attr == Some(row::EXPIRES_AT) =>
            {
                Ok(())
            }
            Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling) => {
                Err(StoreError::Unavailable(format!(
                    "table {} already has TTL on {attr:?}, not {}; DynamoDB allows one TTL attribute",
                    self.table,
                    row::EXPIRES_AT
                )))
            }
            // DynamoDB refuses to re-enable TTL for up to an hour after disabling it.
            Some(TimeToLiveStatus::Disabling) => Err(StoreError::Unavailable(format!(
                "TTL on table {} is being disabled; run init-table again once that is done",
                self.table
            ))),
            _ => {
                let spec = TimeToLiveSpecification::builder()
                    .enabled(true)
                    .attribute_name(row::EXPIRES_AT)
                    .build()
                    .map_err(|e| {
                        StoreError::Unavailable(format!("UpdateTimeToLive request: {e}"))
                    })?;
                let req = self
                    .client
                    .update_time_to_live()
                    .table_name(&self.table)
                    .time_to_live_specification(spec);
                retry::call("UpdateTimeToLive", || req.clone().send()).await?;
                tracing::info!(table = %self.table, attribute = row::EXPIRES_AT, "enabled DynamoDB TTL");
                Ok(())
            }
        }
    }

    /// The TTL attribute DynamoDB reports for the table, when TTL is on (tests, diagnostics).
    pub async fn ttl_attribute(&self) -> Result<Option<String>, StoreError> {
        let req = self.client.describe_time_to_live().table_name(&self.table);
        let out = retry::call("DescribeTimeToLive", || req.clone().send()).await?;
        Ok(out
            .time_to_live_description
            .and_then(|d| match d.time_to_live_status {
                Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling) => d.attribute_name,
                _ => None,
            }))
    }
}

/// A stream of new and old images: an upsert needs the new one, a remove the old one.
fn stream_spec() -> Result<StreamSpecification, StoreError> {
    StreamSpecification::builder()
        .stream_enabled(true)
        .stream_view_type(StreamViewType::NewAndOldImages)
        .build()
        .map_err(|e| StoreError::Unavailable(format!("StreamSpecification: {e}")))
}

/// An existing table must be keyed exactly as we key it, or every write would fail (or,
/// worse, land somewhere no reader looks).
fn check_key_schema(table: &str, desc: &TableDescription) -> Result<(), StoreError> {
    let has = |name: &str, kind: KeyType| {
        desc.key_schema()
            .iter()
            .any(|k| k.attribute_name() == name && *k.key_type() == kind)
    };
    if desc.key_schema().len() == 2
        && has(row::SERVICE, KeyType::Hash)
        && has(row::ENDPOINT, KeyType::Range)
    {
        return Ok(());
    }
    let found: Vec<String> = desc
        .key_schema()
        .iter()
        .map(|k| format!("{} ({})", k.attribute_name(), k.key_type().as_str()))
        .collect();
    Err(StoreError::Unavailable(format!(
        "table {table} exists with key schema [{}]; Tidings needs service (HASH) + endpoint (RANGE)",
        found.join(", ")
    )))
}
