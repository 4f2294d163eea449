//! Answer bodies of the local API, encoded once per change of a service and kept with it.
//!
//! A [`ServiceHosts`] lives behind an `Arc` that successive [`MergedView`]s share for as long
//! as the service's hosts do not change ([`crate::view::Merger::merge`]), so the bodies kept
//! in its [`Answers`] outlive view changes elsewhere: a lookup of an unchanged service copies
//! bytes instead of building `V1Host`s and JSON. Each format is encoded on its first request:
//! the v1 listing (which also supplies the catalog's per-service arrays) and the EDS answer.
//! Bodies hold nothing that varies per request; headers are added by [`crate::api`], and the
//! catalog's own fields (`generated_at_ms`, `stale`) are written around the kept arrays on
//! every request. Answers with `?draining=true` are rare and stay computed.

use std::ops::Range;
use std::sync::OnceLock;

use bytes::{BufMut, Bytes, BytesMut};
use schema::api::{V1Host, V1Listing};
use schema::eds;
use schema::wire::{TRUE, tag};
use schema::{Endpoint, ServiceName};
use serde::Serialize;
use serde_json::Value;

use crate::view::{Drain, Host, MergedView, ServiceHosts};

/// The bodies kept for one service's hosts, made on first request.
#[derive(Debug, Default)]
pub struct Answers {
    listing: OnceLock<Listing>,
    eds: OnceLock<Bytes>,
}

/// The v1 listing, and where its `hosts` array lies in it (the catalog reuses that slice).
#[derive(Debug)]
struct Listing {
    body: Bytes,
    hosts: Range<usize>,
}

// The bodies are a function of the hosts they were made from: two `ServiceHosts` are
// equal when their hosts are, whatever either has encoded so far.
impl PartialEq for Answers {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Answers {}

/// The v1 form of a service's hosts.
pub fn v1_hosts(hosts: &[Host]) -> Vec<V1Host> {
    hosts
        .iter()
        .map(|h| V1Host::from_endpoint(&h.endpoint, h.last_check_in_ms))
        .collect()
}

fn json<T: Serialize + ?Sized>(buf: &mut BytesMut, value: &T) {
    // Serializing our own types (string keys, no non-finite floats) into memory cannot fail.
    serde_json::to_writer(buf.writer(), value).expect("JSON into memory");
}

impl ServiceHosts {
    /// The v1 listing body. `env` is the agent's, fixed for its life.
    pub fn listing_body(&self, service: &ServiceName, env: &str) -> Bytes {
        self.listing(service, env).body.clone()
    }

    /// The listing's `hosts` array, as JSON.
    fn hosts_json(&self, service: &ServiceName, env: &str) -> Bytes {
        let l = self.listing(service, env);
        l.body.slice(l.hosts.clone())
    }

    fn listing(&self, service: &ServiceName, env: &str) -> &Listing {
        self.answers.listing.get_or_init(|| {
            // Field by field as `V1Listing` serializes, so the hosts' span is known.
            let mut buf = BytesMut::new();
            buf.put_slice(b"{\"service\":");
            json(&mut buf, service.as_str());
            buf.put_slice(b",\"env\":");
            json(&mut buf, env);
            buf.put_slice(b",\"hosts\":");
            let start = buf.len();
            json(&mut buf, &v1_hosts(&self.hosts));
            let end = buf.len();
            buf.put_u8(b'}');
            Listing {
                body: kept(buf),
                hosts: start..end,
            }
        })
    }

