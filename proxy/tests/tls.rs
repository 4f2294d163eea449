//! TLS termination at the listener, TLS origination with mTLS to upstreams, and HTTP/2 on
//! both sides.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write pem");
    p
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &ca)
            .expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (sc, sk) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
    let (cc, ck) = leaf(vec!["proxy.internal".into()]);
    Pki {
        ca: write(dir.path(), "ca.pem", &ca.pem()),
        server_cert: write(dir.path(), "server.pem", &sc),
        server_key: write(dir.path(), "server.key", &sk),
        client_cert: write(dir.path(), "client.pem", &cc),
        client_key: write(dir.path(), "client.key", &ck),
        dir,
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Path) -> Arc<RootCertStore> {
    let mut r = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("ca") {
        r.add(c.expect("cert")).expect("add");
    }
    Arc::new(r)
}

/// A TLS backend that requires a client certificate from the CA and answers with the HTTP
/// version it was spoken to in.
async fn mtls_backend(pki: &Pki) -> SocketAddr {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&pki.ca), provider())
        .build()
        .expect("verifier");
    let certs: Vec<_> = CertificateDer::pem_file_iter(&pki.server_cert)
        .expect("pem")
        .map(|c| c.expect("cert"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(&pki.server_key).expect("key");
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                        "{:?}",
                        req.version()
                    )))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

fn client_tls(ca: &Path, alpn: &[u8]) -> TlsConnector {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots(ca))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(cfg))
}

/// An HTTP/1.1 client connection over TLS (ALPN `http/1.1`) to the proxy at `addr`.
async fn http11_over_tls(
    addr: SocketAddr,
    ca: &Path,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let tls = client_tls(ca, b"http/1.1")
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1");
    tokio::spawn(conn);
    send
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_termination_and_mtls_origination_over_http2() {
    let pki = pki();
    let backend = mtls_backend(&pki).await;
    let m = Membership::start(vec![Listed::up(backend)]).await;
    let mut cfg = config(&m.url());
    cfg.listeners[0].tls = Some(proxy::config::ServerTlsConfig {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
    });
    cfg.clusters[0].http2 = true;
    cfg.clusters[0].tls = Some(proxy::config::UpstreamTlsConfig {
        ca: pki.ca.clone(),
        server_name: "localhost".into(),
        cert: Some(pki.client_cert.clone()),
        key: Some(pki.client_key.clone()),
    });
    let p = start(cfg).await;
    // Health checks run over mTLS too, or the host would never become routable.
    p.wait_routed(&[backend]).await;

    // HTTP/2 client over TLS (ALPN h2) → proxy → HTTP/2 over mTLS → backend.
    let tcp = TcpStream::connect(p.addr).await.expect("connect");
    let tls = client_tls(&pki.ca, b"h2")
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2");
    tokio::spawn(conn);
    let req = Request::get("https://localhost/")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), Version::HTTP_2);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"HTTP/2.0", "upstream was spoken to in HTTP/2");

    // HTTP/1.1 over TLS works on the same listener.
    let mut send = http11_over_tls(p.addr, &pki.ca).await;
    let req = Request::get("/")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    drop(pki.dir);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_http2_prior_knowledge_downstream() {
    let a = Backend::start(1, Duration::ZERO).await;
    let m = Membership::start(vec![Listed::up(a.addr)]).await;
    let p = start(config(&m.url())).await;
    p.wait_routed(&[a.addr]).await;
    let tcp = TcpStream::connect(p.addr).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2");
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = Request::get(format!("http://{}/", p.addr))
            .body(Full::new(Bytes::new()))
            .expect("req");
        let resp = send.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.into_body().collect().await.expect("body").to_bytes(),
            "backend-1"
        );
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_material_is_a_bind_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = write(dir.path(), "junk.pem", "not a certificate");
    let mut cfg = config("http://127.0.0.1:9");
    cfg.listeners[0].tls = Some(proxy::config::ServerTlsConfig {
        cert: junk.clone(),
        key: junk,
    });
    let err = proxy::Proxy::bind(cfg).await.err().expect("bind must fail");
    assert!(matches!(err, proxy::ProxyError::Tls(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_over_tls_to_a_plain_cluster_takes_the_fast_path_and_keeps_its_connection() {
    let pki = pki();
    let a = Backend::start(1, Duration::ZERO).await;
    let m = Membership::start(vec![Listed::up(a.addr)]).await;
    let mut cfg = config(&m.url());
    cfg.listeners[0].tls = Some(proxy::config::ServerTlsConfig {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
    });
    let p = start(cfg).await;
    p.wait_routed(&[a.addr]).await;
    let mut send = http11_over_tls(p.addr, &pki.ca).await;
    // One TLS connection carries every request: keep-alive works through the fast path.
    for i in 0..5 {
        // Errors if the proxy closed the connection.
        send.ready().await.expect("connection still open");
        let req = Request::get("/")
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
            .await
            .expect("answer in time")
            .expect("response");
        assert_eq!(resp.status(), 200, "request {i}");
        assert!(resp.headers().contains_key("x-request-id"));
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"backend-1");
    }
    assert_eq!(a.hits(), 5);
    drop(pki.dir);
    p.stop().await;
}
