//! rustls configuration for TLS termination (listeners) and origination (upstreams), from PEM
//! files. The ring provider is named explicitly so no process-wide default is needed.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::ProxyError;
use crate::config::{ServerTlsConfig, UpstreamTlsConfig};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, ProxyError> {
    std::fs::read(path).map_err(|e| ProxyError::Tls(format!("reading {}: {e}", path.display())))
}

/// Every certificate in a PEM file; an empty file is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ProxyError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ProxyError::Tls(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ProxyError::Tls(format!(
            "{}: no certificate found",
            path.display()
        )));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, ProxyError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| ProxyError::Tls(format!("{}: {e}", path.display())))
}

/// A listener's server config; ALPN offers h2 first, then HTTP/1.1.
pub fn server_config(cfg: &ServerTlsConfig) -> Result<Arc<ServerConfig>, ProxyError> {
    let certs = load_certs(&cfg.cert)?;
    let key = load_key(&cfg.key)?;
    let mut sc = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ProxyError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ProxyError::Tls(format!("listener certificate: {e}")))?;
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(sc))
}

/// An upstream client config trusting only `cfg.ca`, with a client certificate for mTLS when
/// given. ALPN asks for h2 only when the cluster speaks HTTP/2.
pub fn client_config(
    cfg: &UpstreamTlsConfig,
    http2: bool,
) -> Result<Arc<ClientConfig>, ProxyError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(&cfg.ca)? {
        roots
            .add(cert)
            .map_err(|e| ProxyError::Tls(format!("{}: {e}", cfg.ca.display())))?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ProxyError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut cc = match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| ProxyError::Tls(format!("client certificate: {e}")))?,
        _ => builder.with_no_client_auth(),
    };
    cc.alpn_protocols = if http2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(cc))
}
