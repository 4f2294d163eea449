use std::net::IpAddr;
use std::num::NonZeroU16;

use proptest::prelude::*;
use serde_json::json;

use crate::api::{CheckInRequest, V1Host, parse_v1_checkin, parse_weight_body};
use crate::codec::{self, CodecError};
use crate::*;

fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).expect("valid name")
}

#[test]
fn service_names_follow_the_dns_label_rule() {
    for ok in ["a", "web", "payments-api", "x.y_z", "0abc", &"a".repeat(63)] {
        assert!(ServiceName::new(ok).is_ok(), "{ok}");
    }
    for bad in ["", "-web", ".x", "Web", "a b", "a/b", "ü", &"a".repeat(64)] {
        assert!(ServiceName::new(bad).is_err(), "{bad}");
    }
}

#[test]
fn weights_are_1_to_100() {
    assert!(Weight::new(0).is_err());
    assert_eq!(Weight::new(1).map(Weight::get), Ok(1));
    assert_eq!(Weight::new(100).map(Weight::get), Ok(100));
    assert!(Weight::new(101).is_err());
    assert!(Weight::parse("9001").is_err());
    assert!(Weight::parse("ten").is_err());
}

#[test]
fn lyft_form_checkin_with_tags_as_a_json_string() {
    let body = b"ip=10.0.0.7&port=8080&revision=abc&tags=%7B%22az%22%3A%22us-east-1a%22%2C%22canary%22%3Atrue%2C%22load_balancing_weight%22%3A20%2C%22team%22%3A%22core%22%7D";
    let ep = parse_v1_checkin(&svc("web"), body, false).expect("parses");
    assert_eq!(ep.ip, "10.0.0.7".parse::<IpAddr>().expect("ip"));
    assert_eq!(ep.port.get(), 8080);
    assert_eq!(ep.tags.zone(), Some("us-east-1a"));
    assert!(ep.tags.canary);
    assert_eq!(ep.tags.load_balancing_weight.get(), 20);
    assert_eq!(ep.tags.extra.len(), 1);
}

#[test]
fn json_checkin_accepts_ipv6_and_object_tags() {
    let body = json!({"ip": "::1", "port": 9000, "tags": {"region": "eu"}}).to_string();
    let ep = parse_v1_checkin(&svc("web"), body.as_bytes(), true).expect("parses");
    assert!(ep.ip.is_ipv6());
    assert_eq!(ep.key().addr_string(), "[::1]:9000");
}

