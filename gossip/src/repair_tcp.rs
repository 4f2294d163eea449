//! The repair TCP side of the runtime: the listener with its connection hygiene, and the
//! request → response → push exchange over chunked sealed streams ([`crate::stream`]).
//!
//! What a host on the network can cost a node without the cluster key: one connection
//! slot (at most `repair_max_connections`, and an unauthenticated one is the first to be
//! closed when a new connection needs room), one chunk buffer, and the frame and idle
//! timeouts. Failed accepts (out of file descriptors) back off and never stop the listener.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::GossipConfig;
use crate::crypto::Sealer;
use crate::metrics::Metrics;
use crate::runtime::Command;
use crate::stream::{
    self, HELLO_LEN, MAGIC, MAX_SEALED_CHUNK, StreamError, StreamReader, StreamWriter,
};

/// Frames a responder reads per connection: a request, then at most one push.
const MAX_FRAMES_IN: usize = 2;
/// Accept failures back off from the first to the last delay, doubling.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
/// At most one log line per this much time about failed accepts.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// What every repair connection shares.
#[derive(Clone)]
pub(crate) struct Repair {
    pub cmd: mpsc::Sender<Command>,
    pub metrics: Arc<Metrics>,
    pub sealer: watch::Receiver<Arc<Sealer>>,
    pub sessions: Arc<Semaphore>,
    pub frame_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Repair {
    pub fn new(
        cfg: &GossipConfig,
        cmd: mpsc::Sender<Command>,
        metrics: Arc<Metrics>,
        sealer: watch::Receiver<Arc<Sealer>>,
    ) -> Self {
        Repair {
            cmd,
            metrics,
            sealer,
            sessions: Arc::new(Semaphore::new(cfg.max_repair_sessions)),
            frame_timeout: Duration::from_millis(cfg.repair_frame_timeout_ms),
            idle_timeout: Duration::from_millis(cfg.repair_idle_timeout_ms),
            max_connections: cfg.repair_max_connections,
        }
    }

    fn count(&self, e: &ConnError) {
        let m = &self.metrics;
        match e {
            ConnError::Stream(StreamError::Open(o)) => m.dropped(*o),
            ConnError::Stream(StreamError::OversizeChunk(_) | StreamError::OversizeFrame) => {
                Metrics::bump(&m.dropped_oversize, 1);
            }
            ConnError::Stream(_) => Metrics::bump(&m.dropped_bad_stream, 1),
            ConnError::FrameTimeout | ConnError::Idle => Metrics::bump(&m.tcp_timeouts, 1),
            ConnError::Busy => Metrics::bump(&m.repair_sessions_busy, 1),
            ConnError::Io(_) | ConnError::Stopped | ConnError::TooManyFrames => {}
        }
    }
}

#[derive(Debug, Error)]
pub(crate) enum ConnError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("a frame did not arrive whole in time")]
    FrameTimeout,
    #[error("idle too long")]
    Idle,
    #[error("every repair session slot is taken")]
    Busy,
    #[error("more frames than a repair exchange has")]
    TooManyFrames,
    #[error("node stopped")]
    Stopped,
}

/// One direction in, one out, and the session slot once the peer proved it has a key.
struct Conn<S> {
    io: S,
    rd: StreamReader,
    wr: StreamWriter,
    chunk: Vec<u8>,
    permit: Option<OwnedSemaphorePermit>,
    /// Set once a chunk was authenticated: the connection table never evicts it then.
    authed: Arc<AtomicBool>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Exchanges hellos: each side learns the challenge its chunks must carry. Both send
    /// theirs at once, so this costs one round trip; waiting for the peer's is bounded by
    /// the idle timeout.
    async fn open(r: &Repair, mut io: S) -> Result<Self, ConnError> {
        let (challenge, hello) = stream::hello(&mut rand::rng());
        let mut theirs = [0u8; HELLO_LEN];
        let exchange = async {
            io.write_all(&hello).await?;
            // The preamble first: a version-1 peer or random bytes are refused at once.
            io.read_exact(&mut theirs[..MAGIC.len()]).await?;
            if theirs[..MAGIC.len()] != MAGIC {
                return Err(StreamError::Preamble.into());
            }
            io.read_exact(&mut theirs[MAGIC.len()..]).await?;
            Ok::<_, ConnError>(())
        };
        timeout(r.idle_timeout, exchange)
            .await
            .map_err(|_| ConnError::Idle)??;
        let peer = stream::parse_hello(theirs)?;
        Ok(Conn {
            io,
            rd: StreamReader::new(challenge),
            wr: StreamWriter::new(peer),
            chunk: Vec::new(),
            permit: None,
            authed: Arc::default(),
        })
    }

