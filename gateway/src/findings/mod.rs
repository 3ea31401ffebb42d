//! Findings: durable records of static API keys seen in CI jobs' traffic,
//! the enforcement action chosen for each, and the security team's review
//! of them (see `docs/findings.md`).
//!
//! The proxy asks [`FindingsConfig::action_for`] what to do with a detected
//! key, records the sighting through a [`FindingsHandle`] (which returns only
//! once the finding is durably committed, so the id it puts in a 403 response
//! always exists), and reviewers work through `gateway findings ...`
//! (`crate::cli::findings`).
//!
//! Nothing secret is stored: the caller hands over an HMAC fingerprint and a
//! redacted preview, never the key (there is no field for it in
//! [`NewFinding`], and no column for it in the database).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::detect::Confidence;

pub mod allowlist;
mod export;
mod handle;
mod model;
pub mod notify;
pub mod origin;
pub mod store;

pub use allowlist::{AllowEntry, AllowId, Scope, WaiverSet, Waivers};
pub(crate) use export::sarif_log;
pub use handle::FindingsHandle;
pub use model::{
    project_of, ExportFormat, Finding, FindingId, ListFilter, NewFinding, Recorded, Sighting, Status, StatusChange,
    PROJECT_VARIABLES,
};
pub use notify::{FindingEvent, Notifier};
pub use store::FindingStore;

/// File name of the findings database inside `state_dir` when
/// `findings.database` is not set.
pub const DEFAULT_DATABASE_FILE: &str = "gateway.db";

/// Findings settings (`findings:` in the configuration file).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct FindingsConfig {
    /// An HTTP(S) endpoint that receives a JSON POST for every new finding
    /// and review decision (same shape of settings as `approvals.webhook`).
    pub webhook: Option<crate::approval::WebhookConfig>,
    /// The SQLite database; relative paths are below `state_dir`.
    /// `None` means `state_dir/gateway.db`.
    pub database: Option<PathBuf>,
    /// Action when no rule of `actions` matches.
    pub default_action: Action,
    /// Per-destination (and optionally per-rule) actions, in order; the first
    /// match wins.
    pub actions: Vec<ActionRule>,
    /// Unix socket of the reviewers' API (`gateway findings` goes through it
    /// when set, so reviewers need no root and decisions are recorded under
    /// the kernel-vouched caller); `None` disables it.
    pub review_socket: Option<PathBuf>,
    /// Unix group given access to the review socket; `reviewers` when unset.
    pub reviewers_group: Option<String>,
    /// Least detector confidence at which a rule's match counts as a key
    /// (recorded, and blocked where the action says so), per rule glob; the
    /// first match wins, then [`DEFAULT_MIN_CONFIDENCE`], then `low`.
    pub min_confidence: Vec<ConfidenceRule>,
}

/// One entry of `findings.min_confidence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfidenceRule {
    /// Detection rule id glob.
    pub rule: String,
    /// Matches below this are not keys.
    pub confidence: Confidence,
}

/// Built-in thresholds, after the configured ones: an Authorization value
/// in no known format is a key only when long and random-looking (medium),
/// so placeholders (`none`, `null`, `xxx`, `<token>`, `changeme`, empty)
/// and short or low-entropy values that SDKs require are not blocked.
pub const DEFAULT_MIN_CONFIDENCE: &[(&str, Confidence)] =
    &[(crate::detect::http_scan::UNKNOWN_AUTH_RULE, Confidence::Medium)];

/// AI backends whose keys in request bodies are redacted rather than the
/// request blocked, unless `findings.actions` says otherwise or
/// `findings.default_action` is not `block`: jobs send them source code
/// and logs, where a key is collateral, not the credential being used.
/// Keys where credentials go (headers, user info, query) are still blocked.
pub const AI_BACKENDS: &[&str] = &[
    "api.openai.com",
    "*.openai.azure.com",
    "api.anthropic.com",
    "*.cursor.sh",
    "generativelanguage.googleapis.com",
    "api.mistral.ai",
    "api.groq.com",
    "api.together.xyz",
    "api.deepseek.com",
    "api.x.ai",
    "openrouter.ai",
    "api.cohere.com",
    "api.githubcopilot.com",
    "*.githubcopilot.com",
];

