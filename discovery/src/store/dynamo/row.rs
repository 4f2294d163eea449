//! The item layout: how one endpoint row is laid out in DynamoDB and read back.
//!
//! | attribute | type | |
//! |---|---|---|
//! | `service` | S | partition key |
//! | `endpoint` | S | sort key, `ip:port`, IPv6 as `[ip]:port` (`EndpointKey::addr_string`) |
//! | `ip`, `port` | S, N | the key again, for people and tools reading the table |
//! | `revision` | S | |
//! | `service_repo_name` | S | absent when the endpoint has none |
//! | `tags` | S | JSON of `schema::Tags` in its serde form (see below) |
//! | `last_check_in` | N | registry clock at the last check-in, epoch ms |
//! | `expires_at` | N | epoch **seconds**, `last_check_in + ttl`: the table's TTL attribute |
//! | `weight_override` | N | absent unless an operator set one |
//! | `version` | N | bumped by every write: orders a row's writes for the stream's mirror |
//!
//! Tags are one JSON string rather than a DynamoDB map: a check-in replaces the whole tag
//! set anyway (so tags can be removed), a string is one `SET`, and the serde form round-trips
//! exactly (the flat v1 form would let a free-form tag named `az` collide with the zone). The
//! weight in `tags` is the host's own; the override is kept beside it and applied on read.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU16;

use aws_sdk_dynamodb::types::AttributeValue;
use schema::{Endpoint, EndpointKey, RepoName, Revision, ServiceName, Tags, Weight};

use crate::store::StoredEndpoint;
use crate::store::mirror::Stamp;

pub(crate) type Item = HashMap<String, AttributeValue>;

pub(crate) const SERVICE: &str = "service";
pub(crate) const ENDPOINT: &str = "endpoint";
pub(crate) const IP: &str = "ip";
pub(crate) const PORT: &str = "port";
pub(crate) const REVISION: &str = "revision";
pub(crate) const REPO: &str = "service_repo_name";
pub(crate) const TAGS: &str = "tags";
pub(crate) const LAST_CHECK_IN: &str = "last_check_in";
pub(crate) const EXPIRES_AT: &str = "expires_at";
pub(crate) const WEIGHT_OVERRIDE: &str = "weight_override";
pub(crate) const VERSION: &str = "version";

/// The sort key of an endpoint: `ip:port`, `[v6]:port`.
pub(crate) fn sort_key(ip: IpAddr, port: NonZeroU16) -> String {
    SocketAddr::new(ip, port.get()).to_string()
}

/// The sort-key prefix of every port on one IP. The trailing `:` keeps `10.0.0.1` from
/// matching `10.0.0.11`.
pub(crate) fn ip_prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:"),
        IpAddr::V6(v6) => format!("[{v6}]:"),
    }
}

pub(crate) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

pub(crate) fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// The primary key of an item as DynamoDB gave it (used verbatim for deletes, so even a row
/// we cannot otherwise parse can be removed).
pub(crate) fn key_of(item: &Item) -> Option<Item> {
    let service = item.get(SERVICE)?.clone();
    let endpoint = item.get(ENDPOINT)?.clone();
    Some(HashMap::from([
        (SERVICE.to_string(), service),
        (ENDPOINT.to_string(), endpoint),
    ]))
}

/// The primary key of an endpoint.
pub(crate) fn key(service: &ServiceName, ip: IpAddr, port: NonZeroU16) -> Item {
    HashMap::from([
        (SERVICE.to_string(), s(service.as_str())),
        (ENDPOINT.to_string(), s(sort_key(ip, port))),
    ])
}

