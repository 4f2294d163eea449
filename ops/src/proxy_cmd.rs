//! `tidings proxy`: the config (TOML file, then flags), bind, log every bound address, serve,
//! and on SIGTERM fail readiness and drain (docs/ARCHITECTURE.md#proxy, docs/OPERATING.md#deploying).
//!
//! Without `--config` the flags describe the common sidecar on their own:
//! `tidings proxy --agent URL --route web --route api=/api`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use proxy::config::{ClusterConfig, HealthCheckKind, ListenerConfig, RouteConfig};
use proxy::lb::LbPolicy;
use proxy::{Proxy, ProxyConfig, ProxyError};
use tokio_util::sync::CancellationToken;

use crate::EXIT_USAGE;
use crate::cli::parse_duration;

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// TOML config file (see ops/deploy/proxy.toml); flags override its keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// HTTP listener address, repeatable; replaces the file's HTTP listeners (other listener
    /// keys come from the first of them; TCP listeners are kept) [default: 127.0.0.1:7710].
    #[arg(long = "listen")]
    pub listen: Vec<SocketAddr>,
    /// Admin listener (/clusters, /ready, /metrics) [default: 127.0.0.1:7711].
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Membership source for every cluster: the local agent, or any registry
    /// [default: http://127.0.0.1:7701].
    #[arg(long)]
    pub agent: Option<String>,
    /// `SERVICE` (requests whose Host is SERVICE), `SERVICE=HOST` or `SERVICE=/PREFIX`;
    /// repeatable. Given, these replace the file's routes; each uses the file's cluster named
    /// SERVICE if there is one, else a cluster with the defaults.
    #[arg(long = "route", value_parser = parse_route)]
    pub routes: Vec<RouteFlag>,
    /// Load-balancing policy for every cluster [default: round-robin].
    #[arg(long, value_enum)]
    pub lb: Option<LbFlag>,
    /// HTTP health-check path for every cluster [default: /healthcheck].
    #[arg(long)]
    pub health_path: Option<String>,
    /// Health-check interval for every cluster [default: 5s].
    #[arg(long, value_parser = parse_duration)]
    pub health_interval: Option<Duration>,
    /// This proxy's zone; turns on zone-aware balancing.
    #[arg(long)]
    pub zone: Option<String>,
    /// Async runtime worker threads [default: one per CPU]. Read by `main` to size the runtime.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
}

/// One `--route`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFlag {
    pub service: String,
    pub host: Option<String>,
    pub path_prefix: Option<String>,
}

