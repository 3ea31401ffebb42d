//! Retention in the central store (`gateway store prune`): what every host
//! shipped stays until an operator prunes it, and pruning removes only
//! what can no longer change or be decided, whole:
//!
//! * sessions that **ended** before the cut-off, each with every one of its
//!   records, so a chain is either whole (and verifies) or gone; an open or
//!   interrupted session (no `ended`) is kept whatever its age;
//! * approval requests **finished and past their expiry** before the
//!   cut-off, with their decisions and the central decisions taken for
//!   them; a pending request is kept whatever its age;
//! * central decisions the holding host has **answered** (`outcome` set)
//!   before the cut-off.
//!
//! Findings, their sightings and review history are never pruned: they are
//! the fleet's memory of which keys leaked where (a finding is one row per
//! key and rule; the volume is in sessions).
//!
//! One transaction; a dry run makes the same deletions and rolls back, so
//! its counts are exact.

use tokio_postgres::Client;

use super::{central, FleetError};

/// What a prune removed (or, dry, would remove).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Pruned {
    /// Ended sessions.
    pub sessions: u64,
    /// Their records.
    pub records: u64,
    /// Finished approval requests.
    pub approvals: u64,
    /// Their decisions, as the holding hosts recorded them.
    pub decisions: u64,
    /// Central decisions (for those requests, or answered ones).
    pub central_decisions: u64,
}

/// Prunes what the store holds from before `before` (Unix nanoseconds);
/// with `dry_run`, counts it and changes nothing.
pub async fn prune(client: &mut Client, before: i64, dry_run: bool) -> Result<Pruned, FleetError> {
    central::check_schema(client).await?;
    let tx = client.transaction().await.map_err(FleetError::pg("starting the prune"))?;
    let count = |row: &tokio_postgres::Row, i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
    let row = tx
        .query_one(
            "WITH s AS (DELETE FROM sessions WHERE ended IS NOT NULL AND ended < $1 RETURNING host_id, id),
                  r AS (DELETE FROM records USING s WHERE records.host_id = s.host_id AND records.session = s.id
                        RETURNING 1)
             SELECT (SELECT count(*) FROM s), (SELECT count(*) FROM r)",
            &[&before],
        )
        .await
        .map_err(FleetError::pg("pruning sessions"))?;
    let (sessions, records) = (count(&row, 0), count(&row, 1));
    let row = tx
        .query_one(
            "WITH a AS (DELETE FROM approvals WHERE state <> 'pending' AND expires_at < $1
                        RETURNING host_id, local_id),
                  d AS (DELETE FROM decisions USING a
                        WHERE decisions.host_id = a.host_id AND decisions.approval_local_id = a.local_id RETURNING 1),
                  c AS (DELETE FROM central_decisions c USING a
                        WHERE c.host_id = a.host_id AND c.approval_local_id = a.local_id RETURNING 1)
             SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM d), (SELECT count(*) FROM c)",
            &[&before],
        )
        .await
        .map_err(FleetError::pg("pruning approval requests"))?;
    let (approvals, decisions, for_requests) = (count(&row, 0), count(&row, 1), count(&row, 2));
    let answered = tx
        .execute("DELETE FROM central_decisions WHERE outcome IS NOT NULL AND decided_at < $1", &[&before])
        .await
        .map_err(FleetError::pg("pruning central decisions"))?;
    if dry_run {
        tx.rollback().await.map_err(FleetError::pg("ending the dry run"))?;
    } else {
        tx.commit().await.map_err(FleetError::pg("committing the prune"))?;
    }
    Ok(Pruned { sessions, records, approvals, decisions, central_decisions: for_requests + answered })
}
