//! Reading the central store for reviewers: every host's sessions and the
//! fleet's findings (one per key and rule, with the hosts that saw it), for
//! `gateway sessions list --store` and `gateway findings list --store`.

use tokio_postgres::Client;

use super::FleetError;

/// One session in the central store.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CentralSession {
    /// The host that recorded it.
    pub host_id: String,
    /// Session id (unique on its host).
    pub id: String,
    /// Start, Unix nanoseconds.
    pub started: i64,
    /// The caller's identity.
    pub identity: String,
    /// Destination host.
    pub host: String,
    /// Protocol as recorded.
    pub protocol: String,
    /// How it ended; `None` while open or interrupted (or not shipped yet).
    pub outcome: Option<String>,
    /// Records shipped.
    pub records: u64,
}

/// One finding in the central store.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CentralFinding {
    /// Central id.
    pub id: i64,
    /// The key's HMAC fingerprint.
    pub fingerprint: String,
    /// Detection rule.
    pub rule_id: String,
    /// Redacted preview.
    pub preview: String,
    /// First sighting anywhere, Unix nanoseconds.
    pub first_seen: i64,
    /// Latest sighting anywhere, Unix nanoseconds.
    pub last_seen: i64,
    /// Sightings on every host.
    pub sightings: u64,
    /// Each host that saw it: its local finding id and review status.
    pub hosts: Vec<HostView>,
}

/// A host's view of a central finding.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostView {
    /// The host.
    pub host_id: String,
    /// Its local finding id (`F-n` there).
    pub local_id: i64,
    /// Its review status there.
    pub status: String,
}

/// The newest `limit` sessions (of `host` only, if given).
pub async fn sessions(client: &Client, host: Option<&str>, limit: i64) -> Result<Vec<CentralSession>, FleetError> {
    let rows = client
        .query(
            "SELECT s.host_id, s.id, s.started, s.identity, s.host, s.protocol, s.outcome,
                    (SELECT count(*) FROM records r WHERE r.host_id = s.host_id AND r.session = s.id)
             FROM sessions s WHERE $1::text IS NULL OR s.host_id = $1
             ORDER BY s.started DESC, s.host_id, s.id LIMIT $2",
            &[&host, &limit],
        )
        .await
        .map_err(FleetError::pg("listing sessions"))?;
    Ok(rows
        .iter()
        .map(|r| CentralSession {
            host_id: r.get(0),
            id: r.get(1),
            started: r.get(2),
            identity: r.get(3),
            host: r.get(4),
            protocol: r.get(5),
            outcome: r.get(6),
            records: r.get::<_, i64>(7).max(0) as u64,
        })
        .collect())
}

/// Every central finding, most recently seen first.
pub async fn findings(client: &Client) -> Result<Vec<CentralFinding>, FleetError> {
    let rows = client
        .query(
            "SELECT f.id, f.fingerprint, f.rule_id, f.preview, f.first_seen, f.last_seen,
                    (SELECT count(*) FROM sightings s WHERE s.finding_id = f.id),
                    coalesce(array_agg(h.host_id ORDER BY h.host_id) FILTER (WHERE h.host_id IS NOT NULL), '{}'),
                    coalesce(array_agg(h.local_id ORDER BY h.host_id) FILTER (WHERE h.host_id IS NOT NULL), '{}'),
                    coalesce(array_agg(h.status ORDER BY h.host_id) FILTER (WHERE h.host_id IS NOT NULL), '{}')
             FROM findings f LEFT JOIN host_findings h ON h.finding_id = f.id
             GROUP BY f.id ORDER BY f.last_seen DESC, f.id",
            &[],
        )
        .await
        .map_err(FleetError::pg("listing findings"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let hosts: Vec<String> = r.get(7);
            let ids: Vec<i64> = r.get(8);
            let statuses: Vec<String> = r.get(9);
            CentralFinding {
                id: r.get(0),
                fingerprint: r.get(1),
                rule_id: r.get(2),
                preview: r.get(3),
                first_seen: r.get(4),
                last_seen: r.get(5),
                sightings: r.get::<_, i64>(6).max(0) as u64,
                hosts: hosts
                    .into_iter()
                    .zip(ids)
                    .zip(statuses)
                    .map(|((host_id, local_id), status)| HostView { host_id, local_id, status })
                    .collect(),
            }
        })
        .collect())
}
