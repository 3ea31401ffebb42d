//! [`Approvals`]: the handle the proxy holds requests with and the admin
//! API decides through.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
};

use time::OffsetDateTime;
use tokio::sync::broadcast;

use super::{
    rules,
    store::{ApprovalStore, Decision},
    waiters::Waiters,
    webhook::Webhook,
    ApprovalConfig, ApprovalError, ApprovalEvent, ApprovalId, ApprovalSpec, ApprovalView, Approver, DecisionView,
    EventKind, ListFilter, NewApproval, Outcome, State, Verdict,
};
use crate::{
    limits::{Limit, LimitExceeded},
    tls::UpstreamTls,
};

/// Tracing target of every approval log line.
pub(crate) const TARGET: &str = "gateway::approval";

/// Events a slow subscriber may fall behind by before it misses some.
const EVENT_BACKLOG: usize = 256;

/// Maps a unix uid to its user name.
pub type UserLookup = Arc<dyn Fn(u32) -> Option<String> + Send + Sync>;

/// The approval service: a cheap, cloneable handle.
#[derive(Clone)]
pub struct Approvals {
    inner: Arc<Inner>,
}

struct Inner {
    store: Mutex<ApprovalStore>,
    waiters: Waiters,
    config: ApprovalConfig,
    events: broadcast::Sender<ApprovalEvent>,
    webhook: Option<Webhook>,
    users: UserLookup,
    /// Requests open (admitted and not yet resolved), per cgroup and in all.
    pending: Mutex<Pending>,
}

/// Open approval requests, for `approvals.max_pending_per_cgroup` and
/// `approvals.max_pending`.
#[derive(Debug, Default)]
struct Pending {
    total: usize,
    per_cgroup: HashMap<u64, usize>,
}

/// One open request's place in [`Pending`], given back on drop.
struct PendingSlot {
    inner: Arc<Inner>,
    cgroup_id: u64,
}

impl Inner {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Plain counters: a panic elsewhere cannot leave them half-updated.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a place for a new request of `cgroup_id`, or names the limit
    /// that is reached.
    fn admit(self: &Arc<Self>, cgroup_id: u64) -> Result<PendingSlot, LimitExceeded> {
        let mut pending = self.pending();
        if pending.total >= self.config.max_pending {
            return Err(LimitExceeded::new(Limit::PendingApprovals, self.config.max_pending));
        }
        let mine = pending.per_cgroup.entry(cgroup_id).or_default();
        if *mine >= self.config.max_pending_per_cgroup {
            return Err(LimitExceeded::new(Limit::PendingApprovalsPerCgroup, self.config.max_pending_per_cgroup));
        }
        *mine += 1;
        pending.total += 1;
        Ok(PendingSlot { inner: self.clone(), cgroup_id })
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut pending = self.inner.pending();
        pending.total = pending.total.saturating_sub(1);
        if let Some(n) = pending.per_cgroup.get_mut(&self.cgroup_id) {
            *n -= 1;
            if *n == 0 {
                pending.per_cgroup.remove(&self.cgroup_id);
            }
        }
    }
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Approvals").field("waiting", &self.inner.waiters.len()).finish_non_exhaustive()
    }
}

impl Inner {
    fn store(&self) -> MutexGuard<'_, ApprovalStore> {
        // A panic inside a store call leaves at most a rolled-back
        // transaction behind; the connection is still usable.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, kind: EventKind, approval: ApprovalView, decision: Option<DecisionView>) {
        let event = ApprovalEvent { kind, at: OffsetDateTime::now_utc(), approval, decision };
        if let Some(hook) = &self.webhook {
            hook.send(&event);
        }
        // No subscriber is fine.
        let _ = self.events.send(event);
    }

    /// Marks `id` abandoned if it is still pending; runs blocking.
    fn abandon(&self, id: ApprovalId) {
        self.waiters.remove(id);
        let result = self.store().finish(id, State::Abandoned, OffsetDateTime::now_utc());
        match result {
            Ok((view, true)) => {
                tracing::info!(target: TARGET, id = %id, "client gone; approval request abandoned");
                self.emit(EventKind::ApprovalAbandoned, view, None);
            }
            Ok((_, false)) => {}
            Err(e) => {
                tracing::error!(target: TARGET, id = %id, error = %e, "cannot mark an approval request abandoned")
            }
        }
    }
}

/// The system's user database.
fn system_users() -> UserLookup {
    Arc::new(|uid| nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten().map(|u| u.name))
}

