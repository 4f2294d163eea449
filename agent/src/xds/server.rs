//! The tonic shell around [`StreamState`]: the listener, the catalog task that follows the
//! merged view, and one task per ADS stream.
//!
//! A stream's task makes its next response only once the previous one has been written to
//! the socket ([`grpc::message`]), so a client that does not read holds one response of
//! the agent's memory however many views go by: the catalog is a watch, and each response
//! is made from the latest one when there is room to send it. Streams end when the agent
//! shuts down.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::grpc::{self, Outbound, Requests, Streams};
use super::protocol::{Limits, ProtocolError, Received, StreamState};
use super::resources::{Catalog, Kind};
use crate::config::AgentConfig;
use crate::state::Shared;
use crate::view::MergedView;

/// Pings on idle connections, so a vanished client's stream ends.
const KEEPALIVE: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a last error message may wait for a client to read it.
const ERROR_SEND: Duration = Duration::from_secs(1);
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// Binds the xDS listener when it is enabled (before anything starts: a port in use is an
/// error at start, as the local API's is).
pub async fn bind(config: &AgentConfig) -> std::io::Result<Option<TcpListener>> {
    let Some(addr) = config.xds.address(config.api) else {
        return Ok(None);
    };
    Ok(Some(TcpListener::bind(addr).await?))
}

/// The running xDS server.
pub struct XdsServer {
    stop: CancellationToken,
    server: JoinHandle<()>,
    catalog: JoinHandle<()>,
    pub addr: Option<SocketAddr>,
}

impl XdsServer {
    /// Ends every stream and stops listening.
    pub async fn stop(self) {
        self.stop.cancel();
        if tokio::time::timeout(STOP_TIMEOUT, self.server)
            .await
            .is_err()
        {
            tracing::warn!("xds server did not stop in time");
        }
        let _ = self.catalog.await;
    }
}

/// Serves ADS on `listener` from the view `shared` publishes.
pub fn spawn(listener: TcpListener, shared: &Arc<Shared>) -> XdsServer {
    let stop = CancellationToken::new();
    let addr = listener.local_addr().ok();
    // Logged once serving, after the API's and gossip's lines: tools that wait for the
    // agent's first two "listening" lines (the demo, the test harness) see those.
    if let Some(addr) = addr {
        tracing::info!(%addr, "xds listening");
    }
    let service = Ads::new(shared, stop.clone());
    let catalog = tokio::spawn(follow_view(
        shared.view.clone(),
        service.feed.clone(),
        stop.clone(),
    ));
    let svc = grpc::Ads(Arc::new(service));
    let server = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(KEEPALIVE))
                .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
                .tcp_nodelay(true)
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "xds server failed");
            }
        })
    };
    XdsServer {
        stop,
        server,
        catalog,
        addr,
    }
}

/// The catalog streams read, built only while a stream is open: an agent nobody asks over
/// xDS keeps no encoded copy of its view (at 100 000 endpoints that copy, four resources per
/// service, was 12 MB of its RSS, and its upkeep CPU on every change).
struct Feed {
    tx: watch::Sender<Arc<Catalog>>,
    /// Whether `tx` holds the catalog of a view (else an empty one). The lock also orders
    /// the view task's builds with a first stream's.
    built: Mutex<bool>,
}

impl Feed {
    fn lock(&self) -> std::sync::MutexGuard<'_, bool> {
        self.built.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new view: rebuilt while streams read the catalog; dropped once none does.
    fn follow(&self, view: &MergedView) {
        let mut built = self.lock();
        if self.tx.receiver_count() > 0 {
            let next = Catalog::build(&self.tx.borrow(), view);
            self.tx.send_replace(Arc::new(next));
            *built = true;
        } else if *built {
            // An empty catalog after the built one, so its sequence still moves on.
            let next = Catalog::build(&self.tx.borrow(), &MergedView::default());
            self.tx.send_replace(Arc::new(next));
            *built = false;
        }
    }

    /// A stream's receiver of a catalog of the current view (built now if none is).
    fn subscribe(&self, view: &MergedView) -> watch::Receiver<Arc<Catalog>> {
        let rx = self.tx.subscribe();
        let mut built = self.lock();
        if !*built {
            let next = Catalog::build(&self.tx.borrow(), view);
            self.tx.send_replace(Arc::new(next));
            *built = true;
        }
        rx
    }
}

/// Follows the view: every change reaches the catalog (see [`Feed`]); unchanged services
/// keep their resources.
async fn follow_view(
    mut view: watch::Receiver<Arc<MergedView>>,
    feed: Arc<Feed>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            r = view.changed() => if r.is_err() { return },
        }
        let v = view.borrow_and_update().clone();
        feed.follow(&v);
    }
}

