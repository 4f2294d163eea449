//! The epoch a starting node takes, kept growing across restarts whatever the wall clock does.
//!
//! Peers order a member's identities and rows by epoch: an identity or row with an epoch
//! below the newest they have seen for that address is a leftover of an older process and is
//! ignored. Wall-clock milliseconds at start grow across restarts only while the clock does
//! not step back; after a step back (a bad NTP source, a VM restored from a snapshot, a
//! hand-set clock) a restarted agent would be ignored by every peer until real time caught up.
//! So the last epoch is written to the agent's data dir, and a start takes
//! `max(clock, last + 1)`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The file in the data dir that holds the last epoch.
pub const FILE_NAME: &str = "gossip-epoch";
/// First line of the file: tells our file from anything else that might sit there.
const MAGIC: &str = "tidings-gossip-epoch v1";
/// The file is two short lines; anything bigger is not ours and is not read in full.
const MAX_FILE_BYTES: u64 = 128;
/// Epochs are milliseconds since 1970: a stored value above this (millions of years ahead)
/// is corrupt, and trusting it would pin the epoch near `u64::MAX`, where `+ 1` runs out.
const MAX_EPOCH: u64 = 1 << 53;

#[derive(Debug, Error)]
pub enum EpochError {
    /// The epoch was chosen but could not be made durable: this process may use it, but a
    /// restart after a clock step back is no longer protected.
    #[error("cannot persist gossip epoch {epoch} to {path}: {source}")]
    Persist {
        epoch: u64,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl EpochError {
    /// The epoch that was chosen, usable despite the error.
    pub fn epoch(&self) -> u64 {
        match self {
            EpochError::Persist { epoch, .. } => *epoch,
        }
    }
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Chooses this process's epoch from `clock_ms` (wall-clock ms, injected so tests can step
/// it) and the epoch persisted in `dir`, then persists the choice before it is used, so a
/// crash right after start cannot lose it. A missing file is normal; an unreadable, corrupt
/// or foreign one is logged and ignored.
pub fn next_epoch(dir: &Path, clock_ms: u64) -> Result<u64, EpochError> {
    let last = load(dir);
    let epoch = choose(clock_ms, last);
    if last.is_some_and(|l| l >= clock_ms) {
        tracing::warn!(
            clock_ms,
            last_epoch = last,
            epoch,
            "the wall clock is behind the last gossip epoch (stepped back?): continuing from the persisted epoch"
        );
    }
    store(dir, epoch).map_err(|source| EpochError::Persist {
        epoch,
        path: path(dir),
        source,
    })?;
    Ok(epoch)
}

/// `max(clock, last + 1)`, and at least 1 (epoch 0 addresses a seed whose identity is
/// unknown).
pub fn choose(clock_ms: u64, last: Option<u64>) -> u64 {
    let after_last = last.map_or(0, |l| l.saturating_add(1));
    clock_ms.max(after_last).max(1)
}

/// The persisted epoch, if there is a valid one.
pub fn load(dir: &Path) -> Option<u64> {
    let p = path(dir);
    let mut f = match std::fs::File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %p.display(), error = %e, "gossip epoch file unreadable, ignored");
            return None;
        }
    };
    let mut bytes = Vec::new();
    // One byte over the limit is enough to tell an oversized file.
    if let Err(e) = (&mut f).take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes) {
        tracing::warn!(path = %p.display(), error = %e, "gossip epoch file unreadable, ignored");
        return None;
    }
    let parsed = decode(&bytes);
    if parsed.is_none() {
        tracing::warn!(path = %p.display(), "gossip epoch file corrupt or foreign, ignored");
    }
    parsed
}

fn encode(epoch: u64) -> String {
    format!("{MAGIC}\n{epoch}\n")
}

fn decode(bytes: &[u8]) -> Option<u64> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return None;
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let rest = text.strip_prefix(MAGIC)?.strip_prefix('\n')?;
    let digits = rest.strip_suffix('\n')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok().filter(|e| *e <= MAX_EPOCH)
}

/// Writes atomically (temp file, fsync, rename, fsync of the directory): a crash leaves the
/// old epoch or the new one, never a torn file.
fn store(dir: &Path, epoch: u64) -> std::io::Result<()> {
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(encode(epoch).as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path(dir))?;
    // The rename is durable only once the directory entry is; not every platform can
    // open a directory for that, and the file itself is already safe.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_MS: u64 = 3_600_000;
    const NOW: u64 = 1_780_000_000_000;

    #[test]
    fn a_restart_with_the_clock_stepped_back_an_hour_still_grows_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let first = next_epoch(dir.path(), NOW).unwrap();
        assert_eq!(first, NOW);
        let second = next_epoch(dir.path(), NOW - HOUR_MS).unwrap();
        assert!(second > first, "{second} <= {first}");
        // And again: the persisted value moved too.
        let third = next_epoch(dir.path(), NOW - 2 * HOUR_MS).unwrap();
        assert!(third > second);
        // Once the clock is ahead again, it is the clock that counts.
        assert_eq!(
            next_epoch(dir.path(), NOW + HOUR_MS).unwrap(),
            NOW + HOUR_MS
        );
        assert_eq!(load(dir.path()), Some(NOW + HOUR_MS));
    }

    #[test]
    fn corrupt_foreign_huge_or_absurd_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        let huge = format!("{MAGIC}\n{}\n", "1".repeat(200));
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"\xff\xfe garbage".to_vec(),
            b"{\"epoch\": 5}".to_vec(),
            format!("{MAGIC}\n").into_bytes(),
            format!("{MAGIC}\n-5\n").into_bytes(),
            format!("{MAGIC}\n+5\n").into_bytes(),
            format!("{MAGIC}\n5").into_bytes(),
            format!("{MAGIC}\n{}\n", u64::MAX).into_bytes(),
            format!("{MAGIC}\n{}\n", MAX_EPOCH + 1).into_bytes(),
            huge.into_bytes(),
            vec![b'7'; 10 * 1024 * 1024],
        ];
        for bytes in cases {
            std::fs::write(&p, &bytes).unwrap();
            assert_eq!(
                load(dir.path()),
                None,
                "{:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
            );
            assert_eq!(next_epoch(dir.path(), NOW).unwrap(), NOW);
        }
        // A directory where the file should be: unreadable, ignored; the write then fails
        // and says which epoch was chosen.
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
        let err = next_epoch(dir.path(), NOW).unwrap_err();
        assert_eq!(err.epoch(), NOW);
    }

    #[test]
    fn the_chosen_epoch_is_never_zero_and_never_overflows() {
        assert_eq!(choose(0, None), 1);
        assert_eq!(choose(5, Some(9)), 10);
        assert_eq!(choose(50, Some(9)), 50);
        assert_eq!(choose(0, Some(u64::MAX)), u64::MAX);
    }
}
