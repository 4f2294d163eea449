//! The sans-IO core: a query's bytes and a view in, a response's bytes out. No socket, no
//! clock; the randomness that shuffles answers is passed in.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use rand::Rng;
use rand::seq::SliceRandom;

use schema::ServiceName;

use super::names::{self, Target};
use crate::view::{Host, MergedView};

/// Over UDP without EDNS, an answer is at most this many times the query's size (and at
/// most 512 bytes): a forged source address gets little more back than it sent.
pub const AMPLIFICATION: usize = 10;
/// The classic UDP limit, and the least any EDNS requester is given.
const CLASSIC_UDP: usize = 512;
/// The header's size: shorter packets are dropped unanswered.
pub const HEADER_LEN: usize = 12;

/// How the query came, which bounds the answer's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The settings an answer depends on.
#[derive(Debug, Clone)]
pub struct Settings {
    /// TTL of every record, and the negative-caching TTL (the SOA minimum).
    pub ttl: u32,
    /// Largest UDP answer offered to EDNS requesters.
    pub max_udp_payload: u16,
    /// The address `ns.tidings.` resolves to: where this server listens.
    pub ns_addr: IpAddr,
}

/// What became of one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// `None`: dropped unanswered (not a query, or too short to answer).
    pub bytes: Option<Vec<u8>>,
    pub rcode: ResponseCode,
    /// The answer did not fit and was cut (TC set).
    pub truncated: bool,
}

impl Reply {
    fn dropped() -> Reply {
        Reply {
            bytes: None,
            rcode: ResponseCode::FormErr,
            truncated: false,
        }
    }
}

/// Answers `query` from `view`.
pub fn handle(
    query: &[u8],
    transport: Transport,
    view: &MergedView,
    settings: &Settings,
    rng: &mut impl Rng,
) -> Reply {
    let msg = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => return form_error(query),
    };
    if msg.message_type() != MessageType::Query {
        // Answering responses could make two servers loop.
        return Reply::dropped();
    }
    let limit = size_limit(&msg, query.len(), transport, settings);
    if let Some((bytes, truncated)) =
        super::fast::addresses(query, &msg, view, settings, limit, rng)
    {
        return Reply {
            bytes: Some(bytes),
            rcode: ResponseCode::NoError,
            truncated,
        };
    }
    general(&msg, limit, view, settings, rng)
}

/// The answer built as records and encoded by hickory-proto: every case, the fast one too.
pub(super) fn general(
    msg: &Message,
    limit: usize,
    view: &MergedView,
    settings: &Settings,
    rng: &mut impl Rng,
) -> Reply {
    let response = respond(msg, view, settings, rng);
    let rcode = response.response_code();
    match encode(response, limit) {
        Some((bytes, truncated)) => Reply {
            bytes: Some(bytes),
            rcode,
            truncated,
        },
        None => Reply::dropped(),
    }
}

/// A FORMERR for a packet that does not parse, when it is at least a header and claims to be
/// a query: the header's id and opcode, nothing else (never longer than what came).
fn form_error(query: &[u8]) -> Reply {
    let is_query = query.len() >= HEADER_LEN && query[2] & 0x80 == 0;
    if !is_query {
        return Reply::dropped();
    }
    let mut out = query[..HEADER_LEN].to_vec();
    // QR set, opcode kept, AA/TC/RD cleared except RD echoed; RA 0; rcode 1; no records.
    out[2] = 0x80 | (query[2] & 0x79);
    out[3] = ResponseCode::FormErr.low();
    out[4..HEADER_LEN].fill(0);
    Reply {
        bytes: Some(out),
        rcode: ResponseCode::FormErr,
        truncated: false,
    }
}

/// The largest answer for this query.
pub(super) fn size_limit(
    msg: &Message,
    query_len: usize,
    transport: Transport,
    s: &Settings,
) -> usize {
    match (transport, msg.extensions()) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, Some(edns)) => usize::from(edns.max_payload())
            .clamp(CLASSIC_UDP, usize::from(s.max_udp_payload).max(CLASSIC_UDP)),
        (Transport::Udp, None) => (query_len * AMPLIFICATION).min(CLASSIC_UDP),
    }
}

