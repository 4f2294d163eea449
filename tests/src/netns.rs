//! A small network lab made of Linux network namespaces, for partition and packet-loss
//! tests (root only: CI runs as root). Each host is a namespace `td<pid><tag>a<i>` whose
//! `eth0` is one end of a veth pair; the other ends hang on a bridge `td<pid><tag>br` in
//! the test's own namespace, which holds `.1` of a private /24 chosen unused on this
//! machine. The test reaches every host over the bridge, and processes it starts in the
//! root namespace (a registry, backends) are reachable from every host at [`Lab::gateway`].
//!
//! Faults are nftables rules inside a host's namespace, on its *input* hook only: a packet
//! is dropped by its receiver, silently, as a real network would — an output drop would
//! hand the sender an `EPERM` that no real partition produces.
//!
//! Everything is removed on drop, even when the test fails; namespaces and links left by a
//! run that was killed (its pid is gone) are removed when the next lab starts.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

use crate::fleet::{Agent, AgentSpec};

/// The agents' local API port. The API only listens on loopback (docs/ARCHITECTURE.md#what-the-agent-answers); inside a
/// host's namespace a DNAT rule sends `<host ip>:API_PORT` to `127.0.0.1:API_PORT`, with
/// `route_localnet` on `eth0` so the kernel routes to and from a loopback address there
/// (as kube-proxy does for localhost node ports). Nothing of the agent changes.
pub const API_PORT: u16 = 7701;
/// The agents' gossip port (UDP and TCP).
pub const GOSSIP_PORT: u16 = 7702;

const PREFIX: &str = "td";

pub struct Lab {
    /// `td<pid><tag>`.
    prefix: String,
    bridge: String,
    /// The first three octets of the lab's /24.
    net: String,
    hosts: usize,
}

/// Runs a command to completion; fails with its stderr.
fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails with a clear message unless this process is root and `ip` and `nft` exist.
pub fn require_root_and_tools() -> Result<()> {
    let uid = sh("id", &["-u"])?;
    if uid.trim() != "0" {
        bail!(
            "this test needs root (network namespaces, veths, nftables); CI runs as root. \
             Run it as root: sudo -E cargo test -p tests --test <name>"
        );
    }
    sh("ip", &["-V"]).context("iproute2 (`ip`) is required; ops/test.sh installs it")?;
    sh("nft", &["--version"]).context("nftables (`nft`) is required; ops/test.sh installs it")?;
    Ok(())
}

