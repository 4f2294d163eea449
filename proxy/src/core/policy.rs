//! The request policy's pure parts, shared by both request paths (hyper's in
//! `crate::io::forward` and the HTTP/1.1 fast path in `crate::io::h1`): the answers the proxy
//! makes itself, how an attempt's outcome is classified, and whether it earns a retry. The
//! attempt loop that applies them lives in `crate::io::attempts`.

use std::time::Duration;

use http::header::HeaderName;
use http::{Method, StatusCode};
use rand::Rng;

use crate::core::breaker::Resource;
use crate::core::outlier::RequestResult;
use crate::core::retry::{self, AttemptOutcome, RetryPolicy};

/// The header naming the breaker resource of an overflow answer.
pub static OVERFLOW: HeaderName = HeaderName::from_static(schema::wire::HEADER_OVERFLOW);

/// An answer the proxy makes itself, in the registry's error shape (`code` and `message`).
/// Both request paths render these and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalAnswer {
    /// No route matches the request.
    NoRoute,
    /// The request body did not arrive whole (the client went away or sent garbage).
    BadRequestBody,
    /// The request body did not arrive within the route timeout.
    RequestBodyTimeout,
    /// The request cannot be put into upstream form.
    Unforwardable,
    /// A retry found its streamed body already spent (never expected: streamed bodies are not
    /// retried).
    BodyAlreadySent,
    /// A circuit breaker refused: the answer names the resource in [`OVERFLOW`].
    Overflow(Resource),
    NoHealthyUpstream,
    UpstreamConnect,
    UpstreamReset,
    UpstreamTimeout,
}

impl LocalAnswer {
    pub fn status(self) -> StatusCode {
        match self {
            LocalAnswer::NoRoute => StatusCode::NOT_FOUND,
            LocalAnswer::BadRequestBody | LocalAnswer::Unforwardable => StatusCode::BAD_REQUEST,
            LocalAnswer::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            LocalAnswer::BodyAlreadySent | LocalAnswer::UpstreamReset => StatusCode::BAD_GATEWAY,
            LocalAnswer::Overflow(_)
            | LocalAnswer::NoHealthyUpstream
            | LocalAnswer::UpstreamConnect => StatusCode::SERVICE_UNAVAILABLE,
            LocalAnswer::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The body's error code.
    pub fn code(self) -> &'static str {
        match self {
            LocalAnswer::NoRoute => "no_route",
            LocalAnswer::BadRequestBody | LocalAnswer::Unforwardable => "bad_request",
            LocalAnswer::RequestBodyTimeout => "request_timeout",
            LocalAnswer::BodyAlreadySent | LocalAnswer::UpstreamReset => "upstream_reset",
            LocalAnswer::Overflow(_) => "overflow",
            LocalAnswer::NoHealthyUpstream => "no_healthy_upstream",
            LocalAnswer::UpstreamConnect => "upstream_connect_failure",
            LocalAnswer::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// The body's message; static, so an answer allocates only its body.
    pub fn message(self) -> &'static str {
        match self {
            LocalAnswer::NoRoute => "no route matches this request",
            LocalAnswer::BadRequestBody => "could not read the request body",
            LocalAnswer::RequestBodyTimeout => "request body not received in time",
            LocalAnswer::Unforwardable => "request cannot be forwarded",
            LocalAnswer::BodyAlreadySent => "request body already sent",
            LocalAnswer::Overflow(Resource::Connections) => "circuit breaker open: connections",
            LocalAnswer::Overflow(Resource::Pending) => "circuit breaker open: pending",
            LocalAnswer::Overflow(Resource::Requests) => "circuit breaker open: requests",
            LocalAnswer::Overflow(Resource::Retries) => "circuit breaker open: retries",
            LocalAnswer::NoHealthyUpstream => "no healthy upstream",
            LocalAnswer::UpstreamConnect => "upstream connect error",
            LocalAnswer::UpstreamReset => "upstream reset or sent an invalid response",
            LocalAnswer::UpstreamTimeout => "upstream request timeout",
        }
    }

    /// The extra header the answer carries, if any.
    pub fn header(self) -> Option<(&'static HeaderName, &'static str)> {
        match self {
            LocalAnswer::Overflow(r) => Some((&OVERFLOW, r.as_str())),
            _ => None,
        }
    }

    /// The access log's `flag`: set for answers about routing and upstreams, not for a
    /// request the client got wrong.
    pub fn flag(self) -> Option<&'static str> {
        match self {
            LocalAnswer::BadRequestBody
            | LocalAnswer::RequestBodyTimeout
            | LocalAnswer::Unforwardable
            | LocalAnswer::BodyAlreadySent => None,
            _ => Some(self.code()),
        }
    }
}

/// How one attempt ended, as the policy sees it, whatever the request path.
#[derive(Debug)]
pub enum Sent<R, E> {
    /// A response head arrived, with this status.
    Response(R, u16),
    /// A TCP listener's upstream connection was made.
    Connected(R),
    /// No connection; `overflow` when the breaker's connection limit refused it, which says
    /// nothing about the host.
    Connect { error: E, overflow: bool },
    /// The upstream closed, reset or answered garbage.
    Reset(E),
    /// The route timeout fired first.
    Timeout,
}

impl<R, E> Sent<R, E> {
    /// The same attempt with its response (or connection) turned into another by `f`, which
    /// may still find it unusable.
    pub fn then<R2>(self, f: impl FnOnce(R) -> Result<R2, E>) -> Sent<R2, E> {
        match self {
            Sent::Response(r, status) => match f(r) {
                Ok(r) => Sent::Response(r, status),
                Err(e) => Sent::Reset(e),
            },
            Sent::Connected(r) => match f(r) {
                Ok(r) => Sent::Connected(r),
                Err(e) => Sent::Reset(e),
            },
            Sent::Connect { error, overflow } => Sent::Connect { error, overflow },
            Sent::Reset(e) => Sent::Reset(e),
            Sent::Timeout => Sent::Timeout,
        }
    }

