//! Recording findings from async code.
//!
//! A dedicated writer thread owns the connection: SQLite calls (and the
//! fsync of every commit) block, and must not stall tokio's workers. Requests
//! that queue up while a commit is in flight are committed together in the
//! next transaction (group commit), so one fsync serves a burst of findings.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::sync::{mpsc, oneshot};

use super::{FindingStore, FindingsError, NewFinding, Recorded};

/// Most findings committed by one transaction.
const MAX_BATCH: usize = 64;
/// Requests that may wait for the writer before `record` callers wait to enqueue.
const QUEUE: usize = 1024;

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

fn writer(store: FindingStore, mut rx: mpsc::Receiver<Request>) {
    while let Some(first) = rx.blocking_recv() {
        let mut findings = vec![first.finding];
        let mut replies = vec![first.reply];
        while findings.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Request { finding, reply }) => {
                    findings.push(finding);
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        let results = store.record_batch(&findings);
        for ((reply, result), finding) in replies.into_iter().zip(results).zip(&findings) {
            if let Err(e) = &result {
                tracing::error!(error = %e, rule = %finding.rule_id, host = %finding.dest_host, "recording a finding failed");
            }
            // The caller may have given up waiting; the outcome is logged above.
            let _ = reply.send(result);
        }
    }
}
