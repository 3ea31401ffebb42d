//! `gateway ca ...` and `gateway trust ...`: the gateway's certificate
//! authority, and making the host and its jobs trust it (system store, an
//! environment file for every common runtime, the JDKs' trust stores). The work is done by
//! [`crate::tls::trust`].
//!
//! Exit status: 0 on success, 1 when the CA or the trust store could not be
//! read or written (the error is printed).

use std::{fs, path::PathBuf, process::ExitCode};

use crate::{
    config::Config,
    tls::{
        trust::{install_trust, uninstall_trust, TrustPaths},
        CertificateAuthority, TlsError,
    },
};

/// Arguments of `gateway ca`.
#[derive(Debug, clap::Args)]
pub struct CaArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: CaCommand,
}

/// `gateway ca ...`.
#[derive(Debug, clap::Subcommand)]
pub enum CaCommand {
    /// Print the CA certificate (PEM), creating the CA on first use.
    Export {
        /// Write the certificate to this file instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// Arguments of `gateway trust`.
#[derive(Debug, clap::Args)]
pub struct TrustArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: TrustCommand,
}

/// `gateway trust ...`.
#[derive(Debug, clap::Subcommand)]
pub enum TrustCommand {
    /// Trust the gateway CA: system store, a CA bundle for jobs, and an env file.
    Install {
        /// Environment file to write (default: tls.env_file).
        #[arg(long, value_name = "PATH")]
        env_file: Option<PathBuf>,
        /// Leave the system trust store alone.
        #[arg(long)]
        no_system: bool,
        /// Leave the JDKs' trust stores alone.
        #[arg(long)]
        no_java: bool,
    },
    /// Undo `trust install` (the CA itself is kept).
    Uninstall {
        /// Environment file to remove (default: tls.env_file).
        #[arg(long, value_name = "PATH")]
        env_file: Option<PathBuf>,
        /// Leave the system trust store alone.
        #[arg(long)]
        no_system: bool,
        /// Leave the JDKs' trust stores alone.
        #[arg(long)]
        no_java: bool,
    },
}

/// Runs `gateway ca`.
pub fn run_ca(config: &Config, args: &CaArgs) -> anyhow::Result<ExitCode> {
    let CaCommand::Export { out } = &args.command;
    let result = CertificateAuthority::load_or_create(&config.state_dir).and_then(|ca| match out {
        None => {
            print!("{}", ca.cert_pem());
            Ok(())
        }
        Some(path) => {
            fs::write(path, ca.cert_pem()).map_err(|e| TlsError::io(path, "write", e))?;
            eprintln!("wrote the gateway CA certificate to {}", path.display());
            Ok(())
        }
    });
    Ok(finish(result.map(|()| Vec::new())))
}

/// Runs `gateway trust`.
pub fn run_trust(config: &Config, args: &TrustArgs) -> anyhow::Result<ExitCode> {
    let result = match &args.command {
        TrustCommand::Install { env_file, no_system, no_java } => {
            let mut paths =
                TrustPaths::for_host(&config.state_dir, env_file.as_deref().unwrap_or(&config.tls.env_file));
            if *no_java {
                paths.java.clear();
            }
            CertificateAuthority::load_or_create(&config.state_dir)
                .and_then(|ca| install_trust(&paths, &ca, !no_system))
        }
        TrustCommand::Uninstall { env_file, no_system, no_java } => {
            let mut paths =
                TrustPaths::for_host(&config.state_dir, env_file.as_deref().unwrap_or(&config.tls.env_file));
            if *no_java {
                paths.java.clear();
            }
            uninstall_trust(&paths, !no_system)
        }
    };
    Ok(finish(result))
}

/// Prints what was done, one line each, or the error (exit 1).
fn finish(result: Result<Vec<String>, TlsError>) -> ExitCode {
    match result {
        Ok(actions) => {
            for action in actions {
                println!("{action}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn clap_accepts_the_documented_command_lines() {
        use clap::Parser as _;
        for line in [
            &["gateway", "ca", "export"][..],
            &["gateway", "ca", "export", "--out", "/tmp/ca.pem"],
            &["gateway", "trust", "install"],
            &["gateway", "trust", "install", "--env-file", "/tmp/x.env", "--no-system"],
            &["gateway", "trust", "uninstall", "--no-system"],
        ] {
            crate::cli::Cli::try_parse_from(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        }
    }
}