/// What the proxy does with a request carrying a detected static key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Refuse the request (403 naming the finding id).
    #[default]
    Block,
    /// Forward the request unchanged and record the finding.
    Flag,
    /// Reserved for the identity feature (replace the static key with the
    /// job's own short-lived credential). Accepted in configuration so files
    /// can be written ahead of it; until that feature exists the gateway
    /// must enforce it as [`Action::Block`] (fail closed).
    Swap,
    /// For a key in a request body (a prompt, a log sent to an AI backend):
    /// forward the request with the key replaced by
    /// `[REDACTED:<rule>:<fingerprint prefix>]`, the body re-encoded and
    /// re-framed. A key presented where credentials go (a header, the
    /// URL's user info or query) cannot be redacted and is blocked; so is
    /// one in a body the gateway cannot rewrite (an unsupported encoding,
    /// a body too large to hold): it fails closed.
    Redact,
}

impl Action {
    /// The name used in configuration, the database and exports.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Flag => "flag",
            Action::Swap => "swap",
            Action::Redact => "redact",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "block" => Ok(Action::Block),
            "flag" => Ok(Action::Flag),
            "swap" => Ok(Action::Swap),
            "redact" => Ok(Action::Redact),
            other => Err(format!("`{other}` is not an action (block, flag, swap, redact)")),
        }
    }
}

/// One entry of `findings.actions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRule {
    /// Destination host: exact (`api.example.com`), a glob (`*.internal`),
    /// or `*` for any host. Case-insensitive; `*` also matches dots.
    pub host: String,
    /// Detection rule id glob; `None` matches every rule.
    #[serde(default)]
    pub rule: Option<String>,
    /// What to do.
    pub action: Action,
}

/// The reviewers' group when `findings.reviewers_group` is not set.
pub const DEFAULT_REVIEWERS_GROUP: &str = "reviewers";

impl FindingsConfig {
    /// The least confidence at which a match of `rule_id` is a key.
    pub fn min_confidence_for(&self, rule_id: &str) -> Confidence {
        self.min_confidence
            .iter()
            .find(|r| glob_match(&r.rule, rule_id))
            .map(|r| r.confidence)
            .or_else(|| DEFAULT_MIN_CONFIDENCE.iter().find(|(r, _)| glob_match(r, rule_id)).map(|(_, c)| *c))
            .unwrap_or(Confidence::Low)
    }

    /// The unix group of the review socket.
    pub fn reviewers_group(&self) -> &str {
        self.reviewers_group.as_deref().unwrap_or(DEFAULT_REVIEWERS_GROUP)
    }

    /// The action for a key found by `rule_id` in a request to `host`: the
    /// first matching `actions` entry; else, while `default_action` is
    /// `block`, `redact` for the AI backends of [`AI_BACKENDS`] (keys in
    /// prompt bodies are replaced, keys in auth positions still blocked);
    /// else `default_action`.
    pub fn action_for(&self, host: &str, rule_id: &str) -> Action {
        let host = normalize_host(host);
        let configured = self.actions.iter().find(|r| {
            glob_match(&normalize_host(&r.host), &host)
                && r.rule.as_deref().is_none_or(|pattern| glob_match(pattern, rule_id))
        });
        match configured {
            Some(r) => r.action,
            None if self.default_action == Action::Block && AI_BACKENDS.iter().any(|p| glob_match(p, &host)) => {
                Action::Redact
            }
            None => self.default_action,
        }
    }

    /// Where the findings database lives.
    pub fn database_path(&self, state_dir: &Path) -> PathBuf {
        match &self.database {
            // `join` keeps an absolute path as it is.
            Some(path) => state_dir.join(path),
            None => state_dir.join(DEFAULT_DATABASE_FILE),
        }
    }

