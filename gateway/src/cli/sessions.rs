//! `gateway sessions ...`: list, show, replay, export and verify recorded
//! sessions.
//!
//! Exit status: 0 on success, 1 when a session does not exist, an id prefix
//! is ambiguous or verification finds a broken session; errors (database,
//! output) are returned for the caller to report (exit 2).

use std::{fmt::Write as _, io::Write, path::Path, process::ExitCode, time::Duration};

use time::OffsetDateTime;

use super::since::parse_since;
use crate::{
    config::Config,
    findings::FindingId,
    record::{
        AnyExchange, BodyData, EventData, ExchangeData, MessageData, PostgresExchangeData, Record, RecordError,
        RecordKind, SessionEnd, SessionFilter, SessionMeta, SessionOutcome, SessionStore, SessionSummary,
    },
    term::{safe, safe_keeping, when_ms as when, Keep, Table},
};

/// Arguments of `gateway sessions`.
#[derive(Debug, clap::Args)]
pub struct SessionsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: SessionsCommand,
}

/// Sub-commands of `gateway sessions`.
#[derive(Debug, clap::Subcommand)]
pub enum SessionsCommand {
    /// List sessions, newest first.
    List {
        /// Only sessions whose identity matches this glob (`*`, `?`, `[...]`).
        #[arg(long)]
        identity: Option<String>,
        /// Only sessions started since: RFC 3339, a date (YYYY-MM-DD, UTC) or an
        /// age such as 30m, 1h, 7d, 1h 30m.
        #[arg(long, value_parser = parse_since)]
        since: Option<OffsetDateTime>,
        /// Only sessions to hosts matching this glob.
        #[arg(long)]
        host: Option<String>,
        /// Only sessions that ended this way (closed, blocked, refused, error,
        /// upstream_failed, unattributed, dropped).
        #[arg(long)]
        outcome: Option<SessionOutcome>,
        /// Only the sessions in which this finding's key was seen (F-12).
        #[arg(long, value_parser = |s: &str| s.parse::<FindingId>())]
        finding: Option<FindingId>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON (an array of sessions).
        #[arg(long)]
        json: bool,
        /// List the fleet's central store instead (a PostgreSQL connection
        /// string or URL; TLS and password as in `fleet:`), with each
        /// session's host.
        #[arg(long, value_name = "URL", conflicts_with_all = ["identity", "since", "host", "outcome", "finding"])]
        store: Option<String>,
        /// With --store: only this host's sessions.
        #[arg(long, requires = "store")]
        host_id: Option<String>,
    },
    /// Show a session's metadata and every record.
    Show {
        /// Session id, or an unambiguous prefix of it.
        id: String,
        /// Print JSON (metadata and records, record data decoded).
        #[arg(long)]
        json: bool,
    },
    /// Print a session's exchanges and events in order, with relative times.
    Replay {
        /// Session id, or an unambiguous prefix of it.
        id: String,
        /// Wait between records as long as the session did.
        #[arg(long)]
        realtime: bool,
    },
    /// Print a session's records as JSON lines, hashes included, for offline
    /// verification.
    Export {
        /// Session id, or an unambiguous prefix of it.
        id: String,
    },
    /// Check sessions' hash chains; exit 1 at the first broken one.
    Verify {
        /// Session id, or an unambiguous prefix of it.
        #[arg(required_unless_present_any = ["all", "store"], conflicts_with_all = ["all", "store"])]
        id: Option<String>,
        /// Verify every session.
        #[arg(long)]
        all: bool,
        /// Verify every session the fleet's central store holds (a
        /// PostgreSQL connection string or URL; TLS and password as in
        /// `fleet:`), listing each broken one with its host.
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        /// With --store: only this host's sessions.
        #[arg(long, requires = "store")]
        host_id: Option<String>,
    },
}