struct Ads {
    feed: Arc<Feed>,
    permits: Arc<Semaphore>,
    limits: Limits,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Ads {
    fn new(shared: &Arc<Shared>, stop: CancellationToken) -> Ads {
        let cfg = &shared.config.xds;
        Ads {
            feed: Arc::new(Feed {
                tx: watch::Sender::new(Arc::new(Catalog::default())),
                built: Mutex::new(false),
            }),
            permits: Arc::new(Semaphore::new(cfg.max_streams.min(Semaphore::MAX_PERMITS))),
            limits: Limits {
                max_names: cfg.max_resource_names,
            },
            shared: shared.clone(),
            stop,
        }
    }

    fn open<V: Variant>(&self, inbound: Requests<V::Req>) -> Result<Outbound, Status> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.shared.metrics.xds.refused_streams.increment(1);
            return Err(Status::resource_exhausted(
                "too many ADS streams on this agent (xds.max_streams)",
            ));
        };
        let (tx, rx) = mpsc::channel(1);
        let mut catalog = self.feed.subscribe(&self.shared.current_view());
        let first = catalog.borrow_and_update().clone();
        let stream = Stream {
            state: StreamState::new(self.limits, first),
            catalog,
            shared: self.shared.clone(),
            stop: self.stop.clone(),
            tx,
            _permit: permit,
        };
        tokio::spawn(stream.run::<V>(inbound));
        Ok(rx)
    }
}

impl Streams for Ads {
    fn sotw(&self, inbound: Requests<DiscoveryRequest>) -> Result<Outbound, Status> {
        self.open::<Sotw>(inbound)
    }

    fn delta(&self, inbound: Requests<DeltaDiscoveryRequest>) -> Result<Outbound, Status> {
        self.open::<Delta>(inbound)
    }
}

/// The two variants of ADS, over one [`StreamState`].
trait Variant: 'static {
    type Req: prost::Message + Default + Send + 'static;
    type Resp: prost::Message + Send + 'static;
    fn on(state: &mut StreamState, req: &Self::Req) -> Result<Received, ProtocolError>;
    fn next(state: &mut StreamState) -> Option<Self::Resp>;
    fn type_url(resp: &Self::Resp) -> &str;
}

struct Sotw;
impl Variant for Sotw {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    fn on(state: &mut StreamState, req: &DiscoveryRequest) -> Result<Received, ProtocolError> {
        state.on_sotw(req)
    }
    fn next(state: &mut StreamState) -> Option<DiscoveryResponse> {
        state.next_sotw()
    }
    fn type_url(resp: &DiscoveryResponse) -> &str {
        &resp.type_url
    }
}

struct Delta;
impl Variant for Delta {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    fn on(state: &mut StreamState, req: &DeltaDiscoveryRequest) -> Result<Received, ProtocolError> {
        state.on_delta(req)
    }
    fn next(state: &mut StreamState) -> Option<DeltaDiscoveryResponse> {
        state.next_delta()
    }
    fn type_url(resp: &DeltaDiscoveryResponse) -> &str {
        &resp.type_url
    }
}

/// One open stream's task.
struct Stream {
    state: StreamState,
    catalog: watch::Receiver<Arc<Catalog>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    /// Encoded responses ([`grpc::message`]): each freed once HTTP/2 has written it.
    tx: mpsc::Sender<Result<Bytes, Status>>,
    _permit: OwnedSemaphorePermit,
}

impl Stream {
    async fn run<V: Variant>(mut self, mut inbound: Requests<V::Req>) {
        let metrics = &self.shared.metrics.xds;
        metrics.streams.increment(1.0);
        let end = self.serve::<V>(&mut inbound).await;
        self.shared.metrics.xds.streams.decrement(1.0);
        if let Err(status) = end {
            // The client may not be reading: the error waits a little, never for ever.
            let _ = tokio::time::timeout(ERROR_SEND, self.tx.send(Err(status))).await;
        }
    }

