//! The SQLite findings store.
//!
//! Durability: WAL with `synchronous=FULL`, so once [`FindingStore::record`]
//! returns, the finding survives the process being killed and the host
//! losing power. Every write runs in a `BEGIN IMMEDIATE` transaction so that
//! several processes (the gateway, a reviewer's CLI) can share the file: the
//! write lock is taken up front and `busy_timeout` queues writers instead of
//! failing them on a read-to-write lock upgrade.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::redact::cap;
use rusqlite::{
    ffi::ErrorCode, params, params_from_iter, types::Value, Connection, OptionalExtension as _, Row, Transaction,
    TransactionBehavior,
};
use time::OffsetDateTime;

pub use super::model::{ExportFormat, Finding, FindingId, ListFilter, NewFinding, Recorded, Status, StatusChange};
use super::{export, Action, FindingsError};
use crate::process::ProcessSnapshot;

/// Schema migrations; entry `i` takes the database from version `i` to `i + 1`.
///
/// There is deliberately no column for a raw key: a finding is identified by
/// its HMAC fingerprint and shown by the detector's redacted preview
/// (`tests::no_column_can_hold_a_raw_key` pins the column list).
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE findings (
    -- AUTOINCREMENT: ids are quoted in 403 responses and tickets and must
    -- never be reused, even if rows are ever deleted.
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    rule_id     TEXT    NOT NULL,
    confidence  TEXT    NOT NULL,
    fingerprint TEXT    NOT NULL,
    preview     TEXT    NOT NULL,
    location    TEXT    NOT NULL,
    dest_host   TEXT    NOT NULL,
    dest_port   INTEGER NOT NULL,
    pid         INTEGER NOT NULL,
    uid         INTEGER NOT NULL,
    exe         TEXT,
    comm        TEXT    NOT NULL,
    cgroup      TEXT,
    job         TEXT    NOT NULL,  -- JSON object of CI job variables
    identity    TEXT,
    first_seen  INTEGER NOT NULL,  -- Unix time, nanoseconds, UTC
    last_seen   INTEGER NOT NULL,
    count       INTEGER NOT NULL,
    action      TEXT    NOT NULL CHECK (action IN ('block', 'flag', 'swap')),
    status      TEXT    NOT NULL CHECK (status IN ('open', 'acknowledged', 'resolved', 'false_positive'))
) STRICT;
-- The dedup rule: one finding per key, executable and destination.
CREATE UNIQUE INDEX findings_dedup ON findings (fingerprint, ifnull(exe, ''), dest_host, dest_port);
CREATE INDEX findings_last_seen ON findings (last_seen);
CREATE INDEX findings_status ON findings (status, last_seen);
CREATE TABLE status_history (
    id          INTEGER PRIMARY KEY,
    finding_id  INTEGER NOT NULL REFERENCES findings (id),
    from_status TEXT,
    to_status   TEXT    NOT NULL,
    changed_by  TEXT    NOT NULL,
    changed_at  INTEGER NOT NULL,
    comment     TEXT    NOT NULL
) STRICT;
CREATE INDEX status_history_finding ON status_history (finding_id, id);
"#,
    r#"
-- The container of the latest sighting (JSON: id, runtime, name, image...).
ALTER TABLE findings ADD COLUMN container TEXT;
"#,
];

/// Who automatic status changes are attributed to.
pub const GATEWAY_ACTOR: &str = "gateway";

/// Columns of `findings` in the order [`RawFinding::from_row`] reads them.
const FINDING_COLUMNS: &str = "id, rule_id, confidence, fingerprint, preview, location, dest_host, dest_port, \
     pid, uid, exe, comm, cgroup, job, identity, first_seen, last_seen, count, action, status, container";