/// The response to a parsed query: the message as it would be with room for everything.
pub fn respond(msg: &Message, view: &MergedView, s: &Settings, rng: &mut impl Rng) -> Message {
    let mut out = Message::new();
    out.set_id(msg.id())
        .set_message_type(MessageType::Response)
        .set_op_code(msg.op_code())
        .set_recursion_desired(msg.recursion_desired())
        .set_recursion_available(false)
        .set_checking_disabled(msg.checking_disabled());
    if let Some(q) = msg.query() {
        out.add_query(q.clone());
    }
    if let Some(edns) = msg.extensions() {
        let mut ours = Edns::new();
        ours.set_max_payload(s.max_udp_payload.max(CLASSIC_UDP as u16));
        ours.set_dnssec_ok(false);
        out.set_edns(ours);
        if edns.version() > 0 {
            return with_rcode(out, ResponseCode::BADVERS);
        }
    }
    if msg.op_code() != OpCode::Query {
        return with_rcode(out, ResponseCode::NotImp);
    }
    let query = match msg.queries() {
        [q] => q,
        _ => return with_rcode(out, ResponseCode::FormErr),
    };
    if query.query_class() != DNSClass::IN {
        return with_rcode(out, ResponseCode::Refused);
    }
    let target = names::classify(query.name(), view);
    if target == Target::Foreign {
        return with_rcode(out, ResponseCode::Refused);
    }
    out.set_authoritative(true);
    if matches!(
        query.query_type(),
        RecordType::ANY | RecordType::AXFR | RecordType::IXFR
    ) {
        return with_rcode(out, ResponseCode::NotImp);
    }
    let records = Records::new(query, s);
    let found = match &target {
        Target::Missing => None,
        Target::Service { service, zone } => {
            service_hosts(view, service, zone.as_deref()).map(|hosts| records.service(&hosts, rng))
        }
        Target::Addr(ip) => Some(records.address(&[*ip])),
        Target::NameServer => Some(records.address(&[s.ns_addr])),
        Target::Apex => Some(records.apex(view)),
        Target::EmptyNonTerminal | Target::Foreign => Some(Found::default()),
    };
    match found {
        None => {
            out.add_name_server(records.soa(view));
            with_rcode(out, ResponseCode::NXDomain)
        }
        Some(found) if found.answers.is_empty() => {
            out.add_name_server(records.soa(view));
            out
        }
        Some(found) => {
            out.add_answers(found.answers);
            out.add_additionals(found.additionals);
            out
        }
    }
}

fn with_rcode(mut out: Message, rcode: ResponseCode) -> Message {
    out.set_response_code(rcode);
    out
}

/// The hosts a service name designates: all the service's, or one zone's; `None` for a zone
/// with no hosts, which is not a name (a listed service with none is).
pub(super) fn service_hosts<'v>(
    view: &'v MergedView,
    service: &ServiceName,
    zone: Option<&str>,
) -> Option<Vec<&'v Host>> {
    let hosts = view.hosts(service);
    let in_zone = |h: &&Host| {
        h.endpoint
            .tags
            .az
            .as_ref()
            .is_some_and(|az| zone.is_some_and(|z| az.as_str().eq_ignore_ascii_case(z)))
    };
    let hosts: Vec<&Host> = match zone {
        None => hosts.iter().collect(),
        Some(_) => hosts.iter().filter(in_zone).collect(),
    };
    (zone.is_none() || !hosts.is_empty()).then_some(hosts)
}

/// The addresses of `hosts` in `qtype`'s family (A: IPv4, AAAA: IPv6), each once, in a new
/// random order every answer, so clients that take the first spread over the hosts.
pub(super) fn shuffled_addresses(
    hosts: &[&Host],
    qtype: RecordType,
    rng: &mut impl Rng,
) -> Vec<IpAddr> {
    let want_v4 = qtype == RecordType::A;
    let mut ips: Vec<IpAddr> = Vec::with_capacity(hosts.len());
    for h in hosts {
        let ip = h.endpoint.ip;
        if ip.is_ipv4() == want_v4 && !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips.shuffle(rng);
    ips
}

#[derive(Debug, Default)]
struct Found {
    answers: Vec<Record>,
    additionals: Vec<Record>,
}

/// Builds the records of one answer: the query's name (as spelled) and type, one TTL.
struct Records<'q> {
    name: &'q Name,
    qtype: RecordType,
    ttl: u32,
    ns_addr: IpAddr,
}

impl<'q> Records<'q> {
    fn new(query: &'q Query, s: &Settings) -> Self {
        Records {
            name: query.name(),
            qtype: query.query_type(),
            ttl: s.ttl,
            ns_addr: s.ns_addr,
        }
    }

    fn record(&self, name: Name, rdata: RData) -> Record {
        Record::from_rdata(name, self.ttl, rdata)
    }