    async fn write(&mut self, r: &Repair, frame: &[u8]) -> Result<(), ConnError> {
        let sealer = r.sealer.borrow().clone();
        let wire = self.wr.frame(&sealer, frame, &mut rand::rng());
        timeout(r.frame_timeout, self.io.write_all(&wire))
            .await
            .map_err(|_| ConnError::FrameTimeout)??;
        Ok(())
    }

    /// Reads one frame; `None` on a clean end of stream between frames. Waiting for a
    /// frame to start is bounded by the idle timeout, reading it by the frame timeout.
    async fn read(&mut self, r: &Repair) -> Result<Option<Vec<u8>>, ConnError> {
        let mut first = [0u8; 1];
        match timeout(r.idle_timeout, self.io.read(&mut first)).await {
            Err(_) => return Err(ConnError::Idle),
            Ok(Ok(0)) => return Ok(None),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
        }
        let deadline = Instant::now() + r.frame_timeout;
        timeout_at(deadline, self.read_rest(r, first[0]))
            .await
            .map_err(|_| ConnError::FrameTimeout)?
    }

    async fn read_rest(&mut self, r: &Repair, first: u8) -> Result<Option<Vec<u8>>, ConnError> {
        let mut prefix = [first, 0];
        self.io.read_exact(&mut prefix[1..]).await?;
        loop {
            let n = self.rd.chunk_len(prefix)?;
            // The one buffer an unauthenticated peer can make us hold.
            self.chunk.resize(MAX_SEALED_CHUNK, 0);
            let buf = self
                .chunk
                .get_mut(..n)
                .ok_or(StreamError::OversizeChunk(n))?;
            self.io.read_exact(buf).await?;
            let sealer = r.sealer.borrow().clone();
            let frame = self.rd.chunk(&sealer, buf)?;
            // Authenticated: this peer holds a key, and may now buffer up to a frame.
            if self.permit.is_none() {
                self.permit = Some(
                    r.sessions
                        .clone()
                        .try_acquire_owned()
                        .map_err(|_| ConnError::Busy)?,
                );
                self.authed.store(true, Ordering::Relaxed);
            }
            if frame.is_some() {
                return Ok(frame);
            }
            self.io.read_exact(&mut prefix).await?;
        }
    }
}

async fn to_node(cmd: &mpsc::Sender<Command>, data: Vec<u8>) -> Result<Option<Vec<u8>>, ConnError> {
    let (reply, rx) = oneshot::channel();
    cmd.send(Command::Frame { data, reply })
        .await
        .map_err(|_| ConnError::Stopped)?;
    rx.await.map_err(|_| ConnError::Stopped)
}

/// Requester: send the request, apply the response, push back what the peer lacks.
pub(crate) async fn initiate(
    r: &Repair,
    peer: SocketAddr,
    request: Vec<u8>,
) -> Result<(), ConnError> {
    let permit = r
        .sessions
        .clone()
        .try_acquire_owned()
        .map_err(|_| ConnError::Busy);
    let permit = permit.inspect_err(|e| r.count(e))?;
    let io = timeout(r.frame_timeout, TcpStream::connect(peer))
        .await
        .map_err(|_| ConnError::FrameTimeout)??;
    let mut c = Conn::open(r, io).await.inspect_err(|e| r.count(e))?;
    c.permit = Some(permit);
    let result = async {
        c.write(r, &request).await?;
        if let Some(response) = c.read(r).await?
            && let Some(push) = to_node(&r.cmd, response).await?
        {
            c.write(r, &push).await?;
        }
        c.io.shutdown().await?;
        Ok(())
    }
    .await;
    result.inspect_err(|e| r.count(e))
}

/// Responder: answer the request, then apply an optional push until the peer closes.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    r: &Repair,
    io: S,
    authed: Arc<AtomicBool>,
) -> Result<(), ConnError> {
    let mut c = Conn::open(r, io).await?;
    c.authed = authed;
    for _ in 0..MAX_FRAMES_IN {
        let Some(frame) = c.read(r).await? else {
            return Ok(());
        };
        if let Some(reply) = to_node(&r.cmd, frame).await? {
            c.write(r, &reply).await?;
            Metrics::bump(&r.metrics.repair_sessions_served, 1);
        }
    }
    match c.read(r).await? {
        None => Ok(()),
        Some(_) => Err(ConnError::TooManyFrames),
    }
}

