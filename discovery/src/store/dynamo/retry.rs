//! How DynamoDB calls fail and which failures are worth another attempt.
//!
//! The SDK's own retry loop is switched off (see `connect`) so that this module is the only
//! one: one classifier, one jittered backoff, one deadline per call. The total time a store
//! method can spend on one request is therefore bounded and easy to state: at most
//! [`CALL_DEADLINE`], after which the caller gets `StoreError::Unavailable`.

use std::error::Error as StdError;
use std::future::Future;
use std::time::Duration;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use backon::{ExponentialBuilder, Retryable};

use crate::store::StoreError;

/// TCP connect bound. In-region DynamoDB connects in a few ms; a black-holed endpoint must
/// not eat the whole call budget on its first attempt.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
/// One HTTP attempt, response included. DynamoDB answers a 1 MB page well inside this.
pub(crate) const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(800);
/// Attempts per request (the first one plus retries).
pub(crate) const MAX_ATTEMPTS: usize = 4;
/// Hard bound on one request, retries and backoff included.
pub(crate) const CALL_DEADLINE: Duration = Duration::from_secs(2);

/// What a failed call means to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// A `ConditionExpression` was false: an expected outcome (a newer check-in is already
    /// stored, a row changed under us), never an error to report.
    ConditionFailed,
    /// The table does not exist (`ResourceNotFoundException`).
    TableMissing,
    /// `CreateTable` raced another creator (`ResourceInUseException`).
    TableInUse,
    /// A stream read asked for records the stream no longer keeps (24 h), or from a shard
    /// iterator older than 15 minutes: the follower rescans.
    StreamGap,
    /// Throttled: provisioned throughput, account request limit, or control-plane throttling.
    Throttled,
    /// DynamoDB's own 5xx (`InternalServerError`, `ServiceUnavailable`).
    ServerError,
    /// Connect, attempt or response timeout.
    Timeout,
    /// Could not connect, or the connection broke (refused, reset, closed mid-request).
    Connection,
    /// A response that could not be read (truncated by a dying connection, usually).
    BadResponse,
    /// Anything a retry cannot fix: validation, access denied, a bad request we built.
    Fatal,
}

impl ErrorClass {
    pub(crate) fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::Throttled
                | Self::ServerError
                | Self::Timeout
                | Self::Connection
                | Self::BadResponse
        )
    }
}

/// Classifies a service error from its error code (the `__type` suffix DynamoDB sends) and
/// HTTP status. Pure, so the table can be tested without a server.
pub(crate) fn classify_service_error(code: Option<&str>, status: u16) -> ErrorClass {
    match code.unwrap_or_default() {
        "ConditionalCheckFailedException" => ErrorClass::ConditionFailed,
        "ResourceNotFoundException" => ErrorClass::TableMissing,
        "ResourceInUseException" => ErrorClass::TableInUse,
        "TrimmedDataAccessException" | "ExpiredIteratorException" => ErrorClass::StreamGap,
        // DynamoDB throttles with three different codes depending on the capacity mode and
        // on whether the data plane or the control plane said no.
        "ProvisionedThroughputExceededException"
        | "ThrottlingException"
        | "Throttling"
        | "RequestLimitExceeded"
        | "TooManyRequestsException"
        // DynamoDB Streams' own word for it (more than 5 GetRecords a second on a shard).
        | "LimitExceededException" => ErrorClass::Throttled,
        "InternalServerError" | "InternalFailure" | "ServiceUnavailable" => ErrorClass::ServerError,
        _ if status >= 500 => ErrorClass::ServerError,
        // An unknown 429 is throttling whatever its code says.
        _ if status == 429 => ErrorClass::Throttled,
        _ => ErrorClass::Fatal,
    }
}

/// Classifies any SDK failure.
pub(crate) fn classify<E, R>(err: &SdkError<E, R>) -> ErrorClass
where
    E: ProvideErrorMetadata,
    R: RawStatus,
{
    match err {
        SdkError::ServiceError(ctx) => {
            classify_service_error(ctx.err().code(), ctx.raw().status_code())
        }
        SdkError::TimeoutError(_) => ErrorClass::Timeout,
        SdkError::DispatchFailure(d) if d.is_timeout() => ErrorClass::Timeout,
        SdkError::DispatchFailure(d) if d.is_user() => ErrorClass::Fatal,
        // `is_io` (refused, reset) and `is_other` (the connector could not say): both are
        // what a restarting endpoint looks like from here.
        SdkError::DispatchFailure(_) => ErrorClass::Connection,
        SdkError::ResponseError(_) => ErrorClass::BadResponse,
        _ => ErrorClass::Fatal,
    }
}

