//! The SQLite approvals store.
//!
//! Only the running gateway opens it (approvers go through the admin API),
//! so opening it marks every request still `pending` as `abandoned`: their
//! clients belonged to a previous run and are gone.
//!
//! Durability: WAL with `synchronous=FULL`; a decision acknowledged to an
//! approver survives a crash. Each decision is checked and recorded in one
//! `BEGIN IMMEDIATE` transaction, so two approvers deciding at once are
//! serialised and see each other's decisions.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{process::ProcessSnapshot, redact::cap};
use rusqlite::{params, Connection, OptionalExtension as _, Row, Transaction, TransactionBehavior};
use time::OffsetDateTime;

use super::{
    rules, ApprovalError, ApprovalId, ApprovalSpec, ApprovalView, Approver, DecisionView, ListFilter, NewApproval,
    State, Verdict,
};

/// Schema migrations; entry `i` takes the database from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE approvals (
    -- AUTOINCREMENT: ids are quoted to approvers and in webhooks and must
    -- never be reused.
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    state           TEXT    NOT NULL CHECK (state IN ('pending', 'approved', 'denied', 'timed_out', 'abandoned')),
    rule            TEXT    NOT NULL,
    approver_group  TEXT    NOT NULL,
    min_approvals   INTEGER NOT NULL,
    identity        TEXT    NOT NULL,
    identity_labels TEXT    NOT NULL,  -- JSON object
    process         TEXT    NOT NULL,  -- JSON
    job             TEXT    NOT NULL,  -- JSON object of CI job variables
    session_id      TEXT,
    method          TEXT    NOT NULL,
    url             TEXT    NOT NULL,  -- masked by the proxy
    destination     TEXT    NOT NULL,
    body_preview    TEXT    NOT NULL,  -- masked by the proxy
    requesters      TEXT    NOT NULL,  -- JSON array of names that may not approve
    created_at      INTEGER NOT NULL,  -- Unix time, nanoseconds, UTC
    expires_at      INTEGER NOT NULL,
    finished_at     INTEGER
) STRICT;
CREATE INDEX approvals_state ON approvals (state, id);
CREATE TABLE decisions (
    id          INTEGER PRIMARY KEY,
    approval_id INTEGER NOT NULL REFERENCES approvals (id),
    verdict     TEXT    NOT NULL CHECK (verdict IN ('approve', 'deny')),
    approver    TEXT    NOT NULL,
    recorded_as TEXT    NOT NULL,
    uid         INTEGER NOT NULL,
    pid         INTEGER NOT NULL,
    identity    TEXT,
    comment     TEXT,
    decided_at  INTEGER NOT NULL
) STRICT;
CREATE INDEX decisions_approval ON decisions (approval_id, id);
"#];

const APPROVAL_COLUMNS: &str = "id, state, rule, approver_group, min_approvals, identity, identity_labels, process, \
     job, session_id, method, url, destination, body_preview, requesters, created_at, expires_at, finished_at";

/// How long a writer waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Caps on what the proxy hands over: much of it comes from the job's own
/// traffic or process, so one hostile job must not bloat the database.
/// The `process` column of a request whose process was too large to
/// store, as earlier versions wrote it.
const TRUNCATED_PROCESS: &str = r#"{"truncated":true}"#;

mod limits {
    pub const SHORT: usize = 128;
    pub const IDENTITY: usize = 512;
    pub const METHOD: usize = 32;
    pub const URL: usize = 4096;
    pub const DESTINATION: usize = 300;
    pub const BODY_PREVIEW: usize = 4096;
    pub const MAP_ENTRIES: usize = 64;
    pub const MAP_VALUE: usize = 1024;
    pub const PROCESS_JSON: usize = 16 * 1024;
    pub const REQUESTERS: usize = 32;
    /// Approvers type comments; a longer one is refused, not cut.
    pub const COMMENT: usize = 1000;
}

