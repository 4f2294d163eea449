//! Each answer's exact bytes, as the agent sent them when it built them with `json!` (a map
//! with sorted keys): the wire format must not move.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::*;

/// `value` serialises to `want` and reads back equal.
fn pin<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T, want: &str) {
    let got = serde_json::to_string(value).expect("serialise");
    assert_eq!(got, want);
    let back: T = serde_json::from_str(&got).expect("deserialise");
    assert_eq!(&back, value);
}

#[test]
fn members_bytes() {
    let m = Members {
        members: vec![
            Member {
                addr: "10.0.0.1:7702".into(),
                bump: 0,
                epoch: 5,
                is_self: true,
                state: MemberState::Alive,
            },
            Member {
                addr: "10.0.0.2:7702".into(),
                bump: 2,
                epoch: 9,
                is_self: false,
                state: MemberState::Down,
            },
        ],
    };
    pin(
        &m,
        r#"{"members":[{"addr":"10.0.0.1:7702","bump":0,"epoch":5,"self":true,"state":"alive"},{"addr":"10.0.0.2:7702","bump":2,"epoch":9,"self":false,"state":"down"}]}"#,
    );
}

#[test]
fn self_bytes() {
    let s = AgentSelf {
        cache: CacheState {
            entries_pending: 1,
            stored_index: 42,
        },
        endpoints: vec![LocalEndpoint {
            addr: "10.0.0.1:8080".into(),
            service: "web".into(),
        }],
        epoch: 7,
        gossip_addr: "10.0.0.1:7702".into(),
        host_ip: "10.0.0.1".into(),
        registry: Some("http://registry:7700".into()),
        registry_age_ms: None,
        registry_digest: None,
        registry_ok: false,
        view: ViewSummary {
            hosts: 3,
            index: 42,
            services: 2,
            source: "cache".into(),
        },
        zone: Some("zone-a".into()),
    };
    pin(
        &s,
        r#"{"cache":{"entries_pending":1,"stored_index":42},"endpoints":[{"addr":"10.0.0.1:8080","service":"web"}],"epoch":7,"gossip_addr":"10.0.0.1:7702","host_ip":"10.0.0.1","registry":"http://registry:7700","registry_age_ms":null,"registry_digest":null,"registry_ok":false,"view":{"hosts":3,"index":42,"services":2,"source":"cache"},"zone":"zone-a"}"#,
    );
}

#[test]
fn endpoints_bytes() {
    let mut tags = Map::new();
    tags.insert("canary".into(), Value::Bool(false));
    tags.insert("load_balancing_weight".into(), Value::from(100));
    let e = AgentEndpoints {
        endpoints: vec![V1Host {
            service: "web".into(),
            ip_address: "10.0.0.1".into(),
            port: 8080,
            revision: "abc".into(),
            service_repo_name: None,
            last_check_in: "1970-01-01T00:00:00Z".into(),
            tags,
        }],
    };
    pin(
        &e,
        r#"{"endpoints":[{"ip_address":"10.0.0.1","last_check_in":"1970-01-01T00:00:00Z","port":8080,"revision":"abc","service":"web","service_repo_name":null,"tags":{"canary":false,"load_balancing_weight":100}}]}"#,
    );
}

#[test]
fn probe_bytes() {
    pin(&Live::new(), r#"{"status":"live"}"#);
    pin(&Ready::new(4), r#"{"hosts":4,"status":"ready"}"#);
}
