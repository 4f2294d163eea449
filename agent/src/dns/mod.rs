//! DNS on loopback (docs/API.md#dns): the `tidings.` zone, answered from the same merged view
//! as `/v1/registration/SERVICE`, so a program that only knows how to resolve names can find
//! a service, and goes on finding it while the registry is down.
//!
//! - [`answer`]: the sans-IO core, query bytes and a view in, response bytes out (the
//!   common A/AAAA answer written directly by `fast`, equal byte for byte);
//!   [`names`]: what each name of the zone designates.
//! - [`server`]: the shell, one UDP loop on a thread of its own and a bounded TCP listener.
//!
//! Built on `hickory-proto` for the wire format, with our own loop rather than
//! `hickory-server`: its `Authority` trait answers one name lookup at a time through async
//! calls and keeps its own records; ours are a function of the published view, which changes
//! as a whole, and the size rules (TC, the cap without EDNS) are ours to enforce.
//!
//! Invariants: never recursion (names outside `tidings.` are REFUSED); over UDP without EDNS
//! an answer is at most [`answer::AMPLIFICATION`] times the query (and 512 bytes); no input
//! panics or goes unbounded (queries over [`server::MAX_QUERY`] are dropped, TCP connections
//! are counted, timed out when idle and when slow within a message).

pub mod answer;
mod fast;
pub mod names;
pub mod server;

use std::net::SocketAddr;
use std::time::Duration;

use discovery::config::duration;
use hickory_proto::op::ResponseCode;
use metrics::Counter;
use serde::{Deserialize, Serialize};
use serve::{Family, Registrar};

pub use answer::{Reply, Settings, Transport, handle};
pub use server::{Bound, bind, serve};

/// The `[dns]` section of the agent's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Serve DNS at all (flag `--dns off` turns it off).
    pub enabled: bool,
    /// Loopback address, UDP and TCP.
    pub listen: SocketAddr,
    /// TTL of every answer and of negative answers (the SOA minimum), whole seconds, 0–5 s:
    /// a resolver's cache must not hide a change for longer than gossip takes to bring it.
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// Largest UDP answer to a requester that offers EDNS (512–4096; 1232 avoids
    /// fragmentation on any path, per DNS flag day 2020).
    pub max_udp_payload: u16,
    /// TCP connections served at once; more are closed at once.
    pub max_tcp_connections: usize,
    /// A TCP connection with no query for this long is closed.
    #[serde(with = "duration")]
    pub tcp_idle_timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 7753)),
            ttl: Duration::from_secs(2),
            max_udp_payload: 1232,
            max_tcp_connections: 64,
            tcp_idle_timeout: Duration::from_secs(10),
        }
    }
}

impl DnsConfig {
    pub fn validate(&self) -> Result<(), &'static str> {
        if !self.enabled {
            return Ok(());
        }
        if !self.listen.ip().is_loopback() {
            return Err("dns.listen must be a loopback address");
        }
        if self.ttl > Duration::from_secs(5) || self.ttl.subsec_nanos() != 0 {
            return Err("dns.ttl must be whole seconds from 0 to 5");
        }
        if !(512..=4096).contains(&self.max_udp_payload) {
            return Err("dns.max_udp_payload must be from 512 to 4096");
        }
        if !(1..=4096).contains(&self.max_tcp_connections) {
            return Err("dns.max_tcp_connections must be from 1 to 4096");
        }
        if self.tcp_idle_timeout.is_zero() {
            return Err("dns.tcp_idle_timeout must be > 0");
        }
        Ok(())
    }
}

/// The `--dns` flag: where to listen, or `None` for `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsFlag(pub Option<SocketAddr>);

/// Parses the `--dns` flag: a loopback `IP:PORT` (checked with the rest of the config), or
/// `off`.
pub fn parse_flag(s: &str) -> Result<DnsFlag, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(DnsFlag(None));
    }
    s.parse()
        .map(|a| DnsFlag(Some(a)))
        .map_err(|_| format!("{s:?}: expected IP:PORT or off"))
}

/// The rcodes counted by name; any other is counted as `other`.
const RCODES: [(ResponseCode, &str); 6] = [
    (ResponseCode::NoError, "noerror"),
    (ResponseCode::FormErr, "formerr"),
    (ResponseCode::ServFail, "servfail"),
    (ResponseCode::NXDomain, "nxdomain"),
    (ResponseCode::NotImp, "notimp"),
    (ResponseCode::Refused, "refused"),
];

/// The DNS server's counters, registered with the agent's others.
pub struct DnsMetrics {
    /// Answered queries by rcode, [`RCODES`] order then `other`.
    answered: Vec<Counter>,
    truncated: Counter,
    pub dropped_oversized: Counter,
    dropped_unanswerable: Counter,
    pub dropped_tcp: Counter,
    pub tcp_refused: Counter,
}

impl DnsMetrics {
    pub fn register<R: metrics::Recorder + ?Sized>(reg: &Registrar<'_, R>) -> Self {
        const QUERIES: &str = "tidings_agent_dns_queries_total";
        const QUERIES_HELP: &str = "DNS queries answered, by rcode (refused: a name outside tidings., never recursed; nxdomain: no such service or name).";
        const DROPPED: &str = "tidings_agent_dns_dropped_total";
        const DROPPED_HELP: &str = "DNS packets or TCP connections dropped unanswered, by reason (oversized: a query over 4096 bytes; unanswerable: not a query, or shorter than a header; tcp: a TCP message out of bounds, slow or cut).";
        let queries: Family<Counter, 1> = reg.family(QUERIES, QUERIES_HELP, ["rcode"]);
        let dropped: Family<Counter, 1> = reg.family(DROPPED, DROPPED_HELP, ["reason"]);
        let answered = RCODES
            .iter()
            .map(|(_, name)| *name)
            .chain(["other"])
            .map(|name| reg.get(&queries, [name]))
            .collect();
        DnsMetrics {
            answered,
            truncated: reg.one(
                "tidings_agent_dns_truncated_total",
                "DNS answers cut to fit a UDP size limit, with TC set (the resolver retries over TCP).",
            ),
            dropped_oversized: reg.get(&dropped, ["oversized"]),
            dropped_unanswerable: reg.get(&dropped, ["unanswerable"]),
            dropped_tcp: reg.get(&dropped, ["tcp"]),
            tcp_refused: reg.one(
                "tidings_agent_dns_tcp_refused_total",
                "DNS TCP connections closed at once because max_tcp_connections were open.",
            ),
        }
    }

    /// Counts one handled query.
    pub fn count(&self, reply: &Reply) {
        if reply.bytes.is_none() {
            self.dropped_unanswerable.increment(1);
            return;
        }
        let at = RCODES
            .iter()
            .position(|(rcode, _)| *rcode == reply.rcode)
            .unwrap_or(RCODES.len());
        if let Some(c) = self.answered.get(at) {
            c.increment(1);
        }
        if reply.truncated {
            self.truncated.increment(1);
        }
    }
}

#[cfg(test)]
mod tests;
