//! The SQLite sessions store: schema, the writer's batch commit, reads,
//! verification and pruning.
//!
//! Durability: WAL with `synchronous=FULL`. The writer commits a small
//! transaction at least every `flush_interval`; each commit is fsynced, so
//! what is committed survives both the gateway being killed and the host
//! losing power, and WAL never leaves a half-written transaction visible.
//! Every write runs in `BEGIN IMMEDIATE` so the writer, the pruner and a
//! reviewer's CLI can share the file (`busy_timeout` queues writers).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{
    ffi::ErrorCode, params, params_from_iter, types::Value, Connection, OptionalExtension as _, Row, Transaction,
    TransactionBehavior,
};

use crate::sqlite::Migration;

use super::{
    chain::{self, Verdict},
    chunk::{self, Chunk, ChunkError},
    lock,
    model::{from_nanos, SessionEnd},
    Record, RecordError, SessionFilter, SessionId, SessionState, SessionSummary,
};

/// Schema migrations; entry `i` takes the database from version `i` to `i + 1`.
const MIGRATIONS: &[Migration] = &[
    Migration::Sql(
        r#"
-- One row per session: a copy of the start record's data (`meta`) and the
-- fields listings filter on, plus the chain's current tail and the end.
-- `verify` checks all of it against the records.
CREATE TABLE sessions (
    id          TEXT    PRIMARY KEY,
    conn_id     INTEGER NOT NULL,
    started     INTEGER NOT NULL,  -- Unix time, nanoseconds, UTC
    identity    TEXT    NOT NULL,
    host        TEXT    NOT NULL,
    orig_dst    TEXT    NOT NULL,
    protocol    TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    comm        TEXT    NOT NULL,
    meta        TEXT    NOT NULL,
    exchanges   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    last_hash   TEXT    NOT NULL,
    last_ts     INTEGER NOT NULL,  -- the last record's time (the end, once ended)
    ended       INTEGER,
    bytes_up    INTEGER,
    bytes_down  INTEGER,
    outcome     TEXT
) STRICT;
CREATE INDEX sessions_started ON sessions (started);
CREATE INDEX sessions_last_ts ON sessions (last_ts);
-- The hash chains. A rowid table (not WITHOUT ROWID): rows carry bodies of
-- up to max_body_bytes.
CREATE TABLE records (
    id          INTEGER PRIMARY KEY,
    session     TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    ts          INTEGER NOT NULL,
    kind        TEXT    NOT NULL,
    data        TEXT    NOT NULL,  -- canonical JSON, exactly what was hashed
    prev_hash   TEXT    NOT NULL,
    hash        TEXT    NOT NULL,
    UNIQUE (session, seq)
) STRICT;
"#,
    ),
    Migration::Code(records_into_chunks),
];

/// The table of version 2: one row per session per writer batch (see
/// [`chunk`](super::chunk)). A record's local id (the fleet outbox's cursor)
/// is the row's `id` plus its place in the row, so rows take consecutive
/// ranges of ids and a record keeps the id it had as a row of its own.
const CHUNKS_TABLE: &str = r#"
CREATE TABLE chunks (
    id          INTEGER PRIMARY KEY,  -- local id of its first record
    session     TEXT    NOT NULL,
    first_seq   INTEGER NOT NULL,
    n           INTEGER NOT NULL,     -- records in body
    exchanges   INTEGER NOT NULL,     -- of which exchanges
    prev_hash   TEXT    NOT NULL,     -- hash of the record before the first
    ts          INTEGER NOT NULL,     -- the first record's time
    body        BLOB    NOT NULL,
    UNIQUE (session, first_seq)
) STRICT;
"#;

/// Most body bytes a migrated row collects.
const MIGRATED_CHUNK_BYTES: usize = 1024 * 1024;

