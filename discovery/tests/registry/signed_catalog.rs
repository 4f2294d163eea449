//! The registry's signatures of the listings agents gossip (`GET /v2/catalog?signed=true`,
//! issue #17): one per service the answer gives, over the service, the answer's date and its
//! endpoints as an agent reads them; in a delta, only for the services it changes.

use std::collections::BTreeMap;

use discovery::RegistryConfig;
use discovery::delta::{self, Replica};
use schema::api::{Catalog, CatalogChanges, V1Host};
use schema::cert::{PublicKey, Signature, SigningKey, listing_message};
use schema::{Endpoint, ServiceName};

use crate::common::Harness;

/// A registry with `key`, past its warm-up (a warming answer is not signed: agents make
/// lower bounds of it).
fn signing(key: &SigningKey) -> Harness {
    let config = RegistryConfig {
        signing_key: Some(key.to_base64()),
        ..Default::default()
    };
    let warm_up = config.check_in_interval;
    let h = Harness::with_config(config);
    h.clock.advance(warm_up + std::time::Duration::from_secs(1));
    h
}

fn endpoints(hosts: &[V1Host]) -> Vec<Endpoint> {
    hosts
        .iter()
        .map(|h| h.to_endpoint().expect("valid host").0)
        .collect()
}

/// Whether `sig` is the registry's signature of `service` listing `eps` at `at`.
fn verifies(key: &PublicKey, service: &str, at: u64, eps: &[Endpoint], sig: &str) -> bool {
    let service = ServiceName::new(service.to_string()).expect("valid");
    let sig = Signature::from_base64(sig).expect("a signature");
    let msg = listing_message(&service, at, eps).expect("encodes");
    key.verifies(&msg, &sig)
}

/// The answer to `GET /v2/catalog?{query}`, checked to be exactly what serde makes of its
/// struct (the registry splices it from parts).
async fn get<T: serde::de::DeserializeOwned + serde::Serialize>(h: &Harness, query: &str) -> T {
    let r = h.get(&format!("/v2/catalog?{query}")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let c: T = serde_json::from_slice(&r.body).expect("an answer");
    assert_eq!(serde_json::to_vec(&c).expect("encodes"), r.body.to_vec());
    c
}

async fn catalog(h: &Harness, query: &str) -> CatalogChanges {
    get(h, query).await
}

#[tokio::test]
async fn each_listing_is_signed_and_a_tampered_one_does_not_verify() {
    let key = SigningKey::generate();
    let h = signing(&key);
    h.register("web", "10.0.0.1", 80).await;
    h.register("web", "10.0.0.2", 80).await;
    h.register("db", "10.0.0.3", 5432).await;

    let whole: Catalog = get(&h, "signed=true").await;
    assert!(
        !whole.warming,
        "a registry that was never empty does not warm up"
    );
    assert_eq!(whole.signatures.len(), 2, "{whole:?}");
    let at = whole.generated_at_ms;
    let web = endpoints(&whole.services["web"]);
    let sig = &whole.signatures["web"];
    assert!(verifies(&key.public(), "web", at, &web, sig));
    // The order the endpoints come in does not matter; what they are and the date do.
    let reversed: Vec<Endpoint> = web.iter().rev().cloned().collect();
    assert!(verifies(&key.public(), "web", at, &reversed, sig));
    let mut added = web.clone();
    added.push(Endpoint::new(
        ServiceName::new("web").expect("valid"),
        "10.6.6.6".parse().expect("ip"),
        std::num::NonZeroU16::new(80).expect("nonzero"),
    ));
    assert!(!verifies(&key.public(), "web", at, &added, sig));
    assert!(!verifies(&key.public(), "web", at + 1, &web, sig));
    assert!(!verifies(&key.public(), "db", at, &web, sig));
    assert!(!verifies(
        &SigningKey::generate().public(),
        "web",
        at,
        &web,
        sig
    ));

    // Not asked, not given: agents with signing off cost the registry nothing.
    assert!(get::<Catalog>(&h, "").await.signatures.is_empty());
    // Without a signing key, asked or not, none.
    let unsigned = Harness::new();
    unsigned.register("web", "10.0.0.1", 80).await;
    assert!(
        get::<Catalog>(&unsigned, "signed=true")
            .await
            .signatures
            .is_empty()
    );
}

#[tokio::test]
async fn a_delta_signs_the_rebuilt_listing_of_each_service_it_changes() {
    let key = SigningKey::generate();
    let h = signing(&key);
    h.register("web", "10.0.0.1", 80).await;
    h.register("db", "10.0.0.3", 5432).await;
    h.register("cache", "10.0.0.4", 6379).await;
    let base = catalog(&h, "delta=true&signed=true").await;
    let replica = Replica::new(delta::full_catalog(base.clone()));

    h.register("web", "10.0.0.2", 80).await;
    let r = h
        .call("DELETE", "/v1/registration/db/10.0.0.3", &[], "")
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let d = catalog(&h, &format!("delta=true&signed=true&index={}", base.index)).await;
    assert!(!d.full, "{d:?}");
    let signed: Vec<&str> = d.signatures.keys().map(String::as_str).collect();
    assert_eq!(
        signed,
        ["db", "web"],
        "unchanged services are not signed again"
    );
    let at = d.generated_at_ms;
    let rebuilt: Catalog = replica.apply(d.clone()).expect("applies").catalog().clone();
    let web = endpoints(&rebuilt.services["web"]);
    assert_eq!(web.len(), 2);
    assert!(verifies(
        &key.public(),
        "web",
        at,
        &web,
        &d.signatures["web"]
    ));
    // A service gone is signed as an empty listing, which is what an agent makes of it.
    assert!(verifies(&key.public(), "db", at, &[], &d.signatures["db"]));
    // The rebuilt catalog carries this answer's signatures, not the base's.
    let want: BTreeMap<String, String> = d.signatures.clone();
    assert_eq!(rebuilt.signatures, want);
}
