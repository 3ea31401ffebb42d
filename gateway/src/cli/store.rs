//! `gateway store ...`: the fleet's central store: apply its schema
//! migrations, show its schema version and this host's shipping backlog,
//! prune what is old enough (`fleet::prune`).

use std::process::ExitCode;

use anyhow::Context as _;

use crate::{config::Config, fleet};

/// Arguments of `gateway store`.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: StoreCommand,
}

/// Sub-commands of `gateway store`.
#[derive(Debug, clap::Subcommand)]
pub enum StoreCommand {
    /// Apply the central store's schema migrations (each in a transaction).
    Migrate {
        /// Connection string or URL of the store [default: fleet.store].
        #[arg(long, value_name = "URL")]
        store: Option<String>,
    },
    /// Show the central store's schema version and this host's backlog.
    Status {
        /// Connection string or URL of the store [default: fleet.store].
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete from the central store what ended before a time: ended
    /// sessions with all their records, finished and expired approval
    /// requests with their decisions, answered central decisions. Findings
    /// are kept.
    Prune {
        /// Connection string or URL of the store [default: fleet.store].
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        /// The cut-off: a time (RFC 3339, YYYY-MM-DD) or an age (90d, 26w).
        #[arg(long, value_parser = super::since::parse_since)]
        before: time::OffsetDateTime,
        /// Count what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `gateway store`.
pub fn run(config: &Config, args: &StoreArgs) -> anyhow::Result<ExitCode> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async {
        match &args.command {
            StoreCommand::Migrate { store } => {
                let mut client = fleet::connect(&config.fleet, store.as_deref()).await?;
                let done = fleet::migrate(&mut client).await?;
                if done.from == done.to {
                    println!("central store schema is up to date (version {})", done.to);
                } else {
                    println!("central store schema migrated from version {} to {}", done.from, done.to);
                }
                Ok(ExitCode::SUCCESS)
            }
            StoreCommand::Status { store, json } => {
                let client = fleet::connect(&config.fleet, store.as_deref()).await?;
                let version = fleet::schema_version(&client).await?;
                let backlog = fleet::backlog(config)?;
                let host_id = config.fleet.host_id()?;
                // Central decisions this host has not applied yet (schema 2 on).
                let unapplied =
                    if version >= 2 { Some(fleet::approvals::unapplied(&client, &host_id).await?) } else { None };
                // Hosts by fingerprint key (schema 3 on): one group is a fleet
                // whose findings merge across hosts.
                let keys = if version >= 3 { Some(fleet::fingerprint_keys(&client).await?) } else { None };
                if *json {
                    let report = serde_json::json!({
                        "schema_version": version,
                        "known_version": fleet::SCHEMA_VERSION,
                        "host_id": host_id,
                        "backlog": backlog,
                        "central_approvals": unapplied.map(|n| serde_json::json!({ "unapplied_decisions": n })),
                        "fingerprint_keys": keys.as_ref().map(|keys| keys
                            .iter()
                            .map(|(id, hosts)| serde_json::json!({ "key_id": id, "hosts": hosts }))
                            .collect::<Vec<_>>()),
                    });
                    println!("{report}");
                } else {
                    println!("schema version:  {version} (this gateway ships against {})", fleet::SCHEMA_VERSION);
                    println!("host id:         {}", crate::term::safe(&host_id));
                    println!("backlog:         {}", backlog.total);
                    match unapplied {
                        Some(n) => println!("central approvals: on ({n} decisions for this host not applied yet)"),
                        None => println!("central approvals: not in this schema (run `gateway store migrate`)"),
                    }
                    match keys.as_deref() {
                        None => {}
                        Some([]) => println!("fingerprint keys: none registered yet"),
                        Some([(id, hosts)]) => println!("fingerprint keys: one ({id}), shared by {} hosts", hosts.len()),
                        Some(groups) => {
                            println!(
                                "fingerprint keys: {} DIFFERENT: a secret seen on hosts of two groups is two findings; give every host the same state_dir/detect-fingerprint.key",
                                groups.len()
                            );
                            for (id, hosts) in groups {
                                let hosts: Vec<String> = hosts.iter().map(|h| crate::term::safe(h)).collect();
                                println!("  {id}: {}", hosts.join(", "));
                            }
                        }
                    }
                }
                Ok(if version == fleet::SCHEMA_VERSION { ExitCode::SUCCESS } else { ExitCode::from(1) })
            }
            StoreCommand::Prune { store, before, dry_run, json } => {
                let mut client = fleet::connect(&config.fleet, store.as_deref()).await?;
                let cut = i64::try_from(before.unix_timestamp_nanos()).context("--before is out of range")?;
                let pruned = fleet::prune::prune(&mut client, cut, *dry_run).await?;
                if *json {
                    let before = before.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
                    println!("{}", serde_json::json!({ "dry_run": dry_run, "before": before, "pruned": pruned }));
                } else {
                    let verb = if *dry_run { "would delete" } else { "deleted" };
                    println!(
                        "{verb}: {} sessions ({} records), {} approval requests ({} decisions), {} central decisions; \
                         findings are kept",
                        pruned.sessions, pruned.records, pruned.approvals, pruned.decisions, pruned.central_decisions
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}
