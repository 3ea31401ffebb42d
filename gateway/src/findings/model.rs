//! The findings data model, shared by the store, the exports and the CLI.

use serde::{Deserialize, Serialize, Serializer};
use time::OffsetDateTime;

use super::Action;
use crate::process::ProcessSnapshot;

/// Identifier of a finding; shown (and accepted) as `F-<n>`, the form the
/// proxy puts in its 403 responses and reviewers put in tickets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FindingId(pub i64);

impl std::fmt::Display for FindingId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "F-{}", self.0)
    }
}

impl std::str::FromStr for FindingId {
    type Err = String;

    /// Accepts `F-12`, `f-12` and `12`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix("F-").or_else(|| s.strip_prefix("f-")).unwrap_or(s);
        match digits.parse::<i64>() {
            Ok(n) if n > 0 && digits.bytes().all(|b| b.is_ascii_digit()) => Ok(FindingId(n)),
            _ => Err(format!("`{s}` is not a finding id (F-<number>)")),
        }
    }
}

impl Serialize for FindingId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FindingId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Review status of a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Seen and not yet looked at (or seen again after it was resolved).
    Open,
    /// A reviewer has seen it; rotation is under way.
    Acknowledged,
    /// The key has been rotated.
    Resolved,
    /// Not a real key (test fixture, documentation example...).
    FalsePositive,
}

impl Status {
    /// Every status, in workflow order.
    pub const ALL: [Status; 4] = [Status::Open, Status::Acknowledged, Status::Resolved, Status::FalsePositive];

    /// The name used in the database, exports and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Open => "open",
            Status::Acknowledged => "acknowledged",
            Status::Resolved => "resolved",
            Status::FalsePositive => "false_positive",
        }
    }

    /// Statuses a reviewer may move a finding to from this one.
    ///
    /// Closed findings (resolved, false positive) can only be reopened, so a
    /// closing decision is never silently replaced by another one; reopening
    /// an acknowledged finding undoes an acknowledgement made by mistake.
    pub fn allowed_next(self) -> &'static [Status] {
        match self {
            Status::Open => &[Status::Acknowledged, Status::Resolved, Status::FalsePositive],
            Status::Acknowledged => &[Status::Open, Status::Resolved, Status::FalsePositive],
            Status::Resolved | Status::FalsePositive => &[Status::Open],
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Status {
    type Err = String;

    /// Accepts the stored names and the CLI spellings (`ack`, `false-positive`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "open" => Ok(Status::Open),
            "acknowledged" | "ack" => Ok(Status::Acknowledged),
            "resolved" => Ok(Status::Resolved),
            "false_positive" | "fp" => Ok(Status::FalsePositive),
            _ => Err(format!("`{s}` is not a status (open, acknowledged, resolved, false_positive)")),
        }
    }
}

/// A sighting of a static key, as handed to the store by the proxy.
///
/// There is deliberately no field for the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFinding {
    /// Id of the detection rule that matched.
    pub rule_id: String,
    /// Detector confidence (`high`, `medium`...).
    pub confidence: String,
    /// HMAC fingerprint of the key (the dedup key; never reversible).
    pub fingerprint: String,
    /// Redacted preview computed by the detector (`sk-ab…9xyz`).
    pub preview: String,
    /// Where in the request: `header:authorization`, `query:api_key`, `body:$.token`.
    pub location: String,
    /// Destination host (SNI / Host); compared case-insensitively.
    pub dest_host: String,
    /// Destination port.
    pub dest_port: u16,
    /// The sending process.
    pub process: ProcessSnapshot,
    /// Workload identity of the job (reserved for the identity feature).
    pub identity: Option<String>,
    /// What the gateway did with the request.
    pub action: Action,
    /// When it was seen.
    pub seen_at: OffsetDateTime,
    /// The recorded session the request belongs to, if it is recorded.
    pub session_id: Option<String>,
    /// The sender's command line, with secrets masked (see
    /// `crate::findings::mask_command`).
    pub command: Option<String>,
    /// For interpreters (python, node, ruby, sh...): the script being run,
    /// resolved against the working directory.
    pub script: Option<String>,
    /// Why a key that would have been blocked was let through: the
    /// allowlist entry (`A-3`) or the false-positive finding. `None` when
    /// nothing was waived.
    pub allowed_by: Option<String>,
}

/// One sighting of a finding's key, as kept in the timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sighting {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub seen_at: OffsetDateTime,
    /// Workload identity of the job.
    pub identity: Option<String>,
    /// The sending process: exe, pid, uid, cgroup, container and the CI job
    /// variables (project, job id, pipeline) it had.
    pub process: ProcessSnapshot,
    /// Command line, secrets masked.
    pub command: Option<String>,
    /// Script path for interpreters.
    pub script: Option<String>,
    /// Destination host.
    pub dest_host: String,
    /// Destination port.
    pub dest_port: u16,
    /// Where in the request.
    pub location: String,
    /// What the gateway did.
    pub action: Action,
    /// The allowlist entry or false-positive decision that let it through.
    pub allowed_by: Option<String>,
    /// Recorded session, if any (`gateway sessions show <id>`).
    pub session_id: Option<String>,
}

