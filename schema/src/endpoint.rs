use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU16;

use serde::{Deserialize, Serialize};

use crate::{RepoName, Revision, ServiceName, Tags};

/// The identity of an endpoint: `(service, ip, port)`. lyft/discovery keyed on `(service, ip)`
/// and so let two instances on one host overwrite each other (its issue #22); we do not.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EndpointKey {
    pub service: ServiceName,
    pub ip: IpAddr,
    pub port: NonZeroU16,
}

impl EndpointKey {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port.get())
    }

    /// `ip:port`, with IPv6 in brackets: the DynamoDB sort key and the log form.
    pub fn addr_string(&self) -> String {
        self.socket_addr().to_string()
    }
}

impl fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.service, self.socket_addr())
    }
}

/// One instance of a service: where it listens and how to treat it. Always valid: every
/// field is a validating type, so a decoded `Endpoint` needs no second check.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    pub service: ServiceName,
    pub ip: IpAddr,
    pub port: NonZeroU16,
    pub revision: Revision,
    pub service_repo_name: Option<RepoName>,
    pub tags: Tags,
}

impl Endpoint {
    /// A plain endpoint with default tags, mostly for tests and the demo.
    pub fn new(service: ServiceName, ip: IpAddr, port: NonZeroU16) -> Self {
        Endpoint {
            service,
            ip,
            port,
            revision: Revision::default(),
            service_repo_name: None,
            tags: Tags::default(),
        }
    }

    pub fn key(&self) -> EndpointKey {
        EndpointKey {
            service: self.service.clone(),
            ip: self.ip,
            port: self.port,
        }
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port.get())
    }
}
