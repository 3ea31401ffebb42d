//! The recording path: [`Recorder`] and [`SessionRecorder`] enqueue, one
//! writer thread serializes, chains and commits.
//!
//! Callers only take the time, allocate a message and push it on an
//! unbounded channel: no SQLite, no lock shared with the writer, no await.
//! The writer groups everything sent within `flush_interval` of the first
//! uncommitted record into one transaction (one fsync). It wakes once per
//! batch, not once per record: the first record of a batch wakes it, then it
//! sleeps until the batch's deadline and takes everything queued meanwhile.
//! Senders wake it early only for a flush, a shutdown or a full batch.
//! Nothing is dropped when SQLite is slow: the queue grows and the recorder
//! says so loudly; a failed commit is retried with back-off, keeping the
//! batch. The queue is bounded only against a database that stays down (or a
//! job flooding a failing one): past [`MAX_QUEUED`] records or
//! [`MAX_QUEUED_BYTES`] of bodies, records are dropped and counted.
//!
//! The recorder's [`Health`] is two atomics the gate reads per decision: with
//! `record.on_failure: refuse` (the default) traffic the policy records is
//! refused while the database cannot take it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering},
        mpsc::{self, TryRecvError},
        Arc, Mutex,
    },
    thread::{JoinHandle, Thread},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use crate::{
    process::ProcessSnapshot,
    redact::{cap, redact_job},
};

use super::{
    chain::{hash_record, GENESIS_HASH},
    chunk::Chunk,
    encode::{self, limits, SensitiveNames},
    lock::{self, WriterLock},
    model::{nanos, SessionMeta},
    retention::Pruner,
    store::{Appended, Batch, SessionRow, SessionStore, Tail},
    EventKind, ExchangeRecord, OnRecordFailure, PostgresExchange, RecordConfig, RecordError, RecordKind, RecordLevel,
    SessionEnd, SessionId, SessionOutcome, SessionStart,
};

/// Commit early when a batch holds this many records...
const MAX_BATCH_RECORDS: usize = 2_000;
/// ... or this many bytes of record data.
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Queue lengths at which the recorder logs an error (then every further
/// power of ten).
const QUEUE_ALARM: usize = 10_000;
/// Most records waiting in memory: beyond it (a database down for long, or
/// a job flooding a failing one) records are dropped and counted rather than
/// growing memory without bound.
const MAX_QUEUED: usize = 1_000_000;
/// Most body bytes waiting in memory, for the same reason.
const MAX_QUEUED_BYTES: usize = 256 * 1024 * 1024;
/// Back-off between attempts to commit a failed batch. Short at its longest:
/// an attempt is one small transaction, and while it fails traffic that must
/// be recorded is refused, so recovery should be noticed within seconds.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Attempts per batch once the recorder is shutting down.
const SHUTDOWN_ATTEMPTS: u32 = 3;

/// Log target of the recorder.
const TARGET: &str = "gateway::record";

enum Msg {
    Start { id: SessionId, ts: i64, start: Box<SessionStart> },
    Exchange { id: SessionId, ts: i64, exchange: Box<ExchangeRecord> },
    Postgres { id: SessionId, ts: i64, exchange: Box<PostgresExchange> },
    Event { id: SessionId, ts: i64, kind: EventKind, detail: serde_json::Value },
    End { id: SessionId, ts: i64, end: SessionEnd },
    Flush(mpsc::SyncSender<Result<(), String>>),
    Shutdown,
}

impl Msg {
    /// When a record was sent (Unix ns); `None` for control messages.
    fn sent(&self) -> Option<i64> {
        match self {
            Msg::Start { ts, .. }
            | Msg::Exchange { ts, .. }
            | Msg::Postgres { ts, .. }
            | Msg::Event { ts, .. }
            | Msg::End { ts, .. } => Some(*ts),
            Msg::Flush(_) | Msg::Shutdown => None,
        }
    }

    /// Whether it may be dropped when the queue is at its bound: exchanges
    /// and events (the bulk). Starts and ends are kept, so that every chain
    /// stays whole and the writer's open sessions end; they are bounded by
    /// the connections the gateway admits.
    fn droppable(&self) -> bool {
        matches!(self, Msg::Exchange { .. } | Msg::Postgres { .. } | Msg::Event { .. })
    }

    /// Body bytes it carries, which dominate a queued record's size.
    fn body_bytes(&self) -> usize {
        match self {
            Msg::Exchange { exchange, .. } => exchange.request_body.len() + exchange.response_body.len(),
            Msg::Postgres { exchange, .. } => exchange.text_bytes(),
            _ => 0,
        }
    }
}

/// Whether the recorder is taking records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Records are committed as they come (or recording is disabled).
    Recording,
    /// The last commit failed (disk full, I/O error, a locked or unreadable
    /// database): records wait in memory and the commit is retried.
    Failing,
    /// So many records wait that new ones are dropped.
    Backlogged,
}

