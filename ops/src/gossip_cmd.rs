//! `tidings gossip simulate|keygen`: sizing a cluster before running it (like serf's
//! convergence simulator), and making cluster keys.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::cli::parse_duration;

#[derive(Debug, Subcommand)]
pub enum GossipCommand {
    /// Print a new gossip encryption key (base64, 32 bytes from the OS RNG).
    Keygen,
    /// Run N agents' gossip in virtual time (deterministic for a seed) and report convergence,
    /// dead-owner detection, false "down" verdicts and steady-state bandwidth.
    Simulate(SimulateArgs),
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
    /// Probability a UDP datagram is lost, 0.0-0.9.
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also split the cluster in two halves for this long, then heal (0s: no partition).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub partition: Duration,
    /// Gossip round length.
    #[arg(long, value_parser = parse_duration, default_value = "200ms")]
    pub gossip_interval: Duration,
    /// Repair (anti-entropy) period.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub repair_interval: Duration,
    /// Seal packets as in production (costs CPU, changes sizes by the AEAD overhead).
    #[arg(long)]
    pub encrypt: bool,
    /// Instead of the scripted phases, hold a registry catalog of this many services in
    /// snapshots and churn it (0: off). Prints bandwidth held and churning, and convergence.
    #[arg(long, default_value_t = 0)]
    pub registry_services: usize,
    /// Hosts per registry service.
    #[arg(long, default_value_t = 100)]
    pub registry_hosts: usize,
    /// Registry endpoint changes per second.
    #[arg(long, default_value_t = 10)]
    pub registry_churn: u32,
    /// How long the churn lasts.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub registry_churn_for: Duration,
    /// Share of nodes that cannot reach the registry (they learn by gossip only), 0.0-1.0.
    #[arg(long, default_value_t = 0.01)]
    pub registry_blind: f64,
}

pub async fn main(cmd: GossipCommand) -> ExitCode {
    match cmd {
        GossipCommand::Keygen => {
            println!("{}", gossip::generate_key());
            ExitCode::SUCCESS
        }
        GossipCommand::Simulate(args) => simulate(args).await,
    }
}

async fn simulate(args: SimulateArgs) -> ExitCode {
    if args.nodes < 2 || args.nodes > 20_000 || !(0.0..=0.9).contains(&args.loss) {
        eprintln!("tidings gossip simulate: --nodes must be 2-20000 and --loss 0.0-0.9");
        return ExitCode::from(crate::EXIT_USAGE);
    }
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let cfg = gossip::SimConfig {
        nodes: args.nodes,
        loss: args.loss,
        seed: args.seed,
        partition_ms: ms(args.partition),
        gossip_interval_ms: ms(args.gossip_interval).max(1),
        repair_interval_ms: ms(args.repair_interval).max(1),
        encrypt: args.encrypt,
        ..gossip::SimConfig::default()
    };
    if args.registry_services > 0 {
        if args.registry_services > 100_000
            || !(1..=10_000).contains(&args.registry_hosts)
            || !(0.0..=1.0).contains(&args.registry_blind)
        {
            eprintln!(
                "tidings gossip simulate: --registry-services must be 0-100000, --registry-hosts 1-10000 and --registry-blind 0.0-1.0"
            );
            return ExitCode::from(crate::EXIT_USAGE);
        }
        let load = gossip::RegistryLoad {
            services: args.registry_services,
            hosts_per_service: args.registry_hosts,
            changes_per_sec: args.registry_churn.clamp(1, 1_000),
            churn_ms: ms(args.registry_churn_for).min(3_600_000),
            blind: args.registry_blind,
            ..gossip::RegistryLoad::default()
        };
        let run = move || gossip::simulate_registry(cfg, load).to_string();
        return print_report(tokio::task::spawn_blocking(run).await);
    }
    // The simulator is CPU-bound and synchronous: keep it off the async workers.
    print_report(tokio::task::spawn_blocking(move || gossip::simulate(cfg).to_string()).await)
}

fn print_report(done: Result<String, tokio::task::JoinError>) -> ExitCode {
    match done {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tidings gossip simulate: {e}");
            ExitCode::from(1)
        }
    }
}
