use std::collections::BTreeMap;

use proptest::prelude::*;
use serde::de::IgnoredAny;

use super::*;

fn svc() -> ServiceName {
    ServiceName::new("web").expect("name")
}

/// How the registry read a form before it was read once: decoded into a map for the parser,
/// then decoded again for the tag keys (its last `tags`, parsed as a JSON object).
fn twice(body: &[u8]) -> Result<(Endpoint, BTreeSet<String>), ValidationError> {
    let form: BTreeMap<String, String> = serde_urlencoded::from_bytes(body)
        .map_err(|e| ValidationError::Malformed(e.to_string()))?;
    let spec = EndpointSpec {
        service: None,
        ip: form.get("ip").cloned(),
        port: form
            .get("port")
            .map_or(Value::Null, |p| Value::String(p.clone())),
        revision: form.get("revision").cloned(),
        service_repo_name: form.get("service_repo_name").cloned(),
        tags: form
            .get("tags")
            .map_or(Value::Null, |t| Value::String(t.clone())),
    };
    let ep = spec.into_endpoint(Some(&svc()), None)?;
    let keys = form_urlencoded::parse(body)
        .filter(|(k, _)| k == "tags")
        .last()
        .map(|(_, v)| {
            serde_json::from_str::<BTreeMap<String, IgnoredAny>>(&v)
                .map(|m| m.into_keys().collect())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    Ok((ep, keys))
}

fn once(body: &[u8]) -> Result<(Endpoint, BTreeSet<String>), ValidationError> {
    V1Checkin::from_form(&svc(), V1Form::decode(body)).map(|c| (c.endpoint, c.sent_tags))
}

#[test]
fn a_form_gives_its_endpoint_and_the_keys_of_its_last_tags() {
    let body = b"ip=10.0.0.1&port=80&tags=%7B%22az%22%3A%22a%22%7D&tags=%7B%22region%22%3A%22r%22%2C%22team%22%3Anull%7D&auto_ip=no&auto_ip=yes";
    let form = V1Form::decode(body);
    assert_eq!(form.auto_ip, ["no", "yes"]);
    assert!(
        matches!(form.ip, Some(Cow::Borrowed("10.0.0.1"))),
        "not copied"
    );
    let c = V1Checkin::from_form(&svc(), form).expect("parses");
    assert_eq!(
        c.endpoint.tags.region.as_ref().map(|r| r.as_str()),
        Some("r")
    );
    assert_eq!(c.endpoint.tags.az, None);
    let keys: Vec<&str> = c.sent_tags.iter().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["region", "team"],
        "a null tag is sent (the merge removes it)"
    );
    for no_tags in [
        &b"ip=10.0.0.1&port=80"[..],
        b"ip=10.0.0.1&port=80&tags=",
        b"ip=10.0.0.1&port=80&tags=%20",
    ] {
        assert!(once(no_tags).expect("parses").1.is_empty());
    }
}

#[test]
fn json_tags_give_their_keys_as_object_or_as_string() {
    for body in [
        r#"{"ip":"10.0.0.1","port":80,"tags":{"az":"a","k":"v"}}"#,
        r#"{"ip":"10.0.0.1","port":80,"tags":"{\"az\":\"a\",\"k\":\"v\"}"}"#,
    ] {
        let c = V1Checkin::from_json(&svc(), body.as_bytes()).expect("parses");
        let keys: Vec<&str> = c.sent_tags.iter().map(String::as_str).collect();
        assert_eq!(keys, ["az", "k"], "{body}");
    }
    let c = V1Checkin::from_json(&svc(), br#"{"ip":"10.0.0.1","port":80}"#).expect("parses");
    assert!(c.sent_tags.is_empty());
}

/// One `key=value` of a form, from pieces that exercise every field, repeats, escapes,
/// bad values and keys the parser ignores.
fn pair() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "ip",
        "port",
        "revision",
        "service_repo_name",
        "tags",
        "auto_ip",
        "other",
        "ip%20",
        "t%61gs",
    ]);
    let value = prop::sample::select(vec![
        "10.0.0.1",
        "%3A%3A1",
        "",
        "80",
        "0",
        "70000",
        "abc",
        "a%2Bb",
        "%FF",
        "+",
        "%7B%22az%22%3A%22a%22%7D",
        "%7B%22region%22%3Anull%2C%22k%22%3A1%7D",
        "%7B%22az%22%3A",
        "%5B1%5D",
        "null",
        "%7B%7D",
        "%7B%22load_balancing_weight%22%3A0%7D",
    ]);
    (key, value).prop_map(|(k, v)| format!("{k}={v}"))
}

proptest! {
    #[test]
    fn one_decode_reads_what_two_decodes_read(pairs in prop::collection::vec(pair(), 0..8)) {
        let body = pairs.join("&");
        prop_assert_eq!(once(body.as_bytes()), twice(body.as_bytes()), "{}", body);
    }

    #[test]
    fn random_bytes_read_the_same_once_as_twice(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        prop_assert_eq!(once(&bytes), twice(&bytes));
    }
}
