//! What `/clusters` and [`crate::ProxyHandle::clusters`] show of a cluster: every host with
//! its discovery status, health, routing decision and load.

use serde::Serialize;

use super::{Cluster, MembershipStatus, now};
use crate::core::health::HealthStatus;
use crate::core::merge::{self, Candidate, Decision, DiscoveryStatus};

impl Cluster {
    pub fn snapshot(&self) -> ClusterSnapshot {
        let now = now();
        let st = self.lock();
        let checked = self.health_policy.is_some();
        let mut hosts = Vec::with_capacity(st.hosts.len());
        let mut candidates = Vec::with_capacity(st.hosts.len());
        for (addr, h) in &st.hosts {
            let decision = merge::decide(h.discovery, h.health.status(), checked);
            let ejected = h.outlier.is_ejected(now);
            candidates.push(Candidate { decision, ejected });
            hosts.push(HostSnapshot {
                address: addr.to_string(),
                discovery: h.discovery,
                health: h.health.status(),
                decision,
                weight: h.weight,
                zone: h.zone.as_deref().map(str::to_string),
                canary: h.canary,
                active_requests: h.handle.active(),
                ejected,
                ejections_total: h.outlier.total_ejections(),
                health_checks: h.health.checks(),
            });
        }
        let routable = merge::routable(&candidates, self.config.panic_threshold_percent);
        let mut membership = st.membership.clone();
        membership.last_ok_ms_ago = membership
            .last_ok
            .map(|t| now.saturating_duration_since(t).as_millis() as u64);
        ClusterSnapshot {
            name: self.config.name.clone(),
            service: self.config.service.clone(),
            lb_policy: st.balancer.policy(),
            panic: routable.panic,
            routable_hosts: routable.hosts.len(),
            active_requests: self.active_requests(),
            active_retries: self.retries_in_flight(),
            membership,
            hosts,
        }
    }
}

/// `/clusters` output for one cluster.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterSnapshot {
    pub name: String,
    pub service: String,
    pub lb_policy: crate::core::lb::LbPolicy,
    pub panic: bool,
    pub routable_hosts: usize,
    pub active_requests: u32,
    /// Retries in flight, which the retry budget and `max_retries` bound.
    pub active_retries: u32,
    pub membership: MembershipStatus,
    pub hosts: Vec<HostSnapshot>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostSnapshot {
    pub address: String,
    pub discovery: DiscoveryStatus,
    pub health: HealthStatus,
    pub decision: Decision,
    pub weight: u32,
    pub zone: Option<String>,
    pub canary: bool,
    pub active_requests: u32,
    pub ejected: bool,
    pub ejections_total: u64,
    pub health_checks: u64,
}
