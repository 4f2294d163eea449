//! The cluster's load as the retry budget sees it: requests in flight and retries in flight,
//! each changed only through RAII guards, so an early return, a cancelled request (the client
//! left) or a panic gives the count back.

use std::ops::Deref;
use std::sync::atomic::Ordering;

use crate::core::breaker::{Permit, Resource};
use crate::core::retry::{self, RetryOverflow};

use super::Cluster;

/// Counts one request as active in its cluster until dropped. Generic over how the cluster is
/// held: a borrow on the request path, an `Arc` in a response body that outlives it.
#[derive(Debug)]
pub struct ActiveRequest<C: Deref<Target = Cluster>>(C);

impl<C: Deref<Target = Cluster>> ActiveRequest<C> {
    pub fn cluster(&self) -> &Cluster {
        &self.0
    }
}

impl<C: Deref<Target = Cluster>> Drop for ActiveRequest<C> {
    fn drop(&mut self) {
        self.0.active_requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One retry in flight, from the decision to retry (back-off included) until the retried
/// attempt has an outcome. It holds the breaker's retries slot, which is the only count of
/// retries in flight: the budget and `max_retries` both read it.
#[derive(Debug)]
pub struct RetrySlot {
    _permit: Permit,
}

impl Cluster {
    /// Counts a request as active until the returned guard is dropped.
    pub fn start_request<C: Deref<Target = Cluster>>(cluster: C) -> ActiveRequest<C> {
        cluster.active_requests.fetch_add(1, Ordering::AcqRel);
        ActiveRequest(cluster)
    }

    /// Takes a slot of breaker `resource` until the permit is dropped; names the resource when
    /// it is full.
    pub fn try_acquire(&self, resource: Resource) -> Result<Permit, Resource> {
        self.breaker.try_acquire(resource)
    }

    pub fn active_requests(&self) -> u32 {
        self.active_requests.load(Ordering::Acquire)
    }

    /// Takes a slot for one more retry if both the retry budget (a share of the requests
    /// active now) and the breaker's `max_retries` allow it; says which refused otherwise.
    pub fn try_start_retry(&self) -> Result<RetrySlot, RetryOverflow> {
        let max_retries = self.breaker.limits().max_retries;
        let active = self.active_requests();
        self.breaker
            .try_acquire_if(Resource::Retries, |in_flight| {
                retry::admit(&self.retry_policy, max_retries, active, in_flight)
            })
            .map(|p| RetrySlot { _permit: p })
    }

    /// Retries in flight: decided and not yet answered.
    pub fn retries_in_flight(&self) -> u32 {
        self.breaker.current(Resource::Retries)
    }
}
