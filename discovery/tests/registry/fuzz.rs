//! A few thousand random and truncated bodies to every write route: nothing may answer 5xx
//! (or panic). Seeded; set `FUZZ_SEED` to replay a failure, whose seed is printed.

use std::time::{SystemTime, UNIX_EPOCH};

use discovery::{RegistryConfig, operator_token};
use serde_json::json;

use crate::common::Harness;
use crate::v1::urlencode;

/// splitmix64: tiny, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let tags = urlencode(r#"{"az":"a","canary":"true","load_balancing_weight":"50","x":1}"#);
    vec![
        format!("ip=10.0.0.1&port=80&revision=r&tags={tags}").into_bytes(),
        b"load_balancing_weight=50".to_vec(),
        json!({"ip": "10.0.0.1", "port": 80, "tags": {"az": "a", "canary": true}}).to_string().into_bytes(),
        json!({"ip": "::1", "endpoints": [{"service": "web", "port": 80, "tags": "{\"region\":\"r\"}"},
            {"service": "api", "ip": "10.0.0.2", "port": "81", "revision": "v", "service_repo_name": "repo"}]})
        .to_string()
        .into_bytes(),
        json!({"load_balancing_weight": 7}).to_string().into_bytes(),
    ]
}

const NASTY: &[&[u8]] = &[
    b"\0",
    b"\xff\xfe",
    b"{",
    b"}",
    b"[",
    b"\"",
    b"%",
    b"%zz",
    b"&",
    b"=",
    b"1e999",
    b"-1",
    b"18446744073709551616",
    b"null",
    b"true",
    b"\\u0000",
    b"\xf0\x9f\x92\xa9",
    b"::",
    b"999.999.999.999",
    b"[[[[[[[[[[[[[[[[[[[[",
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    match rng.below(6) {
        0 => b.truncate(rng.below(b.len() + 1)),
        1 => {
            let at = rng.below(b.len() + 1);
            let nasty = rng.pick(NASTY);
            b.splice(at..at, nasty.iter().copied());
        }
        2 => {
            for _ in 0..=rng.below(8) {
                if !b.is_empty() {
                    let i = rng.below(b.len());
                    b[i] = rng.next() as u8;
                }
            }
        }
        3 => b = (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
        4 => {
            // Deep nesting: the JSON parser must refuse it without blowing the stack.
            let depth = 50 + rng.below(5000);
            b = [vec![b'['; depth], vec![b']'; depth]].concat();
        }
        _ => {
            let cut = rng.below(b.len() + 1);
            b.truncate(cut);
            b.extend(std::iter::repeat_n(b'9', rng.below(40)));
        }
    }
    b
}

#[tokio::test]
async fn random_bodies_never_answer_5xx() {
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(42)
        });
    println!("fuzz seed: {seed} (replay with FUZZ_SEED={seed})");
    let mut rng = Rng(seed);
    let seeds = seeds();
    let open = Harness::new();
    let secured = Harness::with_config(RegistryConfig {
        secret: Some("k".into()),
        ..Default::default()
    });
    let op = format!("Bearer {}", operator_token("k"));
    let routes = [
        ("POST", "/v1/registration/web"),
        ("POST", "/v2/checkin"),
        ("POST", "/v1/loadbalancing/web"),
        ("POST", "/v1/loadbalancing/web/10.0.0.1"),
        ("DELETE", "/v1/registration/web/10.0.0.1"),
        ("POST", "/v1/registration/{random}"),
        ("DELETE", "/v1/registration/web/{random}"),
        ("GET", "/v2/catalog?index={random}&wait=0s"),
    ];
    let content_types = [
        "application/json",
        "application/x-www-form-urlencoded",
        "text/plain",
        "",
        "application/json; charset=utf-8",
    ];
    for i in 0..3000 {
        let (method, route) = *rng.pick(&routes);
        let base = rng.pick(&seeds).clone();
        let body = mutate(&mut rng, &base);
        let random_segment = urlencode(&String::from_utf8_lossy(&mutate(&mut rng, b"10.0.0.1")));
        let uri = route.replace("{random}", &random_segment);
        let ct = *rng.pick(&content_types);
        let h = if i % 2 == 0 { &open } else { &secured };
        let mut headers = vec![];
        if !ct.is_empty() {
            headers.push(("content-type", ct));
        }
        if i % 4 == 1 {
            headers.push(("authorization", op.as_str()));
        }
        let r = h.call(method, &uri, &headers, body.clone()).await;
        assert!(
            r.status.as_u16() < 500,
            "seed {seed}, case {i}: {method} {uri} {ct} {:?} -> {} {:?}",
            String::from_utf8_lossy(&body),
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        if !r.status.is_success() {
            r.json()["error"]["code"]
                .as_str()
                .unwrap_or_else(|| panic!("seed {seed}, case {i}: not a JSON error"));
        }
    }
}