/// The approvals database. One connection; not `Sync` (the service keeps it
/// behind a mutex and calls it from blocking tasks).
pub struct ApprovalStore {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for ApprovalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApprovalStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl ApprovalStore {
    /// Opens (creating if needed) the database at `path` and brings its
    /// schema up to date. The directory must exist.
    pub fn open(path: &Path) -> Result<ApprovalStore, ApprovalError> {
        let conn = crate::sqlite::open_private(path, BUSY_TIMEOUT).map_err(|e| open_error(path, e))?;
        let store = ApprovalStore { conn, path: path.to_owned() };
        store.conn.pragma_update(None, "foreign_keys", true).map_err(store.err("enabling foreign keys"))?;
        store.migrate()?;
        Ok(store)
    }

    fn err(&self, doing: &'static str) -> impl FnOnce(rusqlite::Error) -> ApprovalError + '_ {
        move |source| classify(&self.path, doing, source)
    }

    fn bad_row(&self, id: i64, field: &'static str, reason: impl ToString) -> ApprovalError {
        ApprovalError::BadRow { path: self.path.clone(), id: ApprovalId(id), field, reason: reason.to_string() }
    }

    fn migrate(&self) -> Result<(), ApprovalError> {
        crate::sqlite::migrate(&self.conn, MIGRATIONS).map_err(|e| open_error(&self.path, e))
    }

    fn begin(&self) -> Result<Transaction<'_>, ApprovalError> {
        Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)
            .map_err(self.err("starting a transaction"))
    }

    /// Marks every pending request `abandoned` (at start-up: their clients
    /// belonged to a previous run) and returns them.
    pub fn abandon_all_pending(&self, now: OffsetDateTime) -> Result<Vec<ApprovalView>, ApprovalError> {
        let tx = self.begin()?;
        let ids: Vec<i64> = tx
            .prepare("SELECT id FROM approvals WHERE state = 'pending' ORDER BY id")
            .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
            .map_err(self.err("finding pending requests"))?;
        tx.execute("UPDATE approvals SET state = 'abandoned', finished_at = ?1 WHERE state = 'pending'", [nanos(now)])
            .map_err(self.err("abandoning pending requests"))?;
        let views = ids.into_iter().map(|id| self.load(&tx, ApprovalId(id))).collect::<Result<Vec<_>, _>>()?;
        tx.commit().map_err(self.err("committing abandoned requests"))?;
        Ok(views.into_iter().flatten().collect())
    }

    /// Stores a new pending request. `requesters` are the names that may not
    /// approve it ([`rules::requester_names`]).
    pub fn insert(
        &self,
        new: &NewApproval,
        requesters: &[String],
        spec: &ApprovalSpec,
        now: OffsetDateTime,
    ) -> Result<ApprovalView, ApprovalError> {
        let expires = now.checked_add(time::Duration::try_from(spec.timeout).unwrap_or(time::Duration::MAX));
        let expires = expires.unwrap_or(now);
        let process = {
            let json = serde_json::to_string(&new.process).unwrap_or_default();
            if json.len() > limits::PROCESS_JSON {
                // Who it was, without the long, job-chosen parts.
                let short = ProcessSnapshot {
                    comm: cap(&new.process.comm, limits::SHORT),
                    exe: None,
                    cgroup: None,
                    container: None,
                    job: BTreeMap::new(),
                    ..new.process.clone()
                };
                serde_json::to_string(&short).unwrap_or_default()
            } else {
                json
            }
        };
        let requesters: Vec<String> =
            requesters.iter().take(limits::REQUESTERS).map(|r| cap(r, limits::IDENTITY)).collect();
        let tx = self.begin()?;
        tx.prepare_cached(
            "INSERT INTO approvals (state, rule, approver_group, min_approvals, identity, identity_labels, process, \
             job, session_id, method, url, destination, body_preview, requesters, created_at, expires_at) \
             VALUES ('pending', ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )
        .and_then(|mut st| {
            st.execute(params![
                cap(&new.rule, limits::SHORT),
                cap(&spec.group, limits::SHORT),
                spec.min_approvals,
                cap(&new.identity, limits::IDENTITY),
                map_json(&new.identity_labels),
                process,
                // Like findings and recordings: never a credential-named value.
                map_json(&crate::redact::redact_job(&new.job)),
                new.session_id.as_deref().map(|s| cap(s, limits::SHORT)),
                cap(&new.method, limits::METHOD),
                cap(&new.url, limits::URL),
                cap(&new.destination, limits::DESTINATION),
                cap(&new.body_preview, limits::BODY_PREVIEW),
                serde_json::Value::from(requesters).to_string(),
                nanos(now),
                nanos(expires),
            ])
        })
        .map_err(self.err("storing an approval request"))?;
        let id = ApprovalId(tx.last_insert_rowid());
        let view = self.load(&tx, id)?.ok_or(ApprovalError::NotFound(id))?;
        tx.commit().map_err(self.err("committing an approval request"))?;
        Ok(view)
    }

    /// One request with its decisions.
    pub fn get(&self, id: ApprovalId) -> Result<Option<ApprovalView>, ApprovalError> {
        self.load(&self.conn, id)
    }

    /// Requests matching `filter`, newest first.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<ApprovalView>, ApprovalError> {
        let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
        let ids: Vec<i64> = self
            .conn
            .prepare_cached("SELECT id FROM approvals WHERE ?1 IS NULL OR state = ?1 ORDER BY id DESC LIMIT ?2")
            .and_then(|mut st| st.query_map(params![filter.state.map(State::as_str), limit], |r| r.get(0))?.collect())
            .map_err(self.err("listing approval requests"))?;
        let views = ids.into_iter().map(|id| self.load(&self.conn, ApprovalId(id))).collect::<Result<Vec<_>, _>>()?;
        Ok(views.into_iter().flatten().collect())
    }

