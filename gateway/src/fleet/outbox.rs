//! The outbox: ships what the local SQLite stores committed to the central
//! store, stream by stream, after a high-water mark per stream.
//!
//! Each [`Stream`] is a local table whose integer primary key only grows
//! (session records, sightings, review history, approvals, decisions). A
//! pass reads up to `batch_size` rows past the stream's cursor in one read
//! transaction, writes them (and the mutable rows they belong to: the
//! session's tail, the finding's status and counters) to PostgreSQL in one
//! transaction, and only after that commit moves the cursor, kept in
//! `state_dir/fleet.db`. A crash between the two commits ships the batch
//! again, which changes nothing: central rows are keyed by (host id, local
//! id) and inserted with `ON CONFLICT DO NOTHING`, mutable rows upserted
//! monotonically. Records go in local id order, which is each session's
//! chain order, so the central store always holds a prefix of every chain.
//!
//! The SQLite tables are read here directly (read transactions on their
//! own connections), not through the stores' APIs: the outbox needs the rows
//! as stored, ids and hashes included, and nothing else reads them that way.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use rusqlite::{params_from_iter, Connection, OpenFlags, OptionalExtension as _, TransactionBehavior};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{central, FleetConfig, FleetError, FLEET_TARGET};
use crate::{approval::store::RawDecision, config::Config, findings::store::RawSighting};

/// One kind of shipped row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Session records (hash-chained), with their sessions' rows.
    Records,
    /// Findings' sightings, with the findings they belong to.
    Sightings,
    /// Findings' review history (status changes).
    Reviews,
    /// Just-in-time approval requests.
    Approvals,
    /// Approvers' decisions.
    Decisions,
}

impl Stream {
    /// Every stream, in shipping order.
    pub const ALL: [Stream; 5] =
        [Stream::Records, Stream::Sightings, Stream::Reviews, Stream::Approvals, Stream::Decisions];

    /// Its name in the cursor table, events and `gateway status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Records => "records",
            Stream::Sightings => "sightings",
            Stream::Reviews => "reviews",
            Stream::Approvals => "approvals",
            Stream::Decisions => "decisions",
        }
    }

    /// Which local database holds it.
    fn source(self) -> Source {
        match self {
            Stream::Records => Source::Sessions,
            Stream::Sightings | Stream::Reviews => Source::Findings,
            Stream::Approvals | Stream::Decisions => Source::Approvals,
        }
    }

    /// SQL: how many of its rows have a local id above `?1`.
    fn count_after(self) -> String {
        match self {
            Stream::Records => crate::record::COUNT_RECORDS_AFTER.to_owned(),
            _ => format!("SELECT count(*) FROM {} WHERE id > ?1", self.table()),
        }
    }

    /// SQL: when the first row past `?1` was recorded (Unix nanoseconds).
    fn first_time_after(self) -> String {
        match self {
            Stream::Records => crate::record::FIRST_TIME_AFTER.to_owned(),
            _ => format!("SELECT {} FROM {} WHERE id > ?1 ORDER BY id LIMIT 1", self.time_column(), self.table()),
        }
    }

    /// SQL: the newest local id (NULL when none).
    fn newest_id(self) -> String {
        match self {
            Stream::Records => crate::record::NEWEST_RECORD_ID.to_owned(),
            _ => format!("SELECT max(id) FROM {}", self.table()),
        }
    }

    /// The column of its local table that says when a row was recorded
    /// (Unix nanoseconds); records keep theirs in the rows that hold them
    /// (see `record::store`).
    fn time_column(self) -> &'static str {
        match self {
            Stream::Records => "ts",
            Stream::Sightings => "seen_at",
            Stream::Reviews => "changed_at",
            Stream::Approvals => "created_at",
            Stream::Decisions => "decided_at",
        }
    }

    /// The local table.
    fn table(self) -> &'static str {
        match self {
            Stream::Records => "chunks",
            Stream::Sightings => "sightings",
            Stream::Reviews => "status_history",
            Stream::Approvals => "approvals",
            Stream::Decisions => "decisions",
        }
    }
}

/// The local databases the outbox reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Sessions,
    Findings,
    Approvals,
}

/// Rows recorded locally and not yet shipped.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Backlog {
    /// All streams together.
    pub total: u64,
    /// Per stream.
    pub streams: BTreeMap<Stream, u64>,
    /// How long ago the oldest row not yet shipped was recorded, in seconds
    /// (`None` when nothing waits).
    pub oldest_age_seconds: Option<f64>,
}

impl Backlog {
    /// Takes `recorded_at` (Unix ns) of a stream's oldest unshipped row into
    /// account.
    fn saw(&mut self, recorded_at: Option<i64>) {
        let Some(at) = recorded_at else { return };
        let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
        let age = ((now - i128::from(at)).max(0) as f64) / 1e9;
        self.oldest_age_seconds = Some(self.oldest_age_seconds.map_or(age, |a| a.max(age)));
    }
}

/// The running shipper's latest backlog, for metrics (`None` when no
/// shipper runs in this process).
pub fn current_backlog() -> Option<u64> {
    RUNNING.load(Ordering::Relaxed).then(|| BACKLOG.load(Ordering::Relaxed))
}

/// When the oldest row the running shipper has not shipped yet was recorded
/// (`None` when nothing waits, or no shipper runs): its age is the
/// `gateway_outbox_oldest_age_seconds` gauge.
pub fn current_oldest_unshipped() -> Option<time::OffsetDateTime> {
    if !RUNNING.load(Ordering::Relaxed) {
        return None;
    }
    match OLDEST.load(Ordering::Relaxed) {
        0 => None,
        n => time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(n)).ok(),
    }
}

/// Wakes the running shipper now instead of at its next `ship_interval`:
/// a request just held for approval must reach the store (where other
/// hosts' approvers see it) at once.
pub fn wake() {
    wakeup().notify_one();
}

fn wakeup() -> &'static tokio::sync::Notify {
    static WAKE: std::sync::OnceLock<tokio::sync::Notify> = std::sync::OnceLock::new();
    WAKE.get_or_init(tokio::sync::Notify::new)
}

static RUNNING: AtomicBool = AtomicBool::new(false);
static BACKLOG: AtomicU64 = AtomicU64::new(0);
/// Unix ns of the oldest unshipped row (0: none).
static OLDEST: AtomicI64 = AtomicI64::new(0);

/// The backlog as the local files say, without a running gateway (for
/// `gateway status`): counts rows past each stream's cursor.
pub fn backlog(config: &Config) -> Result<Backlog, FleetError> {
    let paths = LocalPaths::new(config);
    let cursor_path = config.fleet.cursor_path(&config.state_dir);
    let cursors = if cursor_path.exists() { Some(Cursors::open(&cursor_path)?) } else { None };
    let mut out = Backlog::default();
    for stream in Stream::ALL {
        let path = paths.of(stream.source());
        if !path.exists() {
            continue;
        }
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(local(path, "opening"))?;
        let after = match &cursors {
            Some(c) => c.get(stream)?,
            None => 0,
        };
        let n = count_after(&conn, path, stream, after)?;
        out.total += n;
        out.streams.insert(stream, n);
        out.saw(first_time_after(&conn, path, stream, after)?);
    }
    Ok(out)
}

fn local<'a>(path: &'a Path, doing: &'static str) -> impl FnOnce(rusqlite::Error) -> FleetError + 'a {
    move |source| FleetError::Local { path: path.to_owned(), doing, source }
}

