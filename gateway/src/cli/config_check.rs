//! `gateway config check`: validating a configuration file and printing the
//! effective configuration as YAML.

use std::{path::Path, process::ExitCode};

use crate::config::{Config, Source, DEFAULT_CONFIG_PATH};

/// Checks the configuration the gateway would run with: `explicit` (a file
/// named on the command line, which must exist) or, without one,
/// [`DEFAULT_CONFIG_PATH`] or the embedded defaults when that is absent.
///
/// Exit 0 with the effective configuration (YAML, every field, defaults
/// filled in, secrets redacted) on standard output and the verdict on
/// standard error; 2 with the error when it does not load.
pub fn run(explicit: Option<&Path>) -> ExitCode {
    let (config, source) = match Config::load_chosen(explicit) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(2);
        }
    };
    let yaml = match config.to_yaml() {
        Ok(yaml) => yaml,
        Err(e) => {
            eprintln!("gateway: cannot print the effective configuration: {e}");
            return ExitCode::from(2);
        }
    };
    match source {
        Source::File(path) => eprintln!("{}: OK; the effective configuration follows", path.display()),
        Source::Defaults(_) => {
            eprintln!("{DEFAULT_CONFIG_PATH} does not exist: the gateway runs on the embedded defaults, which follow")
        }
    }
    print!("{yaml}");
    ExitCode::SUCCESS
}