/// How long a writer waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Caps on caller-supplied text. Much of it comes from the intercepted
/// traffic or the job's own process (attacker-controlled on a shared runner),
/// so it is bounded to keep one hostile job from bloating the database.
mod limits {
    pub const FINGERPRINT: usize = 256;
    pub const RULE_ID: usize = 128;
    pub const CONFIDENCE: usize = 32;
    /// A preview is a few characters of each end of the key; anything longer
    /// is a caller bug that could leak the key, so it is cut.
    pub const PREVIEW: usize = 64;
    pub const LOCATION: usize = 512;
    pub const HOST: usize = 255;
    pub const COMM: usize = 64;
    pub const PATH: usize = 4096;
    pub const IDENTITY: usize = 512;
    pub const JOB_VARS: usize = 64;
    pub const JOB_NAME: usize = 128;
    pub const JOB_VALUE: usize = 1024;
    pub const CONTAINER_ID: usize = 64;
    pub const CONTAINER_TEXT: usize = 1024;
}

/// A findings database. One connection; not `Sync` (use one store per thread,
/// or a [`FindingsHandle`](super::FindingsHandle) from async code).
pub struct FindingStore {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for FindingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FindingStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl FindingStore {
    /// Opens (creating if needed) the database at `path` and brings its schema
    /// up to date. The directory must exist.
    pub fn open(path: &Path) -> Result<FindingStore, FindingsError> {
        let conn = crate::sqlite::open_private(path, BUSY_TIMEOUT).map_err(|e| open_error(path, e))?;
        let store = FindingStore { conn, path: path.to_owned() };
        store.conn.pragma_update(None, "foreign_keys", true).map_err(store.err("enabling foreign keys"))?;
        store.migrate()?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, doing: &'static str) -> impl FnOnce(rusqlite::Error) -> FindingsError + '_ {
        move |e| classify(&self.path, doing, e)
    }

    fn migrate(&self) -> Result<(), FindingsError> {
        crate::sqlite::migrate(&self.conn, MIGRATIONS).map_err(|e| open_error(&self.path, e))
    }

    fn begin(&self) -> Result<Transaction<'_>, FindingsError> {
        Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)
            .map_err(self.err("starting a transaction"))
    }

    /// Records a sighting: creates a finding, or updates the one with the same
    /// fingerprint, executable and destination. Returns once committed.
    pub fn record(&self, f: &NewFinding) -> Result<Recorded, FindingsError> {
        let tx = self.begin()?;
        let recorded = self.record_in(&tx, f)?;
        tx.commit().map_err(self.err("committing a finding"))?;
        Ok(recorded)
    }

    /// Records several sightings in one transaction (one fsync), each in its
    /// own savepoint so a bad one does not cost the others. Results are in
    /// input order and all durable when this returns.
    pub(crate) fn record_batch(&self, batch: &[NewFinding]) -> Vec<Result<Recorded, FindingsError>> {
        if batch.len() <= 1 {
            return batch.iter().map(|f| self.record(f)).collect();
        }
        let Ok(tx) = self.begin() else {
            return self.record_each(batch);
        };
        let mut results = Vec::with_capacity(batch.len());
        for f in batch {
            if tx.execute_batch("SAVEPOINT record").is_err() {
                drop(tx);
                return self.record_each(batch);
            }
            let result = self.record_in(&tx, f);
            let end = if result.is_ok() { "RELEASE record" } else { "ROLLBACK TO record; RELEASE record" };
            if tx.execute_batch(end).is_err() {
                drop(tx);
                return self.record_each(batch);
            }
            results.push(result);
        }
        match tx.commit() {
            Ok(()) => results,
            // Nothing of the batch is committed; retrying one by one gives
            // each caller its own, accurate outcome.
            Err(_) => self.record_each(batch),
        }
    }

    fn record_each(&self, batch: &[NewFinding]) -> Vec<Result<Recorded, FindingsError>> {
        batch.iter().map(|f| self.record(f)).collect()
    }

