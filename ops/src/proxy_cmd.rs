//! `tidings proxy`. (Being written: the proxy issue.)

use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub struct ProxyArgs {}

pub async fn main(_: ProxyArgs) -> ExitCode {
    eprintln!("tidings proxy: not yet");
    ExitCode::from(crate::EXIT_USAGE)
}
