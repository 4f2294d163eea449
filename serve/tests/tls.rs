//! TLS on the listener: the handshake is bounded by the header timeout and counted in the
//! cap, and a renewed certificate reaches new connections while open ones keep going.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{closed_within, limits, start_tls};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

struct Ca {
    key: rcgen::KeyPair,
    params: rcgen::CertificateParams,
    cert: rcgen::Certificate,
}

fn ca() -> Ca {
    let key = rcgen::KeyPair::generate().expect("ca key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).expect("ca cert");
    Ca { key, params, cert }
}

/// Writes a server certificate for `localhost` signed by `ca`; returns its DER.
fn issue(ca: &Ca, dir: &Path) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    let issuer = rcgen::Issuer::from_params(&ca.params, &ca.key);
    let cert = params.signed_by(&key, &issuer).expect("signed");
    // Renamed into place, as a renewal tool does; the key first, so the pair only matches
    // once both are there.
    for (name, pem) in [("key.pem", key.serialize_pem()), ("cert.pem", cert.pem())] {
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, pem).expect("write");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    }
    cert.der().to_vec()
}

fn connector(ca: &Ca) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).expect("root");
    let mut config = serve::tls::client_config(roots).expect("client config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

async fn connect(tls: &TlsConnector, addr: std::net::SocketAddr) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    tls.connect(name, tcp).await.expect("handshake")
}

fn peer_cert(s: &TlsStream<TcpStream>) -> Vec<u8> {
    let (_, conn) = s.get_ref();
    let certs: &[CertificateDer<'_>] = conn.peer_certificates().expect("server certificate");
    certs[0].to_vec()
}

/// One keep-alive `GET /live`; reads exactly the answer.
async fn get_live(s: &mut TlsStream<TcpStream>) -> Result<(), String> {
    s.write_all(b"GET /live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.ends_with(b"live\n") {
        let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(format!("closed after {:?}", String::from_utf8_lossy(&buf)));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if !buf.starts_with(b"HTTP/1.1 200") {
        return Err(String::from_utf8_lossy(&buf).into_owned());
    }
    Ok(())
}

#[tokio::test]
async fn a_renewed_certificate_reaches_new_connections_and_open_ones_keep_going() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca();
    let first = issue(&ca, dir.path());
    let tls = serve::ServerTls::load(dir.path().join("cert.pem"), dir.path().join("key.pem"))
        .expect("loads");
    let server = start_tls(limits(64), Arc::new(tls)).await;
    let connector = connector(&ca);

    let mut old = connect(&connector, server.addr).await;
    assert_eq!(peer_cert(&old), first);
    get_live(&mut old).await.expect("first request");

    let second = issue(&ca, dir.path());
    assert_ne!(first, second);
    // The listener looks every couple of seconds: poll new connections with a deadline.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut fresh = connect(&connector, server.addr).await;
        get_live(&mut fresh)
            .await
            .expect("a new connection is served");
        if peer_cert(&fresh) == second {
            break;
        }
        assert_eq!(peer_cert(&fresh), first, "an unknown certificate");
        assert!(
            Instant::now() < deadline,
            "the new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection opened before the swap is still served, on its old session.
    get_live(&mut old)
        .await
        .expect("the old connection still works");
    assert_eq!(peer_cert(&old), first);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_is_closed_at_the_header_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca();
    issue(&ca, dir.path());
    let tls = serve::ServerTls::load(dir.path().join("cert.pem"), dir.path().join("key.pem"))
        .expect("loads");
    let server = start_tls(
        serve::Limits {
            header_read_timeout: Duration::from_millis(300),
            ..limits(16)
        },
        Arc::new(tls),
    )
    .await;
    // Half a ClientHello: a record header promising more than is sent.
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .expect("write");
    let after = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("stalled handshake closed");
    assert!(
        after >= Duration::from_millis(200) && after < Duration::from_secs(2),
        "closed after {after:?}"
    );
    assert_eq!(
        server.metric("tidings_test_connections_timed_out_total{reason=\"header\"}"),
        1.0
    );
}

#[tokio::test]
async fn handshaking_connections_count_toward_the_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca();
    issue(&ca, dir.path());
    let tls = serve::ServerTls::load(dir.path().join("cert.pem"), dir.path().join("key.pem"))
        .expect("loads");
    // A header timeout far beyond the test: an evicted connection must close because it
    // was chosen, not because its handshake timed out.
    let server = start_tls(
        serve::Limits {
            header_read_timeout: Duration::from_secs(60),
            ..limits(2)
        },
        Arc::new(tls),
    )
    .await;
    let connector = connector(&ca);
    // Two sockets waiting in their handshake (nothing sent): they hold the cap.
    let mut a = TcpStream::connect(server.addr).await.expect("a");
    let _b = TcpStream::connect(server.addr).await.expect("b");
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.metric("tidings_test_connections_open") < 2.0 {
        assert!(Instant::now() < deadline, "two connections never open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A third, well-behaved client gets in by closing the oldest of them.
    let mut c = connect(&connector, server.addr).await;
    get_live(&mut c).await.expect("served at the cap");
    closed_within(&mut a, Duration::from_secs(3))
        .await
        .expect("the oldest handshaking connection made room");
    assert_eq!(
        server.metric("tidings_test_connections_evicted_total{reason=\"oldest_idle\"}"),
        1.0
    );
}