    fn record_in(&self, tx: &Transaction<'_>, f: &NewFinding) -> Result<Recorded, FindingsError> {
        let f = Sanitized::new(f)?;
        let existing = tx
            .prepare_cached(
                "SELECT id, status, count, last_seen FROM findings \
                 WHERE fingerprint = ?1 AND ifnull(exe, '') = ?2 AND dest_host = ?3 AND dest_port = ?4",
            )
            .and_then(|mut st| {
                st.query_row(params![f.fingerprint, f.exe.as_deref().unwrap_or(""), f.dest_host, f.dest_port], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?))
                })
                .optional()
            })
            .map_err(self.err("looking up a finding"))?;

        let Some((id, status, count, last_seen)) = existing else {
            tx.prepare_cached(
                "INSERT INTO findings (rule_id, confidence, fingerprint, preview, location, dest_host, dest_port, \
                 pid, uid, exe, comm, cgroup, job, identity, first_seen, last_seen, count, action, status, container) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?15, 1, ?16, 'open', ?17)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    f.rule_id,
                    f.confidence,
                    f.fingerprint,
                    f.preview,
                    f.location,
                    f.dest_host,
                    f.dest_port,
                    f.pid,
                    f.uid,
                    f.exe,
                    f.comm,
                    f.cgroup,
                    f.job,
                    f.identity,
                    f.seen,
                    f.action.as_str(),
                    f.container,
                ])
            })
            .map_err(self.err("inserting a finding"))?;
            let id = tx.last_insert_rowid();
            insert_history(tx, id, None, Status::Open, GATEWAY_ACTOR, f.seen, "first seen")
                .map_err(self.err("recording history"))?;
            return Ok(Recorded { id: FindingId(id), new: true, count: 1 });
        };

        let count = count.saturating_add(1);
        // Concurrent writers may commit sightings out of order: the "latest
        // sighting" fields only move forward in time.
        let latest = f.seen >= last_seen;
        let reopen = status == Status::Resolved.as_str();
        tx.prepare_cached(
            "UPDATE findings SET count = ?2, \
                 first_seen = min(first_seen, ?3), last_seen = max(last_seen, ?3), \
                 location = iif(?4, ?5, location), pid = iif(?4, ?6, pid), uid = iif(?4, ?7, uid), \
                 comm = iif(?4, ?8, comm), cgroup = iif(?4, ?9, cgroup), job = iif(?4, ?10, job), \
                 identity = iif(?4 AND ?11 IS NOT NULL, ?11, identity), action = iif(?4, ?12, action), \
                 status = iif(?13, 'open', status), container = iif(?4, ?14, container) \
             WHERE id = ?1",
        )
        .and_then(|mut st| {
            st.execute(params![
                id,
                count,
                f.seen,
                latest,
                f.location,
                f.pid,
                f.uid,
                f.comm,
                f.cgroup,
                f.job,
                f.identity,
                f.action.as_str(),
                reopen,
                f.container,
            ])
        })
        .map_err(self.err("updating a finding"))?;
        if reopen {
            // Seen after "resolved" means the key is still in use: the
            // rotation did not happen or did not reach this job.
            insert_history(
                tx,
                id,
                Some(Status::Resolved),
                Status::Open,
                GATEWAY_ACTOR,
                f.seen,
                "seen again after resolution",
            )
            .map_err(self.err("recording history"))?;
        }
        Ok(Recorded { id: FindingId(id), new: false, count: u64::try_from(count).unwrap_or(0) })
    }

    /// One finding with its history.
    pub fn get(&self, id: FindingId) -> Result<Option<Finding>, FindingsError> {
        let raw = self
            .conn
            .prepare_cached(&format!("SELECT {FINDING_COLUMNS} FROM findings WHERE id = ?1"))
            .and_then(|mut st| st.query_row([id.0], RawFinding::from_row).optional())
            .map_err(self.err("reading a finding"))?;
        raw.map(|raw| self.complete(raw)).transpose()
    }

    /// Findings matching `filter`, most recently seen first.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<Finding>, FindingsError> {
        let mut clauses = Vec::new();
        let mut args: Vec<Value> = Vec::new();
        if let Some(status) = filter.status {
            args.push(Value::Text(status.as_str().to_owned()));
            clauses.push(format!("status = ?{}", args.len()));
        }
        // SQLite's GLOB has the same `*`/`?` semantics as the config globs.
        if let Some(rule) = &filter.rule {
            args.push(Value::Text(rule.clone()));
            clauses.push(format!("rule_id GLOB ?{}", args.len()));
        }
        if let Some(host) = &filter.host {
            args.push(Value::Text(normalize_host(host)));
            clauses.push(format!("dest_host GLOB ?{}", args.len()));
        }
        if let Some(since) = filter.since {
            args.push(Value::Integer(nanos_saturating(since)));
            clauses.push(format!("last_seen >= ?{}", args.len()));
        }
        let wher = if clauses.is_empty() { String::new() } else { format!("WHERE {}", clauses.join(" AND ")) };
        let sql = format!("SELECT {FINDING_COLUMNS} FROM findings {wher} ORDER BY last_seen DESC, id DESC");
        let raws = self
            .conn
            .prepare(&sql)
            .and_then(|mut st| {
                st.query_map(params_from_iter(args), RawFinding::from_row)?.collect::<Result<Vec<_>, _>>()
            })
            .map_err(self.err("listing findings"))?;
        raws.into_iter().map(|raw| self.complete(raw)).collect()
    }

    /// Moves a finding to `status` on behalf of reviewer `by`, recording the
    /// change in its history. Disallowed transitions (see
    /// [`Status::allowed_next`]) are rejected.
    pub fn set_status(&self, id: FindingId, status: Status, by: &str, comment: &str) -> Result<Finding, FindingsError> {
        let by = by.trim();
        if by.is_empty() {
            return Err(FindingsError::MissingReviewer);
        }
        let tx = self.begin()?;
        let current: Option<String> = tx
            .query_row("SELECT status FROM findings WHERE id = ?1", [id.0], |r| r.get(0))
            .optional()
            .map_err(self.err("reading a finding"))?;
        let Some(current) = current else { return Err(FindingsError::NotFound(id)) };
        let from = current.parse::<Status>().map_err(|reason| self.bad_row(id, "status", reason))?;
        if !from.allowed_next().contains(&status) {
            let allowed = from.allowed_next().iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
            return Err(FindingsError::InvalidTransition { id, from, to: status, allowed });
        }
        tx.execute("UPDATE findings SET status = ?2 WHERE id = ?1", params![id.0, status.as_str()])
            .map_err(self.err("updating a status"))?;
        let now = nanos_saturating(OffsetDateTime::now_utc());
        insert_history(&tx, id.0, Some(from), status, by, now, comment).map_err(self.err("recording history"))?;
        tx.commit().map_err(self.err("committing a status change"))?;
        self.get(id)?.ok_or(FindingsError::NotFound(id))
    }

    /// Writes every finding (ordered by id) in `format`.
    pub fn export(&self, format: ExportFormat, out: &mut dyn std::io::Write) -> Result<(), FindingsError> {
        let mut findings = self.list(&ListFilter::default())?;
        findings.sort_by_key(|f| f.id);
        export::write(format, &findings, out).map_err(|source| FindingsError::Export { format, source })
    }

    /// Writes an export of no findings (for a host with no database yet).
    pub(crate) fn export_empty(format: ExportFormat, out: &mut dyn std::io::Write) -> Result<(), FindingsError> {
        export::write(format, &[], out).map_err(|source| FindingsError::Export { format, source })
    }

    /// Runs `PRAGMA integrity_check`; `Err(Corrupt)` unless it reports `ok`.
    pub fn check_integrity(&self) -> Result<(), FindingsError> {
        let report: Vec<String> = self
            .conn
            .prepare("PRAGMA integrity_check")
            .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
            .map_err(self.err("checking integrity"))?;
        if report.len() == 1 && report[0] == "ok" {
            return Ok(());
        }
        Err(FindingsError::Corrupt {
            path: self.path.clone(),
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                Some(report.join("; ")),
            ),
        })
    }

    fn complete(&self, raw: RawFinding) -> Result<Finding, FindingsError> {
        let id = FindingId(raw.id);
        let history = self
            .conn
            .prepare_cached(
                "SELECT from_status, to_status, changed_by, changed_at, comment FROM status_history \
                 WHERE finding_id = ?1 ORDER BY id",
            )
            .and_then(|mut st| {
                st.query_map([raw.id], |r| {
                    Ok((
                        r.get::<_, Option<String>>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(self.err("reading history"))?
            .into_iter()
            .map(|(from, to, by, at, comment)| {
                Ok(StatusChange {
                    from: from.map(|s| s.parse()).transpose().map_err(|e| self.bad_row(id, "history status", e))?,
                    to: to.parse().map_err(|e| self.bad_row(id, "history status", e))?,
                    by,
                    at: from_nanos(at).map_err(|e| self.bad_row(id, "history time", e))?,
                    comment,
                })
            })
            .collect::<Result<Vec<_>, FindingsError>>()?;
        let job: BTreeMap<String, String> =
            serde_json::from_str(&raw.job).map_err(|e| self.bad_row(id, "job", e.to_string()))?;
        let container = raw
            .container
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| self.bad_row(id, "container", e.to_string()))?;
        Ok(Finding {
            id,
            rule_id: raw.rule_id,
            confidence: raw.confidence,
            fingerprint: raw.fingerprint,
            preview: raw.preview,
            location: raw.location,
            dest_host: raw.dest_host,
            dest_port: u16::try_from(raw.dest_port).map_err(|e| self.bad_row(id, "dest_port", e.to_string()))?,
            process: ProcessSnapshot {
                pid: u32::try_from(raw.pid).map_err(|e| self.bad_row(id, "pid", e.to_string()))?,
                uid: u32::try_from(raw.uid).map_err(|e| self.bad_row(id, "uid", e.to_string()))?,
                exe: raw.exe,
                comm: raw.comm,
                cgroup: raw.cgroup,
                container,
                // Not kept: a finding is about the key, not the group.
                gid: None,
                job,
            },
            identity: raw.identity,
            first_seen: from_nanos(raw.first_seen).map_err(|e| self.bad_row(id, "first_seen", e))?,
            last_seen: from_nanos(raw.last_seen).map_err(|e| self.bad_row(id, "last_seen", e))?,
            count: u64::try_from(raw.count).map_err(|e| self.bad_row(id, "count", e.to_string()))?,
            action: raw.action.parse().map_err(|e| self.bad_row(id, "action", e))?,
            status: raw.status.parse().map_err(|e| self.bad_row(id, "status", e))?,
            history,
        })
    }

    fn bad_row(&self, id: FindingId, field: &'static str, reason: String) -> FindingsError {
        FindingsError::BadRow { path: self.path.clone(), id, field, reason }
    }
}

fn insert_history(
    tx: &Transaction<'_>,
    id: i64,
    from: Option<Status>,
    to: Status,
    by: &str,
    at: i64,
    comment: &str,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "INSERT INTO status_history (finding_id, from_status, to_status, changed_by, changed_at, comment) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![id, from.map(Status::as_str), to.as_str(), by, at, comment])
}

/// Maps SQLite's "this file is damaged / not a database" codes to
/// [`FindingsError::Corrupt`] so the message says what to do about it.
fn open_error(path: &Path, e: crate::sqlite::OpenError) -> FindingsError {
    match e {
        crate::sqlite::OpenError::Unusable(reason) => FindingsError::Open { path: path.to_owned(), reason },
        crate::sqlite::OpenError::Sqlite { doing, source } => classify(path, doing, source),
        crate::sqlite::OpenError::UnsupportedSchema { found, supported } => {
            FindingsError::UnsupportedSchema { path: path.to_owned(), found, supported }
        }
    }
}

fn classify(path: &Path, doing: &'static str, e: rusqlite::Error) -> FindingsError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            FindingsError::Corrupt { path: path.to_owned(), source: e }
        }
        _ => FindingsError::Database { path: path.to_owned(), doing, source: e },
    }
}

/// A row of `findings` before validation.
struct RawFinding {
    id: i64,
    rule_id: String,
    confidence: String,
    fingerprint: String,
    preview: String,
    location: String,
    dest_host: String,
    dest_port: i64,
    pid: i64,
    uid: i64,
    exe: Option<String>,
    comm: String,
    cgroup: Option<String>,
    job: String,
    identity: Option<String>,
    first_seen: i64,
    last_seen: i64,
    count: i64,
    action: String,
    status: String,
    container: Option<String>,
}

impl RawFinding {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<RawFinding> {
        Ok(RawFinding {
            id: r.get(0)?,
            rule_id: r.get(1)?,
            confidence: r.get(2)?,
            fingerprint: r.get(3)?,
            preview: r.get(4)?,
            location: r.get(5)?,
            dest_host: r.get(6)?,
            dest_port: r.get(7)?,
            pid: r.get(8)?,
            uid: r.get(9)?,
            exe: r.get(10)?,
            comm: r.get(11)?,
            cgroup: r.get(12)?,
            job: r.get(13)?,
            identity: r.get(14)?,
            first_seen: r.get(15)?,
            last_seen: r.get(16)?,
            count: r.get(17)?,
            action: r.get(18)?,
            status: r.get(19)?,
            container: r.get(20)?,
        })
    }
}

/// A [`NewFinding`] checked, bounded and normalized for storage.
struct Sanitized {
    rule_id: String,
    confidence: String,
    fingerprint: String,
    preview: String,
    location: String,
    dest_host: String,
    dest_port: u16,
    pid: u32,
    uid: u32,
    exe: Option<String>,
    comm: String,
    cgroup: Option<String>,
    job: String,
    identity: Option<String>,
    action: Action,
    seen: i64,
    /// JSON of the sender's container.
    container: Option<String>,
}

impl Sanitized {
    fn new(f: &NewFinding) -> Result<Sanitized, FindingsError> {
        let invalid = |what: &str| FindingsError::InvalidFinding(what.to_owned());
        if f.fingerprint.trim().is_empty() {
            return Err(invalid("empty fingerprint"));
        }
        // Cutting a fingerprint would merge distinct keys: refuse instead.
        if f.fingerprint.len() > limits::FINGERPRINT {
            return Err(invalid("fingerprint longer than 256 bytes"));
        }
        if f.rule_id.trim().is_empty() {
            return Err(invalid("empty rule id"));
        }
        let dest_host = normalize_host(&f.dest_host);
        if dest_host.is_empty() {
            return Err(invalid("empty destination host"));
        }
        let seen =
            i64::try_from(f.seen_at.unix_timestamp_nanos()).map_err(|_| invalid("seen_at is outside 1677..2262"))?;
        let job: BTreeMap<String, String> = f
            .process
            .job
            .iter()
            .take(limits::JOB_VARS)
            .map(|(name, value)| {
                let value = crate::redact::redact_variable(name, value);
                (cap(name, limits::JOB_NAME), cap(&value, limits::JOB_VALUE))
            })
            .collect();
        Ok(Sanitized {
            rule_id: cap(&f.rule_id, limits::RULE_ID),
            confidence: cap(&f.confidence, limits::CONFIDENCE),
            fingerprint: f.fingerprint.clone(),
            preview: cap(&f.preview, limits::PREVIEW),
            location: cap(&f.location, limits::LOCATION),
            dest_host: cap(&dest_host, limits::HOST),
            dest_port: f.dest_port,
            pid: f.process.pid,
            uid: f.process.uid,
            exe: f.process.exe.as_deref().map(|e| cap(e, limits::PATH)),
            comm: cap(&f.process.comm, limits::COMM),
            cgroup: f.process.cgroup.as_deref().map(|c| cap(c, limits::PATH)),
            // A BTreeMap<String, String> always serializes.
            job: serde_json::to_string(&job).unwrap_or_else(|_| "{}".to_owned()),
            identity: f.identity.as_deref().map(|i| cap(i, limits::IDENTITY)),
            action: f.action,
            seen,
            container: f.process.container.as_ref().map(|c| {
                let c = crate::identity::ContainerRef {
                    id: cap(&c.id, limits::CONTAINER_ID),
                    image: c.image.as_deref().map(|v| cap(v, limits::CONTAINER_TEXT)),
                    image_id: c.image_id.as_deref().map(|v| cap(v, limits::CONTAINER_TEXT)),
                    name: c.name.as_deref().map(|v| cap(v, limits::CONTAINER_TEXT)),
                    pod_uid: c.pod_uid.as_deref().map(|v| cap(v, limits::CONTAINER_ID)),
                    runtime: c.runtime,
                };
                // Strings and an enum: always serializes.
                serde_json::to_string(&c).unwrap_or_default()
            }),
        })
    }
}

/// Host names compare case-insensitively and without the root dot.
fn normalize_host(host: &str) -> String {
    host.trim().trim_end_matches('.').to_ascii_lowercase()
}

fn nanos_saturating(t: OffsetDateTime) -> i64 {
    let n = t.unix_timestamp_nanos();
    i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX })
}

fn from_nanos(n: i64) -> Result<OffsetDateTime, String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(n)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