/// The HTTP status of a raw response; a trait so tests can classify without building one.
pub(crate) trait RawStatus {
    fn status_code(&self) -> u16;
}

impl RawStatus for aws_sdk_dynamodb::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// A failed DynamoDB request, after retries.
#[derive(Debug, thiserror::Error)]
#[error("DynamoDB {op}: {message}")]
pub(crate) struct CallError {
    pub(crate) op: &'static str,
    pub(crate) class: ErrorClass,
    pub(crate) message: String,
}

impl CallError {
    fn from_sdk<E, R>(op: &'static str, err: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + StdError + 'static,
        R: RawStatus + std::fmt::Debug + 'static,
    {
        let class = classify(&err);
        let message = match err.code() {
            Some(code) => format!("{code}: {}", err.message().unwrap_or("(no message)")),
            None => match &err {
                // An error status without a DynamoDB error body (a proxy, a crash page).
                SdkError::ServiceError(ctx) => {
                    format!("HTTP {} without an error code", ctx.raw().status_code())
                }
                _ => source_chain(&err),
            },
        };
        CallError { op, class, message }
    }

    pub(crate) fn is_condition_failed(&self) -> bool {
        self.class == ErrorClass::ConditionFailed
    }
}

/// `outer: inner: root`, one line: the SDK's own `DisplayErrorContext` appends a Debug dump
/// that is too long for a 503 body or a log line.
fn source_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut next = err.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

impl From<CallError> for StoreError {
    fn from(e: CallError) -> Self {
        let hint = match e.class {
            ErrorClass::TableMissing => " (create it with `tidings registry init-table`)",
            _ => "",
        };
        StoreError::Unavailable(format!("{e}{hint}"))
    }
}

/// Jittered exponential backoff between attempts: 25–50 ms, then 50–100, then 100–200
/// (backon's jitter adds up to one more delay). At most ~350 ms of sleeping in all.
pub(crate) fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(25))
        .with_max_delay(Duration::from_millis(200))
        .with_factor(2.0)
        .with_max_times(MAX_ATTEMPTS - 1)
        .with_jitter()
}