/// Version 1 to 2: the records, one row each, into `chunks`. A run of rows
/// with consecutive ids of one session, consecutive seqs and each `prev_hash`
/// the hash before it becomes one row, so every id is kept and whatever a
/// damaged database held (a broken link, a gap, an edited text) is still
/// there for verification to find.
fn records_into_chunks(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(CHUNKS_TABLE)?;
    let mut read = conn.prepare("SELECT id, session, seq, ts, kind, data, prev_hash, hash FROM records ORDER BY id")?;
    let mut insert = conn.prepare(INSERT_CHUNK)?;
    let mut rows = read.query([])?;
    // The run being collected: its first id, and the hash of its last record.
    let mut run: Option<(i64, Chunk, Vec<u8>)> = None;
    // The body keeps the records' texts byte for byte, invalid UTF-8
    // included; the row's own TEXT columns (session, prev_hash) take a
    // lossy copy, which a damaged link then still fails to match.
    let text = |r: &Row<'_>, i: usize| -> rusqlite::Result<String> {
        Ok(String::from_utf8_lossy(r.get_ref(i)?.as_bytes()?).into_owned())
    };
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        let session = text(r, 1)?;
        let seq: i64 = r.get(2)?;
        let prev_hash = r.get_ref(6)?.as_bytes()?;
        let continues = run.as_ref().is_some_and(|(first, c, last_hash)| {
            *first + i64::from(c.records) == id
                && c.session.as_str() == session
                && c.first_seq as i64 + i64::from(c.records) == seq
                && last_hash.as_slice() == prev_hash
                && c.body.len() < MIGRATED_CHUNK_BYTES
        });
        if !continues {
            if let Some((first, c, _)) = run.take() {
                insert_chunk(&mut insert, first, &c)?;
            }
            run = Some((id, Chunk::new(SessionId::from_stored(session), seq as u64, text(r, 6)?), Vec::new()));
        }
        let Some((_, c, last_hash)) = run.as_mut() else { continue };
        let raw = |i: usize| r.get_ref(i).and_then(|v| Ok(v.as_bytes()?.to_vec()));
        c.push_raw(r.get(3)?, &raw(4)?, &raw(7)?, &raw(5)?);
        *last_hash = raw(7)?;
    }
    if let Some((first, c, _)) = run.take() {
        insert_chunk(&mut insert, first, &c)?;
    }
    drop(rows);
    drop(read);
    drop(insert);
    conn.execute_batch("DROP TABLE records;")
}

/// `first_seq, n, prev_hash, body` of a `chunks` row read in that order.
pub(crate) fn chunk_row<'a>(r: &'a Row<'_>) -> rusqlite::Result<(u64, u64, String, &'a [u8])> {
    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get(2)?, r.get_ref(3)?.as_bytes()?))
}

/// Records past a local id, for the fleet outbox ([`records_after`]).
#[derive(Debug, Default)]
pub(crate) struct RecordsAfter {
    /// Each record with its local id, in id order.
    pub(crate) records: Vec<(i64, Record)>,
    /// Stored rows that do not decode: the session, the first seq, why.
    pub(crate) damaged: Vec<(String, u64, String)>,
    /// The last local id read (damaged rows included).
    pub(crate) last_id: Option<i64>,
}

/// The records whose local id is above `after`, whole rows at a time, until
/// at least `min` (or the end). Every session's last record read is thus the
/// last of its row, which the outbox relies on to count its exchanges
/// ([`exchanges_through`]).
pub(crate) fn records_after(conn: &Connection, after: i64, min: usize) -> rusqlite::Result<RecordsAfter> {
    // The row holding `after` may hold later records too.
    let mut st = conn.prepare_cached(
        "SELECT first_seq, n, prev_hash, body, id, session FROM chunks \
         WHERE id >= coalesce((SELECT id FROM chunks WHERE id <= ?1 ORDER BY id DESC LIMIT 1), 0) ORDER BY id",
    )?;
    let mut rows = st.query([after])?;
    let mut out = RecordsAfter::default();
    while out.records.len() < min {
        let Some(r) = rows.next()? else { break };
        let (first_seq, n, prev_hash, body) = chunk_row(r)?;
        let (id, session): (i64, String) = (r.get(4)?, r.get(5)?);
        let last = id.saturating_add(i64::try_from(n).unwrap_or(i64::MAX)).saturating_sub(1);
        if last <= after {
            continue;
        }
        out.last_id = Some(last);
        match chunk::decode(&SessionId::from_stored(session.clone()), first_seq, prev_hash, n, body) {
            Ok(records) => {
                let numbered = (id..).zip(records).filter(|(local, _)| *local > after);
                out.records.extend(numbered);
            }
            Err(e) => out.damaged.push((session, first_seq, e.to_string())),
        }
    }
    Ok(out)
}

