use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU16;
use std::sync::Arc;

use gossip::{GossipView, Snapshot, SnapshotEntry, Source, ViewEntry};
use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use schema::{Endpoint, ServiceName, TagValue, Weight};

use super::answer::{AMPLIFICATION, Settings, Transport, handle};
use super::names::{Target, addr_name, classify};
use crate::view::{MergedView, Merger};

/// (service, ip, port, az, weight)
type Spec<'a> = (&'a str, &'a str, u16, Option<&'a str>, u8);

fn endpoint(&(svc, ip, port, az, weight): &Spec<'_>) -> Endpoint {
    let mut ep = Endpoint::new(
        ServiceName::new(svc).expect("name"),
        ip.parse().expect("ip"),
        NonZeroU16::new(port).expect("port"),
    );
    ep.tags.az = az.map(|a| TagValue::new(a).expect("az"));
    ep.tags.load_balancing_weight = Weight::new(u64::from(weight)).expect("weight");
    ep
}

/// A gossip view in which the registry lists `specs` (and every service named in `empty`
/// with no hosts), `deregistered` naming tombstoned keys.
fn gossip(specs: &[Spec<'_>], empty: &[&str], deregistered: &[Spec<'_>]) -> GossipView {
    let mut services: Vec<&str> = specs
        .iter()
        .map(|s| s.0)
        .chain(empty.iter().copied())
        .collect();
    services.sort_unstable();
    services.dedup();
    let snapshots = services
        .iter()
        .map(|svc| {
            let entries = specs
                .iter()
                .filter(|s| s.0 == *svc)
                .map(|s| SnapshotEntry {
                    endpoint: endpoint(s).into(),
                    last_check_in_ms: 1,
                })
                .collect();
            Arc::new(Snapshot {
                service: ServiceName::new(*svc).expect("name"),
                generated_at_ms: 1_000,
                entries,
            })
        })
        .collect();
    let endpoints: Vec<ViewEntry> = specs
        .iter()
        .map(|s| ViewEntry {
            endpoint: endpoint(s).into(),
            source: Source::Registry {
                generated_at_ms: 1_000,
                last_check_in_ms: 1,
            },
        })
        .collect();
    GossipView {
        endpoints: endpoints.into(),
        snapshots,
        members: Vec::new(),
        deregistered: deregistered.iter().map(|s| endpoint(s).key()).collect(),
    }
}

