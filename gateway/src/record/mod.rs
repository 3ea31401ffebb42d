//! Session recording: every intercepted connection becomes a session that can
//! be listed, read back, verified untampered and replayed (see
//! `docs/recording.md`).
//!
//! The proxy opens one [`Recorder`] at start-up, calls [`Recorder::start`]
//! per connection and reports exchanges, events and the end through the
//! returned [`SessionRecorder`]. Those calls only enqueue: a dedicated writer
//! thread (`writer`) serializes, hash-chains (`chain`) and commits in
//! small transactions at least every `flush_interval`, so the request path
//! never waits for SQLite. Reviewers read with `gateway sessions ...`
//! (`crate::cli::sessions`) through a [`SessionStore`]; old sessions are removed by a
//! background pruner (`retention`).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

mod chain;
pub(crate) mod chunk;
mod encode;
mod lock;
mod model;
mod retention;
mod store;
mod writer;

pub use crate::redact::{redact_header_pairs, redact_headers, REDACTED};
pub use chain::{hash_record, Verdict, GENESIS_HASH};
pub use model::{
    AnyExchange, BodyData, DecisionFacts, EventData, EventKind, ExchangeData, ExchangeRecord, MessageData,
    PostgresExchange, PostgresExchangeData, PostgresMessage, PostgresOutcome, PostgresResult, Record, RecordKind,
    RecordLevel, SessionEnd, SessionFilter, SessionId, SessionMeta, SessionOutcome, SessionStart, SessionState,
    SessionSummary, TlsFacts,
};
pub use retention::prune;
pub use store::SessionStore;
// The fleet's central store verifies shipped chains with the same check.
pub(crate) use chain::verify as verify_chain;
#[cfg(test)]
pub(crate) use store::insert_test_row;
pub(crate) use store::{
    exchanges_through, records_after, SessionRow, COUNT_RECORDS_AFTER, FIRST_TIME_AFTER, NEWEST_RECORD_ID,
};
pub use writer::{Health, Recorder, RecorderStatus, SessionRecorder};

/// File name of the sessions database inside `state_dir` when
/// `record.database` is not set.
pub const DEFAULT_DATABASE_FILE: &str = "sessions.db";

/// Session recording settings (`record:` in the configuration file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RecordConfig {
    /// Record sessions at all.
    pub enabled: bool,
    /// The SQLite database; relative paths are below `state_dir`.
    /// `None` means `state_dir/sessions.db`.
    pub database: Option<PathBuf>,
    /// Most bytes of each request and response body kept; the rest is cut
    /// and the record says so (with the original size).
    pub max_body_bytes: usize,
    /// How long a session is kept after its last record.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the pruner looks for expired sessions.
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    /// Longest a record waits in memory before it is committed.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// What happens to traffic the policy records while the database cannot
    /// take records (disk full, I/O errors, a writer far behind).
    pub on_failure: OnRecordFailure,
}

/// What the gateway does with traffic it should record while it cannot
/// (`record.on_failure`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnRecordFailure {
    /// Refuse connections and requests whose policy records them until the
    /// database takes records again: no traffic goes unrecorded.
    #[default]
    Refuse,
    /// Keep serving; records wait in memory (up to a bound, beyond which they
    /// are dropped and counted) and are committed once the database recovers.
    Serve,
}

impl OnRecordFailure {
    /// The name used in configuration and events.
    pub fn as_str(self) -> &'static str {
        match self {
            OnRecordFailure::Refuse => "refuse",
            OnRecordFailure::Serve => "serve",
        }
    }
}

impl Default for RecordConfig {
    fn default() -> Self {
        RecordConfig {
            enabled: true,
            database: None,
            max_body_bytes: 64 * 1024,
            retention: Duration::from_secs(30 * 24 * 3600),
            prune_interval: Duration::from_secs(600),
            flush_interval: Duration::from_millis(100),
            on_failure: OnRecordFailure::Refuse,
        }
    }
}

/// Largest accepted `max_body_bytes`: a record is one SQLite row and is held
/// in memory while queued; bigger bodies belong in an artifact store.
const MAX_BODY_LIMIT: usize = 16 * 1024 * 1024;
/// Largest accepted `flush_interval`: beyond this a crash loses too much.
const MAX_FLUSH_INTERVAL: Duration = Duration::from_secs(10);

