//! The operator's policy: one YAML file saying which identities may do what,
//! where. Ordered rules match on identity, destination and request; the
//! first match decides (allow, deny, or hold for approval) and also says how
//! to treat static keys, which responses to mask and how much to record.
//!
//! [`Policy::parse`] validates a file (every error with line and column)
//! and compiles it; [`Policy::evaluate`] judges borrowed [`RequestFacts`]
//! without allocating and returns a [`Decision`] borrowed from the policy;
//! the facts carry the request path as [`path::normalize`] canonicalised it
//! and the host as [`judged_host`] extracted it, so every spelling of a
//! destination is judged as one;
//! [`Policy::explain`] says why. [`PolicyHandle`] holds the policy in force
//! and reloads it ([`watch`] on file changes). See `docs/policy.md`.

mod compile;
mod compiled;
mod decision;
mod error;
mod eval;
mod explain;
mod facts;
mod glob;
mod host;
mod model;
pub mod path;
mod reload;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use compile::{DEFAULT_APPROVAL_TIMEOUT, POLICY_VERSION};
pub use compiled::{Policy, PolicySource, BUILTIN_POLICY};
pub use decision::{
    Action, ApprovalSpec, CredentialUse, Decision, MaskRule, MaskRules, NamedPattern, RecordLevel, StaticKeyAction,
    Uninspectable, DEFAULT_RULE, UNCLASSIFIED_REASON, UNCLASSIFIED_RULE,
};
pub use error::PolicyError;
pub use explain::{Explanation, RuleMiss, SqlExplanation, StatementExplanation};
pub use facts::{rpc_method, HttpRequestFacts, PostgresFacts, Protocol, RequestFacts, NO_ATTRIBUTES};
pub use host::{judged_host, HostError};
pub use path::{normalize, NormalizedPath, PathRejection};
pub use reload::{watch, PolicyHandle, ReloadOutcome};

/// Checks one `require_approval` rule's settings against the gateway's
/// approvals configuration; the error says what is wrong.
pub type ApprovalCheck = std::sync::Arc<dyn Fn(&ApprovalSpec) -> Result<(), String> + Send + Sync>;

/// What a policy file is checked against beyond itself, at load and at
/// every reload: a rule that could never be approved is an error then, not
/// a refusal when a job first hits it.
#[derive(Clone, Default)]
pub struct PolicyContext {
    /// The approvals configuration's verdict on each approval spec; `None`
    /// leaves approval specs unchecked.
    pub approval_check: Option<ApprovalCheck>,
    /// The configured credentials (`credentials.credentials`): a rule that
    /// swaps or injects credentials for a host none of them names is
    /// warned about. `None` leaves it unchecked.
    pub credentials: Option<std::sync::Arc<[crate::credentials::CredentialEntry]>>,
}

impl std::fmt::Debug for PolicyContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyContext")
            .field("approval_check", &self.approval_check.is_some())
            .field("credentials", &self.credentials.as_ref().map(|c| c.len()))
            .finish()
    }
}

/// The `policy:` section of the gateway configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// The policy file; `None` uses [`BUILTIN_POLICY`] (allow everything).
    pub file: Option<PathBuf>,
    /// Reload the file when its content changes.
    pub watch: bool,
    /// How often the watcher checks the file.
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig { file: None, watch: true, watch_interval: Duration::from_secs(1) }
    }
}
