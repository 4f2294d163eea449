use http::{Method, StatusCode};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::*;

#[test]
fn local_answers_keep_their_status_code_and_message() {
    let cases = [
        (LocalAnswer::NoHealthyUpstream, 503, "no_healthy_upstream"),
        (
            LocalAnswer::UpstreamConnect,
            503,
            "upstream_connect_failure",
        ),
        (LocalAnswer::UpstreamReset, 502, "upstream_reset"),
        (LocalAnswer::UpstreamTimeout, 504, "upstream_timeout"),
        (LocalAnswer::Overflow(Resource::Pending), 503, "overflow"),
        (LocalAnswer::RequestBodyTimeout, 408, "request_timeout"),
        (LocalAnswer::BadRequestBody, 400, "bad_request"),
        (LocalAnswer::NoRoute, 404, "no_route"),
    ];
    for (answer, status, code) in cases {
        assert_eq!(
            answer.status(),
            StatusCode::from_u16(status).expect("status")
        );
        assert_eq!(answer.code(), code);
    }
    let overflow = LocalAnswer::Overflow(Resource::Requests);
    assert_eq!(overflow.message(), "circuit breaker open: requests");
    assert_eq!(overflow.header(), Some((&OVERFLOW, "requests")));
    assert_eq!(overflow.flag(), Some("overflow"));
    // A request the client got wrong is not flagged in the access log.
    assert_eq!(LocalAnswer::BadRequestBody.flag(), None);
    assert_eq!(
        LocalAnswer::UpstreamTimeout.flag(),
        Some("upstream_timeout")
    );
}

#[test]
fn a_connect_overflow_is_not_the_hosts_fault() {
    let s: Sent<(), ()> = Sent::Connect {
        error: (),
        overflow: true,
    };
    assert_eq!(s.classify(), (AttemptOutcome::ConnectFailure, true));
    assert_eq!(
        s.into_response(),
        Err((LocalAnswer::Overflow(Resource::Connections), Some(())))
    );
    let s: Sent<(), ()> = Sent::Timeout;
    assert_eq!(s.into_response(), Err((LocalAnswer::UpstreamTimeout, None)));
    let s: Sent<(), ()> = Sent::Response((), 503);
    assert_eq!(s.classify(), (AttemptOutcome::Status(503), false));
    assert_eq!(s.into_response(), Ok(()));
    assert_eq!(
        request_result(AttemptOutcome::Status(503)),
        RequestResult::Failure
    );
    assert_eq!(
        request_result(AttemptOutcome::Status(404)),
        RequestResult::Success
    );
    assert_eq!(outcome_index(AttemptOutcome::Timeout), 7);
}

#[test]
fn overflows_and_spent_bodies_are_never_retried() {
    let policy = RetryPolicy {
        num_retries: 2,
        ..RetryPolicy::default()
    };
    let mut rng = SmallRng::seed_from_u64(1);
    let failed = (AttemptOutcome::ConnectFailure, false);
    let get = &Method::GET;
    assert!(retry_backoff(&policy, get, failed, 1, true, &mut rng).is_some());
    assert!(retry_backoff(&policy, get, failed, 1, false, &mut rng).is_none());
    let overflowed = (AttemptOutcome::ConnectFailure, true);
    assert!(retry_backoff(&policy, get, overflowed, 1, true, &mut rng).is_none());
    // Out of retries.
    assert!(retry_backoff(&policy, get, failed, 3, true, &mut rng).is_none());
}

#[test]
fn a_refused_connect_fails_over_to_an_untried_host_without_spending_retries() {
    let policy = RetryPolicy {
        num_retries: 1,
        ..RetryPolicy::default()
    };
    let refused = (AttemptOutcome::ConnectFailure, false);
    let next = |method, attempt, retries, replayable, untried| {
        next_attempt(
            &policy,
            method,
            attempt,
            retries,
            replayable,
            untried,
            &mut SmallRng::seed_from_u64(2),
        )
    };
    // Out of counted retries, yet another host is left: nothing was sent, so go on, even a POST.
    assert_eq!(next(&Method::GET, refused, 5, true, true), Next::Failover);
    assert_eq!(next(&Method::POST, refused, 0, true, true), Next::Failover);
    // No untried host: the retry policy decides as for any failure.
    assert!(matches!(
        next(&Method::GET, refused, 0, true, false),
        Next::Retry(_)
    ));
    assert_eq!(next(&Method::GET, refused, 1, true, false), Next::Stop);
    // Never for an overflow, a spent body, or a status.
    assert_eq!(
        next(
            &Method::GET,
            (AttemptOutcome::ConnectFailure, true),
            0,
            true,
            true
        ),
        Next::Stop
    );
    assert_eq!(next(&Method::GET, refused, 0, false, true), Next::Stop);
    let reset = (AttemptOutcome::Reset, false);
    assert!(matches!(
        next(&Method::GET, reset, 0, true, true),
        Next::Retry(_)
    ));
    assert_eq!(next(&Method::GET, reset, 1, true, true), Next::Stop);
    // Retries turned off: no failover either.
    let off = RetryPolicy {
        num_retries: 0,
        ..RetryPolicy::default()
    };
    let mut rng = SmallRng::seed_from_u64(3);
    assert_eq!(
        next_attempt(&off, &Method::GET, refused, 0, true, true, &mut rng),
        Next::Stop
    );
}

#[test]
fn a_tcp_connection_made_is_a_success_and_ends_the_attempts() {
    let s: Sent<(), ()> = Sent::Connected(());
    assert_eq!(s.classify(), (AttemptOutcome::Connected, false));
    assert_eq!(s.into_response(), Ok(()));
    assert_eq!(
        request_result(AttemptOutcome::Connected),
        RequestResult::Success
    );
    assert_eq!(
        crate::cluster::OUTCOMES[outcome_index(AttemptOutcome::Connected)],
        "connected"
    );
    let mut rng = SmallRng::seed_from_u64(1);
    let p = crate::core::retry::RetryPolicy::default();
    let next = next_attempt(
        &p,
        &Method::GET,
        (AttemptOutcome::Connected, false),
        0,
        true,
        true,
        &mut rng,
    );
    assert_eq!(next, Next::Stop);
}
