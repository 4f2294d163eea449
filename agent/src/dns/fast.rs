//! The common answer, written without building records: the A or AAAA records of a service
//! (or one of its zones) after the query's own question, each owner name a pointer to it.
//! Building hickory `Record`s and encoding them was most of the user-space time per query
//! (perf, 1 000 services × 10 hosts). Anything else, and anything unexpected, is left to
//! [`super::answer::general`], whose output this must equal byte for byte (unit tests check).

use hickory_proto::op::{Message, OpCode};
use hickory_proto::rr::{DNSClass, RecordType};
use rand::Rng;

use super::answer::{HEADER_LEN, Settings, service_hosts, shuffled_addresses};
use super::names::{self, Target};
use crate::view::MergedView;

/// The OPT record we answer EDNS with: root name, type 41, our payload size, no extended
/// rcode, version 0, no flags, no options.
const OPT_LEN: usize = 11;
/// A compressed answer record before its address: name pointer, type, class, TTL, length.
const RR_FIXED: usize = 12;

/// The response to an A or AAAA query for a service name that has addresses of that family,
/// within `limit` bytes (cut and TC set as the general path does); `None` for anything else.
pub(super) fn addresses(
    query: &[u8],
    msg: &Message,
    view: &MergedView,
    settings: &Settings,
    limit: usize,
    rng: &mut impl Rng,
) -> Option<(Vec<u8>, bool)> {
    let [q] = msg.queries() else { return None };
    let (qtype, addr_len) = match q.query_type() {
        RecordType::A => (RecordType::A, 4),
        RecordType::AAAA => (RecordType::AAAA, 16),
        _ => return None,
    };
    let edns = match msg.extensions() {
        Some(e) if e.version() > 0 => return None,
        e => e.is_some(),
    };
    if msg.op_code() != OpCode::Query || q.query_class() != DNSClass::IN {
        return None;
    }
    let question_end = question_end(query)?;
    let Target::Service { service, zone } = names::classify(q.name(), view) else {
        return None;
    };
    let hosts = service_hosts(view, &service, zone.as_deref())?;
    let ips = shuffled_addresses(&hosts, qtype, rng);
    if ips.is_empty() {
        // NODATA carries the SOA: the general path.
        return None;
    }
    let fixed = question_end + if edns { OPT_LEN } else { 0 };
    let rr_len = RR_FIXED + addr_len;
    let fit = limit.checked_sub(fixed)? / rr_len;
    let count = ips.len().min(fit);
    let truncated = count < ips.len();
    let mut out = Vec::with_capacity(fixed + count * rr_len);
    out.extend_from_slice(&query[..2]);
    // QR, opcode QUERY, AA, TC when cut, RD echoed; RA clear, AD clear, CD echoed, NOERROR.
    out.push(0x80 | 0x04 | if truncated { 0x02 } else { 0 } | (query[2] & 0x01));
    out.push(query[3] & 0x10);
    let counts = [1, count, 0, usize::from(edns)];
    for c in counts {
        out.extend_from_slice(&u16::try_from(c).ok()?.to_be_bytes());
    }
    out.extend_from_slice(&query[HEADER_LEN..question_end]);
    let ttl = settings.ttl.to_be_bytes();
    for ip in &ips[..count] {
        out.extend_from_slice(&[0xC0, HEADER_LEN as u8]);
        out.extend_from_slice(&u16::from(qtype).to_be_bytes());
        out.extend_from_slice(&u16::from(DNSClass::IN).to_be_bytes());
        out.extend_from_slice(&ttl);
        out.extend_from_slice(&(addr_len as u16).to_be_bytes());
        match ip {
            std::net::IpAddr::V4(v4) => out.extend_from_slice(&v4.octets()),
            std::net::IpAddr::V6(v6) => out.extend_from_slice(&v6.octets()),
        }
    }
    if edns {
        let payload = settings.max_udp_payload.max(512);
        out.extend_from_slice(&[0, 0, 41]);
        out.extend_from_slice(&payload.to_be_bytes());
        out.extend_from_slice(&[0; 6]);
    }
    Some((out, truncated))
}

/// Where the question of a one-question query ends, if its name is written out in labels (a
/// compression pointer in a question is legal but odd: the general path takes it).
fn question_end(query: &[u8]) -> Option<usize> {
    let mut at = HEADER_LEN;
    loop {
        let len = usize::from(*query.get(at)?);
        if len == 0 {
            at += 1;
            break;
        }
        if len & 0xC0 != 0 {
            return None;
        }
        at += 1 + len;
    }
    let end = at + 4;
    (end <= query.len()).then_some(end)
}
