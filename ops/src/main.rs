//! `tidings`: the one binary. `main` only parses the command line and hands off; every
//! subcommand body lives in its own module (thin binaries).

use std::process::ExitCode;

use clap::Parser;

mod agent_cmd;
mod bench;
mod bench_fleet;
mod bench_xds;
mod checkin;
mod cli;
mod demo;
mod gossip_cmd;
mod proxy_cmd;
mod registry;
mod systemd;
mod telemetry;

use cli::{Cli, Command};

/// Exit code for bad usage or configuration (sysexits EX_USAGE), as linkerd does.
pub const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The simulator runs a thousand nodes in one process: their info logs are noise there.
    let quiet = matches!(
        cli.command,
        Command::Gossip(gossip_cmd::GossipCommand::Simulate(_))
    );
    let level = cli.log_level.as_deref().or(quiet.then_some("warn"));
    telemetry::init(cli.log_format, level);
    let threads = match &cli.command {
        Command::Proxy(args) => args.worker_threads.map(usize::from),
        _ => None,
    };
    let runtime = match runtime(threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidings: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Registry(args) => registry::main(args).await,
            Command::Checkin(args) => checkin::main(args).await,
            Command::Agent(args) => agent_cmd::agent(args).await,
            Command::Lookup(args) => agent_cmd::lookup(args).await,
            Command::Members(args) => agent_cmd::members(args).await,
            Command::Proxy(args) => proxy_cmd::main(args).await,
            Command::Gossip(cmd) => gossip_cmd::main(cmd).await,
            Command::Bench(args) => bench::main(args).await,
            Command::Demo(args) => demo::main(args).await,
        }
    })
}

/// The one runtime; `threads` sizes it (default: one worker per CPU). One thread means the
/// current-thread scheduler: everything on this thread, with no cross-thread hand-offs.
fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}
