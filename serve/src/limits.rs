//! What one listener tolerates from its clients, and the check that the process can honour
//! it (enough file descriptors for `max_connections`).

use std::time::Duration;

use schema::duration;
use schema::duration::option as opt_duration;
use serde::{Deserialize, Serialize};

/// Smallest `max_header_bytes`: hyper's HTTP/1 read buffer cannot be configured below 8 KiB
/// (it asserts), and no real client needs less.
pub const MIN_HEADER_BYTES: usize = 8 * 1024;

/// File descriptors a server needs beside its client connections (listener, logs, outgoing
/// connections to a store or the registry, gossip sockets, cache files). Startup warns when
/// the file limit is below `max_connections` plus this.
pub const FD_MARGIN: u64 = 64;

/// Limits of one HTTP listener. Every field has a default, so a config file may name only the
/// ones it changes (see [`LimitsTable`] to let each component choose its own default
/// `max_connections`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Open client connections at most. At the cap a new connection closes the connection
    /// that has been idle the longest, or is refused if none is idle. Must stay below the
    /// process's file limit (`ulimit -n`), or accepting fails with "too many open files".
    pub max_connections: usize,
    /// A client must send a whole request head within this, counted from accept for the
    /// first request and from its first byte for every later one on a kept-alive connection.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// A kept-alive connection with no request in flight and no new request started is
    /// closed after this.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// A connection whose writes make no progress for this long (a client that stopped
    /// reading, or reads a byte at a time) is closed.
    #[serde(with = "duration")]
    pub write_timeout: Duration,
    /// Largest request head (HTTP/1 read buffer; HTTP/2 header list), at least 8 KiB.
    pub max_header_bytes: usize,
}

/// The default `max_connections` when a component names none (the agent API's).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits::with_max_connections(DEFAULT_MAX_CONNECTIONS)
    }
}

impl Limits {
    /// The defaults with the component's own connection cap.
    pub fn with_max_connections(max_connections: usize) -> Self {
        Limits {
            max_connections,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
        }
    }

    /// Rejects limits the listener cannot run with.
    pub fn validate(&self) -> Result<(), LimitsError> {
        if self.max_connections == 0 {
            return Err(LimitsError::NoConnections);
        }
        for (name, d) in [
            ("header_read_timeout", self.header_read_timeout),
            ("idle_timeout", self.idle_timeout),
            ("write_timeout", self.write_timeout),
        ] {
            if d.is_zero() {
                return Err(LimitsError::ZeroTimeout(name));
            }
            // Deadlines are instants: a timeout of centuries would overflow them.
            if d > Duration::from_secs(7 * 24 * 3600) {
                return Err(LimitsError::HugeTimeout(name));
            }
        }
        if self.max_header_bytes < MIN_HEADER_BYTES {
            return Err(LimitsError::HeaderBytesTooSmall(self.max_header_bytes));
        }
        if u32::try_from(self.max_header_bytes).is_err() {
            return Err(LimitsError::HeaderBytesTooLarge(self.max_header_bytes));
        }
        Ok(())
    }
}

/// A `[limits]` table as written in a config file: every field optional, filled in from the
/// component's defaults with [`LimitsTable::over`] (so the registry's default cap can differ
/// from the agent's while a file that sets only `idle_timeout` keeps either).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsTable {
    pub max_connections: Option<usize>,
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub header_read_timeout: Option<Duration>,
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub write_timeout: Option<Duration>,
    pub max_header_bytes: Option<usize>,
}

