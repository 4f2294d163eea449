//! The names of the `tidings.` zone and what each one means against a view.
//!
//! - `tidings.` the apex (SOA, NS); `ns.tidings.` the name server's own address;
//! - `SERVICE.service.tidings.` every routable host of a service;
//! - `AZ.SERVICE.service.tidings.` the hosts of one zone (`az` tag) of it;
//! - `ADDR.addr.tidings.` one address, the targets of SRV answers: `10-0-0-7` for IPv4, the
//!   32 hex digits of the address for IPv6 (a name derived from the address, so it resolves
//!   whatever the view holds by the time a resolver follows the SRV target);
//! - `service.tidings.` and `addr.tidings.` exist (empty non-terminals), nothing else does.
//!
//! A service name may hold dots, so `a.b.service.tidings.` is the service `a.b` when the view
//! lists it, else the zone `a` of the service `b`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::Name;
use schema::ServiceName;

use crate::view::MergedView;

pub const ZONE: &str = "tidings";
const SERVICE: &[u8] = b"service";
const ADDR: &[u8] = b"addr";
const NS: &[u8] = b"ns";

/// What a query name designates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Apex,
    NameServer,
    /// A name that exists with no records of its own.
    EmptyNonTerminal,
    Addr(IpAddr),
    Service {
        service: ServiceName,
        zone: Option<String>,
    },
    /// In the zone, but no such name: NXDOMAIN.
    Missing,
    /// Not ours: REFUSED (never recursion).
    Foreign,
}

/// Classifies `name` (any case) against `view`.
pub fn classify(name: &Name, view: &MergedView) -> Target {
    let labels: Vec<&[u8]> = name.iter().collect();
    let Some((last, prefix)) = labels.split_last() else {
        return Target::Foreign;
    };
    if !last.eq_ignore_ascii_case(ZONE.as_bytes()) {
        return Target::Foreign;
    }
    match prefix {
        [] => Target::Apex,
        [ns] if ns.eq_ignore_ascii_case(NS) => Target::NameServer,
        [.., kind] if kind.eq_ignore_ascii_case(SERVICE) => {
            service(&prefix[..prefix.len() - 1], view)
        }
        [.., kind] if kind.eq_ignore_ascii_case(ADDR) => match &prefix[..prefix.len() - 1] {
            [] => Target::EmptyNonTerminal,
            [label] => parse_addr(label).map_or(Target::Missing, Target::Addr),
            _ => Target::Missing,
        },
        _ => Target::Missing,
    }
}

fn service(labels: &[&[u8]], view: &MergedView) -> Target {
    if labels.is_empty() {
        return Target::EmptyNonTerminal;
    }
    let known = |labels: &[&[u8]]| {
        joined(labels)
            .and_then(|s| ServiceName::new(s).ok())
            .filter(|s| view.service(s).is_some())
    };
    if let Some(service) = known(labels) {
        return Target::Service {
            service,
            zone: None,
        };
    }
    if let [zone, rest @ ..] = labels
        && !rest.is_empty()
        && let Some(service) = known(rest)
        && let Ok(zone) = std::str::from_utf8(zone)
    {
        return Target::Service {
            service,
            zone: Some(zone.to_ascii_lowercase()),
        };
    }
    Target::Missing
}

/// The labels as one lower-case dotted string, if they are text.
fn joined(labels: &[&[u8]]) -> Option<String> {
    let mut out = String::new();
    for (i, l) in labels.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(std::str::from_utf8(l).ok()?);
    }
    Some(out.to_ascii_lowercase())
}

/// The label of an address name: `10-0-0-7`, or 32 hex digits for IPv6.
pub fn addr_label(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{a}-{b}-{c}-{d}")
        }
        IpAddr::V6(v6) => hex::encode(v6.octets()),
    }
}

/// `ADDR.addr.tidings.` for `ip`.
pub fn addr_name(ip: IpAddr) -> Name {
    let label = addr_label(ip);
    // A label of at most 32 ASCII characters under fixed labels is always a valid name.
    Name::from_labels([label.as_bytes(), ADDR, ZONE.as_bytes()]).unwrap_or_else(|_| Name::root())
}

/// The inverse of [`addr_label`]; only the canonical spelling (no leading zeros) is taken, so
/// each address has one name.
fn parse_addr(label: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(label).ok()?.to_ascii_lowercase();
    if text.len() == 32 {
        let bytes: [u8; 16] = hex::decode(&text).ok()?.try_into().ok()?;
        return Some(IpAddr::V6(Ipv6Addr::from(bytes)));
    }
    let v4: Ipv4Addr = text.replace('-', ".").parse().ok()?;
    (addr_label(IpAddr::V4(v4)) == text).then_some(IpAddr::V4(v4))
}

/// A fixed name of the zone (`ns.tidings.`, `hostmaster.tidings.`, `tidings.`).
pub fn zone_name(first: Option<&str>) -> Name {
    let labels: Vec<&[u8]> = first
        .map(str::as_bytes)
        .into_iter()
        .chain([ZONE.as_bytes()])
        .collect();
    Name::from_labels(labels).unwrap_or_else(|_| Name::root())
}
