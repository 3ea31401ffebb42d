//! Just-in-time approval: a request whose policy rule says
//! `require_approval` is held while human approvers decide (see
//! `docs/approvals.md`).
//!
//! The proxy calls [`Approvals::request`], which stores the request,
//! announces it (webhook, [`Approvals::subscribe`]) and waits for the
//! decision or the timeout. Approvers decide through the admin API on a unix
//! socket (`crate::api`), where the kernel tells who they are, or with the
//! `gateway approvals ...` commands (`crate::cli::approvals`), which are
//! clients of that API ([`crate::api::AdminClient`]).
//! Every request and decision is stored in SQLite (`store`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

mod model;
pub(crate) mod rules;
mod service;
pub(crate) mod store;
mod waiters;
pub(crate) mod webhook;

#[cfg(test)]
mod tests;

pub use model::{
    ApprovalEvent, ApprovalId, ApprovalSpec, ApprovalView, Approver, DecisionView, EventKind, ListFilter, NewApproval,
    Outcome, State, Verdict, Vouched,
};
pub use service::{Approvals, UserLookup};

/// File name of the approvals database inside `state_dir` when
/// `approvals.database` is not set.
pub const DEFAULT_DATABASE_FILE: &str = "approvals.db";

/// Longest approval timeout a rule may ask for: a held request keeps a
/// client connection (and its job) waiting.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Approval settings (`approvals:` in the configuration file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ApprovalConfig {
    /// Approver groups: group name -> the unix user names of its members.
    pub groups: BTreeMap<String, Vec<String>>,
    /// The SQLite database; relative paths are below `state_dir`.
    /// `None` means `state_dir/approvals.db`.
    pub database: Option<PathBuf>,
    /// Where new requests and decisions are announced.
    pub webhook: Option<WebhookConfig>,
    /// Approval requests one cgroup (one job) may have open at once; more
    /// are refused at once without being stored or announced.
    pub max_pending_per_cgroup: usize,
    /// Approval requests open in the whole gateway at once.
    pub max_pending: usize,
}

impl Default for ApprovalConfig {
    fn default() -> Self {
        ApprovalConfig {
            groups: BTreeMap::new(),
            database: None,
            webhook: None,
            max_pending_per_cgroup: 8,
            max_pending: 256,
        }
    }
}

/// `approvals.webhook`: an HTTP(S) endpoint that receives a JSON POST for
/// every new approval request and every decision.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL.
    pub url: String,
    /// Deadline for one delivery (connect, send, response).
    #[serde(default = "default_webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Extra request headers (e.g. `Authorization`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Further attempts after a failed delivery (no answer, connection
    /// error, 429 or 5xx; other statuses are final).
    #[serde(default = "default_webhook_retries")]
    pub retries: u32,
    /// Pause before the first retry, doubled for each further one (at most
    /// a minute).
    #[serde(default = "default_webhook_backoff", with = "humantime_serde")]
    pub retry_backoff: Duration,
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_webhook_retries() -> u32 {
    3
}

fn default_webhook_backoff() -> Duration {
    Duration::from_secs(1)
}

impl Serialize for WebhookConfig {
    // `gateway config check` prints the configuration as YAML: header values
    // are typically bearer tokens, and a webhook URL's path or query often
    // is the token itself (chat webhooks), so only the origin is shown.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let headers: BTreeMap<&str, &str> = self.headers.keys().map(|k| (k.as_str(), "[redacted]")).collect();
        let mut st = s.serialize_struct("WebhookConfig", 5)?;
        st.serialize_field("url", &redacted_url(&self.url))?;
        st.serialize_field("timeout", &humantime::format_duration(self.timeout).to_string())?;
        st.serialize_field("headers", &headers)?;
        st.serialize_field("retries", &self.retries)?;
        st.serialize_field("retry_backoff", &humantime::format_duration(self.retry_backoff).to_string())?;
        st.end()
    }
}

/// `scheme://host[:port]` of a URL, with `/[redacted]` when it has more
/// (user information is dropped as well).
fn redacted_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let more = rest.len() > authority.len() && &rest[authority.len()..] != "/";
    let redacted = if more || host.len() != authority.len() { "/[redacted]" } else { "" };
    format!("{scheme}://{host}{redacted}")
}

impl std::fmt::Debug for WebhookConfig {
    // Header values are typically bearer tokens; `gateway config check`
    // prints the configuration with `{:#?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: BTreeMap<&str, &str> = self.headers.keys().map(|k| (k.as_str(), "[redacted]")).collect();
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .field("headers", &headers)
            .field("retries", &self.retries)
            .field("retry_backoff", &self.retry_backoff)
            .finish()
    }
}

impl ApprovalConfig {
    /// Where the approvals database lives.
    pub fn database_path(&self, state_dir: &Path) -> PathBuf {
        match &self.database {
            // `join` keeps an absolute path as it is.
            Some(path) => state_dir.join(path),
            None => state_dir.join(DEFAULT_DATABASE_FILE),
        }
    }