impl Health {
    /// The name used in events and `gateway status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Recording => "recording",
            Health::Failing => "failing",
            Health::Backlogged => "backlogged",
        }
    }
}

/// The recorder's state for `gateway status` and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct RecorderStatus {
    /// Whether records are being committed.
    pub health: Health,
    /// What happens to recorded traffic while they are not.
    pub on_failure: OnRecordFailure,
    /// Records waiting to be committed.
    pub queued: usize,
    /// Body bytes of those records.
    pub queued_bytes: usize,
    /// Records dropped since start because the queue was full.
    pub dropped: u64,
    /// Since when commits have been failing (Unix seconds).
    pub failing_since: Option<i64>,
    /// The last commit error, while failing.
    pub error: Option<String>,
}

/// State shared by the senders and the writer.
#[derive(Debug, Default)]
struct Shared {
    /// What the gate does with recorded traffic while recording fails.
    on_failure: OnRecordFailure,
    /// Set while commits fail, cleared by the next that succeeds.
    failing: AtomicBool,
    /// Unix seconds of the first failed commit, while failing (else 0).
    failing_since: AtomicI64,
    /// The last commit error, while failing.
    error: Mutex<Option<String>>,
    /// Records dropped because the queue was at its bound.
    dropped: AtomicU64,
    /// Records sent and not yet taken by the writer.
    queued: AtomicUsize,
    /// Body bytes of those records.
    queued_bytes: AtomicUsize,
    /// Set when the queue alarm fired, until the writer catches up.
    alarmed: AtomicBool,
    /// Set by [`Recorder::shutdown`]: failed commits are no longer retried forever.
    stopping: AtomicBool,
    /// Times the writer woke up (tests check it wakes per batch).
    #[cfg(test)]
    wakeups: AtomicUsize,
}

#[derive(Debug, Clone)]
struct Sink {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    /// The writer thread, to wake it before its deadline.
    writer: Thread,
}

impl Sink {
    /// Enqueues a record. Sending does not wake a writer that is collecting
    /// a batch (a context switch per record would cost more than the
    /// record): only the record that fills a batch does.
    fn send(&self, msg: Msg) {
        let body_bytes = msg.body_bytes();
        if msg.droppable() && self.shared.full(body_bytes) {
            let dropped = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if is_power_of_ten(dropped as usize) {
                tracing::error!(
                    target: TARGET,
                    dropped,
                    max_records = MAX_QUEUED,
                    max_body_bytes = MAX_QUEUED_BYTES,
                    "the session recorder's queue is full (the database has not taken records for too long); \
                     session records are being dropped"
                );
            }
            return;
        }
        let queued = self.shared.queued.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes_before =
            if body_bytes > 0 { self.shared.queued_bytes.fetch_add(body_bytes, Ordering::Relaxed) } else { 0 };
        if queued >= QUEUE_ALARM && is_power_of_ten(queued) {
            self.shared.alarmed.store(true, Ordering::Relaxed);
            tracing::error!(
                target: TARGET,
                queued,
                "session records are arriving faster than the database commits them; they are kept in memory \
                 (none is dropped) and memory use grows until the writer catches up"
            );
        }
        if self.tx.send(msg).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            self.shared.queued_bytes.fetch_sub(body_bytes, Ordering::Relaxed);
            tracing::error!(target: TARGET, "the session recorder has shut down; a session record is lost");
            return;
        }
        let fills_bytes = (bytes_before + body_bytes) / MAX_BATCH_BYTES > bytes_before / MAX_BATCH_BYTES;
        if queued.is_multiple_of(MAX_BATCH_RECORDS) || fills_bytes {
            self.writer.unpark();
        }
    }

    /// Sends a flush or shutdown request and wakes the writer for it.
    fn send_control(&self, msg: Msg) -> Result<(), RecordError> {
        self.tx.send(msg).map_err(|_| RecordError::Writer("the writer has stopped".into()))?;
        self.writer.unpark();
        Ok(())
    }
}

