//! The fleet's catalog replicas and the answers they are built from. A real agent holds its
//! own copy of the catalog; a thousand copies of 100 000 hosts would not fit this machine, so
//! replicas share structure: a view is one `Arc` per service, and two clients at the same
//! verified index hold the same view. Equal answers (byte for byte) are parsed once, and a
//! delta is applied once per base: the first client computes, the others take its result.
//! None of this changes a byte on the wire, which is what the benchmark measures.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytes::Bytes;
use discovery::delta::{
    self, DeltaError, ServiceHosts, catalog_digest, host_order, remove_hosts, upsert_hosts,
};
use schema::api::{Catalog, CatalogChanges, V1Host};
use tokio::sync::OnceCell;

/// One client's catalog at `index`, sharing every service with the views it came from.
#[derive(Debug)]
pub struct View {
    pub index: u64,
    pub services: BTreeMap<String, Arc<ServiceHosts>>,
}

impl View {
    /// A whole catalog's view: empty services dropped, hosts in the registry's order.
    pub fn whole(index: u64, services: BTreeMap<String, Vec<V1Host>>) -> View {
        let services = services
            .into_iter()
            .filter(|(_, hosts)| !hosts.is_empty())
            .map(|(service, mut hosts)| {
                hosts.sort_by(host_order);
                let entry = Arc::new(ServiceHosts::new(&service, hosts));
                (service, entry)
            })
            .collect();
        View { index, services }
    }

