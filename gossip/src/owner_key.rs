//! The agent's owner key and its latest certificate, kept in the data dir
//! (docs/ARCHITECTURE.md#signed-gossip): the key is created on first start and kept across
//! restarts, so peers need no new certificate after a restart; the certificate is kept so a
//! restart while the registry is down still signs under a certificate peers honour
//! (fail-static).

use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::sign::{Certificate, SigningKey};

/// The file in the data dir that holds the owner key (base64 seed, mode 0600).
pub const KEY_FILE: &str = "gossip-owner-key";
/// The file in the data dir that holds the last certificate the registry issued.
pub const CERT_FILE: &str = "gossip-owner-cert";

#[derive(Debug, Error)]
pub enum OwnerKeyError {
    #[error("cannot read the gossip owner key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the gossip owner key {path} is corrupt ({reason}); move it away to make a new one")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Loads the owner key from `dir`, creating it on first start. A corrupt key is an error,
/// not silently replaced: a new key would need a new certificate before peers trust us.
pub fn load_or_create(dir: &Path) -> Result<SigningKey, OwnerKeyError> {
    let path = dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .parse()
            .map_err(|e: crate::sign::SignKeyError| OwnerKeyError::Corrupt {
                path,
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::generate();
            write_private(&path, &key.to_base64())
                .map_err(|source| OwnerKeyError::Write { path, source })?;
            Ok(key)
        }
        Err(source) => Err(OwnerKeyError::Read { path, source }),
    }
}

/// Writes a secret file readable by its owner only, atomically (temp file, fsync, rename).
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// The certificate kept by the last start, if any is readable.
pub fn load_cert(dir: &Path) -> Option<Certificate> {
    let text = std::fs::read_to_string(dir.join(CERT_FILE)).ok()?;
    Certificate::from_base64(&text)
}

/// Keeps `cert` for the next start.
pub fn store_cert(dir: &Path, cert: &Certificate) -> Result<(), OwnerKeyError> {
    let path = dir.join(CERT_FILE);
    let text = cert.to_base64().unwrap_or_default();
    write_private(&path, &text).map_err(|source| OwnerKeyError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sign::CertBody;

    #[test]
    fn the_key_is_created_once_and_kept_across_restarts_with_its_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        let again = load_or_create(dir.path()).unwrap();
        assert_eq!(first.public(), again.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
        assert_eq!(load_cert(dir.path()), None);
        let registry = SigningKey::generate();
        let cert = Certificate::issue(
            &registry,
            CertBody {
                owner_key: first.public(),
                ip: "10.0.0.1".parse().unwrap(),
                services: None,
                not_before_ms: 1,
                not_after_ms: 2,
            },
        )
        .unwrap();
        store_cert(dir.path(), &cert).unwrap();
        assert_eq!(load_cert(dir.path()), Some(cert));
    }

    #[test]
    fn a_corrupt_key_is_an_error_and_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KEY_FILE), "garbage").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(OwnerKeyError::Corrupt { .. })
        ));
        assert_eq!(
            std::fs::read_to_string(dir.path().join(KEY_FILE)).unwrap(),
            "garbage"
        );
    }
}