/// Rows of `stream` past `after` (a table that does not exist yet has none).
fn count_after(conn: &Connection, path: &Path, stream: Stream, after: i64) -> Result<u64, FleetError> {
    match conn.query_row(&stream.count_after(), [after], |r| r.get::<_, i64>(0)) {
        Ok(n) => Ok(n.max(0) as u64),
        Err(rusqlite::Error::SqliteFailure(_, Some(msg))) if msg.starts_with("no such table") => Ok(0),
        Err(e) => Err(local(path, "counting unshipped rows")(e)),
    }
}

/// When the first row of `stream` past `after` was recorded (Unix ns).
fn first_time_after(conn: &Connection, path: &Path, stream: Stream, after: i64) -> Result<Option<i64>, FleetError> {
    match conn.query_row(&stream.first_time_after(), [after], |r| r.get::<_, i64>(0)).optional() {
        Ok(t) => Ok(t),
        Err(rusqlite::Error::SqliteFailure(_, Some(msg))) if msg.starts_with("no such table") => Ok(None),
        Err(e) => Err(local(path, "reading the oldest unshipped row")(e)),
    }
}

/// Where the local stores live.
#[derive(Debug, Clone)]
struct LocalPaths {
    sessions: PathBuf,
    findings: PathBuf,
    approvals: PathBuf,
}

impl LocalPaths {
    fn new(config: &Config) -> LocalPaths {
        LocalPaths {
            sessions: config.record.database_path(&config.state_dir),
            findings: config.findings.database_path(&config.state_dir),
            approvals: config.approvals.database_path(&config.state_dir),
        }
    }

    fn of(&self, source: Source) -> &Path {
        match source {
            Source::Sessions => &self.sessions,
            Source::Findings => &self.findings,
            Source::Approvals => &self.approvals,
        }
    }
}

/// Schema of `fleet.db`: one high-water mark per stream, and the approvals
/// shipped while still pending (shipped again once decided).
const CURSOR_MIGRATIONS: &[&str] = &["
CREATE TABLE cursors (
    stream  TEXT    PRIMARY KEY,
    last_id INTEGER NOT NULL
) STRICT;
CREATE TABLE open_approvals (
    id INTEGER PRIMARY KEY
) STRICT;
"];

/// The shipping cursors (`state_dir/fleet.db`).
struct Cursors {
    conn: Connection,
    path: PathBuf,
}

impl Cursors {
    fn open(path: &Path) -> Result<Cursors, FleetError> {
        let cursor = |reason: String| FleetError::Cursor { path: path.to_owned(), reason };
        let conn = crate::sqlite::open_private(path, Duration::from_secs(10)).map_err(|e| cursor(format!("{e:?}")))?;
        crate::sqlite::migrate(&conn, CURSOR_MIGRATIONS).map_err(|e| cursor(format!("{e:?}")))?;
        Ok(Cursors { conn, path: path.to_owned() })
    }

    fn get(&self, stream: Stream) -> Result<i64, FleetError> {
        self.conn
            .query_row("SELECT last_id FROM cursors WHERE stream = ?1", [stream.as_str()], |r| r.get(0))
            .optional()
            .map(|v| v.unwrap_or(0))
            .map_err(local(&self.path, "reading a cursor"))
    }

    fn set(&self, stream: Stream, last_id: i64) -> Result<(), FleetError> {
        self.conn
            .execute(
                "INSERT INTO cursors (stream, last_id) VALUES (?1, ?2)
                 ON CONFLICT (stream) DO UPDATE SET last_id = excluded.last_id",
                rusqlite::params![stream.as_str(), last_id],
            )
            .map(drop)
            .map_err(local(&self.path, "moving a cursor"))
    }

    fn open_approvals(&self) -> Result<Vec<i64>, FleetError> {
        self.conn
            .prepare("SELECT id FROM open_approvals ORDER BY id")
            .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
            .map_err(local(&self.path, "reading open approvals"))
    }

    fn set_open_approvals(&self, open: &[i64], closed: &[i64]) -> Result<(), FleetError> {
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)
            .map_err(local(&self.path, "starting a transaction"))?;
        for id in open {
            tx.execute("INSERT OR IGNORE INTO open_approvals (id) VALUES (?1)", [id])
                .map_err(local(&self.path, "noting an open approval"))?;
        }
        for id in closed {
            tx.execute("DELETE FROM open_approvals WHERE id = ?1", [id])
                .map_err(local(&self.path, "closing an approval"))?;
        }
        tx.commit().map_err(local(&self.path, "committing open approvals"))
    }
}

/// Warns (once per start) when other hosts register another fingerprint
/// key: the same secret seen there and here is two findings, not one.
async fn compare_keys(
    tx: &tokio_postgres::Transaction<'_>,
    host_id: &str,
    own: Option<&str>,
) -> Result<(), FleetError> {
    let Some(own) = own else { return Ok(()) };
    let rows = tx
        .query(
            "SELECT host_id FROM fleet_hosts WHERE fingerprint_key_id IS NOT NULL AND fingerprint_key_id <> $1 ORDER BY host_id LIMIT 20",
            &[&own],
        )
        .await
        .map_err(FleetError::pg("comparing fingerprint keys"))?;
    if !rows.is_empty() {
        let others: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        tracing::warn!(target: FLEET_TARGET, kind = "fingerprint_key_mismatch", %host_id, key_id = %own, other_hosts = ?others, "other hosts of the fleet use another fingerprint key: a secret seen there and here is two findings; give every host the same state_dir/detect-fingerprint.key");
    }
    Ok(())
}

/// Ships this host's local stores to the central store.
pub struct Shipper {
    config: FleetConfig,
    host_id: String,
    paths: LocalPaths,
    cursors: Cursors,
    /// Read connections, opened once the file exists.
    conns: BTreeMap<Source, Connection>,
    alarmed: bool,
    last_retention: Option<Instant>,
    /// `record.retention`: with a store configured the outbox, not the
    /// recorder, prunes local sessions, and only shipped ones.
    record_retention: Duration,
    /// How often local sessions are pruned.
    retention_every: Duration,
    /// Unix ns when this gateway started: unended sessions started before
    /// were interrupted (never live).
    live_since: i64,
    /// The id of this host's fingerprint key (`None`: none yet), registered
    /// with the host so hosts with different keys are told apart.
    key_id: Option<String>,
    /// Whether the other hosts' key ids were compared since the start.
    keys_compared: bool,
}

impl std::fmt::Debug for Shipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipper").field("host_id", &self.host_id).finish_non_exhaustive()
    }
}

/// What one pass shipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shipped {
    /// Rows shipped.
    pub rows: u64,
    /// Some stream had more than one batch waiting.
    pub more: bool,
}

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often an unknown central schema is looked at again.
const SCHEMA_RECHECK: Duration = Duration::from_secs(60);
/// How often shipped sessions past `shipped_retention` are deleted.
const RETENTION_EVERY: Duration = Duration::from_secs(60);

