//! The disk cache (DESIGN.md §5.1): the merged view, the last registry sync time and the
//! endpoints registered at runtime, so a restarted agent answers at once even while the
//! registry is down. Written atomically (temp file, fsync, rename, fsync of the directory),
//! at most once a second and only when something changed. A file that is missing, foreign,
//! of another version, truncated or corrupt is reported and ignored — never fatal.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use schema::Endpoint;
use schema::codec::{self, CodecError};
use schema::timefmt::unix_ms_now;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::state::Shared;
use crate::view::CachedHost;

/// Identifies our files before the codec's own version byte.
const MAGIC: &[u8; 8] = b"TDNGSAC\0";
const FILE_NAME: &str = "view.cache";
/// At most one write per this period.
const MIN_WRITE_GAP: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum CacheError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a Tidings agent cache file (bad magic)")]
    Foreign,
    #[error("unreadable cache: {0}")]
    Codec(#[from] CodecError),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheFile {
    pub written_at_ms: u64,
    /// Wall-clock ms up to which the registry data was known current when written (the
    /// registry-age clock goes on from there after a restart); 0 if never.
    pub last_sync_ms: u64,
    pub hosts: Vec<CachedHost>,
    /// Endpoints registered through the local API, restored at start.
    pub runtime: Vec<Endpoint>,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

pub fn encode(file: &CacheFile) -> Result<Vec<u8>, CacheError> {
    let mut out = MAGIC.to_vec();
    out.extend(codec::encode_file(file)?);
    Ok(out)
}

pub fn decode(bytes: &[u8]) -> Result<CacheFile, CacheError> {
    let body = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or(CacheError::Foreign)?;
    Ok(codec::decode_file(body)?)
}

/// Reads the cache in `dir`; `Ok(None)` when there is none yet.
pub fn load(dir: &Path) -> Result<Option<CacheFile>, CacheError> {
    let p = path(dir);
    match std::fs::read(&p) {
        Ok(bytes) => decode(&bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CacheError::Read { path: p, source }),
    }
}

/// Writes atomically: a reader (or a crash) sees the old file or the new one, never a mix.
pub fn store(dir: &Path, file: &CacheFile) -> Result<(), CacheError> {
    let bytes = encode(file)?;
    let target = path(dir);
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let werr = |source| CacheError::Write {
        path: tmp.clone(),
        source,
    };
    let mut f = std::fs::File::create(&tmp).map_err(werr)?;
    f.write_all(&bytes).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    drop(f);
    std::fs::rename(&tmp, &target).map_err(|source| CacheError::Write {
        path: target.clone(),
        source,
    })?;
    // The rename is durable only once the directory entry is.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// What would be written now, and the index of the view it holds.
fn snapshot_of(shared: &Shared) -> (CacheFile, u64) {
    let view = shared.current_view();
    let file = CacheFile {
        written_at_ms: unix_ms_now(),
        last_sync_ms: shared.known_current_ms(),
        hosts: view.all_hosts().map(|h| h.to_cached()).collect(),
        runtime: shared.local().runtime.values().cloned().collect(),
    };
    (file, view.index())
}

/// Writes the cache whenever the view or the runtime endpoints change, at most once a
/// second, and once more on the way out.
pub async fn run_writer(shared: Arc<Shared>, stop: CancellationToken) {
    let dir = shared.config.data_dir.clone();
    let mut view = shared.view.clone();
    let mut local = shared.local_version.subscribe();
    let mut last: Option<CacheFile> = None;
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            r = view.changed() => r.is_err(),
            r = local.changed() => r.is_err(),
        };
        let (mut next, index) = snapshot_of(&shared);
        let unchanged = last.as_ref().is_some_and(|l| {
            l.hosts == next.hosts
                && l.runtime == next.runtime
                && l.last_sync_ms == next.last_sync_ms
        });
        if !unchanged {
            let dir2 = dir.clone();
            let file = next.clone();
            let res = tokio::task::spawn_blocking(move || store(&dir2, &file)).await;
            match res {
                Ok(Ok(())) => {
                    shared.metrics.cache_writes.increment(1);
                    shared
                        .cache_index
                        .store(index, std::sync::atomic::Ordering::Relaxed);
                    next.written_at_ms = 0;
                    last = Some(next);
                }
                Ok(Err(e)) => {
                    shared.metrics.cache_write_errors.increment(1);
                    tracing::warn!(error = %e, "disk cache not written");
                }
                Err(e) => tracing::warn!(error = %e, "disk cache writer failed"),
            }
        }
        if stopping {
            return;
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(MIN_WRITE_GAP) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU16;

    use schema::ServiceName;

    use super::*;
    use crate::view::Origin;

    fn file() -> CacheFile {
        let ep = Endpoint::new(
            ServiceName::new("web").expect("name"),
            "10.0.0.1".parse().expect("ip"),
            NonZeroU16::new(80).expect("port"),
        );
        CacheFile {
            written_at_ms: 5,
            last_sync_ms: 4,
            hosts: vec![CachedHost {
                endpoint: ep.clone(),
                origin: Origin::Row {
                    owner: "10.0.0.1:7702".parse().expect("addr"),
                },
                last_check_in_ms: 3,
            }],
            runtime: vec![ep],
        }
    }

    #[test]
    fn round_trips_atomically_and_missing_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load(dir.path()).expect("no file is fine").is_none());
        store(dir.path(), &file()).expect("stored");
        assert_eq!(load(dir.path()).expect("loads"), Some(file()));
        assert!(!dir.path().join("view.cache.tmp").exists());
    }

    #[test]
    fn foreign_truncated_versioned_and_random_files_are_errors_not_panics() {
        let good = encode(&file()).expect("encodes");
        assert!(matches!(
            decode(b"{\"json\": true}"),
            Err(CacheError::Foreign)
        ));
        assert!(matches!(decode(b""), Err(CacheError::Foreign)));
        assert!(decode(&good[..good.len() - 3]).is_err());
        let mut other_version = good.clone();
        other_version[MAGIC.len()] = 99;
        assert!(matches!(
            decode(&other_version),
            Err(CacheError::Codec(CodecError::UnknownVersion(99)))
        ));
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in [1usize, 9, 64, 4096] {
            let mut junk = MAGIC.to_vec();
            junk.push(schema::codec::WIRE_VERSION);
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                junk.push(seed as u8);
            }
            let _ = decode(&junk);
        }
        // An unreadable path is an error too, not a panic.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(path(dir.path())).expect("dir in the way");
        assert!(load(dir.path()).is_err());
    }
}
