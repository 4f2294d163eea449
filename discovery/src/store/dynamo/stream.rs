//! The stream follower: one task per store that keeps the [`Follow`] mirror level with the
//! table by reading the table's DynamoDB Stream (docs/ARCHITECTURE.md#following-the-table).
//!
//! A (re)sync takes a `LATEST` iterator on every open shard *first*, then scans the table
//! into the mirror, then applies what those iterators return: a write made while the scan
//! ran is either in the scan or in the records after it (or both, which the mirror's
//! last-writer-wins rule settles), never in neither. Every poll interval a round reads each
//! open shard; a shard that closes hands over to its children, read from `TRIM_HORIZON`
//! (parents before children: a child of a shard still being read waits). Every
//! [`DESCRIBE_EVERY`] rounds, and whenever a shard closes, the table is asked which stream
//! it has: another ARN (the stream was disabled and enabled again) is a gap.
//!
//! Gaps (trimmed records, an expired iterator, a stream or shard that is gone, a stream read
//! refused outright, stream reads failing round after round) stop the mirror answering and
//! start a resync; transient failures are retried inside each call (`retry::call`) and
//! otherwise just leave the round unfinished, so the mirror's freshness runs out and reads
//! go back to the table until a round succeeds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Weak;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::{AttributeValue, StreamViewType};
use aws_sdk_dynamodbstreams::types::{
    AttributeValue as StreamValue, OperationType, Record, Shard, ShardIteratorType,
};
use tokio::time::Instant;

use super::follow::Follow;
use super::pages;
use super::retry::{self, CallError, ErrorClass};
use super::row::{self, Item};
use crate::store::RescanReason;
use crate::store::mirror::{Change, Stamp};

/// Rounds between two looks at which stream the table has.
const DESCRIBE_EVERY: u64 = 10;
/// Failed rounds in a row before the follower stops trusting its iterators and resyncs. A
/// rescan during an outage fails cheaply (its first call) and is retried with back-off.
const DOUBT_ROUNDS: u32 = 5;
/// GetRecords pages read from one shard in one round at most (1000 records each).
const PAGES_PER_ROUND: usize = 8;
/// A table without a stream is looked at again after this many poll intervals.
const NO_STREAM_RECHECK: u32 = 30;
/// Longest pause between two failed resyncs.
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// The clients and the table a follower reads.
#[derive(Debug, Clone)]
pub(super) struct Link {
    pub(super) db: aws_sdk_dynamodb::Client,
    pub(super) streams: aws_sdk_dynamodbstreams::Client,
    pub(super) table: String,
}

/// The stream as a follower reads it.
struct Shards {
    arn: String,
    /// Shards being read, with the iterator of the next read.
    open: BTreeMap<String, String>,
    /// Every shard seen, read or not (closed before the sync).
    known: HashSet<String>,
}

/// Runs until every store sharing `weak` is dropped.
pub(super) async fn run(link: Link, weak: Weak<Follow>) {
    let mut reason = RescanReason::Start;
    let mut pause = Duration::ZERO;
    let mut warned = false;
    loop {
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let Some(follow) = weak.upgrade() else {
            return;
        };
        let poll = follow.poll;
        match sync(&link, &follow, reason).await {
            Ok(Some(shards)) => {
                if warned {
                    tracing::info!(table = %link.table, "the table has a stream now: following it");
                }
                warned = false;
                drop(follow);
                let Some(next) = follow_shards(&link, &weak, shards).await else {
                    return;
                };
                tracing::info!(table = %link.table, reason = next.label(), "stream gap: reading the table again");
                if let Some(f) = weak.upgrade() {
                    f.unfollowed();
                }
                reason = next;
                pause = Duration::ZERO;
            }
            Ok(None) => {
                follow.unfollowed();
                if !warned {
                    tracing::warn!(
                        table = %link.table,
                        "the DynamoDB table has no stream with NEW_AND_OLD_IMAGES: every read \
                         queries the table; run `tidings registry init-table` to enable it"
                    );
                    warned = true;
                }
                reason = RescanReason::Start;
                pause = poll * NO_STREAM_RECHECK;
            }
            Err(e) => {
                follow.unfollowed();
                tracing::debug!(table = %link.table, error = %e, "stream sync failed; retrying");
                pause = (pause * 2).clamp(poll, MAX_PAUSE.max(poll));
            }
        }
    }
}

