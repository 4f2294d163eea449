//! JSON shapes of the registry API (docs/API.md#registry-api) and the parsers for request bodies.
//!
//! v1 is wire-compatible with lyft/discovery and Envoy v1 SDS: a listing is
//! `{service, env, hosts: [...]}` and a host carries `ip_address`, `port`, `revision`,
//! `last_check_in` and a flat `tags` object. v2 adds batch check-in, the service list and the
//! catalog that agents sync from.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::num::NonZeroU16;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::timefmt::{parse_rfc3339_ms, rfc3339_ms};
use crate::{Endpoint, RepoName, Revision, ServiceName, Tags, ValidationError, Weight};

mod v1_checkin;

pub use v1_checkin::{V1Checkin, V1Form};

/// At most this many endpoints in one v2 check-in (docs/OPERATING.md#limits).
pub const MAX_CHECKIN_ENDPOINTS: usize = 256;

/// One host in a v1 listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct V1Host {
    pub service: String,
    pub ip_address: String,
    pub port: u16,
    #[serde(default)]
    pub revision: String,
    #[serde(default)]
    pub service_repo_name: Option<String>,
    /// RFC 3339 UTC.
    pub last_check_in: String,
    #[serde(default)]
    pub tags: Map<String, Value>,
}

impl V1Host {
    pub fn from_endpoint(ep: &Endpoint, last_check_in_ms: u64) -> Self {
        V1Host {
            service: ep.service.to_string(),
            ip_address: ep.ip.to_string(),
            port: ep.port.get(),
            revision: ep.revision.to_string(),
            service_repo_name: ep.service_repo_name.as_ref().map(|r| r.to_string()),
            last_check_in: rfc3339_ms(last_check_in_ms),
            tags: ep.tags.to_json(),
        }
    }

    /// Back to the domain type, for clients (the agent, `tidings lookup`) that read listings.
    /// Returns the endpoint and its check-in time in epoch milliseconds.
    pub fn to_endpoint(&self) -> Result<(Endpoint, u64), ValidationError> {
        let ep = Endpoint {
            service: ServiceName::new(self.service.clone())?,
            ip: parse_ip(&self.ip_address)?,
            port: port_from(u64::from(self.port))?,
            revision: Revision::new(self.revision.clone())?,
            service_repo_name: self
                .service_repo_name
                .clone()
                .map(RepoName::new)
                .transpose()?,
            tags: Tags::from_json(&Value::Object(self.tags.clone()))?,
        };
        Ok((ep, parse_rfc3339_ms(&self.last_check_in).unwrap_or(0)))
    }
}

/// `GET /v1/registration/{service}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct V1Listing {
    pub service: String,
    pub env: String,
    pub hosts: Vec<V1Host>,
}

/// `GET /v1/registration/repo/{repo}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct V1RepoListing {
    pub service_repo_name: String,
    pub env: String,
    pub hosts: Vec<V1Host>,
}

/// One endpoint as a client describes it in a check-in (v1 JSON body or one v2 entry).
/// `ip` may be left out in v2 when the request names the host's ip once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    pub port: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_repo_name: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub tags: Value,
}

impl EndpointSpec {
    /// Validates into an endpoint. `service` and `default_ip` fill in what the spec omits
    /// (the path segment of v1, the request-level ip of v2).
    pub fn into_endpoint(
        self,
        service: Option<&ServiceName>,
        default_ip: Option<IpAddr>,
    ) -> Result<Endpoint, ValidationError> {
        self.build(service, default_ip, None)
    }

    /// [`into_endpoint`](Self::into_endpoint) for a v1 check-in, also giving the keys of the
    /// tag object the spec carried, taken from the same parse of its tags.
    pub(crate) fn into_endpoint_with_tag_keys(
        self,
        service: &ServiceName,
    ) -> Result<(Endpoint, BTreeSet<String>), ValidationError> {
        let mut keys = BTreeSet::new();
        let ep = self.build(Some(service), None, Some(&mut keys))?;
        Ok((ep, keys))
    }

