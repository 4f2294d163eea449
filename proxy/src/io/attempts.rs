//! The attempt loop both request paths run: admission through the request breaker, host
//! selection (avoiding the host that just failed), the pending breaker around each attempt,
//! outlier reporting and outcome counts, retries under the retry policy, the retry budget,
//! `max_retries` and the time left, and the local answer when no upstream answered. The
//! paths differ only in how one attempt is sent: their [`Transport`].

use std::fmt::Display;
use std::net::SocketAddr;
use std::ops::Deref;
use std::time::Duration;

use http::Method;
use tokio::time::Instant;

use crate::cluster::{ActiveGuard, ActiveRequest, Cluster, HostHandle, RetrySlot};
use crate::core::breaker::{Permit, Resource};
use crate::core::policy::{self, LocalAnswer, Next, Sent};
use crate::core::retry::AttemptOutcome;
use crate::io::forward::Outcome;

/// How a request path sends one attempt.
pub(crate) trait Transport {
    /// One attempt, ready to go.
    type Request;
    /// What a successful attempt gives: the response head and its connection.
    type Response;
    type Error: Display;

    /// Builds the attempt for `host`, or the local answer when the request cannot go out.
    fn prepare(&mut self, host: &HostHandle) -> Result<Self::Request, LocalAnswer>;

    /// Sends the attempt to `host` and waits for the response head, within the route timeout.
    async fn send(
        &mut self,
        host: &HostHandle,
        req: Self::Request,
    ) -> Sent<Self::Response, Self::Error>;
}

/// A request let in by the request breaker: it holds the breaker slot and counts as active
/// in its cluster (which the retry budget reads) while kept.
pub(crate) struct Admission<C: Deref<Target = Cluster>> {
    pub permit: Permit,
    pub active: ActiveRequest<C>,
}

/// Lets a request in, or answers `overflow` when the request breaker is full.
pub(crate) fn admit<C: Deref<Target = Cluster>>(
    cluster: C,
    out: &mut Outcome,
) -> Result<Admission<C>, LocalAnswer> {
    match cluster.try_acquire(Resource::Requests) {
        Ok(permit) => Ok(Admission {
            permit,
            active: Cluster::start_request(cluster),
        }),
        Err(r) => Err(refuse(&cluster, LocalAnswer::Overflow(r), out)),
    }
}

/// Records a local answer: the access log's flag and, for an overflow, its counter.
pub(crate) fn refuse(cluster: &Cluster, answer: LocalAnswer, out: &mut Outcome) -> LocalAnswer {
    if let Some(flag) = answer.flag() {
        out.flag = Some(flag);
    }
    if let LocalAnswer::Overflow(r) = answer {
        cluster.metrics().overflow(r);
    }
    answer
}

/// One request's attempts over its cluster.
pub(crate) struct Attempts<'a> {
    pub cluster: &'a Cluster,
    pub method: &'a Method,
    /// The request's hash for hash balancers.
    pub hash: Option<u64>,
    /// Whether the request can be sent again.
    pub replayable: bool,
    /// The route timeout's end.
    pub deadline: Instant,
}