impl Shared {
    /// Whether a record carrying `body_bytes` would pass the queue's bound.
    fn full(&self, body_bytes: usize) -> bool {
        self.queued.load(Ordering::Relaxed) >= MAX_QUEUED
            || self.queued_bytes.load(Ordering::Relaxed) + body_bytes > MAX_QUEUED_BYTES
    }

    fn health(&self) -> Health {
        if self.full(0) {
            Health::Backlogged
        } else if self.failing.load(Ordering::Relaxed) {
            Health::Failing
        } else {
            Health::Recording
        }
    }

    fn error(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.error.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn is_power_of_ten(mut n: usize) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}

/// Records sessions into the sessions database. Cheap to clone; every clone
/// feeds the same writer thread. A disabled recorder accepts every call and
/// records nothing.
#[derive(Debug, Clone)]
pub struct Recorder {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    sink: Sink,
    path: PathBuf,
    threads: Mutex<Option<Threads>>,
}

#[derive(Debug)]
struct Threads {
    writer: JoinHandle<()>,
    pruner: Pruner,
}

impl Recorder {
    /// Opens the database (see [`RecordConfig::database_path`]), takes the
    /// writer lock and starts the writer and pruner threads; a disabled
    /// recorder if `config.enabled` is false. Blocks while opening: call it
    /// at start-up.
    pub fn open(config: &RecordConfig, state_dir: &Path) -> Result<Recorder, RecordError> {
        if !config.enabled {
            return Ok(Recorder::disabled());
        }
        let path = config.database_path(state_dir);
        if let Err((field, reason)) = config.validate() {
            return Err(RecordError::Open { path, reason: format!("configuration: {field}: {reason}") });
        }
        let writer_lock = lock::acquire(&path)?;
        let store = SessionStore::open(&path)?;
        let live_since = writer_lock.since;
        let shared = Arc::new(Shared { on_failure: config.on_failure, ..Shared::default() });
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            store,
            rx,
            shared: Arc::clone(&shared),
            flush_interval: config.flush_interval,
            max_body_bytes: config.max_body_bytes,
            chains: HashMap::default(),
            batch: Batch::default(),
            generation: 0,
            names: SensitiveNames::default(),
            waiters: Vec::new(),
            _lock: writer_lock,
        };
        let writer = std::thread::Builder::new()
            .name("record-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| RecordError::Writer(format!("cannot start the writer thread: {e}")))?;
        let sink = Sink { tx, shared, writer: writer.thread().clone() };
        let pruner = Pruner::spawn(path.clone(), config.retention, config.prune_interval, live_since)?;
        tracing::info!(target: TARGET, database = %path.display(), "session recording enabled");
        Ok(Recorder {
            inner: Some(Arc::new(Inner { sink, path, threads: Mutex::new(Some(Threads { writer, pruner })) })),
        })
    }

    /// A recorder that records nothing.
    pub fn disabled() -> Recorder {
        Recorder { inner: None }
    }

    /// The database, if recording.
    pub fn path(&self) -> Option<&Path> {
        self.inner.as_ref().map(|i| i.path.as_path())
    }

    /// Whether records are being committed ([`Health::Recording`] when
    /// recording is disabled: nothing is waiting). Two atomic loads.
    pub fn health(&self) -> Health {
        self.inner.as_ref().map_or(Health::Recording, |i| i.sink.shared.health())
    }

