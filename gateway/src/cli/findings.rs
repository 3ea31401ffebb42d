//! `gateway findings ...`: the security team's review commands.
//!
//! Exit status: 0 on success, 1 when the request cannot be honoured (no such
//! finding, disallowed status change), 2 on usage, configuration or database
//! errors.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use time::OffsetDateTime;

use super::since::{parse_expiry, parse_since, Expiry};
use crate::{
    config::Config,
    findings::{
        AllowEntry, AllowId, ExportFormat, Finding, FindingId, FindingStore, FindingsError, ListFilter, Scope, Status,
    },
    term::{cell, safe, when, Keep, Table},
};

/// Arguments of `gateway findings`.
#[derive(Debug, clap::Args)]
pub struct FindingsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: FindingsCommand,
}

/// Sub-commands of `gateway findings`.
#[derive(Debug, clap::Subcommand)]
pub enum FindingsCommand {
    /// List findings, most recently seen first.
    List {
        /// Only findings with this status (open, acknowledged, resolved, false_positive).
        #[arg(long, value_parser = parse_status)]
        status: Option<Status>,
        /// Only findings of rules matching this glob.
        #[arg(long)]
        rule: Option<String>,
        /// Only findings with a sighting sent to a host matching this glob.
        #[arg(long, visible_alias = "destination")]
        host: Option<String>,
        /// Only the finding of this key fingerprint.
        #[arg(long)]
        fingerprint: Option<String>,
        /// Only findings with a sighting by an identity matching this glob.
        #[arg(long)]
        identity: Option<String>,
        /// Only findings with a sighting from a CI project matching this glob
        /// (CI_PROJECT_PATH, GITHUB_REPOSITORY, ...).
        #[arg(long)]
        project: Option<String>,
        /// Only findings seen since this time: RFC 3339, a date (YYYY-MM-DD, UTC)
        /// or an age such as 30m, 24h, 7d, 1h 30m.
        #[arg(long, value_parser = parse_since)]
        since: Option<OffsetDateTime>,
        /// Print JSON (an array of findings, with history).
        #[arg(long)]
        json: bool,
        /// List the fleet's central store instead (a PostgreSQL connection
        /// string or URL; TLS and password as in `fleet:`): one finding per
        /// key and rule, with each host that saw it.
        #[arg(long, value_name = "URL", conflicts_with_all = ["status", "rule", "host", "fingerprint", "identity", "project", "since"])]
        store: Option<String>,
    },
    /// Show one finding: the key, its review history and the timeline of
    /// every sighting (who, from where, to where, what was done, session).
    Show {
        /// Finding id (F-12 or 12).
        #[arg(value_parser = parse_id)]
        id: FindingId,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Acknowledge a finding: seen, rotation under way.
    Ack(ReviewArgs),
    /// Mark a finding resolved: the key has been rotated.
    Resolve(ReviewArgs),
    /// Mark a finding as not a real key.
    FalsePositive(ReviewArgs),
    /// Reopen a finding.
    Reopen(ReviewArgs),
    /// Accept the risk of a finding's key in a scope until an expiry: the
    /// gateway stops blocking it there (it is still recorded).
    Allow {
        /// Finding id (F-12 or 12).
        #[arg(value_parser = parse_id)]
        id: FindingId,
        /// Where: everywhere, destination=<host> or identity=<identity>.
        #[arg(long)]
        scope: Scope,
        /// Until when: a duration from now (8h, 30d), an RFC 3339 time, a date, or never.
        #[arg(long, value_parser = parse_expiry)]
        expires: Expiry,
        /// Why the risk is accepted (recorded in the history).
        #[arg(long)]
        reason: String,
        /// Who decides; defaults to your user name (only root may name somebody else).
        #[arg(long)]
        by: Option<String>,
    },
    /// List allowlist entries (active ones; --all adds expired and revoked).
    Allowlist {
        /// Include expired and revoked entries.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an allowlist entry: blocking resumes.
    Revoke {
        /// Allowlist entry id (A-3 or 3).
        #[arg(value_parser = parse_allow_id)]
        id: AllowId,
        /// Why (recorded in the history).
        #[arg(long)]
        comment: String,
        /// Who; defaults to your user name (only root may name somebody else).
        #[arg(long)]
        by: Option<String>,
    },
    /// Export every finding.
    Export {
        /// Output format.
        #[arg(long, value_enum)]
        format: Format,
        /// Write to this file (replaced atomically) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `--format` of `gateway findings export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A JSON array of findings, history included.
    Json,
    /// SARIF 2.1.0, for code-scanning dashboards.
    Sarif,
    /// CSV with a header row, for spreadsheets.
    Csv,
}

impl From<Format> for ExportFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Json => ExportFormat::Json,
            Format::Sarif => ExportFormat::Sarif,
            Format::Csv => ExportFormat::Csv,
        }
    }
}

