//! Wall-clock helpers. Times travel as milliseconds since the Unix epoch; JSON shows them as
//! RFC 3339 UTC.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Environment variable naming the clock-offset file of [`unix_ms_now`]'s fault-injection hook.
pub const CLOCK_OFFSET_ENV: &str = "TIDINGS_CLOCK_OFFSET_FILE";

/// How long a read of the offset file is trusted before the file is read again.
const OFFSET_REREAD: Duration = Duration::from_millis(100);

/// The hook's state when it is switched on: the file, and the last offset read from it.
struct OffsetFile {
    path: PathBuf,
    /// (when it was read, by the monotonic clock; the offset in ms).
    last: Mutex<Option<(Instant, i64)>>,
}

impl OffsetFile {
    fn offset_ms(&self) -> i64 {
        let now = Instant::now();
        let Ok(mut last) = self.last.lock() else {
            return 0;
        };
        if let Some((at, ms)) = *last
            && now.duration_since(at) < OFFSET_REREAD
        {
            return ms;
        }
        let ms = read_offset(&self.path);
        *last = Some((now, ms));
        ms
    }
}

/// The signed millisecond offset written in `path`; 0 if it is missing or garbled.
fn read_offset(path: &std::path::Path) -> i64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// `Some` only when the environment named an offset file at the first call.
fn offset_file() -> Option<&'static OffsetFile> {
    static HOOK: OnceLock<Option<OffsetFile>> = OnceLock::new();
    HOOK.get_or_init(|| {
        std::env::var_os(CLOCK_OFFSET_ENV).map(|p| OffsetFile {
            path: PathBuf::from(p),
            last: Mutex::new(None),
        })
    })
    .as_ref()
}

/// Milliseconds since the Unix epoch, by the system clock (0 if the clock is before 1970).
///
/// Fault-injection hook, for tests that step a process's wall clock while it runs: when the
/// environment variable `TIDINGS_CLOCK_OFFSET_FILE` names a file at process start, the
/// signed number of milliseconds written in that file (e.g. `-3600000`) is added to the
/// result. The file is re-read at most every 100 ms; a missing or garbled file means an
/// offset of 0. Without the variable the hook costs one `OnceLock` read. Nothing in
/// production sets it.
pub fn unix_ms_now() -> u64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    match offset_file() {
        None => real,
        Some(f) => real.saturating_add_signed(f.offset_ms()),
    }
}

/// `2026-11-24T06:00:00.123Z`. Out-of-range values (beyond year 9999) clamp to the epoch
/// rather than fail: this is only ever used for display.
pub fn rfc3339_ms(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

/// Parses an RFC 3339 time back to epoch milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_file_is_read_and_cached() {
        let dir = std::env::temp_dir().join(format!("tidings-clock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("offset");
        let hook = OffsetFile {
            path: path.clone(),
            last: Mutex::new(None),
        };
        assert_eq!(hook.offset_ms(), 0, "missing file");
        // The missing file was cached as 0: a write inside the re-read period is not seen yet.
        *hook.last.lock().expect("lock") = None;
        std::fs::write(&path, "-3600000\n").expect("write");
        assert_eq!(hook.offset_ms(), -3_600_000);
        std::fs::write(&path, "5000").expect("write");
        assert_eq!(hook.offset_ms(), -3_600_000, "cached for 100 ms");
        let stale = Instant::now().checked_sub(OFFSET_REREAD * 2);
        if let Some(t) = stale {
            *hook.last.lock().expect("lock") = Some((t, -3_600_000));
            assert_eq!(hook.offset_ms(), 5000, "re-read after 100 ms");
        }
        std::fs::write(&path, "soon").expect("write");
        *hook.last.lock().expect("lock") = None;
        assert_eq!(hook.offset_ms(), 0, "garbled file");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn offsets_saturate_at_the_ends() {
        assert_eq!(5u64.saturating_add_signed(-10), 0);
        assert!(unix_ms_now() > 1_600_000_000_000);
    }
}