    /// Checks and records a decision against the configured approver
    /// `groups`; returns the request after it and the decision as stored.
    pub(crate) fn decide(
        &self,
        decision: &Decision<'_>,
        groups: &BTreeMap<String, Vec<String>>,
        now: OffsetDateTime,
    ) -> Result<(ApprovalView, DecisionView), ApprovalError> {
        let Decision { id, approver, verdict, comment, caller_user } = *decision;
        let comment = comment.map(str::trim).filter(|c| !c.is_empty());
        if let Some(c) = comment {
            if c.len() > limits::COMMENT {
                return Err(ApprovalError::Invalid(format!("comments are at most {} bytes", limits::COMMENT)));
            }
        }
        let tx = self.begin()?;
        let mut view = self.load(&tx, id)?.ok_or(ApprovalError::NotFound(id))?;
        let who = rules::authorize(&view, approver, verdict, caller_user, groups)?;
        let decision = DecisionView {
            verdict,
            approver: who.name,
            recorded_as: who.recorded_as,
            uid: approver.uid,
            pid: approver.pid,
            identity: approver.identity.as_deref().map(|i| cap(i, limits::IDENTITY)),
            comment: comment.map(ToOwned::to_owned),
            at: now,
        };
        tx.prepare_cached(
            "INSERT INTO decisions (approval_id, verdict, approver, recorded_as, uid, pid, identity, comment, decided_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .and_then(|mut st| {
            st.execute(params![
                id.0,
                verdict.as_str(),
                decision.approver,
                decision.recorded_as,
                decision.uid,
                decision.pid,
                decision.identity,
                decision.comment,
                nanos(now),
            ])
        })
        .map_err(self.err("storing a decision"))?;
        view.decisions.push(decision.clone());
        let state = rules::tally(&view);
        if state != State::Pending {
            tx.execute(
                "UPDATE approvals SET state = ?2, finished_at = ?3 WHERE id = ?1",
                params![id.0, state.as_str(), nanos(now)],
            )
            .map_err(self.err("finishing an approval request"))?;
            view.state = state;
            view.finished_at = Some(now);
        }
        tx.commit().map_err(self.err("committing a decision"))?;
        Ok((view, decision))
    }

    /// Moves a pending request to `state` (timed out, abandoned). Returns
    /// the request and whether this call changed it: a decision may have
    /// finished it first, and then that decision stands.
    pub fn finish(
        &self,
        id: ApprovalId,
        state: State,
        now: OffsetDateTime,
    ) -> Result<(ApprovalView, bool), ApprovalError> {
        let tx = self.begin()?;
        let changed = tx
            .execute(
                "UPDATE approvals SET state = ?2, finished_at = ?3 WHERE id = ?1 AND state = 'pending'",
                params![id.0, state.as_str(), nanos(now)],
            )
            .map_err(self.err("finishing an approval request"))?;
        let view = self.load(&tx, id)?.ok_or(ApprovalError::NotFound(id))?;
        tx.commit().map_err(self.err("committing an approval request"))?;
        Ok((view, changed == 1))
    }

    fn load(&self, conn: &Connection, id: ApprovalId) -> Result<Option<ApprovalView>, ApprovalError> {
        let raw = conn
            .prepare_cached(&format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = ?1"))
            .and_then(|mut st| st.query_row([id.0], RawApproval::from_row).optional())
            .map_err(self.err("reading an approval request"))?;
        let Some(raw) = raw else { return Ok(None) };
        let decisions = conn
            .prepare_cached(&format!(
                "SELECT {} FROM decisions WHERE approval_id = ?1 ORDER BY id",
                RawDecision::COLUMNS
            ))
            .and_then(|mut st| st.query_map([id.0], |r| RawDecision::from_row(r, 0))?.collect::<Result<Vec<_>, _>>())
            .map_err(self.err("reading decisions"))?;
        let decisions = decisions.into_iter().map(|d| d.decode(self, id.0)).collect::<Result<Vec<_>, _>>()?;
        raw.decode(self, decisions).map(Some)
    }
}