/// Arguments of the status-changing commands.
#[derive(Debug, clap::Args)]
pub struct ReviewArgs {
    /// Finding ids (F-12 or 12); several are changed in order, stopping at
    /// the first that cannot be.
    #[arg(value_parser = parse_id, required = true, num_args = 1..)]
    pub ids: Vec<FindingId>,
    /// Who makes the change (recorded in the history); defaults to your
    /// user name (only root may name somebody else).
    #[arg(long)]
    pub by: Option<String>,
    /// Why (recorded in the history).
    #[arg(long)]
    pub comment: String,
}

fn parse_status(s: &str) -> Result<Status, String> {
    s.parse()
}

fn parse_id(s: &str) -> Result<FindingId, String> {
    s.parse()
}

fn parse_allow_id(s: &str) -> Result<AllowId, String> {
    s.parse()
}

/// The reviewer a decision is recorded under: the user this command runs
/// as, which the kernel vouches for. Only root may record a decision under
/// another name (`--by`), as for approvals.
pub(crate) fn reviewer(by: Option<&str>) -> Result<String, String> {
    let uid = nix::unistd::getuid();
    let own = nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(|| format!("uid {uid}"), |u| u.name);
    match by.map(str::trim) {
        None => Ok(own),
        Some("") => Err("--by must name the reviewer".into()),
        Some(name) if name == own || uid.is_root() => Ok(name.to_owned()),
        Some(name) => Err(format!("you are {own}; only root may record a decision as {name}")),
    }
}

/// Runs `gateway findings`.
pub fn run(config: &Config, args: &FindingsArgs) -> anyhow::Result<ExitCode> {
    Ok(run_reporting(config, args))
}

/// `gateway findings list --store URL`: the central store's findings, with the hosts that saw each.
fn list_central(config: &Config, url: &str, json: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the async runtime: {e}"))?;
    let findings = runtime.block_on(async {
        let client = crate::fleet::connect(&config.fleet, Some(url)).await?;
        crate::fleet::read::findings(&client).await
    })?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &findings)?;
        writeln!(out)?;
        return Ok(());
    }
    let mut t = Table::new(["ID", "RULE", "KEY", "LAST SEEN", "SIGHTINGS", "HOSTS (local id: status)"]);
    for f in &findings {
        let last = OffsetDateTime::from_unix_timestamp_nanos(i128::from(f.last_seen))
            .map(when)
            .unwrap_or_else(|_| f.last_seen.to_string());
        let hosts: Vec<String> =
            f.hosts.iter().map(|h| format!("{} (F-{}: {})", safe(&h.host_id), h.local_id, safe(&h.status))).collect();
        t.row([f.id.to_string(), safe(&f.rule_id), safe(&f.preview), last, f.sightings.to_string(), hosts.join(", ")]);
    }
    out.write_all(t.render().as_bytes())?;
    Ok(())
}

