//! The disk cache (docs/ARCHITECTURE.md#disk-cache): the merged view, the last registry sync time and the
//! endpoints registered at runtime, so a restarted agent answers at once even while the
//! registry is down. Written atomically (temp file, fsync, rename, fsync of the directory),
//! at most once a second and only when something changed. A file that is missing, foreign,
//! of another version, truncated or corrupt is reported and ignored — never fatal.
//!
//! Reading is bounded: the file's size is checked before anything is read, and the read
//! itself stops one byte past the bound, so a huge file (or one that grows while it is
//! read) costs no memory. A bad file — oversized, foreign, of another version, truncated or
//! corrupt — is set aside as `view.cache.bad-<unix-ms>` (the newest few are kept, for a
//! post-mortem) and the agent starts from the registry and gossip.

use std::hash::Hash;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use schema::Endpoint;
use schema::codec::{self, CodecError};
use schema::timefmt::unix_ms_now;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::state::Shared;
use crate::view::{CachedHost, MergedView};

/// Identifies our files before the codec's own version byte.
const MAGIC: &[u8; 8] = b"TDNGSAC\0";
const FILE_NAME: &str = "view.cache";
/// At most one write per this period.
const MIN_WRITE_GAP: Duration = Duration::from_secs(1);
/// The default and largest cache file size: the file codec refuses a body over its limit,
/// so a larger file could never load anyway (and a view that large could not be written).
pub const MAX_BYTES: u64 = MAGIC.len() as u64 + codec::FILE_LIMIT as u64;
/// Set-aside bad files kept (the newest); older ones are deleted.
const KEEP_BAD: usize = 3;
const BAD_SUFFIX: &str = ".bad-";

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
    #[error("the cache file is {len} bytes, over the limit of {max}")]
    Oversized { len: u64, max: u64 },
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

impl CacheError {
    /// Whether the file itself is bad (and should be set aside), rather than unreadable
    /// for a reason that may pass (permissions, IO).
    pub fn is_bad_file(&self) -> bool {
        matches!(
            self,
            CacheError::Foreign | CacheError::Oversized { .. } | CacheError::Codec(_)
        )
    }
}

/// What [`store`] writes, borrowed from a published view: the same bytes as a [`CacheFile`]
/// of that content (bincode names no fields or types), without a `CachedHost` per endpoint.
#[derive(Serialize)]
pub struct CacheFileRef<'a> {
    pub written_at_ms: u64,
    pub last_sync_ms: u64,
    pub hosts: HostsOf<'a>,
    pub runtime: &'a [Endpoint],
}

/// Every host of a view, serialized as a `Vec<CachedHost>` is.
pub struct HostsOf<'a>(pub &'a MergedView);

#[derive(Serialize)]
struct CachedHostRef<'a> {
    endpoint: &'a Endpoint,
    origin: crate::view::Origin,
    last_check_in_ms: u64,
}

impl Serialize for HostsOf<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for h in self.0.all_hosts() {
            seq.serialize_element(&CachedHostRef {
                endpoint: &h.endpoint,
                origin: h.origin,
                last_check_in_ms: h.last_check_in_ms,
            })?;
        }
        seq.end()
    }
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

pub fn decode(bytes: &[u8]) -> Result<CacheFile, CacheError> {
    let body = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or(CacheError::Foreign)?;
    Ok(codec::decode_file(body)?)
}

/// Reads the cache in `dir`, refusing a file over `max` bytes without reading it;
/// `Ok(None)` when there is none yet.
pub fn load(dir: &Path, max: u64) -> Result<Option<CacheFile>, CacheError> {
    let p = path(dir);
    let rerr = |source| CacheError::Read {
        path: p.clone(),
        source,
    };
    let f = match std::fs::File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(rerr(source)),
    };
    let len = f.metadata().map_err(rerr)?.len();
    if len > max {
        return Err(CacheError::Oversized { len, max });
    }
    // The size may change between the check and the read: read at most one byte past the
    // bound, whatever the file does meanwhile.
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(rerr)?;
    let read = bytes.len() as u64;
    if read > max {
        return Err(CacheError::Oversized { len: read, max });
    }
    decode(&bytes).map(Some)
}