impl Shipper {
    /// Prepares shipping for `config` (whose `fleet.store` is set): the host
    /// id and the cursor database.
    pub fn new(config: &Config) -> Result<Shipper, FleetError> {
        if !config.fleet.enabled() {
            return Err(FleetError::NotConfigured);
        }
        Ok(Shipper {
            config: config.fleet.clone(),
            host_id: config.fleet.host_id()?,
            paths: LocalPaths::new(config),
            cursors: Cursors::open(&config.fleet.cursor_path(&config.state_dir))?,
            conns: BTreeMap::new(),
            alarmed: false,
            last_retention: None,
            record_retention: config.record.retention,
            retention_every: config.record.prune_interval.min(RETENTION_EVERY),
            live_since: i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos()).unwrap_or(i64::MAX),
            // The detector created the key before the shipper starts; a
            // key that cannot be read is the detector's error to report.
            key_id: crate::detect::FingerprintKey::load(&config.state_dir).ok().flatten().map(|k| k.id()),
            keys_compared: false,
        })
    }

    /// This host's id.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// Runs the shipper on its own thread (with its own small runtime: local
    /// reads block, and the proxy's workers must never wait for them) until
    /// `shutdown`.
    pub fn spawn(self, shutdown: CancellationToken) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("fleet-shipper".into()).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(target: FLEET_TARGET, kind = "shipper_failed", error = %e, "fleet shipper cannot start; nothing is shipped");
                    return;
                }
            };
            runtime.block_on(self.run(shutdown));
        })
    }

    /// The shipping loop: connect, check the schema, ship until caught up,
    /// wait `ship_interval`, again. A failure drops the connection and
    /// retries with a backoff; recording carries on locally meanwhile.
    pub async fn run(mut self, shutdown: CancellationToken) {
        RUNNING.store(true, Ordering::Relaxed);
        let mut client: Option<Client> = None;
        let mut unreachable: Option<String> = None;
        let mut backoff = self.config.ship_interval;
        tracing::info!(target: FLEET_TARGET, host_id = %self.host_id, "fleet shipper started");
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            self.check_backlog();
            let mut pause = self.config.ship_interval;
            // A connect can take up to its timeout: shutting down must not wait for it.
            let stepped = tokio::select! {
                _ = shutdown.cancelled() => break,
                stepped = self.step(&mut client) => stepped,
            };
            match stepped {
                Ok(shipped) => {
                    if let Some(error) = unreachable.take() {
                        tracing::info!(target: FLEET_TARGET, kind = "store_reachable", host_id = %self.host_id, previous_error = %error, "central store reachable again; shipping the backlog");
                    }
                    backoff = self.config.ship_interval;
                    if shipped.more {
                        pause = Duration::ZERO;
                    }
                }
                Err(e) => {
                    client = None;
                    let text = e.to_string();
                    match e {
                        FleetError::SchemaTooNew { .. } | FleetError::SchemaTooOld { .. } => {
                            tracing::error!(target: FLEET_TARGET, kind = "schema_unknown", host_id = %self.host_id, error = %text, "not shipping to the central store");
                            pause = SCHEMA_RECHECK;
                        }
                        _ => {
                            if unreachable.as_deref() != Some(text.as_str()) {
                                tracing::warn!(target: FLEET_TARGET, kind = "store_unreachable", host_id = %self.host_id, error = %text, "central store unreachable; recording continues locally and ships when it is back");
                            }
                            pause = backoff;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                    unreachable = Some(text);
                }
            }
            if let Err(e) = self.shipped_retention() {
                tracing::warn!(target: FLEET_TARGET, error = %e, "deleting shipped sessions failed");
            }
            if !pause.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                    // New approval requests and decisions ship at once.
                    _ = wakeup().notified() => {}
                }
            }
        }
        RUNNING.store(false, Ordering::Relaxed);
    }

    /// One step: connects (and checks the schema) when there is no
    /// connection, then ships one batch of every stream.
    async fn step(&mut self, client: &mut Option<Client>) -> Result<Shipped, FleetError> {
        if client.as_ref().is_none_or(Client::is_closed) {
            let c = central::connect(&self.config, None).await?;
            central::check_schema(&c).await?;
            *client = Some(c);
        }
        match client.as_mut() {
            Some(c) => self.ship_once(c).await,
            None => Err(FleetError::NotConfigured),
        }
    }

    /// Emits the backlog alarm when the backlog crosses `backlog_alarm`
    /// (and the all-clear when it drains below), and publishes it for metrics.
    fn check_backlog(&mut self) {
        let (total, oldest) = match self.backlog_and_oldest() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(target: FLEET_TARGET, error = %e, "cannot count the fleet backlog");
                return;
            }
        };
        BACKLOG.store(total, Ordering::Relaxed);
        OLDEST.store(oldest.unwrap_or(0), Ordering::Relaxed);
        let threshold = self.config.backlog_alarm;
        if total >= threshold && !self.alarmed {
            self.alarmed = true;
            tracing::warn!(target: FLEET_TARGET, kind = "backlog_alarm", host_id = %self.host_id, backlog = total, threshold, "fleet backlog above the alarm threshold: rows recorded locally are not reaching the central store");
        } else if total < threshold && self.alarmed {
            self.alarmed = false;
            tracing::info!(target: FLEET_TARGET, kind = "backlog_cleared", host_id = %self.host_id, backlog = total, threshold, "fleet backlog below the alarm threshold again");
        }
    }

    /// The backlog's size and when its oldest row was recorded (Unix ns).
    fn backlog_and_oldest(&mut self) -> Result<(u64, Option<i64>), FleetError> {
        let mut total = 0;
        let mut oldest: Option<i64> = None;
        for stream in Stream::ALL {
            let after = self.cursors.get(stream)?;
            let Some((conn, path)) = open_source(&mut self.conns, &self.paths, stream.source())? else { continue };
            total += count_after(conn, path, stream, after)?;
            if let Some(t) = first_time_after(conn, path, stream, after)? {
                oldest = Some(oldest.map_or(t, |o| o.min(t)));
            }
        }
        Ok((total, oldest))
    }

    /// The backlog, counted on the shipper's own connections.
    pub fn backlog(&mut self) -> Result<Backlog, FleetError> {
        let mut out = Backlog::default();
        for stream in Stream::ALL {
            let after = self.cursors.get(stream)?;
            let Some((conn, path)) = open_source(&mut self.conns, &self.paths, stream.source())? else { continue };
            let n = count_after(conn, path, stream, after)?;
            out.total += n;
            out.streams.insert(stream, n);
            out.saw(first_time_after(conn, path, stream, after)?);
        }
        Ok(out)
    }

    /// Ships one batch of every stream; each batch is one central
    /// transaction, and its cursor moves only after that commit.
    pub async fn ship_once(&mut self, client: &mut Client) -> Result<Shipped, FleetError> {
        let mut total = Shipped::default();
        let batch = self.config.batch_size;
        for stream in Stream::ALL {
            let mut after = self.cursors.get(stream)?;
            let open = if stream == Stream::Approvals { self.cursors.open_approvals()? } else { Vec::new() };
            let Some((conn, path)) = open_source(&mut self.conns, &self.paths, stream.source())? else { continue };
            // A local database made anew (moved aside, or emptied by
            // retention) numbers its rows from 1 again: ship it from the
            // start (idempotent) rather than skip it.
            let max: Option<i64> = match conn.query_row(&stream.newest_id(), [], |r| r.get(0)) {
                Ok(v) => v,
                Err(rusqlite::Error::SqliteFailure(_, Some(msg))) if msg.starts_with("no such table") => continue,
                Err(e) => return Err(local(path, "reading the newest id")(e)),
            };
            if max.unwrap_or(0) < after {
                tracing::warn!(target: FLEET_TARGET, stream = stream.as_str(), cursor = after, newest = max.unwrap_or(0), "local ids restarted below the shipped mark (a new database); shipping it from the start");
                after = 0;
                self.cursors.set(stream, 0)?;
            }
            let read = read_batch(conn, path, stream, after, batch, &open)?;
            if read.rows == 0 && read.open_done.is_empty() {
                continue;
            }
            let tx = client.transaction().await.map_err(FleetError::pg("starting a batch"))?;
            tx.execute(
                "INSERT INTO fleet_hosts (host_id, fingerprint_key_id) VALUES ($1, $2)
                 ON CONFLICT (host_id) DO UPDATE SET last_shipped = now(), fingerprint_key_id = EXCLUDED.fingerprint_key_id",
                &[&self.host_id, &self.key_id],
            )
            .await
            .map_err(FleetError::pg("registering the host"))?;
            if !self.keys_compared {
                self.keys_compared = true;
                compare_keys(&tx, &self.host_id, self.key_id.as_deref()).await?;
            }
            write_batch(&tx, &self.host_id, &read.data).await?;
            tx.commit().await.map_err(FleetError::pg("committing a batch"))?;
            if let Some(last) = read.last_id {
                self.cursors.set(stream, last)?;
            }
            if stream == Stream::Approvals {
                self.cursors.set_open_approvals(&read.still_open, &read.open_done)?;
            }
            tracing::debug!(target: FLEET_TARGET, stream = stream.as_str(), rows = read.rows, "batch shipped");
            total.rows += read.rows;
            total.more |= read.rows >= batch as u64;
        }
        Ok(total)
    }

    /// Local retention of sessions when a store is configured (the
    /// recorder's own pruner is off then): deletes the sessions whose every
    /// record was shipped and whose last record is older than
    /// `shipped_retention` or `record.retention`, whichever is shorter, if
    /// they ended or were interrupted (unended from before this gateway
    /// started). A session with a record not yet shipped is never deleted,
    /// however old: an outage longer than `record.retention` loses nothing.
    /// Runs every `record.prune_interval` (at most a minute). The session
    /// holding the newest record is kept so local ids never restart.
    fn shipped_retention(&mut self) -> Result<(), FleetError> {
        let keep = self.config.shipped_retention.map_or(self.record_retention, |k| k.min(self.record_retention));
        if self.last_retention.is_some_and(|t| t.elapsed() < self.retention_every) {
            return Ok(());
        }
        self.last_retention = Some(Instant::now());
        let shipped = self.cursors.get(Stream::Records)?;
        let cutoff = time::OffsetDateTime::now_utc().unix_timestamp_nanos() - keep.as_nanos() as i128;
        let cutoff = i64::try_from(cutoff).unwrap_or(i64::MIN);
        let Some((conn, path)) = open_source(&mut self.conns, &self.paths, Source::Sessions)? else { return Ok(()) };
        let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
            .map_err(local(path, "starting a transaction"))?;
        let ids: Vec<String> = tx
            .prepare(
                "SELECT s.id FROM sessions s WHERE (s.ended IS NOT NULL OR s.started < ?3) AND s.last_ts < ?1
                   AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.session = s.id AND c.id + c.n - 1 > ?2)
                   AND s.id IS NOT (SELECT session FROM chunks ORDER BY id DESC LIMIT 1)
                 LIMIT 1000",
            )
            .and_then(|mut st| {
                st.query_map(rusqlite::params![cutoff, shipped, self.live_since], |r| r.get(0))?.collect()
            })
            .map_err(local(path, "finding shipped sessions"))?;
        for id in &ids {
            tx.execute("DELETE FROM chunks WHERE session = ?1", [id]).map_err(local(path, "deleting records"))?;
            tx.execute("DELETE FROM sessions WHERE id = ?1", [id]).map_err(local(path, "deleting a session"))?;
        }
        tx.commit().map_err(local(path, "committing"))?;
        if !ids.is_empty() {
            tracing::info!(target: FLEET_TARGET, sessions = ids.len(), retention = ?keep, "shipped sessions past their retention deleted locally");
        }
        Ok(())
    }
}