fn view(specs: &[Spec<'_>]) -> MergedView {
    Merger::new("127.0.0.1:1".parse().expect("addr"), 0, Vec::new())
        .merge(&gossip(specs, &["empty"], &[]), 5)
}

const FLEET: [Spec<'static>; 6] = [
    ("web", "10.0.0.1", 8080, Some("zone-a"), 100),
    ("web", "10.0.0.2", 8080, Some("zone-b"), 30),
    ("web", "10.0.0.2", 8081, Some("zone-b"), 30),
    ("web", "2001:db8::7", 8080, Some("zone-a"), 100),
    ("a.b", "10.0.1.1", 53, None, 100),
    ("b", "10.0.2.1", 80, Some("a"), 100),
];

fn settings() -> Settings {
    Settings {
        ttl: 2,
        max_udp_payload: 1232,
        ns_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

fn query_bytes(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut q = Message::new();
    q.set_id(4242).set_recursion_desired(true);
    q.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        q.set_edns(e);
    }
    q.to_vec().expect("encode")
}

fn ask_on(
    view: &MergedView,
    name: &str,
    qtype: RecordType,
    edns: Option<u16>,
    t: Transport,
) -> (Message, usize) {
    let bytes = query_bytes(name, qtype, edns);
    let reply = handle(&bytes, t, view, &settings(), &mut StdRng::seed_from_u64(1));
    let out = reply.bytes.expect("answered");
    let msg = Message::from_vec(&out).expect("decodes");
    assert_eq!(msg.truncated(), reply.truncated);
    assert_eq!(msg.response_code(), reply.rcode);
    (msg, out.len())
}

fn ask(view: &MergedView, name: &str, qtype: RecordType) -> Message {
    ask_on(view, name, qtype, Some(1232), Transport::Udp).0
}

fn ips(msg: &Message) -> Vec<String> {
    let mut out: Vec<String> = msg
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_and_aaaa_list_each_routable_address_once_authoritatively() {
    let v = view(&FLEET);
    let m = ask(&v, "web.service.tidings.", RecordType::A);
    assert_eq!(m.message_type(), MessageType::Response);
    assert_eq!(m.id(), 4242);
    assert!(m.authoritative() && m.recursion_desired() && !m.recursion_available());
    assert_eq!(ips(&m), ["10.0.0.1", "10.0.0.2"]);
    assert!(m.answers().iter().all(|r| r.ttl() == 2));
    assert!(m.extensions().is_some(), "EDNS answered with EDNS");
    let m = ask(&v, "WEB.Service.TIDINGS.", RecordType::AAAA);
    assert_eq!(ips(&m), ["2001:db8::7"]);
    assert_eq!(
        m.queries()[0].name().to_ascii(),
        "WEB.Service.TIDINGS.",
        "the question as asked"
    );
}

#[test]
fn srv_carries_port_weight_and_targets_that_resolve_in_the_zone() {
    let v = view(&FLEET);
    let m = ask(&v, "web.service.tidings.", RecordType::SRV);
    let mut srvs: Vec<(u16, u16, String)> = m
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::SRV(s) => Some((s.port(), s.weight(), s.target().to_ascii())),
            _ => None,
        })
        .collect();
    srvs.sort();
    assert_eq!(
        srvs,
        [
            (8080, 30, "10-0-0-2.addr.tidings.".to_string()),
            (8080, 100, "10-0-0-1.addr.tidings.".to_string()),
            (
                8080,
                100,
                "20010db8000000000000000000000007.addr.tidings.".to_string()
            ),
            (8081, 30, "10-0-0-2.addr.tidings.".to_string()),
        ]
    );
    assert_eq!(m.additionals().len(), 3, "one address record per target");
    for (target, ip) in [
        ("10-0-0-2.addr.tidings.", "10.0.0.2"),
        (
            "20010DB8000000000000000000000007.addr.tidings.",
            "2001:db8::7",
        ),
    ] {
        let qtype = if ip.contains(':') {
            RecordType::AAAA
        } else {
            RecordType::A
        };
        assert_eq!(ips(&ask(&v, target, qtype)), [ip], "{target}");
    }
    assert_eq!(
        addr_name("10.0.0.2".parse().expect("ip")).to_ascii(),
        "10-0-0-2.addr.tidings."
    );
    // Only the canonical spelling of an address is a name.
    let m = ask(&v, "010-0-0-2.addr.tidings.", RecordType::A);
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
}

#[test]
fn a_zone_name_lists_that_zone_only_and_dotted_service_names_win() {
    let v = view(&FLEET);
    assert_eq!(
        ips(&ask(&v, "zone-b.web.service.tidings.", RecordType::A)),
        ["10.0.0.2"]
    );
    assert_eq!(
        ips(&ask(&v, "ZONE-A.web.service.tidings.", RecordType::A)),
        ["10.0.0.1"]
    );
    let m = ask(&v, "zone-c.web.service.tidings.", RecordType::A);
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
    // `a.b` is a service, so this is it rather than zone `a` of `b`.
    assert_eq!(
        ips(&ask(&v, "a.b.service.tidings.", RecordType::A)),
        ["10.0.1.1"]
    );
    assert_eq!(
        classify(&Name::from_ascii("a.b.service.tidings.").expect("name"), &v),
        Target::Service {
            service: ServiceName::new("a.b").expect("name"),
            zone: None
        }
    );
    assert_eq!(
        classify(
            &Name::from_ascii("x.a.b.service.tidings.").expect("name"),
            &v
        ),
        Target::Service {
            service: ServiceName::new("a.b").expect("name"),
            zone: Some("x".into())
        }
    );
    assert_eq!(
        ips(&ask(&v, "b.service.tidings.", RecordType::A)),
        ["10.0.2.1"]
    );
}

#[test]
fn missing_names_are_nxdomain_with_the_soa_for_negative_caching() {
    let v = view(&FLEET);
    for name in [
        "nope.service.tidings.",
        "x.tidings.",
        "a.b.c.addr.tidings.",
        "web.service.x.tidings.",
    ] {
        let m = ask(&v, name, RecordType::A);
        assert_eq!(m.response_code(), ResponseCode::NXDomain, "{name}");
        assert!(m.answers().is_empty());
        let soa = m.name_servers().first().expect("SOA in authority");
        let RData::SOA(s) = soa.data() else {
            panic!("not a SOA: {soa:?}")
        };
        assert_eq!((s.minimum(), soa.ttl()), (2, 2), "negative TTL");
        assert_eq!(soa.name().to_ascii(), "tidings.");
    }
    // Names that exist without records of the asked type: NOERROR, no answers, the SOA.
    for (name, qtype) in [
        ("service.tidings.", RecordType::A),
        ("addr.tidings.", RecordType::A),
        ("web.service.tidings.", RecordType::TXT),
        ("a.b.service.tidings.", RecordType::AAAA),
        ("tidings.", RecordType::A),
    ] {
        let m = ask(&v, name, qtype);
        assert_eq!(m.response_code(), ResponseCode::NoError, "{name}");
        assert!(m.answers().is_empty(), "{name}");
        assert_eq!(m.name_servers().len(), 1, "{name}");
    }
}

#[test]
fn the_apex_has_soa_and_ns_and_the_name_server_resolves() {
    let v = view(&FLEET);
    let m = ask(&v, "tidings.", RecordType::SOA);
    assert!(matches!(m.answers()[0].data(), RData::SOA(_)));
    let m = ask(&v, "tidings.", RecordType::NS);
    let RData::NS(ns) = m.answers()[0].data() else {
        panic!("NS")
    };
    assert_eq!(ns.0.to_ascii(), "ns.tidings.");
    assert_eq!(m.additionals().len(), 1, "the name server's address");
    assert_eq!(ips(&ask(&v, "ns.tidings.", RecordType::A)), ["127.0.0.1"]);
}

#[test]
fn other_zones_are_refused_and_never_recursed() {
    let v = view(&FLEET);
    for name in [
        "example.com.",
        ".",
        "tidings.com.",
        "web.service.tidings.example.",
    ] {
        let m = ask(&v, name, RecordType::A);
        assert_eq!(m.response_code(), ResponseCode::Refused, "{name}");
        assert!(m.answers().is_empty() && m.name_servers().is_empty() && !m.recursion_available());
        assert!(!m.authoritative());
    }
    let m = ask(&v, "web.service.tidings.", RecordType::ANY);
    assert_eq!(m.response_code(), ResponseCode::NotImp);
}

#[test]
fn answers_are_shuffled_per_answer() {
    let specs: Vec<Spec<'static>> = (1..=20u8)
        .map(|i| {
            (
                "big",
                Box::leak(format!("10.1.0.{i}").into_boxed_str()) as &str,
                80,
                None,
                100,
            )
        })
        .collect();
    let v = view(&specs);
    let bytes = query_bytes("big.service.tidings.", RecordType::A, Some(1232));
    let mut rng = StdRng::seed_from_u64(7);
    let firsts: std::collections::BTreeSet<String> = (0..50)
        .map(|_| {
            let out = handle(&bytes, Transport::Udp, &v, &settings(), &mut rng);
            let m = Message::from_vec(&out.bytes.expect("answer")).expect("decodes");
            assert_eq!(m.answers().len(), 20);
            format!("{:?}", m.answers()[0].data())
        })
        .collect();
    assert!(firsts.len() > 5, "the first address varies: {firsts:?}");
}

fn many(n: u16) -> MergedView {
    let specs: Vec<Spec<'static>> = (0..n)
        .map(|i| {
            let ip = format!("10.2.{}.{}", i / 250, i % 250 + 1);
            ("many", &*Box::leak(ip.into_boxed_str()), 80, None, 100)
        })
        .collect();
    view(&specs)
}

#[test]
fn udp_answers_are_capped_and_marked_truncated_tcp_ones_are_whole() {
    let v = many(300);
    let name = "many.service.tidings.";
    // Without EDNS: at most AMPLIFICATION × the query, and 512.
    let q = query_bytes(name, RecordType::A, None).len();
    let (m, len) = ask_on(&v, name, RecordType::A, None, Transport::Udp);
    assert!(
        m.truncated() && len <= (q * AMPLIFICATION).min(512),
        "{len}"
    );
    assert!(!m.answers().is_empty(), "as many as fit");
    assert!(m.extensions().is_none());
    // With EDNS: the requester's size, up to ours.
    let (m, len) = ask_on(&v, name, RecordType::A, Some(4096), Transport::Udp);
    assert!(m.truncated() && len <= 1232 && len > 1100, "{len}");
    let (m, len) = ask_on(&v, name, RecordType::A, Some(100), Transport::Udp);
    assert!(
        m.truncated() && len <= 512,
        "below 512 counts as 512: {len}"
    );
    let (m, _) = ask_on(&v, name, RecordType::A, None, Transport::Tcp);
    assert!(!m.truncated());
    assert_eq!(m.answers().len(), 300);
    // SRV: the additional records go first, without TC.
    let v = many(8);
    let (m, _) = ask_on(&v, name, RecordType::SRV, None, Transport::Udp);
    assert!(!m.truncated());
    assert_eq!(m.answers().len(), 8);
    assert!(m.additionals().is_empty());
    let (m, _) = ask_on(&v, name, RecordType::SRV, Some(1232), Transport::Udp);
    assert_eq!((m.answers().len(), m.additionals().len()), (8, 8));
}

#[test]
fn draining_hosts_are_omitted() {
    let up = ("web", "10.0.0.1", 80, None, 100);
    let gone = ("web", "10.0.0.9", 80, None, 100);
    let mut m = Merger::new("127.0.0.1:1".parse().expect("addr"), 0, Vec::new());
    let first = m.merge(&gossip(&[up, gone], &[], &[]), 5);
    assert_eq!(
        ips(&ask(&first, "web.service.tidings.", RecordType::A)),
        ["10.0.0.1", "10.0.0.9"]
    );
    let second = m.merge(&gossip(&[up], &[], &[gone]), 6);
    assert_eq!(
        second
            .draining(&ServiceName::new("web").expect("name"))
            .len(),
        1
    );
    assert_eq!(
        ips(&ask(&second, "web.service.tidings.", RecordType::A)),
        ["10.0.0.1"]
    );
}

#[test]
fn edns_versions_above_zero_get_badvers() {
    let v = view(&FLEET);
    let mut q = Message::from_vec(&query_bytes(
        "web.service.tidings.",
        RecordType::A,
        Some(1232),
    ))
    .expect("q");
    q.extensions_mut().as_mut().expect("edns").set_version(1);
    let out = handle(
        &q.to_vec().expect("enc"),
        Transport::Udp,
        &v,
        &settings(),
        &mut StdRng::seed_from_u64(1),
    );
    let m = Message::from_vec(&out.bytes.expect("answer")).expect("decodes");
    // BADVERS (16) needs the OPT record's high bits; hickory decodes 16 as BADSIG, its twin.
    assert_eq!(u16::from(m.response_code()), 16);
}

#[test]
fn bad_packets_never_panic_and_never_get_more_back_than_they_sent() {
    let v = many(50);
    let s = settings();
    let mut rng = StdRng::seed_from_u64(99);
    let seed: u64 = rand::random();
    let check = |packet: &[u8], rng: &mut StdRng| {
        let out = handle(packet, Transport::Udp, &v, &s, rng);
        if let Some(b) = &out.bytes {
            // Up to what an EDNS requester offered to take, else the cap.
            let edns = Message::from_vec(packet).is_ok_and(|m| m.extensions().is_some());
            let cap = if edns {
                1232
            } else {
                (packet.len() * AMPLIFICATION).clamp(12, 512)
            };
            assert!(b.len() <= cap, "seed {seed}: {packet:?}");
            if out.rcode == ResponseCode::FormErr {
                assert!(b.len() <= packet.len(), "seed {seed}: {packet:?}");
            }
        }
    };
    // Every prefix of a real query.
    let q = query_bytes("many.service.tidings.", RecordType::A, Some(1232));
    for n in 0..q.len() {
        check(&q[..n], &mut rng);
    }
    // A question name that points at itself, and two that point at each other.
    let mut header = q[..12].to_vec();
    header[4..6].copy_from_slice(&1u16.to_be_bytes());
    header[10..12].fill(0);
    for name in [
        vec![0xC0, 12],
        vec![0xC0, 14, 0xC0, 12],
        vec![3, b'a', b'b', b'c', 0xC0, 12],
    ] {
        let mut p = header.clone();
        p.extend_from_slice(&name);
        p.extend_from_slice(&[0, 1, 0, 1]);
        let out = handle(&p, Transport::Udp, &v, &s, &mut rng);
        assert_eq!(out.rcode, ResponseCode::FormErr, "{p:?}");
        check(&p, &mut rng);
    }
    // A response is never answered.
    let mut r = q.clone();
    r[2] |= 0x80;
    assert!(handle(&r, Transport::Udp, &v, &s, &mut rng).bytes.is_none());
    // Random packets, and random bytes after a valid header.
    let mut fuzz = StdRng::seed_from_u64(seed);
    for i in 0..5_000 {
        let len = fuzz.random_range(0..600);
        let mut p: Vec<u8> = (0..len).map(|_| fuzz.random()).collect();
        if i % 2 == 0 && p.len() >= 12 {
            p[..12].copy_from_slice(&q[..12]);
        }
        check(&p, &mut rng);
    }
    // Mutations of a valid query.
    for _ in 0..5_000 {
        let mut p = q.clone();
        for _ in 0..fuzz.random_range(1..4) {
            let at = fuzz.random_range(0..p.len());
            p[at] = fuzz.random();
        }
        check(&p, &mut rng);
    }
}

#[test]
fn the_fast_path_writes_exactly_what_the_general_path_encodes() {
    let mut specs: Vec<Spec<'static>> = FLEET.to_vec();
    for i in 0..200u16 {
        let ip = Box::leak(format!("10.3.{}.{}", i / 200, i % 200 + 1).into_boxed_str());
        let ip6 = Box::leak(format!("2001:db8::{:x}", i + 1).into_boxed_str());
        specs.push((
            "many",
            ip,
            80,
            Some(if i % 3 == 0 { "zone-a" } else { "zone-b" }),
            100,
        ));
        specs.push(("many", ip6, 81, None, 100));
    }
    let v = view(&specs);
    let s = settings();
    let mut fast_taken = 0;
    for name in [
        "web.service.tidings.",
        "WeB.SERVICE.tidings.",
        "zone-a.web.service.tidings.",
        "many.service.tidings.",
        "zone-a.many.service.tidings.",
        "a.b.service.tidings.",
        "nope.service.tidings.",
        "10-0-0-1.addr.tidings.",
    ] {
        for qtype in [RecordType::A, RecordType::AAAA, RecordType::SRV] {
            for edns in [None, Some(512), Some(1232), Some(4096)] {
                for t in [Transport::Udp, Transport::Tcp] {
                    let bytes = query_bytes(name, qtype, edns);
                    let msg = Message::from_vec(&bytes).expect("query");
                    let limit = super::answer::size_limit(&msg, bytes.len(), t, &s);
                    let general =
                        super::answer::general(&msg, limit, &v, &s, &mut StdRng::seed_from_u64(3));
                    let fast = super::fast::addresses(
                        &bytes,
                        &msg,
                        &v,
                        &s,
                        limit,
                        &mut StdRng::seed_from_u64(3),
                    );
                    if let Some((fast, truncated)) = fast {
                        fast_taken += 1;
                        let label = format!("{name} {qtype} {edns:?} {t:?}");
                        assert_eq!(Some(fast), general.bytes, "{label}");
                        assert_eq!(truncated, general.truncated, "{label}");
                    }
                }
            }
        }
    }
    assert!(fast_taken >= 40, "{fast_taken}");
}