#[test]
fn bad_checkins_are_clear_errors() {
    let s = svc("web");
    let cases: &[(&[u8], bool)] = &[
        (b"ip=10.0.0.1&port=0", false),
        (b"ip=10.0.0.1&port=70000", false),
        (b"ip=10.0.0.300&port=80", false),
        (b"port=80", false),
        (b"ip=10.0.0.1&port=80&tags=%7Bnot-json", false),
        (b"{\"ip\":\"10.0.0.1\"", true),
        (b"{\"ip\":\"10.0.0.1\",\"port\":80,\"bogus\":1}", true),
        (b"{\"ip\":\"10.0.0.1\",\"port\":80,\"tags\":[1]}", true),
        (
            b"{\"ip\":\"10.0.0.1\",\"port\":80,\"tags\":{\"load_balancing_weight\":0}}",
            true,
        ),
    ];
    for (body, is_json) in cases {
        assert!(
            parse_v1_checkin(&s, body, *is_json).is_err(),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn too_many_free_form_tags_are_refused() {
    let tags: serde_json::Map<_, _> = (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
    let body = json!({"ip": "10.0.0.1", "port": 80, "tags": tags}).to_string();
    let err = parse_v1_checkin(&svc("web"), body.as_bytes(), true).expect_err("refused");
    assert_eq!(err, ValidationError::TooManyTags { max: 32, got: 33 });
}

#[test]
fn v2_checkin_fills_in_the_host_ip_and_bounds_the_batch() {
    let body = json!({"ip": "10.1.1.1", "endpoints": [{"service": "a", "port": 1}, {"service": "b", "port": 2, "ip": "10.1.1.2"}]});
    let eps = CheckInRequest::parse(body.to_string().as_bytes()).expect("parses");
    assert_eq!(eps[0].ip.to_string(), "10.1.1.1");
    assert_eq!(eps[1].ip.to_string(), "10.1.1.2");
    let many: Vec<_> = (0..257)
        .map(|p| json!({"service": "a", "port": p + 1}))
        .collect();
    let body = json!({"ip": "10.1.1.1", "endpoints": many}).to_string();
    assert!(matches!(
        CheckInRequest::parse(body.as_bytes()),
        Err(ValidationError::TooManyEndpoints { .. })
    ));
}

#[test]
fn weight_bodies() {
    assert_eq!(
        parse_weight_body(b"load_balancing_weight=5", false).map(Weight::get),
        Ok(5)
    );
    assert!(parse_weight_body(b"", false).is_err());
    assert!(parse_weight_body(b"load_balancing_weight=101", false).is_err());
    assert_eq!(
        parse_weight_body(b"{\"weight\": 7}", true).map(Weight::get),
        Ok(7)
    );
}

#[test]
fn codec_rejects_unknown_versions_trailing_bytes_and_oversize() {
    let ep = Endpoint::new(svc("web"), "10.0.0.1".parse().expect("ip"), NonZeroU16::MIN);
    let mut bytes = codec::encode_packet(&ep).expect("encodes");
    assert_eq!(
        codec::decode_packet::<Endpoint>(&bytes).expect("decodes"),
        ep
    );
    bytes[0] = 99;
    assert!(matches!(
        codec::decode_packet::<Endpoint>(&bytes),
        Err(CodecError::UnknownVersion(99))
    ));
    bytes[0] = codec::WIRE_VERSION;
    bytes.push(0);
    assert!(matches!(
        codec::decode_packet::<Endpoint>(&bytes),
        Err(CodecError::Trailing(1))
    ));
    assert!(matches!(
        codec::decode_packet::<Endpoint>(&[]),
        Err(CodecError::Empty)
    ));
    let huge = vec![codec::WIRE_VERSION; codec::PACKET_LIMIT + 1];
    assert!(matches!(
        codec::decode_packet::<Endpoint>(&huge),
        Err(CodecError::TooLarge { .. })
    ));
}

#[test]
fn a_forged_length_prefix_does_not_allocate() {
    // version, then a varint length of u64::MAX for a Vec<u8>: must fail on the limit, not OOM.
    let bytes = [
        codec::WIRE_VERSION,
        253,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
    ];
    assert!(codec::decode_packet::<Vec<u8>>(&bytes).is_err());
    assert!(codec::decode_packet::<Vec<String>>(&bytes).is_err());
}

#[test]
fn a_decoded_endpoint_is_validated() {
    // Encode a structurally identical value whose service name is invalid.
    #[derive(serde::Serialize)]
    struct Forged {
        service: String,
    }
    let bytes = codec::encode_packet(&Forged {
        service: "NOT VALID".into(),
    })
    .expect("encodes");
    assert!(codec::decode_packet::<ServiceName>(&bytes[..]).is_err());
}

fn arb_endpoint() -> impl Strategy<Value = Endpoint> {
    (
        "[a-z0-9][a-z0-9._-]{0,20}",
        any::<IpAddr>(),
        1u16..,
        "[ -~]{0,40}",
        proptest::option::of("[a-z]{1,10}"),
        any::<bool>(),
        1u64..=100,
        proptest::collection::btree_map("[a-z][a-z0-9_]{0,10}", "[ -~]{0,20}", 0..5),
    )
        .prop_map(|(name, ip, port, rev, az, canary, w, extra)| {
            let mut ep = Endpoint::new(svc(&name), ip, NonZeroU16::new(port).expect("nonzero"));
            ep.revision = Revision::new(rev).expect("bounded");
            ep.tags.az = az.map(|a| TagValue::new(a).expect("bounded"));
            ep.tags.canary = canary;
            ep.tags.load_balancing_weight = Weight::new(w).expect("in range");
            for (k, v) in extra {
                if !matches!(
                    k.as_str(),
                    "az" | "region" | "instance_id" | "canary" | "load_balancing_weight"
                ) {
                    ep.tags.extra.insert(
                        TagKey::new(k).expect("key"),
                        TagValue::new(v).expect("value"),
                    );
                }
            }
            ep
        })
}

proptest! {
    #[test]
    fn bincode_round_trips(ep in arb_endpoint()) {
        let bytes = codec::encode_packet(&ep).expect("encodes");
        prop_assert_eq!(codec::decode_packet::<Endpoint>(&bytes).expect("decodes"), ep);
    }

    #[test]
    fn v1_json_round_trips(ep in arb_endpoint(), ms in 0u64..253_402_300_799_000) {
        let host = V1Host::from_endpoint(&ep, ms);
        let text = serde_json::to_string(&host).expect("json");
        let back: V1Host = serde_json::from_str(&text).expect("parses");
        let (ep2, ms2) = back.to_endpoint().expect("valid");
        prop_assert_eq!(ep2, ep);
        prop_assert_eq!(ms2, ms);
    }

    #[test]
    fn v2_request_round_trips(eps in proptest::collection::vec(arb_endpoint(), 0..8)) {
        let body = serde_json::to_vec(&CheckInRequest::from_endpoints(&eps)).expect("json");
        prop_assert_eq!(CheckInRequest::parse(&body).expect("parses"), eps);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = codec::decode_packet::<Endpoint>(&bytes);
        let _ = codec::decode_packet::<Vec<Endpoint>>(&bytes);
        let mut versioned = vec![codec::WIRE_VERSION];
        versioned.extend_from_slice(&bytes);
        let _ = codec::decode_packet::<Vec<Endpoint>>(&versioned);
        let _ = parse_v1_checkin(&svc("x"), &bytes, true);
        let _ = parse_v1_checkin(&svc("x"), &bytes, false);
        let _ = CheckInRequest::parse(&bytes);
    }

    #[test]
    fn truncated_messages_are_errors(ep in arb_endpoint(), cut in 0usize..64) {
        let bytes = codec::encode_packet(&ep).expect("encodes");
        let cut = cut.min(bytes.len().saturating_sub(1));
        prop_assert!(codec::decode_packet::<Endpoint>(&bytes[..cut]).is_err());
    }
}