    /// Whether traffic the policy records must be refused now: the recorder
    /// is not taking records and `record.on_failure` is `refuse`. `Some`
    /// says why.
    pub fn refusing(&self) -> Option<Health> {
        let shared = &self.inner.as_ref()?.sink.shared;
        if shared.on_failure != OnRecordFailure::Refuse {
            return None;
        }
        Some(shared.health()).filter(|h| *h != Health::Recording)
    }

    /// The recorder's state (`None` when recording is disabled).
    pub fn status(&self) -> Option<RecorderStatus> {
        let shared = &self.inner.as_ref()?.sink.shared;
        let since = shared.failing_since.load(Ordering::Relaxed);
        Some(RecorderStatus {
            health: shared.health(),
            on_failure: shared.on_failure,
            queued: shared.queued.load(Ordering::Relaxed),
            queued_bytes: shared.queued_bytes.load(Ordering::Relaxed),
            dropped: shared.dropped.load(Ordering::Relaxed),
            failing_since: (since != 0).then_some(since),
            error: shared.error().clone(),
        })
    }

    /// How often the writer has woken up so far.
    #[cfg(test)]
    pub(crate) fn writer_wakeups(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| i.sink.shared.wakeups.load(Ordering::Relaxed))
    }

    /// Starts recording a session (its start record is the session metadata).
    pub fn start(&self, start: SessionStart) -> SessionRecorder {
        let now = SystemTime::now();
        let id = SessionId::generate(now);
        let sink = self.inner.as_ref().map(|inner| inner.sink.clone());
        if let Some(sink) = &sink {
            sink.send(Msg::Start { id: id.clone(), ts: nanos(now), start: Box::new(start) });
        }
        SessionRecorder { id, sink, ended: AtomicBool::new(false) }
    }

    /// Blocks until everything enqueued before the call is committed (not
    /// for async code: use `spawn_blocking`).
    pub fn flush(&self) -> Result<(), RecordError> {
        let Some(inner) = &self.inner else { return Ok(()) };
        let (reply, done) = mpsc::sync_channel(1);
        inner.sink.send_control(Msg::Flush(reply))?;
        match done.recv() {
            Ok(result) => result.map_err(RecordError::Writer),
            Err(_) => Err(RecordError::Writer("the writer has stopped".into())),
        }
    }

    /// Commits everything enqueued so far and stops the threads. Records
    /// sent afterwards (by sessions still open) are lost, and logged as such.
    pub fn shutdown(self) {
        let Some(inner) = self.inner else { return };
        inner.sink.shared.stopping.store(true, Ordering::Relaxed);
        // The writer drains the queue up to this message before exiting.
        let _ = inner.sink.send_control(Msg::Shutdown);
        let threads = match inner.threads.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(Threads { writer, pruner }) = threads {
            if writer.join().is_err() {
                tracing::error!(target: TARGET, "the session writer thread panicked");
            }
            pruner.stop();
        }
    }
}

/// Records one session. Calls only enqueue. Share it between a connection's
/// streams with an `Arc`; dropping it without [`SessionRecorder::end`]
/// records an end with outcome `dropped`.
#[derive(Debug)]
pub struct SessionRecorder {
    id: SessionId,
    sink: Option<Sink>,
    ended: AtomicBool,
}

impl SessionRecorder {
    /// The session id (for logs and responses).
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// Whether anything is recorded (false for a disabled recorder).
    pub fn is_recording(&self) -> bool {
        self.sink.is_some()
    }

    /// Records an exchange (nothing at [`RecordLevel::None`]).
    pub fn exchange(&self, exchange: ExchangeRecord) {
        if exchange.level == RecordLevel::None {
            return;
        }
        if let Some(sink) = &self.sink {
            let ts = nanos(SystemTime::now());
            sink.send(Msg::Exchange { id: self.id.clone(), ts, exchange: Box::new(exchange) });
        }
    }

    /// Records a PostgreSQL round trip as one `exchange` record.
    pub fn postgres(&self, exchange: PostgresExchange) {
        if let Some(sink) = &self.sink {
            let ts = nanos(SystemTime::now());
            sink.send(Msg::Postgres { id: self.id.clone(), ts, exchange: Box::new(exchange) });
        }
    }