/// Runs one DynamoDB request with retries on transient failures, bounded by
/// [`CALL_DEADLINE`]. `send` builds and sends the request afresh for every attempt.
pub(crate) async fn call<T, E, R, F, Fut>(op: &'static str, mut send: F) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SdkError<E, R>>>,
    E: ProvideErrorMetadata + StdError + 'static,
    R: RawStatus + std::fmt::Debug + 'static,
{
    let attempt = || {
        let fut = send();
        async move { fut.await.map_err(|e| CallError::from_sdk(op, e)) }
    };
    let retried = attempt
        .retry(backoff())
        .sleep(tokio::time::sleep)
        .when(|e: &CallError| e.class.is_retryable())
        .notify(|e: &CallError, delay: Duration| {
            tracing::debug!(op, class = ?e.class, error = %e.message, ?delay, "retrying DynamoDB call");
        });
    match tokio::time::timeout(CALL_DEADLINE, retried).await {
        Ok(result) => result,
        Err(_) => Err(CallError {
            op,
            class: ErrorClass::Timeout,
            message: format!("no answer within {CALL_DEADLINE:?} (retries included)"),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use aws_sdk_dynamodb::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_dynamodb::operation::query::QueryError;
    use backon::BackoffBuilder;

    use super::*;

    #[derive(Debug)]
    struct Status(u16);

    impl RawStatus for Status {
        fn status_code(&self) -> u16 {
            self.0
        }
    }

    fn service_error(code: &str, status: u16) -> SdkError<QueryError, Status> {
        let err = QueryError::generic(ErrorMetadata::builder().code(code).message("m").build());
        SdkError::service_error(err, Status(status))
    }

    #[test]
    fn service_errors_are_classified_by_code_then_status() {
        use ErrorClass::*;
        let cases = [
            (
                Some("ConditionalCheckFailedException"),
                400,
                ConditionFailed,
            ),
            (Some("ResourceNotFoundException"), 400, TableMissing),
            (Some("ResourceInUseException"), 400, TableInUse),
            (Some("TrimmedDataAccessException"), 400, StreamGap),
            (Some("ExpiredIteratorException"), 400, StreamGap),
            (Some("LimitExceededException"), 400, Throttled),
            (
                Some("ProvisionedThroughputExceededException"),
                400,
                Throttled,
            ),
            (Some("ThrottlingException"), 400, Throttled),
            (Some("RequestLimitExceeded"), 400, Throttled),
            (Some("InternalServerError"), 500, ServerError),
            (Some("ServiceUnavailable"), 503, ServerError),
            (Some("SomethingNew"), 502, ServerError),
            (None, 500, ServerError),
            (None, 429, Throttled),
            (Some("ValidationException"), 400, Fatal),
            (Some("AccessDeniedException"), 400, Fatal),
            (Some("UnrecognizedClientException"), 400, Fatal),
            (None, 400, Fatal),
        ];
        for (code, status, want) in cases {
            assert_eq!(
                classify_service_error(code, status),
                want,
                "{code:?} {status}"
            );
        }
    }

    #[test]
    fn only_transient_classes_are_retried() {
        use ErrorClass::*;
        for class in [Throttled, ServerError, Timeout, Connection, BadResponse] {
            assert!(class.is_retryable(), "{class:?}");
        }
        for class in [ConditionFailed, TableMissing, TableInUse, StreamGap, Fatal] {
            assert!(!class.is_retryable(), "{class:?}");
        }
    }

    #[test]
    fn sdk_errors_map_to_classes() {
        let io: SdkError<QueryError, Status> =
            SdkError::dispatch_failure(ConnectorError::io("refused".into()));
        assert_eq!(classify(&io), ErrorClass::Connection);
        let slow: SdkError<QueryError, Status> =
            SdkError::dispatch_failure(ConnectorError::timeout("slow".into()));
        assert_eq!(classify(&slow), ErrorClass::Timeout);
        let user: SdkError<QueryError, Status> =
            SdkError::dispatch_failure(ConnectorError::user("bad".into()));
        assert_eq!(classify(&user), ErrorClass::Fatal);
        let attempt: SdkError<QueryError, Status> = SdkError::timeout_error("attempt timeout");
        assert_eq!(classify(&attempt), ErrorClass::Timeout);
        let cut: SdkError<QueryError, Status> = SdkError::response_error("truncated", Status(200));
        assert_eq!(classify(&cut), ErrorClass::BadResponse);
        assert_eq!(
            classify(&service_error("ThrottlingException", 400)),
            ErrorClass::Throttled
        );
        let built: SdkError<QueryError, Status> = SdkError::construction_failure("no region");
        assert_eq!(classify(&built), ErrorClass::Fatal);
    }

    #[test]
    fn backoff_is_jittered_exponential_and_bounded() {
        let bases = [25, 50, 100];
        for _ in 0..200 {
            let delays: Vec<Duration> = backoff().build().collect();
            assert_eq!(delays.len(), MAX_ATTEMPTS - 1);
            for (d, base) in delays.iter().zip(bases) {
                let base = Duration::from_millis(base);
                assert!(*d >= base && *d <= base * 2, "{d:?} outside [{base:?}, 2x]");
            }
            // Even with every attempt timing out, sleeping stays a small part of the deadline.
            assert!(delays.iter().sum::<Duration>() <= Duration::from_millis(350));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_is_retried_until_the_attempts_run_out() {
        let calls = AtomicUsize::new(0);
        let result: Result<(), CallError> = call("Query", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(service_error("ThrottlingException", 400)) }
        })
        .await;
        let err = result.unwrap_err();
        assert_eq!(err.class, ErrorClass::Throttled);
        assert_eq!(calls.load(Ordering::SeqCst), MAX_ATTEMPTS);
        assert!(matches!(StoreError::from(err), StoreError::Unavailable(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_failure_then_success_succeeds() {
        let calls = AtomicUsize::new(0);
        let result = call("Query", || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(service_error("InternalServerError", 500))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(result.unwrap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn condition_failures_and_fatal_errors_are_not_retried() {
        for code in ["ConditionalCheckFailedException", "ValidationException"] {
            let calls = AtomicUsize::new(0);
            let result: Result<(), CallError> = call("UpdateItem", || {
                calls.fetch_add(1, Ordering::SeqCst);
                async move { Err(service_error(code, 400)) }
            })
            .await;
            assert!(result.is_err());
            assert_eq!(calls.load(Ordering::SeqCst), 1, "{code}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_server_is_cut_off_at_the_call_deadline() {
        let start = tokio::time::Instant::now();
        let result: Result<(), CallError> = call("Query", || async {
            std::future::pending::<Result<(), SdkError<QueryError, Status>>>().await
        })
        .await;
        assert_eq!(result.unwrap_err().class, ErrorClass::Timeout);
        assert_eq!(start.elapsed(), CALL_DEADLINE);
    }
}
