//! Paginated reads of the table: `Query` of one service, `Scan` of all (with an optional
//! filter), and decoding what they return.

use aws_sdk_dynamodb::Client;
use schema::ServiceName;

use super::retry;
use super::row::{self, Item, s};
use crate::store::{StoreError, StoredEndpoint};

/// Every item of one service, or only those whose sort key starts with `prefix`.
/// `keys_only` fetches just the primary keys.
pub(super) async fn query(
    client: &Client,
    table: &str,
    service: &ServiceName,
    prefix: Option<String>,
    keys_only: bool,
) -> Result<Vec<Item>, StoreError> {
    let mut req = client
        .query()
        .table_name(table)
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
pub(super) async fn scan(
    client: &Client,
    table: &str,
    filter: Option<Filter>,
    keys_only: bool,
    max: usize,
) -> Result<Vec<Item>, StoreError> {
    let mut req = client.scan().table_name(table);
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

/// One `FilterExpression` with its name and value placeholders.
pub(super) struct Filter {
    pub(super) expression: &'static str,
    pub(super) name: (&'static str, &'static str),
    pub(super) values: Vec<(&'static str, aws_sdk_dynamodb::types::AttributeValue)>,
}

/// The next page's start key. A server that hands back the key it was given would loop us
/// forever; treat that as unavailable rather than trust it.
pub(super) fn next_page(sent: Option<Item>, got: Option<Item>) -> Result<Option<Item>, StoreError> {
    match got {
        Some(key) if key.is_empty() => Ok(None),
        Some(key) if Some(&key) == sent.as_ref() => Err(StoreError::Unavailable(
            "DynamoDB returned the same page key twice".to_string(),
        )),
        other => Ok(other),
    }
}

/// Parses items, skipping (and logging) the ones a foreign writer left.
pub(super) fn decode_all(items: &[Item]) -> Vec<StoredEndpoint> {
    decode_versioned(items)
        .into_iter()
        .map(|(r, _)| r)
        .collect()
}

/// [`decode_all`], each row with its version (for the mirror).
pub(super) fn decode_versioned(items: &[Item]) -> Vec<(StoredEndpoint, u64)> {
    items
        .iter()
        .filter_map(|item| match row::decode(item) {
            Ok(stored) => Some((stored, row::version(item))),
            Err(why) => {
                tracing::warn!(row = %row::describe_key(item), %why, "skipping unreadable DynamoDB row");
                None
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use std::num::NonZeroU16;

    use super::*;

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