fn parse_route(s: &str) -> Result<RouteFlag, String> {
    let (service, target) = match s.split_once('=') {
        Some((svc, t)) => (svc, Some(t)),
        None => (s, None),
    };
    if service.is_empty() || target.is_some_and(str::is_empty) {
        return Err(format!(
            "route {s:?}: expected SERVICE, SERVICE=HOST or SERVICE=/PREFIX"
        ));
    }
    let (host, path_prefix) = match target {
        None => (Some(service.to_string()), None),
        Some(p) if p.starts_with('/') => (None, Some(p.to_string())),
        Some(h) => (Some(h.to_string()), None),
    };
    Ok(RouteFlag {
        service: service.to_string(),
        host,
        path_prefix,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LbFlag {
    LeastRequest,
    RoundRobin,
    Random,
    RingHash,
    Maglev,
}

impl From<LbFlag> for LbPolicy {
    fn from(f: LbFlag) -> Self {
        match f {
            LbFlag::LeastRequest => LbPolicy::LeastRequest,
            LbFlag::RoundRobin => LbPolicy::RoundRobin,
            LbFlag::Random => LbPolicy::Random,
            LbFlag::RingHash => LbPolicy::RingHash,
            LbFlag::Maglev => LbPolicy::Maglev,
        }
    }
}

/// Reads the file (if any), applies the flags and validates the result.
pub fn settings(args: &ProxyArgs) -> Result<ProxyConfig> {
    let mut cfg = match &args.config {
        Some(path) => ProxyConfig::from_file(path)?,
        None => ProxyConfig::default(),
    };
    if !args.listen.is_empty() {
        // The flags replace the HTTP listeners; the file's TCP listeners stay.
        let (tcp, http): (Vec<_>, Vec<_>) = cfg.listeners.drain(..).partition(|l| l.is_tcp());
        let template = http.into_iter().next().unwrap_or_default();
        cfg.listeners = args
            .listen
            .iter()
            .map(|&address| ListenerConfig {
                address,
                ..template.clone()
            })
            .chain(tcp)
            .collect();
    }
    if let Some(a) = args.admin {
        cfg.admin.address = a;
    }
    if args.zone.is_some() {
        cfg.zone.clone_from(&args.zone);
    }
    if !args.routes.is_empty() {
        apply_routes(&mut cfg, &args.routes);
    }
    for c in &mut cfg.clusters {
        if let Some(url) = &args.agent {
            c.membership_url.clone_from(url);
        }
        if let Some(lb) = args.lb {
            c.lb_policy = lb.into();
        }
        if let Some(path) = &args.health_path {
            c.health_check.kind = HealthCheckKind::Http;
            c.health_check.path.clone_from(path);
        }
        if let Some(i) = args.health_interval {
            c.health_check.interval = i;
        }
    }
    if cfg.routes.is_empty() && cfg.listeners.iter().any(|l| !l.is_tcp()) {
        bail!("no routes: give --route SERVICE[=HOST|/PREFIX] or a --config file with [[routes]]");
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Replaces the routes. Clusters keep their file settings when a route names them; clusters
/// neither a route nor a TCP listener uses any more are dropped, since they would be watched
/// and health-checked for nothing.
fn apply_routes(cfg: &mut ProxyConfig, routes: &[RouteFlag]) {
    let tcp_clusters: Vec<&String> = cfg
        .listeners
        .iter()
        .filter(|l| l.is_tcp())
        .filter_map(|l| l.cluster.as_ref())
        .collect();
    let mut clusters: Vec<ClusterConfig> = cfg
        .clusters
        .iter()
        .filter(|c| tcp_clusters.contains(&&c.name))
        .cloned()
        .collect();
    for r in routes {
        if clusters.iter().any(|c| c.name == r.service) {
            continue;
        }
        let from_file = cfg.clusters.iter().find(|c| c.name == r.service).cloned();
        clusters.push(from_file.unwrap_or_else(|| ClusterConfig {
            name: r.service.clone(),
            service: r.service.clone(),
            ..ClusterConfig::default()
        }));
    }
    cfg.clusters = clusters;
    cfg.routes = routes
        .iter()
        .map(|r| RouteConfig {
            host: r.host.clone(),
            path_prefix: r.path_prefix.clone(),
            cluster: r.service.clone(),
            ..RouteConfig::default()
        })
        .collect();
}

pub async fn main(args: ProxyArgs) -> ExitCode {
    let config = match settings(&args) {
        Ok(c) => c,
        Err(e) => return usage(&e),
    };
    let listeners = config.listeners.clone();
    let proxy = match Proxy::bind(config).await {
        Ok(p) => p,
        Err(e @ (ProxyError::Config(_) | ProxyError::Tls(_))) => return usage(&e.into()),
        Err(e) => {
            eprintln!("tidings proxy: {e}");
            return ExitCode::from(1);
        }
    };
    for (addr, l) in proxy.listen_addrs.iter().zip(&listeners) {
        match &l.cluster {
            Some(cluster) if l.is_tcp() => tracing::info!(%addr, %cluster, "proxy tcp listening"),
            _ => tracing::info!(%addr, "proxy listening"),
        }
    }
    tracing::info!(addr = %proxy.admin_addr, "proxy admin listening");
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        crate::telemetry::shutdown_signal().await;
        tracing::info!("shutdown signal: failing readiness and draining");
        trigger.cancel();
    });
    match proxy.run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidings proxy: {e}");
            ExitCode::from(1)
        }
    }
}

/// Bad configuration: one line saying why, exit 64.
fn usage(e: &anyhow::Error) -> ExitCode {
    let line = format!("{e:#}")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("tidings proxy: {line}");
    ExitCode::from(EXIT_USAGE)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: ProxyArgs,
    }

    fn args(flags: &[&str]) -> ProxyArgs {
        Cli::try_parse_from(std::iter::once("proxy").chain(flags.iter().copied()))
            .expect("flags parse")
            .args
    }

    fn example() -> String {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/proxy.toml")
            .display()
            .to_string()
    }

    #[test]
    fn the_example_config_loads_through_the_command_line() {
        let cfg = settings(&args(&["--config", &example()])).expect("example is valid");
        assert_eq!(cfg.clusters.len(), 1);
        assert_eq!(cfg.routes[0].cluster, cfg.clusters[0].name);
        assert_eq!(cfg.admin.address, SocketAddr::from(([127, 0, 0, 1], 7711)));
    }

    #[test]
    fn flags_alone_make_a_sidecar() {
        let cfg = settings(&args(&[
            "--listen",
            "127.0.0.2:0",
            "--admin",
            "127.0.0.2:0",
            "--agent",
            "http://127.0.0.1:7700",
            "--route",
            "web",
            "--route",
            "api=/api",
            "--route",
            "api=api.internal",
            "--lb",
            "least-request",
            "--health-interval",
            "250ms",
            "--zone",
            "z1",
        ]))
        .expect("valid");
        assert_eq!(cfg.listeners.len(), 1);
        assert_eq!(cfg.listeners[0].address.to_string(), "127.0.0.2:0");
        assert_eq!(cfg.zone.as_deref(), Some("z1"));
        let names: Vec<&str> = cfg.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["web", "api"]);
        for c in &cfg.clusters {
            assert_eq!(c.membership_url, "http://127.0.0.1:7700");
            assert_eq!(c.lb_policy, LbPolicy::LeastRequest);
            assert_eq!(c.health_check.interval, Duration::from_millis(250));
            assert_eq!(c.health_check.path, "/healthcheck");
        }
        let r = &cfg.routes;
        assert_eq!(
            (r[0].host.as_deref(), r[0].path_prefix.as_deref()),
            (Some("web"), None)
        );
        assert_eq!(
            (r[1].host.as_deref(), r[1].path_prefix.as_deref()),
            (None, Some("/api"))
        );
        assert_eq!(r[2].host.as_deref(), Some("api.internal"));
        assert_eq!(r[2].cluster, "api");
    }

    #[test]
    fn flags_override_the_file() {
        let cfg = settings(&args(&[
            "--config",
            &example(),
            "--listen",
            "127.0.0.1:9000",
            "--route",
            "users=/",
            "--route",
            "orders",
            "--health-path",
            "/up",
        ]))
        .expect("valid");
        assert_eq!(cfg.listeners[0].address.to_string(), "127.0.0.1:9000");
        assert_eq!(
            cfg.listeners[0].max_header_bytes, 65536,
            "kept from the file"
        );
        let names: Vec<&str> = cfg.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["users", "orders"]);
        assert!(cfg.clusters.iter().all(|c| c.health_check.path == "/up"));
    }

    #[test]
    fn a_tcp_only_file_needs_no_routes_and_listen_flags_keep_its_tcp_listeners() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(
            &mut file,
            b"[[listeners]]\naddress = \"127.0.0.1:6380\"\nprotocol = \"tcp\"\ncluster = \"redis\"\n\
              [[clusters]]\nname = \"redis\"\nservice = \"redis\"\n",
        )
        .expect("write");
        let path = file.path().display().to_string();
        let cfg = settings(&args(&["--config", &path])).expect("tcp only, no routes");
        assert_eq!(cfg.listeners.len(), 1);
        let err = settings(&args(&["--config", &path, "--listen", "127.0.0.1:0"]))
            .expect_err("an HTTP listener needs routes");
        assert!(err.to_string().contains("--route"), "{err}");
        let cfg = settings(&args(&[
            "--config",
            &path,
            "--listen",
            "127.0.0.1:0",
            "--route",
            "web",
        ]))
        .expect("valid");
        let tcp: Vec<bool> = cfg.listeners.iter().map(|l| l.is_tcp()).collect();
        assert_eq!(tcp, [false, true]);
    }

    #[test]
    fn bad_configuration_is_refused_with_a_reason() {
        let err = settings(&args(&[])).expect_err("no routes");
        assert!(err.to_string().contains("--route"), "{err}");
        let err = settings(&args(&["--route", "Bad Name"])).expect_err("bad service");
        assert!(format!("{err:#}").contains("Bad Name"), "{err:#}");
        assert!(parse_route("web=").is_err());
        assert!(parse_route("=web").is_err());
        let mut bad = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(&mut bad, b"[[routes]]\ncluster = \"a\"\nservise = 1\n")
            .expect("write");
        let path = bad.path().display().to_string();
        let err = settings(&args(&["--config", &path])).expect_err("typo");
        assert!(format!("{err:#}").contains("servise"), "{err:#}");
    }
}