/// The open inbound connections, oldest first.
#[derive(Default)]
struct Table {
    next_id: u64,
    open: BTreeMap<u64, Slot>,
}

struct Slot {
    authed: Arc<AtomicBool>,
    close: CancellationToken,
}

struct Admitted {
    id: u64,
    authed: Arc<AtomicBool>,
    close: CancellationToken,
    evicted: bool,
}

impl Table {
    /// Makes room for a new connection. At the cap the oldest connection that has not
    /// authenticated is closed: a flood of connections from hosts without the key then
    /// only displaces itself, and a real peer, which authenticates with its first chunk
    /// (milliseconds), is safe from then on. If every open connection is authenticated
    /// the new one is refused (`None`): those are real sessions, each bounded in time.
    fn admit(&mut self, cap: usize, stop: &CancellationToken) -> Option<Admitted> {
        let mut evicted = false;
        if self.open.len() >= cap {
            let oldest = self
                .open
                .iter()
                .find(|(_, s)| !s.authed.load(Ordering::Relaxed))
                .map(|(id, _)| *id)?;
            if let Some(slot) = self.open.remove(&oldest) {
                slot.close.cancel();
            }
            evicted = true;
        }
        self.next_id += 1;
        let slot = Slot {
            authed: Arc::default(),
            close: stop.child_token(),
        };
        let admitted = Admitted {
            id: self.next_id,
            authed: slot.authed.clone(),
            close: slot.close.clone(),
            evicted,
        };
        self.open.insert(self.next_id, slot);
        Some(admitted)
    }
}

/// Removes a connection from the table when its task ends, however it ends.
struct Leave(Arc<Mutex<Table>>, u64);

impl Drop for Leave {
    fn drop(&mut self) {
        let mut t = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        t.open.remove(&self.1);
    }
}

