//! Verifying the hash chains held by the central store, with the same check
//! as the local store (`record::chain`): an edited record breaks its hash
//! or the next one's `prev_hash`, a removed one breaks seq continuity or
//! the session row's tail, a removed session row leaves orphaned records.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use super::FleetError;
use crate::record::{Record, SessionId, SessionRow, Verdict};

/// One central session that failed verification.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Broken {
    /// The host that shipped it.
    pub host_id: String,
    /// The session id.
    pub session: String,
    /// What is wrong.
    pub problem: String,
}

/// The outcome of verifying the central store.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Sessions checked.
    pub checked: u64,
    /// Those that failed, and orphaned records (no session row).
    pub broken: Vec<Broken>,
}

impl Report {
    /// Every session intact and no orphaned records.
    pub fn is_intact(&self) -> bool {
        self.broken.is_empty()
    }
}

/// Verifies every session in the central store (of `host` only, if given).
pub async fn verify_central(client: &Client, host: Option<&str>) -> Result<Report, FleetError> {
    super::central::check_schema(client).await?;
    let hosts: Vec<String> = match host {
        Some(h) => vec![h.to_owned()],
        None => client
            .query("SELECT DISTINCT host_id FROM sessions UNION SELECT DISTINCT host_id FROM records ORDER BY 1", &[])
            .await
            .map_err(FleetError::pg("listing hosts"))?
            .iter()
            .map(|r| r.get(0))
            .collect(),
    };
    let mut report = Report::default();
    for host in hosts {
        verify_host(client, &host, &mut report).await?;
    }
    Ok(report)
}

async fn verify_host(client: &Client, host: &str, report: &mut Report) -> Result<(), FleetError> {
    // One snapshot for both reads: a host shipping meanwhile adds whole
    // batches, and the two reads must agree on which.
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(FleetError::pg("starting a read"))?;
    let result = read_and_verify(client, host, report).await;
    let end = client.batch_execute("COMMIT").await.map_err(FleetError::pg("ending a read"));
    result.and(end)
}

async fn read_and_verify(client: &Client, host: &str, report: &mut Report) -> Result<(), FleetError> {
    let sessions = client
        .query(
            "SELECT id, conn_id, started, identity, host, orig_dst, protocol, pid, comm, meta, exchanges, last_seq,
                    last_hash, last_ts, ended, bytes_up, bytes_down, outcome
             FROM sessions WHERE host_id = $1 ORDER BY started, id",
            &[&host],
        )
        .await
        .map_err(FleetError::pg("reading sessions"))?;
    let mut records: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    for r in client
        .query(
            "SELECT session, seq, ts, kind, data, prev_hash, hash FROM records WHERE host_id = $1 ORDER BY session, seq",
            &[&host],
        )
        .await
        .map_err(FleetError::pg("reading records"))?
    {
        let session: String = r.get(0);
        let seq: i64 = r.get(1);
        records.entry(session.clone()).or_default().push(Record {
            session: SessionId::from_stored(session),
            seq: seq as u64,
            ts: r.get(2),
            kind: r.get(3),
            data: r.get(4),
            prev_hash: r.get(5),
            hash: r.get(6),
        });
    }
    for s in sessions {
        let id: String = s.get(0);
        let row = SessionRow {
            id: SessionId::from_stored(id.clone()),
            conn_id: s.get::<_, i64>(1) as u64,
            started: s.get(2),
            identity: s.get(3),
            host: s.get(4),
            orig_dst: s.get(5),
            protocol: s.get(6),
            pid: u32::try_from(s.get::<_, i64>(7)).unwrap_or(u32::MAX),
            comm: s.get(8),
            meta: s.get(9),
            exchanges: s.get::<_, i64>(10) as u64,
            last_seq: s.get::<_, i64>(11) as u64,
            last_hash: s.get(12),
            last_ts: s.get(13),
            ended: s.get(14),
            bytes_up: s.get::<_, Option<i64>>(15).map(|n| n as u64),
            bytes_down: s.get::<_, Option<i64>>(16).map(|n| n as u64),
            outcome: s.get(17),
        };
        let chain = records.remove(&id).unwrap_or_default();
        report.checked += 1;
        if let verdict @ Verdict::Broken { .. } = crate::record::verify_chain(&row, &chain) {
            report.broken.push(Broken { host_id: host.to_owned(), session: id, problem: verdict.to_string() });
        }
    }
    for session in records.into_keys() {
        report.broken.push(Broken {
            host_id: host.to_owned(),
            session,
            problem: "BROKEN: records without a sessions row (the row was deleted)".into(),
        });
    }
    Ok(())
}
