//! lyft/discovery's tag merge for v1 re-check-ins: the tags a check-in names replace the
//! stored ones of the same key, every other stored tag is kept (a Python `dict.update`). A
//! cron line that sends only `az` keeps the `instance_id` it sent before; the price, as in
//! lyft, is that a tag cannot be removed through v1 (v2 check-ins replace the whole set).

use std::collections::BTreeSet;

use schema::wire::tag;
use schema::{MAX_EXTRA_TAGS, TagKey, Tags, ValidationError};

/// `stored` updated with the keys of `new` named in `sent`. The host's own weight is merged
/// like any tag; an operator's override lives beside the tags and is not touched. Fails when
/// the union holds more free-form tags than allowed.
pub fn merge_tags(
    stored: &Tags,
    new: &Tags,
    sent: &BTreeSet<String>,
) -> Result<Tags, ValidationError> {
    let mut out = stored.clone();
    for key in sent {
        match key.as_str() {
            tag::AZ => out.az = new.az.clone(),
            tag::REGION => out.region = new.region.clone(),
            tag::INSTANCE_ID => out.instance_id = new.instance_id.clone(),
            tag::CANARY => out.canary = new.canary,
            tag::LOAD_BALANCING_WEIGHT => out.load_balancing_weight = new.load_balancing_weight,
            other => {
                let key = TagKey::new(other.to_string())?;
                match new.extra.get(&key) {
                    Some(v) => out.extra.insert(key, v.clone()),
                    None => out.extra.remove(&key),
                };
            }
        }
    }
    if out.extra.len() > MAX_EXTRA_TAGS {
        return Err(ValidationError::TooManyTags {
            max: MAX_EXTRA_TAGS,
            got: out.extra.len(),
        });
    }
    Ok(out)
}

/// Whether [`merge_tags`] would give `stored` back unchanged: true for the common renewal,
/// which sends the tags it sent before. Answers without copying the tags.
pub fn merge_keeps(stored: &Tags, new: &Tags, sent: &BTreeSet<String>) -> bool {
    // Past the limit the merge refuses, even with nothing to change.
    stored.extra.len() <= MAX_EXTRA_TAGS
        && sent.iter().all(|key| match key.as_str() {
            tag::AZ => stored.az == new.az,
            tag::REGION => stored.region == new.region,
            tag::INSTANCE_ID => stored.instance_id == new.instance_id,
            tag::CANARY => stored.canary == new.canary,
            tag::LOAD_BALANCING_WEIGHT => stored.load_balancing_weight == new.load_balancing_weight,
            // An invalid key makes the merge fail: not "unchanged".
            other => TagKey::new(other.to_string())
                .is_ok_and(|key| stored.extra.get(&key) == new.extra.get(&key)),
        })
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn tags(v: Value) -> Tags {
        Tags::from_json(&v).expect("tags")
    }

    #[test]
    fn named_keys_win_and_the_rest_is_kept() {
        let stored = tags(json!({"az": "a", "instance_id": "i-1", "team": "core",
            "canary": true, "load_balancing_weight": 40}));
        let new = tags(json!({"az": "b", "team": "edge"}));
        let sent = ["az".to_string(), "team".to_string()].into();
        let out = merge_tags(&stored, &new, &sent).expect("merge");
        assert_eq!(
            out,
            tags(json!({"az": "b", "instance_id": "i-1", "team": "edge",
                "canary": true, "load_balancing_weight": 40}))
        );
        assert_eq!(
            merge_tags(&stored, &Tags::default(), &BTreeSet::new()),
            Ok(stored)
        );
    }

    #[test]
    fn too_many_free_form_tags_after_the_merge_is_refused() {
        let full: serde_json::Map<String, Value> = (0..MAX_EXTRA_TAGS)
            .map(|i| (format!("k{i}"), json!("v")))
            .collect();
        let stored = tags(Value::Object(full));
        let new = tags(json!({"extra": "v"}));
        let sent = ["extra".to_string()].into();
        assert!(matches!(
            merge_tags(&stored, &new, &sent),
            Err(ValidationError::TooManyTags { .. })
        ));
    }

    #[test]
    fn merge_keeps_exactly_when_the_merge_gives_the_stored_tags_back() {
        // One past the limit (stored by an older registry with a higher one): every merge
        // refuses it.
        let over = Tags {
            extra: (0..=MAX_EXTRA_TAGS)
                .map(|i| {
                    let key = TagKey::new(format!("k{i}")).expect("key");
                    (key, schema::TagValue::new("v").expect("value"))
                })
                .collect(),
            ..Tags::default()
        };
        let mut sets = vec![
            tags(json!({})),
            tags(json!({"az": "a", "region": "r", "instance_id": "i-1"})),
            tags(json!({"az": "b", "region": "r", "instance_id": "i-1"})),
            tags(json!({"az": "a", "canary": true, "load_balancing_weight": 40, "team": "core"})),
            tags(json!({"az": "a", "team": "edge", "k0": "v"})),
            over,
        ];
        sets.push(tags(json!({"instance_id": "i-2", "k1": "v"})));
        let key_sets: Vec<BTreeSet<String>> = [
            &[][..],
            &["az"],
            &["az", "region", "instance_id"],
            &["canary", "load_balancing_weight"],
            &["team", "k0"],
            &["Not A Key"],
            &["k1", "zz"],
        ]
        .iter()
        .map(|ks| ks.iter().map(|k| (*k).to_string()).collect())
        .collect();
        for stored in &sets {
            for new in &sets {
                for sent in &key_sets {
                    let same = merge_tags(stored, new, sent).as_ref() == Ok(stored);
                    assert_eq!(
                        merge_keeps(stored, new, sent),
                        same,
                        "{stored:?} {new:?} {sent:?}"
                    );
                }
            }
        }
    }
}