/// The read connection to `source`, opened once its file exists.
fn open_source<'a>(
    conns: &'a mut BTreeMap<Source, Connection>,
    paths: &'a LocalPaths,
    source: Source,
) -> Result<Option<(&'a Connection, &'a Path)>, FleetError> {
    let path = paths.of(source);
    if let std::collections::btree_map::Entry::Vacant(slot) = conns.entry(source) {
        if !path.exists() {
            return Ok(None);
        }
        // Read-write: SQLite needs to write the -shm index even to read a
        // WAL database; the outbox itself writes only for shipped_retention.
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(local(path, "opening"))?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(local(path, "setting busy_timeout"))?;
        slot.insert(conn);
    }
    Ok(conns.get(&source).map(|c| (c, path)))
}

// ---------- reading a batch ----------

/// A session's row as shipped: its tail is the last record in the batch.
#[derive(Debug)]
struct SessionOut {
    row: crate::record::SessionRow,
}

#[derive(Debug)]
struct RecordOut {
    local_id: i64,
    session: String,
    seq: i64,
    ts: i64,
    kind: String,
    data: String,
    prev_hash: String,
    hash: String,
}

#[derive(Debug)]
struct FindingOut {
    local_id: i64,
    fingerprint: String,
    rule_id: String,
    confidence: String,
    preview: String,
    first_seen: i64,
    last_seen: i64,
    count: i64,
    action: String,
    status: String,
}

#[derive(Debug)]
struct SightingOut {
    local_id: i64,
    finding: i64,
    row: RawSighting,
}

#[derive(Debug)]
struct ReviewOut {
    local_id: i64,
    finding: i64,
    from_status: Option<String>,
    to_status: String,
    changed_by: String,
    changed_at: i64,
    comment: String,
}

#[derive(Debug)]
struct ApprovalOut {
    local_id: i64,
    /// state, rule, approver_group, identity, identity_labels, process, job,
    /// method, url, destination, body_preview, requesters: as the query reads them.
    text: [String; 12],
    session_id: Option<String>,
    min_approvals: i64,
    created_at: i64,
    expires_at: i64,
    finished_at: Option<i64>,
}

#[derive(Debug)]
struct DecisionOut {
    local_id: i64,
    approval: i64,
    row: RawDecision,
}

/// What one batch carries to the central store.
#[derive(Debug, Default)]
struct BatchData {
    sessions: Vec<SessionOut>,
    records: Vec<RecordOut>,
    findings: Vec<FindingOut>,
    sightings: Vec<SightingOut>,
    reviews: Vec<ReviewOut>,
    approvals: Vec<ApprovalOut>,
    decisions: Vec<DecisionOut>,
}

#[derive(Debug, Default)]
struct ReadBatch {
    data: BatchData,
    rows: u64,
    last_id: Option<i64>,
    /// Approvals shipped in this batch that are still pending.
    still_open: Vec<i64>,
    /// Open approvals now decided (shipped in their final state).
    open_done: Vec<i64>,
}

