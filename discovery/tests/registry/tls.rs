//! The registry over HTTPS with the real client: a CA file verifies it, a client with another
//! CA gets a TLS error that is not worth retrying.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use discovery::{
    ClientError, MemoryStore, Registry, RegistryClient, RegistryConfig, SystemClock, serve,
};
use schema::{Endpoint, ServiceName};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Writes `ca.pem`, `cert.pem` and `key.pem` (for 127.0.0.1 and localhost) into `dir`.
fn write_certs(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("params");
    let cert = params
        .signed_by(&key, &rcgen::Issuer::from_params(&ca_params, &ca_key))
        .expect("cert");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("ca.pem");
    std::fs::write(dir.join("cert.pem"), cert.pem()).expect("cert.pem");
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("key.pem");
}

#[tokio::test]
async fn https_registry_is_verified_with_the_ca_file_and_a_stranger_ca_is_a_permanent_error() {
    let good = tempfile::tempdir().expect("tempdir");
    let other = tempfile::tempdir().expect("tempdir");
    write_certs(good.path());
    write_certs(other.path());
    let cfg = RegistryConfig {
        shutdown_delay: Duration::ZERO,
        tls: Some(serve::TlsFiles {
            cert_file: good.path().join("cert.pem"),
            key_file: good.path().join("key.pem"),
        }),
        ..Default::default()
    };
    let registry = Registry::new(Arc::new(MemoryStore::new()), cfg, Arc::new(SystemClock));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(listener, registry, shutdown.clone()));

    let web = ServiceName::new("web").expect("name");
    let ep = Endpoint::new(
        web.clone(),
        "127.0.0.1".parse().expect("ip"),
        std::num::NonZeroU16::new(8080).expect("port"),
    );
    for base in [
        format!("https://{addr}"),
        format!("https://localhost:{}", addr.port()),
    ] {
        let client = RegistryClient::with_ca(
            &base,
            None,
            Duration::from_secs(5),
            Some(&good.path().join("ca.pem")),
        )
        .expect("client");
        client
            .check_in(std::slice::from_ref(&ep))
            .await
            .unwrap_or_else(|e| panic!("{base}: {e}"));
        assert_eq!(client.service(&web).await.expect("listing").hosts.len(), 1);
    }

    let stranger = RegistryClient::with_ca(
        &format!("https://{addr}"),
        None,
        Duration::from_secs(5),
        Some(&other.path().join("ca.pem")),
    )
    .expect("client");
    let err = stranger.service(&web).await.expect_err("untrusted");
    assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");

    let missing = RegistryClient::with_ca(
        &format!("https://{addr}"),
        None,
        Duration::from_secs(5),
        Some(&good.path().join("nope.pem")),
    )
    .expect_err("no such CA file");
    assert!(matches!(missing, ClientError::CaFile(_)), "{missing:?}");
    assert!(missing.to_string().contains("nope.pem"), "{missing}");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), server)
        .await
        .expect("stopped")
        .expect("join")
        .expect("ok");
}
