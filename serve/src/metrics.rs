//! The listener's connection metrics, as handles registered once on whichever recorder the
//! component uses: the registry and the agent own a recorder each (so tests running several
//! in one process never share counters), the proxy installs a global one.

use metrics::{Counter, Gauge, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit};

static META: Metadata<'static> = Metadata::new("serve", Level::INFO, Some(module_path!()));

/// Handles for `tidings_<component>_connections_*` metrics. [`ConnMetrics::default`] records
/// nothing.
#[derive(Clone)]
pub struct ConnMetrics {
    pub(crate) open: Gauge,
    pub(crate) evicted_idle: Counter,
    pub(crate) refused: Counter,
    pub(crate) timed_out_header: Counter,
    pub(crate) timed_out_idle: Counter,
    pub(crate) timed_out_write: Counter,
    pub(crate) accept_errors: Counter,
}

impl std::fmt::Debug for ConnMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnMetrics")
    }
}

impl Default for ConnMetrics {
    fn default() -> Self {
        ConnMetrics {
            open: Gauge::noop(),
            evicted_idle: Counter::noop(),
            refused: Counter::noop(),
            timed_out_header: Counter::noop(),
            timed_out_idle: Counter::noop(),
            timed_out_write: Counter::noop(),
            accept_errors: Counter::noop(),
        }
    }
}

impl ConnMetrics {
    /// Describes and registers the metrics of `component` (`registry`, `agent`, `proxy_admin`)
    /// on `recorder`:
    /// - `tidings_<component>_connections_open` (gauge);
    /// - `tidings_<component>_connections_evicted_total{reason}`: `oldest_idle` when an idle
    ///   connection was closed to make room at the cap, `at_capacity` when a new connection
    ///   was refused because none was idle (all busy, or not yet read from);
    /// - `tidings_<component>_connections_timed_out_total{reason}`: `header`, `idle`, `write`;
    /// - `tidings_<component>_accept_errors_total` (e.g. out of file descriptors).
    pub fn register<R: Recorder + ?Sized>(recorder: &R, component: &str) -> Self {
        let name = |what: &str| format!("tidings_{component}_{what}");
        let open = name("connections_open");
        recorder.describe_gauge(
            KeyName::from(open.clone()),
            None,
            SharedString::const_str("Client connections open on the HTTP listener."),
        );
        let evicted = name("connections_evicted_total");
        recorder.describe_counter(
            KeyName::from(evicted.clone()),
            Some(Unit::Count),
            SharedString::const_str(
                "Connections closed at the connection cap: oldest_idle (closed to make room) or at_capacity (new connection refused).",
            ),
        );
        let timed_out = name("connections_timed_out_total");
        recorder.describe_counter(
            KeyName::from(timed_out.clone()),
            Some(Unit::Count),
            SharedString::const_str(
                "Connections closed by a timeout: header (request head too slow), idle (keep-alive), write (client not reading).",
            ),
        );
        let accept = name("accept_errors_total");
        recorder.describe_counter(
            KeyName::from(accept.clone()),
            Some(Unit::Count),
            SharedString::const_str("Failed accepts, such as running out of file descriptors."),
        );
        let counter = |name: &str, label: Option<(&'static str, &'static str)>| {
            let labels = label
                .map(|(k, v)| vec![Label::from_static_parts(k, v)])
                .unwrap_or_default();
            recorder.register_counter(&Key::from_parts(name.to_string(), labels), &META)
        };
        ConnMetrics {
            open: recorder.register_gauge(&Key::from_name(open), &META),
            evicted_idle: counter(&evicted, Some(("reason", "oldest_idle"))),
            refused: counter(&evicted, Some(("reason", "at_capacity"))),
            timed_out_header: counter(&timed_out, Some(("reason", "header"))),
            timed_out_idle: counter(&timed_out, Some(("reason", "idle"))),
            timed_out_write: counter(&timed_out, Some(("reason", "write"))),
            accept_errors: counter(&accept, None),
        }
    }

    /// [`ConnMetrics::register`] on the process-global recorder (the proxy's).
    pub fn global(component: &str) -> Self {
        metrics::with_recorder(|r| Self::register(r, component))
    }
}
