//! The ADS service's gRPC edge: routes the two methods to the stream tasks of
//! [`super::server`] and writes their responses as gRPC messages.
//!
//! Why not the service tonic generates from Envoy's protos: its response encoder keeps one
//! buffer per stream, reused for every message and grown to the largest one sent, for as
//! long as the stream lives. An ADS stream's largest message is a whole catalog (every
//! cluster of a state-of-the-world CDS answer, or a piece of 100 assignments), and streams
//! live for days: at 1 000 services × 10 hosts, 200 streams held 50 MB that way. Here each
//! message is encoded into a buffer of exactly its size, handed to HTTP/2 and freed once
//! written. Its request decoder does the same with the largest request (an Envoy repeats its
//! whole subscription in every ACK: 12 KB at 1 000 services, ~10 MB at 200 streams): here
//! a request is decoded from HTTP/2's own frames, copied only when it spans two, and
//! nothing is kept between requests. Transport, HTTP/2 and keep-alive stay tonic's server.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

/// The gRPC service name of ADS.
pub const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// gRPC's message prefix: a compression flag and a 32-bit big-endian length.
const PREFIX: usize = 5;

/// What serves the streams: opens one per call and returns what its task will send.
pub trait Streams: Send + Sync + 'static {
    fn sotw(&self, inbound: Requests<DiscoveryRequest>) -> Result<Outbound, Status>;
    fn delta(&self, inbound: Requests<DeltaDiscoveryRequest>) -> Result<Outbound, Status>;
}

/// A stream's responses, already encoded ([`message`]), or the status that ends it.
pub type Outbound = mpsc::Receiver<Result<Bytes, Status>>;

/// One response as a gRPC message of its own size, and what tells when it has been
/// written: HTTP/2 drops a message's bytes once they are in the socket (or the stream is
/// gone), and that completes (or fails) the receiver.
pub fn message<M: prost::Message>(m: &M) -> Result<(Bytes, Written), Status> {
    let len = m.encoded_len();
    let prefix_len = u32::try_from(len)
        .map_err(|_| Status::resource_exhausted("response over 4 GiB not sent"))?;
    let mut buf = Vec::with_capacity(PREFIX + len);
    buf.put_u8(0);
    buf.put_u32(prefix_len);
    m.encode_raw(&mut buf);
    let (tx, written) = oneshot::channel();
    Ok((Bytes::from_owner(Owned { buf, _tx: tx }), written))
}

/// Completes (with an error, as its sender goes) once the message's bytes are dropped.
pub type Written = oneshot::Receiver<()>;

/// A message's bytes and the sender whose drop says they were written.
struct Owned {
    buf: Vec<u8>,
    _tx: oneshot::Sender<()>,
}

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

/// The ADS service for tonic's router.
pub struct Ads<S>(pub Arc<S>);

impl<S> Clone for Ads<S> {
    fn clone(&self) -> Self {
        Ads(self.0.clone())
    }
}

impl<S> NamedService for Ads<S> {
    const NAME: &'static str = SERVICE;
}

impl<S: Streams> tonic::codegen::Service<http::Request<Body>> for Ads<S> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        ready(Ok(self.route(req).unwrap_or_else(Status::into_http)))
    }
}

impl<S: Streams> Ads<S> {
    fn route(&self, req: http::Request<Body>) -> Result<http::Response<Body>, Status> {
        // Requests are taken uncompressed only (clients compress only when told they may).
        let compressed = req
            .headers()
            .get("grpc-encoding")
            .is_some_and(|e| e.as_bytes() != b"identity");
        if compressed {
            return Err(Status::unimplemented(
                "compressed requests are not accepted by this server",
            ));
        }
        let outbound = match req.uri().path() {
            SOTW_PATH => self.0.sotw(Requests::new(req.into_body()))?,
            DELTA_PATH => self.0.delta(Requests::new(req.into_body()))?,
            path => {
                let shown: String = path.chars().take(200).collect();
                return Err(Status::unimplemented(format!("no method {shown}")));
            }
        };
        let mut resp = http::Response::new(Body::new(Messages {
            rx: outbound,
            ended: false,
        }));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        Ok(resp)
    }
}

