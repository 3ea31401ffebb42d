//! `gateway exec` and `gateway detach`: running a command inside the
//! intercepted cgroup, and removing every program the gateway pinned.

use std::process::ExitCode;

use anyhow::{bail, Context as _};

use super::{require_root, resolve_cgroups};
use crate::{config::Config, intercept, intercept::Status};

/// Arguments of `gateway exec`.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// `gateway exec -- CMD ARGS...`: only returns when the command could not
/// be started.
pub fn run(config: &Config, args: &ExecArgs) -> anyhow::Result<ExitCode> {
    let command = &args.command;
    use std::os::unix::process::CommandExt as _;
    require_root("gateway exec")?;
    let cgroups = resolve_cgroups(config, false)?;
    let Some(cgroup) = cgroups.first() else { bail!("intercept.cgroups is empty") };
    match Status::read(&config.intercept.bpffs_dir)? {
        None => {
            bail!("no gateway has attached under {}: start `gateway run` first", config.intercept.bpffs_dir.display())
        }
        Some(s) if s.mode != "redirect" => {
            eprintln!("gateway: warning: the gateway is stopped; intercepted connections will be refused");
        }
        Some(_) => {}
    }
    cgroup.add_process(std::process::id())?;
    let (program, args) = command.split_first().context("no command given")?;
    let err = std::process::Command::new(program).args(args).exec();
    bail!("executing {program}: {err}")
}

/// `gateway detach`.
pub fn detach(config: &Config) -> anyhow::Result<ExitCode> {
    require_root("gateway detach")?;
    intercept::detach_all(&config.intercept.bpffs_dir)?;
    println!("detached everything pinned under {}", config.intercept.bpffs_dir.display());
    Ok(ExitCode::SUCCESS)
}
