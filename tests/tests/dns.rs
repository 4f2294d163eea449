//! The agent's DNS (docs/API.md#dns) as a resolver sees it: real `tidings` processes on their
//! own loopback addresses, queried with `dig` (Debian's bind9-dnsutils, installed by
//! ops/test.sh) and with hickory-resolver, a resolver library not written here. Answers come
//! from the same view as `/v1/registration/SERVICE`, through a registry SIGKILL, a host
//! joining by gossip and one deregistering; hostile packets and TCP clients cannot take the
//! server down.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{Resolver, TokioResolver};
use rand::{RngExt, SeedableRng};
use tests::fleet::{self, Agent, lookup};
use tests::{START, http, poll};

/// The gossip delay a new host must be seen within (as tests/tests/agent.rs asks of the API).
const GOSSIP_DELAY: Duration = Duration::from_secs(5);

fn ip(test: u8, host: u8) -> String {
    fleet::loopback(test, host)
}

/// An agent on `ip`, its DNS on `ip:7753` (the address is the test's own).
fn agent(
    name: &str,
    ip: &str,
    dir: &Path,
    registry: &str,
    extra: &[&str],
    config_top: &str,
) -> Result<Agent> {
    let dns = format!("{ip}:7753");
    let mut all = vec!["--dns", &dns, "--dns-ttl", "0s"];
    all.extend_from_slice(extra);
    fleet::local_agent_with(name, ip, dir, registry, &all, config_top)
}

fn dns_addr(ip: &str) -> SocketAddr {
    format!("{ip}:7753").parse().expect("addr")
}