/// Accepts repair connections until `stop`. Generic over the accept call so tests can
/// make it fail (file descriptors running out cannot be staged per test).
pub(crate) async fn accept_loop<S, F, Fut>(
    mut accept: F,
    r: Repair,
    stop: CancellationToken,
    tracker: TaskTracker,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<(S, SocketAddr)>>,
{
    let table = Arc::new(Mutex::new(Table::default()));
    let mut backoff = Duration::ZERO;
    let mut last_log: Option<Instant> = None;
    let mut unlogged = 0u64;
    loop {
        let (io, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            res = accept() => match res {
                Ok(x) => {
                    backoff = Duration::ZERO;
                    x
                }
                Err(e) => {
                    // EMFILE and friends: the listener stays; wait for descriptors to free.
                    Metrics::bump(&r.metrics.tcp_accept_errors, 1);
                    backoff = (backoff * 2).clamp(ACCEPT_BACKOFF.0, ACCEPT_BACKOFF.1);
                    if last_log.is_none_or(|t| t.elapsed() >= ACCEPT_LOG_EVERY) {
                        tracing::warn!(
                            error = %e,
                            failed_since_last_log = unlogged,
                            retry_in_ms = backoff.as_millis() as u64,
                            "gossip repair listener cannot accept"
                        );
                        last_log = Some(Instant::now());
                        unlogged = 0;
                    } else {
                        unlogged += 1;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        () = sleep(backoff) => continue,
                    }
                }
            },
        };
        let admitted = table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(r.max_connections, &stop);
        let Some(a) = admitted else {
            Metrics::bump(&r.metrics.tcp_refused, 1);
            continue;
        };
        if a.evicted {
            Metrics::bump(&r.metrics.tcp_evicted, 1);
        }
        let (r, leave) = (r.clone(), Leave(table.clone(), a.id));
        tracker.spawn(async move {
            let _leave = leave;
            tokio::select! {
                _ = a.close.cancelled() => {}
                res = serve(&r, io, a.authed) => if let Err(e) = res {
                    r.count(&e);
                    tracing::debug!(%peer, error = %e, "repair connection closed");
                },
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use tokio::io::{DuplexStream, duplex};

    use super::*;
    use crate::crypto::{KeyRing, SecretKey};

    fn sealer() -> Arc<Sealer> {
        let key = SecretKey::random(&mut StdRng::seed_from_u64(7));
        Arc::new(Sealer::new("c", Some(&KeyRing::new(key))))
    }

    fn repair(sealer: Arc<Sealer>) -> (Repair, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(8);
        let cfg = GossipConfig::default();
        let (_, sealer) = watch::channel(sealer);
        (Repair::new(&cfg, tx, Arc::default(), sealer), rx)
    }

    /// A client that claims a full chunk and sends a few bytes of it costs one chunk
    /// buffer, nothing more, until the frame timeout closes it.
    #[tokio::test(start_paused = true)]
    async fn an_unauthenticated_peer_costs_one_chunk_buffer() {
        let (r, _rx) = repair(sealer());
        let (mut client, server) = duplex(1 << 20);
        let (_, hello) = stream::hello(&mut rand::rng());
        let mut claim = hello.to_vec();
        claim.extend_from_slice(&u16::try_from(MAX_SEALED_CHUNK).unwrap().to_be_bytes());
        claim.extend_from_slice(&[1; 100]);
        client.write_all(&claim).await.unwrap();
        let mut c = Conn::open(&r, server).await.unwrap();
        assert!(matches!(c.read(&r).await, Err(ConnError::FrameTimeout)));
        assert_eq!(c.chunk.capacity(), MAX_SEALED_CHUNK);
        assert_eq!(c.rd.buffered(), 0);
        assert!(!c.authed.load(Ordering::Relaxed));
    }

    /// Accept failures (EMFILE) back off instead of spinning, are counted, and the
    /// listener serves the next connection once accepting works again.
    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off_and_never_end_the_loop() {
        let sealer = sealer();
        let (r, mut node) = repair(sealer.clone());
        let metrics = r.metrics.clone();
        let calls = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let (client, server) = duplex(1 << 16);
        let mut server = Some(server);
        let counter = calls.clone();
        let accept = move || {
            counter.fetch_add(1, Ordering::Relaxed);
            let failing = start.elapsed() < Duration::from_secs(3);
            let next = if failing { None } else { server.take() };
            async move {
                match next {
                    Some(s) => Ok::<(DuplexStream, SocketAddr), _>((s, ([127, 0, 0, 1], 9).into())),
                    None if failing => Err(std::io::Error::from_raw_os_error(24)),
                    None => std::future::pending().await,
                }
            }
        };
        let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
        tracker.spawn(accept_loop(
            accept,
            r.clone(),
            stop.clone(),
            tracker.clone(),
        ));

        // The node side: answer every frame with "pong".
        tokio::spawn(async move {
            while let Some(Command::Frame { reply, .. }) = node.recv().await {
                let _ = reply.send(Some(b"pong".to_vec()));
            }
        });
        let mut c = Conn::open(&r, client).await.unwrap();
        c.write(&r, b"ping").await.unwrap();
        assert_eq!(c.read(&r).await.unwrap().as_deref(), Some(&b"pong"[..]));
        // 3 s of failures: 10, 20, ... 640 ms, then 1 s steps: about 10 accepts, not
        // millions; each counted.
        let failed = calls.load(Ordering::Relaxed) - 2;
        assert!((5..=15).contains(&failed), "{failed} accepts in 3 s");
        assert_eq!(metrics.snapshot().tcp_accept_errors, failed as u64);
        stop.cancel();
        tracker.close();
        tracker.wait().await;
    }

    /// Chunks sealed with the right key but for another connection's challenge (what a
    /// recorded stream replayed looks like) never reach the node, nor earn a session.
    #[tokio::test(start_paused = true)]
    async fn a_replayed_stream_is_refused_before_the_node_sees_it() {
        let sealer = sealer();
        let (r, mut node) = repair(sealer.clone());
        let (mut client, server) = duplex(1 << 20);
        let (_, hello) = stream::hello(&mut rand::rng());
        let mut replay = hello.to_vec();
        let recorded_challenge = [3u8; 8];
        let frame = StreamWriter::new(recorded_challenge).frame(&sealer, b"req", &mut rand::rng());
        replay.extend_from_slice(&frame);
        client.write_all(&replay).await.unwrap();
        let authed = Arc::new(AtomicBool::new(false));
        // Bounded, so that a frame let through (the node side never answers) fails the
        // test instead of hanging it.
        let res = timeout(Duration::from_secs(60), serve(&r, server, authed.clone()))
            .await
            .unwrap_or(Err(ConnError::Stopped));
        assert!(
            matches!(res, Err(ConnError::Stream(StreamError::OutOfOrder))),
            "{res:?}"
        );
        assert!(!authed.load(Ordering::Relaxed));
        assert_eq!(r.sessions.available_permits(), 8);
        assert!(node.try_recv().is_err(), "the node saw a replayed frame");
    }
}
