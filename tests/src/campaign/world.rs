//! The fleet a campaign runs against, and the faults applied to it. Everything here is
//! torn down on drop (processes killed, namespaces and nftables rules removed), in field
//! order, even when the run fails half-way.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::bounds::{AGENT_CONFIG, REGISTRY_INTERVAL, TTL};
use super::procs::{Cron, Registry, schema_clock_env, seconds};
use super::schedule::{ClockTarget, Kind, Store};
use crate::backend::Backend;
use crate::fleet::{self, Agent};
use crate::netns::{GOSSIP_PORT, Lab};
use crate::traffic::Load;
use crate::{Proc, poll, run};

/// How long the fleet may take to start and converge on a loaded machine.
pub(super) const SETTLE: Duration = Duration::from_secs(60);
/// The campaign's byte of [`fleet::loopback`].
const LOOPBACK_TEST: u8 = 40;
const TABLE: &str = "tidings-campaign";

/// Starts a DynamoDB-compatible server: (a guard that stops it on drop, its endpoint URL).
/// The test binary supplies it (moto's launcher lives with discovery's tests).
pub type DynamoStarter<'a> = &'a dyn Fn() -> Result<(Box<dyn std::any::Any>, String)>;

/// The address of web host `h` (agents first, then cron hosts) and of churn hosts, on this
/// run's own loopback range, where the test's backends listen.
pub fn host_ip(h: usize) -> String {
    fleet::loopback(LOOPBACK_TEST, u8::try_from(1 + h).unwrap_or(250))
}

fn churn_ip(n: usize) -> String {
    fleet::loopback(LOOPBACK_TEST, u8::try_from(150 + n % 90).unwrap_or(250))
}

/// What one fault changed, so the engine can tell the model.
#[derive(Debug)]
pub enum Effect {
    None,
    AgentDown(usize),
    AgentUp(usize),
    RegistryDown {
        replica: usize,
        killed: bool,
    },
    RegistryUp(usize),
    BackendDown(usize),
    BackendUp(usize),
    Deregistered {
        service: String,
        addr: String,
    },
    Registered {
        service: String,
        addr: String,
    },
    /// A new endpoint owned by `agent` (`None`: a cron host).
    Added {
        service: String,
        addr: String,
        agent: Option<usize>,
    },
    CronStopped {
        service: String,
        addr: String,
    },
    NetDisturbed(Vec<usize>),
    NetHealed(Vec<usize>),
}

pub struct World {
    pub load: Option<Load>,
    pub proxy: Proc,
    pub admin: String,
    pub agents: Vec<Agent>,
    replicas: Vec<Registry>,
    /// Held for their drop: it stops and joins them.
    _crons: Vec<Cron>,
    /// Churn cron hosts by service.
    churn_crons: Vec<(String, Cron)>,
    backends: Vec<Option<Backend>>,
    rt: tokio::runtime::Runtime,
    _dynamo: Option<Box<dyn std::any::Any>>,
    pub lab: Lab,
    dir: PathBuf,
    /// Logs of processes the engine killed (name, text), kept for [`World::dump_logs`].
    past_logs: Vec<(String, String)>,
}

impl World {
    /// Starts the fleet for `store` and waits until every agent lists every web host and the
    /// proxy routes to all of them.
    pub fn start(
        store: Store,
        agents: usize,
        cron_hosts: usize,
        dir: &Path,
        dynamo: DynamoStarter<'_>,
        traffic_for: Duration,
    ) -> Result<World> {
        let rt = crate::backend::runtime()?;
        let mut backends = Vec::new();
        for h in 0..agents + cron_hosts {
            let b = rt.block_on(Backend::start_on(&host_ip(h), 8080, &format!("host-{h}")))?;
            backends.push(Some(b));
        }
        let lab = Lab::new('c', agents)?;
        let (guard, endpoint) = match store {
            Store::Memory => (None, None),
            Store::Dynamo => {
                let (g, e) = start_dynamo(dynamo)?;
                (Some(g), Some(e))
            }
        };
        let replicas = start_replicas(store, &lab, dir, endpoint.as_deref())?;
        let fleet_agents = start_agents(agents, &lab, dir, replicas.len())?;
        let crons = (0..cron_hosts)
            .map(|c| {
                let ip = host_ip(agents + c);
                let reg = registry_url(&lab, c % replicas.len());
                Cron::start(reg, "web".into(), 8080, ip)
            })
            .collect();
        let all: BTreeSet<String> = (0..agents + cron_hosts)
            .map(|h| format!("{}:8080", host_ip(h)))
            .collect();
        for a in &fleet_agents {
            poll(
                &format!("{} to list every web host", a.name),
                SETTLE,
                || {
                    let l = fleet::lookup_within(&a.url(), "web", Duration::from_secs(2)).ok()?;
                    (l.hosts == all).then_some(())
                },
            )?;
        }
        let ip = fleet::loopback(LOOPBACK_TEST, 200);
        let (proxy, admin, listen) =
            crate::proxy::start_routing(None, &ip, &fleet_agents[0].url(), &all)?;
        let load = Load::start(
            format!("http://{listen}/"),
            "web".into(),
            10_000_000,
            traffic_for,
        );
        Ok(World {
            load: Some(load),
            proxy,
            admin,
            agents: fleet_agents,
            replicas,
            _crons: crons,
            churn_crons: Vec::new(),
            backends,
            rt,
            _dynamo: guard,
            lab,
            dir: dir.to_path_buf(),
            past_logs: Vec::new(),
        })
    }