    /// A or AAAA of `ip` at `name`, if `qtype` asks for its family.
    fn address_record(&self, name: &Name, ip: IpAddr, qtype: RecordType) -> Option<Record> {
        match (ip, qtype) {
            (IpAddr::V4(v4), RecordType::A) => Some(self.record(name.clone(), RData::A(A(v4)))),
            (IpAddr::V6(v6), RecordType::AAAA) => {
                Some(self.record(name.clone(), RData::AAAA(AAAA(v6))))
            }
            _ => None,
        }
    }

    /// The A or AAAA record of `ip` at `name`, whatever was asked: additional data.
    fn glue(&self, name: &Name, ip: IpAddr) -> Option<Record> {
        let qtype = if ip.is_ipv4() {
            RecordType::A
        } else {
            RecordType::AAAA
        };
        self.address_record(name, ip, qtype)
    }

    fn address(&self, ips: &[IpAddr]) -> Found {
        Found {
            answers: ips
                .iter()
                .filter_map(|ip| self.address_record(self.name, *ip, self.qtype))
                .collect(),
            additionals: Vec::new(),
        }
    }

    /// A/AAAA: each address once ([`shuffled_addresses`]); SRV: each host, in a new random
    /// order per answer, its address records as additionals.
    fn service(&self, hosts: &[&Host], rng: &mut impl Rng) -> Found {
        match self.qtype {
            RecordType::A | RecordType::AAAA => {
                self.address(&shuffled_addresses(hosts, self.qtype, rng))
            }
            RecordType::SRV => {
                let mut hosts = hosts.to_vec();
                hosts.shuffle(rng);
                let mut found = Found::default();
                let mut targets: Vec<IpAddr> = Vec::new();
                for h in &hosts {
                    let ep = &h.endpoint;
                    let target = names::addr_name(ep.ip);
                    let weight = u16::from(ep.tags.load_balancing_weight.get());
                    let srv = SRV::new(0, weight, ep.port.get(), target.clone());
                    found
                        .answers
                        .push(self.record(self.name.clone(), RData::SRV(srv)));
                    if !targets.contains(&ep.ip) {
                        targets.push(ep.ip);
                        found.additionals.extend(self.glue(&target, ep.ip));
                    }
                }
                found
            }
            _ => Found::default(),
        }
    }

    fn apex(&self, view: &MergedView) -> Found {
        let ns = names::zone_name(Some("ns"));
        match self.qtype {
            RecordType::SOA => Found {
                answers: vec![self.soa(view)],
                additionals: Vec::new(),
            },
            RecordType::NS => Found {
                additionals: self.glue(&ns, self.ns_addr).into_iter().collect(),
                answers: vec![self.record(self.name.clone(), RData::NS(NS(ns)))],
            },
            _ => Found::default(),
        }
    }

    /// The zone's SOA; its minimum is the negative-caching TTL.
    fn soa(&self, view: &MergedView) -> Record {
        let soa = SOA::new(
            names::zone_name(Some("ns")),
            names::zone_name(Some("hostmaster")),
            // Moves when the view does; the low bits of its content hash.
            view.index() as u32,
            60,
            10,
            3600,
            self.ttl,
        );
        self.record(names::zone_name(None), RData::SOA(soa))
    }
}

/// The wire form of `msg` within `limit` bytes: additional records go first (no TC for them,
/// they are optional), then answers are cut to what fits and TC is set. `None` if not even
/// the header and question fit (cannot happen for a query that arrived within the limit).
fn encode(mut msg: Message, limit: usize) -> Option<(Vec<u8>, bool)> {
    if let Some(full) = emit(&msg).filter(|b| b.len() <= limit) {
        return Some((full, false));
    }
    msg.take_additionals();
    if let Some(bytes) = emit(&msg).filter(|b| b.len() <= limit) {
        return Some((bytes, false));
    }
    let answers = msg.take_answers();
    msg.take_name_servers();
    msg.set_truncated(true);
    // Binary search for the most answers that fit: each try is one encode of at most that many.
    let (mut fits, mut too_many) = (0, answers.len());
    let mut best = emit(&msg).filter(|b| b.len() <= limit)?;
    while too_many - fits > 1 {
        let mid = fits + (too_many - fits) / 2;
        *msg.answers_mut() = answers[..mid].to_vec();
        match emit(&msg).filter(|b| b.len() <= limit) {
            Some(bytes) => {
                fits = mid;
                best = bytes;
            }
            None => too_many = mid,
        }
    }
    Some((best, true))
}

fn emit(msg: &Message) -> Option<Vec<u8>> {
    let mut buf = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut buf);
    msg.emit(&mut encoder).ok()?;
    Some(buf)
}