/// Largest request accepted (a subscription of `max_resource_names` fits well within).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// A stream's requests, decoded one at a time from the request body's frames.
pub struct Requests<M> {
    body: Body,
    /// Received bytes not yet decoded, as HTTP/2 handed them over.
    chunks: VecDeque<Bytes>,
    buffered: usize,
    ended: bool,
    _message: PhantomData<fn() -> M>,
}

impl<M: prost::Message + Default> Requests<M> {
    pub fn new(body: Body) -> Self {
        Requests {
            body,
            chunks: VecDeque::new(),
            buffered: 0,
            ended: false,
            _message: PhantomData,
        }
    }

    /// The next request; `None` once the client has closed its side. Cancel-safe: what
    /// was received stays for the next call.
    pub async fn message(&mut self) -> Result<Option<M>, Status> {
        if !self.fill(PREFIX).await? {
            return Ok(None);
        }
        let mut head = [0u8; PREFIX];
        self.peek(&mut head);
        if head[0] != 0 {
            return Err(Status::unimplemented(
                "compressed requests are not accepted by this server",
            ));
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_REQUEST_BYTES {
            return Err(Status::out_of_range(format!(
                "request of {len} bytes is over the limit of {MAX_REQUEST_BYTES}"
            )));
        }
        if !self.fill(PREFIX + len).await? {
            return Err(Status::invalid_argument(
                "request body ended inside a message",
            ));
        }
        self.take(PREFIX);
        let body = self.take(len);
        M::decode(body)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("undecodable request: {e}")))
    }

    /// Receives until `n` bytes are buffered; false if the body ended first (with nothing
    /// buffered: a clean end).
    async fn fill(&mut self, n: usize) -> Result<bool, Status> {
        while self.buffered < n {
            if self.ended {
                return if self.buffered == 0 {
                    Ok(false)
                } else {
                    Err(Status::invalid_argument(
                        "request body ended inside a message",
                    ))
                };
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            self.buffered += data.len();
                            self.chunks.push_back(data);
                        }
                    }
                }
                Some(Err(status)) => return Err(status),
                None => self.ended = true,
            }
        }
        Ok(true)
    }

    /// Copies the first bytes buffered into `out` (as many as it holds; buffered).
    fn peek(&self, out: &mut [u8]) {
        let mut at = 0;
        for c in &self.chunks {
            let n = (out.len() - at).min(c.len());
            out[at..at + n].copy_from_slice(&c[..n]);
            at += n;
            if at == out.len() {
                break;
            }
        }
    }

    /// The first `n` bytes buffered: a slice of one frame when it holds them all, else a
    /// copy of exactly `n` bytes.
    fn take(&mut self, n: usize) -> Bytes {
        self.buffered -= n;
        if let Some(front) = self.chunks.front_mut() {
            if front.len() >= n {
                let out = front.split_to(n);
                if front.is_empty() {
                    self.chunks.pop_front();
                }
                return out;
            }
        }
        let mut out = BytesMut::with_capacity(n);
        while out.len() < n {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let k = (n - out.len()).min(front.len());
            out.put(front.split_to(k));
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
        out.freeze()
    }
}

/// The response body: the stream task's messages, then trailers with its status.
struct Messages {
    rx: Outbound,
    ended: bool,
}

