//! Central approvals: a request held on one host (shipped to the central
//! store's `approvals` while pending) is decided from any host's CLI, and
//! the decision reaches the holding host within moments.
//!
//! * Deciding ([`decide`], `gateway approvals approve|deny --store`): the
//!   CLI reads the request as the store holds it (its group, requesters,
//!   state and the decisions so far), runs the same rules the local admin
//!   API runs ([`crate::approval::rules::authorize`]) against its own
//!   `approvals.groups`, and inserts a row into `central_decisions`. A
//!   trigger in the same transaction notifies the channel [`CHANNEL`] with
//!   the holding host's id.
//! * Applying ([`Applier`], in the running gateway): the holding host
//!   LISTENs on [`CHANNEL`], and reads its unapplied rows when notified and
//!   every `fleet.approval_poll` besides (a lost notification, a reconnect).
//!   Each row goes through the local approval service
//!   ([`Approvals::decide`](crate::approval::Approvals::decide)) as an
//!   approver vouched for by the store ([`Vouched::Central`]), so group
//!   membership, the no-self-approval rule and distinct approvers are
//!   checked again here, against this host's own configuration and its own
//!   record of the request: a row nobody's CLI would have written (inserted
//!   by hand, by a compromised host) is rejected with an event. What the
//!   host did is written back to the row (`outcome`); the local decision
//!   ships like any other (stream `decisions`), never as a new central
//!   decision, so nothing loops.
//! * When the store is unreachable the local path (the admin socket) works
//!   as always; the applier says so (event, `gateway status`) and catches
//!   up when the store is back.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{central, FleetConfig, FleetError, FLEET_TARGET};
use crate::approval::{
    rules, ApprovalError, ApprovalId, ApprovalView, Approvals, Approver, DecisionView, State, Verdict, Vouched,
};

/// The PostgreSQL notification channel of new central decisions; the
/// payload is the holding host's id.
pub const CHANNEL: &str = "ci_gateway_decisions";

/// File in `state_dir` where the running gateway says whether central
/// approvals are available (read by `gateway status`).
pub const STATUS_FILE: &str = "central-approvals.json";

/// Longest comment a central decision may carry (as locally).
const MAX_COMMENT: usize = 1000;

/// First wait before reconnecting.
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Central decisions applied per read.
const APPLY_BATCH: i64 = 100;

/// What the holding host did with a central decision (`outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Applied {
    /// Recorded locally through the approval service's rules.
    Applied,
    /// Refused by the holding host's rules (not a member, self-approval,
    /// already decided by that approver, no such request...).
    Rejected,
    /// The request was no longer pending (decided, timed out or abandoned
    /// meanwhile): nothing to apply.
    Stale,
}

impl Applied {
    /// The name stored in `central_decisions.outcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            Applied::Applied => "applied",
            Applied::Rejected => "rejected",
            Applied::Stale => "stale",
        }
    }

    fn parse(s: &str) -> Option<Applied> {
        [Applied::Applied, Applied::Rejected, Applied::Stale].into_iter().find(|a| a.as_str() == s)
    }
}

// ---------- deciding centrally (the CLI) ----------

/// A decision to take through the central store.
#[derive(Debug, Clone, Copy)]
pub struct CentralDecision<'a> {
    /// The host holding the request; `None` when its local id is unique
    /// among the store's pending requests.
    pub host_id: Option<&'a str>,
    /// Its id on that host.
    pub id: ApprovalId,
    /// Approve or deny.
    pub verdict: Verdict,
    /// The named approver (`--by`, or the console's signed-in user).
    pub by: &'a str,
    /// Who vouches for `by` on the deciding host: the kernel (the CLI) or
    /// the identity provider (the console).
    pub vouched: &'a Vouched,
    /// Unix uid of the deciding process.
    pub uid: u32,
    /// The user name of `uid` on the deciding host.
    pub caller_user: Option<&'a str>,
    /// The approver's comment.
    pub comment: Option<&'a str>,
    /// This (the deciding) host's id.
    pub decided_on: &'a str,
}

/// A decision recorded in the central store.
#[derive(Debug, Clone)]
pub struct Decided {
    /// Its row in `central_decisions`.
    pub decision_id: i64,
    /// The holding host.
    pub host_id: String,
    /// The request as the store held it before the decision.
    pub view: ApprovalView,
}