    fn build(
        self,
        service: Option<&ServiceName>,
        default_ip: Option<IpAddr>,
        tag_keys: Option<&mut BTreeSet<String>>,
    ) -> Result<Endpoint, ValidationError> {
        let service = match (self.service, service) {
            (Some(s), _) => ServiceName::new(s)?,
            (None, Some(s)) => s.clone(),
            (None, None) => return Err(ValidationError::Missing("service")),
        };
        let ip = match (self.ip, default_ip) {
            (Some(ip), _) => parse_ip(&ip)?,
            (None, Some(ip)) => ip,
            (None, None) => return Err(ValidationError::Missing("ip")),
        };
        let port = match &self.port {
            Value::Number(n) => port_from(
                n.as_u64()
                    .ok_or_else(|| ValidationError::Port(n.to_string()))?,
            )?,
            Value::String(s) => parse_port(s)?,
            Value::Null => return Err(ValidationError::Missing("port")),
            other => return Err(ValidationError::Port(other.to_string())),
        };
        // lyft/discovery clients send tags as a JSON *string*; accept both forms.
        let tags_value = match self.tags {
            Value::String(s) => parse_tag_string(&s)?,
            v => v,
        };
        let tags = Tags::from_json(&tags_value)?;
        if let (Some(keys), Value::Object(obj)) = (tag_keys, tags_value) {
            keys.extend(obj.into_iter().map(|(k, _)| k));
        }
        Ok(Endpoint {
            service,
            ip,
            port,
            revision: bounded(self.revision.unwrap_or_default(), "revision", 128)?,
            service_repo_name: self
                .service_repo_name
                .map(|r| bounded(r, "service_repo_name", 128))
                .transpose()?,
            tags,
        })
    }
}

fn bounded<const MAX: usize>(
    s: String,
    field: &'static str,
    max: usize,
) -> Result<crate::BoundedString<MAX>, ValidationError> {
    crate::BoundedString::new(s).map_err(|_| ValidationError::TooLong { field, max })
}

fn parse_tag_string(s: &str) -> Result<Value, ValidationError> {
    if s.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(s)
        .map_err(|_| ValidationError::Malformed("Invalid json supplied in tags".into()))
}

pub fn parse_ip(s: &str) -> Result<IpAddr, ValidationError> {
    s.trim()
        .parse()
        .map_err(|_| ValidationError::Ip(s.to_string()))
}

pub fn parse_port(s: &str) -> Result<NonZeroU16, ValidationError> {
    let n = s
        .trim()
        .parse::<u64>()
        .map_err(|_| ValidationError::Port(s.to_string()))?;
    port_from(n)
}

fn port_from(n: u64) -> Result<NonZeroU16, ValidationError> {
    u16::try_from(n)
        .ok()
        .and_then(NonZeroU16::new)
        .ok_or_else(|| ValidationError::Port(n.to_string()))
}

/// Parses a v1 check-in body for `service`: form-encoded (lyft/discovery's clients, `tags` as
/// a JSON string) when `is_json` is false, a JSON [`EndpointSpec`] otherwise. The registry
/// reads the body once through [`V1Checkin`], which also keeps the sent tag keys.
pub fn parse_v1_checkin(
    service: &ServiceName,
    body: &[u8],
    is_json: bool,
) -> Result<Endpoint, ValidationError> {
    let checkin = if is_json {
        V1Checkin::from_json(service, body)?
    } else {
        V1Checkin::from_form(service, V1Form::decode(body))?
    };
    Ok(checkin.endpoint)
}

/// `POST /v2/checkin`: one host's endpoints in one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckInRequest {
    /// The host's ip, used by every entry that names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    pub endpoints: Vec<EndpointSpec>,
    /// The agent's gossip owner key (Ed25519 public key, base64), for the registry to
    /// certify (docs/API.md#check-in). Optional: cron check-ins and older agents omit it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gossip_key: Option<String>,
}

impl CheckInRequest {
    pub fn parse(body: &[u8]) -> Result<Vec<Endpoint>, ValidationError> {
        Self::parse_with_key(body).map(|(endpoints, _)| endpoints)
    }

    /// [`parse`](Self::parse), also returning the gossip owner key if the request has one.
    pub fn parse_with_key(body: &[u8]) -> Result<(Vec<Endpoint>, Option<String>), ValidationError> {
        let req: CheckInRequest =
            serde_json::from_slice(body).map_err(|e| ValidationError::Malformed(e.to_string()))?;
        if req.endpoints.len() > MAX_CHECKIN_ENDPOINTS {
            return Err(ValidationError::TooManyEndpoints {
                max: MAX_CHECKIN_ENDPOINTS,
                got: req.endpoints.len(),
            });
        }
        let default_ip = req.ip.as_deref().map(parse_ip).transpose()?;
        let endpoints = req
            .endpoints
            .into_iter()
            .map(|s| s.into_endpoint(None, default_ip))
            .collect::<Result<_, _>>()?;
        Ok((endpoints, req.gossip_key))
    }