    /// The EDS answer for the service, at version `index`.
    pub fn eds_body(&self, service: &ServiceName) -> Bytes {
        self.answers
            .eds
            .get_or_init(|| {
                let endpoints: Vec<_> = self
                    .hosts
                    .iter()
                    .map(|h| Endpoint::clone(&h.endpoint))
                    .collect();
                let resp =
                    eds::response(service.as_str(), &self.index.to_string(), &endpoints, None);
                let mut buf = BytesMut::new();
                json(&mut buf, &resp);
                kept(buf)
            })
            .clone()
    }
}

/// A body to keep, in a buffer of its own size: the encoder grows its buffer by doubling,
/// and kept as it is, a body would hold up to twice its size for as long as its service is
/// unchanged (at 100 000 endpoints, every service's listing is 25 MB of bytes).
fn kept(buf: BytesMut) -> Bytes {
    if buf.capacity() - buf.len() > buf.len() / 16 {
        Bytes::copy_from_slice(&buf)
    } else {
        buf.freeze()
    }
}

/// `value` as a JSON body.
pub fn encoded<T: Serialize + ?Sized>(value: &T) -> Bytes {
    let mut buf = BytesMut::new();
    json(&mut buf, value);
    buf.freeze()
}

/// The v1 listing of `service`: kept bytes, or for `draining`, computed with the hosts
/// deregistered lately, tagged `draining = "true"`.
pub fn listing(view: &MergedView, service: &ServiceName, env: &str, draining: bool) -> Bytes {
    let drains = view.draining(service);
    match view.service(service) {
        Some(s) if !draining || drains.is_empty() => s.listing_body(service, env),
        s => encoded(&fresh_listing(
            service,
            env,
            s.map_or(&[], |s| &s.hosts),
            if draining { drains } else { &[] },
        )),
    }
}

/// The v1 listing built value by value (the form the kept bytes must equal).
pub fn fresh_listing(
    service: &ServiceName,
    env: &str,
    hosts: &[Host],
    drains: &[Drain],
) -> V1Listing {
    let mut hosts = v1_hosts(hosts);
    hosts.extend(drains.iter().map(|d| {
        let mut h = V1Host::from_endpoint(&d.endpoint, d.since_ms);
        h.tags
            .insert(tag::DRAINING.to_string(), Value::String(TRUE.to_string()));
        h
    }));
    V1Listing {
        service: service.to_string(),
        env: env.to_string(),
        hosts,
    }
}

/// The EDS answer for `cluster` (a service name as the request spelled it).
pub fn eds(view: &MergedView, service: &ServiceName, cluster: &str) -> Bytes {
    match view.service(service) {
        Some(s) if cluster == service.as_str() => s.eds_body(service),
        s => {
            let endpoints: Vec<_> = s
                .map(|s| {
                    s.hosts
                        .iter()
                        .map(|h| Endpoint::clone(&h.endpoint))
                        .collect()
                })
                .unwrap_or_default();
            let version = view.service_index(service).to_string();
            encoded(&eds::response(cluster, &version, &endpoints, None))
        }
    }
}

/// The `/v2/catalog` body: the per-request fields, then every service's kept hosts array.
/// Field by field as [`schema::api::Catalog`] serializes.
pub fn catalog(view: &MergedView, env: &str, generated_at_ms: u64, stale: bool) -> Bytes {
    let arrays: Vec<(&ServiceName, Bytes)> = view
        .services()
        .map(|(name, s)| (name, s.hosts_json(name, env)))
        .collect();
    let size = arrays
        .iter()
        .map(|(n, a)| n.as_str().len() + a.len() + 4)
        .sum::<usize>();
    let mut buf = BytesMut::with_capacity(size + 128);
    buf.put_slice(b"{\"index\":");
    json(&mut buf, &view.index());
    buf.put_slice(b",\"generated_at_ms\":");
    json(&mut buf, &generated_at_ms);
    buf.put_slice(b",\"warming\":false,\"stale\":");
    json(&mut buf, &stale);
    buf.put_slice(b",\"services\":{");
    for (i, (name, array)) in arrays.iter().enumerate() {
        if i > 0 {
            buf.put_u8(b',');
        }
        json(&mut buf, name.as_str());
        buf.put_u8(b':');
        buf.put_slice(array);
    }
    buf.put_slice(b"}}");
    buf.freeze()
}

#[cfg(test)]
#[path = "answers_tests.rs"]
mod tests;
