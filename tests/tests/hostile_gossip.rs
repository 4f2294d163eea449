//! An agent's gossip port under hostile traffic from the network: random and truncated UDP
//! packets, maximum-size datagrams, a whole cluster gossiping under another key, and on TCP
//! random bytes, a 4 GiB length prefix, oversized chunk claims and 500 stalled half frames.
//! The agent must stay up with bounded memory, keep a correct view and membership, keep
//! repairing (an endpoint too large to be broadcast still reaches it), and count the drops.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tests::fleet::{self, lookup, register, set};
use tests::{Proc, START, http, poll, run};

/// A per-run /24 of loopback, apart from the other suites' ranges.
fn ip(host: u8) -> String {
    let net = 1 + std::process::id() % 100;
    format!("127.201.{net}.{host}")
}

fn keyed_agent(host: u8, dir: &Path, registry: &str, key: &Path, extra: &[&str]) -> Result<Proc> {
    fleet::keyed_agent(&ip(host), dir, registry, key, extra)
}

fn keygen(path: &Path) -> Result<()> {
    let (code, key, err) = run(&["gossip", "keygen"], Duration::from_secs(10))?;
    ensure!(code == 0, "keygen: {err}");
    std::fs::write(path, key)?;
    Ok(())
}

fn url(host: u8) -> String {
    format!("http://{}:7701", ip(host))
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")?;
    Ok(kb * 1024)
}

fn counter(host: u8, field: &str) -> Result<u64> {
    fleet::gossip_counter(&url(host), field)
}

fn alive_members(host: u8) -> Result<BTreeSet<String>> {
    Ok(fleet::members(&url(host))?
        .into_iter()
        .filter(|m| m.alive)
        .map(|m| m.addr)
        .collect())
}

/// A small seeded generator: the garbage is the same on every run.
struct Garbage(u64);

impl Garbage {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn udp_garbage(target: &str, seed: u64) -> Result<()> {
    let sock = UdpSocket::bind(format!("{}:0", ip(200)))?;
    let mut g = Garbage(seed);
    for i in 0..3000 {
        let len = match i % 4 {
            // Too short to be sealed.
            0 => (g.next() % 41) as usize,
            // Shaped like sealed packets (key id, nonce, body, tag) under no key we hold.
            1 | 2 => 41 + (g.next() % 1360) as usize,
            // Beyond the datagram limit, up to the largest UDP payload.
            _ => 1401 + (g.next() % 64_000) as usize,
        };
        // A full socket buffer may refuse a send; the flood goes on.
        let _ = sock.send_to(&g.bytes(len), target);
    }
    Ok(())
}

/// Connections that send `prefix` and then nothing, kept open by the caller.
fn tcp_stallers(target: &str, n: usize, prefix: &[u8]) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| {
            let mut s =
                TcpStream::connect_timeout(&target.parse().ok()?, Duration::from_secs(2)).ok()?;
            // The server may already have closed it (a bad preamble): that is the point.
            let _ = s.write_all(prefix);
            Some(s)
        })
        .collect()
}

/// An endpoint of over 1000 bytes (five 250-byte tags): never broadcast, so it can only
/// reach other agents through repair over TCP.
fn bulky_spec(port: u16) -> String {
    let tags: Vec<String> = (0..5)
        .map(|i| format!("\"k{i}\":\"{}\"", "v".repeat(250)))
        .collect();
    format!(
        "{{\"service\":\"bulky\",\"port\":{port},\"tags\":{{{}}}}}",
        tags.join(",")
    )
}