/// Runs `gateway sessions` against the configuration's sessions database.
pub fn run(config: &Config, args: &SessionsArgs) -> anyhow::Result<ExitCode> {
    if let SessionsCommand::Verify { store: Some(url), host_id, .. } = &args.command {
        return verify_central(config, url, host_id.as_deref());
    }
    if let SessionsCommand::List { store: Some(url), host_id, limit, json, .. } = &args.command {
        return list_central(config, url, host_id.as_deref(), *limit, *json);
    }
    let findings = config.findings.database_path(&config.state_dir);
    run_on_with(args, &config.record.database_path(&config.state_dir), Some(&findings))
}

/// `gateway sessions verify --store URL`: every chain in the central store.
fn verify_central(config: &Config, url: &str, host: Option<&str>) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the async runtime: {e}"))?;
    let report = runtime.block_on(async {
        let client = crate::fleet::connect(&config.fleet, Some(url)).await?;
        crate::fleet::verify::verify_central(&client, host).await
    })?;
    let mut out = std::io::stdout().lock();
    for b in &report.broken {
        writeln!(out, "{}/{}  {}", safe(&b.host_id), safe(&b.session), safe(&b.problem))?;
    }
    writeln!(out, "{} sessions verified in the central store, {} broken", report.checked, report.broken.len())?;
    Ok(if report.is_intact() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `gateway sessions list --store URL`: the central store's sessions, with their hosts.
fn list_central(config: &Config, url: &str, host: Option<&str>, limit: usize, json: bool) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the async runtime: {e}"))?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let sessions = runtime.block_on(async {
        let client = crate::fleet::connect(&config.fleet, Some(url)).await?;
        crate::fleet::read::sessions(&client, host, limit).await
    })?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &sessions)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t =
        Table::new(["HOST ID", "SESSION", "STARTED", "IDENTITY", "DESTINATION", "PROTOCOL", "OUTCOME", "RECORDS"]);
    for s in &sessions {
        let started = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(s.started))
            .map(when)
            .unwrap_or_else(|_| s.started.to_string());
        t.row([
            safe(&s.host_id),
            safe(&s.id),
            started,
            safe(&s.identity),
            safe(&s.host),
            safe(&s.protocol),
            safe(s.outcome.as_deref().unwrap_or("-")),
            s.records.to_string(),
        ]);
    }
    out.write_all(t.render().as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `gateway sessions` against the database at `database`.
pub fn run_on(args: &SessionsArgs, database: &Path) -> anyhow::Result<ExitCode> {
    run_on_with(args, database, None)
}

/// [`run_on`], with the findings database that `--finding` reads.
fn run_on_with(args: &SessionsArgs, database: &Path, findings: Option<&Path>) -> anyhow::Result<ExitCode> {
    let mut args_ids = None;
    if let SessionsCommand::List { finding: Some(id), .. } = &args.command {
        let path = findings.ok_or_else(|| anyhow::anyhow!("--finding needs the findings database"))?;
        if !path.exists() {
            eprintln!("gateway: {id}: no such finding (there is no findings database at {} yet)", path.display());
            return Ok(ExitCode::from(1));
        }
        match crate::findings::FindingStore::open(path)?.sessions_of(*id) {
            Ok(ids) => args_ids = Some(ids),
            Err(e) if e.is_request_error() => {
                eprintln!("gateway: {e}");
                return Ok(ExitCode::from(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Reading commands on a host where the gateway never recorded should say
    // so, not create an empty database as the reviewer's user.
    let store = if database.exists() { Some(SessionStore::open(database)?) } else { None };
    let mut stdout = std::io::stdout().lock();
    match execute(store.as_ref(), database, &args.command, args_ids, &mut stdout) {
        Ok(code) => Ok(code),
        Err(e) => {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                // `gateway sessions list | head`: the reader has what it wanted.
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            if let Some(re) = e.downcast_ref::<RecordError>() {
                if re.is_request_error() {
                    eprintln!("gateway: {re}");
                    return Ok(ExitCode::from(1));
                }
            }
            Err(e)
        }
    }
}

fn execute(
    store: Option<&SessionStore>,
    database: &Path,
    command: &SessionsCommand,
    finding_sessions: Option<Vec<String>>,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let need = |id: &str| -> Result<&SessionStore, RecordError> {
        store.ok_or_else(|| {
            RecordError::NotFound(format!("{id} (there is no sessions database at {} yet)", database.display()))
        })
    };
    match command {
        SessionsCommand::List { identity, since, limit, json, host, outcome, .. } => {
            let filter = SessionFilter {
                identity: identity.clone(),
                since: *since,
                limit: Some(*limit),
                host: host.clone(),
                outcome: *outcome,
                ids: finding_sessions,
            };
            let sessions = match store {
                Some(store) => store.list(&filter)?,
                None => Vec::new(),
            };
            if *json {
                serde_json::to_writer_pretty(&mut *out, &sessions)?;
                writeln!(out)?;
            } else if sessions.is_empty() {
                let note = if store.is_none() {
                    format!(" (no database at {} yet)", database.display())
                } else {
                    String::new()
                };
                writeln!(out, "no sessions{note}")?;
            } else {
                out.write_all(table(&sessions).as_bytes())?;
            }
        }
        SessionsCommand::Show { id, json } => {
            let store = need(id)?;
            let id = store.resolve(id)?;
            let summary = store.summary(&id)?;
            let records = store.records(&id)?;
            if *json {
                serde_json::to_writer_pretty(&mut *out, &show_json(&summary, &records))?;
                writeln!(out)?;
            } else {
                out.write_all(show_text(&summary, &records).as_bytes())?;
            }
        }
        SessionsCommand::Replay { id, realtime } => {
            let store = need(id)?;
            let id = store.resolve(id)?;
            let summary = store.summary(&id)?;
            let records = store.records(&id)?;
            replay(&summary, &records, *realtime, out)?;
        }
        SessionsCommand::Export { id } => {
            let store = need(id)?;
            let id = store.resolve(id)?;
            for record in store.records(&id)? {
                serde_json::to_writer(&mut *out, &record)?;
                writeln!(out)?;
            }
        }
        SessionsCommand::Verify { id: Some(id), .. } => {
            let store = need(id)?;
            let id = store.resolve(id)?;
            let verdict = store.verify(&id)?;
            let ok = verdict.is_intact();
            writeln!(out, "{}  {verdict}", safe(id.as_str()))?;
            return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        SessionsCommand::Verify { id: None, .. } => {
            let Some(store) = store else {
                writeln!(out, "no sessions (no database at {} yet)", database.display())?;
                return Ok(ExitCode::SUCCESS);
            };
            let (mut checked, mut broken) = (0u64, 0u64);
            for id in store.session_ids()? {
                let verdict = match store.verify(&id) {
                    Ok(v) => v,
                    // Pruned between the listing and the check.
                    Err(RecordError::NotFound(_)) => continue,
                    Err(e) => return Err(e.into()),
                };
                checked += 1;
                if !verdict.is_intact() {
                    broken += 1;
                    writeln!(out, "{}  {verdict}", safe(id.as_str()))?;
                }
            }
            let orphans = store.orphaned_sessions()?;
            for id in &orphans {
                writeln!(out, "{}  BROKEN: records without a sessions row (the row was deleted)", safe(id))?;
            }
            writeln!(out, "{checked} sessions verified, {} broken", broken + orphans.len() as u64)?;
            return Ok(if broken == 0 && orphans.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Seconds between two Unix-nanosecond times, as `+1.234s`.
fn offset(from: i64, to: i64) -> String {
    let d = to.saturating_sub(from);
    let sign = if d < 0 { "-" } else { "+" };
    let d = d.unsigned_abs();
    format!("{sign}{}.{:03}s", d / 1_000_000_000, (d % 1_000_000_000) / 1_000_000)
}

fn duration(ns: u64) -> String {
    let d = Duration::from_nanos(ns);
    if d < Duration::from_millis(1) {
        format!("{}µs", d.as_micros())
    } else if d < Duration::from_secs(1) {
        format!("{:.1}ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.3}s", d.as_secs_f64())
    }
}

/// [`term::cell`](crate::term::cell) keeping the start.
fn cell(s: &str, width: usize) -> String {
    crate::term::cell(s, width, Keep::Start)
}

fn table(sessions: &[SessionSummary]) -> String {
    let mut table =
        Table::new(["ID", "STARTED", "STATE", "DURATION", "IDENTITY", "DESTINATION", "PROCESS", "EXCH", "OUTCOME"]);
    for s in sessions {
        let started = s.started.unix_timestamp_nanos();
        let until = s.ended.unwrap_or(s.last_activity).unix_timestamp_nanos();
        let nanos = u64::try_from(until.saturating_sub(started)).unwrap_or(0);
        table.row([
            cell(s.id.as_str(), 40),
            when(s.started),
            s.state.to_string(),
            duration(nanos),
            cell(if s.identity.is_empty() { "-" } else { &s.identity }, 40),
            cell(&format!("{} ({})", s.host, s.orig_dst), 48),
            cell(&format!("{}[{}]", s.comm, s.pid), 24),
            s.exchanges.to_string(),
            cell(s.outcome.as_deref().unwrap_or("-"), 24),
        ]);
    }
    table.render()
}

fn show_json(summary: &SessionSummary, records: &[Record]) -> serde_json::Value {
    let records: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            serde_json::json!({
                "seq": r.seq,
                "ts": r.ts,
                "time": r.time().format(&time::format_description::well_known::Rfc3339).ok(),
                "kind": r.kind,
                "data": serde_json::from_str::<serde_json::Value>(&r.data).unwrap_or(serde_json::Value::String(r.data.clone())),
                "prev_hash": r.prev_hash,
                "hash": r.hash,
            })
        })
        .collect();
    serde_json::json!({ "session": summary, "records": records })
}

fn meta_of(records: &[Record]) -> Option<SessionMeta> {
    records
        .first()
        .filter(|r| r.record_kind() == Some(RecordKind::Start))
        .and_then(|r| serde_json::from_str(&r.data).ok())
}

fn show_text(s: &SessionSummary, records: &[Record]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "session {}  {}", safe(s.id.as_str()), s.state);
    match meta_of(records) {
        Some(m) => describe_meta(&mut o, &m),
        None => {
            let _ = writeln!(o, "  (the start record is missing or unreadable; run `gateway sessions verify`)");
        }
    }
    let _ = writeln!(o, "  started:      {}", when(s.started));
    match (s.ended, s.bytes_up, s.bytes_down) {
        (Some(ended), Some(up), Some(down)) => {
            let _ = writeln!(
                o,
                "  ended:        {}  {}  (up {up} B, down {down} B)",
                when(ended),
                safe(s.outcome.as_deref().unwrap_or(""))
            );
        }
        _ => {
            let _ = writeln!(o, "  ended:        - (last record {})", when(s.last_activity));
        }
    }
    let _ = writeln!(o, "  exchanges:    {}", s.exchanges);
    if let Some(last) = records.last() {
        let _ = writeln!(o, "  last hash:    {} (record {})", safe(&last.hash), last.seq);
    }
    let _ = writeln!(o, "records ({}):", records.len());
    let start = s.started.unix_timestamp_nanos();
    let start = i64::try_from(start).unwrap_or(0);
    for r in records {
        let hash: String = safe(&r.hash).chars().take(12).collect();
        let _ = writeln!(
            o,
            "  #{:<4} {}  {:>9}  {:<8}  {}  [{hash}…]",
            r.seq,
            when(r.time()),
            offset(start, r.ts),
            safe(&r.kind),
            record_line(r)
        );
    }
    o
}

fn describe_meta(o: &mut String, m: &SessionMeta) {
    let p = &m.process;
    let _ = writeln!(o, "  identity:     {}", safe(if m.identity.is_empty() { "-" } else { &m.identity }));
    for (k, v) in &m.identity_labels {
        let _ = writeln!(o, "    {}={}", safe(k), safe(v));
    }
    let _ = writeln!(
        o,
        "  process:      {} (comm {}, pid {}, uid {}, gid {})",
        safe(p.exe.as_deref().unwrap_or("(exe unknown)")),
        safe(&p.comm),
        p.pid,
        p.uid,
        p.gid.map_or_else(|| "-".to_owned(), |g| g.to_string())
    );
    let _ = writeln!(o, "  cgroup:       {}", safe(p.cgroup.as_deref().unwrap_or("-")));
    if !p.job.is_empty() {
        let _ = writeln!(o, "  job:");
        for (k, v) in &p.job {
            let _ = writeln!(o, "    {}={}", safe(k), safe(v));
        }
    }
    let sni = m.sni.as_deref().map(|s| format!(", SNI {}", safe(s))).unwrap_or_default();
    let _ = writeln!(o, "  destination:  {} ({}{sni})", safe(&m.host), safe(&m.orig_dst));
    let _ = writeln!(o, "  protocol:     {}", safe(&m.protocol));
    match &m.tls {
        Some(t) => {
            let alpn = t.alpn.as_deref().map(|a| format!(", ALPN {}", safe(a))).unwrap_or_default();
            let _ = writeln!(o, "  tls:          {} {}{alpn}", safe(&t.version), safe(&t.cipher));
        }
        None => {
            let _ = writeln!(o, "  tls:          - (plaintext or passed through)");
        }
    }
    let _ = writeln!(o, "  connection:   {}", m.conn_id);
}

/// One line describing a record.
fn record_line(r: &Record) -> String {
    match r.record_kind() {
        Some(RecordKind::Start) => "session metadata".into(),
        Some(RecordKind::Exchange) => match AnyExchange::parse(&r.data) {
            Ok(AnyExchange::Postgres(e)) => {
                let lines: Vec<String> = postgres_transcript(&e).iter().map(|l| l.trim().to_owned()).collect();
                format!("postgres #{} ({}): {}", e.stream, duration(e.duration_ns), cell(&lines.join("  "), 400))
            }
            Ok(AnyExchange::Http(e)) => {
                let mut l =
                    format!("{} {} -> {} ({})", safe(&e.method), cell(&e.url, 80), e.status, duration(e.duration_ns));
                let _ = write!(l, " stream {}", e.stream);
                if let Some(rpc) = &e.rpc {
                    let _ = write!(l, " rpc {}", safe(rpc));
                }
                if let Some(d) = &e.decision {
                    let _ = write!(l, " decision {} by {}", safe(&d.action), safe(&d.rule));
                }
                if !e.findings.is_empty() {
                    let _ = write!(l, " findings {}", safe(&e.findings.join(",")));
                }
                let _ =
                    write!(l, " [{} B up, {} B down, {}]", e.request.body_size, e.response.body_size, safe(&e.outcome));
                l
            }
            Err(_) => "(undecodable exchange)".into(),
        },
        Some(RecordKind::Event) => match serde_json::from_str::<EventData>(&r.data) {
            Ok(ev) => postgres_line(&ev.name, &ev.detail)
                .unwrap_or_else(|| format!("{} {}", safe(&ev.name), cell(&ev.detail.to_string(), 160))),
            Err(_) => "(undecodable event)".into(),
        },
        Some(RecordKind::End) => match serde_json::from_str::<SessionEnd>(&r.data) {
            Ok(end) => format!("{} (up {} B, down {} B)", safe(&end.outcome), end.bytes_up, end.bytes_down),
            Err(_) => "(undecodable end)".into(),
        },
        None => format!("(unknown kind {})", safe(&r.kind)),
    }
}

/// A PostgreSQL session's events read like a psql transcript: the
/// statement after a prompt, then its command tag or error.
fn postgres_line(name: &str, d: &serde_json::Value) -> Option<String> {
    let text = |key: &str| d[key].as_str().map(safe).unwrap_or_default();
    let line = match name {
        "postgres_startup" => format!(
            "postgres connect user={} database={} (rule {}: {})",
            text("user"),
            text("database"),
            text("rule"),
            text("action")
        ),
        "postgres_login" => {
            let tls = |key: &str| d[key]["version"].as_str().map_or("no TLS".to_owned(), safe);
            let swapped = if d["upstream_user_swapped"] == true { ", swapped login" } else { "" };
            format!(
                "postgres login (client {}, server {} {}{swapped})",
                tls("client_tls"),
                tls("upstream_tls"),
                text("upstream_auth")
            )
        }
        "postgres_password" => format!(
            "postgres password: findings {}{}",
            cell(&d["findings"].to_string(), 80),
            if d["swapped"] == true { ", swapped" } else { "" }
        ),
        "postgres_statement" => {
            let prompt = if d["kind"] == "parse" { "parse" } else { "=>" };
            let decision = match d["decision"].as_str() {
                Some("allow") | None => String::new(),
                Some(other) => format!("    [{}]", safe(other)),
            };
            format!("{prompt} {}{decision}", cell(&text("sql"), 400))
        }
        "postgres_params" => format!("   params {}", cell(&d["params"].to_string(), 200)),
        "postgres_result" => format!("   {}", text("tag")),
        "postgres_error" => format!("   ERROR {}: {}", text("sqlstate"), cell(&text("message"), 200)),
        _ => return None,
    };
    Some(line)
}

/// A PostgreSQL round trip (one `exchange` record) as psql-like lines:
/// each statement after a prompt, parameters, then the command tags or the
/// error, as the per-message events of earlier recordings read.
fn postgres_transcript(e: &PostgresExchangeData) -> Vec<String> {
    let mut lines = Vec::with_capacity(e.messages.len() + e.results.len() + 1);
    for m in &e.messages {
        match m.kind.as_str() {
            "query" | "parse" => {
                let prompt = if m.kind == "parse" { "parse" } else { "=>" };
                let decision = match m.decision.as_deref() {
                    Some("allow") | None => String::new(),
                    Some(other) => format!("    [{}]", safe(other)),
                };
                lines.push(format!("{prompt} {}{decision}", cell(m.sql.as_deref().unwrap_or_default(), 400)));
            }
            kind => {
                let params = serde_json::to_string(&m.params).unwrap_or_default();
                lines.push(format!("   {} {}", safe(kind), cell(&params, 200)));
            }
        }
    }
    for r in &e.results {
        match (&r.tag, &r.sqlstate) {
            (Some(tag), _) => lines.push(format!("   {}", safe(tag))),
            (None, code) => lines.push(format!(
                "   ERROR {}: {}",
                safe(code.as_deref().unwrap_or_default()),
                cell(r.message.as_deref().unwrap_or_default(), 200)
            )),
        }
    }
    match e.outcome.as_str() {
        "ready" => {}
        "running" => lines.push("   (still running when recorded; its answers follow)".into()),
        "incomplete" => lines.push("   (no answer: the session ended first)".into()),
        other => lines.push(format!("   ({})", safe(other))),
    }
    lines
}

/// Longest body preview replay prints.
const PREVIEW_BYTES: usize = 2048;

/// The replay of a session as `gateway sessions replay` prints it (all at
/// once): what the review console shows. Recordings hold masked data only;
/// this adds no unmasking.
pub fn replay_text(s: &SessionSummary, records: &[Record]) -> String {
    let mut out = Vec::new();
    if let Err(e) = replay(s, records, false, &mut out) {
        // Writing to a Vec cannot fail; keep whatever was produced.
        tracing::debug!(error = %e, "replay into memory failed");
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn replay(s: &SessionSummary, records: &[Record], realtime: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let start = i64::try_from(s.started.unix_timestamp_nanos()).unwrap_or(0);
    let mut head = format!("session {}  {}\n", safe(s.id.as_str()), s.state);
    if let Some(m) = meta_of(records) {
        describe_meta(&mut head, &m);
    }
    out.write_all(head.as_bytes())?;
    // An exchange is recorded when it completes; replay puts it where it
    // began. The sort is stable: ties keep chain order.
    let mut timeline: Vec<(i64, &Record)> = records
        .iter()
        .map(|r| {
            let at = if r.record_kind() == Some(RecordKind::Exchange) {
                AnyExchange::parse(&r.data).map_or(r.ts, |e| e.started())
            } else {
                r.ts
            };
            (at, r)
        })
        .collect();
    timeline.sort_by_key(|(at, r)| (r.record_kind() != Some(RecordKind::Start), *at));
    let mut previous = start;
    for (at, r) in timeline {
        if realtime && at > previous {
            out.flush()?;
            std::thread::sleep(Duration::from_nanos(u64::try_from(at - previous).unwrap_or(0)));
        }
        previous = previous.max(at);
        let mut block = String::new();
        let t = offset(start, at);
        match r.record_kind() {
            Some(RecordKind::Start) => {
                let _ = writeln!(block, "{t}  start");
            }
            Some(RecordKind::Exchange) => match AnyExchange::parse(&r.data) {
                Ok(AnyExchange::Http(e)) => exchange_block(&mut block, &t, &e),
                Ok(AnyExchange::Postgres(e)) => {
                    let pad = " ".repeat(t.len() + 2);
                    for (i, line) in postgres_transcript(&e).iter().enumerate() {
                        let _ = writeln!(block, "{}{line}", if i == 0 { format!("{t}  ") } else { pad.clone() });
                    }
                }
                Err(e) => {
                    let _ = writeln!(block, "{t}  exchange (undecodable: {e})");
                }
            },
            _ => {
                let _ = writeln!(block, "{t}  {} {}", safe(&r.kind), record_line(r));
            }
        }
        out.write_all(block.as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

fn exchange_block(b: &mut String, t: &str, e: &ExchangeData) {
    let pad = " ".repeat(t.len() + 2);
    let rpc = e.rpc.as_deref().map(|r| format!("  rpc {}", safe(r))).unwrap_or_default();
    let _ = writeln!(b, "{t}  stream {}  {} {}{rpc}", e.stream, safe(&e.method), safe(&e.url));
    message_lines(b, &pad, '>', &e.request);
    let mut status = format!("{} in {}  {}", e.status, duration(e.duration_ns), safe(&e.outcome));
    if let Some(d) = &e.decision {
        let _ = write!(status, "  decision {} (rule {})", safe(&d.action), safe(&d.rule));
    }
    if !e.findings.is_empty() {
        let _ = write!(status, "  findings {}", safe(&e.findings.join(", ")));
    }
    let _ = writeln!(b, "{pad}< {status}");
    message_lines(b, &pad, '<', &e.response);
}

fn message_lines(b: &mut String, pad: &str, dir: char, m: &MessageData) {
    if let Some(headers) = &m.headers {
        for (k, v) in headers {
            let _ = writeln!(b, "{pad}{dir} {}: {}", safe(k), safe(v));
        }
    }
    match &m.body {
        Some(body) if m.body_size > 0 => {
            let _ = writeln!(b, "{pad}{dir} {}", body_note(body, m.body_size));
            if let Some(preview) = body_preview(body) {
                for line in preview.lines() {
                    let _ = writeln!(b, "{pad}{dir}   {line}");
                }
            }
        }
        Some(_) => {}
        None if m.body_size > 0 => {
            let _ = writeln!(b, "{pad}{dir} (body {} B, not recorded at metadata level)", m.body_size);
        }
        None => {}
    }
}

fn body_note(body: &BodyData, size: u64) -> String {
    let kind = if body.encoding == "utf8" { "text" } else { "binary" };
    if body.truncated {
        format!("(body {size} B, {kind}, first {} B recorded)", body.stored)
    } else {
        format!("(body {size} B, {kind})")
    }
}

/// The start of a text body, escaped for the terminal; `None` for binary.
fn body_preview(body: &BodyData) -> Option<String> {
    if body.encoding != "utf8" {
        return None;
    }
    let text = &body.content;
    let mut end = text.len().min(PREVIEW_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut preview = safe_keeping(&text[..end], &['\n', '\t']);
    if end < text.len() {
        let _ = write!(preview, "\n… ({} more bytes recorded)", text.len() - end);
    }
    Some(preview)
}

#[cfg(test)]
pub(crate) mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: SessionsArgs,
    }

    pub(crate) fn parse(args: &[&str]) -> Result<SessionsCommand, clap::Error> {
        Wrapper::try_parse_from(std::iter::once("sessions").chain(args.iter().copied())).map(|w| w.args.command)
    }

    /// Runs a command against `database`, returning the exit code and stdout.
    pub(crate) fn run_captured(database: &Path, args: &[&str]) -> (ExitCode, String) {
        let command = parse(args).unwrap();
        let store = database.exists().then(|| SessionStore::open(database).unwrap());
        let mut out = Vec::new();
        let code = match execute(store.as_ref(), database, &command, None, &mut out) {
            Ok(code) => code,
            Err(e) => match e.downcast_ref::<RecordError>() {
                Some(re) if re.is_request_error() => ExitCode::from(1),
                _ => panic!("{e:#}"),
            },
        };
        (code, String::from_utf8(out).unwrap())
    }

    #[test]
    fn command_line() {
        assert!(matches!(
            parse(&["list", "--identity", "spiffe://ci/*", "--limit", "5", "--json"]).unwrap(),
            SessionsCommand::List { identity: Some(_), limit: 5, json: true, .. }
        ));
        assert!(matches!(parse(&["verify", "--all"]).unwrap(), SessionsCommand::Verify { id: None, all: true, .. }));
        assert!(matches!(parse(&["verify", "0193"]).unwrap(), SessionsCommand::Verify { id: Some(_), all: false, .. }));
        assert!(parse(&["verify"]).is_err(), "an id or --all is required");
        assert!(parse(&["verify", "0193", "--all"]).is_err());
        assert!(matches!(
            parse(&["replay", "ab", "--realtime"]).unwrap(),
            SessionsCommand::Replay { realtime: true, .. }
        ));
        assert!(parse(&["list", "--since", "yesterday"]).is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(offset(1_000_000_000, 2_234_000_000), "+1.234s");
        assert_eq!(offset(0, 0), "+0.000s");
        assert_eq!(offset(2_000_000_000, 1_500_000_000), "-0.500s");
        assert_eq!(duration(1_500), "1µs");
        assert_eq!(duration(12_340_000), "12.3ms");
        assert_eq!(duration(2_000_000_000), "2.000s");
        assert_eq!(safe("curl\x1b[2J"), "curl\\u{1b}[2J");
        assert_eq!(safe_keeping("a\nb\x07", &['\n']), "a\nb\\u{7}");
        assert_eq!(cell("abcdefghijkl", 5), "abcd…");
    }

    #[test]
    fn postgres_events_read_like_psql() {
        use serde_json::json;
        let line = |name, d| postgres_line(name, &d).unwrap();
        assert_eq!(
            line("postgres_statement", json!({"kind": "query", "sql": "select 1", "decision": "allow"})),
            "=> select 1"
        );
        assert_eq!(
            line("postgres_statement", json!({"kind": "query", "sql": "select 2", "decision": "deny"})),
            "=> select 2    [deny]"
        );
        assert_eq!(line("postgres_result", json!({"tag": "SELECT 1"})), "   SELECT 1");
        assert_eq!(
            line("postgres_error", json!({"sqlstate": "42501", "message": "no\x1b"})),
            "   ERROR 42501: no\\u{1b}"
        );
        assert!(postgres_line("refused", &json!({})).is_none());
    }
}