/// Why a central decision was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// The store could not be asked.
    #[error(transparent)]
    Store(#[from] FleetError),
    /// The rules refused it (exit status 1, like a local refusal).
    #[error(transparent)]
    Refused(#[from] ApprovalError),
}

/// Checks `d` against the request as the store holds it and the approver
/// `groups` of this host's configuration, and records it in
/// `central_decisions` (which notifies the holding host).
pub async fn decide(
    client: &mut Client,
    groups: &BTreeMap<String, Vec<String>>,
    d: &CentralDecision<'_>,
) -> Result<Decided, DecideError> {
    let comment = d.comment.map(str::trim).filter(|c| !c.is_empty());
    if comment.is_some_and(|c| c.len() > MAX_COMMENT) {
        return Err(ApprovalError::Invalid(format!("comments are at most {MAX_COMMENT} bytes")).into());
    }
    central::check_schema(client).await?;
    let tx = client.transaction().await.map_err(FleetError::pg("starting a decision"))?;
    // Locked: two approvers deciding at once are counted one after the other.
    let rows = tx
        .query(
            "SELECT host_id, state, rule, approver_group, min_approvals, identity, requesters, method, url,
                    destination, created_at, expires_at
             FROM approvals WHERE local_id = $1 AND ($2::text IS NULL OR host_id = $2)
               AND ($2::text IS NOT NULL OR state = 'pending')
             FOR UPDATE",
            &[&d.id.0, &d.host_id],
        )
        .await
        .map_err(FleetError::pg("reading the approval request"))?;
    let row = match rows.as_slice() {
        [row] => row,
        [] => return Err(ApprovalError::NotFound(d.id).into()),
        more => {
            let hosts: Vec<String> = more.iter().map(|r| r.get::<_, String>(0)).collect();
            return Err(ApprovalError::Invalid(format!(
                "{} is pending on several hosts ({}): name one with --host-id",
                d.id,
                hosts.join(", ")
            ))
            .into());
        }
    };
    let host_id: String = row.get(0);
    let mut view = central_view(d.id, row)?;
    let decisions = tx
        .query(
            "SELECT verdict, approver FROM decisions WHERE host_id = $1 AND approval_local_id = $2
             UNION ALL
             SELECT verdict, approver FROM central_decisions
             WHERE host_id = $1 AND approval_local_id = $2 AND (outcome IS NULL OR outcome = 'applied')",
            &[&host_id, &d.id.0],
        )
        .await
        .map_err(FleetError::pg("reading the decisions"))?;
    for r in decisions {
        let verdict = match r.get::<_, &str>(0) {
            "approve" => Verdict::Approve,
            _ => Verdict::Deny,
        };
        let approver: String = r.get(1);
        view.decisions.push(DecisionView {
            verdict,
            recorded_as: approver.clone(),
            approver,
            uid: 0,
            pid: 0,
            identity: None,
            comment: None,
            at: OffsetDateTime::UNIX_EPOCH,
        });
    }
    let approver = Approver {
        name: d.by.to_owned(),
        uid: d.uid,
        pid: std::process::id(),
        identity: None,
        vouched: d.vouched.clone(),
    };
    let who = rules::authorize(&view, &approver, d.verdict, d.caller_user, groups)?;
    let now = nanos(OffsetDateTime::now_utc());
    let decision_id: i64 = tx
        .query_one(
            "INSERT INTO central_decisions (host_id, approval_local_id, verdict, approver, uid, decided_on, comment,
                                            decided_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
            &[&host_id, &d.id.0, &d.verdict.as_str(), &who.name, &i64::from(d.uid), &d.decided_on, &comment, &now],
        )
        .await
        .map_err(FleetError::pg("recording the decision"))?
        .get(0);
    tx.commit().await.map_err(FleetError::pg("committing the decision"))?;
    Ok(Decided { decision_id, host_id, view })
}

/// The central row of a request as an [`ApprovalView`] with what the rules
/// read (the rest is left empty). A request past its expiry counts as
/// timed out even if the host has not said so yet.
fn central_view(id: ApprovalId, row: &tokio_postgres::Row) -> Result<ApprovalView, ApprovalError> {
    let bad =
        |field: &str, e: String| ApprovalError::Invalid(format!("{id}: the central store's {field} is invalid: {e}"));
    let mut state: State = row.get::<_, &str>(1).parse().map_err(|e| bad("state", e))?;
    let expires_at = from_nanos(row.get(11)).map_err(|e| bad("expires_at", e))?;
    if state == State::Pending && expires_at <= OffsetDateTime::now_utc() {
        state = State::TimedOut;
    }
    Ok(ApprovalView {
        id,
        state,
        rule: row.get(2),
        group: row.get(3),
        min_approvals: u32::try_from(row.get::<_, i32>(4)).map_err(|e| bad("min_approvals", e.to_string()))?,
        identity: row.get(5),
        identity_labels: BTreeMap::new(),
        process: Default::default(),
        job: BTreeMap::new(),
        session_id: None,
        method: row.get(7),
        url: row.get(8),
        destination: row.get(9),
        body_preview: String::new(),
        requesters: serde_json::from_str(row.get(6)).map_err(|e| bad("requesters", e.to_string()))?,
        created_at: from_nanos(row.get(10)).map_err(|e| bad("created_at", e))?,
        expires_at,
        finished_at: None,
        decisions: Vec::new(),
    })
}

/// Waits up to `timeout` for the holding host to apply decision `id`:
/// what it did and why, or `None` when it has not yet.
pub async fn wait_applied(
    client: &Client,
    id: i64,
    timeout: Duration,
) -> Result<Option<(Applied, Option<String>)>, FleetError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let row = client
            .query_one("SELECT outcome, outcome_reason FROM central_decisions WHERE id = $1", &[&id])
            .await
            .map_err(FleetError::pg("reading the decision's outcome"))?;
        if let Some(applied) = row.get::<_, Option<&str>>(0).and_then(Applied::parse) {
            return Ok(Some((applied, row.get(1))));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One approval request in the central store, for `approvals list --store`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CentralApproval {
    /// The host holding it.
    pub host_id: String,
    /// Its id there.
    pub id: ApprovalId,
    /// Its state as last shipped.
    pub state: String,
    /// The policy rule.
    pub rule: String,
    /// The approver group.
    pub group: String,
    /// Distinct approvals needed.
    pub min_approvals: i32,
    /// The requesting identity.
    pub identity: String,
    /// HTTP method.
    pub method: String,
    /// URL (masked).
    pub url: String,
    /// When it was requested.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// The store's approval requests (in `state` if given), newest first.
pub async fn list(client: &Client, state: Option<State>, limit: usize) -> Result<Vec<CentralApproval>, FleetError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "SELECT host_id, local_id, state, rule, approver_group, min_approvals, identity, method, url, created_at
             FROM approvals WHERE $1::text IS NULL OR state = $1 ORDER BY created_at DESC LIMIT $2",
            &[&state.map(State::as_str), &limit],
        )
        .await
        .map_err(FleetError::pg("listing approval requests"))?;
    Ok(rows
        .iter()
        .map(|r| CentralApproval {
            host_id: r.get(0),
            id: ApprovalId(r.get(1)),
            state: r.get(2),
            rule: r.get(3),
            group: r.get(4),
            min_approvals: r.get(5),
            identity: r.get(6),
            method: r.get(7),
            url: r.get(8),
            created_at: from_nanos(r.get(9)).unwrap_or(OffsetDateTime::UNIX_EPOCH),
        })
        .collect())
}

/// How many central decisions for `host_id` the host has not applied yet.
pub async fn unapplied(client: &Client, host_id: &str) -> Result<i64, FleetError> {
    client
        .query_one("SELECT count(*) FROM central_decisions WHERE host_id = $1 AND outcome IS NULL", &[&host_id])
        .await
        .map(|r| r.get(0))
        .map_err(FleetError::pg("counting unapplied central decisions"))
}

// ---------- applying on the holding host ----------

/// Whether this gateway can currently receive central decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Availability {
    /// Connected and listening: decisions taken on other hosts arrive.
    Available,
    /// The store cannot be reached (or its schema does not fit): only
    /// decisions taken on this host count until it is back.
    Unavailable,
}

