//! `tidings agent`, `tidings lookup`, `tidings members`. (Being written: the agent issue.)

use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub struct AgentArgs {}

#[derive(Debug, Args)]
pub struct LookupArgs {}

#[derive(Debug, Args)]
pub struct MembersArgs {}

fn not_yet(what: &str) -> ExitCode {
    eprintln!("tidings {what}: not yet");
    ExitCode::from(crate::EXIT_USAGE)
}

pub async fn agent(_: AgentArgs) -> ExitCode {
    not_yet("agent")
}

pub async fn lookup(_: LookupArgs) -> ExitCode {
    not_yet("lookup")
}

pub async fn members(_: MembersArgs) -> ExitCode {
    not_yet("members")
}