impl RecordConfig {
    /// Where the sessions database lives.
    pub fn database_path(&self, state_dir: &Path) -> PathBuf {
        match &self.database {
            // `join` keeps an absolute path as it is.
            Some(path) => state_dir.join(path),
            None => state_dir.join(DEFAULT_DATABASE_FILE),
        }
    }

    /// Checks what the schema cannot express; errors are (dotted field, reason)
    /// like `Config::validate`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |field: &str, reason: String| Err((format!("record.{field}"), reason));
        if let Some(db) = &self.database {
            if db.as_os_str().is_empty() {
                return err("database", "empty path (omit the field for state_dir/sessions.db)".into());
            }
            if db.file_name().is_none() {
                return err("database", format!("`{}` does not name a file", db.display()));
            }
        }
        if self.max_body_bytes > MAX_BODY_LIMIT {
            return err("max_body_bytes", format!("at most {MAX_BODY_LIMIT} (16 MiB)"));
        }
        if self.retention.is_zero() {
            return err("retention", "must be positive (set `enabled: false` to record nothing)".into());
        }
        if self.prune_interval.is_zero() {
            return err("prune_interval", "must be positive".into());
        }
        if self.flush_interval.is_zero() || self.flush_interval > MAX_FLUSH_INTERVAL {
            return err("flush_interval", "must be between 1ms and 10s".into());
        }
        Ok(())
    }
}

/// Everything that can go wrong in the recording module. Messages name the
/// database file where one is involved.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The database could not be opened or prepared for use.
    #[error("{path}: cannot open the sessions database: {reason}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why, in words.
        reason: String,
    },
    /// The file is not a (healthy) SQLite database.
    #[error("{path}: the sessions database is corrupt or not a SQLite database ({source}); move it aside and let the gateway create a new one, keeping the old file for investigation")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The files under the writer's open connection were damaged, replaced
    /// or removed: commits would no longer be durable.
    #[error("{path}: the sessions database is corrupt: {damage}; nothing more is committed to it. Move it aside (keep it for investigation) or put a good copy at its path: the gateway then opens the file there, creating a new one if none")]
    Damaged {
        /// The database file.
        path: PathBuf,
        /// What was found.
        damage: crate::sqlite::Damage,
    },
    /// The database was written by a newer gateway.
    #[error("{path}: the sessions database has schema version {found}; this gateway understands up to {supported} (upgrade the gateway)")]
    UnsupportedSchema {
        /// The database file.
        path: PathBuf,
        /// `PRAGMA user_version` of the file.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
    /// An SQLite operation failed.
    #[error("{path}: sessions database error while {doing}: {source}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// What the store was doing.
        doing: &'static str,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// Another gateway process records into the same database.
    #[error("{path}: another gateway process is recording into this database ({holder}); give each gateway its own state_dir or record.database")]
    Locked {
        /// The database file.
        path: PathBuf,
        /// Who holds the lock, as the lock file says.
        holder: String,
    },
    /// A stored row does not decode (hand-edited or damaged database).
    #[error("{path}: session {id}: stored {field} is invalid: {reason}")]
    BadRow {
        /// The database file.
        path: PathBuf,
        /// The session.
        id: String,
        /// The column.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// No session with that id (or id prefix).
    #[error("{0}: no such session")]
    NotFound(String),
    /// An id prefix matches several sessions.
    #[error("{prefix}: ambiguous session id prefix, matches {matches} and more; give more characters")]
    Ambiguous {
        /// What was given.
        prefix: String,
        /// Some of the matching ids.
        matches: String,
    },
    /// Not a session id or id prefix.
    #[error("`{0}` is not a session id (hexadecimal digits and `-`)")]
    BadId(String),
    /// The writer thread could not start, has stopped, or failed to commit.
    #[error("session recorder: {0}")]
    Writer(String),
}

impl RecordError {
    /// True for requests that are well-formed but cannot be honoured (unknown
    /// or ambiguous id), as opposed to database or environment failures.
    pub fn is_request_error(&self) -> bool {
        matches!(self, RecordError::NotFound(_) | RecordError::Ambiguous { .. } | RecordError::BadId(_))
    }
}

#[cfg(test)]
mod tests;
