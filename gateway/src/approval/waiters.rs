//! Held requests waiting for their decision: a map from request id to the
//! channel that wakes the waiting proxy task, signalled by the decision
//! itself (no polling of the database).

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
};

use tokio::sync::oneshot;

use super::{ApprovalId, Outcome};

/// The waiting requests of this gateway run.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    map: Mutex<HashMap<ApprovalId, oneshot::Sender<Outcome>>>,
}

impl Waiters {
    fn lock(&self) -> MutexGuard<'_, HashMap<ApprovalId, oneshot::Sender<Outcome>>> {
        // Entries are inserted and removed whole; a poisoned map is still
        // consistent.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts waiting for `id`'s outcome.
    pub(crate) fn register(&self, id: ApprovalId) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, tx);
        rx
    }

    /// Wakes `id`'s waiter with `outcome`; false when nobody waits any more.
    pub(crate) fn resolve(&self, id: ApprovalId, outcome: Outcome) -> bool {
        match self.lock().remove(&id) {
            Some(tx) => tx.send(outcome).is_ok(),
            None => false,
        }
    }

    /// Forgets `id`'s waiter (timed out, abandoned).
    pub(crate) fn remove(&self, id: ApprovalId) {
        self.lock().remove(&id);
    }

    /// How many requests are waiting.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resolve_wakes_the_registered_waiter_once() {
        let waiters = Waiters::default();
        let rx = waiters.register(ApprovalId(1));
        let other = waiters.register(ApprovalId(2));
        assert_eq!(waiters.len(), 2);
        assert!(waiters.resolve(ApprovalId(1), Outcome::TimedOut { id: ApprovalId(1) }));
        assert_eq!(rx.await.unwrap(), Outcome::TimedOut { id: ApprovalId(1) });
        assert!(!waiters.resolve(ApprovalId(1), Outcome::TimedOut { id: ApprovalId(1) }));
        waiters.remove(ApprovalId(2));
        assert!(other.await.is_err());
        assert_eq!(waiters.len(), 0);
    }
}