    /// Serves the stream until the client goes, the agent stops, or a request is refused.
    async fn serve<V: Variant>(&mut self, inbound: &mut Requests<V::Req>) -> Result<(), Status> {
        // The response in flight: resolves once HTTP/2 has written it.
        let mut in_flight: Option<grpc::Written> = None;
        loop {
            if in_flight.is_none() {
                // The next response due, made from the newest catalog.
                if self.catalog.has_changed().unwrap_or(false) {
                    let c = self.catalog.borrow_and_update().clone();
                    self.state.set_catalog(c);
                }
                if let Some(resp) = V::next(&mut self.state) {
                    if let Some(kind) = Kind::of_type_url(V::type_url(&resp)) {
                        self.shared.metrics.xds.responded(kind);
                    }
                    let (message, written) = grpc::message(&resp)?;
                    drop(resp);
                    // The channel is empty: the last message was written, so taken.
                    if self.tx.try_send(Ok(message)).is_err() {
                        return Ok(());
                    }
                    in_flight = Some(written);
                    continue;
                }
            }
            // One response in flight, and requests read meanwhile: a client that reads
            // slowly holds one response of the agent's memory, not HTTP/2's send buffer of
            // them, and its requests do not wait in HTTP/2's receive buffers either.
            tokio::select! {
                () = self.stop.cancelled() => return Ok(()),
                () = async {
                    if let Some(w) = in_flight.as_mut() {
                        let _ = w.await;
                    }
                }, if in_flight.is_some() => {
                    in_flight = None;
                }
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => {
                        let r = V::on(&mut self.state, &req);
                        self.received(r)?;
                    }
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(status),
                },
                r = self.catalog.changed(), if in_flight.is_none() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    let c = self.catalog.borrow_and_update().clone();
                    self.state.set_catalog(c);
                }
            }
        }
    }

    fn received(&self, r: Result<Received, ProtocolError>) -> Result<(), Status> {
        let metrics = &self.shared.metrics.xds;
        match r {
            Ok(Received::Nack { kind, kept, error }) => {
                metrics.nacked(kind, &error);
                tracing::warn!(r#type = kind.label(), kept = ?kept, %error, "xds client rejected a response (NACK)");
                Ok(())
            }
            Ok(Received::Stale(kind)) => {
                tracing::debug!(
                    r#type = kind.label(),
                    "xds request with a stale nonce ignored"
                );
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => {
                metrics.bad_requests.increment(1);
                tracing::info!(error = %e, "xds request refused; stream ended");
                Err(Status::invalid_argument(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU16;

    use schema::{Endpoint, ServiceName};

    use super::*;
    use crate::view::{CachedHost, Merger, Origin};

    fn view_of(services: &[&str]) -> MergedView {
        let hosts = services
            .iter()
            .map(|s| CachedHost {
                endpoint: Arc::new(Endpoint::new(
                    ServiceName::new(*s).expect("name"),
                    "10.0.0.1".parse().expect("ip"),
                    NonZeroU16::new(80).expect("port"),
                )),
                origin: Origin::Registry { generated_at_ms: 1 },
                last_check_in_ms: 1,
            })
            .collect();
        let me = "127.0.0.1:1".parse().expect("addr");
        Merger::new(me, u64::MAX, hosts).merge(&gossip::GossipView::default(), 0)
    }

    /// `max_streams` open streams: one more is refused with RESOURCE_EXHAUSTED and counted
    /// in `/metrics`; once one ends, a new one is served.
    #[tokio::test]
    async fn streams_over_the_limit_are_refused_until_one_ends() {
        use crate::api::tests::fixture_with;
        use http_body::Frame;

        let f = fixture_with(|c| c.xds.max_streams = 2).await;
        let ads = Ads::new(&f.shared, f.stop.clone());
        // A request body that stays open until its sender goes.
        let open = || {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Status>>(1);
            let body =
                http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            (
                tx,
                Requests::<DiscoveryRequest>::new(tonic::body::Body::new(body)),
            )
        };
        let (first, r) = open();
        let _one = ads.sotw(r).expect("first stream");
        let (_second, r) = open();
        let _two = ads.sotw(r).expect("second stream");
        let (_third, r) = open();
        let refused = ads.sotw(r).expect_err("over the limit");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let metrics = f.shared.render_metrics();
        assert!(
            metrics.contains("tidings_agent_xds_refused_total{reason=\"max_streams\"} 1"),
            "{metrics}"
        );

        drop(first);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (_tx, r) = open();
            if let Ok(_rx) = ads.sotw(r) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no stream ended");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        f.stop.cancel();
    }

    /// No stream, no catalog: views go by without one being built; the first stream gets
    /// the current view's at once, later views reach it, and once the last stream is gone
    /// the next view drops the catalog again.
    #[test]
    fn the_catalog_is_built_only_while_a_stream_reads_it() {
        let feed = Feed {
            tx: watch::Sender::new(Arc::new(Catalog::default())),
            built: Mutex::new(false),
        };
        feed.follow(&view_of(&["web"]));
        assert!(
            feed.tx.borrow().all(Kind::Cluster).is_empty(),
            "built with no stream"
        );

        let mut rx = feed.subscribe(&view_of(&["web", "db"]));
        let names = |rx: &mut watch::Receiver<Arc<Catalog>>| {
            let c = rx.borrow_and_update().clone();
            c.all(Kind::Cluster)
                .keys()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&mut rx), ["db", "web"]);
        feed.follow(&view_of(&["web", "db", "api"]));
        assert!(rx.has_changed().expect("open"));
        assert_eq!(names(&mut rx), ["api", "db", "web"]);

        let seq = feed.tx.borrow().seq();
        drop(rx);
        feed.follow(&view_of(&["web"]));
        assert!(
            feed.tx.borrow().all(Kind::Cluster).is_empty(),
            "kept with no stream"
        );
        assert!(feed.tx.borrow().seq() > seq, "the sequence goes on");
        let mut again = feed.subscribe(&view_of(&["web"]));
        assert_eq!(names(&mut again), ["web"]);
    }
}
