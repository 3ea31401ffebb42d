//! Announces findings to a webhook (`findings.webhook`): a new finding and
//! every review decision (status change, allowlist entry, revocation), with
//! the approvals' delivery machinery (one background task, in order,
//! bounded attempts, retries with doubling pauses). The database stays the
//! record of truth; a failing endpoint is logged, never felt by requests.
//!
//! Body (JSON), documented in `docs/findings.md`:
//! `{"event": "finding.new" | "finding.status" | "finding.allowed" |
//! "finding.revoked", "at": RFC 3339, "finding": {...}, "decision": {...}}`.
//! No key is ever in it: fingerprint and redacted preview only.

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::{AllowEntry, Finding};
use crate::approval::{webhook::Webhook, WebhookConfig};

/// What happened to a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FindingEvent {
    /// A key was seen for the first time.
    #[serde(rename = "finding.new")]
    New,
    /// A reviewer (or the gateway) changed the status.
    #[serde(rename = "finding.status")]
    Status,
    /// A reviewer accepted the risk in a scope.
    #[serde(rename = "finding.allowed")]
    Allowed,
    /// An allowlist entry was revoked.
    #[serde(rename = "finding.revoked")]
    Revoked,
}

/// Sends finding events to the configured webhook; without one, nothing.
/// Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Notifier(Option<Arc<Webhook>>);

impl Notifier {
    /// Starts the delivery task for `hook` (inside the tokio runtime); `tls`
    /// verifies an `https` endpoint.
    pub fn start(hook: Option<&WebhookConfig>, tls: Option<crate::tls::UpstreamTls>) -> Result<Notifier, String> {
        match hook {
            None => Ok(Notifier(None)),
            Some(hook) => Webhook::start(hook, tls).map(|w| Notifier(Some(Arc::new(w)))).map_err(|e| e.to_string()),
        }
    }

    /// Announces a new finding (the gateway's first sighting of the key).
    pub fn new_finding(&self, finding: Value) {
        self.send(FindingEvent::New, finding, Value::Null);
    }

    /// Announces a status change; `finding` is the finding after it.
    pub fn status(&self, finding: &Finding) {
        let decision = finding.history.last().map(|h| json!(h)).unwrap_or(Value::Null);
        self.send(FindingEvent::Status, summary(finding), decision);
    }

    /// Announces an allowlist entry or its revocation.
    pub fn allowlist(&self, event: FindingEvent, entry: &AllowEntry) {
        self.send(event, json!({ "id": entry.finding, "fingerprint": entry.fingerprint }), json!(entry));
    }

    fn send(&self, event: FindingEvent, finding: Value, decision: Value) {
        let Some(hook) = &self.0 else { return };
        let at = OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        let body = json!({ "event": event, "at": at, "finding": finding, "decision": decision });
        match serde_json::to_vec(&body) {
            Ok(bytes) => hook.send_body(Bytes::from(bytes), "finding event"),
            Err(e) => tracing::error!(error = %e, "cannot encode a finding event for the webhook"),
        }
    }
}

/// What an event says about a finding: no sightings list, no history.
fn summary(f: &Finding) -> Value {
    json!({
        "id": f.id,
        "rule_id": f.rule_id,
        "confidence": f.confidence,
        "fingerprint": f.fingerprint,
        "preview": f.preview,
        "status": f.status,
        "destination": f.destination(),
        "location": f.location,
        "action": f.action,
        "identity": f.identity,
        "project": super::project_of(&f.process.job),
        "exe": f.process.exe,
        "count": f.count,
    })
}