/// The pid in a name `td<pid>...`, if it has one.
fn owner_pid(name: &str) -> Option<u32> {
    let digits: String = name
        .strip_prefix(PREFIX)?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Whether `name` is ours and its run is gone.
fn stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes namespaces and links of runs that no longer exist.
fn remove_stale() -> Result<()> {
    for line in sh("ip", &["netns", "list"])?.lines() {
        if let Some(ns) = line.split_whitespace().next().filter(|n| stale(n)) {
            eprintln!("removing stale namespace {ns}");
            let _ = sh("ip", &["netns", "del", ns]);
        }
    }
    for line in sh("ip", &["-o", "link", "show"])?.lines() {
        // "7: td123pbr: <BROADCAST,...>" or "8: td123pv1@if2: <...>"
        let name = line.split(':').nth(1).map(str::trim).unwrap_or("");
        let name = name.split('@').next().unwrap_or("");
        if stale(name) {
            eprintln!("removing stale link {name}");
            let _ = sh("ip", &["link", "del", name]);
        }
    }
    Ok(())
}

/// A /24 in 10.0.0.0/8 that no address or route of this machine touches.
fn free_net(tag: char) -> Result<String> {
    let used = format!(
        "{}\n{}",
        sh("ip", &["-4", "-o", "addr", "show"])?,
        sh("ip", &["-4", "route", "show", "table", "all"])?
    );
    let pid = std::process::id();
    let y = u32::from(tag) % 200 + 20;
    for k in 0..50 {
        let net = format!("10.{}.{y}", 150 + (pid + k) % 100);
        if !used.contains(&format!("{net}.")) {
            return Ok(net);
        }
    }
    bail!("no free 10.x.{y}.0/24 on this machine")
}

impl Lab {
    /// Builds `hosts` namespaces on a fresh bridge. `tag` (a lowercase letter) tells this
    /// test's lab apart from another one in the same process.
    pub fn new(tag: char, hosts: usize) -> Result<Lab> {
        require_root_and_tools()?;
        ensure!(
            tag.is_ascii_lowercase() && (1..=50).contains(&hosts),
            "tag must be a-z, 1..=50 hosts"
        );
        remove_stale()?;
        let prefix = format!("{PREFIX}{}{tag}", std::process::id());
        let lab = Lab {
            bridge: format!("{prefix}br"),
            net: free_net(tag)?,
            prefix,
            hosts: 0,
        };
        sh("ip", &["link", "add", &lab.bridge, "type", "bridge"])?;
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", lab.gateway()),
                "dev",
                &lab.bridge,
            ],
        )?;
        sh("ip", &["link", "set", &lab.bridge, "up"])?;
        let mut lab = lab;
        for i in 1..=hosts {
            // Counted first, so that a half-built host is removed on drop too.
            lab.hosts = i;
            lab.add_host(i)?;
        }
        Ok(lab)
    }

    fn add_host(&self, i: usize) -> Result<()> {
        let (ns, veth, ip) = (self.ns(i), format!("{}v{i}", self.prefix), self.ip(i));
        sh("ip", &["netns", "add", &ns])?;
        sh(
            "ip",
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        sh("ip", &["link", "set", &veth, "master", &self.bridge, "up"])?;
        sh(
            "ip",
            &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )?;
        sh("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        self.exec(i, "sysctl", &["-qw", "net.ipv4.conf.eth0.route_localnet=1"])?;
        self.nft(
            i,
            &format!(
                "table ip tdapi {{\n chain pre {{\n type nat hook prerouting priority dstnat; \
                 policy accept;\n iifname \"eth0\" tcp dport {API_PORT} \
                 dnat to 127.0.0.1:{API_PORT}\n }}\n}}\n"
            ),
        )
    }

    /// `.1`: the bridge, in the test's own namespace.
    pub fn gateway(&self) -> String {
        format!("{}.1", self.net)
    }

    /// Host `i` (1-based): `.i+1`.
    pub fn ip(&self, i: usize) -> String {
        format!("{}.{}", self.net, i + 1)
    }

    pub fn ns(&self, i: usize) -> String {
        format!("{}a{i}", self.prefix)
    }

    /// Base URL of host `i`'s agent API, as the test reaches it.
    pub fn api_url(&self, i: usize) -> String {
        format!("http://{}:{API_PORT}", self.ip(i))
    }

    /// Starts an agent in host `i`'s namespace: gossip on its address, the local API on
    /// its loopback (reached through [`Lab::api_url`]), its disk cache in `dir`.
    pub fn agent(&self, i: usize, dir: &Path, registry: &str, extra: &[&str]) -> Result<Agent> {
        self.agent_env(i, dir, registry, extra, Vec::new(), "")
    }

    /// [`Lab::agent`] with extra environment variables (kept across restarts) and top-level
    /// config keys (see [`Agent::start_env`]).
    pub fn agent_env(
        &self,
        i: usize,
        dir: &Path,
        registry: &str,
        extra: &[&str],
        env: Vec<(String, String)>,
        config_top: &str,
    ) -> Result<Agent> {
        Agent::start_env(
            AgentSpec {
                name: format!("agent-{i}"),
                netns: Some(self.ns(i)),
                gossip: format!("{}:{GOSSIP_PORT}", self.ip(i)),
                api: format!("127.0.0.1:{API_PORT}"),
                url: self.api_url(i),
                registry,
                dir,
                extra,
            },
            env,
            config_top,
        )
    }

    /// Runs `program args` inside host `i`'s namespace.
    pub fn exec(&self, i: usize, program: &str, args: &[&str]) -> Result<String> {
        let ns = self.ns(i);
        let mut all = vec!["netns", "exec", &ns, program];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Loads an nftables ruleset into host `i`'s namespace.
    pub fn nft(&self, i: usize, ruleset: &str) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(i), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nft")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "nft in {} refused {ruleset:?}: {}",
            self.ns(i),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Cuts every packet between the hosts of `a` and those of `b` (both directions).
    pub fn partition(&self, a: &[usize], b: &[usize]) -> Result<()> {
        for (mine, theirs) in [(a, b), (b, a)] {
            let ips: Vec<String> = theirs.iter().map(|&j| self.ip(j)).collect();
            for &i in mine {
                self.nft(
                    i,
                    &format!(
                        "table inet tdcut {{\n chain in {{\n type filter hook input \
                         priority 0; policy accept;\n ip saddr {{ {} }} drop\n }}\n}}\n",
                        ips.join(", ")
                    ),
                )?;
            }
        }
        Ok(())
    }

    /// Removes the partition rules from `hosts`.
    pub fn heal(&self, hosts: &[usize]) -> Result<()> {
        for &i in hosts {
            self.nft(i, "delete table inet tdcut")?;
        }
        Ok(())
    }

    /// Drops `percent` % of the gossip packets (UDP and TCP to or from `port`) that reach
    /// host `i`, chosen at random per packet; every gossip packet is counted.
    pub fn gossip_loss(&self, i: usize, port: u16, percent: u8) -> Result<()> {
        self.nft(
            i,
            &format!(
                "table inet tdloss {{\n\
                 chain gossip {{\n counter\n numgen random mod 100 < {percent} counter drop\n \
                 accept\n }}\n\
                 chain in {{\n type filter hook input priority 0; policy accept;\n\
                 meta l4proto {{ tcp, udp }} th dport {port} jump gossip\n\
                 meta l4proto {{ tcp, udp }} th sport {port} jump gossip\n }}\n}}\n"
            ),
        )
    }

    /// (gossip packets that reached host `i`, of which dropped) since [`Lab::gossip_loss`].
    pub fn loss_counters(&self, i: usize) -> Result<(u64, u64)> {
        let out = self.exec(i, "nft", &["list", "chain", "inet", "tdloss", "gossip"])?;
        let counts: Vec<u64> = out
            .split("counter packets ")
            .skip(1)
            .filter_map(|s| s.split_whitespace().next()?.parse().ok())
            .collect();
        match counts[..] {
            [seen, dropped] => Ok((seen, dropped)),
            _ => bail!("unexpected nft output in {}: {out}", self.ns(i)),
        }
    }

    pub fn clear_loss(&self, i: usize) -> Result<()> {
        self.nft(i, "delete table inet tdloss")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 1..=self.hosts {
            // The kernel removes a namespace's veths when it tears the namespace down, but
            // lazily: delete the pair now so the next run finds nothing of ours.
            let _ = sh("ip", &["link", "del", &format!("{}v{i}", self.prefix)]);
            if let Err(e) = sh("ip", &["netns", "del", &self.ns(i)]) {
                eprintln!("lab cleanup: {e:#}");
            }
        }
        if let Err(e) = sh("ip", &["link", "del", &self.bridge]) {
            eprintln!("lab cleanup: {e:#}");
        }
    }
}