/// Reads up to `limit` rows of `stream` past `after` in one read
/// transaction, with the rows they depend on.
fn read_batch(
    conn: &Connection,
    path: &Path,
    stream: Stream,
    after: i64,
    limit: usize,
    open: &[i64],
) -> Result<ReadBatch, FleetError> {
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Deferred)
        .map_err(local(path, "starting a read"))?;
    let limit = limit as i64;
    let mut out = ReadBatch::default();
    let e = |doing| local(path, doing);
    match stream {
        Stream::Records => {
            let read = crate::record::records_after(&tx, after, limit as usize).map_err(e("reading records"))?;
            for (session, first_seq, why) in &read.damaged {
                // Shipped without them: the central chain then shows the
                // gap, where a reviewer sees it, rather than the outbox
                // stopping for good at a row it cannot read.
                tracing::error!(target: FLEET_TARGET, kind = "damaged_records", session, first_seq, reason = %why, "stored session records do not decode; shipping the session without them");
            }
            let records: Vec<RecordOut> = read
                .records
                .into_iter()
                .map(|(local_id, r)| RecordOut {
                    local_id,
                    session: r.session.as_str().to_owned(),
                    seq: r.seq as i64,
                    ts: r.ts,
                    kind: r.kind,
                    data: r.data,
                    prev_hash: r.prev_hash,
                    hash: r.hash,
                })
                .collect();
            out.last_id = read.last_id;
            out.rows = records.len() as u64;
            // The last record of each session in this batch.
            let mut tails: BTreeMap<&str, &RecordOut> = BTreeMap::new();
            for r in &records {
                tails.insert(&r.session, r);
            }
            let mut skip = BTreeSet::new();
            for (session, tail) in &tails {
                let Some(mut row) =
                    crate::record::SessionStore::stored_row(&tx, session).map_err(e("reading a session"))?
                else {
                    // Deleted with its records since: nothing to verify it by.
                    skip.insert((*session).to_owned());
                    continue;
                };
                if row.last_seq != tail.seq as u64 {
                    // More of the chain is committed locally than this batch
                    // ships: the central row claims only what it holds, so a
                    // verification there never sees a removed tail.
                    let exchanges = crate::record::exchanges_through(&tx, session, tail.seq as u64)
                        .map_err(e("counting exchanges"))?;
                    row.last_seq = tail.seq as u64;
                    row.last_hash = tail.hash.clone();
                    row.last_ts = tail.ts;
                    row.exchanges = exchanges;
                    row.ended = None;
                    row.bytes_up = None;
                    row.bytes_down = None;
                    row.outcome = None;
                }
                out.data.sessions.push(SessionOut { row });
            }
            out.data.records = records.into_iter().filter(|r| !skip.contains(&r.session)).collect();
        }
        Stream::Sightings => {
            let sightings: Vec<SightingOut> = tx
                .prepare_cached(&format!(
                    "SELECT id, finding_id, {} FROM sightings WHERE id > ?1 ORDER BY id LIMIT ?2",
                    RawSighting::COLUMNS
                ))
                .and_then(|mut st| {
                    st.query_map([after, limit], |r| {
                        Ok(SightingOut { local_id: r.get(0)?, finding: r.get(1)?, row: RawSighting::from_row(r, 2)? })
                    })?
                    .collect()
                })
                .map_err(e("reading sightings"))?;
            out.last_id = sightings.last().map(|s| s.local_id);
            out.rows = sightings.len() as u64;
            let ids: BTreeSet<i64> = sightings.iter().map(|s| s.finding).collect();
            out.data.findings = read_findings(&tx, path, &ids)?;
            out.data.sightings = sightings;
        }
        Stream::Reviews => {
            let reviews: Vec<ReviewOut> = tx
                .prepare_cached(
                    "SELECT id, finding_id, from_status, to_status, changed_by, changed_at, comment
                     FROM status_history WHERE id > ?1 ORDER BY id LIMIT ?2",
                )
                .and_then(|mut st| {
                    st.query_map([after, limit], |r| {
                        Ok(ReviewOut {
                            local_id: r.get(0)?,
                            finding: r.get(1)?,
                            from_status: r.get(2)?,
                            to_status: r.get(3)?,
                            changed_by: r.get(4)?,
                            changed_at: r.get(5)?,
                            comment: r.get(6)?,
                        })
                    })?
                    .collect()
                })
                .map_err(e("reading review history"))?;
            out.last_id = reviews.last().map(|s| s.local_id);
            out.rows = reviews.len() as u64;
            let ids: BTreeSet<i64> = reviews.iter().map(|s| s.finding).collect();
            out.data.findings = read_findings(&tx, path, &ids)?;
            out.data.reviews = reviews;
        }
        Stream::Approvals => {
            const COLUMNS: &str =
                "id, state, rule, approver_group, identity, identity_labels, process, job, method, url, \
                 destination, body_preview, requesters, session_id, min_approvals, created_at, expires_at, finished_at";
            let map = |r: &rusqlite::Row<'_>| -> rusqlite::Result<ApprovalOut> {
                Ok(ApprovalOut {
                    local_id: r.get(0)?,
                    text: [
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
                        r.get(11)?,
                        r.get(12)?,
                    ],
                    session_id: r.get(13)?,
                    min_approvals: r.get(14)?,
                    created_at: r.get(15)?,
                    expires_at: r.get(16)?,
                    finished_at: r.get(17)?,
                })
            };
            let mut approvals: Vec<ApprovalOut> = tx
                .prepare_cached(&format!("SELECT {COLUMNS} FROM approvals WHERE id > ?1 ORDER BY id LIMIT ?2"))
                .and_then(|mut st| st.query_map([after, limit], map)?.collect())
                .map_err(e("reading approvals"))?;
            out.last_id = approvals.last().map(|a| a.local_id);
            out.rows = approvals.len() as u64;
            if !open.is_empty() {
                let marks = vec!["?"; open.len()].join(",");
                let decided: Vec<ApprovalOut> = tx
                    .prepare(&format!("SELECT {COLUMNS} FROM approvals WHERE state != 'pending' AND id IN ({marks})"))
                    .and_then(|mut st| st.query_map(params_from_iter(open.iter()), map)?.collect())
                    .map_err(e("reading decided approvals"))?;
                out.open_done = decided.iter().map(|a| a.local_id).collect();
                out.rows += decided.len() as u64;
                approvals.extend(decided);
            }
            out.still_open = approvals.iter().filter(|a| a.text[0] == "pending").map(|a| a.local_id).collect();
            out.data.approvals = approvals;
        }
        Stream::Decisions => {
            let decisions: Vec<DecisionOut> = tx
                .prepare_cached(&format!(
                    "SELECT id, approval_id, {} FROM decisions WHERE id > ?1 ORDER BY id LIMIT ?2",
                    RawDecision::COLUMNS
                ))
                .and_then(|mut st| {
                    st.query_map([after, limit], |r| {
                        Ok(DecisionOut { local_id: r.get(0)?, approval: r.get(1)?, row: RawDecision::from_row(r, 2)? })
                    })?
                    .collect()
                })
                .map_err(e("reading decisions"))?;
            out.last_id = decisions.last().map(|d| d.local_id);
            out.rows = decisions.len() as u64;
            out.data.decisions = decisions;
        }
    }
    tx.finish().map_err(e("ending a read"))?;
    Ok(out)
}

fn read_findings(
    tx: &rusqlite::Transaction<'_>,
    path: &Path,
    ids: &BTreeSet<i64>,
) -> Result<Vec<FindingOut>, FleetError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let marks = vec!["?"; ids.len()].join(",");
    tx.prepare(&format!(
        "SELECT id, fingerprint, rule_id, confidence, preview, first_seen, last_seen, count, action, status
         FROM findings WHERE id IN ({marks})"
    ))
    .and_then(|mut st| {
        st.query_map(params_from_iter(ids.iter()), |r| {
            Ok(FindingOut {
                local_id: r.get(0)?,
                fingerprint: r.get(1)?,
                rule_id: r.get(2)?,
                confidence: r.get(3)?,
                preview: r.get(4)?,
                first_seen: r.get(5)?,
                last_seen: r.get(6)?,
                count: r.get(7)?,
                action: r.get(8)?,
                status: r.get(9)?,
            })
        })?
        .collect()
    })
    .map_err(local(path, "reading findings"))
}

// ---------- writing a batch ----------