    /// Processes that exited without the engine killing them (a crash), with their log's
    /// tail.
    pub fn crashed(&mut self) -> Vec<String> {
        let mut procs: Vec<&mut Proc> = vec![&mut self.proxy];
        procs.extend(self.agents.iter_mut().map(|a| &mut a.proc));
        procs.extend(self.replicas.iter_mut().filter_map(|r| r.proc.as_mut()));
        procs
            .into_iter()
            .filter_map(|p| {
                if !p.exited() {
                    return None;
                }
                let log = p.log_text();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                Some(format!(
                    "{} exited by itself; its last log lines:\n{tail}",
                    p.name()
                ))
            })
            .collect()
    }

    /// The registry replicas' base URLs, by replica index.
    pub fn registry_urls(&self) -> Vec<String> {
        (0..self.replicas.len())
            .map(|r| registry_url(&self.lab, r))
            .collect()
    }

    /// Writes every process's log into `dir` (one file per process life, numbered in the
    /// order they ended; the running ones last), to read what led to a violation.
    pub fn dump_logs(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let running = std::iter::once((self.proxy.name().to_string(), self.proxy.log_text()))
            .chain(
                self.agents
                    .iter()
                    .map(|a| (a.name.clone(), a.proc.log_text())),
            )
            .chain(
                self.replicas
                    .iter()
                    .filter_map(|r| r.proc.as_ref().map(|p| (r.name.clone(), p.log_text()))),
            );
        let all = self.past_logs.iter().cloned().chain(running);
        for (n, (name, text)) in all.enumerate() {
            std::fs::write(dir.join(format!("{n:02}-{name}.log")), text)?;
        }
        Ok(())
    }

    /// Agent URLs, as the checker reaches them.
    pub fn agent_urls(&self) -> Vec<String> {
        self.agents.iter().map(Agent::url).collect()
    }