impl Attempts<'_> {
    /// Runs attempts until one gives a response the policy keeps, or answers locally.
    /// `out` gets the upstream of the last attempt, the attempt count and the flag.
    pub(crate) async fn run<T: Transport>(
        &self,
        transport: &mut T,
        out: &mut Outcome,
    ) -> Result<(T::Response, ActiveGuard), LocalAnswer> {
        let cluster = self.cluster;
        // The hosts tried so far, avoided by the next pick while others are left.
        let mut tried: Vec<SocketAddr> = Vec::new();
        // Attempts that went on after a refused connect: they do not spend `num_retries`.
        let mut failovers = 0;
        // The retry this attempt is, if it is one: its slot is held until the attempt's outcome.
        let mut retry = None;
        loop {
            let Some((addr, guard)) = cluster.pick(self.hash, &tried) else {
                return Err(refuse(cluster, LocalAnswer::NoHealthyUpstream, out));
            };
            out.upstream = Some(addr);
            out.attempts += 1;
            let req = transport.prepare(guard.host())?;
            let pending = match cluster.try_acquire(Resource::Pending) {
                Ok(p) => p,
                Err(r) => return Err(refuse(cluster, LocalAnswer::Overflow(r), out)),
            };
            let sent = transport.send(guard.host(), req).await;
            drop(pending);
            let attempt = sent.classify();
            let untried_left =
                attempt.0 == AttemptOutcome::ConnectFailure && cluster.has_untried(&tried, addr);
            let done = Done {
                attempt,
                retries: out.attempts - 1 - failovers,
                untried_left,
            };
            let wait = match self.after_attempt(guard.host(), done, &mut retry) {
                Next::Stop => None,
                Next::Failover => {
                    failovers += 1;
                    Some(Duration::ZERO)
                }
                Next::Retry(wait) => Some(wait),
            };
            if let Some(wait) = wait {
                // A response given up on goes with its connection: its body was not read, so
                // the connection cannot be reused.
                drop((sent, guard));
                // Only a request that goes on keeps a list (most never do).
                if !tried.contains(&addr) {
                    tried.push(addr);
                }
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                continue;
            }
            let answer = match sent.into_response() {
                Ok(resp) => return Ok((resp, guard)),
                Err((answer, Some(error))) => {
                    tracing::debug!(%error, upstream = %addr, "upstream failed");
                    answer
                }
                Err((answer, None)) => answer,
            };
            return Err(refuse(cluster, answer, out));
        }
    }

    fn after_attempt(&self, host: &HostHandle, done: Done, retry: &mut Option<RetrySlot>) -> Next {
        after_attempt(
            self.cluster,
            host,
            done,
            (self.method, self.replayable),
            self.deadline,
            retry,
        )
    }
}

/// How an attempt ended, and where its request stands.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Done {
    /// The outcome, and whether it never left because the connection limit was hit.
    pub attempt: (AttemptOutcome, bool),
    /// Retries the policy granted before this attempt (failovers excluded).
    pub retries: u32,
    /// Whether a routable host was not tried yet (only asked after a refused connect).
    pub untried_left: bool,
}

/// What an attempt's outcome does: feeds outlier detection (unless it never left because the
/// connection limit was hit) and the host's outcome counter, and decides whether the request
/// gets another attempt — at once on a host not tried yet after a refused connect, or after a
/// back-off under the retry policy — within the retry budget, the breaker's `max_retries` and
/// the time left. `request` is the method and whether the body can be sent again.
///
/// `retry` is the request's retry in flight: the slot of the retry this attempt was is given
/// back first (the attempt has its outcome), and the slot of the next one is put there, so
/// the caller only has to keep it until the request ends.
pub(crate) fn after_attempt(
    cluster: &Cluster,
    host: &HostHandle,
    done: Done,
    (method, replayable): (&Method, bool),
    deadline: Instant,
    retry: &mut Option<RetrySlot>,
) -> Next {
    *retry = None;
    let (outcome, overflowed) = done.attempt;
    if !overflowed {
        cluster.record_result(host.addr, policy::request_result(outcome));
    }
    host.count_outcome(policy::outcome_index(outcome));
    let next = policy::next_attempt(
        &cluster.retry_policy,
        method,
        done.attempt,
        done.retries,
        replayable,
        done.untried_left,
        &mut rand::rng(),
    );
    let wait = match next {
        Next::Stop => return Next::Stop,
        Next::Failover => Duration::ZERO,
        Next::Retry(wait) => wait,
    };
    if Instant::now() + wait >= deadline {
        return Next::Stop;
    }
    match cluster.try_start_retry() {
        Ok(slot) => *retry = Some(slot),
        Err(limit) => {
            cluster.metrics().retry_overflow(limit);
            return Next::Stop;
        }
    }
    cluster.metrics().retry();
    next
}

#[cfg(test)]
mod tests;