/// Renames a bad cache file to `view.cache.bad-<now_ms>` and deletes all but the newest
/// [`KEEP_BAD`] such files. Returns the new name.
pub fn set_aside(dir: &Path, now_ms: u64) -> std::io::Result<PathBuf> {
    let to = dir.join(format!("{FILE_NAME}{BAD_SUFFIX}{now_ms}"));
    std::fs::rename(path(dir), &to)?;
    let prefix = format!("{FILE_NAME}{BAD_SUFFIX}");
    let mut bad: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            let ms = name.to_str()?.strip_prefix(&prefix)?.parse().ok()?;
            Some((ms, e.path()))
        })
        .collect();
    bad.sort();
    let excess = bad.len().saturating_sub(KEEP_BAD);
    for (_, old) in bad.into_iter().take(excess) {
        // Best effort: a file left behind only costs disk space.
        let _ = std::fs::remove_file(old);
    }
    Ok(to)
}

/// Writes atomically: a reader (or a crash) sees the old file or the new one, never a mix.
/// A file over `max` bytes is not written: the next start would refuse it. `file` is a
/// [`CacheFile`] or a [`CacheFileRef`]; it is encoded straight into the file.
pub fn store<T: Serialize>(dir: &Path, file: &T, max: u64) -> Result<(), CacheError> {
    let target = path(dir);
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let werr = |source| CacheError::Write {
        path: tmp.clone(),
        source,
    };
    let f = std::fs::File::create(&tmp).map_err(werr)?;
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, f);
    let body_max = usize::try_from(max.saturating_sub(MAGIC.len() as u64)).unwrap_or(usize::MAX);
    let written = out
        .write_all(MAGIC)
        .map_err(werr)
        .and_then(|()| match codec::encode_file_to(file, &mut out, body_max) {
            Ok(_) => Ok(()),
            Err(CodecError::TooLarge { len, .. }) => Err(CacheError::Oversized {
                len: (MAGIC.len() + len) as u64,
                max,
            }),
            Err(e) => Err(e.into()),
        })
        .and_then(|()| out.into_inner().map_err(|e| werr(e.into_error())))
        .and_then(|f| f.sync_all().map_err(werr));
    if let Err(e) = written {
        // Best effort: a stale temp file is replaced by the next write.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
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

/// A digest of what a write would store, its date aside: the writer keeps this instead of
/// a copy of the last file it wrote (one `CachedHost` per endpoint).
pub fn content_digest(view: &MergedView, runtime: &[Endpoint], last_sync_ms: u64) -> [u8; 32] {
    let mut h = crate::view::Sha256Hasher(Sha256::new());
    view.len().hash(&mut h);
    for host in view.all_hosts() {
        host.endpoint.hash(&mut h);
        host.origin.hash(&mut h);
        host.last_check_in_ms.hash(&mut h);
    }
    runtime.hash(&mut h);
    last_sync_ms.hash(&mut h);
    h.0.finalize().into()
}

/// Writes the cache whenever the view or the runtime endpoints change, at most once a
/// second, and once more on the way out.
pub async fn run_writer(shared: Arc<Shared>, stop: CancellationToken) {
    let dir = shared.config.data_dir.clone();
    let max = shared.config.cache_max_bytes;
    let mut view = shared.view.clone();
    let mut local = shared.local_version.subscribe();
    let mut last: Option<[u8; 32]> = None;
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            r = view.changed() => r.is_err(),
            r = local.changed() => r.is_err(),
        };
        let current = shared.current_view();
        let last_sync_ms = shared.known_current_ms();
        let runtime: Vec<Endpoint> = shared.local().runtime.values().cloned().collect();
        let digest = content_digest(&current, &runtime, last_sync_ms);
        if last != Some(digest) {
            let dir2 = dir.clone();
            let index = current.index();
            let view = current.clone();
            let res = tokio::task::spawn_blocking(move || {
                let file = CacheFileRef {
                    written_at_ms: unix_ms_now(),
                    last_sync_ms,
                    hosts: HostsOf(&view),
                    runtime: &runtime,
                };
                store(&dir2, &file, max)
            })
            .await;
            match res {
                Ok(Ok(())) => {
                    shared.metrics.cache_writes.increment(1);
                    shared
                        .cache_index
                        .store(index, std::sync::atomic::Ordering::Relaxed);
                    last = Some(digest);
                }
                Ok(Err(e)) => {
                    shared.metrics.cache_write_errors.increment(1);
                    tracing::warn!(error = %e, "disk cache not written");
                }
                Err(e) => tracing::warn!(error = %e, "disk cache writer failed"),
            }
        }
        drop(current);
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

    /// A whole file in memory, the form `load` reads: the oracle for what `store` writes
    /// (the writer itself encodes straight into the file).
    fn encode(file: &CacheFile) -> Result<Vec<u8>, CacheError> {
        let mut out = MAGIC.to_vec();
        out.extend(codec::encode_file(file)?);
        Ok(out)
    }

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
                endpoint: ep.clone().into(),
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
        assert!(
            load(dir.path(), MAX_BYTES)
                .expect("no file is fine")
                .is_none()
        );
        store(dir.path(), &file(), MAX_BYTES).expect("stored");
        assert_eq!(load(dir.path(), MAX_BYTES).expect("loads"), Some(file()));
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
        let err = load(dir.path(), MAX_BYTES).expect_err("a directory is no cache");
        assert!(
            !err.is_bad_file(),
            "an IO error is not the file's fault: {err}"
        );
    }

    /// Every kind of bad file, as found on disk: refused with its reason, and then set
    /// aside so the next start does not trip over it again.
    #[test]
    fn bad_files_are_refused_by_kind_and_set_aside() {
        let good = encode(&file()).expect("encodes");
        let mut other_version = good.clone();
        other_version[MAGIC.len()] = 99;
        let cases: [(&str, Vec<u8>); 4] = [
            ("truncated", good[..good.len() - 3].to_vec()),
            ("garbage", b"GIF89a not a cache at all".to_vec()),
            ("other version", other_version),
            ("empty", Vec::new()),
        ];
        for (what, bytes) in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(path(dir.path()), &bytes).expect("written");
            let err = load(dir.path(), MAX_BYTES).expect_err(what);
            assert!(err.is_bad_file(), "{what}: {err}");
            let moved = set_aside(dir.path(), 42).expect("set aside");
            assert_eq!(moved, dir.path().join("view.cache.bad-42"));
            assert!(!path(dir.path()).exists(), "{what}: still in place");
            assert_eq!(std::fs::read(&moved).expect("kept"), bytes, "{what}");
            assert!(load(dir.path(), MAX_BYTES).expect(what).is_none());
        }
    }

    /// An oversized file is refused from its size, before a byte is read: a sparse 1 GiB
    /// file (no disk used) would otherwise take a GiB of memory.
    #[test]
    fn oversized_files_are_refused_unread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = std::fs::File::create(path(dir.path())).expect("created");
        f.set_len(1 << 30).expect("sparse");
        drop(f);
        let err = load(dir.path(), MAX_BYTES).expect_err("too big");
        assert!(
            matches!(err, CacheError::Oversized { len, max } if len == 1 << 30 && max == MAX_BYTES),
            "{err}"
        );
        assert!(err.is_bad_file());
        // A good file over a smaller configured bound is refused too, and never written.
        store(dir.path(), &file(), MAX_BYTES).expect("stored");
        assert!(matches!(
            load(dir.path(), 16),
            Err(CacheError::Oversized { max: 16, .. })
        ));
        assert!(matches!(
            store(dir.path(), &file(), 16),
            Err(CacheError::Oversized { max: 16, .. })
        ));
    }

    #[test]
    fn only_the_newest_bad_files_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        for ms in [5u64, 1, 4, 2, 3] {
            std::fs::write(path(dir.path()), ms.to_string()).expect("written");
            set_aside(dir.path(), ms).expect("set aside");
        }
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["view.cache.bad-3", "view.cache.bad-4", "view.cache.bad-5"]
        );
    }

    /// The writer stores a view through `CacheFileRef` without building a `CacheFile`; the
    /// file must be byte for byte the one a `CacheFile` of the same content makes, or a
    /// restart would refuse (or misread) every cache written since.
    #[test]
    fn a_file_stored_from_a_view_is_the_file_of_its_hosts() {
        let me: std::net::SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let mut f = file();
        let other = Endpoint::new(
            ServiceName::new("api").expect("name"),
            "10.0.0.2".parse().expect("ip"),
            NonZeroU16::new(81).expect("port"),
        );
        f.hosts.push(CachedHost {
            endpoint: other.into(),
            origin: Origin::Registry { generated_at_ms: 9 },
            last_check_in_ms: 8,
        });
        let view = crate::view::Merger::new(me, u64::MAX, f.hosts.clone())
            .merge(&gossip::GossipView::default(), 0);
        // The view holds its cached hosts by service: the file lists them in that order.
        let owned = CacheFile {
            hosts: view
                .all_hosts()
                .map(|h| CachedHost {
                    endpoint: h.endpoint.clone(),
                    origin: h.origin,
                    last_check_in_ms: h.last_check_in_ms,
                })
                .collect(),
            ..f.clone()
        };
        assert_eq!(owned.hosts.len(), 2);
        let borrowed = CacheFileRef {
            written_at_ms: f.written_at_ms,
            last_sync_ms: f.last_sync_ms,
            hosts: HostsOf(&view),
            runtime: &f.runtime,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        store(dir.path(), &borrowed, MAX_BYTES).expect("stores");
        let bytes = std::fs::read(path(dir.path())).expect("reads");
        assert_eq!(bytes, encode(&owned).expect("encodes"));
        assert_eq!(load(dir.path(), MAX_BYTES).expect("loads"), Some(owned));
    }

    /// A write past the size limit stops there: the old file stays whole and no temp file
    /// is left behind.
    #[test]
    fn a_write_over_the_limit_keeps_the_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let small = file();
        store(dir.path(), &small, MAX_BYTES).expect("stores");
        let mut big = small.clone();
        big.runtime = vec![small.runtime[0].clone(); 1000];
        let len = encode(&big).expect("encodes").len() as u64;
        let err = store(dir.path(), &big, len - 1).expect_err("over the limit");
        assert!(
            matches!(err, CacheError::Oversized { max, .. } if max == len - 1),
            "{err}"
        );
        store(dir.path(), &big, len).expect("exactly at the limit");
        assert_eq!(load(dir.path(), len).expect("loads"), Some(big));
        let err = store(dir.path(), &small.clone(), 3).expect_err("shorter than the magic");
        assert!(matches!(err, CacheError::Oversized { .. }), "{err}");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        assert_eq!(names, ["view.cache"]);
    }

    /// The writer's digest tells apart every change a write would store, and nothing else.
    #[test]
    fn the_digest_moves_with_what_a_write_stores() {
        let me: std::net::SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let view_of = |hosts: Vec<CachedHost>| {
            crate::view::Merger::new(me, u64::MAX, hosts).merge(&gossip::GossipView::default(), 0)
        };
        let f = file();
        let base = content_digest(&view_of(f.hosts.clone()), &f.runtime, 4);
        assert_eq!(
            base,
            content_digest(&view_of(f.hosts.clone()), &f.runtime, 4)
        );
        assert_ne!(
            base,
            content_digest(&view_of(f.hosts.clone()), &f.runtime, 5)
        );
        assert_ne!(base, content_digest(&view_of(f.hosts.clone()), &[], 4));
        let mut later = f.hosts.clone();
        later[0].last_check_in_ms += 1;
        assert_ne!(base, content_digest(&view_of(later), &f.runtime, 4));
        let mut other = f.hosts.clone();
        other[0].origin = Origin::Registry { generated_at_ms: 1 };
        assert_ne!(base, content_digest(&view_of(other), &f.runtime, 4));
        assert_ne!(base, content_digest(&view_of(Vec::new()), &f.runtime, 4));
    }
}