/// `dig @server -p port ARGS +short` (or the whole answer with `full`).
fn dig(server: SocketAddr, args: &[&str]) -> Result<String> {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=2", "+tries=1"])
        .args(args)
        .output()
        .context("cannot run dig (Debian: bind9-dnsutils; ops/test.sh installs it)")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `+short` lines of `dig @server ARGS`.
fn dig_set(server: SocketAddr, args: &[&str]) -> Result<BTreeSet<String>> {
    let mut all = args.to_vec();
    all.push("+short");
    Ok(dig(server, &all)?.lines().map(str::to_string).collect())
}

fn resolver(server: SocketAddr) -> TokioResolver {
    let mut config = ResolverConfig::new();
    config.add_name_server(NameServerConfig::new(server, Protocol::Udp));
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    opts.attempts = 2;
    opts.timeout = Duration::from_secs(2);
    opts.use_hosts_file = ResolveHosts::Never;
    Resolver::builder_with_config(config, TokioConnectionProvider::default())
        .with_options(opts)
        .build()
}

/// The addresses the resolver library finds for `name` (empty when it finds none).
fn resolve(rt: &tokio::runtime::Runtime, server: SocketAddr, name: &str) -> BTreeSet<String> {
    rt.block_on(resolver(server).lookup_ip(name))
        .map(|l| l.iter().map(|ip| ip.to_string()).collect())
        .unwrap_or_default()
}

/// The API's hosts' addresses for `service`: what DNS must answer.
fn api_ips(agent: &Agent, service: &str) -> Result<BTreeSet<String>> {
    Ok(lookup(&agent.url(), service)?
        .hosts
        .iter()
        .filter_map(|h| h.parse::<SocketAddr>().ok())
        .map(|a| a.ip().to_string())
        .collect())
}

fn ips(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn dns_answers_from_the_view_through_an_outage_a_join_and_a_deregistration() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tmp = tempfile::tempdir()?;
    let (h1, h2, h3) = (ip(53, 1), ip(53, 2), ip(53, 3));
    let reg_addr = format!("{}:7700", ip(53, 100));
    let reg_url = format!("http://{reg_addr}");
    let mut reg = fleet::registry(&reg_addr, "10s", "4s")?;
    let a1 = agent(
        "agent-1",
        &h1,
        &tmp.path().join("a1"),
        &reg_url,
        &["--endpoint", "web:8080", "--zone", "zone-a"],
        "",
    )?;
    let seed = a1.gossip();
    let a2 = agent(
        "agent-2",
        &h2,
        &tmp.path().join("a2"),
        &reg_url,
        &[
            "--endpoint",
            "web:8081",
            "--zone",
            "zone-b",
            "--join",
            &seed,
        ],
        "",
    )?;
    let dns1 = dns_addr(&h1);
    let both = ips(&[&h1, &h2]);
    poll("both web hosts in the API of agent 1", START, || {
        api_ips(&a1, "web").ok().filter(|s| *s == both)
    })?;
    // dig and the resolver library see exactly what the API lists.
    poll("dig lists both web hosts", START, || {
        dig_set(dns1, &["web.service.tidings", "A"])
            .ok()
            .filter(|s| *s == both)
    })?;
    ensure!(resolve(&rt, dns1, "web.service.tidings.") == both);
    ensure!(dig_set(dns1, &["zone-b.web.service.tidings", "A"])? == ips(&[&h2]));
    let srv = dig_set(dns1, &["web.service.tidings", "SRV"])?;
    let dashed = h2.replace('.', "-");
    ensure!(
        srv.contains(&format!("0 100 8081 {dashed}.addr.tidings.")),
        "{srv:?}"
    );
    ensure!(dig_set(dns1, &[&format!("{dashed}.addr.tidings"), "A"])? == ips(&[&h2]));
    let nx = dig(dns1, &["nope.service.tidings", "A"])?;
    ensure!(
        nx.contains("status: NXDOMAIN") && nx.contains("SOA"),
        "{nx}"
    );
    let refused = dig(dns1, &["example.com", "A"])?;
    let flags = refused.lines().find(|l| l.contains("flags:")).unwrap_or("");
    ensure!(
        refused.contains("status: REFUSED") && !flags.contains(" ra"),
        "{refused}"
    );
    ensure!(dig_set(dns1, &["web.service.tidings", "A", "+tcp"])? == both);
    // Through dnsmasq set up as ops/deploy/dns/dnsmasq-tidings.conf says.
    let forwarder = Forwarder::start(&ip(53, 5), dns1)?;
    poll("dnsmasq forwards tidings. to the agent", START, || {
        dig_set(forwarder.addr, &["web.service.tidings", "A"])
            .ok()
            .filter(|s| *s == both)
    })?;
    let outside = dig(forwarder.addr, &["example.com", "A"])?;
    ensure!(!outside.contains("status: NOERROR"), "{outside}");
    drop(forwarder);

    // The registry is SIGKILLed: the same answers.
    reg.signal("KILL")?;
    reg.wait_exit(Duration::from_secs(5))?;
    for _ in 0..5 {
        ensure!(dig_set(dns1, &["web.service.tidings", "A"])? == both);
        ensure!(resolve(&rt, dns_addr(&h2), "web.service.tidings.") == both);
    }

    // A new host joins by gossip (the registry is down): in DNS within the gossip delay.
    let a3 = agent(
        "agent-3",
        &h3,
        &tmp.path().join("a3"),
        &reg_url,
        &["--endpoint", "web:8082", "--join", &seed],
        "",
    )?;
    let all = ips(&[&h1, &h2, &h3]);
    let t0 = Instant::now();
    poll("agent 3's host in agent 1's DNS", GOSSIP_DELAY, || {
        dig_set(dns1, &["web.service.tidings", "A"])
            .ok()
            .filter(|s| *s == all)
    })?;
    eprintln!("joined host answered by DNS after {:?}", t0.elapsed());
    ensure!(api_ips(&a1, "web")? == all);

    // A runtime endpoint comes and goes: DNS follows both ways.
    fleet::register(&a3.url(), r#"{"service": "exporter", "port": 9100}"#)?;
    poll("exporter in DNS", GOSSIP_DELAY, || {
        (resolve(&rt, dns1, "exporter.service.tidings.") == ips(&[&h3])).then_some(())
    })?;
    fleet::deregister(&a3.url(), "exporter", 9100)?;
    let t0 = Instant::now();
    poll("exporter gone from DNS", GOSSIP_DELAY, || {
        let out = dig(dns1, &["exporter.service.tidings", "A"]).ok()?;
        (out.contains("status: NOERROR") || out.contains("status: NXDOMAIN"))
            .then_some(())
            .filter(|()| !out.contains(&format!("\t{h3}")))
    })?;
    eprintln!("deregistered host gone from DNS after {:?}", t0.elapsed());
    ensure!(api_ips(&a1, "exporter")?.is_empty());

    let answered = http::metric(
        &a1.url(),
        "tidings_agent_dns_queries_total",
        "rcode=\"noerror\"",
    )?;
    let refused = http::metric(
        &a1.url(),
        "tidings_agent_dns_queries_total",
        "rcode=\"refused\"",
    )?;
    ensure!(answered >= 10.0 && refused >= 1.0, "{answered} {refused}");
    drop((a2, a3));
    Ok(())
}

/// dnsmasq in the foreground on `ip:7753`, forwarding `tidings.` (only) to `agent`; killed on
/// drop.
struct Forwarder {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Forwarder {
    fn start(ip: &str, agent: SocketAddr) -> Result<Forwarder> {
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
            ])
            .args([
                "--bind-interfaces",
                "--port=7753",
                "--user=root",
                "--pid-file=",
            ])
            .arg(format!("--listen-address={ip}"))
            .arg(format!("--server=/tidings/{}#{}", agent.ip(), agent.port()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot run dnsmasq (Debian: dnsmasq-base; ops/test.sh installs it)")?;
        Ok(Forwarder {
            child,
            addr: format!("{ip}:7753").parse()?,
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real query (id 0x2a2a, RD set, no EDNS).
fn query(name: &str, qtype: u16) -> Vec<u8> {
    let mut q = vec![0x2a, 0x2a, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(u8::try_from(label.len()).expect("short label"));
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

const SRV: u16 = 33;
const A: u16 = 1;

/// Sends `packet` and returns the answer, if one comes within `wait`.
fn udp_ask(sock: &UdpSocket, server: SocketAddr, packet: &[u8], wait: Duration) -> Option<Vec<u8>> {
    sock.set_read_timeout(Some(wait)).ok()?;
    sock.send_to(packet, server).ok()?;
    let mut buf = [0u8; 65_536];
    let n = sock.recv(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

/// Reads until EOF or `deadline`: whether the server closed the connection in time.
fn closed_within(stream: &mut TcpStream, deadline: Duration) -> bool {
    let end = Instant::now() + deadline;
    let mut buf = [0u8; 512];
    while Instant::now() < end {
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn hostile_packets_floods_and_tcp_clients_do_not_take_dns_down() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let h = ip(54, 1);
    let reg_addr = format!("{}:7700", ip(54, 100));
    let reg_url = format!("http://{reg_addr}");
    let _reg = fleet::registry(&reg_addr, "10s", "4s")?;
    // 60 endpoints of `big` on one host: an SRV answer of about 2 KB.
    let ports: Vec<String> = (0..60).map(|p| format!("big:{}", 10_000 + p)).collect();
    let mut extra: Vec<&str> = Vec::new();
    for p in &ports {
        extra.extend(["--endpoint", p.as_str()]);
    }
    let limits = "[dns]\nmax_tcp_connections = 4\ntcp_idle_timeout = \"1s\"\n";
    let mut a = agent(
        "agent-1",
        &h,
        &tmp.path().join("a1"),
        &reg_url,
        &extra,
        limits,
    )?;
    let server = dns_addr(&h);
    let sock = UdpSocket::bind(format!("{h}:0"))?;
    let big = query("big.service.tidings", SRV);
    poll("60 SRV records over TCP", START, || {
        let out = dig(server, &["big.service.tidings", "SRV", "+tcp", "+short"]).ok()?;
        (out.lines().count() == 60).then_some(())
    })?;

    // Over UDP without EDNS: cut to at most 10 × the query, TC set.
    let answer = udp_ask(&sock, server, &big, Duration::from_secs(2)).context("no answer")?;
    ensure!(
        answer.len() <= big.len() * 10 && answer.len() <= 512,
        "{} bytes for a {}-byte query",
        answer.len(),
        big.len()
    );
    ensure!(answer[2] & 0x02 != 0, "TC not set");
    // dig retries over TCP on TC, as resolvers do.
    ensure!(dig_set(server, &["big.service.tidings", "SRV", "+noedns"])?.len() == 60);

    // Bad input: every prefix of a query, an oversized packet, compression loops, a response,
    // random bytes. Whatever is answered is never larger than what was sent.
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut packets: Vec<Vec<u8>> = (0..big.len()).map(|n| big[..n].to_vec()).collect();
    packets.push(vec![0u8; 5_000]);
    let mut looped = big[..12].to_vec();
    looped.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
    packets.push(looped);
    let mut response = big.clone();
    response[2] |= 0x80;
    packets.push(response);
    for _ in 0..500 {
        let len = rng.random_range(0..700);
        packets.push((0..len).map(|_| rng.random()).collect());
    }
    sock.set_read_timeout(Some(Duration::from_millis(1)))?;
    let mut buf = [0u8; 65_536];
    for p in &packets {
        sock.send_to(p, server)?;
        while let Ok(n) = sock.recv(&mut buf) {
            ensure!(n <= p.len().max(12) * 10, "seed {seed}: {n} bytes back");
        }
    }
    // A flood: 20 000 queries as fast as one socket sends them, at most 3 s.
    let a_query = query("big.service.tidings", A);
    let flood_end = Instant::now() + Duration::from_secs(3);
    for _ in 0..20_000 {
        if Instant::now() > flood_end {
            break;
        }
        let _ = sock.send_to(&a_query, server);
    }
    // Still answering, still alive.
    poll("an answer after the flood", Duration::from_secs(5), || {
        udp_ask(&sock, server, &a_query, Duration::from_millis(500))
            .filter(|a| a.len() > big.len() && a[..2] == a_query[..2])
    })?;
    ensure!(!a.proc.exited(), "seed {seed}: the agent died");

    // TCP: 4 connections held open by idle clients; a fifth is closed at once, UDP goes on.
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(server))
        .collect::<std::io::Result<_>>()?;
    let mut fifth = poll("a fifth TCP connection refused", START, || {
        let mut s = TcpStream::connect(server).ok()?;
        closed_within(&mut s, Duration::from_millis(500)).then_some(s)
    })?;
    ensure!(closed_within(&mut fifth, Duration::from_millis(100)));
    ensure!(udp_ask(&sock, server, &a_query, Duration::from_secs(2)).is_some());
    // The idle ones are closed after tcp_idle_timeout (1 s), freeing their slots.
    for s in &mut held {
        ensure!(
            closed_within(s, Duration::from_secs(4)),
            "an idle client kept its slot"
        );
    }
    // A client that sends one byte of a length and stalls loses its slot in seconds, as does
    // one that announces an out-of-bounds length.
    let mut slow = TcpStream::connect(server)?;
    slow.write_all(&[0])?;
    ensure!(
        closed_within(&mut slow, Duration::from_secs(6)),
        "a slow client held on"
    );
    for len in [0xFFFFu16, 4] {
        let mut s = TcpStream::connect(server)?;
        s.write_all(&len.to_be_bytes())?;
        ensure!(
            closed_within(&mut s, Duration::from_secs(2)),
            "length {len}"
        );
    }
    // And a well-behaved TCP client gets the whole answer.
    ensure!(dig_set(server, &["big.service.tidings", "SRV", "+tcp"])?.len() == 60);
    let truncated = http::metric(&a.url(), "tidings_agent_dns_truncated_total", "")?;
    let refused = http::metric(&a.url(), "tidings_agent_dns_tcp_refused_total", "")?;
    ensure!(truncated >= 1.0 && refused >= 1.0, "{truncated} {refused}");
    if a.proc.exited() {
        bail!("seed {seed}: the agent died; log:\n{}", a.proc.log_text());
    }
    Ok(())
}