/// Parses one item. An error names what is wrong, for the warning the caller logs.
pub(crate) fn decode(item: &Item) -> Result<StoredEndpoint, String> {
    let service = ServiceName::new(get_s(item, SERVICE)?).map_err(|e| e.to_string())?;
    let addr_text = get_s(item, ENDPOINT)?;
    let addr: SocketAddr = addr_text
        .parse()
        .map_err(|_| format!("sort key {addr_text:?} is not ip:port"))?;
    let port =
        NonZeroU16::new(addr.port()).ok_or_else(|| format!("sort key {addr_text:?} has port 0"))?;
    let revision = match opt_s(item, REVISION)? {
        Some(r) => Revision::new(r).map_err(|e| e.to_string())?,
        None => Revision::default(),
    };
    let service_repo_name = opt_s(item, REPO)?
        .map(RepoName::new)
        .transpose()
        .map_err(|e| e.to_string())?;
    let tags: Tags = match opt_s(item, TAGS)? {
        Some(json) => serde_json::from_str(json).map_err(|e| format!("tags: {e}"))?,
        None => Tags::default(),
    };
    let last_check_in_ms = get_n(item, LAST_CHECK_IN)?;
    let weight_override = match item.get(WEIGHT_OVERRIDE) {
        None | Some(AttributeValue::Null(_)) => None,
        Some(_) => Some(Weight::new(get_n(item, WEIGHT_OVERRIDE)?).map_err(|e| e.to_string())?),
    };
    let mut endpoint = Endpoint {
        service,
        ip: addr.ip(),
        port,
        revision,
        service_repo_name,
        tags,
    };
    // The stored tags keep the host's own weight; readers see the override.
    if let Some(w) = weight_override {
        endpoint.tags.load_balancing_weight = w;
    }
    Ok(StoredEndpoint {
        endpoint,
        last_check_in_ms,
        weight_override,
    })
}

/// The row's write count (0 on rows written before it was kept, or by a foreign writer).
pub(crate) fn version(item: &Item) -> u64 {
    get_n(item, VERSION).unwrap_or(0)
}

/// The order of an item's writes (`last_check_in`, `version`), when it has a numeric
/// `last_check_in`: even an item that does not decode can be ordered against the mirror.
pub(crate) fn stamp(item: &Item) -> Option<Stamp> {
    Some(Stamp {
        last_check_in_ms: get_n(item, LAST_CHECK_IN).ok()?,
        version: version(item),
    })
}

/// The key of an item, when it is one of ours.
pub(crate) fn endpoint_key(item: &Item) -> Option<EndpointKey> {
    let service = ServiceName::new(get_s(item, SERVICE).ok()?).ok()?;
    let addr: SocketAddr = get_s(item, ENDPOINT).ok()?.parse().ok()?;
    Some(EndpointKey {
        service,
        ip: addr.ip(),
        port: NonZeroU16::new(addr.port())?,
    })
}

/// The item a check-in's `UpdateItem` leaves, from the one it replaced (`old`, `ALL_OLD`)
/// and what it set: the write is one atomic step, so this is exactly what DynamoDB holds
/// after it, without reading it back.
pub(crate) fn after_check_in(old: Option<&Item>, set: Item, repo: Option<&str>) -> Item {
    let mut item = old.cloned().unwrap_or_default();
    let version = old.map(version).unwrap_or(0);
    item.extend(set);
    match repo {
        Some(r) => item.insert(REPO.to_string(), s(r)),
        None => item.remove(REPO),
    };
    item.insert(VERSION.to_string(), n(version.saturating_add(1)));
    item
}

/// Whether storing `new` over `old` changes what readers see: a different revision, repo or
/// tag set, judged with the row's weight override applied to both sides (a host changing
/// its own weight under an override changes nothing visible).
pub(crate) fn visible_change(old: &StoredEndpoint, new: &Endpoint) -> bool {
    let mut new_eff = new.clone();
    if let Some(w) = old.weight_override {
        new_eff.tags.load_balancing_weight = w;
    }
    new_eff != old.endpoint
}

fn get_s<'a>(item: &'a Item, name: &str) -> Result<&'a str, String> {
    opt_s(item, name)?.ok_or_else(|| format!("missing attribute {name}"))
}