    /// Checks what the schema cannot express; errors are (dotted field,
    /// reason) like `Config::validate`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if let Some(db) = &self.database {
            if db.as_os_str().is_empty() || db.file_name().is_none() {
                return Err(("approvals.database".into(), format!("`{}` does not name a file", db.display())));
            }
        }
        for (group, members) in &self.groups {
            let field = format!("approvals.groups.{group}");
            if !rules::valid_name(group) {
                return Err((field, "group names are letters, digits, `.`, `_`, `-`, `@` (at most 64)".into()));
            }
            if members.is_empty() {
                return Err((field, "a group without members can never approve anything".into()));
            }
            for (i, member) in members.iter().enumerate() {
                if !rules::valid_name(member) {
                    return Err((
                        format!("{field}[{i}]"),
                        format!("`{member}` is not a user name (letters, digits, `.`, `_`, `-`, `@`; at most 64)"),
                    ));
                }
            }
        }
        if let Some(hook) = &self.webhook {
            webhook::validate(hook).map_err(|(field, reason)| (format!("approvals.webhook.{field}"), reason))?;
        }
        if self.max_pending_per_cgroup == 0 {
            return Err(("approvals.max_pending_per_cgroup".into(), "must be at least 1".into()));
        }
        if self.max_pending < self.max_pending_per_cgroup {
            return Err(("approvals.max_pending".into(), "must be at least max_pending_per_cgroup".into()));
        }
        Ok(())
    }

    /// What a policy file is checked against: every `require_approval`
    /// rule must pass [`ApprovalConfig::check_spec`].
    pub fn policy_context(&self) -> crate::policy::PolicyContext {
        let approvals = self.clone();
        crate::policy::PolicyContext {
            approval_check: Some(std::sync::Arc::new(move |spec: &crate::policy::ApprovalSpec| {
                approvals.check_spec(&ApprovalSpec::from(spec))
            })),
            credentials: None,
        }
    }

    /// Checks a policy rule's approval settings against this configuration,
    /// so a rule that could never be approved is refused when the policy is
    /// loaded rather than when a job hits it.
    pub fn check_spec(&self, spec: &ApprovalSpec) -> Result<(), String> {
        let Some(members) = self.groups.get(&spec.group) else {
            let known: Vec<&str> = self.groups.keys().map(String::as_str).collect();
            return Err(format!(
                "approver group `{}` is not defined in approvals.groups (defined: {})",
                spec.group,
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            ));
        };
        let mut distinct: Vec<&str> = members.iter().map(String::as_str).collect();
        distinct.sort_unstable();
        distinct.dedup();
        if spec.min_approvals == 0 {
            return Err("min_approvals must be at least 1".into());
        }
        if spec.min_approvals as usize > distinct.len() {
            return Err(format!(
                "min_approvals is {} but group `{}` has only {} member(s)",
                spec.min_approvals,
                spec.group,
                distinct.len()
            ));
        }
        if spec.timeout.is_zero() || spec.timeout > MAX_TIMEOUT {
            return Err(format!(
                "approval timeout must be between 1s and {}",
                humantime_serde::re::humantime::format_duration(MAX_TIMEOUT)
            ));
        }
        Ok(())
    }
}

/// Everything that can go wrong in the approval module.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// The database could not be opened or prepared for use.
    #[error("{path}: cannot open the approvals database: {reason}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why, in words.
        reason: String,
    },
    /// The database was written by a newer gateway.
    #[error("{path}: the approvals database has schema version {found}; this gateway understands up to {supported} (upgrade the gateway)")]
    UnsupportedSchema {
        /// The database file.
        path: PathBuf,
        /// `PRAGMA user_version` of the file.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
    /// The file is not a (healthy) SQLite database.
    #[error("{path}: the approvals database is corrupt or not a SQLite database ({source}); move it aside and let the gateway create a new one, keeping the old file for investigation")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// An SQLite operation failed.
    #[error("{path}: approvals database error while {doing}: {source}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// What the store was doing.
        doing: &'static str,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// A stored row does not decode (hand-edited or damaged database).
    #[error("{path}: approval {id}: stored {field} is invalid: {reason}")]
    BadRow {
        /// The database file.
        path: PathBuf,
        /// The row.
        id: ApprovalId,
        /// The column.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// No approval request with that id.
    #[error("{0}: no such approval request")]
    NotFound(ApprovalId),
    /// The request is no longer pending.
    #[error("{id} is already {state}; decisions are only taken while it is pending")]
    AlreadyFinished {
        /// The request.
        id: ApprovalId,
        /// Its final state.
        state: State,
    },
    /// This approver has already decided this request.
    #[error("{approver} has already decided {id}; approvals count distinct approvers")]
    AlreadyDecided {
        /// The request.
        id: ApprovalId,
        /// The named approver.
        approver: String,
    },
    /// The caller may not take this decision (authentication, group
    /// membership, self-approval).
    #[error("{0}")]
    NotAllowed(String),
    /// The decision itself is malformed (empty name, comment too long...).
    #[error("{0}")]
    Invalid(String),
    /// The `approvals:` configuration is invalid.
    #[error("{field}: {reason}")]
    InvalidConfig {
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The webhook configuration cannot be used.
    #[error("approvals.webhook: {0}")]
    Webhook(String),
    /// A blocking database task was lost (runtime shutting down).
    #[error("the approvals database task stopped: {0}")]
    TaskLost(String),
}

impl ApprovalError {
    /// The HTTP status the admin API answers with.
    pub fn http_status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            ApprovalError::NotFound(_) => StatusCode::NOT_FOUND,
            ApprovalError::AlreadyFinished { .. } | ApprovalError::AlreadyDecided { .. } => StatusCode::CONFLICT,
            ApprovalError::NotAllowed(_) => StatusCode::FORBIDDEN,
            ApprovalError::Invalid(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[cfg(test)]
mod redaction_tests {
    #[test]
    fn webhook_urls_show_only_their_origin() {
        use super::redacted_url;
        assert_eq!(
            redacted_url("https://hooks.example.com/services/T0/B0/secret"),
            "https://hooks.example.com/[redacted]"
        );
        assert_eq!(redacted_url("https://user:pw@hooks.example.com"), "https://hooks.example.com/[redacted]");
        assert_eq!(redacted_url("https://hooks.example.com:8443/"), "https://hooks.example.com:8443");
        assert_eq!(redacted_url("http://h?token=x"), "http://h/[redacted]");
    }
}
