//! The access log: one event per request on `tidings_proxy::access`, with the request line
//! and the outcome, and nothing of its cost when the log is off.

mod support;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

type Fields = BTreeMap<String, String>;

/// Keeps the fields of every access-log event; everything else is off.
struct Capture(Arc<Mutex<Vec<Fields>>>);

struct Collect<'a>(&'a mut Fields);

impl Visit for Collect<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl Subscriber for Capture {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        meta.target() == "tidings_proxy::access" && *meta.level() <= Level::INFO
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields::new();
        event.record(&mut Collect(&mut fields));
        self.0.lock().expect("events").push(fields);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

// Current-thread runtime: the proxy's tasks run on this thread, under this subscriber.
#[tokio::test]
async fn every_request_is_logged_with_its_line_and_outcome() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let _log = tracing::subscriber::set_default(Capture(events.clone()));
    let b = Backend::start(1, Duration::ZERO).await;
    let m = Membership::start(vec![Listed::up(b.addr)]).await;
    let p = start(config(&m.url())).await;
    p.wait_routed(&[b.addr]).await;
    events.lock().expect("events").clear();

    let r = p.get("/hello?x=1").await;
    assert_eq!(r.status, 200);
    let logged = events.lock().expect("events").clone();
    assert_eq!(logged.len(), 1, "{logged:?}");
    let e = &logged[0];
    let field = |k: &str| e.get(k).map(String::as_str).unwrap_or("<missing>");
    assert_eq!(field("method"), "GET");
    assert_eq!(field("path"), "/hello");
    assert_eq!(field("host"), "127.0.0.1");
    assert_eq!(field("status"), "200");
    assert_eq!(field("upstream"), b.addr.to_string());
    assert_eq!(field("attempts"), "1");
    assert_eq!(field("flag"), "");
    let rid = r
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert_eq!(field("request_id"), rid);
    p.stop().await;
}