/// How many exchanges a session's records hold up to the end of the row
/// that ends at `seq` (rows of one session never overlap).
pub(crate) fn exchanges_through(conn: &Connection, session: &str, seq: u64) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT coalesce(sum(exchanges), 0) FROM chunks WHERE session = ?1 AND first_seq <= ?2")?
        .query_row(params![session, seq as i64], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
}

const INSERT_CHUNK: &str = "INSERT INTO chunks (id, session, first_seq, n, exchanges, prev_hash, ts, body) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

// The fleet outbox's questions about local ids (`?1` is its cursor). A row
// holds the ids `id ..= id + n - 1`; the row holding `?1` may hold later
// ids too, and rowid order finds it without a scan.

/// How many records have a local id above `?1`.
pub(crate) const COUNT_RECORDS_AFTER: &str = "SELECT coalesce(sum(max(0, min(n, id + n - 1 - ?1))), 0) FROM chunks \
     WHERE id >= coalesce((SELECT id FROM chunks WHERE id <= ?1 ORDER BY id DESC LIMIT 1), 0)";
/// When the first record after `?1` was recorded, to the row: its row's first record's time.
pub(crate) const FIRST_TIME_AFTER: &str = "SELECT ts FROM chunks \
     WHERE id >= coalesce((SELECT id FROM chunks WHERE id <= ?1 ORDER BY id DESC LIMIT 1), 0) AND id + n - 1 > ?1 \
     ORDER BY id LIMIT 1";
/// The newest local id (NULL when there are no records).
pub(crate) const NEWEST_RECORD_ID: &str = "SELECT (SELECT id + n - 1 FROM chunks ORDER BY id DESC LIMIT 1)";

fn insert_chunk(st: &mut rusqlite::Statement<'_>, id: i64, c: &Chunk) -> rusqlite::Result<()> {
    st.execute(params![
        id,
        c.session.as_str(),
        c.first_seq as i64,
        i64::from(c.records),
        i64::from(c.exchanges),
        c.prev_hash,
        c.ts,
        c.body
    ])
    .map(drop)
}

/// How long a writer waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Page size of a new sessions database. The writer's cost is mostly
/// SQLite moving pages: each commit writes every page the batch touched to
/// the WAL (one `pwrite` for the frame header, one for the page), and every
/// 1,000 pages the checkpoint reads them back and writes them into the
/// database. At full recording a record is about 1 KiB, so with SQLite's
/// 4 KiB pages that was 0.77 `pwrite` and 0.22 `pread` per HTTP request;
/// with 16 KiB pages 0.23 and 0.05, and the writer's CPU per request fell
/// by about a sixth (docs/benchmarks.md, "Where full recording's cost goes
/// natively"). A database created with another size keeps it.
pub(crate) const PAGE_SIZE: u32 = 16 * 1024;

/// Cap on the WAL file left after a checkpoint: bursts of bodies can grow it
/// far beyond its steady-state size.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Columns of `sessions` in the order [`SessionRow::from_row`] reads them.
const SESSION_COLUMNS: &str = "id, conn_id, started, identity, host, orig_dst, protocol, pid, comm, meta, exchanges, \
     last_seq, last_hash, last_ts, ended, bytes_up, bytes_down, outcome";

/// A sessions database connection. Not `Sync`: one per thread.
pub struct SessionStore {
    conn: Connection,
    path: PathBuf,
    /// The file opened, to notice it replaced or its log deleted ([`Self::check_files`]).
    opened: Option<crate::sqlite::FileId>,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore").field("path", &self.path).finish_non_exhaustive()
    }
}

