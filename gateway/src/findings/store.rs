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

pub use super::model::{
    ExportFormat, Finding, FindingId, ListFilter, NewFinding, Recorded, Sighting, Status, StatusChange,
};
use super::{
    allowlist::{AllowEntry, AllowId, Scope, Waivers},
    export, Action, FindingsError,
};
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
    // One finding per key and rule, with every sighting kept. Findings that
    // the old dedup rule (key, executable, destination) split are folded
    // into the oldest of them: its id was the first quoted in a 403; the
    // others keep their rows (their ids are in tickets) and point at it.
    r#"
ALTER TABLE findings ADD COLUMN merged_into INTEGER REFERENCES findings (id);
CREATE TABLE sightings (
    id          INTEGER PRIMARY KEY,
    finding_id  INTEGER NOT NULL REFERENCES findings (id),
    seen_at     INTEGER NOT NULL,  -- Unix time, nanoseconds, UTC
    identity    TEXT,
    job         TEXT    NOT NULL,  -- JSON object of CI job variables
    pid         INTEGER NOT NULL,
    uid         INTEGER NOT NULL,
    exe         TEXT,
    comm        TEXT    NOT NULL,
    cgroup      TEXT,
    container   TEXT,
    command     TEXT,              -- command line, secrets masked
    script      TEXT,
    dest_host   TEXT    NOT NULL,
    dest_port   INTEGER NOT NULL,
    location    TEXT    NOT NULL,
    action      TEXT    NOT NULL CHECK (action IN ('block', 'flag', 'swap')),
    allowed_by  TEXT,
    session_id  TEXT
) STRICT;
CREATE INDEX sightings_finding ON sightings (finding_id, seen_at);
CREATE INDEX sightings_session ON sightings (session_id) WHERE session_id IS NOT NULL;
-- The old schema kept only the latest sighting of each finding.
INSERT INTO sightings (finding_id, seen_at, identity, job, pid, uid, exe, comm, cgroup, container,
                       dest_host, dest_port, location, action)
    SELECT id, last_seen, identity, job, pid, uid, exe, comm, cgroup, container,
           dest_host, dest_port, location, action FROM findings;
UPDATE findings SET merged_into = (
        SELECT min(o.id) FROM findings o WHERE o.fingerprint = findings.fingerprint AND o.rule_id = findings.rule_id)
    WHERE id > (
        SELECT min(o.id) FROM findings o WHERE o.fingerprint = findings.fingerprint AND o.rule_id = findings.rule_id);
UPDATE sightings SET finding_id = (SELECT merged_into FROM findings WHERE id = sightings.finding_id)
    WHERE finding_id IN (SELECT id FROM findings WHERE merged_into IS NOT NULL);
UPDATE findings SET
        count = (SELECT sum(o.count) FROM findings o WHERE o.id = findings.id OR o.merged_into = findings.id),
        first_seen = (SELECT min(o.first_seen) FROM findings o WHERE o.id = findings.id OR o.merged_into = findings.id),
        last_seen = (SELECT max(o.last_seen) FROM findings o WHERE o.id = findings.id OR o.merged_into = findings.id)
    WHERE merged_into IS NULL AND EXISTS (SELECT 1 FROM findings o WHERE o.merged_into = findings.id);
INSERT INTO status_history (finding_id, from_status, to_status, changed_by, changed_at, comment)
    SELECT id, status, status, 'gateway', last_seen, 'merged into F-' || merged_into || ' (one finding per key and rule)'
    FROM findings WHERE merged_into IS NOT NULL;
