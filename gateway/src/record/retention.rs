//! Retention: a background thread, with its own connection, that removes
//! sessions whose last record (their end, for ended sessions) is older than
//! `retention`. Deletes go in small transactions (see [`PRUNE_BATCH`]) so the
//! recording writer never waits long for the write lock.

use std::{
    path::{Path, PathBuf},
    sync::mpsc::{self, RecvTimeoutError},
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use super::{model::nanos, RecordError, SessionStore};

/// Sessions deleted per transaction.
pub const PRUNE_BATCH: usize = 500;

const TARGET: &str = "gateway::record";

/// Removes from the database at `path` every ended or interrupted session
/// whose last record is older than `retention`, keeping unended sessions
/// started at or after `keep_unended_since` (the running gateway's live
/// ones). Returns how many were removed.
pub fn prune(path: &Path, retention: Duration, keep_unended_since: SystemTime) -> Result<u64, RecordError> {
    let store = SessionStore::open(path)?;
    let cutoff = SystemTime::now().checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
    store.prune(nanos(cutoff), nanos(keep_unended_since), PRUNE_BATCH)
}

/// The running pruner thread.
#[derive(Debug)]
pub(crate) struct Pruner {
    stop: mpsc::Sender<()>,
    handle: JoinHandle<()>,
}

impl Pruner {
    /// Starts pruning `path` now and every `interval`. `live_since` is when
    /// the gateway's writer started (Unix ns): its unended sessions are live.
    pub(crate) fn spawn(
        path: PathBuf,
        retention: Duration,
        interval: Duration,
        live_since: i64,
    ) -> Result<Pruner, RecordError> {
        let (stop, stopped) = mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("record-pruner".into())
            .spawn(move || {
                let mut store: Option<SessionStore> = None;
                loop {
                    if store.is_none() {
                        match SessionStore::open(&path) {
                            Ok(s) => store = Some(s),
                            Err(e) => tracing::error!(target: TARGET, error = %e, "cannot open the sessions database to prune it"),
                        }
                    }
                    if let Some(s) = &store {
                        let cutoff = SystemTime::now().checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
                        match s.prune(nanos(cutoff), live_since, PRUNE_BATCH) {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(target: TARGET, sessions = n, retention = ?retention, "pruned expired sessions"),
                            Err(e) => tracing::error!(target: TARGET, error = %e, "pruning expired sessions failed"),
                        }
                    }
                    match stopped.recv_timeout(interval) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            })
            .map_err(|e| RecordError::Writer(format!("cannot start the pruner thread: {e}")))?;
        Ok(Pruner { stop, handle })
    }

    /// Stops the thread (after the prune in progress, if any).
    pub(crate) fn stop(self) {
        let _ = self.stop.send(());
        if self.handle.join().is_err() {
            tracing::error!(target: TARGET, "the session pruner thread panicked");
        }
    }
}