    /// Records an event (`refused`, `approval_requested`, `masked`, ...)
    /// with free-form details.
    pub fn event(&self, kind: EventKind, detail: serde_json::Value) {
        if let Some(sink) = &self.sink {
            let ts = nanos(SystemTime::now());
            sink.send(Msg::Event { id: self.id.clone(), ts, kind, detail });
        }
    }

    /// Records the end of the session. Only the first end counts; records
    /// sent after it are lost (and logged as such by the writer).
    pub fn end(&self, outcome: SessionOutcome, bytes_up: u64, bytes_down: u64) {
        if self.ended.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Some(sink) = &self.sink {
            let end = SessionEnd { bytes_up, bytes_down, outcome: outcome.as_str().to_owned() };
            sink.send(Msg::End { id: self.id.clone(), ts: nanos(SystemTime::now()), end });
        }
    }
}

impl Drop for SessionRecorder {
    fn drop(&mut self) {
        self.end(SessionOutcome::Dropped, 0, 0);
    }
}

/// A session's chain as far as the writer has built it.
struct Chain {
    next_seq: u64,
    last_hash: String,
    exchanges: u64,
    /// Its entry in the batch: the batch's generation and the entry's index.
    chunk: Option<(u64, usize)>,
}

struct Writer {
    store: SessionStore,
    rx: mpsc::Receiver<Msg>,
    shared: Arc<Shared>,
    flush_interval: Duration,
    max_body_bytes: usize,
    /// foldhash: looked up per record (ids are the gateway's own, not the
    /// traffic's).
    chains: HashMap<SessionId, Chain, foldhash::fast::RandomState>,
    batch: Batch,
    /// Counts batches committed (or given up), so a chain knows whether its
    /// chunk is in the current one.
    generation: u64,
    names: SensitiveNames,
    waiters: Vec<mpsc::SyncSender<Result<(), String>>>,
    /// Held until the thread exits (or the process dies).
    _lock: WriterLock,
}

/// What a message asks of the batching loop.
enum After {
    Continue,
    CommitNow,
    Stop,
}

impl Writer {
    fn run(mut self) {
        let mut stop = false;
        while !stop {
            // Idle until a record arrives: the one wake-up a batch costs its
            // senders.
            let Ok(first) = self.rx.recv() else { break };
            self.woke();
            let deadline = self.deadline(&first);
            let mut after = self.take(first);
            while matches!(after, After::Continue) {
                after = self.drain();
                let now = Instant::now();
                if !matches!(after, After::Continue) || now >= deadline {
                    break;
                }
                // Woken early by a flush, a shutdown or a full batch (or
                // spuriously: the loop only drains once more).
                std::thread::park_timeout(deadline - now);
                self.woke();
            }
            if matches!(after, After::Stop) {
                self.shared.stopping.store(true, Ordering::Relaxed);
                // Whatever clones sent before they noticed the shutdown.
                while let Ok(msg) = self.rx.try_recv() {
                    self.take(msg);
                }
                stop = true;
            }
            self.commit();
        }
        if !self.chains.is_empty() {
            tracing::info!(target: TARGET, open = self.chains.len(), "recorder stopped with sessions still open; they are listed as interrupted");
        }
    }

    fn woke(&self) {
        #[cfg(test)]
        self.shared.wakeups.fetch_add(1, Ordering::Relaxed);
    }

    /// When the batch `first` opens must be committed: `flush_interval`
    /// after it was sent, however long it waited for a commit in progress.
    fn deadline(&self, first: &Msg) -> Instant {
        let now = Instant::now();
        let waited = first.sent().map_or(0, |sent| nanos(SystemTime::now()).saturating_sub(sent));
        now + self.flush_interval.saturating_sub(Duration::from_nanos(u64::try_from(waited).unwrap_or(0)))
    }

    /// Takes everything queued, committing whenever the batch is full; stops
    /// early at a flush or shutdown request.
    fn drain(&mut self) -> After {
        loop {
            if self.batch_full() {
                self.commit();
            }
            match self.rx.try_recv() {
                Ok(msg) => match self.take(msg) {
                    After::Continue => {}
                    other => return other,
                },
                Err(TryRecvError::Empty) => return After::Continue,
                Err(TryRecvError::Disconnected) => return After::Stop,
            }
        }
    }