DROP INDEX findings_dedup;
-- The dedup rule: one finding per key and detection rule.
CREATE UNIQUE INDEX findings_key ON findings (fingerprint, rule_id) WHERE merged_into IS NULL;
-- Reviewers' waivers: accepted risk for a key in a scope, until an expiry.
CREATE TABLE allowlist (
    -- AUTOINCREMENT: `A-<n>` ids are quoted in sightings and audits.
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    finding_id  INTEGER NOT NULL REFERENCES findings (id),
    fingerprint TEXT    NOT NULL,
    scope       TEXT    NOT NULL CHECK (scope IN ('everywhere', 'destination', 'identity')),
    scope_value TEXT,
    expires_at  INTEGER,           -- NULL: until revoked
    reason      TEXT    NOT NULL,
    created_by  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_by  TEXT,
    revoked_at  INTEGER,
    CHECK ((scope = 'everywhere') = (scope_value IS NULL))
) STRICT;
CREATE INDEX allowlist_fingerprint ON allowlist (fingerprint);
"#,
    // `redact` joins the actions. SQLite cannot change a CHECK in place:
    // both tables are rebuilt (foreign keys are enforced only after the
    // migrations ran, see `FindingStore::open`, so the drops are allowed and
    // the references by name stay valid).
    r#"
CREATE TABLE findings_v4 (
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
    job         TEXT    NOT NULL,
    identity    TEXT,
    first_seen  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL,
    count       INTEGER NOT NULL,
    action      TEXT    NOT NULL CHECK (action IN ('block', 'flag', 'swap', 'redact')),
    status      TEXT    NOT NULL CHECK (status IN ('open', 'acknowledged', 'resolved', 'false_positive')),
    container   TEXT,
    merged_into INTEGER REFERENCES findings (id)
) STRICT;
INSERT INTO findings_v4 SELECT id, rule_id, confidence, fingerprint, preview, location, dest_host, dest_port,
    pid, uid, exe, comm, cgroup, job, identity, first_seen, last_seen, count, action, status, container, merged_into
    FROM findings;
CREATE TABLE sightings_v4 (
    id          INTEGER PRIMARY KEY,
    finding_id  INTEGER NOT NULL REFERENCES findings (id),
    seen_at     INTEGER NOT NULL,
    identity    TEXT,
    job         TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    uid         INTEGER NOT NULL,
    exe         TEXT,
    comm        TEXT    NOT NULL,
    cgroup      TEXT,
    container   TEXT,
    command     TEXT,
    script      TEXT,
    dest_host   TEXT    NOT NULL,
    dest_port   INTEGER NOT NULL,
    location    TEXT    NOT NULL,
    action      TEXT    NOT NULL CHECK (action IN ('block', 'flag', 'swap', 'redact')),
    allowed_by  TEXT,
    session_id  TEXT
) STRICT;
INSERT INTO sightings_v4 SELECT id, finding_id, seen_at, identity, job, pid, uid, exe, comm, cgroup, container,
    command, script, dest_host, dest_port, location, action, allowed_by, session_id FROM sightings;
DROP TABLE sightings;
DROP TABLE findings;
ALTER TABLE findings_v4 RENAME TO findings;
ALTER TABLE sightings_v4 RENAME TO sightings;
CREATE INDEX findings_last_seen ON findings (last_seen);
CREATE INDEX findings_status ON findings (status, last_seen);
CREATE UNIQUE INDEX findings_key ON findings (fingerprint, rule_id) WHERE merged_into IS NULL;
CREATE INDEX sightings_finding ON sightings (finding_id, seen_at);
CREATE INDEX sightings_session ON sightings (session_id) WHERE session_id IS NOT NULL;
"#,
];

/// Who automatic status changes are attributed to.
pub const GATEWAY_ACTOR: &str = "gateway";

/// Columns of `findings` in the order [`RawFinding::from_row`] reads them.
const FINDING_COLUMNS: &str = "id, rule_id, confidence, fingerprint, preview, location, dest_host, dest_port, \
     pid, uid, exe, comm, cgroup, job, identity, first_seen, last_seen, count, action, status, container, merged_into";

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
    pub const COMMAND: usize = 4096;
}

