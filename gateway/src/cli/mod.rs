//! The command line: the clap [`Cli`] and its dispatch ([`main`]), the
//! daemon's start-up ([`daemon`], `gateway run`), and one module per command
//! group (`store`: the fleet's central store). Domain modules (`findings`, `record`, `approval`, `policy`, ...)
//! know nothing of clap or of the terminal: the commands here parse
//! arguments, call their library functions and print what they return
//! through [`crate::term`].
//!
//! Every command has the same shape: `run(&Config, &Args) ->
//! anyhow::Result<ExitCode>` (`config check` takes the file instead: it must
//! work when the configuration does not load). `Ok` carries the command's own outcome
//! (commands that report a refusal or a verification failure print it and
//! choose the status); `Err` means the command could not run at all, and is
//! printed as `gateway: <error>` with the status of [`Command::error_status`].

use std::{path::PathBuf, process::ExitCode};

use anyhow::bail;
use clap::{Parser, Subcommand};
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use crate::{
    config::{Config, LogFormat, Source},
    intercept::{self, Cgroup},
};

pub mod approvals;
pub mod ca;
pub mod config_check;
pub mod daemon;
pub mod doctor;
pub mod exec;
pub mod findings;
pub mod identity;
pub mod policy;
pub mod scan;
pub mod sessions;
pub mod since;
pub mod status;
pub mod store;

/// Transparent interception gateway for shared CI runner hosts.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about)]
pub struct Cli {
    /// Configuration file (YAML) [default: /etc/ci-gateway/gateway.yaml].
    /// A file named here (or in GATEWAY_CONFIG) must exist; the embedded
    /// defaults apply only when no file is named and the default one is absent.
    #[arg(long, global = true, env = "GATEWAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to the configured cgroups and run the proxy until SIGINT/SIGTERM.
    Run,
    /// Run a command inside the intercepted cgroup of the running gateway.
    Exec(exec::ExecArgs),
    /// Show the pinned interception state (mode, map sizes, counters).
    Status(status::StatusArgs),
    /// Detach every program the gateway pinned (uninstalling, or recovering a host).
    Detach,
    /// Configuration commands.
    Config {
        /// What to do with it.
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Scan files or standard input for static keys, like a secret scanner.
    Scan(scan::ScanArgs),
    /// The gateway's certificate authority.
    Ca(ca::CaArgs),
    /// Make the host trust the gateway's CA.
    Trust(ca::TrustArgs),
    /// In a job's environment: which TLS runtimes trust the gateway, and the fix.
    Doctor(doctor::DoctorArgs),
    /// Review static-key findings.
    Findings(findings::FindingsArgs),
    /// Explain process identities, check mapping files.
    Identity(identity::IdentityArgs),
    /// Check policy files, explain which rule decides a request.
    Policy(policy::PolicyArgs),
    /// List, approve and deny requests held for just-in-time approval.
    Approvals(approvals::ApprovalsArgs),
    /// List, show, replay, export and verify recorded sessions.
    Sessions(sessions::SessionsArgs),
    /// The fleet's central store: schema migrations and status.
    Store(store::StoreArgs),
}

/// `gateway config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file and print the effective configuration (YAML).
    Check {
        /// The file (defaults to --config, then /etc/ci-gateway/gateway.yaml).
        file: Option<PathBuf>,
    },
}

impl Command {
    /// Exit status when the command could not run at all (its `Err`): 1 for
    /// the daemon and host commands, whose only failure is that one; 2 for
    /// the review commands, which keep 1 for "ran, and the answer is no"
    /// (a refusal, a missing finding, a broken session).
    pub fn error_status(&self) -> ExitCode {
        match self {
            Command::Run | Command::Exec(_) | Command::Status(_) | Command::Detach => ExitCode::FAILURE,
            Command::Ca(_) | Command::Trust(_) => ExitCode::FAILURE,
            Command::Config { .. }
            | Command::Doctor(_)
            | Command::Scan(_)
            | Command::Findings(_)
            | Command::Identity(_)
            | Command::Policy(_)
            | Command::Approvals(_)
            | Command::Sessions(_)
            | Command::Store(_) => ExitCode::from(2),
        }
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = dispatch(&cli);
    result.unwrap_or_else(|e| {
        eprintln!("gateway: {e:#}");
        cli.command.error_status()
    })
}

/// Loads the configuration and runs the command.
fn dispatch(cli: &Cli) -> anyhow::Result<ExitCode> {
    // Checking a configuration must not require a loadable one.
    if let Command::Config { command: ConfigCommand::Check { file } } = &cli.command {
        return Ok(config_check::run(file.as_deref().or(cli.config.as_deref())));
    }
    let (config, source) = match Config::load_chosen(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    // Held until the command returns: dropping it flushes the daemon's queue.
    let _log = init_logging(&config, matches!(cli.command, Command::Run));
    if let Source::Defaults(path) = &source {
        tracing::info!(path = %path.display(), "configuration file not found; using the embedded defaults");
    }
    match &cli.command {
        Command::Run => daemon::run(&config),
        Command::Exec(args) => exec::run(&config, args),
        Command::Status(args) => status::run(&config, args),
        Command::Detach => exec::detach(&config),
        Command::Scan(args) => scan::run(&config, args),
        Command::Ca(args) => ca::run_ca(&config, args),
        Command::Trust(args) => ca::run_trust(&config, args),
        Command::Doctor(args) => doctor::run(&config, args),
        Command::Findings(args) => findings::run(&config, args),
        Command::Identity(args) => identity::run(&config, args),
        Command::Policy(args) => policy::run(&config, args),
        Command::Approvals(args) => approvals::run(&config, args),
        Command::Sessions(args) => sessions::run(&config, args),
        Command::Store(args) => store::run(&config, args),
        Command::Config { command: ConfigCommand::Check { file } } => {
            Ok(config_check::run(file.as_deref().or(cli.config.as_deref())))
        }
    }
}

/// Sets up the log: masked stderr, written in place for the commands and
/// without ever blocking for the daemon (see [`crate::logging`]), whose
/// guard must be held until the last line.
fn init_logging(config: &Config, daemon: bool) -> Option<crate::logging::LogGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let daemon_log = if daemon {
        crate::logging::daemon()
            .map_err(|e| eprintln!("gateway: cannot start the log writer thread ({e}); logging in place"))
            .ok()
    } else {
        None
    };
    let (writer, guard) = match daemon_log {
        Some((writer, guard)) => (BoxMakeWriter::new(writer), Some(guard)),
        None => (BoxMakeWriter::new(crate::mask::log::MaskedStderr), None),
    };
    // A closed stderr (a restarted journald, a dead pipe) must not take the
    // gateway down: its own error reporting would panic on the same stream.
    // Lines are masked once `gateway run` has its detector (see `mask::log`).
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).log_internal_errors(false);
    // Logging may already be set up (tests call into the library); that is fine.
    let _ = match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    guard
}

/// Refuses early, with the reason, when a command that loads or reads eBPF
/// state is not run as root.
fn require_root(what: &str) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root (loading eBPF programs and attaching them to cgroups); run it with sudo");
    }
    Ok(())
}

/// The configured intercepted cgroups (`create`: make missing ones).
fn resolve_cgroups(config: &Config, create: bool) -> anyhow::Result<Vec<Cgroup>> {
    let mount = intercept::cgroup::cgroup2_mount()?;
    config.intercept.cgroups.iter().map(|spec| Cgroup::resolve(&mount, spec, create).map_err(Into::into)).collect()
}