    fn batch_full(&self) -> bool {
        self.batch.records >= MAX_BATCH_RECORDS || self.batch.bytes >= MAX_BATCH_BYTES
    }

    fn take(&mut self, msg: Msg) -> After {
        self.taken(&msg);
        match msg {
            Msg::Start { id, ts, start } => {
                self.start(id, ts, &start);
            }
            Msg::Exchange { id, ts, exchange } => {
                let data = encode::exchange(&exchange, self.max_body_bytes, &self.names);
                self.append(&id, ts, RecordKind::Exchange, data, None);
            }
            Msg::Postgres { id, ts, exchange } => {
                let data = encode::postgres(&exchange);
                self.append(&id, ts, RecordKind::Exchange, data, None);
            }
            Msg::Event { id, ts, kind, detail } => {
                let data = encode::event(kind.as_str(), &detail);
                self.append(&id, ts, RecordKind::Event, data, None);
            }
            Msg::End { id, ts, end } => {
                self.append(&id, ts, RecordKind::End, encode::to_json(&end), Some(end));
                self.chains.remove(&id);
            }
            Msg::Flush(reply) => {
                self.waiters.push(reply);
                return After::CommitNow;
            }
            Msg::Shutdown => return After::Stop,
        }
        After::Continue
    }

    fn taken(&self, msg: &Msg) {
        if msg.sent().is_some() {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
        }
        let body_bytes = msg.body_bytes();
        if body_bytes > 0 {
            self.shared.queued_bytes.fetch_sub(body_bytes, Ordering::Relaxed);
        }
    }

    fn start(&mut self, id: SessionId, ts: i64, s: &SessionStart) {
        let meta = SessionMeta {
            session: id.clone(),
            conn_id: s.conn_id,
            started: ts,
            identity: cap(&s.identity, limits::TEXT),
            identity_labels: s
                .identity_labels
                .iter()
                .take(limits::LABELS)
                .map(|(k, v)| (cap(k, limits::SHORT), cap(v, limits::TEXT)))
                .collect(),
            process: process_facts(&s.process),
            host: cap(&s.host, limits::SHORT),
            orig_dst: s.orig_dst.to_string(),
            sni: s.sni.as_deref().map(|v| cap(v, limits::SHORT)),
            tls: s.tls.as_ref().map(|t| super::TlsFacts {
                version: cap(&t.version, limits::SHORT),
                cipher: cap(&t.cipher, limits::SHORT),
                alpn: t.alpn.as_deref().map(|v| cap(v, limits::SHORT)),
            }),
            protocol: s.protocol.as_str().to_owned(),
        };
        let data = encode::to_json(&meta);
        let hash = hash_record(id.as_str(), GENESIS_HASH, 0, ts, RecordKind::Start.as_str(), &data);
        self.batch.new_sessions.push(SessionRow {
            id: id.clone(),
            conn_id: meta.conn_id,
            started: ts,
            identity: meta.identity.clone(),
            host: meta.host.clone(),
            orig_dst: meta.orig_dst.clone(),
            protocol: meta.protocol.clone(),
            pid: meta.process.pid,
            comm: meta.process.comm.clone(),
            meta: data.clone(),
            exchanges: 0,
            last_seq: 0,
            last_hash: hash.clone(),
            last_ts: ts,
            ended: None,
            bytes_up: None,
            bytes_down: None,
            outcome: None,
        });
        let mut chain = Chain { next_seq: 1, last_hash: String::new(), exchanges: 0, chunk: None };
        push(&mut self.batch, self.generation, &mut chain, &id, 0, ts, RecordKind::Start, &hash, &data);
        chain.last_hash = hash;
        self.chains.insert(id, chain);
    }