#[test]
fn an_agent_survives_hostile_gossip_traffic() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (key, rogue_key) = (tmp.path().join("key"), tmp.path().join("rogue-key"));
    keygen(&key)?;
    keygen(&rogue_key)?;
    let reg_url = format!("http://{}:7700", ip(100));
    let _reg = fleet::registry(&format!("{}:7700", ip(100)), "10s", "2s")?;
    let seed = format!("{}:7702", ip(1));
    let dir = |n: u8| tmp.path().join(format!("agent-{n}"));
    let target = keyed_agent(1, &dir(1), &reg_url, &key, &["--endpoint", "web:8080"])?;
    let mut others = Vec::new();
    for h in [2, 3] {
        let extra = ["--endpoint", "web:8080", "--join", &seed];
        others.push(keyed_agent(h, &dir(h), &reg_url, &key, &extra)?);
    }
    let web = set(&[1, 2, 3].map(|h| format!("{}:8080", ip(h))));
    let members = set(&[1, 2, 3].map(|h| format!("{}:7702", ip(h))));
    poll("three agents, three web hosts", START, || {
        let ok = lookup(&url(1), "web").ok()?.hosts == web;
        (ok && alive_members(1).ok()? == members).then_some(())
    })?;
    let rss_before = rss(target.pid())?;

    // A cluster under another key, with its own registry, told to join the target: real
    // sealed SWIM packets and digests that no key of ours opens.
    let _rogue_reg = fleet::registry(&format!("{}:7700", ip(101)), "10s", "2s")?;
    let rogue_reg = format!("http://{}:7700", ip(101));
    let _rogue = keyed_agent(
        9,
        &dir(9),
        &rogue_reg,
        &rogue_key,
        &["--endpoint", "rogue:6666", "--join", &seed],
    )?;

    udp_garbage(&seed, 0x9e37_79b9_7f4a_7c15)?;
    let half_frame = {
        // A repair stream hello (preamble, challenge), then a chunk claiming 32 768 bytes
        // of which 10 come.
        let mut b = b"TDR\x02challnge\x80\x00".to_vec();
        b.extend_from_slice(&[0x5a; 10]);
        b
    };
    let mut held = tcp_stallers(&seed, 500, &half_frame);
    held.extend(tcp_stallers(&seed, 20, &u32::MAX.to_be_bytes()));
    held.extend(tcp_stallers(&seed, 20, b"TDR\x02challnge\xff\xff"));
    let mut g = Garbage(7);
    for _ in 0..20 {
        held.extend(tcp_stallers(&seed, 1, &g.bytes(1024)));
    }
    // 4 GiB claimed by the length prefix of the previous repair framing.
    held.extend(tcp_stallers(&seed, 20, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]));

    // While all of that is held open: an endpoint only repair can carry, registered on
    // another agent, reaches the target within a few seconds.
    register(&url(2), &bulky_spec(9100))?;
    poll(
        "the bulky endpoint on the target",
        Duration::from_secs(10),
        || {
            lookup(&url(1), "bulky")
                .ok()
                .filter(|l| l.hosts.contains(&format!("{}:9100", ip(2))))
        },
    )?;
    udp_garbage(&seed, 0x0123_4567_89ab_cdef)?;

    // Still alive, memory bounded, the same view and members, the rogue kept out.
    ensure!(http::get(&format!("{}/v1/agent/self", url(1)))?.status == 200);
    let rss_after = rss(target.pid())?;
    ensure!(
        rss_after < rss_before + 50 * 1024 * 1024,
        "RSS grew from {rss_before} to {rss_after} bytes"
    );
    ensure!(lookup(&url(1), "web")?.hosts == web, "web changed");
    let catalog = fleet::catalog(&url(1))?;
    ensure!(
        !catalog.iter().any(|e| e.starts_with("rogue ")),
        "rogue endpoint listed: {catalog:?}"
    );
    ensure!(alive_members(1)? == members, "members changed");
    let counts = poll("drops counted", Duration::from_secs(10), || {
        let c = |f: &str| counter(1, f).ok().filter(|&n| n > 0);
        Some((
            c("dropped_unknown_key")?,
            c("dropped_truncated")?,
            c("dropped_oversize")?,
            c("dropped_bad_stream")?,
            c("tcp_evicted")?,
            c("repair_sessions_served").or(c("repair_exchanges"))?,
        ))
    })?;
    eprintln!(
        "RSS {rss_before} -> {rss_after} bytes; unknown key, truncated, oversize, bad stream, \
         evicted, served: {counts:?}"
    );
    drop(held);
    Ok(())
}
