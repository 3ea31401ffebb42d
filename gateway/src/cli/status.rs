//! `gateway status`: the pinned interception state (mode, map sizes,
//! counters, served namespaces) and the containers the configured runtimes
//! run, with those the intercepted cgroups do not cover, and the fleet
//! backlog (rows not yet shipped to the central store).

use std::process::ExitCode;

use anyhow::{bail, Context as _};

use super::{require_root, resolve_cgroups};
use crate::{config::Config, intercept::Status, term::safe};

/// Arguments of `gateway status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `gateway status`.
pub fn run(config: &Config, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let json = args.json;
    require_root("gateway status")?;
    let Some(status) = Status::read(&config.intercept.bpffs_dir)? else {
        bail!("nothing is pinned under {}: no gateway is attached", config.intercept.bpffs_dir.display());
    };
    let containers = container_status(config)?;
    let fleet = fleet_status(config, status.gateway_tgid);
    if json {
        #[derive(serde::Serialize)]
        struct Report<'a> {
            #[serde(flatten)]
            intercept: &'a Status,
            #[serde(flatten)]
            containers: &'a ContainerStatus,
            fleet: &'a Option<FleetStatus>,
        }
        println!("{}", serde_json::to_string(&Report { intercept: &status, containers: &containers, fleet: &fleet })?);
    } else {
        println!("mode:            {}", status.mode);
        println!("gateway pid:     {}", status.gateway_tgid);
        println!("upstream mark:   {:#x}", status.upstream_mark);
        let ports: Vec<String> = status.capture_ports.iter().map(u16::to_string).collect();
        println!("capture ports:   {}", if ports.is_empty() { "(off)".to_owned() } else { ports.join(", ") });
        println!("links:           {}", status.links);
        println!("pending records: {}", status.pending);
        println!("waiting records: {}", status.original);
        println!("served namespaces:");
        for ns in &status.namespaces {
            let cgroup = ns.cgroup.clone().unwrap_or_else(|| "-".into());
            let families = match (ns.v4, ns.v6) {
                (true, true) => "v4+v6",
                (true, false) => "v4",
                (false, true) => "v6",
                (false, false) => "none",
            };
            let what = if ns.host { "(gateway's own)" } else { cgroup.as_str() };
            println!("  netns {:<12} pid {:<8} {families:<6} {what}", ns.cookie, ns.pid);
        }
        for (name, value) in &status.stats {
            println!("{name:<24} {value}");
        }
        containers.print();
        if let Some(f) = &fleet {
            let backlog = match (&f.backlog, &f.error) {
                (Some(b), _) => format!("{} rows not yet shipped{}", b.total, if f.alarm { " (ALARM)" } else { "" }),
                (None, Some(e)) => format!("unknown: {}", safe(e)),
                (None, None) => "unknown".into(),
            };
            println!("fleet backlog:   {backlog} (host id {})", safe(&f.host_id));
            if let Some(age) = f.backlog.as_ref().and_then(|b| b.oldest_age_seconds) {
                println!("oldest unshipped: {age:.1} s ago");
            }
            if let Some(c) = &f.central_approvals {
                println!("central approvals: {}", c.describe());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The fleet part of `gateway status`: rows recorded locally and not yet
/// shipped to the central store (from the local files: no connection).
#[derive(Debug, serde::Serialize)]
struct FleetStatus {
    host_id: String,
    backlog: Option<crate::fleet::Backlog>,
    /// The backlog is at or above `fleet.backlog_alarm`.
    alarm: bool,
    error: Option<String>,
    /// Whether decisions taken on other hosts reach this one (`None` when
    /// `fleet.central_approvals` is off).
    central_approvals: Option<CentralApprovals>,
}

/// `gateway status`'s view of central approvals.
#[derive(Debug, serde::Serialize)]
struct CentralApprovals {
    /// `available`, `unavailable` or `unknown` (the running gateway has not
    /// said).
    state: &'static str,
    since: Option<String>,
    error: Option<String>,
}

impl CentralApprovals {
    fn read(config: &Config, gateway_pid: u32) -> CentralApprovals {
        use crate::fleet::approvals::{read_status, Availability};
        match read_status(&config.state_dir) {
            Some(s) if s.pid == gateway_pid => CentralApprovals {
                state: match s.state {
                    Availability::Available => "available",
                    Availability::Unavailable => "unavailable",
                },
                since: s.since.format(&time::format_description::well_known::Rfc3339).ok(),
                error: s.error,
            },
            _ => CentralApprovals { state: "unknown", since: None, error: None },
        }
    }

    fn describe(&self) -> String {
        let since = self.since.as_deref().map(|s| format!(" since {s}")).unwrap_or_default();
        match self.state {
            "available" => format!("available{since} (decisions taken on other hosts apply here)"),
            "unavailable" => format!(
                "UNAVAILABLE{since}: {}; requests held here can be decided on this host only",
                safe(self.error.as_deref().unwrap_or("unknown error"))
            ),
            _ => "unknown (the running gateway has not reported it)".to_owned(),
        }
    }
}

fn fleet_status(config: &Config, gateway_pid: u32) -> Option<FleetStatus> {
    if !config.fleet.enabled() {
        return None;
    }
    let host_id = config.fleet.host_id().unwrap_or_else(|e| e.to_string());
    let central_approvals = config.fleet.central_approvals.then(|| CentralApprovals::read(config, gateway_pid));
    Some(match crate::fleet::backlog(config) {
        Ok(b) => FleetStatus {
            host_id,
            alarm: b.total >= config.fleet.backlog_alarm,
            backlog: Some(b),
            error: None,
            central_approvals,
        },
        Err(e) => FleetStatus { host_id, backlog: None, alarm: false, error: Some(e.to_string()), central_approvals },
    })
}

/// The container part of `gateway status`: what the configured runtimes
/// run, and which of it the intercepted cgroups cover.
#[derive(Debug, serde::Serialize)]
struct ContainerStatus {
    /// Running containers of every configured runtime that answered.
    containers: Vec<ContainerLine>,
    /// Runtimes that could not be asked.
    runtime_errors: Vec<String>,
    /// Containers whose traffic the gateway does not see.
    warnings: Vec<String>,
}

/// One running container in `gateway status`.
#[derive(Debug, serde::Serialize)]
struct ContainerLine {
    #[serde(flatten)]
    container: crate::identity::RuntimeContainer,
    /// Its cgroup is in (or below) an intercepted cgroup.
    intercepted: bool,
}

fn container_status(config: &Config) -> anyhow::Result<ContainerStatus> {
    let intercepted: Vec<String> = resolve_cgroups(config, false)?.into_iter().map(|c| c.name).collect();
    let runtimes = config.identity.container_runtimes();
    let listings = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(runtimes.running());
    let mut out = ContainerStatus { containers: Vec::new(), runtime_errors: Vec::new(), warnings: Vec::new() };
    for listing in listings {
        match listing.containers {
            Ok(found) => {
                for container in found {
                    let covered =
                        container.cgroup.as_deref().is_some_and(|c| crate::identity::under_any(c, &intercepted));
                    if !covered {
                        out.warnings.push(format!(
                            "container {} ({}, image {}) runs in cgroup {} outside the intercepted cgroups ({}): its connections are not inspected; start job containers with --cgroup-parent under an intercepted cgroup (see docs/operations.md)",
                            container.id.get(..12).unwrap_or(&container.id),
                            container.name,
                            container.image,
                            container.cgroup.as_deref().unwrap_or("(unknown)"),
                            intercepted.join(", "),
                        ));
                    }
                    out.containers.push(ContainerLine { container, intercepted: covered });
                }
            }
            Err(e) => out.runtime_errors.push(e.to_string()),
        }
    }
    Ok(out)
}

impl ContainerStatus {
    fn print(&self) {
        println!("containers:      {} running (identity.container_runtimes)", self.containers.len());
        for line in &self.containers {
            let c = &line.container;
            // Container names and images are chosen by whoever started them.
            println!(
                "  {} {:<24} {:<32} pid {:<8} {} {}",
                safe(c.id.get(..12).unwrap_or(&c.id)),
                safe(&c.name),
                safe(&c.image),
                c.pid,
                safe(c.cgroup.as_deref().unwrap_or("-")),
                if line.intercepted { "intercepted" } else { "NOT INTERCEPTED" }
            );
        }
        for e in &self.runtime_errors {
            println!("runtime error:   {}", safe(e));
        }
        for w in &self.warnings {
            println!("warning: {}", safe(w));
        }
    }
}