fn opt_s<'a>(item: &'a Item, name: &str) -> Result<Option<&'a str>, String> {
    match item.get(name) {
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(AttributeValue::S(v)) => Ok(Some(v)),
        Some(_) => Err(format!("attribute {name} is not a string")),
    }
}

fn get_n(item: &Item, name: &str) -> Result<u64, String> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v
            .parse()
            .map_err(|_| format!("attribute {name} = {v:?} is not a non-negative integer")),
        Some(_) => Err(format!("attribute {name} is not a number")),
        None => Err(format!("missing attribute {name}")),
    }
}

/// A short description of an item's key for log lines about rows we could not parse.
pub(crate) fn describe_key(item: &Item) -> String {
    let part = |name| match item.get(name) {
        Some(AttributeValue::S(v)) => v.clone(),
        Some(other) => format!("{other:?}"),
        None => "?".to_string(),
    };
    format!("{}/{}", part(SERVICE), part(ENDPOINT))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    fn item(pairs: &[(&str, AttributeValue)]) -> Item {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn sort_keys_bracket_ipv6_and_prefixes_end_in_colon() {
        let port = NonZeroU16::new(80).unwrap();
        assert_eq!(sort_key("10.0.0.1".parse().unwrap(), port), "10.0.0.1:80");
        assert_eq!(
            sort_key("2001:db8::1".parse().unwrap(), port),
            "[2001:db8::1]:80"
        );
        assert_eq!(ip_prefix("10.0.0.1".parse().unwrap()), "10.0.0.1:");
        assert_eq!(ip_prefix("2001:db8::1".parse().unwrap()), "[2001:db8::1]:");
    }

    #[test]
    fn minimal_row_decodes_with_defaults_and_override_applied() {
        let it = item(&[
            (SERVICE, s("web")),
            (ENDPOINT, s("[::1]:8080")),
            (LAST_CHECK_IN, n(42)),
            (WEIGHT_OVERRIDE, n(7)),
        ]);
        let d = decode(&it).unwrap();
        assert_eq!(d.endpoint.ip, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(d.endpoint.port.get(), 8080);
        assert_eq!(d.endpoint.tags.load_balancing_weight.get(), 7);
        assert_eq!(d.weight_override, Some(Weight::new(7).unwrap()));
        assert_eq!(d.last_check_in_ms, 42);
    }

    #[test]
    fn foreign_rows_are_errors_not_panics() {
        let bad = [
            item(&[
                (SERVICE, s("web")),
                (ENDPOINT, s("10.0.0.1")),
                (LAST_CHECK_IN, n(1)),
            ]),
            item(&[
                (SERVICE, s("Web!")),
                (ENDPOINT, s("10.0.0.1:1")),
                (LAST_CHECK_IN, n(1)),
            ]),
            item(&[
                (SERVICE, s("web")),
                (ENDPOINT, s("10.0.0.1:0")),
                (LAST_CHECK_IN, n(1)),
            ]),
            item(&[(SERVICE, s("web")), (ENDPOINT, s("10.0.0.1:1"))]),
            item(&[
                (SERVICE, s("web")),
                (ENDPOINT, s("10.0.0.1:1")),
                (LAST_CHECK_IN, s("x")),
            ]),
            item(&[
                (SERVICE, s("web")),
                (ENDPOINT, s("10.0.0.1:1")),
                (LAST_CHECK_IN, n(-5)),
            ]),
            item(&[
                (SERVICE, s("web")),
                (ENDPOINT, s("10.0.0.1:1")),
                (LAST_CHECK_IN, n(1)),
                (TAGS, s("{not json")),
            ]),
            item(&[
                (SERVICE, s("web")),
                (ENDPOINT, s("10.0.0.1:1")),
                (LAST_CHECK_IN, n(1)),
                (WEIGHT_OVERRIDE, n(101)),
            ]),
        ];
        for it in bad {
            assert!(decode(&it).is_err(), "{it:?} decoded");
        }
    }
}