    fn append(&mut self, id: &SessionId, ts: i64, kind: RecordKind, data: String, end: Option<SessionEnd>) {
        let Some(chain) = self.chains.get_mut(id) else {
            // Only possible after a start was given up at shutdown, or for a
            // record sent after its session's end: nothing to chain it to.
            tracing::error!(target: TARGET, session = %id, kind = kind.as_str(), "a record for a session that is not open is lost");
            return;
        };
        if kind == RecordKind::Exchange {
            chain.exchanges += 1;
        }
        let seq = chain.next_seq;
        let hash = hash_record(id.as_str(), &chain.last_hash, seq, ts, kind.as_str(), &data);
        let appended = push(&mut self.batch, self.generation, chain, id, seq, ts, kind, &hash, &data);
        chain.next_seq += 1;
        let exchanges = chain.exchanges;
        match &mut appended.tail {
            Some(tail) => {
                // In place: the hash's buffer is reused record after record.
                tail.last_seq = seq;
                tail.last_hash.clear();
                tail.last_hash.push_str(&hash);
                tail.last_ts = ts;
                tail.exchanges = exchanges;
                tail.end = end;
            }
            None => {
                appended.tail = Some(Tail { last_seq: seq, last_hash: hash.clone(), last_ts: ts, exchanges, end });
            }
        }
        chain.last_hash = hash;
    }

    /// Commits the batch, retrying with back-off until it succeeds (or, once
    /// stopping, a few times), and answers flush waiters.
    fn commit(&mut self) {
        let mut attempt = 0u32;
        let mut pause = RETRY_FIRST;
        while !self.batch.is_empty() {
            // Checked before and after: a commit into a log deleted under
            // the connection "succeeds" and is lost at close.
            let committed = self
                .store
                .check_files()
                .and_then(|()| self.store.write_batch(&self.batch))
                .and_then(|missing| self.store.check_files().map(|()| missing));
            match committed {
                Ok(missing) => {
                    self.recovered();
                    for id in missing {
                        tracing::warn!(target: TARGET, session = %id, "session row vanished (pruned or deleted) while the session was live; its later records are orphaned");
                    }
                    self.batch.clear();
                    self.generation += 1;
                }
                Err(e) => {
                    attempt += 1;
                    let records = self.batch.records;
                    self.failed(&e);
                    for waiter in self.waiters.drain(..) {
                        let _ = waiter.send(Err(e.to_string()));
                    }
                    if self.shared.stopping.load(Ordering::Relaxed) && attempt >= SHUTDOWN_ATTEMPTS {
                        tracing::error!(target: TARGET, error = %e, records, "giving up: these session records are lost");
                        self.batch.clear();
                        self.generation += 1;
                        break;
                    }
                    if matches!(&e, RecordError::Damaged { damage, .. } if damage.reopenable()) && self.reopen() {
                        continue;
                    }
                    tracing::error!(target: TARGET, error = %e, records, attempt, retry_in = ?pause, "committing session records failed; the batch is kept and retried");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        }
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(Ok(()));
        }
        if self.shared.alarmed.load(Ordering::Relaxed) && self.shared.queued.load(Ordering::Relaxed) < QUEUE_ALARM / 10
        {
            self.shared.alarmed.store(false, Ordering::Relaxed);
            tracing::warn!(target: TARGET, "the session writer has caught up with its queue");
        }
    }
}

impl Writer {
    /// Opens the store again at its path, once the damaged file there was
    /// moved aside or replaced (creating a new one if none): the gateway
    /// never moves or deletes a store itself. True when it did.
    fn reopen(&mut self) -> bool {
        let path = self.store.path().to_owned();
        match SessionStore::open(&path) {
            Ok(store) => {
                // The old connection is never closed: closing it would let
                // SQLite checkpoint into the damaged file (wherever it was
                // moved) and delete `<path>-wal` and `-shm` by name, which
                // are the new store's now. It also keeps the deleted log it
                // holds readable (/proc/<pid>/fd) for investigation. One
                // connection per such event.
                std::mem::forget(std::mem::replace(&mut self.store, store));
                tracing::warn!(
                    target: TARGET,
                    event = "recording_store_reopened",
                    database = %path.display(),
                    "the sessions database was moved aside or replaced: recording goes on in the file now at its path; \
                     sessions open across the change keep their earlier records in the old file"
                );
                true
            }
            Err(e) => {
                tracing::error!(target: TARGET, database = %path.display(), error = %e, "cannot open the sessions database again");
                false
            }
        }
    }

