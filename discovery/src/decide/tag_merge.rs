//! lyft/discovery's tag merge for v1 re-check-ins: the tags a check-in names replace the
//! stored ones of the same key, every other stored tag is kept (a Python `dict.update`). A
//! cron line that sends only `az` keeps the `instance_id` it sent before; the price, as in
//! lyft, is that a tag cannot be removed through v1 (v2 check-ins replace the whole set).

use std::collections::{BTreeMap, BTreeSet};

use schema::wire::tag;
use schema::{MAX_EXTRA_TAGS, TagKey, Tags, ValidationError};
use serde::de::IgnoredAny;
use serde_json::Value;

/// The keys of the tag object a v1 check-in body carries (form: `tags` as a JSON string;
/// JSON: `tags` as an object or a JSON string). Empty when it sends none. Call it on a body
/// the check-in parser accepted, so what it names is what was parsed.
pub fn sent_tag_keys(body: &[u8], is_json: bool) -> BTreeSet<String> {
    let keys_of = |text: &str| {
        serde_json::from_str::<BTreeMap<String, IgnoredAny>>(text)
            .map(|m| m.into_keys().collect())
            .unwrap_or_default()
    };
    if !is_json {
        // The last `tags` counts, as in the form parser the check-in went through (which
        // accepted the body, so it is UTF-8 and the lossy decoding loses nothing).
        return form_urlencoded::parse(body)
            .filter(|(k, _)| k == "tags")
            .last()
            .map_or_else(BTreeSet::new, |(_, v)| keys_of(&v));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut obj)) => match obj.remove("tags") {
            Some(Value::String(s)) => keys_of(&s),
            Some(Value::Object(tags)) => tags.into_iter().map(|(k, _)| k).collect(),
            _ => BTreeSet::new(),
        },
        _ => BTreeSet::new(),
    }
}

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

#[cfg(test)]
mod tests {
    use serde_json::json;

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
    fn sent_keys_from_form_and_json_bodies() {
        let form = format!(
            "ip=1.2.3.4&port=1&tags={}",
            "%7B%22az%22%3A%22a%22%2C%22x%22%3A1%7D"
        );
        let want: BTreeSet<String> = ["az".to_string(), "x".to_string()].into();
        assert_eq!(sent_tag_keys(form.as_bytes(), false), want);
        let body = json!({"ip": "1.2.3.4", "port": 1, "tags": {"az": "a", "x": 1}});
        assert_eq!(sent_tag_keys(body.to_string().as_bytes(), true), want);
        let body = json!({"ip": "1.2.3.4", "port": 1, "tags": "{\"az\":\"a\",\"x\":1}"});
        assert_eq!(sent_tag_keys(body.to_string().as_bytes(), true), want);
        assert!(sent_tag_keys(b"ip=1.2.3.4&port=1", false).is_empty());
        assert!(sent_tag_keys(b"ip=1.2.3.4&port=1&tags=", false).is_empty());
    }
}
