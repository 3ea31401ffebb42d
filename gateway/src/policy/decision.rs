//! What a policy decides for a request: the action, and how to treat static
//! keys, response masking and recording.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What to do with a detected static key; the same values as
/// `findings.actions` (`block`, `swap`, `flag`).
pub use crate::findings::Action as StaticKeyAction;

/// Name of the closing default rule in decisions and explanations.
pub const DEFAULT_RULE: &str = "default";

/// Name in decisions for a PostgreSQL statement the gateway cannot classify
/// that no rule naming `kind: unknown` allowed: it is refused.
pub const UNCLASSIFIED_RULE: &str = "unclassified";

/// The reason given for [`UNCLASSIFIED_RULE`] refusals.
pub const UNCLASSIFIED_REASON: &str =
    "the gateway cannot classify this statement; only a policy rule with `kind: unknown` allows it";

/// Whether the gateway writes the credential it holds for the caller's
/// identity and the destination into requests itself (`credential:`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialUse {
    /// Requests keep what the job sent; a static key in them is treated as
    /// `static_keys` says (`swap` replaces it).
    #[default]
    AsSent,
    /// The gateway injects the credential held for the identity and
    /// destination into every request, whether the job sent a key, a
    /// placeholder or nothing (a detected static key is still a finding).
    /// Refused when no credential is held.
    Inject,
}

impl CredentialUse {
    /// `as_sent` or `inject`, as written in the policy.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialUse::AsSent => "as_sent",
            CredentialUse::Inject => "inject",
        }
    }
}

/// What happens to the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Forward it.
    Allow,
    /// Refuse it; `reason` is shown to the client.
    Deny {
        /// Why, for the client.
        reason: String,
    },
    /// Hold it until enough members of a group approve.
    RequireApproval(ApprovalSpec),
}

impl Action {
    /// `allow`, `deny` or `require_approval`.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny { .. } => "deny",
            Action::RequireApproval(_) => "require_approval",
        }
    }

    /// How strict the action is: of several decisions for one query (its
    /// statements), the strictest decides. `deny` > `require_approval` > `allow`.
    pub fn strictness(&self) -> u8 {
        match self {
            Action::Allow => 0,
            Action::RequireApproval(_) => 1,
            Action::Deny { .. } => 2,
        }
    }
}

/// Who must approve a held request, and for how long it waits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApprovalSpec {
    /// The approvers' group.
    pub group: String,
    /// Distinct approvals needed (at least 1).
    pub min_approvals: u32,
    /// How long the request waits before it is refused.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Why approval is needed, for the client and the approvers.
    pub reason: String,
}

/// How much of an exchange the session recorder keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordLevel {
    /// Headers and bodies (after masking).
    #[default]
    Full,
    /// Request line, status, sizes and timings only.
    Metadata,
    /// Nothing.
    None,
}

impl RecordLevel {
    /// The name used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordLevel::Full => "full",
            RecordLevel::Metadata => "metadata",
            RecordLevel::None => "none",
        }
    }
}

/// What the gateway does with a connection or request to a destination it
/// intercepts but cannot fully understand (an unknown protocol, TLS it does
/// not terminate, a body it cannot decode or that exceeds its limits, an
/// upgrade to a protocol it cannot follow).
///
/// Only an explicit `uninspectable:` in the policy changes the default:
/// nothing is passed uninspected by accident.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Uninspectable {
    /// Refuse it (the default).
    #[default]
    Refuse,
    /// Scan the raw bytes with every detection rule; pass them if nothing
    /// is found, refuse otherwise.
    ScanRaw,
    /// Pass it without inspection: the operator opted this destination out.
    Pass,
}

impl Uninspectable {
    /// The name used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Uninspectable::Refuse => "refuse",
            Uninspectable::ScanRaw => "scan_raw",
            Uninspectable::Pass => "pass",
        }
    }
}

/// Response masking for matching requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MaskRule {
    /// Which detector rules' matches are masked.
    pub rules: MaskRules,
    /// Extra patterns to mask (validated regular expressions).
    pub patterns: Vec<NamedPattern>,
    /// JSON object keys whose values are masked wherever they appear.
    pub json_fields: Vec<String>,
    /// PostgreSQL result columns whose every value is masked, by name
    /// (globs over the names in `RowDescription`, case-sensitive as
    /// PostgreSQL stores them: unquoted names are lower case).
    pub columns: Vec<String>,
}

/// The detector rules a [`MaskRule`] applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskRules {
    /// Every detector rule.
    All,
    /// Only these rule ids (possibly none).
    Only(Vec<String>),
}

/// An operator-defined masking pattern.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamedPattern {
    /// Shown in place of the masked text and in recordings.
    pub name: String,
    /// The regular expression (`regex` crate syntax), known to compile.
    pub regex: String,
}

/// The outcome of evaluating a request; borrows from the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Decision<'p> {
    /// The deciding rule's name (`#<index>` when unnamed, [`DEFAULT_RULE`]
    /// for the closing default).
    pub rule: &'p str,
    /// The deciding rule's index in `rules`; `None` for the default.
    pub index: Option<usize>,
    /// What to do.
    pub action: &'p Action,
    /// Override of `findings.actions` for static keys; `None` lets
    /// `findings.actions` decide.
    pub static_keys: Option<StaticKeyAction>,
    /// Whether the gateway injects the held credential.
    pub credential: CredentialUse,
    /// Response masking, if any.
    pub mask: Option<&'p MaskRule>,
    /// Index of `mask` in [`super::Policy::masks`]: stable for one policy
    /// digest, so compiled maskers can be cached by `(digest, mask_id)`.
    pub mask_id: Option<usize>,
    /// What the session recorder keeps.
    pub record: RecordLevel,
    /// What to do with what the gateway cannot understand.
    pub uninspectable: Uninspectable,
}
