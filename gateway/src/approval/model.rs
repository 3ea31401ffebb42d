//! The approval data model, shared by the store, the service, the admin API
//! and the CLI (which reads the same JSON back).

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;

use crate::process::ProcessSnapshot;

/// Identifier of an approval request; shown (and accepted) as `A-<n>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApprovalId(pub i64);

impl std::fmt::Display for ApprovalId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "A-{}", self.0)
    }
}

impl std::str::FromStr for ApprovalId {
    type Err = String;

    /// Accepts `A-12`, `a-12` and `12`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix("A-").or_else(|| s.strip_prefix("a-")).unwrap_or(s);
        match digits.parse::<i64>() {
            Ok(n) if n > 0 && digits.bytes().all(|b| b.is_ascii_digit()) => Ok(ApprovalId(n)),
            _ => Err(format!("`{s}` is not an approval id (A-<number>)")),
        }
    }
}

impl Serialize for ApprovalId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ApprovalId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where an approval request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for decisions; the client's request is held.
    Pending,
    /// Enough distinct approvers approved; the request was released.
    Approved,
    /// An approver denied it; the request was refused.
    Denied,
    /// Nobody decided in time; the request was refused.
    TimedOut,
    /// The client went away (or the gateway stopped) before a decision.
    Abandoned,
}

impl State {
    /// Every state.
    pub const ALL: [State; 5] = [State::Pending, State::Approved, State::Denied, State::TimedOut, State::Abandoned];

    /// The name used in the database, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved => "approved",
            State::Denied => "denied",
            State::TimedOut => "timed_out",
            State::Abandoned => "abandoned",
        }
    }

    /// True once no decision can change the request any more.
    pub fn is_finished(self) -> bool {
        self != State::Pending
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for State {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not a state (pending, approved, denied, timed_out, abandoned)"))
    }
}

/// An approver's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Counts towards `min_approvals`.
    Approve,
    /// Refuses the request at once.
    Deny,
}

impl Verdict {
    /// The name used in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Approve => "approve",
            Verdict::Deny => "deny",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a policy rule's `require_approval` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalSpec {
    /// Approver group (a key of `approvals.groups`).
    pub group: String,
    /// How many distinct approvers must approve.
    #[serde(default = "one")]
    pub min_approvals: u32,
    /// How long the request is held before it is refused.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl From<&crate::policy::ApprovalSpec> for ApprovalSpec {
    /// The part of a compiled policy rule's approval the approval service
    /// needs (the reason stays with the policy).
    fn from(spec: &crate::policy::ApprovalSpec) -> ApprovalSpec {
        ApprovalSpec { group: spec.group.clone(), min_approvals: spec.min_approvals, timeout: spec.timeout }
    }
}

fn one() -> u32 {
    1
}

fn default_timeout() -> Duration {
    Duration::from_secs(15 * 60)
}

/// A request to hold for approval, as the proxy describes it.
///
/// Nothing in here may be secret: `url` and `body_preview` must already be
/// masked by the caller (they are stored, shown to approvers and sent to
/// the webhook).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewApproval {
    /// Identity URI of the requesting process.
    pub identity: String,
    /// Labels of that identity.
    pub identity_labels: BTreeMap<String, String>,
    /// The requesting process (pid, uid, comm, exe, cgroup...).
    pub process: ProcessSnapshot,
    /// Identifying CI job variables.
    pub job: BTreeMap<String, String>,
    /// The recorded session this request belongs to, if any.
    pub session_id: Option<String>,
    /// HTTP method.
    pub method: String,
    /// Request URL, masked.
    pub url: String,
    /// Destination host and port.
    pub destination: String,
    /// Start of the request body, masked.
    pub body_preview: String,
    /// The policy rule that asked for approval.
    pub rule: String,
    /// Names of the people or accounts behind the request (the user who
    /// triggered the job...), who therefore may not approve it. The
    /// identity URI, the process's unix user and the CI actor variables of
    /// `job` are added automatically.
    pub requesters: Vec<String>,
    /// cgroup id of the requesting process at connect time: open requests
    /// are limited per cgroup (one job), not per identity, which many jobs
    /// may share.
    pub cgroup_id: u64,
}

/// Who is taking a decision, as the admin API established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approver {
    /// The approver named by the caller (`--by`).
    pub name: String,
    /// Unix uid of the calling process (from the socket's peer credentials).
    pub uid: u32,
    /// Its pid (from the peer credentials).
    pub pid: u32,
    /// Identity URI of the calling process, when it resolves to one.
    pub identity: Option<String>,
    /// Who vouches for `name`.
    pub vouched: Vouched,
}

/// Who vouches for an approver's name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Vouched {
    /// The kernel: the name must be the calling uid's user name (root may
    /// act for others). The admin socket.
    #[default]
    Kernel,
    /// The organisation's identity provider: the name is the signed-in
    /// user's (e-mail or subject) from a verified ID token. The console.
    Oidc {
        /// Every other name the provider gave for the same person
        /// (preferred user name, subject, e-mail and its local part): none
        /// of them may be behind the request being approved.
        aliases: Vec<String>,
    },
    /// The fleet's central store: the decision was taken on another host's
    /// CLI (or console) and reached this host through the store. Nothing
    /// vouches for the name beyond whoever could write the store, so the
    /// holding host applies every rule it can check itself (group
    /// membership, no self-approval, distinct approvers, pending) and the
    /// record names the host it came from.
    Central {
        /// Host id the decision was taken on, as the store says.
        host: String,
    },
}