/// A row of `sessions`, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionRow {
    pub(crate) id: SessionId,
    pub(crate) conn_id: u64,
    pub(crate) started: i64,
    pub(crate) identity: String,
    pub(crate) host: String,
    pub(crate) orig_dst: String,
    pub(crate) protocol: String,
    pub(crate) pid: u32,
    pub(crate) comm: String,
    pub(crate) meta: String,
    pub(crate) exchanges: u64,
    pub(crate) last_seq: u64,
    pub(crate) last_hash: String,
    pub(crate) last_ts: i64,
    pub(crate) ended: Option<i64>,
    pub(crate) bytes_up: Option<u64>,
    pub(crate) bytes_down: Option<u64>,
    pub(crate) outcome: Option<String>,
}

// Unsigned counters are stored as their i64 bit pattern (SQLite integers are
// signed); the round trip is exact.
impl SessionRow {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<(SessionRow, i64)> {
        let pid: i64 = r.get(7)?;
        Ok((
            SessionRow {
                id: SessionId::from_stored(r.get(0)?),
                conn_id: r.get::<_, i64>(1)? as u64,
                started: r.get(2)?,
                identity: r.get(3)?,
                host: r.get(4)?,
                orig_dst: r.get(5)?,
                protocol: r.get(6)?,
                pid: u32::try_from(pid).unwrap_or(u32::MAX),
                comm: r.get(8)?,
                meta: r.get(9)?,
                exchanges: r.get::<_, i64>(10)? as u64,
                last_seq: r.get::<_, i64>(11)? as u64,
                last_hash: r.get(12)?,
                last_ts: r.get(13)?,
                ended: r.get(14)?,
                bytes_up: r.get::<_, Option<i64>>(15)?.map(|n| n as u64),
                bytes_down: r.get::<_, Option<i64>>(16)?.map(|n| n as u64),
                outcome: r.get(17)?,
            },
            pid,
        ))
    }

    fn summary(&self, live_since: Option<i64>) -> SessionSummary {
        let state = if self.ended.is_some() {
            SessionState::Ended
        } else if live_since.is_some_and(|since| self.started >= since) {
            SessionState::Open
        } else {
            SessionState::Interrupted
        };
        SessionSummary {
            id: self.id.clone(),
            conn_id: self.conn_id,
            started: from_nanos(self.started),
            identity: self.identity.clone(),
            host: self.host.clone(),
            orig_dst: self.orig_dst.clone(),
            protocol: self.protocol.clone(),
            pid: self.pid,
            comm: self.comm.clone(),
            state,
            ended: self.ended.map(from_nanos),
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            outcome: self.outcome.clone(),
            exchanges: self.exchanges,
            records: self.last_seq + 1,
            last_activity: from_nanos(self.last_ts),
        }
    }
}

/// The tail of a session's chain after a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tail {
    pub(crate) last_seq: u64,
    pub(crate) last_hash: String,
    pub(crate) last_ts: i64,
    pub(crate) exchanges: u64,
    pub(crate) end: Option<SessionEnd>,
}

/// One session's part of a batch: its new records and, when it had records
/// after its start, the chain's tail after them.
#[derive(Debug)]
pub(crate) struct Appended {
    /// The records, as one row.
    pub(crate) chunk: Chunk,
    /// The sessions row's new tail (`None` when the batch holds only the
    /// start, which the new row already says).
    pub(crate) tail: Option<Tail>,
}

/// What the writer commits in one transaction.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Sessions started in this batch (their row as of the start record).
    pub(crate) new_sessions: Vec<SessionRow>,
    /// One entry per session with records in this batch, in the order of
    /// their first record.
    pub(crate) sessions: Vec<Appended>,
    /// Records in `sessions`.
    pub(crate) records: usize,
    /// Approximate size, to cut batches of big bodies short.
    pub(crate) bytes: usize,
}

impl Batch {
    pub(crate) fn is_empty(&self) -> bool {
        self.records == 0
    }