impl LimitsTable {
    /// The fields set here over `defaults`, validated.
    pub fn over(&self, defaults: Limits) -> Result<Limits, LimitsError> {
        let limits = Limits {
            max_connections: self.max_connections.unwrap_or(defaults.max_connections),
            header_read_timeout: self
                .header_read_timeout
                .unwrap_or(defaults.header_read_timeout),
            idle_timeout: self.idle_timeout.unwrap_or(defaults.idle_timeout),
            write_timeout: self.write_timeout.unwrap_or(defaults.write_timeout),
            max_header_bytes: self.max_header_bytes.unwrap_or(defaults.max_header_bytes),
        };
        limits.validate()?;
        Ok(limits)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    #[error("limits: max_connections must be at least 1")]
    NoConnections,
    #[error("limits: {0} must be longer than zero")]
    ZeroTimeout(&'static str),
    #[error("limits: {0} must be at most a week")]
    HugeTimeout(&'static str),
    #[error("limits: max_header_bytes is {0}; it must be at least {MIN_HEADER_BYTES}")]
    HeaderBytesTooSmall(usize),
    #[error("limits: max_header_bytes is {0}; it must fit in 32 bits")]
    HeaderBytesTooLarge(usize),
}

/// The process's soft limit on open files, from `/proc/self/limits` (Linux); `None` where that
/// cannot be read or says "unlimited".
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_files(&text)
}

/// The soft "Max open files" value of a `/proc/<pid>/limits` text.
pub(crate) fn parse_open_files(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let rest = line.strip_prefix("Max open files")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Warns when the file limit leaves too little room for `max_connections`: past it, accepting
/// fails and the server stops taking connections until some close.
pub(crate) fn warn_if_fd_limit_low(component: &str, limits: &Limits) {
    let Some(soft) = open_files_limit() else {
        return;
    };
    let needed = limits.max_connections as u64 + FD_MARGIN;
    if soft < needed {
        tracing::warn!(
            component,
            open_files_limit = soft,
            max_connections = limits.max_connections,
            "the open-file limit is below max_connections + {FD_MARGIN}: raise the limit (ulimit -n, LimitNOFILE=) or lower max_connections"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_a_table_keeps_the_component_default_cap() {
        Limits::default().validate().expect("defaults are valid");
        let table: LimitsTable = toml::from_str("idle_timeout = \"90s\"").expect("parses");
        let limits = table
            .over(Limits::with_max_connections(4096))
            .expect("valid");
        assert_eq!(limits.max_connections, 4096);
        assert_eq!(limits.idle_timeout, Duration::from_secs(90));
        assert_eq!(limits.header_read_timeout, Duration::from_secs(10));
    }

    #[test]
    fn limits_parse_from_toml_with_defaults_for_missing_fields() {
        let limits: Limits = toml::from_str(
            "max_connections = 10\nheader_read_timeout = \"500ms\"\nwrite_timeout = 5",
        )
        .expect("parses");
        assert_eq!(limits.max_connections, 10);
        assert_eq!(limits.header_read_timeout, Duration::from_millis(500));
        assert_eq!(limits.write_timeout, Duration::from_secs(5));
        assert_eq!(limits.idle_timeout, Duration::from_secs(60));
    }

    #[test]
    fn bad_limits_are_clear_errors() {
        let err = toml::from_str::<Limits>("max_conections = 10").expect_err("typo rejected");
        assert!(err.to_string().contains("max_conections"), "{err}");
        let err = toml::from_str::<Limits>("idle_timeout = \"soon\"").expect_err("bad duration");
        assert!(err.to_string().contains("invalid duration"), "{err}");
        let err = toml::from_str::<Limits>("idle_timeout = -1").expect_err("negative");
        assert!(err.to_string().contains("negative"), "{err}");

        let zero = LimitsTable {
            max_connections: Some(0),
            ..LimitsTable::default()
        };
        assert_eq!(
            zero.over(Limits::default()),
            Err(LimitsError::NoConnections)
        );
        let small = Limits {
            max_header_bytes: 100,
            ..Limits::default()
        };
        assert_eq!(small.validate(), Err(LimitsError::HeaderBytesTooSmall(100)));
        let no_wait = Limits {
            write_timeout: Duration::ZERO,
            ..Limits::default()
        };
        assert_eq!(
            no_wait.validate(),
            Err(LimitsError::ZeroTimeout("write_timeout"))
        );
        let forever = Limits {
            idle_timeout: Duration::from_secs(u64::MAX),
            ..Limits::default()
        };
        assert_eq!(
            forever.validate(),
            Err(LimitsError::HugeTimeout("idle_timeout"))
        );
    }

    #[test]
    fn open_files_limit_is_read_from_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             63468                63468                processes \n\
                    Max open files            256                  4096                 files     \n";
        assert_eq!(parse_open_files(text), Some(256));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_open_files(unlimited), None);
        assert_eq!(parse_open_files(""), None);
    }
}
