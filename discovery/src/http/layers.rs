//! The two layers of the registry's own that requests pass: [`Observe`] (request metrics and
//! the warm-up header, on every answer) and [`Limits`] (per route group: shedding past
//! `max_in_flight` with a 429, and the handler timeout with a JSON 503).
//!
//! They are tower services rather than `axum::middleware::from_fn`, which on every request
//! clones the inner service into a new box and boxes the whole future: at tens of thousands
//! of check-ins a second those copies showed in the profile. Same behaviour, no allocation.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use schema::wire::{HEADER_WARMING, TRUE};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Timeout;
use tower::{Layer, Service};

use crate::errors::ApiError;
use crate::registry::Registry;

/// Request metrics and the warm-up header, for every answer (put outermost).
#[derive(Clone)]
pub(super) struct Observe(pub(super) Registry);

impl<S> Layer<S> for Observe {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            registry: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub(super) struct Observed<S> {
    inner: S,
    registry: Registry,
}

impl<S> Service<Request> for Observed<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ObservedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let started = Instant::now();
        // A clone of the matched path is a reference count, not a copy of the string.
        let route = req.extensions().get::<MatchedPath>().cloned();
        let method = method_label(req.method());
        ObservedFuture {
            inner: self.inner.call(req),
            registry: self.registry.clone(),
            started,
            route,
            method,
        }
    }
}

/// Only standard methods become labels: any other token would grow the series unbounded.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

pin_project_lite::pin_project! {
    pub(super) struct ObservedFuture<F> {
        #[pin]
        inner: F,
        registry: Registry,
        started: Instant,
        route: Option<MatchedPath>,
        method: &'static str,
    }
}

impl<F> Future for ObservedFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut resp) = ready!(this.inner.poll(cx));
        if this.registry.is_warming() {
            resp.headers_mut()
                .insert(HEADER_WARMING, HeaderValue::from_static(TRUE));
        }
        let secs = this.started.elapsed().as_secs_f64();
        this.registry.inner.metrics.request(
            this.route.as_ref().map_or("unmatched", MatchedPath::as_str),
            this.method,
            resp.status().as_u16(),
            secs,
        );
        Poll::Ready(Ok(resp))
    }
}

/// Per route group: how long a handler may take, and how many may run at once. Sheds load
/// past `in_flight` with a 429 (rather than queueing into timeouts), and bounds every
/// handler's time with a JSON 503.
#[derive(Debug, Clone)]
pub(super) struct Limits {
    pub(super) timeout: Duration,
    pub(super) in_flight: Option<Arc<Semaphore>>,
}

impl Limits {
    pub(super) fn timeout(timeout: Duration) -> Self {
        Limits {
            timeout,
            in_flight: None,
        }
    }
}

impl<S> Layer<S> for Limits {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Limited<S> {
        Limited {
            inner,
            limits: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(super) struct Limited<S> {
    inner: S,
    limits: Limits,
}

impl<S> Service<Request> for Limited<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = LimitedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let permit = match &self.limits.in_flight {
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => return LimitedFuture::Shed,
            },
            None => None,
        };
        let timeout = self.limits.timeout;
        LimitedFuture::Running {
            inner: tokio::time::timeout(timeout, self.inner.call(req)),
            timeout,
            permit,
        }
    }
}

pin_project_lite::pin_project! {
    #[project = LimitedProj]
    pub(super) enum LimitedFuture<F> {
        Shed,
        Running {
            #[pin]
            inner: Timeout<F>,
            timeout: Duration,
            // Held while the handler runs, given back as soon as it answers.
            permit: Option<OwnedSemaphorePermit>,
        },
    }
}

impl<F> Future for LimitedFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            LimitedProj::Shed => Poll::Ready(Ok(ApiError::Overloaded.into_response())),
            LimitedProj::Running {
                inner,
                timeout,
                permit,
            } => {
                let resp = match ready!(inner.poll(cx)) {
                    Ok(Ok(resp)) => resp,
                    Err(_) => ApiError::Timeout(*timeout).into_response(),
                };
                drop(permit.take());
                Poll::Ready(Ok(resp))
            }
        }
    }
}