/// A findings database. One connection; not `Sync` (use one store per thread,
/// or a [`FindingsHandle`](super::FindingsHandle) from async code).
pub struct FindingStore {
    conn: Connection,
    path: PathBuf,
    /// The file opened, to notice it replaced or its log deleted ([`Self::check_files`]).
    opened: Option<crate::sqlite::FileId>,
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
        let opened = crate::sqlite::FileId::of(path).ok();
        let store = FindingStore { conn, path: path.to_owned(), opened };
        // Migrations without foreign keys (SQLite here enforces them by
        // default): one rebuilds tables others refer to, keeping their ids.
        // The pragma is a no-op inside a transaction, so it is set around.
        store.conn.pragma_update(None, "foreign_keys", false).map_err(store.err("disabling foreign keys"))?;
        store.migrate()?;
        store.conn.pragma_update(None, "foreign_keys", true).map_err(store.err("enabling foreign keys"))?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks that the files under the open connection are still the ones
    /// it opened, with their write-ahead log (see [`crate::sqlite::Damage`]):
    /// commits are durable only then.
    pub fn check_files(&self) -> Result<(), crate::sqlite::Damage> {
        self.opened.map_or(Ok(()), |opened| crate::sqlite::check_files(&self.path, opened))
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

    /// Records a sighting: creates a finding, or adds the sighting to the one
    /// with the same fingerprint and rule. Returns once committed.
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
                 WHERE fingerprint = ?1 AND rule_id = ?2 AND merged_into IS NULL",
            )
            .and_then(|mut st| {
                st.query_row(params![f.fingerprint, f.rule_id], |r| {
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
            self.insert_sighting(tx, id, &f)?;
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
                 status = iif(?13, 'open', status), container = iif(?4, ?14, container), \
                 exe = iif(?4, ?15, exe), dest_host = iif(?4, ?16, dest_host), dest_port = iif(?4, ?17, dest_port) \
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
                f.exe,
                f.dest_host,
                f.dest_port,
            ])
        })
        .map_err(self.err("updating a finding"))?;
        self.insert_sighting(tx, id, &f)?;
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

    fn insert_sighting(&self, tx: &Transaction<'_>, id: i64, f: &Sanitized) -> Result<(), FindingsError> {
        tx.prepare_cached(
            "INSERT INTO sightings (finding_id, seen_at, identity, job, pid, uid, exe, comm, cgroup, container, \
             command, script, dest_host, dest_port, location, action, allowed_by, session_id) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
        )
        .and_then(|mut st| {
            st.execute(params![
                id,
                f.seen,
                f.identity,
                f.job,
                f.pid,
                f.uid,
                f.exe,
                f.comm,
                f.cgroup,
                f.container,
                f.command,
                f.script,
                f.dest_host,
                f.dest_port,
                f.location,
                f.action.as_str(),
                f.allowed_by,
                f.session_id,
            ])
        })
        .map_err(self.err("recording a sighting"))?;
        Ok(())
    }

    /// One finding with its history and every sighting. A finding folded
    /// into another by the one-finding-per-key migration is returned with
    /// `merged_into` set and the sightings of the one it was folded into.
    pub fn get(&self, id: FindingId) -> Result<Option<Finding>, FindingsError> {
        let raw = self
            .conn
            .prepare_cached(&format!("SELECT {FINDING_COLUMNS} FROM findings WHERE id = ?1"))
            .and_then(|mut st| st.query_row([id.0], RawFinding::from_row).optional())
            .map_err(self.err("reading a finding"))?;
        let Some(raw) = raw else { return Ok(None) };
        let owner = raw.merged_into.unwrap_or(raw.id);
        let mut finding = self.complete(raw)?;
        finding.sightings = self.sightings(FindingId(owner))?;
        Ok(Some(finding))
    }