/// Takes `LATEST` iterators, then scans the table into the mirror. `None`: no stream.
async fn sync(
    link: &Link,
    follow: &Follow,
    reason: RescanReason,
) -> Result<Option<Shards>, CallError> {
    let Some(arn) = latest_stream(link).await? else {
        return Ok(None);
    };
    let mut shards = Shards {
        arn,
        open: BTreeMap::new(),
        known: HashSet::new(),
    };
    for shard in describe_shards(link, &shards.arn).await? {
        let Some(id) = shard.shard_id() else { continue };
        shards.known.insert(id.to_string());
        let closed = shard
            .sequence_number_range()
            .is_some_and(|r| r.ending_sequence_number().is_some());
        if !closed {
            let it = iterator(link, &shards.arn, id, ShardIteratorType::Latest).await?;
            shards.open.insert(id.to_string(), it);
        }
    }
    let started = Instant::now();
    follow.begin_scan();
    let items = pages::scan(&link.db, &link.table, None, false, usize::MAX)
        .await
        .map_err(|e| CallError {
            op: "Scan",
            class: ErrorClass::Connection,
            message: e.to_string(),
        })?;
    follow.finish_scan(pages::decode_versioned(&items), started, reason);
    tracing::debug!(table = %link.table, rows = items.len(), reason = reason.label(), "mirror synced");
    Ok(Some(shards))
}

/// Reads the stream round after round. Returns why a resync is needed, or `None` once the
/// store is gone.
async fn follow_shards(
    link: &Link,
    weak: &Weak<Follow>,
    mut shards: Shards,
) -> Option<RescanReason> {
    let mut failed_rounds = 0u32;
    let mut first = true;
    loop {
        if !first {
            let poll = weak.upgrade()?.poll;
            tokio::time::sleep(poll).await;
        }
        first = false;
        let follow = weak.upgrade()?;
        let round = follow.next_round();
        let started = Instant::now();
        if follow.take_spoil() {
            for it in shards.open.values_mut() {
                *it = "spoilt".to_string();
            }
        }
        let mut ok = true;
        let mut closed = false;
        let open: Vec<(String, String)> = shards
            .open
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, mut it) in open {
            for _ in 0..PAGES_PER_ROUND {
                match read(link, &it).await {
                    Ok((records, next)) => {
                        let more = !records.is_empty();
                        let lag = records.last().and_then(lag_ms);
                        follow.apply(records.iter().filter_map(change_of).collect(), lag);
                        match next {
                            Some(n) => {
                                shards.open.insert(id.clone(), n.clone());
                                it = n;
                            }
                            None => {
                                shards.open.remove(&id);
                                closed = true;
                                break;
                            }
                        }
                        if !more {
                            break;
                        }
                    }
                    Err(e) => match gap(&e) {
                        Some(reason) => return Some(reason),
                        None => {
                            tracing::debug!(shard = %id, error = %e, "stream read failed");
                            ok = false;
                            break;
                        }
                    },
                }
            }
        }
        if closed || shards.open.is_empty() || round % DESCRIBE_EVERY == 0 {
            match adopt_new_shards(link, &mut shards).await {
                Ok(true) => {}
                Ok(false) => return Some(RescanReason::StreamChanged),
                Err(e) => match gap(&e) {
                    Some(reason) => return Some(reason),
                    None => ok = false,
                },
            }
        }
        if ok {
            follow.round_ok(started);
            failed_rounds = 0;
        } else {
            failed_rounds += 1;
            if failed_rounds >= DOUBT_ROUNDS {
                return Some(RescanReason::Doubt);
            }
        }
    }
}

/// Whether a failed call means records may have been missed.
fn gap(e: &CallError) -> Option<RescanReason> {
    match e.class {
        ErrorClass::StreamGap => Some(RescanReason::Trimmed),
        ErrorClass::TableMissing => Some(RescanReason::StreamChanged),
        // Refused outright (an iterator the service does not accept, a permission): the
        // iterators are in doubt, not the network.
        ErrorClass::Fatal => Some(RescanReason::Doubt),
        _ => None,
    }
}

/// Checks the table still has the stream being read, and starts reading shards that
/// appeared since (children of closed shards, at `TRIM_HORIZON`). `false`: another stream.
async fn adopt_new_shards(link: &Link, shards: &mut Shards) -> Result<bool, CallError> {
    if latest_stream(link).await?.as_deref() != Some(shards.arn.as_str()) {
        return Ok(false);
    }
    let all = describe_shards(link, &shards.arn).await?;
    for id in to_adopt(&all, &shards.open, &shards.known) {
        let it = iterator(link, &shards.arn, id, ShardIteratorType::TrimHorizon).await?;
        shards.known.insert(id.to_string());
        shards.open.insert(id.to_string(), it);
    }
    Ok(true)
}

/// The shards to start reading now: those never seen, except a child whose parent is still
/// read or is itself new (parents before children: the child waits for the parent to close).
fn to_adopt<'a>(
    all: &'a [Shard],
    open: &BTreeMap<String, String>,
    known: &HashSet<String>,
) -> Vec<&'a str> {
    let new: HashSet<&str> = all
        .iter()
        .filter_map(Shard::shard_id)
        .filter(|id| !known.contains(*id))
        .collect();
    all.iter()
        .filter_map(|shard| {
            let id = shard.shard_id()?;
            let waits = shard
                .parent_shard_id()
                .is_some_and(|p| open.contains_key(p) || new.contains(p));
            (new.contains(id) && !waits).then_some(id)
        })
        .collect()
}