impl Approvals {
    /// Opens the database (`config.database`, default
    /// `state_dir/approvals.db`), marks requests left pending by a previous
    /// run abandoned, and starts the webhook sender. `tls` verifies an
    /// `https` webhook. Blocks while opening: call it at start-up, inside
    /// the tokio runtime.
    pub fn open(
        config: &ApprovalConfig,
        state_dir: &Path,
        tls: Option<UpstreamTls>,
    ) -> Result<Approvals, ApprovalError> {
        let store = ApprovalStore::open(&config.database_path(state_dir))?;
        Approvals::with_store(config, store, tls, system_users())
    }

    pub(crate) fn with_store(
        config: &ApprovalConfig,
        store: ApprovalStore,
        tls: Option<UpstreamTls>,
        users: UserLookup,
    ) -> Result<Approvals, ApprovalError> {
        if let Err((field, reason)) = config.validate() {
            return Err(ApprovalError::InvalidConfig { field, reason });
        }
        let webhook = config.webhook.as_ref().map(|hook| Webhook::start(hook, tls)).transpose()?;
        let abandoned = store.abandon_all_pending(OffsetDateTime::now_utc())?;
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let inner = Inner {
            store: Mutex::new(store),
            waiters: Waiters::default(),
            config: config.clone(),
            events,
            webhook,
            users,
            pending: Mutex::new(Pending::default()),
        };
        for view in abandoned {
            tracing::info!(target: TARGET, id = %view.id, "approval request left pending by a previous run marked abandoned");
            inner.emit(EventKind::ApprovalAbandoned, view, None);
        }
        Ok(Approvals { inner: Arc::new(inner) })
    }

    /// Receives every event from now on (requests, decisions, timeouts,
    /// abandonments), e.g. to record them beside the session.
    pub fn subscribe(&self) -> broadcast::Receiver<ApprovalEvent> {
        self.inner.events.subscribe()
    }

    /// How many requests are currently held.
    pub fn waiting(&self) -> usize {
        self.inner.waiters.len()
    }

    /// The configured approver groups.
    pub fn groups(&self) -> &BTreeMap<String, Vec<String>> {
        &self.inner.config.groups
    }

    /// Stores `new`, announces it and waits for the decision or
    /// `spec.timeout`. Never fails: a request that cannot be stored resolves
    /// to [`Outcome::Failed`] (refuse it), and one beyond
    /// `approvals.max_pending_per_cgroup` (for `new.cgroup_id`) or
    /// `approvals.max_pending` to [`Outcome::Limited`] at once, neither
    /// stored nor announced. If the caller stops waiting (the client went
    /// away), the request is marked abandoned.
    pub async fn request(&self, new: NewApproval, spec: &ApprovalSpec) -> Outcome {
        if let Err(reason) = self.inner.config.check_spec(spec) {
            tracing::error!(target: TARGET, rule = %new.rule, %reason, "approval rule does not fit the approvals configuration; refusing");
            return Outcome::Failed { reason };
        }
        let _slot = match self.inner.admit(new.cgroup_id) {
            Ok(slot) => slot,
            Err(limit) => {
                tracing::warn!(target: TARGET, rule = %new.rule, identity = %new.identity, cgroup_id = new.cgroup_id, %limit, "approval request refused");
                return Outcome::Limited(limit);
            }
        };
        let ticket = Arc::new(Mutex::new(Ticket::default()));
        let mut guard = AbandonOnDrop { inner: self.inner.clone(), ticket: ticket.clone(), armed: true };
        let inner = self.inner.clone();
        let spec_owned = spec.clone();
        let inserted = tokio::task::spawn_blocking(move || {
            let requesters = rules::requester_names(&new, &*inner.users);
            let store = inner.store();
            let view = store.insert(&new, &requesters, &spec_owned, OffsetDateTime::now_utc())?;
            // Registered under the store lock: no decision can finish the
            // request before somebody listens for it.
            let rx = inner.waiters.register(view.id);
            let mut ticket = lock(&ticket);
            if ticket.cancelled {
                drop(ticket);
                drop(store);
                inner.abandon(view.id);
                return Err(ApprovalError::TaskLost("the client went away while the request was stored".into()));
            }
            ticket.id = Some(view.id);
            Ok((view, rx))
        })
        .await;
        let (view, rx) = match inserted {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                guard.armed = false;
                tracing::error!(target: TARGET, error = %e, "cannot store an approval request; refusing the request");
                return Outcome::Failed { reason: e.to_string() };
            }
            Err(e) => {
                guard.armed = false;
                return Outcome::Failed { reason: format!("storing the approval request: {e}") };
            }
        };
        let id = view.id;
        tracing::info!(
            target: TARGET,
            id = %id, rule = %view.rule, group = %view.group, identity = %view.identity,
            method = %view.method, destination = %view.destination,
            "request held for approval"
        );
        self.inner.emit(EventKind::ApprovalRequested, view, None);

