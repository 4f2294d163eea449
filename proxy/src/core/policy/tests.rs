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
