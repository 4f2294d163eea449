//! [`Registrar`] and [`Family`]: how every component describes and registers its metrics;
//! and [`ConnMetrics`], the listener's connection metrics, registered once on whichever
//! recorder the component uses. The registry and the agent own one recorder each, so tests
//! running several in one process never share counters; the proxy records on the global one
//! it installs.

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit,
};

static META: Metadata<'static> = Metadata::new("serve", Level::INFO, Some(module_path!()));

/// A kind of metric handle: how it is described and registered on a recorder.
pub trait Handle: Sized {
    /// The unit every Tidings metric of this kind is in.
    const UNIT: Option<Unit>;
    fn describe<R: Recorder + ?Sized>(recorder: &R, name: KeyName, help: SharedString);
    fn register<R: Recorder + ?Sized>(recorder: &R, key: &Key, meta: &Metadata<'_>) -> Self;
}

impl Handle for Counter {
    const UNIT: Option<Unit> = Some(Unit::Count);
    fn describe<R: Recorder + ?Sized>(recorder: &R, name: KeyName, help: SharedString) {
        recorder.describe_counter(name, Self::UNIT, help);
    }
    fn register<R: Recorder + ?Sized>(recorder: &R, key: &Key, meta: &Metadata<'_>) -> Self {
        recorder.register_counter(key, meta)
    }
}

impl Handle for Gauge {
    const UNIT: Option<Unit> = None;
    fn describe<R: Recorder + ?Sized>(recorder: &R, name: KeyName, help: SharedString) {
        recorder.describe_gauge(name, Self::UNIT, help);
    }
    fn register<R: Recorder + ?Sized>(recorder: &R, key: &Key, meta: &Metadata<'_>) -> Self {
        recorder.register_gauge(key, meta)
    }
}

/// Histograms are latencies, in seconds.
impl Handle for Histogram {
    const UNIT: Option<Unit> = Some(Unit::Seconds);
    fn describe<R: Recorder + ?Sized>(recorder: &R, name: KeyName, help: SharedString) {
        recorder.describe_histogram(name, Self::UNIT, help);
    }
    fn register<R: Recorder + ?Sized>(recorder: &R, key: &Key, meta: &Metadata<'_>) -> Self {
        recorder.register_histogram(key, meta)
    }
}

/// Describes and registers a component's metrics on the recorder it owns (the registry and
/// the agent own one each, so tests running several in one process never share counters).
pub struct Registrar<'a, R: ?Sized> {
    recorder: &'a R,
    meta: &'static Metadata<'static>,
}

impl<'a, R: Recorder + ?Sized> Registrar<'a, R> {
    /// `meta` names the component in the recorder's metadata.
    pub fn new(recorder: &'a R, meta: &'static Metadata<'static>) -> Self {
        Registrar { recorder, meta }
    }

    /// Describes the metric `name` with label keys `keys`; its handles come from the family.
    pub fn family<H: Handle, const N: usize>(
        &self,
        name: impl Into<KeyName>,
        help: &'static str,
        keys: [&'static str; N],
    ) -> Family<H, N> {
        let name = name.into();
        H::describe(self.recorder, name.clone(), SharedString::const_str(help));
        Family {
            name,
            keys,
            meta: self.meta,
            kind: std::marker::PhantomData,
        }
    }

    /// Describes and registers an unlabelled metric.
    pub fn one<H: Handle>(&self, name: impl Into<KeyName>, help: &'static str) -> H {
        self.family::<H, 0>(name, help, []).on(self.recorder, [])
    }

    /// A handle of `family` on this registrar's recorder.
    pub fn get<H: Handle, const N: usize>(&self, family: &Family<H, N>, values: [&str; N]) -> H {
        family.on(self.recorder, values)
    }
}

/// One described metric and its label keys: a handle per set of label values.
#[derive(Debug, Clone)]
pub struct Family<H, const N: usize> {
    /// A `&'static str` name stays borrowed, so each handle lookup clones it for free.
    name: KeyName,
    keys: [&'static str; N],
    meta: &'static Metadata<'static>,
    kind: std::marker::PhantomData<fn() -> H>,
}

impl<H: Handle, const N: usize> Family<H, N> {
    /// The handle for `values` (one per key, in order) on `recorder`, which must be the one
    /// the family was described on. Cheap enough per request: the recorder keeps one entry
    /// per key.
    pub fn on<R: Recorder + ?Sized>(&self, recorder: &R, values: [&str; N]) -> H {
        let labels: Vec<Label> = self
            .keys
            .iter()
            .zip(values)
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect();
        H::register(
            recorder,
            &Key::from_parts(self.name.clone(), labels),
            self.meta,
        )
    }

    /// The handle for `values` on the process-global recorder (the proxy's), where the
    /// family must have been described.
    pub fn global(&self, values: [&str; N]) -> H {
        metrics::with_recorder(|r| self.on(r, values))
    }
}

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
        let reg = Registrar::new(recorder, &META);
        let name = |what: &str| format!("tidings_{component}_{what}");
        let evicted: Family<Counter, 1> = reg.family(
            name("connections_evicted_total"),
            "Connections closed at the connection cap: oldest_idle (closed to make room) or at_capacity (new connection refused).",
            ["reason"],
        );
        let timed_out: Family<Counter, 1> = reg.family(
            name("connections_timed_out_total"),
            "Connections closed by a timeout: header (request head too slow), idle (keep-alive), write (client not reading).",
            ["reason"],
        );
        ConnMetrics {
            open: reg.one(
                name("connections_open"),
                "Client connections open on the HTTP listener.",
            ),
            evicted_idle: reg.get(&evicted, ["oldest_idle"]),
            refused: reg.get(&evicted, ["at_capacity"]),
            timed_out_header: reg.get(&timed_out, ["header"]),
            timed_out_idle: reg.get(&timed_out, ["idle"]),
            timed_out_write: reg.get(&timed_out, ["write"]),
            accept_errors: reg.one(
                name("accept_errors_total"),
                "Failed accepts, such as running out of file descriptors.",
            ),
        }
    }

    /// [`ConnMetrics::register`] on the process-global recorder (the proxy's).
    pub fn global(component: &str) -> Self {
        metrics::with_recorder(|r| Self::register(r, component))
    }
}