    /// Every sighting of finding `id`, oldest first.
    pub fn sightings(&self, id: FindingId) -> Result<Vec<Sighting>, FindingsError> {
        let rows = self
            .conn
            .prepare_cached(&format!(
                "SELECT {} FROM sightings WHERE finding_id = ?1 ORDER BY seen_at, id",
                RawSighting::COLUMNS
            ))
            .and_then(|mut st| st.query_map([id.0], |r| RawSighting::from_row(r, 0))?.collect::<Result<Vec<_>, _>>())
            .map_err(self.err("reading sightings"))?;
        rows.into_iter()
            .map(|r| {
                let bad = |field: &'static str| move |reason: String| self.bad_row(id, field, reason);
                Ok(Sighting {
                    seen_at: from_nanos(r.seen_at).map_err(bad("sighting time"))?,
                    identity: r.identity,
                    process: ProcessSnapshot {
                        pid: u32::try_from(r.pid).map_err(|e| bad("sighting pid")(e.to_string()))?,
                        uid: u32::try_from(r.uid).map_err(|e| bad("sighting uid")(e.to_string()))?,
                        exe: r.exe,
                        comm: r.comm,
                        cgroup: r.cgroup,
                        container: r
                            .container
                            .as_deref()
                            .map(serde_json::from_str)
                            .transpose()
                            .map_err(|e| bad("sighting container")(e.to_string()))?,
                        gid: None,
                        job: serde_json::from_str(&r.job).map_err(|e| bad("sighting job")(e.to_string()))?,
                    },
                    command: r.command,
                    script: r.script,
                    dest_host: r.dest_host,
                    dest_port: u16::try_from(r.dest_port).map_err(|e| bad("sighting port")(e.to_string()))?,
                    location: r.location,
                    action: r.action.parse().map_err(bad("sighting action"))?,
                    allowed_by: r.allowed_by,
                    session_id: r.session_id,
                })
            })
            .collect()
    }

    /// Ids of the findings with a sighting in recorded session `session_id`.
    pub fn findings_of_session(&self, session_id: &str) -> Result<Vec<FindingId>, FindingsError> {
        self.conn
            .prepare_cached("SELECT DISTINCT finding_id FROM sightings WHERE session_id = ?1 ORDER BY finding_id")
            .and_then(|mut st| st.query_map([session_id], |r| r.get(0).map(FindingId))?.collect())
            .map_err(self.err("reading sightings"))
    }