/// A decision to check and record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Decision<'a> {
    /// The request.
    pub id: ApprovalId,
    /// Who decides.
    pub approver: &'a Approver,
    /// What.
    pub verdict: Verdict,
    /// Their comment.
    pub comment: Option<&'a str>,
    /// The user name of `approver.uid`.
    pub caller_user: Option<&'a str>,
}

struct RawApproval {
    id: i64,
    state: String,
    rule: String,
    group: String,
    min_approvals: i64,
    identity: String,
    identity_labels: String,
    process: String,
    job: String,
    session_id: Option<String>,
    method: String,
    url: String,
    destination: String,
    body_preview: String,
    requesters: String,
    created_at: i64,
    expires_at: i64,
    finished_at: Option<i64>,
}

impl RawApproval {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<RawApproval> {
        Ok(RawApproval {
            id: r.get(0)?,
            state: r.get(1)?,
            rule: r.get(2)?,
            group: r.get(3)?,
            min_approvals: r.get(4)?,
            identity: r.get(5)?,
            identity_labels: r.get(6)?,
            process: r.get(7)?,
            job: r.get(8)?,
            session_id: r.get(9)?,
            method: r.get(10)?,
            url: r.get(11)?,
            destination: r.get(12)?,
            body_preview: r.get(13)?,
            requesters: r.get(14)?,
            created_at: r.get(15)?,
            expires_at: r.get(16)?,
            finished_at: r.get(17)?,
        })
    }

    fn decode(self, store: &ApprovalStore, decisions: Vec<DecisionView>) -> Result<ApprovalView, ApprovalError> {
        let id = self.id;
        let bad = |field: &'static str| move |e: String| store.bad_row(id, field, e);
        let process = |text: &str| -> Result<ProcessSnapshot, ApprovalError> {
            match serde_json::from_str(text) {
                Ok(p) => Ok(p),
                // What earlier versions stored for an oversized process.
                Err(_) if text == TRUNCATED_PROCESS => Ok(ProcessSnapshot::default()),
                Err(e) => Err(store.bad_row(id, "process", e)),
            }
        };
        let map = |field: &'static str, text: &str| -> Result<BTreeMap<String, String>, ApprovalError> {
            serde_json::from_str(text).map_err(|e| store.bad_row(id, field, e))
        };
        Ok(ApprovalView {
            id: ApprovalId(id),
            state: self.state.parse().map_err(bad("state"))?,
            rule: self.rule,
            group: self.group,
            min_approvals: u32::try_from(self.min_approvals).map_err(|e| store.bad_row(id, "min_approvals", e))?,
            identity: self.identity,
            identity_labels: map("identity_labels", &self.identity_labels)?,
            process: process(&self.process)?,
            job: map("job", &self.job)?,
            session_id: self.session_id,
            method: self.method,
            url: self.url,
            destination: self.destination,
            body_preview: self.body_preview,
            requesters: serde_json::from_str(&self.requesters).map_err(|e| store.bad_row(id, "requesters", e))?,
            created_at: from_nanos(self.created_at).map_err(bad("created_at"))?,
            expires_at: from_nanos(self.expires_at).map_err(bad("expires_at"))?,
            finished_at: self.finished_at.map(from_nanos).transpose().map_err(bad("finished_at"))?,
            decisions,
        })
    }
}