impl Sighting {
    /// The CI project of the job, from whichever CI's variable names it.
    pub fn project(&self) -> Option<&str> {
        project_of(&self.process.job)
    }
}

/// CI variables that name the project, in order of preference.
pub const PROJECT_VARIABLES: [&str; 4] =
    ["CI_PROJECT_PATH", "GITHUB_REPOSITORY", "BUILDKITE_PIPELINE_SLUG", "JOB_NAME"];

/// The project named by CI job variables `job`.
pub fn project_of(job: &std::collections::BTreeMap<String, String>) -> Option<&str> {
    PROJECT_VARIABLES.iter().find_map(|v| job.get(*v)).map(String::as_str)
}

/// Result of [`FindingStore::record`](super::FindingStore::record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Recorded {
    /// The finding (new or existing) the sighting was recorded under.
    pub id: FindingId,
    /// True when this sighting created the finding.
    pub new: bool,
    /// How many times the finding has now been seen.
    pub count: u64,
}

/// One entry of a finding's review history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    /// Previous status; `None` for the entry that created the finding.
    pub from: Option<Status>,
    /// New status.
    pub to: Status,
    /// Who: a reviewer's name, or `gateway` for automatic changes.
    pub by: String,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Why.
    pub comment: String,
}

/// A stored finding: one per key (fingerprint) and detection rule.
///
/// What identifies the key (rule, confidence, fingerprint, preview) comes
/// from the first sighting; the sighting fields here (location, process,
/// identity, action, destination) are the latest one's, and
/// [`Finding::sightings`] has them all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// Id.
    pub id: FindingId,
    /// Detection rule id.
    pub rule_id: String,
    /// Detector confidence.
    pub confidence: String,
    /// HMAC fingerprint of the key.
    pub fingerprint: String,
    /// Redacted preview.
    pub preview: String,
    /// Where in the request (latest sighting).
    pub location: String,
    /// Destination host (lower case).
    pub dest_host: String,
    /// Destination port.
    pub dest_port: u16,
    /// Sending process (latest sighting; the executable is part of the dedup key).
    pub process: ProcessSnapshot,
    /// Workload identity (latest sighting that had one).
    pub identity: Option<String>,
    /// First sighting.
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    /// Latest sighting.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// Number of sightings.
    pub count: u64,
    /// Action taken at the latest sighting.
    pub action: Action,
    /// Review status.
    pub status: Status,
    /// Review history, oldest first (starts with the creation entry).
    pub history: Vec<StatusChange>,
    /// Set on findings of databases from before one-finding-per-key that
    /// were folded into an older finding of the same key and rule; their
    /// sightings are that finding's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<FindingId>,
    /// Every sighting, oldest first: filled by
    /// [`FindingStore::get`](super::FindingStore::get) and the exports,
    /// empty in lists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sightings: Vec<Sighting>,
}

impl Finding {
    /// `host:port`, with IPv6 literals bracketed.
    pub fn destination(&self) -> String {
        if self.dest_host.contains(':') {
            format!("[{}]:{}", self.dest_host, self.dest_port)
        } else {
            format!("{}:{}", self.dest_host, self.dest_port)
        }
    }
}

/// Which findings [`FindingStore::list`](super::FindingStore::list) returns;
/// the default returns all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this status.
    pub status: Option<Status>,
    /// Only rule ids matching this glob (`*`, `?`).
    pub rule: Option<String>,
    /// Only destination hosts matching this glob (case-insensitive).
    pub host: Option<String>,
    /// Only findings seen at or after this instant.
    pub since: Option<OffsetDateTime>,
    /// Only the finding(s) of this exact fingerprint.
    pub fingerprint: Option<String>,
    /// Only findings with a sighting by this identity (glob).
    pub identity: Option<String>,
    /// Only findings with a sighting from this CI project (glob on
    /// [`PROJECT_VARIABLES`]).
    pub project: Option<String>,
}

/// Export formats of [`FindingStore::export`](super::FindingStore::export).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExportFormat {
    /// A JSON array of findings, history included.
    Json,
    /// SARIF 2.1.0, for code-scanning dashboards.
    Sarif,
    /// CSV with a header row, for spreadsheets.
    Csv,
}

impl std::fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExportFormat::Json => "json",
            ExportFormat::Sarif => "sarif",
            ExportFormat::Csv => "csv",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finding_id_round_trips() {
        assert_eq!(FindingId(12).to_string(), "F-12");
        assert_eq!("F-12".parse::<FindingId>(), Ok(FindingId(12)));
        assert_eq!("f-12".parse::<FindingId>(), Ok(FindingId(12)));
        assert_eq!("12".parse::<FindingId>(), Ok(FindingId(12)));
        for bad in ["", "F-", "F-0", "-3", "F--3", "F-+3", "+3", "F-1x", "G-1"] {
            assert!(bad.parse::<FindingId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn status_names() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>(), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), serde_json::json!(s.as_str()));
        }
        assert_eq!("false-positive".parse::<Status>(), Ok(Status::FalsePositive));
        assert!("closed".parse::<Status>().is_err());
    }
}
