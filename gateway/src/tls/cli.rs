//! `gateway ca ...` and `gateway trust ...`.

use std::process::ExitCode;

use crate::config::Config;

/// Arguments of `gateway ca`.
#[derive(Debug, clap::Args)]
pub struct CaArgs {}

/// Arguments of `gateway trust`.
#[derive(Debug, clap::Args)]
pub struct TrustArgs {}

/// Runs `gateway ca`.
pub fn run_ca(_config: &Config, _args: &CaArgs) -> ExitCode {
    ExitCode::from(2)
}

/// Runs `gateway trust`.
pub fn run_trust(_config: &Config, _args: &TrustArgs) -> ExitCode {
    ExitCode::from(2)
}