/// One stored decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionView {
    /// Approve or deny.
    pub verdict: Verdict,
    /// The named approver (what distinct approvals count).
    pub approver: String,
    /// How the decision is shown: the name, or `alice (via uid 0)` when root
    /// acted for a named approver.
    pub recorded_as: String,
    /// Unix uid of the process that took the decision.
    pub uid: u32,
    /// Its pid.
    pub pid: u32,
    /// Its identity URI, if it had one.
    pub identity: Option<String>,
    /// The approver's comment.
    pub comment: Option<String>,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// An approval request with its decisions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalView {
    /// Its id.
    pub id: ApprovalId,
    /// Where it stands.
    pub state: State,
    /// The policy rule that asked for approval.
    pub rule: String,
    /// The approver group.
    pub group: String,
    /// Distinct approvals needed.
    pub min_approvals: u32,
    /// Identity URI of the requesting process.
    pub identity: String,
    /// Labels of that identity.
    pub identity_labels: BTreeMap<String, String>,
    /// The requesting process.
    pub process: ProcessSnapshot,
    /// Identifying CI job variables.
    pub job: BTreeMap<String, String>,
    /// The recorded session, if any.
    pub session_id: Option<String>,
    /// HTTP method.
    pub method: String,
    /// Request URL (masked).
    pub url: String,
    /// Destination host and port.
    pub destination: String,
    /// Start of the body (masked).
    pub body_preview: String,
    /// Names that may not approve this request.
    pub requesters: Vec<String>,
    /// When it was requested.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it times out.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// When it stopped being pending.
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// Decisions, oldest first.
    pub decisions: Vec<DecisionView>,
}

impl ApprovalView {
    /// Distinct approvers who approved, in the order they did.
    pub fn approved_by(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for d in self.decisions.iter().filter(|d| d.verdict == Verdict::Approve) {
            if !names.iter().any(|n| n == &d.approver) {
                names.push(d.approver.clone());
            }
        }
        names
    }

    /// What the held request gets, once the request is finished.
    pub fn outcome(&self) -> Option<Outcome> {
        let id = self.id;
        match self.state {
            State::Pending => None,
            State::Approved => Some(Outcome::Approved {
                id,
                by: self
                    .decisions
                    .iter()
                    .filter(|d| d.verdict == Verdict::Approve)
                    .map(|d| d.recorded_as.clone())
                    .collect(),
            }),
            State::Denied => {
                let deny = self.decisions.iter().rev().find(|d| d.verdict == Verdict::Deny);
                Some(Outcome::Denied {
                    id,
                    by: deny.map_or_else(String::new, |d| d.recorded_as.clone()),
                    comment: deny.and_then(|d| d.comment.clone()),
                })
            }
            State::TimedOut => Some(Outcome::TimedOut { id }),
            State::Abandoned => Some(Outcome::Failed { reason: format!("{id} was abandoned") }),
        }
    }
}

/// What [`Approvals::request`](super::Approvals::request) resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Forward the request.
    Approved {
        /// The approval request.
        id: ApprovalId,
        /// The approvers, as recorded.
        by: Vec<String>,
    },
    /// Refuse it: an approver said no.
    Denied {
        /// The approval request.
        id: ApprovalId,
        /// Who denied it, as recorded.
        by: String,
        /// Their comment.
        comment: Option<String>,
    },
    /// Refuse it: nobody decided in time.
    TimedOut {
        /// The approval request.
        id: ApprovalId,
    },
    /// Refuse it: the request could not be stored or waited for (the caller
    /// fails closed).
    Failed {
        /// Why, for logs and the refusal.
        reason: String,
    },
    /// Refuse it at once: too many approval requests are open (for the
    /// cgroup, or in all); nothing was stored or announced.
    Limited(crate::limits::LimitExceeded),
}

/// What happened to an approval request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A new request is waiting.
    ApprovalRequested,
    /// An approver approved or denied (the request may still be pending).
    ApprovalDecided,
    /// Nobody decided in time.
    ApprovalTimedOut,
    /// The client went away, or the gateway restarted, before a decision.
    ApprovalAbandoned,
}

/// An event, as broadcast to subscribers and POSTed to the webhook.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApprovalEvent {
    /// What happened.
    #[serde(rename = "event")]
    pub kind: EventKind,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The request after the event.
    pub approval: ApprovalView,
    /// The decision, for [`EventKind::ApprovalDecided`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionView>,
}

/// Which approval requests to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFilter {
    /// Only requests in this state.
    pub state: Option<State>,
    /// At most this many, newest first.
    pub limit: usize,
}

impl Default for ListFilter {
    fn default() -> Self {
        ListFilter { state: None, limit: 100 }
    }
}
