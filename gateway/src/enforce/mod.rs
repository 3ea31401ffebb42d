//! Enforcement: the gate ([`gate`]) where every connection and request
//! becomes a decision, whatever its protocol, and what it shares with the
//! protocol handlers: who is calling ([`Caller`]), one refusal type they
//! render ([`refusal`]), response masking and the recording of each HTTP
//! exchange ([`exchange`], [`masks`]).

use std::sync::Arc;

mod exchange;
pub mod gate;
mod masks;
pub mod redact;
pub mod refusal;

/// Recorded request and response headers, credentials redacted.
pub(crate) use exchange::recorded_headers;
pub use exchange::{lock, ExchangeWatch, RequestCapture, RequestSummary, SharedCapture, WatchSpec};
pub use gate::{
    ApprovalAsk, Capture, ConnFacts, ConnectionDecision, DestinationNames, Gate, HttpAsk, Judged, Judgement, Opaque,
    Passage, ProtectedNames, RequestDecision, ResultMask, StatementAsk, StatementDecision, StatementVerdict,
    MAX_FINDINGS_PER_REQUEST,
};
pub use masks::{decode_prefix, MaskCache};
pub use refusal::{BlockedFinding, CredentialProblem, NotApproved, Reason, Refusal, Unavailable, Uninspectable};

use crate::{identity::Identity, process::ProcessInfo};

/// tracing target of finding events.
pub const FINDING_TARGET: &str = "gateway::finding";
/// tracing target of ID token validation events.
pub const OIDC_TARGET: &str = "gateway::oidc";
/// tracing target of policy decisions (denials, approvals, refusals).
pub const POLICY_TARGET: &str = "gateway::policy";

/// A JSON response the gateway makes itself.
pub(crate) fn json_response(status: http::StatusCode, body: &serde_json::Value) -> http::Response<bytes::Bytes> {
    let mut response = http::Response::new(bytes::Bytes::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

/// Who is calling: the attributed process and the identity it is pinned to.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The process.
    pub process: Arc<ProcessInfo>,
    /// Its identity.
    pub identity: Identity,
    /// Allowlisted CI job variables of the process.
    pub job: std::collections::BTreeMap<String, String>,
}