/// [`run`]: every failure is printed here, with its exit status.
fn run_reporting(config: &Config, args: &FindingsArgs) -> ExitCode {
    if let Err((field, reason)) = config.findings.validate() {
        eprintln!("gateway: configuration: {field}: {reason}");
        return ExitCode::from(2);
    }
    if let FindingsCommand::List { store: Some(url), json, .. } = &args.command {
        return match list_central(config, url, *json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gateway: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let path = config.findings.database_path(&config.state_dir);
    if let Some(socket) = config.findings.review_socket.as_deref() {
        if !matches!(args.command, FindingsCommand::Export { .. }) {
            return through_socket(socket, &args.command);
        }
    }
    match execute(&path, &args.command) {
        Ok(()) => ExitCode::SUCCESS,
        // `gateway findings list | head`: the reader has what it wanted.
        Err(Failure::Findings(FindingsError::Export { source, .. }) | Failure::Output { source, .. })
            if source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            ExitCode::SUCCESS
        }
        Err(Failure::Findings(e)) => {
            eprintln!("gateway: {e}");
            ExitCode::from(if e.is_request_error() { 1 } else { 2 })
        }
        Err(Failure::NotFoundNoDb(id)) => {
            eprintln!("gateway: {id}: no such finding (there is no findings database at {} yet)", path.display());
            ExitCode::from(1)
        }
        Err(Failure::Output { what, source }) => {
            eprintln!("gateway: {what}: {source}");
            ExitCode::from(2)
        }
        Err(Failure::Usage(message)) => {
            eprintln!("gateway: {message}");
            ExitCode::from(2)
        }
    }
}

enum Failure {
    Findings(FindingsError),
    NotFoundNoDb(FindingId),
    Output { what: String, source: std::io::Error },
    Usage(String),
}

impl From<FindingsError> for Failure {
    fn from(e: FindingsError) -> Self {
        Failure::Findings(e)
    }
}

fn output_error(source: impl Into<std::io::Error>) -> Failure {
    Failure::Output { what: "writing to standard output".into(), source: source.into() }
}

fn execute(path: &Path, command: &FindingsCommand) -> Result<(), Failure> {
    // Reading commands on a host where the gateway never recorded anything
    // should say so, not create an empty database as the reviewer's user.
    let store = if path.exists() { Some(FindingStore::open(path)?) } else { None };
    let mut stdout = std::io::stdout().lock();
    match command {
        FindingsCommand::List { status, rule, host, fingerprint, identity, project, since, json, .. } => {
            let filter = ListFilter {
                status: *status,
                rule: rule.clone(),
                host: host.clone(),
                since: *since,
                fingerprint: fingerprint.clone(),
                identity: identity.clone(),
                project: project.clone(),
            };
            let findings = match &store {
                Some(store) => store.list(&filter)?,
                None => Vec::new(),
            };
            if *json {
                serde_json::to_writer_pretty(&mut stdout, &findings).map_err(output_error)?;
                writeln!(stdout).map_err(output_error)?;
            } else if findings.is_empty() {
                let note =
                    if store.is_none() { format!(" (no database at {} yet)", path.display()) } else { String::new() };
                writeln!(stdout, "no findings{note}").map_err(output_error)?;
            } else {
                stdout.write_all(table(&findings).as_bytes()).map_err(output_error)?;
            }
        }
        FindingsCommand::Show { id, json } => {
            let store = store.ok_or(Failure::NotFoundNoDb(*id))?;
            let finding = store.get(*id)?.ok_or(FindingsError::NotFound(*id))?;
            if *json {
                serde_json::to_writer_pretty(&mut stdout, &finding).map_err(output_error)?;
                writeln!(stdout).map_err(output_error)?;
            } else {
                stdout.write_all(detail(&finding).as_bytes()).map_err(output_error)?;
            }
        }
        FindingsCommand::Ack(a) => review(store, &mut stdout, a, Status::Acknowledged)?,
        FindingsCommand::Resolve(a) => review(store, &mut stdout, a, Status::Resolved)?,
        FindingsCommand::FalsePositive(a) => review(store, &mut stdout, a, Status::FalsePositive)?,
        FindingsCommand::Reopen(a) => review(store, &mut stdout, a, Status::Open)?,
        FindingsCommand::Allow { id, scope, expires, reason, by } => {
            let by = reviewer(by.as_deref()).map_err(Failure::Usage)?;
            let store = store.ok_or(Failure::NotFoundNoDb(*id))?;
            let entry = store.allow(*id, scope, expires.at(), reason, &by)?;
            writeln!(stdout, "{}", allow_line(&entry)).map_err(output_error)?;
        }
        FindingsCommand::Allowlist { all, json } => {
            let now = OffsetDateTime::now_utc();
            let mut entries = match &store {
                Some(store) => store.allowlist()?,
                None => Vec::new(),
            };
            if !*all {
                entries.retain(|e| e.active(now));
            }
            if *json {
                serde_json::to_writer_pretty(&mut stdout, &entries).map_err(output_error)?;
                writeln!(stdout).map_err(output_error)?;
            } else if entries.is_empty() {
                writeln!(stdout, "no allowlist entries").map_err(output_error)?;
            } else {
                stdout.write_all(allow_table(&entries, now).as_bytes()).map_err(output_error)?;
            }
        }
        FindingsCommand::Revoke { id, comment, by } => {
            let by = reviewer(by.as_deref()).map_err(Failure::Usage)?;
            let store = store.ok_or(Failure::Findings(FindingsError::NoSuchAllowEntry(*id)))?;
            let entry = store.revoke(*id, &by, comment)?;
            writeln!(stdout, "{}: revoked (by {})", entry.id, safe(&by)).map_err(output_error)?;
        }
        FindingsCommand::Export { format, out } => {
            let format = ExportFormat::from(*format);
            let export = |w: &mut dyn std::io::Write| -> Result<(), FindingsError> {
                match &store {
                    Some(store) => store.export(format, w),
                    // No database yet: a valid, empty export.
                    None => FindingStore::export_empty(format, w),
                }
            };
            match out.as_deref() {
                None => export(&mut stdout)?,
                Some(file) if file == Path::new("-") => export(&mut stdout)?,
                Some(file) => write_atomically(file, export)?,
            }
        }
    }
    Ok(())
}

fn review(
    store: Option<FindingStore>,
    out: &mut dyn std::io::Write,
    args: &ReviewArgs,
    to: Status,
) -> Result<(), Failure> {
    let by = reviewer(args.by.as_deref()).map_err(Failure::Usage)?;
    let first = args.ids.first().copied().unwrap_or(FindingId(0));
    let store = store.ok_or(Failure::NotFoundNoDb(first))?;
    for id in &args.ids {
        let finding = store.set_status(*id, to, &by, &args.comment)?;
        let from = finding.history.last().and_then(|h| h.from).map_or("-", Status::as_str);
        writeln!(out, "{}: {} -> {} (by {})", finding.id, from, finding.status, safe(&by)).map_err(output_error)?;
    }
    Ok(())
}

/// `A-3: F-12 allowed destination=api.example.com until ... (by alice)`.
pub(crate) fn allow_line(e: &AllowEntry) -> String {
    let until = e.expires_at.map_or_else(|| "until revoked".to_owned(), |t| format!("until {}", when(t)));
    format!("{}: {} allowed {} {} (by {})", e.id, e.finding, safe(&e.scope.to_string()), until, safe(&e.created_by))
}

fn allow_table(entries: &[AllowEntry], now: OffsetDateTime) -> String {
    let mut table = Table::new(["ID", "FINDING", "SCOPE", "EXPIRES", "STATE", "BY", "REASON"]);
    for e in entries {
        let state = if e.revoked_at.is_some() {
            "revoked"
        } else if e.active(now) {
            "active"
        } else {
            "expired"
        };
        table.row([
            e.id.to_string(),
            e.finding.to_string(),
            cell(&e.scope.to_string(), 40, Keep::Start),
            e.expires_at.map_or_else(|| "never".to_owned(), when),
            state.to_owned(),
            cell(&e.created_by, 16, Keep::Start),
            cell(&e.reason, 40, Keep::Start),
        ]);
    }
    table.render()
}

/// Runs a review command through the gateway's review socket: the gateway
/// records the decision under the caller the kernel reports and applies it
/// to the gate at once. `--by` is passed on; the gateway honours it for root
/// only.
fn through_socket(socket: &Path, command: &FindingsCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gateway: starting the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let client = crate::api::AdminClient::new(socket);
    let result = runtime.block_on(socket_call(&client, command));
    match result {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    eprintln!("gateway: writing to standard output: {e}");
                    ExitCode::from(2)
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::from(if e.is_refusal() { 1 } else { 2 })
        }
    }
}