/// Writes a batch in the caller's transaction: bulk statements over
/// `unnest` arrays (one round trip per table).
async fn write_batch(tx: &tokio_postgres::Transaction<'_>, host: &str, data: &BatchData) -> Result<(), FleetError> {
    if !data.sessions.is_empty() {
        let s = &data.sessions;
        let col = |f: fn(&crate::record::SessionRow) -> String| s.iter().map(|x| f(&x.row)).collect::<Vec<_>>();
        let int = |f: fn(&crate::record::SessionRow) -> i64| s.iter().map(|x| f(&x.row)).collect::<Vec<_>>();
        let opt = |f: fn(&crate::record::SessionRow) -> Option<i64>| s.iter().map(|x| f(&x.row)).collect::<Vec<_>>();
        tx.execute(
            "INSERT INTO sessions AS s (host_id, id, conn_id, started, identity, host, orig_dst, protocol, pid, comm, meta,
                                        exchanges, last_seq, last_hash, last_ts, ended, bytes_up, bytes_down, outcome)
             SELECT $1, * FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[], $7::text[],
                                      $8::text[], $9::bigint[], $10::text[], $11::text[], $12::bigint[], $13::bigint[],
                                      $14::text[], $15::bigint[], $16::bigint[], $17::bigint[], $18::bigint[], $19::text[])
             ON CONFLICT (host_id, id) DO UPDATE SET
                 exchanges = excluded.exchanges, last_seq = excluded.last_seq, last_hash = excluded.last_hash,
                 last_ts = excluded.last_ts, ended = excluded.ended, bytes_up = excluded.bytes_up,
                 bytes_down = excluded.bytes_down, outcome = excluded.outcome
             WHERE s.last_seq <= excluded.last_seq",
            &[
                &host,
                &col(|r| r.id.as_str().to_owned()),
                &int(|r| r.conn_id as i64),
                &int(|r| r.started),
                &col(|r| r.identity.clone()),
                &col(|r| r.host.clone()),
                &col(|r| r.orig_dst.clone()),
                &col(|r| r.protocol.clone()),
                &int(|r| i64::from(r.pid)),
                &col(|r| r.comm.clone()),
                &col(|r| r.meta.clone()),
                &int(|r| r.exchanges as i64),
                &int(|r| r.last_seq as i64),
                &col(|r| r.last_hash.clone()),
                &int(|r| r.last_ts),
                &opt(|r| r.ended),
                &opt(|r| r.bytes_up.map(|n| n as i64)),
                &opt(|r| r.bytes_down.map(|n| n as i64)),
                &s.iter().map(|x| x.row.outcome.clone()).collect::<Vec<_>>(),
            ],
        )
        .await
        .map_err(FleetError::pg("shipping sessions"))?;
    }
    if !data.records.is_empty() {
        let r = &data.records;
        tx.execute(
            "INSERT INTO records (host_id, session, seq, local_id, ts, kind, data, prev_hash, hash)
             SELECT $1, * FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[], $7::text[],
                                      $8::text[], $9::text[])
             ON CONFLICT DO NOTHING",
            &[
                &host,
                &r.iter().map(|x| x.session.as_str()).collect::<Vec<_>>(),
                &r.iter().map(|x| x.seq).collect::<Vec<_>>(),
                &r.iter().map(|x| x.local_id).collect::<Vec<_>>(),
                &r.iter().map(|x| x.ts).collect::<Vec<_>>(),
                &r.iter().map(|x| x.kind.as_str()).collect::<Vec<_>>(),
                &r.iter().map(|x| x.data.as_str()).collect::<Vec<_>>(),
                &r.iter().map(|x| x.prev_hash.as_str()).collect::<Vec<_>>(),
                &r.iter().map(|x| x.hash.as_str()).collect::<Vec<_>>(),
            ],
        )
        .await
        .map_err(FleetError::pg("shipping records"))?;
    }
    let central = upsert_findings(tx, host, &data.findings).await?;
    let central_of = |local: i64| central.get(&local).copied();
    if !data.sightings.is_empty() {
        // A sighting whose finding is gone locally cannot be attributed; it
        // is skipped (findings are never deleted, so this does not happen).
        let s: Vec<&SightingOut> = data.sightings.iter().filter(|x| central_of(x.finding).is_some()).collect();
        tx.execute(
            "INSERT INTO sightings (host_id, local_id, finding_id, local_finding_id, seen_at, identity, job, pid, uid, exe,
                                   comm, cgroup, container, command, script, dest_host, dest_port, location, action,
                                   allowed_by, session_id)
             SELECT $1, * FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[], $7::text[],
                                      $8::bigint[], $9::bigint[], $10::text[], $11::text[], $12::text[], $13::text[],
                                      $14::text[], $15::text[], $16::text[], $17::integer[], $18::text[], $19::text[],
                                      $20::text[], $21::text[])
             ON CONFLICT DO NOTHING",
            &[
                &host,
                &s.iter().map(|x| x.local_id).collect::<Vec<_>>(),
                &s.iter().map(|x| central_of(x.finding).unwrap_or_default()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.finding).collect::<Vec<_>>(),
                &s.iter().map(|x| x.row.seen_at).collect::<Vec<_>>(),
                &s.iter().map(|x| x.row.identity.as_deref()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.row.job.as_str()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.row.pid).collect::<Vec<_>>(),
                &s.iter().map(|x| x.row.uid).collect::<Vec<_>>(),
                &s.iter().map(|x| x.row.exe.as_deref()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.row.comm.as_str()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.row.cgroup.as_deref()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.row.container.as_deref()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.row.command.as_deref()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.row.script.as_deref()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.row.dest_host.as_str()).collect::<Vec<_>>(),
                &s.iter().map(|x| i32::try_from(x.row.dest_port).unwrap_or_default()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.row.location.as_str()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.row.action.as_str()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.row.allowed_by.as_deref()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.row.session_id.as_deref()).collect::<Vec<_>>(),
            ],
        )
        .await
        .map_err(FleetError::pg("shipping sightings"))?;
    }
    if !data.reviews.is_empty() {
        let s: Vec<&ReviewOut> = data.reviews.iter().filter(|x| central_of(x.finding).is_some()).collect();
        tx.execute(
            "INSERT INTO finding_reviews (host_id, local_id, finding_id, local_finding_id, from_status, to_status,
                                         changed_by, changed_at, comment)
             SELECT $1, * FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::text[], $7::text[],
                                      $8::bigint[], $9::text[])
             ON CONFLICT DO NOTHING",
            &[
                &host,
                &s.iter().map(|x| x.local_id).collect::<Vec<_>>(),
                &s.iter().map(|x| central_of(x.finding).unwrap_or_default()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.finding).collect::<Vec<_>>(),
                &s.iter().map(|x| x.from_status.as_deref()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.to_status.as_str()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.changed_by.as_str()).collect::<Vec<_>>(),
                &s.iter().map(|x| x.changed_at).collect::<Vec<_>>(),
                &s.iter().map(|x| x.comment.as_str()).collect::<Vec<_>>(),
            ],
        )
        .await
        .map_err(FleetError::pg("shipping review history"))?;
    }
    if !data.approvals.is_empty() {
        // One row per approval (the batch may hold an approval twice: new
        // and, decided meanwhile, from the open list).
        let mut by_id: BTreeMap<i64, &ApprovalOut> = BTreeMap::new();
        for a in &data.approvals {
            by_id.insert(a.local_id, a);
        }
        let a: Vec<&ApprovalOut> = by_id.into_values().collect();
        let text = |i: usize| a.iter().map(|x| x.text[i].as_str()).collect::<Vec<_>>();
        tx.execute(
            "INSERT INTO approvals AS a (host_id, local_id, state, rule, approver_group, identity, identity_labels, process,
                                         job, method, url, destination, body_preview, requesters, session_id,
                                         min_approvals, created_at, expires_at, finished_at)
             SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                                      $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[],
                                      $14::text[], $15::text[], $16::integer[], $17::bigint[], $18::bigint[],
                                      $19::bigint[])
             ON CONFLICT (host_id, local_id) DO UPDATE SET state = excluded.state, finished_at = excluded.finished_at
             WHERE a.state = 'pending'",
            &[
                &host,
                &a.iter().map(|x| x.local_id).collect::<Vec<_>>(),
                &text(0),
                &text(1),
                &text(2),
                &text(3),
                &text(4),
                &text(5),
                &text(6),
                &text(7),
                &text(8),
                &text(9),
                &text(10),
                &text(11),
                &a.iter().map(|x| x.session_id.as_deref()).collect::<Vec<_>>(),
                &a.iter().map(|x| i32::try_from(x.min_approvals).unwrap_or(i32::MAX)).collect::<Vec<_>>(),
                &a.iter().map(|x| x.created_at).collect::<Vec<_>>(),
                &a.iter().map(|x| x.expires_at).collect::<Vec<_>>(),
                &a.iter().map(|x| x.finished_at).collect::<Vec<_>>(),
            ],
        )
        .await
        .map_err(FleetError::pg("shipping approvals"))?;
    }
    if !data.decisions.is_empty() {
        let d = &data.decisions;
        tx.execute(
            "INSERT INTO decisions (host_id, local_id, approval_local_id, verdict, approver, recorded_as, uid, pid,
                                   identity, comment, decided_at)
             SELECT $1, * FROM unnest($2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::bigint[],
                                      $8::bigint[], $9::text[], $10::text[], $11::bigint[])
             ON CONFLICT DO NOTHING",
            &[
                &host,
                &d.iter().map(|x| x.local_id).collect::<Vec<_>>(),
                &d.iter().map(|x| x.approval).collect::<Vec<_>>(),
                &d.iter().map(|x| x.row.verdict.as_str()).collect::<Vec<_>>(),
                &d.iter().map(|x| x.row.approver.as_str()).collect::<Vec<_>>(),
                &d.iter().map(|x| x.row.recorded_as.as_str()).collect::<Vec<_>>(),
                &d.iter().map(|x| x.row.uid).collect::<Vec<_>>(),
                &d.iter().map(|x| x.row.pid).collect::<Vec<_>>(),
                &d.iter().map(|x| x.row.identity.as_deref()).collect::<Vec<_>>(),
                &d.iter().map(|x| x.row.comment.as_deref()).collect::<Vec<_>>(),
                &d.iter().map(|x| x.row.decided_at).collect::<Vec<_>>(),
            ],
        )
        .await
        .map_err(FleetError::pg("shipping decisions"))?;
    }
    Ok(())
}