/// The ARN of the table's stream, when it has one the mirror can follow (enabled, with both
/// images: a remove needs the old one, an upsert the new one).
async fn latest_stream(link: &Link) -> Result<Option<String>, CallError> {
    let req = link.db.describe_table().table_name(&link.table);
    let out = retry::call("DescribeTable", || req.clone().send()).await?;
    let Some(table) = out.table else {
        return Ok(None);
    };
    let usable = table.stream_specification().is_some_and(|s| {
        s.stream_enabled() && s.stream_view_type() == Some(&StreamViewType::NewAndOldImages)
    });
    Ok(usable.then_some(table.latest_stream_arn).flatten())
}

/// Every shard of the stream (DescribeStream pages by the last shard id).
async fn describe_shards(link: &Link, arn: &str) -> Result<Vec<Shard>, CallError> {
    let mut shards = Vec::new();
    let mut start: Option<String> = None;
    loop {
        let req = link
            .streams
            .describe_stream()
            .stream_arn(arn)
            .set_exclusive_start_shard_id(start.clone());
        let out = retry::call("DescribeStream", || req.clone().send()).await?;
        let Some(desc) = out.stream_description else {
            return Ok(shards);
        };
        shards.extend(desc.shards.unwrap_or_default());
        match desc.last_evaluated_shard_id {
            Some(last) if Some(&last) != start.as_ref() => start = Some(last),
            _ => return Ok(shards),
        }
    }
}

async fn iterator(
    link: &Link,
    arn: &str,
    shard: &str,
    kind: ShardIteratorType,
) -> Result<String, CallError> {
    let req = link
        .streams
        .get_shard_iterator()
        .stream_arn(arn)
        .shard_id(shard)
        .shard_iterator_type(kind);
    let out = retry::call("GetShardIterator", || req.clone().send()).await?;
    out.shard_iterator.ok_or_else(|| CallError {
        op: "GetShardIterator",
        class: ErrorClass::StreamGap,
        message: format!("no iterator for shard {shard}"),
    })
}

/// One GetRecords: the records and the next iterator (`None`: the shard is closed and read
/// to its end).
async fn read(link: &Link, iterator: &str) -> Result<(Vec<Record>, Option<String>), CallError> {
    let req = link.streams.get_records().shard_iterator(iterator);
    let out = retry::call("GetRecords", || req.clone().send()).await?;
    Ok((out.records.unwrap_or_default(), out.next_shard_iterator))
}

/// What one stream record says about one row. A record of a row this code cannot read drops
/// the row from the mirror (reads skip such rows anyway) unless the held row is newer; one
/// that cannot even be ordered (no numeric `last_check_in`: moto's key-only record of a new
/// item before its update, never one of our writes on DynamoDB) says nothing.
pub(super) fn change_of(record: &Record) -> Option<Change> {
    let data = record.dynamodb()?;
    let key = data.keys().map(item).as_ref().and_then(row::endpoint_key);
    let image = match record.event_name()? {
        OperationType::Remove => data.old_image(),
        _ => data.new_image(),
    };
    let image = image.map(item)?;
    match (record.event_name()?, row::decode(&image)) {
        (OperationType::Remove, Ok(old)) => Some(Change::Remove {
            key: old.endpoint.key(),
            stamp: Stamp {
                last_check_in_ms: old.last_check_in_ms,
                version: row::version(&image),
            },
        }),
        (_, Ok(row)) => Some(Change::Upsert {
            version: row::version(&image),
            row,
        }),
        (_, Err(_)) => Some(Change::Forget {
            key: key?,
            stamp: row::stamp(&image)?,
        }),
    }
}

/// How old a record was when it was read, ms.
fn lag_ms(record: &Record) -> Option<u64> {
    let at = record.dynamodb()?.approximate_creation_date_time()?;
    let at_ms = u64::try_from(at.to_millis().ok()?).ok()?;
    let now_ms = u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()?
            .as_millis(),
    )
    .ok()?;
    Some(now_ms.saturating_sub(at_ms))
}

/// A stream image as the table's own item type (the two SDKs each have their own).
fn item(image: &HashMap<String, StreamValue>) -> Item {
    image.iter().map(|(k, v)| (k.clone(), value(v))).collect()
}

fn value(v: &StreamValue) -> AttributeValue {
    match v {
        StreamValue::S(s) => AttributeValue::S(s.clone()),
        StreamValue::N(n) => AttributeValue::N(n.clone()),
        StreamValue::B(b) => AttributeValue::B(b.clone()),
        StreamValue::Bool(b) => AttributeValue::Bool(*b),
        StreamValue::Ss(v) => AttributeValue::Ss(v.clone()),
        StreamValue::Ns(v) => AttributeValue::Ns(v.clone()),
        StreamValue::Bs(v) => AttributeValue::Bs(v.clone()),
        StreamValue::L(v) => AttributeValue::L(v.iter().map(value).collect()),
        StreamValue::M(m) => AttributeValue::M(item(m)),
        // Null, and whatever a newer service sends that this SDK does not know.
        _ => AttributeValue::Null(true),
    }
}

#[cfg(test)]
mod tests;