fn pretty(v: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(v).map(|s| s + "\n").unwrap_or_default()
}

async fn socket_call(
    client: &crate::api::AdminClient,
    command: &FindingsCommand,
) -> Result<String, crate::api::ClientError> {
    use serde_json::{json, Value};
    let status = |client: &crate::api::AdminClient, a: &ReviewArgs, to: Status| {
        let body = json!({ "status": to, "comment": a.comment, "by": a.by });
        let client = client.clone();
        let ids = a.ids.clone();
        async move {
            let mut text = String::new();
            for id in ids {
                let f: Value = client.post(&format!("/v1/findings/{id}/status"), &body).await?;
                let last = f["history"].as_array().and_then(|h| h.last()).cloned().unwrap_or_default();
                text.push_str(&format!(
                    "{}: {} -> {} (by {})\n",
                    safe(f["id"].as_str().unwrap_or("-")),
                    safe(last["from"].as_str().unwrap_or("-")),
                    safe(f["status"].as_str().unwrap_or("-")),
                    safe(last["by"].as_str().unwrap_or("-"))
                ));
            }
            Ok::<_, crate::api::ClientError>(text)
        }
    };
    match command {
        FindingsCommand::List { status, rule, host, fingerprint, identity, project, since, json, .. } => {
            let mut query = Vec::new();
            let mut add = |k: &str, v: Option<String>| {
                if let Some(v) = v {
                    query.push(format!("{k}={}", percent(&v)));
                }
            };
            add("status", status.map(|s| s.as_str().to_owned()));
            add("rule", rule.clone());
            add("host", host.clone());
            add("fingerprint", fingerprint.clone());
            add("identity", identity.clone());
            add("project", project.clone());
            add("since", since.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()));
            let path =
                if query.is_empty() { "/v1/findings".to_owned() } else { format!("/v1/findings?{}", query.join("&")) };
            let v: Value = client.get(&path).await?;
            if *json {
                return Ok(pretty(&v));
            }
            let findings: Vec<Finding> = serde_json::from_value(v).map_err(|e| crate::api::ClientError::Exchange {
                path: PathBuf::new(),
                reason: format!("decoding findings: {e}"),
            })?;
            Ok(if findings.is_empty() { "no findings\n".to_owned() } else { table(&findings) })
        }
        FindingsCommand::Show { id, json } => {
            let v: Value = client.get(&format!("/v1/findings/{id}")).await?;
            if *json {
                return Ok(pretty(&v));
            }
            let finding: Finding = serde_json::from_value(v).map_err(|e| crate::api::ClientError::Exchange {
                path: PathBuf::new(),
                reason: format!("decoding the finding: {e}"),
            })?;
            Ok(detail(&finding))
        }
        FindingsCommand::Ack(a) => status(client, a, Status::Acknowledged).await,
        FindingsCommand::Resolve(a) => status(client, a, Status::Resolved).await,
        FindingsCommand::FalsePositive(a) => status(client, a, Status::FalsePositive).await,
        FindingsCommand::Reopen(a) => status(client, a, Status::Open).await,
        FindingsCommand::Allow { id, scope, expires, reason, by } => {
            let expires_at = expires.at().and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
            let body = json!({ "scope": scope.to_string(), "expires_at": expires_at, "reason": reason, "by": by });
            let e: AllowEntry = client.post(&format!("/v1/findings/{id}/allow"), &body).await?;
            Ok(allow_line(&e) + "\n")
        }
        FindingsCommand::Allowlist { all, json } => {
            let mut entries: Vec<AllowEntry> = client.get("/v1/allowlist").await?;
            let now = OffsetDateTime::now_utc();
            if !*all {
                entries.retain(|e| e.active(now));
            }
            Ok(if *json {
                pretty(&entries)
            } else if entries.is_empty() {
                "no allowlist entries\n".to_owned()
            } else {
                allow_table(&entries, now)
            })
        }
        FindingsCommand::Revoke { id, comment, by } => {
            let body = json!({ "comment": comment, "by": by });
            let e: AllowEntry = client.post(&format!("/v1/allowlist/{id}/revoke"), &body).await?;
            Ok(format!("{}: revoked (by {})\n", e.id, safe(e.revoked_by.as_deref().unwrap_or("-"))))
        }
        // Exports read the database directly (root), see `run_reporting`.
        FindingsCommand::Export { .. } => Ok(String::new()),
    }
}

