//! Per-cluster circuit breakers (docs/ARCHITECTURE.md#resilience): counters with limits,
//! taken through RAII guards so every exit path gives the slot back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerLimits {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

impl Default for BreakerLimits {
    fn default() -> Self {
        BreakerLimits {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

/// Which limit overflowed; its name goes in the `x-tidings-overflow` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Connections,
    Pending,
    Requests,
    Retries,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Connections => "connections",
            Resource::Pending => "pending",
            Resource::Requests => "requests",
            Resource::Retries => "retries",
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU32,
    pending: AtomicU32,
    requests: AtomicU32,
    retries: AtomicU32,
}

#[derive(Debug, Clone, Default)]
pub struct CircuitBreaker {
    limits: BreakerLimits,
    counters: Arc<Counters>,
}

/// Holds one unit of a resource until dropped.
#[derive(Debug)]
pub struct Permit {
    counters: Arc<Counters>,
    resource: Resource,
}

impl Drop for Permit {
    fn drop(&mut self) {
        counter(&self.counters, self.resource).fetch_sub(1, Ordering::AcqRel);
    }
}

fn counter(c: &Counters, r: Resource) -> &AtomicU32 {
    match r {
        Resource::Connections => &c.connections,
        Resource::Pending => &c.pending,
        Resource::Requests => &c.requests,
        Resource::Retries => &c.retries,
    }
}

impl CircuitBreaker {
    pub fn new(limits: BreakerLimits) -> Self {
        CircuitBreaker {
            limits,
            counters: Arc::default(),
        }
    }

    fn limit(&self, r: Resource) -> u32 {
        match r {
            Resource::Connections => self.limits.max_connections,
            Resource::Pending => self.limits.max_pending_requests,
            Resource::Requests => self.limits.max_requests,
            Resource::Retries => self.limits.max_retries,
        }
    }

    /// Takes one unit of `r`, or says it overflowed. Lock-free: a compare-exchange loop, so
    /// concurrent callers can never push a counter past its limit.
    pub fn try_acquire(&self, r: Resource) -> Result<Permit, Resource> {
        let limit = self.limit(r);
        self.try_acquire_if(r, |n| if n < limit { Ok(()) } else { Err(r) })
    }

    /// Takes one unit of `r` if `admit` allows it at the current count, which it is given.
    /// For limits that move with load (the retry budget): the check and the increment are one
    /// compare-exchange, so concurrent callers cannot both pass on the same count.
    pub fn try_acquire_if<E>(
        &self,
        r: Resource,
        admit: impl Fn(u32) -> Result<(), E>,
    ) -> Result<Permit, E> {
        let c = counter(&self.counters, r);
        let mut n = c.load(Ordering::Acquire);
        loop {
            admit(n)?;
            match c.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    return Ok(Permit {
                        counters: self.counters.clone(),
                        resource: r,
                    });
                }
                Err(now) => n = now,
            }
        }
    }

    pub fn current(&self, r: Resource) -> u32 {
        counter(&self.counters, r).load(Ordering::Acquire)
    }

    pub fn limits(&self) -> BreakerLimits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_envoy() {
        assert_eq!(
            BreakerLimits::default(),
            BreakerLimits {
                max_connections: 1024,
                max_pending_requests: 1024,
                max_requests: 1024,
                max_retries: 3
            }
        );
    }

    #[test]
    fn overflows_at_the_limit_and_recovers_on_drop() {
        let b = CircuitBreaker::new(BreakerLimits {
            max_retries: 3,
            ..BreakerLimits::default()
        });
        let permits: Vec<_> = (0..3)
            .map(|_| b.try_acquire(Resource::Retries).expect("under limit"))
            .collect();
        assert_eq!(
            b.try_acquire(Resource::Retries).err(),
            Some(Resource::Retries)
        );
        assert_eq!(b.current(Resource::Retries), 3);
        drop(permits);
        assert_eq!(b.current(Resource::Retries), 0);
        assert!(b.try_acquire(Resource::Retries).is_ok());
    }

    #[test]
    fn resources_are_independent() {
        let b = CircuitBreaker::new(BreakerLimits {
            max_requests: 1,
            ..BreakerLimits::default()
        });
        let _r = b.try_acquire(Resource::Requests).expect("first");
        assert!(b.try_acquire(Resource::Requests).is_err());
        assert!(b.try_acquire(Resource::Pending).is_ok());
        assert_eq!(Resource::Requests.as_str(), "requests");
    }

    #[test]
    fn zero_limit_always_overflows() {
        let b = CircuitBreaker::new(BreakerLimits {
            max_connections: 0,
            ..BreakerLimits::default()
        });
        assert_eq!(
            b.try_acquire(Resource::Connections).err(),
            Some(Resource::Connections)
        );
    }
}
