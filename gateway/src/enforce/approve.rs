//! Holding a request (or a non-HTTP connection) for just-in-time approval:
//! what approvers are shown, what the session records, and how each outcome
//! refuses.

use serde_json::json;

use super::{Caller, Enforcement, POLICY_TARGET};
use crate::{
    approval::{ApprovalSpec, NewApproval, Outcome},
    policy,
    record::SessionRecorder,
};

/// What a held request asks approvers for.
pub struct ApprovalAsk<'a> {
    /// The policy rule that requires approval.
    pub rule: &'a str,
    /// Its approval settings.
    pub spec: &'a policy::ApprovalSpec,
    /// Request method (`CONNECT` for a non-HTTP connection).
    pub method: String,
    /// URL, secrets masked.
    pub url: String,
    /// `host:port`.
    pub destination: String,
    /// The start of the body, secrets masked.
    pub body_preview: String,
}

/// Why a held request was refused.
pub struct Refusal {
    /// The approval request, when one was stored.
    pub approval: Option<String>,
    /// Machine-readable reason (`approval_denied`, `approval_timed_out`,
    /// `approval_unavailable`, `approval_limit`).
    pub error: &'static str,
    /// For the client.
    pub message: String,
}

impl Enforcement {
    /// Holds the caller's request until its approval is decided, recording
    /// the request and the decision in `session`. `Ok` releases it.
    pub async fn ask_approval(
        &self,
        conn_id: u64,
        caller: &Caller,
        session: Option<&SessionRecorder>,
        ask: ApprovalAsk<'_>,
    ) -> Result<(), Refusal> {
        let ApprovalAsk { rule, spec, method, url, destination, body_preview } = ask;
        let p = &caller.process;
        let new = NewApproval {
            identity: caller.identity.uri.clone(),
            identity_labels: caller.identity.labels.clone(),
            process: json!({
                "pid": p.pid, "uid": p.uid, "gid": p.gid, "comm": p.comm,
                "exe": p.exe.as_ref().map(|e| e.display().to_string()), "cgroup": p.cgroup,
            }),
            job: caller.job.clone(),
            session_id: session.map(|s| s.id().as_str().to_owned()),
            method,
            url,
            destination,
            body_preview,
            rule: rule.to_owned(),
            requesters: Vec::new(),
            cgroup_id: p.cgroup_id,
        };
        let approval_spec = ApprovalSpec::from(spec);
        if let Some(s) = session {
            s.event(
                "approval_requested",
                json!({ "rule": rule, "group": spec.group, "min_approvals": spec.min_approvals }),
            );
        }
        tracing::info!(target: POLICY_TARGET, conn_id, rule, group = spec.group, identity = caller.identity.uri, "held for approval");
        let outcome = self.approvals.request(new, &approval_spec).await;
        let (result, event) = match outcome {
            Outcome::Approved { id, by } => {
                (Ok(()), json!({ "approval": id.to_string(), "outcome": "approved", "by": by }))
            }
            Outcome::Denied { id, by, comment } => {
                let event = json!({ "approval": id.to_string(), "outcome": "denied", "by": by });
                let comment = comment.as_deref().map(|c| format!(": {c}")).unwrap_or_default();
                let refusal = Refusal {
                    approval: Some(id.to_string()),
                    error: "approval_denied",
                    message: format!("Approval {id} was denied by {by}{comment}."),
                };
                (Err(refusal), event)
            }
            Outcome::TimedOut { id } => {
                let refusal = Refusal {
                    approval: Some(id.to_string()),
                    error: "approval_timed_out",
                    message: format!(
                        "Nobody approved request {id} within {}; it was not sent.",
                        humantime::format_duration(spec.timeout)
                    ),
                };
                (Err(refusal), json!({ "approval": id.to_string(), "outcome": "timed_out" }))
            }
            Outcome::Limited(limit) => {
                let event =
                    json!({ "outcome": "refused", "reason": "limit", "limit": limit.limit.as_str(), "max": limit.max });
                let refusal = Refusal {
                    approval: None,
                    error: "approval_limit",
                    message: format!(
                        "This request needs approval, but {limit}; it was not sent. Retry once earlier requests are decided."
                    ),
                };
                (Err(refusal), event)
            }
            Outcome::Failed { reason } => {
                let event = json!({ "outcome": "failed", "reason": reason });
                let refusal = Refusal {
                    approval: None,
                    error: "approval_unavailable",
                    message: format!(
                        "This request needs approval, which could not be requested ({reason}); it was not sent."
                    ),
                };
                (Err(refusal), event)
            }
        };
        if let Some(s) = session {
            s.event("approval_decided", event);
        }
        result
    }
}