    pub fn digest_hex(&self) -> String {
        let d = catalog_digest(self.services.values().map(|s| &s.digest));
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The view after a delta, as `discovery::delta::Replica::apply` rebuilds it, copying
    /// only the services the delta touches.
    pub fn apply(&self, changes: &CatalogChanges) -> Result<View, DeltaError> {
        if changes.full {
            return Err(DeltaError::NotADelta);
        }
        if changes.from != Some(self.index) {
            return Err(DeltaError::WrongBase {
                held: self.index,
                from: changes.from,
            });
        }
        let mut services = self.services.clone();
        for service in &changes.removed_services {
            services.remove(service);
        }
        let mut touched: BTreeMap<&String, Vec<V1Host>> = BTreeMap::new();
        let hosts_of = |service: &String| -> Vec<V1Host> {
            services
                .get(service)
                .map(|s| s.hosts.clone())
                .unwrap_or_default()
        };
        for (service, gone) in &changes.removed {
            let hosts = touched.entry(service).or_insert_with(|| hosts_of(service));
            remove_hosts(hosts, gone);
        }
        for (service, upserts) in &changes.services {
            let hosts = touched.entry(service).or_insert_with(|| hosts_of(service));
            upsert_hosts(hosts, upserts.clone());
        }
        for (service, mut hosts) in touched {
            if hosts.is_empty() {
                services.remove(service);
            } else {
                hosts.sort_by(host_order);
                services.insert(service.clone(), Arc::new(ServiceHosts::new(service, hosts)));
            }
        }
        let view = View {
            index: changes.index,
            services,
        };
        let got = view.digest_hex();
        if got != changes.digest {
            return Err(DeltaError::Digest {
                expected: changes.digest.clone(),
                got,
            });
        }
        Ok(view)
    }

    /// The host `ip:port` of `service`, if listed.
    pub fn host(&self, service: &str, ip: &str, port: u16) -> Option<&V1Host> {
        self.services
            .get(service)?
            .hosts
            .iter()
            .find(|h| h.ip_address == ip && h.port == port)
    }
}

/// One answer as the clients share it.
#[derive(Debug)]
pub enum Answer {
    /// A whole catalog; `verified` when its digest matched (only then a base for deltas).
    Whole {
        view: Arc<View>,
        verified: bool,
        warming: bool,
    },
    /// A delta, and its result once one client applied it (every client that can apply it
    /// holds the same verified view at `from`, so the result is the same for all).
    Delta {
        // Boxed: a delta-mode answer is several times the size of the whole variant.
        changes: Box<CatalogChanges>,
        applied: OnceLock<Result<Arc<View>, DeltaError>>,
    },
}

impl Answer {
    /// Parses a body; `full_protocol`: a plain catalog (`GET /v2/catalog`), else a delta-mode
    /// answer.
    fn parse(body: &[u8], full_protocol: bool) -> Result<Answer, String> {
        if full_protocol {
            let c: Catalog = serde_json::from_slice(body).map_err(|e| e.to_string())?;
            let view = Arc::new(View::whole(c.index, c.services));
            return Ok(Answer::Whole {
                view,
                verified: false,
                warming: c.warming,
            });
        }
        let mut c: CatalogChanges = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        if !c.full {
            return Ok(Answer::Delta {
                changes: Box::new(c),
                applied: OnceLock::new(),
            });
        }
        let digest = std::mem::take(&mut c.digest);
        let warming = c.warming;
        let catalog = delta::full_catalog(c);
        let view = View::whole(catalog.index, catalog.services);
        Ok(Answer::Whole {
            verified: view.digest_hex() == digest,
            view: Arc::new(view),
            warming,
        })
    }
}

/// How many distinct recent bodies are remembered.
const RECENT: usize = 8;

type Parsed = Arc<OnceCell<Result<Arc<Answer>, String>>>;

/// A body split around its `generated_at_ms` value, the one field that differs between
/// answers of the same content (the registry's clock at each request).
struct Key {
    body: Bytes,
    /// The value's digits are `body[at.0..at.1]`.
    at: (usize, usize),
}

impl Key {
    fn new(body: Bytes) -> Key {
        const FIELD: &[u8] = b"\"generated_at_ms\":";
        let head = &body[..body.len().min(512)];
        let at = head
            .windows(FIELD.len())
            .position(|w| w == FIELD)
            .map(|p| {
                let start = p + FIELD.len();
                let digits = body[start..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                (start, start + digits)
            })
            .unwrap_or((0, 0));
        Key { body, at }
    }

    fn same(&self, other: &Key) -> bool {
        self.body[..self.at.0] == other.body[..other.at.0]
            && self.body[self.at.1..] == other.body[other.at.1..]
    }
}

/// The recent answers, by content: bytes on the wire, decompressed, but for the clock.
#[derive(Default)]
pub struct Answers {
    recent: Mutex<VecDeque<(Key, Parsed)>>,
}

impl Answers {
    /// The answer `body` carries, parsed by the first client that received this content.
    /// A gzip body is decompressed by each client, as an agent would.
    pub async fn get(
        &self,
        body: Bytes,
        gzip: bool,
        full_protocol: bool,
    ) -> Result<Arc<Answer>, String> {
        let body = if gzip {
            tokio::task::spawn_blocking(move || {
                let mut plain = Vec::new();
                flate2::read::GzDecoder::new(&body[..])
                    .read_to_end(&mut plain)
                    .map(|_| Bytes::from(plain))
                    .map_err(|e| format!("gzip: {e}"))
            })
            .await
            .map_err(|e| e.to_string())??
        } else {
            body
        };
        let key = Key::new(body.clone());
        let cell = {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            match recent.iter().find(|(k, _)| k.same(&key)) {
                Some((_, cell)) => cell.clone(),
                None => {
                    let cell = Parsed::default();
                    if recent.len() >= RECENT {
                        recent.pop_front();
                    }
                    recent.push_back((key, cell.clone()));
                    cell
                }
            }
        };
        cell.get_or_init(|| async move {
            // Parsing 20 MB of catalog takes a while: off the runtime's workers.
            tokio::task::spawn_blocking(move || Answer::parse(&body, full_protocol))
                .await
                .map_err(|e| e.to_string())?
                .map(Arc::new)
        })
        .await
        .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use discovery::delta::Replica;
    use schema::api::HostKey;

    fn host(service: &str, ip: &str, revision: &str) -> V1Host {
        V1Host {
            service: service.into(),
            ip_address: ip.into(),
            port: 8080,
            revision: revision.into(),
            service_repo_name: None,
            last_check_in: "2026-12-06T00:00:00.000Z".into(),
            tags: serde_json::Map::new(),
        }
    }

    fn catalog(index: u64, services: &[(&str, Vec<V1Host>)]) -> Catalog {
        Catalog {
            index,
            generated_at_ms: 0,
            warming: false,
            stale: false,
            services: services
                .iter()
                .map(|(s, h)| (s.to_string(), h.clone()))
                .collect(),
            signatures: Default::default(),
        }
    }

    /// The shared-structure view rebuilds what the agent's `Replica` rebuilds, digest included,
    /// and refuses a delta whose digest it does not reach.
    #[test]
    fn apply_agrees_with_the_agents_replica() {
        let before = catalog(
            1,
            &[
                (
                    "a",
                    vec![host("a", "10.0.0.1", "r1"), host("a", "10.0.0.2", "r1")],
                ),
                ("b", vec![host("b", "10.0.0.3", "r1")]),
            ],
        );
        let after = catalog(
            2,
            &[
                (
                    "a",
                    vec![
                        host("a", "10.0.0.1", "r1"),
                        host("a", "10.0.0.9", "fleet-7"),
                    ],
                ),
                ("c", vec![host("c", "10.0.0.4", "r1")]),
            ],
        );
        let mut changes = CatalogChanges {
            index: 2,
            generated_at_ms: 0,
            warming: false,
            stale: false,
            full: false,
            from: Some(1),
            digest: Replica::new(after.clone()).digest_hex(),
            services: [
                ("a".to_string(), vec![host("a", "10.0.0.9", "fleet-7")]),
                ("c".to_string(), vec![host("c", "10.0.0.4", "r1")]),
            ]
            .into(),
            removed: [(
                "a".to_string(),
                vec![HostKey {
                    ip_address: "10.0.0.2".into(),
                    port: 8080,
                }],
            )]
            .into(),
            removed_services: vec!["b".into()],
            signatures: Default::default(),
        };
        let view = View::whole(before.index, before.services.clone());
        let replica = Replica::new(before).apply(changes.clone());
        let applied = view.apply(&changes);
        let (Ok(replica), Ok(applied)) = (replica, applied) else {
            panic!("the delta did not apply");
        };
        assert_eq!(applied.digest_hex(), replica.digest_hex());
        assert_eq!(applied.index, 2);
        assert!(
            applied
                .host("a", "10.0.0.9", 8080)
                .is_some_and(|h| h.revision == "fleet-7")
        );
        assert!(applied.host("a", "10.0.0.2", 8080).is_none());
        assert!(!applied.services.contains_key("b"));
        changes.digest = "00".repeat(32);
        assert!(matches!(
            view.apply(&changes),
            Err(DeltaError::Digest { .. })
        ));
    }
}
