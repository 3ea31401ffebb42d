//! Recording findings from async code.
//!
//! A dedicated writer thread owns the connection: SQLite calls (and the
//! fsync of every commit) block, and must not stall tokio's workers. Requests
//! that queue up while a commit is in flight are committed together in the
//! next transaction (group commit), so one fsync serves a burst of findings.
//!
//! A finding the database refuses (disk full, I/O error) is answered with the
//! error at once (the gate blocks the request: losing a finding never lets a
//! key through), and kept to be written again with back-off, so that it is
//! not lost once the database recovers.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};

use super::{FindingStore, FindingsError, NewFinding, Recorded};

/// Most findings committed by one transaction.
const MAX_BATCH: usize = 64;
/// Requests that may wait for the writer before `record` callers wait to enqueue.
const QUEUE: usize = 1024;
/// Most findings kept for another attempt while the database fails; beyond
/// it the oldest are dropped (and logged: each was also logged when seen).
const MAX_RETRY: usize = 10_000;
/// Back-off between attempts to write kept findings.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(2);

struct Request {
    finding: NewFinding,
    reply: oneshot::Sender<Result<Recorded, FindingsError>>,
}

/// A cheap, cloneable handle to a findings store served by a writer thread.
/// The thread exits when the last handle is dropped, after finishing the
/// requests already queued.
#[derive(Clone, Debug)]
pub struct FindingsHandle {
    tx: mpsc::Sender<Request>,
    path: Arc<PathBuf>,
}

impl FindingsHandle {
    /// Opens the database at `path` (see [`FindingStore::open`]) and starts
    /// its writer thread. Blocks while opening: call it at start-up, or from
    /// `spawn_blocking`.
    pub fn open(path: &Path) -> Result<FindingsHandle, FindingsError> {
        FindingsHandle::new(FindingStore::open(path)?)
    }

    /// Starts a writer thread owning `store`.
    pub fn new(store: FindingStore) -> Result<FindingsHandle, FindingsError> {
        let path = Arc::new(store.path().to_owned());
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new().name("findings-writer".into()).spawn(move || writer(store, rx)).map_err(|e| {
            FindingsError::Open { path: path.as_ref().clone(), reason: format!("cannot start the writer thread: {e}") }
        })?;
        Ok(FindingsHandle { tx, path })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a sighting (see [`FindingStore::record`]). Resolves only once
    /// the finding is committed durably. If the caller stops waiting, the
    /// finding is still recorded.
    pub async fn record(&self, finding: NewFinding) -> Result<Recorded, FindingsError> {
        let (reply, response) = oneshot::channel();
        self.tx.send(Request { finding, reply }).await.map_err(|_| FindingsError::WriterStopped)?;
        response.await.map_err(|_| FindingsError::WriterStopped)?
    }
}

/// Commits `findings` when the store's files are intact before and after
/// the commit (a commit into a log deleted under the connection "succeeds"
/// and is lost at close); otherwise each fails with the damage, and is kept.
/// A store whose file was moved aside or replaced is opened again first.
fn commit(store: &mut FindingStore, findings: &[NewFinding]) -> Vec<Result<Recorded, FindingsError>> {
    if store.check_files().is_err_and(crate::sqlite::Damage::reopenable) {
        let path = store.path().to_owned();
        match FindingStore::open(&path) {
            Ok(reopened) => {
                // Never closed, as the session writer's: closing would let
                // SQLite checkpoint into the damaged file and delete the new
                // store's -wal and -shm by name.
                std::mem::forget(std::mem::replace(store, reopened));
                tracing::warn!(
                    event = "findings_store_reopened",
                    database = %path.display(),
                    "the findings database was moved aside or replaced: findings are recorded in the file now at its path"
                );
            }
            Err(e) => {
                tracing::error!(database = %path.display(), error = %e, "cannot open the findings database again")
            }
        }
    }
    let damaged = |store: &FindingStore, damage| -> Vec<Result<Recorded, FindingsError>> {
        findings.iter().map(|_| Err(FindingsError::Damaged { path: store.path().to_owned(), damage })).collect()
    };
    if let Err(damage) = store.check_files() {
        return damaged(store, damage);
    }
    let results = store.record_batch(findings);
    match store.check_files() {
        Ok(()) => results,
        Err(damage) => damaged(store, damage),
    }
}

fn writer(mut store: FindingStore, mut rx: mpsc::Receiver<Request>) {
    // Findings the database refused, oldest first, written again before new ones.
    let mut retry: Vec<NewFinding> = Vec::new();
    let mut pause = RETRY_FIRST;
    loop {
        let mut findings = Vec::new();
        let mut replies = Vec::new();
        if retry.is_empty() {
            let Some(first) = rx.blocking_recv() else { break };
            findings.push(first.finding);
            replies.push(first.reply);
        } else {
            std::thread::sleep(pause);
            pause = (pause * 2).min(RETRY_MAX);
        }
        while findings.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Request { finding, reply }) => {
                    findings.push(finding);
                    replies.push(reply);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) if retry.is_empty() && findings.is_empty() => return,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        }
        let kept = retry.len();
        let results = if kept == 0 {
            commit(&mut store, &findings)
        } else {
            retry.append(&mut findings);
            let mut results = commit(&mut store, &retry);
            findings = retry.split_off(kept);
            let mut failed = Vec::new();
            for (finding, result) in retry.drain(..).zip(results.drain(..kept)) {
                match result {
                    Ok(recorded) => tracing::warn!(
                        finding = recorded.id.to_string(),
                        rule = %finding.rule_id,
                        "a finding the database refused earlier is recorded now"
                    ),
                    Err(_) => failed.push(finding),
                }
            }
            retry = failed;
            results
        };
        for ((reply, result), finding) in replies.into_iter().zip(results).zip(&findings) {
            if let Err(e) = &result {
                // Kept when the database failed, not the finding.
                let kept = retryable(e);
                tracing::error!(error = %e, rule = %finding.rule_id, host = %finding.dest_host, kept, "recording a finding failed (when kept, it is written again once the database recovers)");
                if kept {
                    retry.push(finding.clone());
                }
            }
            // The caller may have given up waiting; the outcome is logged above.
            let _ = reply.send(result);
        }
        if retry.is_empty() {
            pause = RETRY_FIRST;
        } else if retry.len() > MAX_RETRY {
            let dropped = retry.len() - MAX_RETRY;
            retry.drain(..dropped);
            tracing::error!(dropped, "the findings database has failed for too long: the oldest findings kept for it are dropped (each was logged when seen)");
        }
    }
}

/// Whether writing a finding again may succeed: the database failed, not
/// the finding.
fn retryable(e: &FindingsError) -> bool {
    matches!(e, FindingsError::Database { .. } | FindingsError::Corrupt { .. } | FindingsError::Damaged { .. })
}
