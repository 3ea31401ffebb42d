//! `gateway identity explain|check`: the operator's view of attestation and
//! mappings, for writing rules and for CI of the mapping file itself. What
//! the process controls (paths, environment, labels built from it) is
//! printed through [`crate::term::safe`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::Config;
use crate::identity::{
    record_for_live_pid, Attestation, Attested, Attestor, Explanation, IdentityConfig, IdentityResolver, MappingFile,
    RuleOutcome,
};
use crate::term::safe;

/// `gateway identity ...`.
#[derive(Debug, Clone, Args)]
pub struct IdentityArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: IdentityCommand,
}

/// Subcommands of `gateway identity`.
#[derive(Debug, Clone, Subcommand)]
pub enum IdentityCommand {
    /// Attest a live process (as if it connected now) and show which rule
    /// maps it, or why each rule does not.
    Explain {
        /// Process id.
        #[arg(long)]
        pid: u32,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Validate a mapping file; prints every error as file:line:column.
    Check {
        /// The mapping file.
        file: PathBuf,
    },
}

/// Runs a `gateway identity` subcommand.
pub fn run(config: &Config, args: &IdentityArgs) -> anyhow::Result<ExitCode> {
    let config = &config.identity;
    Ok(match &args.command {
        IdentityCommand::Explain { pid, json } => explain(config, *pid, *json),
        IdentityCommand::Check { file } => check_with(config, file),
    })
}

/// Validates `path` under `config`: exit 0 when valid, 2 (after printing
/// each error as `file:line:column: message`) otherwise.
pub fn check_with(config: &IdentityConfig, path: &Path) -> ExitCode {
    match MappingFile::load_with(path, config) {
        Ok(f) => {
            println!("{}: OK ({} rules)", path.display(), f.len());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!("{}: {} error(s)", path.display(), errors.len());
            ExitCode::from(2)
        }
    }
}

/// Attests live process `pid` with connect time = now and explains its
/// identity under `config.mappings`. Exit 0 when attested, 1 when not,
/// 2 when the mapping file is broken.
pub fn explain(config: &IdentityConfig, pid: u32, json: bool) -> ExitCode {
    let resolver = match IdentityResolver::from_config(config) {
        Ok(r) => r,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            return ExitCode::from(2);
        }
    };
    let mut attestation = match record_for_live_pid(pid) {
        Ok(record) => Attestor::new(&config.attest_config()).attest(&record),
        Err(e) => Attestation::Unattested { reason: e.to_string() },
    };
    if let Attestation::Attested(a) = &mut attestation {
        // What the proxy adds before resolving: the container's name and image.
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(config.container_runtimes().enrich(a)),
            Err(e) => eprintln!("not asking the container runtime: {e}"),
        }
    }
    let explanation = resolver.explain(&attestation);
    if json {
        let out = serde_json::json!({ "attestation": attestation, "explanation": explanation });
        match serde_json::to_string_pretty(&out) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("serialising: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        if let Attestation::Attested(a) = &attestation {
            print_attested(a);
        }
        print_explanation(&explanation);
    }
    if matches!(attestation, Attestation::Attested(_)) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_attested(a: &Attested) {
    println!("process {} (comm {:?})", a.pid, a.comm);
    println!("  uid/gid      {}/{} ({})", a.uid, a.gid, a.user.as_deref().unwrap_or("no passwd entry"));
    println!(
        "  exe          {}{}{}",
        safe(&a.exe.path),
        if a.exe.deleted { " (deleted)" } else { "" },
        if a.exe.root_owned { " [root-owned]" } else { " [not root-owned: path is job-controlled]" }
    );
    println!("  exe sha256   {}", a.exe.sha256);
    println!("  cmdline      {:?}", a.cmdline);
    println!("  cwd          {}", safe(a.cwd.as_deref().unwrap_or("-")));
    println!("  cgroup       {}", safe(a.cgroup.as_deref().unwrap_or("-")));
    if let Some(c) = &a.container {
        println!(
            "  container    {} {} pod {}",
            c.runtime.as_str(),
            safe(&c.id),
            safe(c.pod_uid.as_deref().unwrap_or("-"))
        );
        match (&c.name, &c.image) {
            (Some(name), Some(image)) => println!("  container    name {name:?} image {image:?}"),
            _ => println!("  container    no name or image: no configured runtime confirmed it"),
        }
    }
    for (k, v) in &a.env {
        println!("  env          {}={}", safe(k), safe(v));
    }
    for p in &a.ancestors {
        let exe = p.exe.as_ref().map_or("-", |e| e.path.as_str());
        println!("  ancestor     {} {}", p.pid, safe(exe));
    }
}

fn print_explanation(e: &Explanation) {
    if let Some(reason) = &e.unattested_reason {
        println!("unattested: {}", safe(reason));
    }
    match &e.mappings {
        Some(m) => println!("mappings     {m}"),
        None => println!("mappings     none configured"),
    }
    let mut chosen = false;
    for r in &e.rules {
        let verdict = match &r.outcome {
            RuleOutcome::Matched { uri } if !chosen => {
                chosen = true;
                format!("MATCH -> {uri}")
            }
            RuleOutcome::Matched { uri } => format!("would match ({uri}) but an earlier rule won"),
            RuleOutcome::SelectorFailed { selector, reason } => format!("no: {selector}: {reason}"),
            RuleOutcome::Untrusted { reason } => format!("no: {reason}"),
            RuleOutcome::TemplateFailed { reason } => format!("no: {reason}"),
        };
        println!("  rule {:<4} {:<24} {}", r.index, safe(&r.rule), safe(&verdict));
    }
    println!("identity     {}", safe(&e.identity.uri));
    for (k, v) in &e.identity.labels {
        println!("  label      {}={}", safe(k), safe(v));
    }
}
