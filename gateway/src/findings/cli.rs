//! `gateway findings ...`.

use std::process::ExitCode;

use crate::config::Config;

/// Arguments of `gateway findings`.
#[derive(Debug, clap::Args)]
pub struct FindingsArgs {}

/// Runs `gateway findings`.
pub fn run(_config: &Config, _args: &FindingsArgs) -> ExitCode {
    ExitCode::from(2)
}