/// A decision row as stored, before decoding: also what the fleet outbox
/// ships.
#[derive(Debug)]
pub(crate) struct RawDecision {
    pub(crate) verdict: String,
    pub(crate) approver: String,
    pub(crate) recorded_as: String,
    pub(crate) uid: i64,
    pub(crate) pid: i64,
    pub(crate) identity: Option<String>,
    pub(crate) comment: Option<String>,
    pub(crate) decided_at: i64,
}

impl RawDecision {
    /// The columns [`RawDecision::from_row`] reads, in order.
    pub(crate) const COLUMNS: &'static str = "verdict, approver, recorded_as, uid, pid, identity, comment, decided_at";

    /// Reads [`RawDecision::COLUMNS`] starting at column `at`.
    pub(crate) fn from_row(r: &Row<'_>, at: usize) -> rusqlite::Result<RawDecision> {
        Ok(RawDecision {
            verdict: r.get(at)?,
            approver: r.get(at + 1)?,
            recorded_as: r.get(at + 2)?,
            uid: r.get(at + 3)?,
            pid: r.get(at + 4)?,
            identity: r.get(at + 5)?,
            comment: r.get(at + 6)?,
            decided_at: r.get(at + 7)?,
        })
    }

    fn decode(self, store: &ApprovalStore, id: i64) -> Result<DecisionView, ApprovalError> {
        let verdict = match self.verdict.as_str() {
            "approve" => Verdict::Approve,
            "deny" => Verdict::Deny,
            other => return Err(store.bad_row(id, "decisions.verdict", format!("`{other}`"))),
        };
        Ok(DecisionView {
            verdict,
            approver: self.approver,
            recorded_as: self.recorded_as,
            uid: u32::try_from(self.uid).map_err(|e| store.bad_row(id, "decisions.uid", e))?,
            pid: u32::try_from(self.pid).map_err(|e| store.bad_row(id, "decisions.pid", e))?,
            identity: self.identity,
            comment: self.comment,
            at: from_nanos(self.decided_at).map_err(|e| store.bad_row(id, "decisions.decided_at", e))?,
        })
    }
}

/// A string map as JSON, bounded in entries and value length.
fn map_json(map: &BTreeMap<String, String>) -> String {
    let bounded: BTreeMap<String, String> =
        map.iter().take(limits::MAP_ENTRIES).map(|(k, v)| (cap(k, limits::SHORT), cap(v, limits::MAP_VALUE))).collect();
    serde_json::to_string(&bounded).unwrap_or_else(|_| "{}".to_owned())
}

fn nanos(t: OffsetDateTime) -> i64 {
    let n = t.unix_timestamp_nanos();
    i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX })
}

fn from_nanos(n: i64) -> Result<OffsetDateTime, String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(n)).map_err(|e| e.to_string())
}

fn open_error(path: &Path, e: crate::sqlite::OpenError) -> ApprovalError {
    match e {
        crate::sqlite::OpenError::Unusable(reason) => ApprovalError::Open { path: path.to_owned(), reason },
        crate::sqlite::OpenError::Sqlite { doing, source } => classify(path, doing, source),
        crate::sqlite::OpenError::UnsupportedSchema { found, supported } => {
            ApprovalError::UnsupportedSchema { path: path.to_owned(), found, supported }
        }
    }
}

/// Maps SQLite's "this file is damaged / not a database" codes to
/// [`ApprovalError::Corrupt`] so the message says what to do about it.
fn classify(path: &Path, doing: &'static str, source: rusqlite::Error) -> ApprovalError {
    match source.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            ApprovalError::Corrupt { path: path.to_owned(), source }
        }
        _ => ApprovalError::Database { path: path.to_owned(), doing, source },
    }
}