    /// Session ids of finding `id`'s sightings, oldest first, each once.
    pub fn sessions_of(&self, id: FindingId) -> Result<Vec<String>, FindingsError> {
        let owner: Option<i64> = self
            .conn
            .query_row("SELECT ifnull(merged_into, id) FROM findings WHERE id = ?1", [id.0], |r| r.get(0))
            .optional()
            .map_err(self.err("reading a finding"))?;
        let Some(owner) = owner else { return Err(FindingsError::NotFound(id)) };
        self.conn
            .prepare_cached(
                "SELECT session_id FROM sightings WHERE finding_id = ?1 AND session_id IS NOT NULL \
                 GROUP BY session_id ORDER BY min(seen_at)",
            )
            .and_then(|mut st| st.query_map([owner], |r| r.get(0))?.collect())
            .map_err(self.err("reading sightings"))
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
        // Sighting-level filters match any sighting, not only the latest.
        if let Some(host) = &filter.host {
            args.push(Value::Text(normalize_host(host)));
            clauses.push(format!(
                "EXISTS (SELECT 1 FROM sightings s WHERE s.finding_id = findings.id AND s.dest_host GLOB ?{})",
                args.len()
            ));
        }
        if let Some(fingerprint) = &filter.fingerprint {
            args.push(Value::Text(fingerprint.clone()));
            clauses.push(format!("fingerprint = ?{}", args.len()));
        }
        if let Some(identity) = &filter.identity {
            args.push(Value::Text(identity.clone()));
            clauses.push(format!(
                "EXISTS (SELECT 1 FROM sightings s WHERE s.finding_id = findings.id AND s.identity GLOB ?{})",
                args.len()
            ));
        }
        if let Some(project) = &filter.project {
            args.push(Value::Text(project.clone()));
            let n = args.len();
            let vars = super::model::PROJECT_VARIABLES
                .iter()
                .map(|v| format!("json_extract(s.job, '$.{v}') GLOB ?{n}"))
                .collect::<Vec<_>>()
                .join(" OR ");
            clauses.push(format!("EXISTS (SELECT 1 FROM sightings s WHERE s.finding_id = findings.id AND ({vars}))"));
        }
        if let Some(since) = filter.since {
            args.push(Value::Integer(nanos_saturating(since)));
            clauses.push(format!("last_seen >= ?{}", args.len()));
        }
        // Folded findings are listed through the finding they were folded into.
        clauses.push("merged_into IS NULL".to_owned());
        let wher = format!("WHERE {}", clauses.join(" AND "));
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

    /// Accepts the risk of finding `id`'s key in `scope` until `expires_at`
    /// (`None`: until revoked) on behalf of reviewer `by`: the gate stops
    /// blocking it there. The decision is recorded in the finding's history.
    pub fn allow(
        &self,
        id: FindingId,
        scope: &Scope,
        expires_at: Option<OffsetDateTime>,
        reason: &str,
        by: &str,
    ) -> Result<AllowEntry, FindingsError> {
        let by = by.trim();
        if by.is_empty() {
            return Err(FindingsError::MissingReviewer);
        }
        if reason.trim().is_empty() {
            return Err(FindingsError::InvalidFinding("an allowlist entry needs a reason".into()));
        }
        let now = OffsetDateTime::now_utc();
        if expires_at.is_some_and(|e| e <= now) {
            return Err(FindingsError::InvalidFinding("the expiry is in the past".into()));
        }
        let tx = self.begin()?;
        let row: Option<(i64, String, String)> = tx
            .query_row(
                "SELECT f.id, f.fingerprint, f.status FROM findings f \
                 WHERE f.id = (SELECT ifnull(merged_into, id) FROM findings WHERE id = ?1)",
                [id.0],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(self.err("reading a finding"))?;
        let Some((owner, fingerprint, status)) = row else { return Err(FindingsError::NotFound(id)) };
        let status = status.parse::<Status>().map_err(|reason| self.bad_row(id, "status", reason))?;
        let reason = cap(reason.trim(), limits::LOCATION);
        let by = cap(by, limits::IDENTITY);
        let now_nanos = nanos_saturating(now);
        tx.execute(
            "INSERT INTO allowlist (finding_id, fingerprint, scope, scope_value, expires_at, reason, created_by, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                owner,
                fingerprint,
                scope.kind(),
                scope.value().map(|v| cap(v, limits::IDENTITY)),
                expires_at.map(nanos_saturating),
                reason,
                by,
                now_nanos
            ],
        )
        .map_err(self.err("adding an allowlist entry"))?;
        let aid = AllowId(tx.last_insert_rowid());
        let until = expires_at.map_or_else(|| "until revoked".to_owned(), |e| format!("until {}", rfc3339(e)));
        insert_history(
            &tx,
            owner,
            Some(status),
            status,
            &by,
            now_nanos,
            &format!("allowed {aid} {scope} {until}: {reason}"),
        )
        .map_err(self.err("recording history"))?;
        tx.commit().map_err(self.err("committing an allowlist entry"))?;
        self.allow_entry(aid)?.ok_or(FindingsError::InvalidFinding(format!("{aid} vanished")))
    }

    /// Revokes allowlist entry `aid` on behalf of `by`: blocking resumes.
    pub fn revoke(&self, aid: AllowId, by: &str, comment: &str) -> Result<AllowEntry, FindingsError> {
        let by = by.trim();
        if by.is_empty() {
            return Err(FindingsError::MissingReviewer);
        }
        let tx = self.begin()?;
        let row: Option<(i64, String, Option<i64>)> = tx
            .query_row(
                "SELECT a.finding_id, f.status, a.revoked_at FROM allowlist a JOIN findings f ON f.id = a.finding_id \
                 WHERE a.id = ?1",
                [aid.0],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(self.err("reading the allowlist"))?;
        let Some((finding, status, revoked)) = row else { return Err(FindingsError::NoSuchAllowEntry(aid)) };
        if revoked.is_some() {
            return Err(FindingsError::NoSuchAllowEntry(aid));
        }
        let status = status.parse::<Status>().map_err(|reason| self.bad_row(FindingId(finding), "status", reason))?;
        let now = nanos_saturating(OffsetDateTime::now_utc());
        let by = cap(by, limits::IDENTITY);
        tx.execute("UPDATE allowlist SET revoked_by = ?2, revoked_at = ?3 WHERE id = ?1", params![aid.0, by, now])
            .map_err(self.err("revoking an allowlist entry"))?;
        insert_history(&tx, finding, Some(status), status, &by, now, &format!("revoked {aid}: {}", comment.trim()))
            .map_err(self.err("recording history"))?;
        tx.commit().map_err(self.err("committing a revocation"))?;
        self.allow_entry(aid)?.ok_or(FindingsError::NoSuchAllowEntry(aid))
    }

    fn allow_entry(&self, aid: AllowId) -> Result<Option<AllowEntry>, FindingsError> {
        Ok(self.allow_entries(Some(aid))?.into_iter().next())
    }

    /// Every allowlist entry, newest first (active, expired and revoked).
    pub fn allowlist(&self) -> Result<Vec<AllowEntry>, FindingsError> {
        self.allow_entries(None)
    }

    fn allow_entries(&self, only: Option<AllowId>) -> Result<Vec<AllowEntry>, FindingsError> {
        type Row =
            (i64, i64, String, String, Option<String>, Option<i64>, String, String, i64, Option<String>, Option<i64>);
        let rows: Vec<Row> = self
            .conn
            .prepare_cached(
                "SELECT id, finding_id, fingerprint, scope, scope_value, expires_at, reason, created_by, created_at, \
                 revoked_by, revoked_at FROM allowlist WHERE ?1 IS NULL OR id = ?1 ORDER BY id DESC",
            )
            .and_then(|mut st| {
                st.query_map([only.map(|a| a.0)], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                        r.get(9)?,
                        r.get(10)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(self.err("reading the allowlist"))?;
        rows.into_iter()
            .map(|(id, finding, fingerprint, scope, value, expires, reason, by, at, revoked_by, revoked_at)| {
                let bad = |field: &'static str| move |reason: String| self.bad_row(FindingId(finding), field, reason);
                Ok(AllowEntry {
                    id: AllowId(id),
                    finding: FindingId(finding),
                    fingerprint,
                    scope: Scope::from_parts(&scope, value).map_err(bad("allowlist scope"))?,
                    expires_at: expires.map(from_nanos).transpose().map_err(bad("allowlist expiry"))?,
                    reason,
                    created_by: by,
                    created_at: from_nanos(at).map_err(bad("allowlist time"))?,
                    revoked_by,
                    revoked_at: revoked_at.map(from_nanos).transpose().map_err(bad("allowlist revocation"))?,
                })
            })
            .collect()
    }

    /// The waivers in force at `now`: active allowlist entries and the keys
    /// of false-positive findings.
    pub fn waivers(&self, now: OffsetDateTime) -> Result<Waivers, FindingsError> {
        let mut waivers = Waivers::default();
        let active = self
            .conn
            .prepare_cached(
                "SELECT id FROM allowlist WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?1)",
            )
            .and_then(|mut st| {
                st.query_map([nanos_saturating(now)], |r| r.get(0).map(AllowId))?.collect::<Result<Vec<_>, _>>()
            })
            .map_err(self.err("reading the allowlist"))?;
        for aid in active {
            if let Some(entry) = self.allow_entry(aid)? {
                waivers.add_entry(&entry, now);
            }
        }
        let false_positives: Vec<(i64, String)> = self
            .conn
            .prepare_cached(
                "SELECT id, fingerprint FROM findings WHERE status = 'false_positive' AND merged_into IS NULL",
            )
            .and_then(|mut st| st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            .map_err(self.err("reading false positives"))?;
        for (id, fingerprint) in false_positives {
            waivers.add_false_positive(FindingId(id), &fingerprint);
        }
        Ok(waivers)
    }

    /// Writes every finding (ordered by id) in `format`.
    pub fn export(&self, format: ExportFormat, out: &mut dyn std::io::Write) -> Result<(), FindingsError> {
        let mut findings = self.list(&ListFilter::default())?;
        findings.sort_by_key(|f| f.id);
        for f in &mut findings {
            f.sightings = self.sightings(f.id)?;
        }
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
            merged_into: raw.merged_into.map(FindingId),
            sightings: Vec::new(),
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
    merged_into: Option<i64>,
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
            merged_into: r.get(21)?,
        })
    }
}

/// A row of `sightings` before validation (the fleet's outbox ships it as
/// stored).
#[derive(Debug)]
pub(crate) struct RawSighting {
    pub(crate) seen_at: i64,
    pub(crate) identity: Option<String>,
    pub(crate) job: String,
    pub(crate) pid: i64,
    pub(crate) uid: i64,
    pub(crate) exe: Option<String>,
    pub(crate) comm: String,
    pub(crate) cgroup: Option<String>,
    pub(crate) container: Option<String>,
    pub(crate) command: Option<String>,
    pub(crate) script: Option<String>,
    pub(crate) dest_host: String,
    pub(crate) dest_port: i64,
    pub(crate) location: String,
    pub(crate) action: String,
    pub(crate) allowed_by: Option<String>,
    pub(crate) session_id: Option<String>,
}

impl RawSighting {
    /// The columns [`RawSighting::from_row`] reads, in order.
    pub(crate) const COLUMNS: &'static str =
        "seen_at, identity, job, pid, uid, exe, comm, cgroup, container, command, \
         script, dest_host, dest_port, location, action, allowed_by, session_id";

    /// Reads [`RawSighting::COLUMNS`] starting at column `at`.
    pub(crate) fn from_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<RawSighting> {
        Ok(RawSighting {
            seen_at: r.get(at)?,
            identity: r.get(at + 1)?,
            job: r.get(at + 2)?,
            pid: r.get(at + 3)?,
            uid: r.get(at + 4)?,
            exe: r.get(at + 5)?,
            comm: r.get(at + 6)?,
            cgroup: r.get(at + 7)?,
            container: r.get(at + 8)?,
            command: r.get(at + 9)?,
            script: r.get(at + 10)?,
            dest_host: r.get(at + 11)?,
            dest_port: r.get(at + 12)?,
            location: r.get(at + 13)?,
            action: r.get(at + 14)?,
            allowed_by: r.get(at + 15)?,
            session_id: r.get(at + 16)?,
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
    command: Option<String>,
    script: Option<String>,
    allowed_by: Option<String>,
    session_id: Option<String>,
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
            command: f.command.as_deref().map(|c| cap(c, limits::COMMAND)),
            script: f.script.as_deref().map(|c| cap(c, limits::PATH)),
            allowed_by: f.allowed_by.as_deref().map(|c| cap(c, limits::RULE_ID)),
            session_id: f.session_id.as_deref().map(|c| cap(c, limits::RULE_ID)),
        })
    }
}

/// Host names compare case-insensitively and without the root dot.
fn normalize_host(host: &str) -> String {
    host.trim().trim_end_matches('.').to_ascii_lowercase()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.unix_timestamp().to_string())
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