    /// The attempt's outcome, and whether it never left because the connection limit was hit
    /// (then outlier detection and retries ignore it).
    pub fn classify(&self) -> (AttemptOutcome, bool) {
        match self {
            Sent::Response(_, status) => (AttemptOutcome::Status(*status), false),
            Sent::Connected(_) => (AttemptOutcome::Connected, false),
            Sent::Connect { overflow, .. } => (AttemptOutcome::ConnectFailure, *overflow),
            Sent::Reset(_) => (AttemptOutcome::Reset, false),
            Sent::Timeout => (AttemptOutcome::Timeout, false),
        }
    }

    /// The response, or the local answer for an attempt that gave none (with the error, to
    /// log, when there was one).
    pub fn into_response(self) -> Result<R, (LocalAnswer, Option<E>)> {
        match self {
            Sent::Response(r, _) | Sent::Connected(r) => Ok(r),
            Sent::Connect {
                error,
                overflow: true,
            } => Err((LocalAnswer::Overflow(Resource::Connections), Some(error))),
            Sent::Connect { error, .. } => Err((LocalAnswer::UpstreamConnect, Some(error))),
            Sent::Reset(error) => Err((LocalAnswer::UpstreamReset, Some(error))),
            Sent::Timeout => Err((LocalAnswer::UpstreamTimeout, None)),
        }
    }
}

/// What passive outlier detection learns from an outcome: 5xx and failures count against the
/// host.
pub fn request_result(outcome: AttemptOutcome) -> RequestResult {
    match outcome {
        AttemptOutcome::Status(s) if s < 500 => RequestResult::Success,
        AttemptOutcome::Connected => RequestResult::Success,
        _ => RequestResult::Failure,
    }
}

/// Index of the outcome's label in [`crate::cluster::OUTCOMES`].
pub fn outcome_index(o: AttemptOutcome) -> usize {
    match o {
        AttemptOutcome::Status(100..=199) => 0,
        AttemptOutcome::Status(200..=299) => 1,
        AttemptOutcome::Status(300..=399) => 2,
        AttemptOutcome::Status(400..=499) => 3,
        AttemptOutcome::Status(_) => 4,
        AttemptOutcome::ConnectFailure => 5,
        AttemptOutcome::Reset => 6,
        AttemptOutcome::Timeout => 7,
        AttemptOutcome::Connected => 8,
    }
}

/// What a request does after an attempt that was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The attempt's outcome is the answer.
    Stop,
    /// The connection was refused, so nothing was sent: go on at once to a host not tried
    /// yet, for any method. It does not spend `num_retries`, since no upstream saw the request
    /// (HAProxy's `redispatch` does the same); it is bounded
    /// by the hosts left untried (and, like every retry, by the budget and the time left).
    /// Two of eight hosts dying at once otherwise fail every request whose first try and one
    /// retry both land on them (found by the fault campaign).
    Failover,
    /// Another attempt under the retry policy, after this back-off.
    Retry(Duration),
}

/// The decision after an attempt: `retries` counts the retries the policy has granted so far
/// (failovers excluded), `untried_left` whether a routable host was not tried yet.
pub fn next_attempt(
    policy: &RetryPolicy,
    method: &Method,
    (outcome, overflowed): (AttemptOutcome, bool),
    retries: u32,
    replayable: bool,
    untried_left: bool,
    rng: &mut impl Rng,
) -> Next {
    // A route with retries turned off (`num_retries = 0`) gets no failover either.
    let failover = outcome == AttemptOutcome::ConnectFailure && policy.num_retries > 0;
    if failover && !overflowed && replayable && untried_left {
        return Next::Failover;
    }
    match retry_backoff(
        policy,
        method,
        (outcome, overflowed),
        retries + 1,
        replayable,
        rng,
    ) {
        Some(wait) => Next::Retry(wait),
        None => Next::Stop,
    }
}

/// The back-off before another attempt, if the retry policy gives one: never after an
/// overflow or for a body that cannot be sent again. `attempts` counts the attempts so far.
/// The retry budget and the time left are the caller's to check.
pub fn retry_backoff(
    policy: &RetryPolicy,
    method: &Method,
    (outcome, overflowed): (AttemptOutcome, bool),
    attempts: u32,
    replayable: bool,
    rng: &mut impl Rng,
) -> Option<Duration> {
    if overflowed
        || !replayable
        || !retry::should_retry(policy, method, outcome, attempts.saturating_sub(1))
    {
        return None;
    }
    Some(retry::backoff(policy, attempts, rng))
}

#[cfg(test)]
mod tests;
