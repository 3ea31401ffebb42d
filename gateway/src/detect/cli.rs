//! `gateway scan`.

use std::process::ExitCode;

use crate::config::Config;

/// Arguments of `gateway scan`.
#[derive(Debug, clap::Args)]
pub struct ScanArgs {}

/// Runs `gateway scan`.
pub fn run(_config: &Config, _args: &ScanArgs) -> ExitCode {
    ExitCode::from(2)
}