    /// Marks the recorder failing (the gate reads it per decision) and says
    /// once what that means for traffic.
    fn failed(&self, e: &RecordError) {
        *self.shared.error() = Some(e.to_string());
        if self.shared.failing.swap(true, Ordering::Relaxed) {
            return;
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.shared.failing_since.store(i64::try_from(now).unwrap_or(i64::MAX), Ordering::Relaxed);
        let consequence = match self.shared.on_failure {
            OnRecordFailure::Refuse => {
                "traffic the policy records is refused until it recovers (record.on_failure: refuse)"
            }
            OnRecordFailure::Serve => {
                "traffic is still served and its records wait in memory (record.on_failure: serve)"
            }
        };
        tracing::error!(
            target: TARGET,
            event = "recording_failed",
            error = %e,
            on_failure = self.shared.on_failure.as_str(),
            "session recording is failing; {consequence}"
        );
    }

    /// Clears the failing state after a successful commit.
    fn recovered(&self) {
        if !self.shared.failing.swap(false, Ordering::Relaxed) {
            return;
        }
        let since = self.shared.failing_since.swap(0, Ordering::Relaxed);
        *self.shared.error() = None;
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        tracing::warn!(
            target: TARGET,
            event = "recording_recovered",
            failed_for_s = i64::try_from(now).unwrap_or(i64::MAX).saturating_sub(since),
            queued = self.shared.queued.load(Ordering::Relaxed),
            "session recording recovered; every record kept in memory is being committed"
        );
    }
}

/// Adds a record to its session's entry in `batch`, opening one when this
/// is the session's first record in the batch (`generation` tells whether
/// the entry `chain` remembers is in it), and returns the entry.
/// `chain.last_hash` is still the previous record's hash.
#[allow(clippy::too_many_arguments)]
fn push<'b>(
    batch: &'b mut Batch,
    generation: u64,
    chain: &mut Chain,
    id: &SessionId,
    seq: u64,
    ts: i64,
    kind: RecordKind,
    hash: &str,
    data: &str,
) -> &'b mut Appended {
    batch.records += 1;
    batch.bytes += data.len();
    let open = chain.chunk.filter(|(of, i)| *of == generation && *i < batch.sessions.len()).map(|(_, i)| i);
    let i = open.unwrap_or_else(|| {
        let prev = if seq == 0 { GENESIS_HASH.to_owned() } else { chain.last_hash.clone() };
        batch.sessions.push(Appended { chunk: Chunk::new(id.clone(), seq, prev), tail: None });
        batch.sessions.len() - 1
    });
    chain.chunk = Some((generation, i));
    // In bounds: checked above, or just pushed.
    let appended = &mut batch.sessions[i];
    appended.chunk.push(ts, kind.as_str(), hash, data);
    appended
}

fn process_facts(p: &ProcessSnapshot) -> ProcessSnapshot {
    let job = p.job.iter().take(limits::JOB_VARS).map(|(k, v)| (cap(k, limits::SHORT), cap(v, limits::TEXT))).collect();
    ProcessSnapshot {
        pid: p.pid,
        uid: p.uid,
        gid: p.gid,
        comm: cap(&p.comm, limits::SHORT),
        exe: p.exe.as_deref().map(|v| cap(v, limits::TEXT)),
        cgroup: p.cgroup.as_deref().map(|v| cap(v, limits::TEXT)),
        container: p.container.as_ref().map(|c| crate::identity::ContainerRef {
            id: cap(&c.id, limits::SHORT),
            image: c.image.as_deref().map(|v| cap(v, limits::TEXT)),
            image_id: c.image_id.as_deref().map(|v| cap(v, limits::SHORT)),
            name: c.name.as_deref().map(|v| cap(v, limits::SHORT)),
            pod_uid: c.pod_uid.as_deref().map(|v| cap(v, limits::SHORT)),
            runtime: c.runtime,
        }),
        job: redact_job(&job),
    }
}