    /// The request a client sends for `endpoints`.
    pub fn from_endpoints(endpoints: &[Endpoint]) -> Self {
        let endpoints = endpoints
            .iter()
            .map(|ep| EndpointSpec {
                service: Some(ep.service.to_string()),
                ip: Some(ep.ip.to_string()),
                port: Value::from(ep.port.get()),
                revision: Some(ep.revision.to_string()),
                service_repo_name: ep.service_repo_name.as_ref().map(|r| r.to_string()),
                tags: Value::Object(ep.tags.to_json()),
            })
            .collect();
        CheckInRequest {
            ip: None,
            endpoints,
            gossip_key: None,
        }
    }
}

/// The answer to a check-in: how many endpoints were stored and when to come back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckInResponse {
    pub accepted: usize,
    pub ttl_secs: u64,
    /// When the request carried a `gossip_key` and the registry has a signing key: the
    /// certificate binding that key to the host's ip (base64 of its binary form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gossip_certificate: Option<String>,
}

/// Parses the weight of `POST /v1/loadbalancing/...`: form field `load_balancing_weight`
/// (lyft's name; `weight` is accepted too) or a JSON object with the same key.
pub fn parse_weight_body(body: &[u8], is_json: bool) -> Result<Weight, ValidationError> {
    if is_json {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| ValidationError::Malformed(e.to_string()))?;
        let w = v.get("load_balancing_weight").or_else(|| v.get("weight"));
        return match w {
            Some(Value::Number(n)) => n
                .as_u64()
                .map_or_else(|| Err(ValidationError::Weight(n.to_string())), Weight::new),
            Some(Value::String(s)) => Weight::parse(s),
            Some(other) => Err(ValidationError::Weight(other.to_string())),
            None => Err(ValidationError::Missing("load_balancing_weight")),
        };
    }
    let form: BTreeMap<String, String> = serde_urlencoded::from_bytes(body)
        .map_err(|e| ValidationError::Malformed(e.to_string()))?;
    let w = form
        .get("load_balancing_weight")
        .or_else(|| form.get("weight"));
    w.map_or(
        Err(ValidationError::Missing("load_balancing_weight")),
        |w| Weight::parse(w),
    )
}

/// One row of `GET /v2/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub service: String,
    pub hosts: usize,
}

/// `GET /v2/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicesResponse {
    pub index: u64,
    pub services: Vec<ServiceSummary>,
}

/// `GET /v2/catalog`: every live endpoint of every service, what agents sync from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    pub index: u64,
    /// Registry clock when the answer was built, epoch ms: snapshots are ordered by it.
    pub generated_at_ms: u64,
    /// The registry's store was empty at start and it has not yet seen a full check-in
    /// interval: its answer may be incomplete, and agents must not replace a view with it.
    pub warming: bool,
    /// Self-preservation is on or the store could not be read: expiry is paused.
    pub stale: bool,
    pub services: BTreeMap<String, Vec<V1Host>>,
    /// Per service, the registry's signature of its listing as of `generated_at_ms`
    /// ([`crate::cert::listing_message`], base64): asked for with `signed=true`, given by a
    /// registry with a signing key for the services it lists, when not warming.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub signatures: BTreeMap<String, String>,
}

/// The key of a host in a catalog: its address within its service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HostKey {
    pub ip_address: String,
    pub port: u16,
}

impl HostKey {
    pub fn of(host: &V1Host) -> Self {
        HostKey {
            ip_address: host.ip_address.clone(),
            port: host.port,
        }
    }
}

/// `GET /v2/catalog?delta=true[&index=I]` (docs/API.md#catalog-deltas): either the whole
/// catalog (`full`), or the changes since index `from`. Both carry the digest of the catalog
/// they describe, so a client can check what it rebuilt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogChanges {
    pub index: u64,
    pub generated_at_ms: u64,
    pub warming: bool,
    pub stale: bool,
    /// `services` is the whole catalog (the registry no longer holds the view at `index`
    /// the client named, or it named none). Absent means true: a registry from before
    /// deltas ignores `delta=true` and answers the plain catalog.
    #[serde(default = "yes")]
    pub full: bool,
    /// The index the changes apply to; absent when `full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    /// Lower-case hex SHA-256 of the resulting catalog (`discovery::delta::catalog_digest`);
    /// empty from a registry from before deltas.
    #[serde(default)]
    pub digest: String,
    /// Full: every service. Delta: per service, the hosts added or changed (a host whose
    /// only change is `last_check_in` is not sent).
    pub services: BTreeMap<String, Vec<V1Host>>,
    /// Delta: per service, the hosts gone (its other hosts stay).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub removed: BTreeMap<String, Vec<HostKey>>,
    /// Delta: services with no host left.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed_services: Vec<String>,
    /// As [`Catalog::signatures`], for each service the answer lists or changes (an empty
    /// listing for a service removed), of the whole listing the client rebuilds.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub signatures: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

/// Every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}