/// What `state_dir/central-approvals.json` says (written by the running
/// gateway at every change, read by `gateway status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CentralStatus {
    /// Available or not.
    pub state: Availability,
    /// Since when.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// Why not, when unavailable.
    pub error: Option<String>,
    /// The gateway process that wrote it (a stale file names a gone one).
    pub pid: u32,
}

/// Reads the running gateway's central-approvals status from `state_dir`.
pub fn read_status(state_dir: &Path) -> Option<CentralStatus> {
    let text = std::fs::read(state_dir.join(STATUS_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Applies central decisions to the requests held on this host.
pub struct Applier {
    config: FleetConfig,
    host_id: String,
    approvals: Approvals,
    status_path: PathBuf,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier").field("host_id", &self.host_id).finish_non_exhaustive()
    }
}

impl Applier {
    /// Prepares applying for `config` (whose `fleet.store` is set) through
    /// the gateway's approval service.
    pub fn new(config: &crate::config::Config, approvals: Approvals) -> Result<Applier, FleetError> {
        if !config.fleet.enabled() {
            return Err(FleetError::NotConfigured);
        }
        Ok(Applier {
            config: config.fleet.clone(),
            host_id: config.fleet.host_id()?,
            approvals,
            status_path: config.state_dir.join(STATUS_FILE),
        })
    }

    /// Listens and applies until `shutdown`; reconnects with a backoff
    /// while the store is unreachable (saying so once per distinct error).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut last_error: Option<String> = None;
        let mut backoff = FIRST_RETRY;
        // Unknown until the first connection says otherwise.
        self.set_status(Availability::Unavailable, Some("connecting to the central store".into()));
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.session(&shutdown, &mut last_error) => r,
            };
            match result {
                Ok(()) => break,
                Err(e) => {
                    // A fresh failure (first, or after being connected)
                    // retries soon; a repeated one backs off.
                    backoff = if last_error.is_none() { FIRST_RETRY } else { (backoff * 2).min(MAX_BACKOFF) };
                    let text = e.to_string();
                    if last_error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(target: FLEET_TARGET, kind = "central_approvals_unavailable", host_id = %self.host_id, error = %text, "central approvals unavailable: requests held here can be decided on this host only (gateway approvals approve|deny) until the store is back");
                        self.set_status(Availability::Unavailable, Some(text.clone()));
                        last_error = Some(text);
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
        }
        let _ = std::fs::remove_file(&self.status_path);
    }

    /// One connection: listen, then apply on every notification for this
    /// host and every `approval_poll`, until the connection fails.
    async fn session(&self, shutdown: &CancellationToken, last_error: &mut Option<String>) -> Result<(), FleetError> {
        let (client, mut notes) = central::connect_listening(&self.config).await?;
        central::check_schema(&client).await?;
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(FleetError::pg("listening"))?;
        if let Some(previous) = last_error.take() {
            tracing::info!(target: FLEET_TARGET, kind = "central_approvals_available", host_id = %self.host_id, previous_error = %previous, "central approvals available again");
        } else {
            tracing::info!(target: FLEET_TARGET, kind = "central_approvals_available", host_id = %self.host_id, "central approvals available: listening for decisions taken on other hosts");
        }
        self.set_status(Availability::Available, None);
        loop {
            // Whatever arrived while we were not listening (or in a lost
            // notification) is read here too.
            self.apply_pending(&client).await?;
            let poll = tokio::time::sleep(self.config.approval_poll);
            tokio::pin!(poll);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = &mut poll => break,
                    note = notes.recv() => match note {
                        Some(n) if n.payload() == self.host_id => break,
                        // Another host's decision.
                        Some(_) => {}
                        None => return Err(FleetError::Closed("listening for decisions")),
                    },
                }
            }
        }
    }

    /// Applies this host's unapplied central decisions, oldest first.
    async fn apply_pending(&self, client: &Client) -> Result<(), FleetError> {
        let rows = client
            .query(
                "SELECT id, approval_local_id, verdict, approver, uid, decided_on, comment, decided_at
                 FROM central_decisions WHERE host_id = $1 AND outcome IS NULL ORDER BY id LIMIT $2",
                &[&self.host_id, &APPLY_BATCH],
            )
            .await
            .map_err(FleetError::pg("reading central decisions"))?;
        for row in rows {
            let id: i64 = row.get(0);
            let local_id: i64 = row.get(1);
            let incoming = Incoming {
                approval: ApprovalId(local_id),
                verdict: row.get(2),
                approver: row.get(3),
                uid: row.get(4),
                decided_on: row.get(5),
                comment: row.get(6),
                decided_at: row.get(7),
            };
            let (applied, reason) = match self.apply(&incoming).await {
                Some(result) => result,
                // A local failure (the approvals database): try again later.
                None => continue,
            };
            client
                .execute(
                    "UPDATE central_decisions SET outcome = $2, outcome_reason = $3, applied_at = $4
                     WHERE id = $1 AND outcome IS NULL",
                    &[&id, &applied.as_str(), &reason, &nanos(OffsetDateTime::now_utc())],
                )
                .await
                .map_err(FleetError::pg("recording what became of a central decision"))?;
        }
        Ok(())
    }

    /// Runs one central decision through the local approval service.
    /// `None` when it could not be decided either way (retried).
    async fn apply(&self, d: &Incoming) -> Option<(Applied, Option<String>)> {
        let verdict = match d.verdict.as_str() {
            "approve" => Verdict::Approve,
            "deny" => Verdict::Deny,
            other => {
                let reason = format!("`{}` is not a verdict", crate::term::safe(other));
                return Some(self.rejected(d, reason));
            }
        };
        let Ok(uid) = u32::try_from(d.uid) else {
            return Some(self.rejected(d, format!("uid {} is not a unix uid", d.uid)));
        };
        let approver = Approver {
            name: d.approver.clone(),
            uid,
            pid: 0,
            identity: None,
            vouched: Vouched::Central { host: d.decided_on.clone() },
        };
        match self.approvals.decide(d.approval, verdict, approver, d.comment.clone()).await {
            Ok(view) => {
                let latency_ms =
                    (OffsetDateTime::now_utc().unix_timestamp_nanos() - i128::from(d.decided_at)) / 1_000_000;
                tracing::info!(
                    target: FLEET_TARGET, kind = "central_decision_applied",
                    id = %d.approval, verdict = %verdict, by = %d.approver, decided_on = %d.decided_on,
                    state = %view.state, latency_ms = i64::try_from(latency_ms).unwrap_or(i64::MAX),
                    "central decision applied"
                );
                Some((Applied::Applied, None))
            }
            Err(ApprovalError::AlreadyFinished { state, .. }) => {
                tracing::info!(target: FLEET_TARGET, kind = "central_decision_stale", id = %d.approval, by = %d.approver, decided_on = %d.decided_on, %state, "central decision arrived after the request finished; nothing to apply");
                Some((Applied::Stale, Some(format!("{} is already {state}", d.approval))))
            }
            Err(
                e @ (ApprovalError::NotAllowed(_)
                | ApprovalError::Invalid(_)
                | ApprovalError::NotFound(_)
                | ApprovalError::AlreadyDecided { .. }),
            ) => Some(self.rejected(d, e.to_string())),
            Err(e) => {
                tracing::error!(target: FLEET_TARGET, id = %d.approval, error = %e, "cannot apply a central decision; retrying");
                None
            }
        }
    }

    fn rejected(&self, d: &Incoming, reason: String) -> (Applied, Option<String>) {
        tracing::warn!(
            target: FLEET_TARGET, kind = "central_decision_rejected",
            id = %d.approval, verdict = %crate::term::safe(&d.verdict), by = %crate::term::safe(&d.approver),
            decided_on = %crate::term::safe(&d.decided_on), %reason,
            "central decision rejected by this host's approval rules; the request stays held"
        );
        (Applied::Rejected, Some(reason))
    }

    /// Writes the status file (atomically; a failure is only logged).
    fn set_status(&self, state: Availability, error: Option<String>) {
        let status = CentralStatus { state, since: OffsetDateTime::now_utc(), error, pid: std::process::id() };
        let write = || -> std::io::Result<()> {
            let tmp = self.status_path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(&status).map_err(std::io::Error::other)?)?;
            std::fs::rename(&tmp, &self.status_path)
        };
        if let Err(e) = write() {
            tracing::warn!(target: FLEET_TARGET, path = %self.status_path.display(), error = %e, "cannot write the central approvals status");
        }
    }
}