/// Upserts the central findings (one per fingerprint and rule, whichever
/// host saw it) and this host's view of each; returns local id -> central id.
async fn upsert_findings(
    tx: &tokio_postgres::Transaction<'_>,
    host: &str,
    findings: &[FindingOut],
) -> Result<HashMap<i64, i64>, FleetError> {
    let mut out = HashMap::new();
    if findings.is_empty() {
        return Ok(out);
    }
    // One row per key in the statement (ON CONFLICT DO UPDATE may touch a
    // row only once): locally merged findings share their survivor's key.
    let mut keys: BTreeMap<(&str, &str), &FindingOut> = BTreeMap::new();
    for f in findings {
        keys.entry((&f.fingerprint, &f.rule_id))
            .and_modify(|k| {
                if f.last_seen > k.last_seen {
                    *k = f;
                }
            })
            .or_insert(f);
    }
    let k: Vec<&FindingOut> = keys.values().copied().collect();
    let rows = tx
        .query(
            "INSERT INTO findings AS f (fingerprint, rule_id, confidence, preview, first_seen, last_seen)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[])
             ON CONFLICT (fingerprint, rule_id) DO UPDATE SET
                 first_seen = least(f.first_seen, excluded.first_seen),
                 last_seen = greatest(f.last_seen, excluded.last_seen)
             RETURNING id, fingerprint, rule_id",
            &[
                &k.iter().map(|x| x.fingerprint.as_str()).collect::<Vec<_>>(),
                &k.iter().map(|x| x.rule_id.as_str()).collect::<Vec<_>>(),
                &k.iter().map(|x| x.confidence.as_str()).collect::<Vec<_>>(),
                &k.iter().map(|x| x.preview.as_str()).collect::<Vec<_>>(),
                &k.iter().map(|x| x.first_seen).collect::<Vec<_>>(),
                &k.iter().map(|x| x.last_seen).collect::<Vec<_>>(),
            ],
        )
        .await
        .map_err(FleetError::pg("shipping findings"))?;
    let mut by_key: HashMap<(String, String), i64> = HashMap::new();
    for row in rows {
        by_key.insert((row.get(1), row.get(2)), row.get(0));
    }
    for f in findings {
        if let Some(id) = by_key.get(&(f.fingerprint.clone(), f.rule_id.clone())) {
            out.insert(f.local_id, *id);
        }
    }
    let f: Vec<&FindingOut> = findings.iter().filter(|f| out.contains_key(&f.local_id)).collect();
    tx.execute(
        "INSERT INTO host_findings AS h (host_id, local_id, finding_id, status, action, count, first_seen, last_seen)
         SELECT $1, * FROM unnest($2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::bigint[], $7::bigint[],
                                  $8::bigint[])
         ON CONFLICT (host_id, local_id) DO UPDATE SET
             status = excluded.status, action = excluded.action, count = greatest(h.count, excluded.count),
             last_seen = greatest(h.last_seen, excluded.last_seen)",
        &[
            &host,
            &f.iter().map(|x| x.local_id).collect::<Vec<_>>(),
            &f.iter().map(|x| out.get(&x.local_id).copied().unwrap_or_default()).collect::<Vec<_>>(),
            &f.iter().map(|x| x.status.as_str()).collect::<Vec<_>>(),
            &f.iter().map(|x| x.action.as_str()).collect::<Vec<_>>(),
            &f.iter().map(|x| x.count).collect::<Vec<_>>(),
            &f.iter().map(|x| x.first_seen).collect::<Vec<_>>(),
            &f.iter().map(|x| x.last_seen).collect::<Vec<_>>(),
        ],
    )
    .await
    .map_err(FleetError::pg("shipping host findings"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration whose state directory is `dir`, shipping configured.
    fn config(dir: &Path) -> Config {
        let mut c = Config { state_dir: dir.to_owned(), ..Config::default() };
        c.fleet.store = Some("host=127.0.0.1 dbname=fleet user=gw".into());
        c.fleet.host_id = Some("runner-t".into());
        c
    }

    /// A sessions database with one session of `records` records (start,
    /// exchanges, end), written as the recorder writes them, in rows of at
    /// most three (three writer batches' worth, for batches that end inside
    /// a session).
    fn sessions_db(config: &Config, records: u64) -> Connection {
        let path = config.record.database_path(&config.state_dir);
        drop(crate::record::SessionStore::open(&path).expect("create the sessions database"));
        let conn = Connection::open(&path).expect("open");
        let kinds: Vec<(i64, &str, &str)> = (0..records)
            .map(|seq| {
                let kind = match seq {
                    0 => "start",
                    s if s + 1 == records => "end",
                    _ => "exchange",
                };
                (seq as i64, kind, "{}")
            })
            .collect();
        let mut prev = crate::record::GENESIS_HASH.to_owned();
        for (i, row) in kinds.chunks(3).enumerate() {
            let first = i as u64 * 3;
            prev = crate::record::insert_test_row(&conn, first as i64 + 1, "s1", first, &prev, row);
        }
        conn.execute(
            "INSERT INTO sessions (id, conn_id, started, identity, host, orig_dst, protocol, pid, comm, meta, exchanges,
                                   last_seq, last_hash, last_ts, ended, bytes_up, bytes_down, outcome)
             VALUES ('s1', 1, 0, 'id', 'h', '1.2.3.4:443', 'https', 7, 'curl', '{}', ?1, ?2, ?3, ?2, ?2, 10, 20, 'closed')",
            rusqlite::params![records as i64 - 2, records as i64 - 1, prev],
        )
        .expect("insert session");
        conn
    }

    /// Adds a session `id` whose one record (a start at `ts`) has the local
    /// id `local`, ended or not.
    fn one_record_session(conn: &Connection, local: i64, id: &str, ts: i64, ended: bool) {
        crate::record::insert_test_row(conn, local, id, 0, crate::record::GENESIS_HASH, &[(ts, "start", "{}")]);
        conn.execute(
            "INSERT INTO sessions (id, conn_id, started, identity, host, orig_dst, protocol, pid, comm, meta, exchanges,
                                   last_seq, last_hash, last_ts, ended, bytes_up, bytes_down, outcome)
             VALUES (?1, 2, ?2, 'id', 'h', '1.2.3.4:443', 'https', 7, 'curl', '{}', 0, 0, 'h', ?2, ?3, 0, 0, ?4)",
            rusqlite::params![id, ts, ended.then_some(ts), ended.then_some("closed")],
        )
        .expect("insert session");
    }

    /// The ids of the local sessions, in order.
    fn sessions(conn: &Connection) -> Vec<String> {
        conn.prepare("SELECT id FROM sessions ORDER BY id")
            .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
            .unwrap()
    }

    #[test]
    fn a_batch_that_ends_inside_a_session_claims_only_the_shipped_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let conn = sessions_db(&config, 5);
        let path = config.record.database_path(&config.state_dir);

        let first = read_batch(&conn, &path, Stream::Records, 0, 3, &[]).unwrap();
        assert_eq!((first.rows, first.last_id), (3, Some(3)));
        let row = &first.data.sessions[0].row;
        assert_eq!((row.last_seq, row.exchanges, row.last_ts), (2, 2, 2), "the tail is the last shipped record");
        assert_eq!(row.last_hash, first.data.records[2].hash);
        assert_eq!((row.ended, row.outcome.as_deref()), (None, None), "not ended before its end record ships");

        let rest = read_batch(&conn, &path, Stream::Records, 3, 3, &[]).unwrap();
        assert_eq!((rest.rows, rest.last_id), (2, Some(5)));
        let row = &rest.data.sessions[0].row;
        assert_eq!((row.last_seq, row.ended, row.outcome.as_deref()), (4, Some(4), Some("closed")), "the whole row");
        assert_eq!(row.last_hash, rest.data.records[1].hash);
        // (The chain check over a split session runs against a real
        // recording in tests/fleet.rs, which ships in batches of 2.)
    }

    #[test]
    fn a_cursor_inside_a_row_ships_the_rest_of_it_and_a_damaged_row_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let conn = sessions_db(&config, 5);
        let path = config.record.database_path(&config.state_dir);
        // A cursor inside the first row (ids 1..=3), as a migrated database
        // or an older gateway's shipping leaves it: whole rows are read,
        // only the records past it are shipped.
        let read = read_batch(&conn, &path, Stream::Records, 1, 1, &[]).unwrap();
        let seqs: Vec<i64> = read.data.records.iter().map(|r| r.seq).collect();
        assert_eq!((seqs, read.last_id), (vec![1, 2], Some(3)));
        assert_eq!(read.data.records[0].local_id, 2);
        assert_eq!(count_after(&conn, &path, Stream::Records, 1).unwrap(), 4);
        assert_eq!(count_after(&conn, &path, Stream::Records, 3).unwrap(), 2);
        assert_eq!(first_time_after(&conn, &path, Stream::Records, 3).unwrap(), Some(3));

        // The second row's body cut short: its records are not shipped (the
        // central chain shows the gap) and the cursor moves past it.
        conn.execute("UPDATE chunks SET body = substr(body, 1, 10) WHERE id = 4", []).unwrap();
        let read = read_batch(&conn, &path, Stream::Records, 3, 10, &[]).unwrap();
        assert_eq!((read.rows, read.last_id), (0, Some(5)));
        assert!(read.data.records.is_empty());
    }

    #[test]
    fn the_backlog_counts_rows_past_each_cursor_and_a_new_database_ships_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        assert_eq!(backlog(&config).unwrap(), Backlog::default(), "no stores yet: nothing to ship");
        let _conn = sessions_db(&config, 4);
        let b = backlog(&config).unwrap();
        assert_eq!((b.total, b.streams.get(&Stream::Records)), (4, Some(&4)));

        let mut shipper = Shipper::new(&config).unwrap();
        shipper.cursors.set(Stream::Records, 3).unwrap();
        assert_eq!(backlog(&config).unwrap().total, 1, "status reads the shipper's cursor file");
        assert_eq!(shipper.backlog().unwrap().total, 1);
        // A cursor past the newest id (the database was made anew) is not
        // trusted: the next pass ships from 0 (checked in ship_once).
        shipper.cursors.set(Stream::Records, 99).unwrap();
        assert_eq!(shipper.backlog().unwrap().total, 0);
        assert_eq!(shipper.host_id(), "runner-t");
        assert!(Shipper::new(&Config::default()).is_err(), "no store configured: no shipper");
    }

    #[test]
    fn record_retention_waits_for_shipping_however_old_and_the_backlog_has_an_age() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        // No shipped_retention: record.retention applies, to shipped sessions only.
        config.record.retention = Duration::from_secs(1);
        let conn = sessions_db(&config, 3);
        // An interrupted session (never ended, from before this gateway
        // started) recorded after s1, and s3 holding the newest record.
        one_record_session(&conn, 4, "s2", 5, false);
        one_record_session(&conn, 5, "s3", 6, true);
        let mut shipper = Shipper::new(&config).unwrap();
        // Nothing shipped: every session is decades past the retention, and stays.
        shipper.shipped_retention().unwrap();
        assert_eq!(sessions(&conn), ["s1", "s2", "s3"]);
        let b = shipper.backlog().unwrap();
        assert_eq!(b.total, 5);
        // The oldest unshipped record was recorded at t = 0 ns: 1970.
        assert!(b.oldest_age_seconds.is_some_and(|age| age > 1.7e9), "{b:?}");
        let status = backlog(&config).unwrap().oldest_age_seconds.unwrap_or_default();
        assert!((status - b.oldest_age_seconds.unwrap_or_default()).abs() < 60.0, "status reads the same: {status}");

        // Everything shipped: s1 and the interrupted s2 go; s3 holds the
        // newest record and stays.
        shipper.cursors.set(Stream::Records, 5).unwrap();
        shipper.last_retention = None;
        shipper.shipped_retention().unwrap();
        assert_eq!(sessions(&conn), ["s3"]);
        assert_eq!(shipper.backlog().unwrap().oldest_age_seconds, None, "nothing waits: no age");
    }

    #[test]
    fn shipped_retention_deletes_only_shipped_ended_sessions_and_keeps_the_newest_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        config.fleet.shipped_retention = Some(Duration::from_secs(1));
        let conn = sessions_db(&config, 3);
        // A second ended session, recorded after s1, holding the newest record.
        one_record_session(&conn, 4, "s2", 5, true);
        let mut shipper = Shipper::new(&config).unwrap();
        shipper.cursors.set(Stream::Records, 2).unwrap();
        shipper.shipped_retention().unwrap();
        assert_eq!(sessions(&conn), ["s1", "s2"], "s1's last record is not shipped yet");

        shipper.cursors.set(Stream::Records, 4).unwrap();
        shipper.last_retention = None;
        shipper.shipped_retention().unwrap();
        assert_eq!(sessions(&conn), ["s2"], "shipped and ended long ago: deleted; the newest record's session stays");
        let records: i64 = conn.query_row("SELECT sum(n) FROM chunks", [], |r| r.get(0)).unwrap();
        assert_eq!(records, 1);
    }
}