    pub(crate) fn clear(&mut self) {
        *self = Batch::default();
    }
}

impl SessionStore {
    /// Opens (creating if needed) the database at `path` and brings its schema
    /// up to date. The directory must exist.
    pub fn open(path: &Path) -> Result<SessionStore, RecordError> {
        // The fsync of `synchronous = FULL` is paid by the writer thread
        // once per group commit (at most every flush_interval under steady
        // load), never by the proxy.
        let conn =
            crate::sqlite::open_private_paged(path, BUSY_TIMEOUT, Some(PAGE_SIZE)).map_err(|e| open_error(path, e))?;
        let opened = crate::sqlite::FileId::of(path).ok();
        let store = SessionStore { conn, path: path.to_owned(), opened };
        store
            .conn
            .pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
            .map_err(store.err("setting journal_size_limit"))?;
        store.migrate()?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks that the files under the open connection are still the ones
    /// it opened, with their write-ahead log (see [`crate::sqlite::Damage`]):
    /// the writer's commits are durable only then.
    pub(crate) fn check_files(&self) -> Result<(), RecordError> {
        match self.opened {
            Some(opened) => crate::sqlite::check_files(&self.path, opened)
                .map_err(|damage| RecordError::Damaged { path: self.path.clone(), damage }),
            None => Ok(()),
        }
    }

    fn err(&self, doing: &'static str) -> impl FnOnce(rusqlite::Error) -> RecordError + '_ {
        move |e| classify(&self.path, doing, e)
    }

    fn migrate(&self) -> Result<(), RecordError> {
        crate::sqlite::migrate_steps(&self.conn, MIGRATIONS).map_err(|e| open_error(&self.path, e))
    }

    fn begin(&self, behavior: TransactionBehavior) -> Result<Transaction<'_>, RecordError> {
        Transaction::new_unchecked(&self.conn, behavior).map_err(self.err("starting a transaction"))
    }

    /// Commits a writer batch in one transaction. Returns the sessions whose
    /// row was gone (deleted or pruned while live): their records are stored
    /// but no listing will show them.
    pub(crate) fn write_batch(&self, batch: &Batch) -> Result<Vec<SessionId>, RecordError> {
        let tx = self.begin(TransactionBehavior::Immediate)?;
        for s in &batch.new_sessions {
            tx.prepare_cached(&format!(
                "INSERT INTO sessions ({SESSION_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, NULL, NULL, NULL, NULL)"
            ))
            .and_then(|mut st| {
                st.execute(params![
                    s.id.as_str(),
                    s.conn_id as i64,
                    s.started,
                    s.identity,
                    s.host,
                    s.orig_dst,
                    s.protocol,
                    s.pid,
                    s.comm,
                    s.meta,
                    s.exchanges as i64,
                    s.last_seq as i64,
                    s.last_hash,
                    s.last_ts,
                ])
            })
            .map_err(self.err("inserting a session"))?;
        }
        // Rows take consecutive ranges of local ids after the newest row's:
        // the fleet outbox ships records in that order. The newest row is
        // the one pruning keeps (see `Outbox::shipped_retention`).
        let mut next_id: i64 = tx
            .prepare_cached("SELECT id + n FROM chunks ORDER BY id DESC LIMIT 1")
            .and_then(|mut st| st.query_row([], |r| r.get(0)).optional())
            .map_err(self.err("reading the last record id"))?
            .unwrap_or(1);
        // One statement for the whole batch: it holds up to thousands of rows.
        let mut insert = tx.prepare_cached(INSERT_CHUNK).map_err(self.err("inserting records"))?;
        for s in &batch.sessions {
            insert_chunk(&mut insert, next_id, &s.chunk).map_err(self.err("inserting records"))?;
            next_id += i64::from(s.chunk.records);
        }
        drop(insert);
        let mut missing = Vec::new();
        for (id, t) in batch.sessions.iter().filter_map(|s| Some((&s.chunk.session, s.tail.as_ref()?))) {
            let end = t.end.as_ref();
            let changed = tx
                .prepare_cached(
                    "UPDATE sessions SET last_seq = ?2, last_hash = ?3, last_ts = ?4, exchanges = ?5, \
                     ended = iif(?6, ?4, ended), bytes_up = coalesce(?7, bytes_up), \
                     bytes_down = coalesce(?8, bytes_down), outcome = coalesce(?9, outcome) WHERE id = ?1",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        id.as_str(),
                        t.last_seq as i64,
                        t.last_hash,
                        t.last_ts,
                        t.exchanges as i64,
                        end.is_some(),
                        end.map(|e| e.bytes_up as i64),
                        end.map(|e| e.bytes_down as i64),
                        end.map(|e| e.outcome.as_str()),
                    ])
                })
                .map_err(self.err("updating a session"))?;
            if changed == 0 {
                missing.push(id.clone());
            }
        }
        tx.commit().map_err(self.err("committing records"))?;
        Ok(missing)
    }

    /// Sessions matching `filter`, newest first.
    pub fn list(&self, filter: &SessionFilter) -> Result<Vec<SessionSummary>, RecordError> {
        let mut clauses = Vec::new();
        let mut args: Vec<Value> = Vec::new();
        if let Some(identity) = &filter.identity {
            args.push(Value::Text(identity.clone()));
            clauses.push(format!("identity GLOB ?{}", args.len()));
        }
        if let Some(since) = filter.since {
            let n = since.unix_timestamp_nanos();
            args.push(Value::Integer(i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX })));
            clauses.push(format!("started >= ?{}", args.len()));
        }
        if let Some(host) = &filter.host {
            args.push(Value::Text(host.trim_end_matches('.').to_ascii_lowercase()));
            clauses.push(format!("lower(host) GLOB ?{}", args.len()));
        }
        if let Some(outcome) = filter.outcome {
            args.push(Value::Text(outcome.as_str().to_owned()));
            clauses.push(format!("outcome = ?{}", args.len()));
        }
        if let Some(ids) = &filter.ids {
            let mut marks = Vec::with_capacity(ids.len());
            for id in ids {
                args.push(Value::Text(id.clone()));
                marks.push(format!("?{}", args.len()));
            }
            clauses.push(if marks.is_empty() { "0".to_owned() } else { format!("id IN ({})", marks.join(", ")) });
        }
        let wher = if clauses.is_empty() { String::new() } else { format!("WHERE {}", clauses.join(" AND ")) };
        let limit = filter.limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
        args.push(Value::Integer(limit));
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM sessions {wher} ORDER BY started DESC, id DESC LIMIT ?{}",
            args.len()
        );
        let rows = self
            .conn
            .prepare(&sql)
            .and_then(|mut st| {
                st.query_map(params_from_iter(args), SessionRow::from_row)?.collect::<Result<Vec<_>, _>>()
            })
            .map_err(self.err("listing sessions"))?;
        let live = lock::live_since(&self.path);
        rows.into_iter().map(|row| self.checked(row).map(|row| row.summary(live))).collect()
    }

    /// The full id of the one session whose id starts with `prefix` (dashes
    /// optional).
    pub fn resolve(&self, prefix: &str) -> Result<SessionId, RecordError> {
        let wanted: String = prefix.trim().to_ascii_lowercase();
        if wanted.is_empty() || !wanted.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(RecordError::BadId(prefix.to_owned()));
        }
        // Ids are `<12 hex>-<12 hex>`: put the dash back where it belongs.
        let digits: String = wanted.chars().filter(|c| *c != '-').collect();
        let normalized = if digits.len() > 12 { format!("{}-{}", &digits[..12], &digits[12..]) } else { digits };
        let ids: Vec<String> = self
            .conn
            .prepare_cached("SELECT id FROM sessions WHERE id GLOB ?1 || '*' ORDER BY id LIMIT 4")
            .and_then(|mut st| st.query_map([&normalized], |r| r.get(0))?.collect())
            .map_err(self.err("looking up a session"))?;
        match ids.as_slice() {
            [] => Err(RecordError::NotFound(prefix.to_owned())),
            [one] => Ok(SessionId::from_stored(one.clone())),
            many => Err(RecordError::Ambiguous { prefix: prefix.to_owned(), matches: many.join(", ") }),
        }
    }

    fn row(&self, id: &SessionId) -> Result<Option<SessionRow>, RecordError> {
        let row = self
            .conn
            .prepare_cached(&format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1"))
            .and_then(|mut st| st.query_row([id.as_str()], SessionRow::from_row).optional())
            .map_err(self.err("reading a session"))?;
        row.map(|row| self.checked(row)).transpose()
    }

    /// The sessions row of `id` as stored, on any connection to a sessions
    /// database (the fleet outbox reads inside its own read transaction).
    pub(crate) fn stored_row(conn: &Connection, id: &str) -> rusqlite::Result<Option<SessionRow>> {
        conn.prepare_cached(&format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1"))
            .and_then(|mut st| st.query_row([id], SessionRow::from_row).optional())
            .map(|row| row.map(|(row, _)| row))
    }

    fn checked(&self, (row, pid): (SessionRow, i64)) -> Result<SessionRow, RecordError> {
        if u32::try_from(pid).is_err() {
            return Err(RecordError::BadRow {
                path: self.path.clone(),
                id: row.id.to_string(),
                field: "pid",
                reason: format!("{pid} is not a process id"),
            });
        }
        Ok(row)
    }

    /// One session's summary.
    pub fn summary(&self, id: &SessionId) -> Result<SessionSummary, RecordError> {
        let row = self.row(id)?.ok_or_else(|| RecordError::NotFound(id.to_string()))?;
        Ok(row.summary(lock::live_since(&self.path)))
    }

    /// One session's records, in chain order.
    pub fn records(&self, id: &SessionId) -> Result<Vec<Record>, RecordError> {
        self.stored_records(id)?.map_err(|(first_seq, e)| RecordError::BadRow {
            path: self.path.clone(),
            id: id.to_string(),
            field: "records",
            reason: format!("the row of records from {first_seq} on does not decode: {e}"),
        })
    }

    /// One session's records, or the first stored row that does not decode
    /// (its first seq, and why).
    fn stored_records(&self, id: &SessionId) -> Result<Result<Vec<Record>, (u64, ChunkError)>, RecordError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT first_seq, n, prev_hash, body FROM chunks WHERE session = ?1 ORDER BY first_seq")
            .map_err(self.err("reading records"))?;
        let mut rows = st.query([id.as_str()]).map_err(self.err("reading records"))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(self.err("reading records"))? {
            let (first_seq, n, prev_hash, body) = chunk_row(r).map_err(self.err("reading records"))?;
            match chunk::decode(id, first_seq, prev_hash, n, body) {
                Ok(records) if out.is_empty() => out = records,
                Ok(records) => out.extend(records),
                Err(e) => return Ok(Err((first_seq, e))),
            }
        }
        Ok(Ok(out))
    }

    /// Verifies one session's chain against itself and its sessions row
    /// (see [`Verdict`]). Reads in one transaction, so a session being
    /// written meanwhile is checked as of one commit.
    pub fn verify(&self, id: &SessionId) -> Result<Verdict, RecordError> {
        let tx = self.begin(TransactionBehavior::Deferred)?;
        let row = self.row(id)?.ok_or_else(|| RecordError::NotFound(id.to_string()))?;
        let records = self.stored_records(id)?;
        tx.finish().map_err(self.err("ending a read"))?;
        Ok(match records {
            Ok(records) => chain::verify(&row, &records),
            Err((first_seq, e)) => Verdict::Broken {
                seq: Some(e.seq(first_seq)),
                problem: format!("the stored row of records from {first_seq} on does not decode: {e}"),
            },
        })
    }

    /// Every session id, oldest first.
    pub fn session_ids(&self) -> Result<Vec<SessionId>, RecordError> {
        self.conn
            .prepare("SELECT id FROM sessions ORDER BY started, id")
            .and_then(|mut st| st.query_map([], |r| r.get(0).map(SessionId::from_stored))?.collect())
            .map_err(self.err("listing sessions"))
    }

    /// Session ids that have records but no sessions row: a deleted row, or
    /// a session pruned while still live.
    pub fn orphaned_sessions(&self) -> Result<Vec<String>, RecordError> {
        self.conn
            .prepare(
                "SELECT DISTINCT session FROM chunks WHERE session NOT IN (SELECT id FROM sessions) ORDER BY session",
            )
            .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
            .map_err(self.err("looking for orphaned records"))
    }

    /// Deletes sessions whose last record is older than `cutoff` (Unix ns),
    /// `batch` sessions per transaction so the write lock is never held
    /// long. Unended sessions started at or after `keep_unended_since` are
    /// kept: they are live in the running gateway. Returns how many went.
    pub fn prune(&self, cutoff: i64, keep_unended_since: i64, batch: usize) -> Result<u64, RecordError> {
        let batch = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
        let mut total = 0u64;
        loop {
            let tx = self.begin(TransactionBehavior::Immediate)?;
            let ids: Vec<String> = tx
                .prepare_cached(
                    "SELECT id FROM sessions WHERE last_ts < ?1 AND (ended IS NOT NULL OR started < ?2) LIMIT ?3",
                )
                .and_then(|mut st| st.query_map(params![cutoff, keep_unended_since, batch], |r| r.get(0))?.collect())
                .map_err(self.err("finding expired sessions"))?;
            for id in &ids {
                tx.prepare_cached("DELETE FROM chunks WHERE session = ?1")
                    .and_then(|mut st| st.execute([id]))
                    .map_err(self.err("deleting records"))?;
                tx.prepare_cached("DELETE FROM sessions WHERE id = ?1")
                    .and_then(|mut st| st.execute([id]))
                    .map_err(self.err("deleting a session"))?;
            }
            tx.commit().map_err(self.err("committing a prune"))?;
            total += ids.len() as u64;
            if (ids.len() as i64) < batch {
                return Ok(total);
            }
            // Let the recording writer in between batches.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The underlying connection, for tests that tamper with the database.
    #[cfg(test)]
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// Stores records of `session` as one row, as the writer does: local ids
/// from `id`, seqs from `first_seq`, chained from `prev_hash`, each record
/// `(ts, kind, data)`. Returns the last record's hash.
#[cfg(test)]
pub(crate) fn insert_test_row(
    conn: &Connection,
    id: i64,
    session: &str,
    first_seq: u64,
    prev_hash: &str,
    records: &[(i64, &str, &str)],
) -> String {
    let mut c = Chunk::new(SessionId::from_stored(session.to_owned()), first_seq, prev_hash.to_owned());
    let mut prev = prev_hash.to_owned();
    for (i, (ts, kind, data)) in records.iter().enumerate() {
        let hash = chain::hash_record(session, &prev, first_seq + i as u64, *ts, kind, data);
        c.push(*ts, kind, &hash, data);
        prev = hash;
    }
    insert_chunk(&mut conn.prepare(INSERT_CHUNK).expect("prepare"), id, &c).expect("insert a row of records");
    prev
}

/// Maps SQLite's "this file is damaged / not a database" codes to
/// [`RecordError::Corrupt`] so the message says what to do about it.
fn open_error(path: &Path, e: crate::sqlite::OpenError) -> RecordError {
    match e {
        crate::sqlite::OpenError::Unusable(reason) => RecordError::Open { path: path.to_owned(), reason },
        crate::sqlite::OpenError::Sqlite { doing, source } => classify(path, doing, source),
        crate::sqlite::OpenError::UnsupportedSchema { found, supported } => {
            RecordError::UnsupportedSchema { path: path.to_owned(), found, supported }
        }
    }
}

fn classify(path: &Path, doing: &'static str, e: rusqlite::Error) -> RecordError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            RecordError::Corrupt { path: path.to_owned(), source: e }
        }
        _ => RecordError::Database { path: path.to_owned(), doing, source: e },
    }
}