    fn set_clock(&self, target: ClockTarget, offset_ms: i64) -> Result<()> {
        let path = match target {
            ClockTarget::Agent(a) => self.dir.join(format!("clock-agent-{a}")),
            ClockTarget::Registry(r) => self.replicas.get(r).context("replica")?.clock.clone(),
        };
        std::fs::write(&path, offset_ms.to_string())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Starts `kind`; `report` is told each change as it happens (a fault may make two).
    pub fn begin(&mut self, kind: &Kind, report: &mut dyn FnMut(Effect)) -> Result<()> {
        match kind {
            Kind::RegistryKill { replica } => self.kill_registry(*replica, false, report)?,
            Kind::RegistryEmptyRestart { replica } => {
                self.kill_registry(*replica, true, report)?;
            }
            Kind::RegistryStop { replica } => {
                report(Effect::RegistryDown {
                    replica: *replica,
                    killed: false,
                });
                self.replicas
                    .get(*replica)
                    .context("replica")?
                    .proc()?
                    .signal("STOP")?;
            }
            Kind::AgentRestart { agent, .. } => {
                let a = self.agents.get_mut(*agent).context("agent")?;
                report(Effect::AgentDown(*agent));
                a.proc.signal("KILL")?;
                a.proc.wait_exit(Duration::from_secs(5))?;
                self.past_logs.push((a.name.clone(), a.proc.log_text()));
            }
            Kind::BackendKill { host } => {
                let b = self.backends.get_mut(*host).context("backend")?.take();
                if let Some(b) = b {
                    self.rt.block_on(b.kill());
                }
                report(Effect::BackendDown(*host));
            }
            Kind::Deregister { agent } => {
                let url = self.agents.get(*agent).context("agent")?.url();
                fleet::deregister_at(&url, "web", 8080, Some(&host_ip(*agent)))?;
                report(Effect::Deregistered {
                    service: "web".into(),
                    addr: format!("{}:8080", host_ip(*agent)),
                });
            }
            Kind::Churn { agent, service } => self.begin_churn(*agent, service, report)?,
            Kind::ClockStep { target, offset_ms } => self.set_clock(*target, *offset_ms)?,
            Kind::GossipLoss { agents, percent } => {
                report(Effect::NetDisturbed(agents.clone()));
                for a in agents {
                    self.lab.gossip_loss(a + 1, GOSSIP_PORT, *percent)?;
                }
            }
            Kind::Partition { side } => {
                let n = self.agents.len();
                report(Effect::NetDisturbed((0..n).collect()));
                let a: Vec<usize> = side.iter().map(|i| i + 1).collect();
                let b: Vec<usize> = (1..=n).filter(|i| !a.contains(i)).collect();
                self.lab.partition(&a, &b)?;
            }
        }
        Ok(())
    }

    /// SIGKILLs registry `replica`, and with `restart` starts it again at once (empty, with
    /// the memory store).
    fn kill_registry(
        &mut self,
        replica: usize,
        restart: bool,
        report: &mut dyn FnMut(Effect),
    ) -> Result<()> {
        let reg = self.replicas.get_mut(replica).context("replica")?;
        report(Effect::RegistryDown {
            replica,
            killed: true,
        });
        let mut proc = reg.proc.take().context("registry not running")?;
        proc.signal("KILL")?;
        proc.wait_exit(Duration::from_secs(5))?;
        self.past_logs.push((reg.name.clone(), proc.log_text()));
        if restart {
            reg.start()?;
            report(Effect::RegistryUp(replica));
        }
        Ok(())
    }

    /// `agent` registers `service` on its host, and a new cron-only host starts checking
    /// the same service in.
    fn begin_churn(
        &mut self,
        agent: usize,
        service: &str,
        report: &mut dyn FnMut(Effect),
    ) -> Result<()> {
        let port = churn_port(service);
        let url = self.agents.get(agent).context("agent")?.url();
        let ip = host_ip(agent);
        let spec = format!(r#"{{"service": "{service}", "port": {port}, "ip": "{ip}"}}"#);
        fleet::register(&url, &spec)?;
        report(Effect::Added {
            service: service.to_string(),
            addr: format!("{ip}:{port}"),
            agent: Some(agent),
        });
        // A new host appears: cron-only, checking in to replica 0.
        let cron_ip = churn_ip(usize::from(port));
        let reg = format!("http://{}:7700", self.lab.gateway());
        let cron = Cron::start(reg, service.to_string(), port, cron_ip.clone());
        self.churn_crons.push((service.to_string(), cron));
        report(Effect::Added {
            service: service.to_string(),
            addr: format!("{cron_ip}:{port}"),
            agent: None,
        });
        Ok(())
    }

    /// Undoes `kind`.
    pub fn end(&mut self, kind: &Kind, report: &mut dyn FnMut(Effect)) -> Result<()> {
        match kind {
            Kind::RegistryKill { replica } => {
                self.replicas
                    .get_mut(*replica)
                    .context("replica")?
                    .start()?;
                report(Effect::RegistryUp(*replica));
            }
            Kind::RegistryEmptyRestart { .. } => {}
            Kind::RegistryStop { replica } => {
                self.replicas
                    .get(*replica)
                    .context("replica")?
                    .proc()?
                    .signal("CONT")?;
                report(Effect::RegistryUp(*replica));
            }
            Kind::AgentRestart { agent, keep_cache } => {
                let a = self.agents.get_mut(*agent).context("agent")?;
                if !keep_cache {
                    // The cache file only (see agent::cache): the data dir stays, as on a
                    // host whose cache was lost or refused.
                    let _ = std::fs::remove_file(a.dir.join("view.cache"));
                }
                a.restart()?;
                register_web(&a.url(), *agent)?;
                report(Effect::AgentUp(*agent));
            }
            Kind::BackendKill { host } => {
                let b = self.rt.block_on(Backend::start_on(
                    &host_ip(*host),
                    8080,
                    &format!("host-{host}"),
                ))?;
                if let Some(slot) = self.backends.get_mut(*host) {
                    *slot = Some(b);
                }
                report(Effect::BackendUp(*host));
            }
            Kind::Deregister { agent } => {
                let url = self.agents.get(*agent).context("agent")?.url();
                register_web(&url, *agent)?;
                report(Effect::Registered {
                    service: "web".into(),
                    addr: format!("{}:8080", host_ip(*agent)),
                });
            }
            Kind::Churn { agent, service } => self.end_churn(*agent, service, report)?,
            Kind::ClockStep { target, .. } => self.set_clock(*target, 0)?,
            Kind::GossipLoss { agents, .. } => {
                for a in agents {
                    self.lab.clear_loss(a + 1)?;
                }
                report(Effect::NetHealed(agents.clone()));
            }
            Kind::Partition { .. } => {
                let all: Vec<usize> = (1..=self.agents.len()).collect();
                self.lab.heal(&all)?;
                report(Effect::NetHealed((0..self.agents.len()).collect()));
            }
        }
        Ok(())
    }

    /// `agent` deregisters `service`, and the churn cron hosts of `service` stop.
    fn end_churn(
        &mut self,
        agent: usize,
        service: &str,
        report: &mut dyn FnMut(Effect),
    ) -> Result<()> {
        let port = churn_port(service);
        let url = self.agents.get(agent).context("agent")?.url();
        fleet::deregister_at(&url, service, port, Some(&host_ip(agent)))?;
        report(Effect::Deregistered {
            service: service.to_string(),
            addr: format!("{}:{port}", host_ip(agent)),
        });
        for (s, cron) in &mut self.churn_crons {
            if s == service {
                cron.stop();
            }
        }
        report(Effect::CronStopped {
            service: service.to_string(),
            addr: format!("{}:{port}", churn_ip(usize::from(port))),
        });
        Ok(())
    }
}

/// Base URL of registry replica `r`.
fn registry_url(lab: &Lab, r: usize) -> String {
    format!("http://{}:{}", lab.gateway(), 7700 + 10 * r)
}

/// Starts the DynamoDB-compatible server and creates the table: (its guard, its endpoint).
fn start_dynamo(dynamo: DynamoStarter<'_>) -> Result<(Box<dyn std::any::Any>, String)> {
    let (g, e) = dynamo()?;
    let (code, out, err) = run(
        &[
            "registry",
            "init-table",
            "--dynamodb-table",
            TABLE,
            "--dynamodb-endpoint",
            &e,
            "--region",
            "us-east-1",
        ],
        SETTLE,
    )?;
    if code != 0 {
        bail!("init-table failed: {out}\n{err}");
    }
    Ok((g, e))
}

/// Starts `store`'s registry replicas on the lab's gateway, sharing the DynamoDB table at
/// `endpoint` when there is one.
fn start_replicas(
    store: Store,
    lab: &Lab,
    dir: &Path,
    endpoint: Option<&str>,
) -> Result<Vec<Registry>> {
    let mut replicas = Vec::new();
    for r in 0..store.replicas() {
        let addr = format!("{}:{}", lab.gateway(), 7700 + 10 * r);
        let mut args: Vec<String> = [
            "registry",
            "--listen",
            &addr,
            "--ttl",
            &seconds(TTL),
            "--check-in-interval",
            &seconds(REGISTRY_INTERVAL),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(e) = endpoint {
            for a in [
                "--store",
                "dynamodb",
                "--dynamodb-table",
                TABLE,
                "--dynamodb-endpoint",
                e,
                "--region",
                "us-east-1",
            ] {
                args.push(a.to_string());
            }
        }
        let mut reg = Registry {
            proc: None,
            name: format!("registry-{r}"),
            args,
            clock: dir.join(format!("clock-registry-{r}")),
        };
        reg.start()?;
        replicas.push(reg);
    }
    Ok(replicas)
}

/// Starts the agents in their namespaces (agent 0 first, the others joining it), each
/// talking to a replica in turn, and registers their web endpoints.
fn start_agents(agents: usize, lab: &Lab, dir: &Path, replicas: usize) -> Result<Vec<Agent>> {
    let seed = format!("{}:{GOSSIP_PORT}", lab.ip(1));
    let mut fleet_agents = Vec::new();
    for a in 0..agents {
        // The web endpoint is registered through the local API (below, and again after
        // each restart, as a service manager would): only those can be deregistered.
        let extra = fleet::joining(a == 0, &seed, &[]);
        let clock = dir.join(format!("clock-agent-{a}")).display().to_string();
        let env = vec![(schema_clock_env().to_string(), clock)];
        let data = dir.join(format!("agent-{a}"));
        let reg = registry_url(lab, a % replicas);
        // The web and churn endpoints it registers are on its own host address, which
        // the agent accepts only when told the address is this host's.
        let config = format!("host_ips = [\"{}\"]\n{AGENT_CONFIG}", host_ip(a));
        let agent = lab.agent_env(a + 1, &data, &reg, &extra, env, &config)?;
        register_web(&agent.url(), a)?;
        fleet_agents.push(agent);
    }
    Ok(fleet_agents)
}

/// Registers agent `a`'s web endpoint (port 8080 at its backend's address).
fn register_web(url: &str, a: usize) -> Result<()> {
    let ip = host_ip(a);
    fleet::register(
        url,
        &format!(r#"{{"service": "web", "port": 8080, "ip": "{ip}"}}"#),
    )
}

/// `churnN` listens on port 9000 + N.
fn churn_port(service: &str) -> u16 {
    let n: u16 = service.trim_start_matches("churn").parse().unwrap_or(0);
    9000 + n % 1000
}
