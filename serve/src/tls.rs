//! TLS for the listener: a certificate and key read from PEM files, and re-read when the
//! files change. Certificates are renewed in place (by an ACME client, a config manager) and
//! a restart would drop every connection; so [`ServerTls`] checks the files every few
//! seconds and swaps in a new `ServerConfig`. Connections already open keep the config they
//! shook hands with; new handshakes get the new one. A pair that fails to load (a key written
//! before its certificate, a typo) leaves the old config in place and is retried when the
//! files change again.
//!
//! Also the PEM helpers the control-plane clients use to trust a CA file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

/// How often [`ServerTls::watch`] looks at the files' metadata.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("certificate {cert} and key {key}: {reason}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// A server's `[tls]` config table: the certificate chain and its private key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TlsFiles {
    pub fn load(&self) -> Result<ServerTls, TlsError> {
        ServerTls::load(&self.cert_file, &self.key_file)
    }
}

/// The ring provider, named explicitly so no process-wide default is needed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file; a file without one is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let pem_err = |reason: String| TlsError::Pem {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no PEM certificate found".into()));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        reason: format!("no usable private key: {e}"),
    })
}

/// The certificates of a CA file, as trust roots.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// A client config trusting exactly `roots` (server names are verified), ALPN unset.
pub fn client_config(roots: RootCertStore) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Pem {
            path: PathBuf::new(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A server config from a certificate chain and key file; ALPN offers h2, then HTTP/1.1.
pub fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let chain = load_certs(cert)?;
    let private = load_key(key)?;
    let config_err = |reason: String| TlsError::Config {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        reason,
    };
    let mut sc = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err(e.to_string()))?
        .with_no_client_auth()
        // Checks that the key belongs to the certificate: a half-renewed pair is refused here.
        .with_single_cert(chain, private)
        .map_err(|e| config_err(e.to_string()))?;
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(sc)
}

/// What identifies a file's version without reading it: a rename-into-place changes the
/// inode, an in-place write the mtime or length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    })
}

/// A server TLS config from PEM files, reloaded when they change. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
    /// The files' stamps at the last load attempt, successful or not.
    seen: Mutex<(Option<Stamp>, Option<Stamp>)>,
}

impl ServerTls {
    /// Loads the pair now: a server must not start with a certificate it cannot serve.
    pub fn load(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Result<Self, TlsError> {
        let (cert, key) = (cert.into(), key.into());
        let seen = (stamp(&cert), stamp(&key));
        let config = server_config(&cert, &key)?;
        Ok(ServerTls {
            cert,
            key,
            current: RwLock::new(Arc::new(config)),
            seen: Mutex::new(seen),
        })
    }

    /// The config new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        // A panic while holding the lock leaves a valid Arc behind: keep using it.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reloads if either file changed since the last attempt. `Ok(true)`: a new config is in
    /// use; `Ok(false)`: nothing changed; `Err`: the files changed but do not load (the old
    /// config stays, and is not retried until they change again).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = (stamp(&self.cert), stamp(&self.key));
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return Ok(false);
            }
            *seen = now;
        }
        let config = server_config(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        Ok(true)
    }

    /// Checks the files every `interval` until `stop`, logging reloads and failures.
    pub async fn watch(
        self: Arc<Self>,
        component: &'static str,
        interval: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Reading small files; done off the runtime threads all the same.
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.reload_if_changed()).await {
                Ok(Ok(true)) => tracing::info!(
                    component,
                    cert = %self.cert.display(),
                    "TLS certificate reloaded; new connections use it"
                ),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(
                    component,
                    error = %e,
                    "TLS certificate changed but does not load; still serving the previous one"
                ),
                Err(e) => tracing::warn!(component, error = %e, "TLS reload task failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(vec![name.to_string()]).expect("certificate params");
        let cert = params.self_signed(&key).expect("self-signed");
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }

    #[test]
    fn a_changed_pair_is_reloaded_and_a_broken_one_keeps_the_old() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = write_pair(dir.path(), "one.test");
        let tls = ServerTls::load(&cert, &key).expect("loads");
        let first = tls.current();
        assert!(!tls.reload_if_changed().expect("unchanged"));

        // A key that does not match the certificate: refused, the old config stays.
        let other = rcgen::KeyPair::generate().expect("key");
        std::fs::write(&key, other.serialize_pem()).expect("write key");
        assert!(tls.reload_if_changed().is_err());
        assert!(Arc::ptr_eq(&tls.current(), &first));
        // Not retried until the files change again.
        assert!(
            !tls.reload_if_changed()
                .expect("unchanged since the failure")
        );

        write_pair(dir.path(), "two.test");
        assert!(tls.reload_if_changed().expect("reloads"));
        assert!(!Arc::ptr_eq(&tls.current(), &first));
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.pem");
        let err = ServerTls::load(&missing, &missing).expect_err("missing");
        assert!(err.to_string().contains("nope.pem"), "{err}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem").expect("write");
        let err = load_roots(&junk).expect_err("junk");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        let err = load_key(&junk).expect_err("junk");
        assert!(err.to_string().contains("junk.pem"), "{err}");
    }
}