/// Percent-encodes a query value.
fn percent(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'*' | b'?' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Writes through a temporary file in the same directory and renames it, so
/// a failed export never leaves a truncated file where a good one was.
fn write_atomically(
    file: &Path,
    export: impl FnOnce(&mut dyn std::io::Write) -> Result<(), FindingsError>,
) -> Result<(), Failure> {
    let name = file.file_name().ok_or_else(|| Failure::Usage(format!("--out {}: not a file name", file.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = file.with_file_name(tmp_name);
    let io_err = |source: std::io::Error, p: &Path| Failure::Output { what: p.display().to_string(), source };
    let created = std::fs::File::create(&tmp).map_err(|e| io_err(e, &tmp))?;
    let mut writer = std::io::BufWriter::new(created);
    let result = export(&mut writer)
        .map_err(Failure::from)
        .and_then(|()| writer.into_inner().map_err(|e| io_err(e.into_error(), &tmp)))
        .and_then(|f| f.sync_all().map_err(|e| io_err(e, &tmp)))
        .and_then(|()| std::fs::rename(&tmp, file).map_err(|e| io_err(e, file)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn table(findings: &[Finding]) -> String {
    let mut table = Table::new(["ID", "STATUS", "RULE", "PREVIEW", "DESTINATION", "EXE", "COUNT", "LAST SEEN"])
        // The count.
        .right_align(6);
    for f in findings {
        table.row([
            f.id.to_string(),
            f.status.to_string(),
            cell(&f.rule_id, 28, Keep::Start),
            cell(&f.preview, 24, Keep::Start),
            cell(&f.destination(), 40, Keep::Start),
            cell(f.process.exe.as_deref().unwrap_or("-"), 36, Keep::End),
            f.count.to_string(),
            when(f.last_seen),
        ]);
    }
    table.render()
}

fn detail(f: &Finding) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let p = &f.process;
    let _ = writeln!(s, "{}  {}", f.id, f.status);
    let _ = writeln!(s, "  rule:         {} (confidence {})", safe(&f.rule_id), safe(&f.confidence));
    let _ = writeln!(s, "  key:          {}", safe(&f.preview));
    let _ = writeln!(s, "  fingerprint:  {}", safe(&f.fingerprint));
    let _ = writeln!(s, "  sent to:      {} in {}", safe(&f.destination()), safe(&f.location));
    let _ = writeln!(s, "  action:       {}", f.action);
    let _ =
        writeln!(s, "  seen:         {} time(s), first {}, last {}", f.count, when(f.first_seen), when(f.last_seen));
    let _ = writeln!(
        s,
        "  process:      {} (comm {}, pid {}, uid {})",
        safe(p.exe.as_deref().unwrap_or("(exited before it was read)")),
        safe(&p.comm),
        p.pid,
        p.uid
    );
    let _ = writeln!(s, "  cgroup:       {}", safe(p.cgroup.as_deref().unwrap_or("-")));
    if let Some(c) = &p.container {
        let _ = writeln!(
            s,
            "  container:    {} {} (name {}, image {})",
            c.runtime.as_str(),
            safe(&c.id),
            safe(c.name.as_deref().unwrap_or("-")),
            safe(c.image.as_deref().unwrap_or("-"))
        );
    }
    let _ = writeln!(s, "  identity:     {}", safe(f.identity.as_deref().unwrap_or("-")));
    if p.job.is_empty() {
        let _ = writeln!(s, "  job:          -");
    } else {
        let _ = writeln!(s, "  job:");
        for (k, v) in &p.job {
            let _ = writeln!(s, "    {}={}", safe(k), safe(v));
        }
    }
    if let Some(into) = f.merged_into {
        let _ = writeln!(s, "  merged into:  {into} (one finding per key and rule); its sightings follow");
    }
    let _ = writeln!(s, "history:");
    for h in &f.history {
        let change = match h.from {
            Some(from) => format!("{from} -> {}", h.to),
            None => format!("(new) -> {}", h.to),
        };
        let _ = writeln!(s, "  {}  {:<28}  {}: {}", when(h.at), change, safe(&h.by), safe(&h.comment));
    }
    if !f.sightings.is_empty() {
        let _ = writeln!(s, "sightings ({}):", f.sightings.len());
    }
    for x in &f.sightings {
        let p = &x.process;
        let dest = if x.dest_host.contains(':') {
            format!("[{}]:{}", x.dest_host, x.dest_port)
        } else {
            format!("{}:{}", x.dest_host, x.dest_port)
        };
        let allowed = x.allowed_by.as_deref().map(|a| format!(" (allowed by {})", safe(a))).unwrap_or_default();
        let _ =
            writeln!(s, "  {}  {}{} -> {} in {}", when(x.seen_at), x.action, allowed, safe(&dest), safe(&x.location));
        let _ = writeln!(s, "      identity: {}", safe(x.identity.as_deref().unwrap_or("-")));
        let job: Vec<String> = p
            .job
            .iter()
            .filter(|(k, _)| JOB_SUMMARY.contains(&k.as_str()))
            .map(|(k, v)| format!("{}={}", safe(k), safe(v)))
            .collect();
        if !job.is_empty() {
            let _ = writeln!(s, "      job:      {}", job.join(" "));
        }
        let _ = writeln!(
            s,
            "      process:  {} (pid {}, uid {})",
            safe(p.exe.as_deref().unwrap_or("(exited before it was read)")),
            p.pid,
            p.uid
        );
        if let Some(command) = &x.command {
            let _ = writeln!(s, "      command:  {}", safe(command));
        }
        if let Some(script) = &x.script {
            let _ = writeln!(s, "      script:   {}", safe(script));
        }
        if let Some(c) = &p.container {
            let _ = writeln!(
                s,
                "      container: {} {} ({})",
                c.runtime.as_str(),
                safe(&c.id),
                safe(c.name.as_deref().or(c.image.as_deref()).unwrap_or("-"))
            );
        }
        if let Some(session) = &x.session_id {
            let _ = writeln!(s, "      session:  {}", safe(session));
        }
    }
    s
}

/// Job variables shown per sighting in the timeline (all are in `--json`).
const JOB_SUMMARY: &[&str] = &[
    "CI_PROJECT_PATH",
    "CI_JOB_ID",
    "CI_PIPELINE_ID",
    "GITHUB_REPOSITORY",
    "GITHUB_RUN_ID",
    "GITHUB_JOB",
    "BUILDKITE_PIPELINE_SLUG",
    "BUILDKITE_BUILD_NUMBER",
    "JOB_NAME",
    "BUILD_NUMBER",
];

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: FindingsArgs,
    }

    fn parse(args: &[&str]) -> Result<FindingsCommand, clap::Error> {
        Wrapper::try_parse_from(std::iter::once("findings").chain(args.iter().copied())).map(|w| w.args.command)
    }

    #[test]
    fn command_line() {
        assert!(matches!(
            parse(&["list", "--status", "false-positive", "--json"]).unwrap(),
            FindingsCommand::List { status: Some(Status::FalsePositive), json: true, .. }
        ));
        assert!(matches!(parse(&["show", "F-7"]).unwrap(), FindingsCommand::Show { id: FindingId(7), json: false }));
        match parse(&["false-positive", "3", "--by", "alice", "--comment", "test fixture"]).unwrap() {
            FindingsCommand::FalsePositive(a) => {
                assert_eq!(
                    (a.ids, a.by.as_deref(), a.comment.as_str()),
                    (vec![FindingId(3)], Some("alice"), "test fixture")
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["ack", "3", "--comment", "x"]).is_ok(), "--by defaults to the caller");
        match parse(&["resolve", "F-1", "F-2", "3", "--comment", "rotated"]).unwrap() {
            FindingsCommand::Resolve(a) => assert_eq!(a.ids, [FindingId(1), FindingId(2), FindingId(3)]),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["resolve", "--comment", "rotated"]).is_err(), "an id is required");
        assert!(matches!(
            parse(&["allow", "F-3", "--scope", "destination=API.a.com", "--expires", "90s", "--reason", "r"]).unwrap(),
            FindingsCommand::Allow { id: FindingId(3), scope: Scope::Destination(_), expires: Expiry::At(_), .. }
        ));
        assert!(parse(&["allow", "F-3", "--scope", "nowhere", "--expires", "90s", "--reason", "r"]).is_err());
        assert!(parse(&["allow", "F-3", "--scope", "everywhere", "--reason", "r"]).is_err(), "--expires is required");
        assert!(parse(&["show", "X-1"]).is_err());
        assert!(parse(&["list", "--status", "closed"]).is_err());
        assert!(matches!(
            parse(&["export", "--format", "sarif", "--out", "/tmp/x"]).unwrap(),
            FindingsCommand::Export { format: Format::Sarif, out: Some(_) }
        ));
        assert!(parse(&["export", "--format", "xml"]).is_err());
    }

    #[test]
    fn job_text_cannot_drive_the_terminal() {
        let at = time::macros::datetime!(2024-05-02 09:14:03 UTC);
        let finding = Finding {
            id: FindingId(1),
            rule_id: "openai-api-key".into(),
            confidence: "high".into(),
            fingerprint: "fp".into(),
            preview: "sk-ab…wxyz".into(),
            location: "header:authorization\u{1b}".into(),
            dest_host: "api.openai.com".into(),
            dest_port: 443,
            process: crate::process::ProcessSnapshot {
                exe: Some("/usr/bin/cu\u{202e}lr".into()),
                comm: "curl\u{1b}[2J".into(),
                job: [("CI_JOB_NAME".to_owned(), "build\u{2067}".to_owned())].into(),
                ..Default::default()
            },
            identity: Some("spiffe://ci/\u{061c}job".into()),
            first_seen: at,
            last_seen: at,
            count: 2,
            action: crate::findings::Action::Block,
            status: Status::Open,
            history: vec![crate::findings::StatusChange {
                from: None,
                to: Status::Open,
                by: "gateway".into(),
                at,
                comment: "seen\u{200f}".into(),
            }],
            merged_into: None,
            sightings: Vec::new(),
        };
        let list = table(std::slice::from_ref(&finding));
        assert!(list.contains("/usr/bin/cu\\u{202e}lr") && list.contains("2024-05-02 09:14:03Z"), "{list}");
        let shown = detail(&finding);
        for escaped in ["curl\\u{1b}[2J", "build\\u{2067}", "\\u{61c}job", "seen\\u{200f}", "authorization\\u{1b}"] {
            assert!(shown.contains(escaped), "{escaped} in {shown}");
        }
        for text in [list, shown] {
            assert!(!text.contains(['\u{1b}', '\u{202e}', '\u{2067}', '\u{061c}', '\u{200f}']), "{text}");
        }
    }
}