/// A central decision as read from the store (untrusted).
#[derive(Debug)]
struct Incoming {
    approval: ApprovalId,
    verdict: String,
    approver: String,
    uid: i64,
    decided_on: String,
    comment: Option<String>,
    decided_at: i64,
}

fn nanos(t: OffsetDateTime) -> i64 {
    let n = t.unix_timestamp_nanos();
    i64::try_from(n).unwrap_or(if n < 0 { i64::MIN } else { i64::MAX })
}

fn from_nanos(n: i64) -> Result<OffsetDateTime, String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(n)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip_and_unknown_ones_are_not_taken() {
        for a in [Applied::Applied, Applied::Rejected, Applied::Stale] {
            assert_eq!(Applied::parse(a.as_str()), Some(a));
        }
        assert_eq!(Applied::parse("approved"), None);
    }

    #[test]
    fn the_status_file_is_read_back_and_a_missing_or_damaged_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_status(dir.path()), None);
        let status = CentralStatus {
            state: Availability::Unavailable,
            since: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            error: Some("central store: connecting: refused".into()),
            pid: 42,
        };
        std::fs::write(dir.path().join(STATUS_FILE), serde_json::to_vec(&status).unwrap()).unwrap();
        assert_eq!(read_status(dir.path()), Some(status));
        std::fs::write(dir.path().join(STATUS_FILE), b"{").unwrap();
        assert_eq!(read_status(dir.path()), None);
    }
}