        let outcome = match tokio::time::timeout(spec.timeout, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Outcome::Failed { reason: format!("{id}: the waiter was dropped") },
            Err(_) => self.time_out(id).await,
        };
        guard.armed = false;
        outcome
    }

    async fn time_out(&self, id: ApprovalId) -> Outcome {
        let inner = self.inner.clone();
        let finished = tokio::task::spawn_blocking(move || {
            inner.waiters.remove(id);
            let result = inner.store().finish(id, State::TimedOut, OffsetDateTime::now_utc());
            if let Ok((view, true)) = &result {
                tracing::info!(target: TARGET, id = %id, "approval request timed out; refusing the request");
                inner.emit(EventKind::ApprovalTimedOut, view.clone(), None);
            }
            result
        })
        .await;
        match finished {
            // A decision that landed just before the timer stands.
            Ok(Ok((view, _))) => view.outcome().unwrap_or(Outcome::TimedOut { id }),
            Ok(Err(e)) => {
                tracing::error!(target: TARGET, id = %id, error = %e, "cannot record an approval timeout");
                Outcome::TimedOut { id }
            }
            Err(e) => Outcome::Failed { reason: format!("{id}: recording the timeout: {e}") },
        }
    }

    /// Records `approver`'s `verdict` on request `id` and releases or
    /// refuses the held request when that decides it. Refused with
    /// [`ApprovalError::NotAllowed`] (403), [`ApprovalError::NotFound`]
    /// (404), [`ApprovalError::AlreadyFinished`] or
    /// [`ApprovalError::AlreadyDecided`] (409).
    pub async fn decide(
        &self,
        id: ApprovalId,
        verdict: Verdict,
        approver: Approver,
        comment: Option<String>,
    ) -> Result<ApprovalView, ApprovalError> {
        let inner = self.inner.clone();
        let (view, decision) = tokio::task::spawn_blocking(move || {
            let caller_user = if approver.uid == 0 { None } else { (inner.users)(approver.uid) };
            let store = inner.store();
            let decision = Decision {
                id,
                approver: &approver,
                verdict,
                comment: comment.as_deref(),
                caller_user: caller_user.as_deref(),
            };
            let (view, decision) = store.decide(&decision, &inner.config.groups, OffsetDateTime::now_utc())?;
            if let Some(outcome) = view.outcome() {
                if !inner.waiters.resolve(id, outcome) {
                    tracing::warn!(target: TARGET, id = %id, "approval decided but no held request was waiting for it");
                }
            }
            Ok::<_, ApprovalError>((view, decision))
        })
        .await
        .map_err(|e| ApprovalError::TaskLost(e.to_string()))??;
        tracing::info!(
            target: TARGET,
            id = %id, verdict = %decision.verdict, by = %decision.recorded_as, uid = decision.uid, pid = decision.pid,
            state = %view.state,
            "approval decision recorded"
        );
        self.inner.emit(EventKind::ApprovalDecided, view.clone(), Some(decision));
        Ok(view)
    }

    /// Requests matching `filter`, newest first.
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<ApprovalView>, ApprovalError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.store().list(&filter))
            .await
            .map_err(|e| ApprovalError::TaskLost(e.to_string()))?
    }

    /// One request with its decisions.
    pub async fn get(&self, id: ApprovalId) -> Result<Option<ApprovalView>, ApprovalError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.store().get(id))
            .await
            .map_err(|e| ApprovalError::TaskLost(e.to_string()))?
    }
}

/// Where a [`Approvals::request`] call stands, shared with its drop guard.
#[derive(Debug, Default)]
struct Ticket {
    /// Set once the request is stored.
    id: Option<ApprovalId>,
    /// Set when the caller stopped waiting.
    cancelled: bool,
}

fn lock(ticket: &Mutex<Ticket>) -> MutexGuard<'_, Ticket> {
    ticket.lock().unwrap_or_else(|e| e.into_inner())
}

/// Marks the request abandoned when the future of
/// [`Approvals::request`] is dropped before it resolved.
struct AbandonOnDrop {
    inner: Arc<Inner>,
    ticket: Arc<Mutex<Ticket>>,
    armed: bool,
}

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Whoever sees the other's mark handles the abandonment: the storing
        // task if it has not finished yet, this guard otherwise.
        let id = {
            let mut ticket = lock(&self.ticket);
            ticket.cancelled = true;
            ticket.id
        };
        let Some(id) = id else { return };
        let inner = self.inner.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(move || inner.abandon(id));
            }
            Err(_) => inner.abandon(id),
        }
    }
}
