//! `gateway config check`: validating a configuration file and printing the
//! effective configuration.

use std::{path::Path, process::ExitCode};

use crate::config::{Config, Source};

/// Checks the configuration at `path`: exit 0 and the effective
/// configuration when it loads, 2 with the error when it does not or when
/// there is no such file.
pub fn run(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok((_, Source::Defaults(p))) => {
            eprintln!("gateway: {}: no such file (the gateway would run on its embedded defaults)", p.display());
            ExitCode::from(2)
        }
        Ok((config, Source::File(p))) => {
            println!("{}: OK", p.display());
            println!("{config:#?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::from(2)
        }
    }
}