impl http_body::Body for Messages {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let end = match std::task::ready!(self.rx.poll_recv(cx)) {
            Some(Ok(message)) => return Poll::Ready(Some(Ok(Frame::data(message)))),
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.ended = true;
        let mut trailers = http::HeaderMap::new();
        if end.add_header(&mut trailers).is_err() {
            // A message that cannot be a header value: the code alone.
            trailers = http::HeaderMap::new();
            let _ = Status::new(end.code(), "").add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use prost::Message;

    use super::*;

    /// The bytes are one gRPC message of exactly their size, and the receiver completes
    /// when they are dropped, not before.
    #[test]
    fn a_message_is_its_own_size_and_tells_when_it_is_gone() {
        let resp = DiscoveryResponse {
            version_info: "7".into(),
            nonce: "1".into(),
            ..Default::default()
        };
        let (bytes, mut written) = message(&resp).expect("encoded");
        assert_eq!(bytes[0], 0, "not compressed");
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        assert_eq!(len, bytes.len() - PREFIX);
        assert_eq!(
            DiscoveryResponse::decode(&bytes[PREFIX..]).expect("decodes"),
            resp
        );
        assert!(matches!(
            written.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        let part = bytes.slice(1..);
        drop(bytes);
        assert!(
            matches!(written.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "a part is still held"
        );
        drop(part);
        assert!(matches!(
            written.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
    }

    fn body(chunks: Vec<Bytes>) -> Body {
        let frames = chunks.into_iter().map(|c| Ok::<_, Status>(Frame::data(c)));
        Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
    }

    fn request(n: usize) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: n.to_string(),
            resource_names: (0..n).map(|i| format!("service-{i}")).collect(),
            response_nonce: format!("{n}"),
            ..Default::default()
        }
    }

    fn read_all(chunks: Vec<Bytes>) -> Result<Vec<DiscoveryRequest>, Status> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut r = Requests::<DiscoveryRequest>::new(body(chunks));
            let mut got = Vec::new();
            while let Some(m) = r.message().await? {
                got.push(m);
            }
            Ok(got)
        })
    }

    /// Requests cut anywhere by HTTP/2's frames (within a prefix, between messages, one
    /// byte at a time) decode whole and in order, and a clean end is the end.
    #[test]
    fn requests_decode_however_the_frames_cut_them() {
        let mut runner = proptest::test_runner::TestRunner::default();
        let case = (
            proptest::collection::vec(0usize..300, 1..5),
            proptest::collection::vec(1usize..4000, 1..40),
        );
        runner
            .run(&case, |(sizes, cuts)| {
                let sent: Vec<DiscoveryRequest> = sizes.iter().map(|n| request(*n)).collect();
                let mut wire = Vec::new();
                for m in &sent {
                    let (b, _) = message(m).expect("encoded");
                    wire.extend_from_slice(&b);
                }
                let mut chunks = Vec::new();
                let mut rest = Bytes::from(wire);
                for cut in cuts.iter().cycle() {
                    if rest.is_empty() {
                        break;
                    }
                    chunks.push(rest.split_to((*cut).min(rest.len())));
                }
                let got = read_all(chunks)
                    .map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
                proptest::prop_assert_eq!(got, sent);
                Ok(())
            })
            .expect("decoded as sent");
    }

    /// A compressed message, one over the size limit (refused from its prefix, before
    /// anything is buffered), a body that ends inside a message and garbage are errors.
    #[test]
    fn bad_requests_are_errors() {
        let (ok, _) = message(&request(3)).expect("encoded");
        let mut compressed = ok.to_vec();
        compressed[0] = 1;
        let e = read_all(vec![Bytes::from(compressed)]).expect_err("compressed");
        assert_eq!(e.code(), tonic::Code::Unimplemented);

        let huge = [0u8, 0xff, 0xff, 0xff, 0xff];
        let e = read_all(vec![Bytes::copy_from_slice(&huge)]).expect_err("huge");
        assert_eq!(e.code(), tonic::Code::OutOfRange);

        let e = read_all(vec![ok.slice(..ok.len() - 1)]).expect_err("truncated");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = read_all(vec![ok.slice(..3)]).expect_err("truncated prefix");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);

        let garbage = [0u8, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff];
        let e = read_all(vec![Bytes::copy_from_slice(&garbage)]).expect_err("garbage");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(read_all(Vec::new()).expect("empty").is_empty());
    }
}