    /// Checks what the schema cannot express; errors are (dotted field, reason)
    /// like `Config::validate`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if let Some(hook) = &self.webhook {
            crate::approval::webhook::validate(hook)
                .map_err(|(field, reason)| (format!("findings.webhook.{field}"), reason))?;
        }
        if let Some(db) = &self.database {
            if db.as_os_str().is_empty() {
                return Err((
                    "findings.database".into(),
                    "empty path (omit the field for state_dir/gateway.db)".into(),
                ));
            }
            if db.file_name().is_none() {
                return Err(("findings.database".into(), format!("`{}` does not name a file", db.display())));
            }
        }
        for (i, rule) in self.actions.iter().enumerate() {
            let field = format!("findings.actions[{i}].host");
            if rule.host.is_empty() {
                return Err((field, "empty host (use `*` for any host)".into()));
            }
            if rule.host.contains(|c: char| c.is_whitespace() || c == '/' || c == ':') {
                return Err((
                    field,
                    format!("`{}` is not a host name or host glob (no scheme, port or path)", rule.host),
                ));
            }
            if let Some(pattern) = &rule.rule {
                if pattern.is_empty() {
                    return Err((
                        format!("findings.actions[{i}].rule"),
                        "empty rule glob (omit the field to match every rule)".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Host names compare case-insensitively and without the root dot.
fn normalize_host(host: &str) -> String {
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

/// Shell-style glob: `*` any run of characters (dots included), `?` one
/// character, everything else literal.
pub(crate) fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matcher with single backtrack point: linear-ish and immune to
    // the exponential blow-up of naive recursion on patterns like `*a*a*a*b`.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Everything that can go wrong in the findings module. Messages name the
/// database file where one is involved.
#[derive(Debug, thiserror::Error)]
pub enum FindingsError {
    /// The database could not be opened or prepared for use.
    #[error("{path}: cannot open the findings database: {reason}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why, in words.
        reason: String,
    },
    /// The file is not a (healthy) SQLite database.
    #[error("{path}: the findings database is corrupt or not a SQLite database ({source}); move it aside and let the gateway create a new one, keeping the old file for investigation")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The files under the writer's open connection were damaged, replaced
    /// or removed: commits would no longer be durable.
    #[error("{path}: the findings database is corrupt: {damage}; nothing more is committed to it. Move it aside (keep it for investigation) or put a good copy at its path: the gateway then opens the file there, creating a new one if none")]
    Damaged {
        /// The database file.
        path: PathBuf,
        /// What was found.
        damage: crate::sqlite::Damage,
    },
    /// The database was written by a newer gateway.
    #[error("{path}: the findings database has schema version {found}; this gateway understands up to {supported} (upgrade the gateway)")]
    UnsupportedSchema {
        /// The database file.
        path: PathBuf,
        /// `PRAGMA user_version` of the file.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
    /// An SQLite operation failed.
    #[error("{path}: findings database error while {doing}: {source}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// What the store was doing.
        doing: &'static str,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// A stored row does not decode (hand-edited or damaged database).
    #[error("{path}: finding {id}: stored {field} is invalid: {reason}")]
    BadRow {
        /// The database file.
        path: PathBuf,
        /// The row.
        id: FindingId,
        /// The column.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// No finding with that id.
    #[error("{0}: no such finding")]
    NotFound(FindingId),
    /// No active allowlist entry with that id.
    #[error("{0}: no such active allowlist entry")]
    NoSuchAllowEntry(AllowId),
    /// The requested review status change is not allowed.
    #[error("{id} is {from}; it cannot become {to} (allowed from {from}: {allowed})")]
    InvalidTransition {
        /// The finding.
        id: FindingId,
        /// Its current status.
        from: Status,
        /// The requested status.
        to: Status,
        /// Statuses reachable from `from`, for the message.
        allowed: String,
    },
    /// A status change without a reviewer name.
    #[error("a status change needs the reviewer's name (by)")]
    MissingReviewer,
    /// A finding to record is malformed (the caller's bug, reported rather
    /// than stored half-right).
    #[error("invalid finding: {0}")]
    InvalidFinding(String),
    /// Writing an export failed.
    #[error("writing the {format} export: {source}")]
    Export {
        /// The format being written.
        format: ExportFormat,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The background writer of a [`FindingsHandle`] is gone.
    #[error("the findings writer thread has stopped; the finding was not recorded")]
    WriterStopped,
}

impl FindingsError {
    /// True for requests that are well-formed but cannot be honoured (unknown
    /// id, disallowed status change), as opposed to malformed requests and
    /// database or environment failures; the CLI exits 1 for these and 2 for
    /// the rest.
    pub fn is_request_error(&self) -> bool {
        matches!(
            self,
            FindingsError::NotFound(_) | FindingsError::NoSuchAllowEntry(_) | FindingsError::InvalidTransition { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(host: &str, rule: Option<&str>, action: Action) -> ActionRule {
        ActionRule { host: host.into(), rule: rule.map(Into::into), action }
    }

    #[test]
    fn glob() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "a.b"));
        assert!(glob_match("*.internal", "git.internal"));
        assert!(glob_match("*.internal", "a.b.internal"));
        assert!(!glob_match("*.internal", "internal"));
        assert!(!glob_match("*.internal", "git.internal.example.com"));
        assert!(glob_match("api.example.com", "api.example.com"));
        assert!(!glob_match("api.example.com", "api.example.co"));
        assert!(glob_match("aws-*", "aws-access-key"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab"));
        assert!(!glob_match("*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"));
    }

    #[test]
    fn action_first_match_wins() {
        let c = FindingsConfig {
            database: None,
            review_socket: None,
            reviewers_group: None,
            min_confidence: Vec::new(),
            webhook: None,
            default_action: Action::Block,
            actions: vec![
                rule("*.internal", Some("github-*"), Action::Block),
                rule("*.internal", None, Action::Flag),
                rule("API.Example.com", None, Action::Swap),
            ],
        };
        assert_eq!(c.action_for("git.internal", "github-pat"), Action::Block);
        assert_eq!(c.action_for("git.internal", "aws-key"), Action::Flag);
        assert_eq!(c.action_for("GIT.INTERNAL.", "aws-key"), Action::Flag);
        assert_eq!(c.action_for("api.example.com", "aws-key"), Action::Swap);
        assert_eq!(c.action_for("other.com", "aws-key"), Action::Block);
        // AI backends redact body keys by default, unless configured otherwise.
        assert_eq!(c.action_for("API.OpenAI.com", "aws-key"), Action::Redact);
        assert_eq!(c.action_for("api2.cursor.sh", "aws-key"), Action::Redact);
        let c = FindingsConfig { actions: vec![rule("api.openai.com", None, Action::Block)], ..c };
        assert_eq!(c.action_for("api.openai.com", "aws-key"), Action::Block, "configured first");
        let flag_all = FindingsConfig { default_action: Action::Flag, ..Default::default() };
        assert_eq!(flag_all.action_for("api.openai.com", "aws-key"), Action::Flag, "only while the default blocks");
        assert_eq!(flag_all.reviewers_group(), "reviewers");
        assert_eq!(flag_all.min_confidence_for("unknown-auth-credential"), Confidence::Medium);
        assert_eq!(flag_all.min_confidence_for("openai-api-key"), Confidence::Low);
        let strict: FindingsConfig = serde_yaml_ng::from_str(
            "min_confidence:\n  - {rule: unknown-*, confidence: low}\n  - {rule: '*', confidence: high}\n",
        )
        .unwrap();
        assert_eq!(strict.min_confidence_for("unknown-auth-credential"), Confidence::Low);
        assert_eq!(strict.min_confidence_for("openai-api-key"), Confidence::High);
        assert_eq!(flag_all.action_for("x", "y"), Action::Flag);
    }

    #[test]
    fn config_parses_and_validates() {
        let c: FindingsConfig = serde_yaml_ng::from_str(
            "database: findings.db\ndefault_action: flag\nactions:\n  - host: '*.internal'\n    action: block\n  - host: '*'\n    rule: 'openai-*'\n    action: swap\n",
        )
        .unwrap();
        assert_eq!(c.default_action, Action::Flag);
        assert_eq!(c.actions[1].action, Action::Swap);
        assert_eq!(c.database_path(Path::new("/var/lib/gw")), PathBuf::from("/var/lib/gw/findings.db"));
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(FindingsConfig::default().database_path(Path::new("/s")), PathBuf::from("/s/gateway.db"));
        let abs = FindingsConfig { database: Some("/data/f.db".into()), ..Default::default() };
        assert_eq!(abs.database_path(Path::new("/s")), PathBuf::from("/data/f.db"));

        assert!(serde_yaml_ng::from_str::<FindingsConfig>("default_action: drop\n").is_err());
        assert!(serde_yaml_ng::from_str::<FindingsConfig>("actions: [{host: a, action: block, extra: 1}]\n").is_err());
        assert!(serde_yaml_ng::from_str::<FindingsConfig>("actions: [{host: a}]\n").is_err());

        let bad = FindingsConfig { actions: vec![rule("https://a.com", None, Action::Flag)], ..Default::default() };
        assert_eq!(bad.validate().unwrap_err().0, "findings.actions[0].host");
        let bad = FindingsConfig { actions: vec![rule("a.com", Some(""), Action::Flag)], ..Default::default() };
        assert_eq!(bad.validate().unwrap_err().0, "findings.actions[0].rule");
        let bad = FindingsConfig { database: Some(PathBuf::new()), ..Default::default() };
        assert_eq!(bad.validate().unwrap_err().0, "findings.database");
    }
}
