//! `tidings gossip simulate|keygen`. (Being written: the gossip issue.)

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum GossipCommand {
    /// Print a new gossip encryption key.
    Keygen,
}

pub async fn main(_: GossipCommand) -> ExitCode {
    eprintln!("tidings gossip: not yet");
    ExitCode::from(crate::EXIT_USAGE)
}
