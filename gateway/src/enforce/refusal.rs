//! One refusal type for every protocol.
//!
//! The gate says *why* it refuses; each protocol handler renders that into
//! its protocol (an HTTP status and JSON body, a TLS alert, a closed TCP
//! connection, later a PostgreSQL `ErrorResponse`), the way rustls maps one
//! error type to TLS alerts. Every refusal is also a `refused` event in the
//! session recording, with [`Reason::code`] as its machine-readable reason.

use std::{fmt, time::Duration};

use serde::Serialize;

use crate::record::Health;

/// A refusal: what the gate decided, for the connection it concerns.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The connection.
    pub conn_id: u64,
    /// Why.
    pub reason: Reason,
}

/// Why the gate refused.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Reason {
    /// A policy rule denies it.
    Denied {
        /// The deciding rule.
        rule: String,
        /// The rule's reason, for the client.
        reason: String,
    },
    /// It carries hard-coded credentials whose action is `block`.
    StaticCredential {
        /// The findings that blocked it (ids, rules, fingerprints, previews).
        findings: Vec<BlockedFinding>,
        /// Keys found beyond the per-request findings cap (not recorded
        /// one by one).
        more: u64,
    },
    /// It needed approval and did not get it.
    NotApproved {
        /// The approval request, when one was stored.
        approval: Option<String>,
        /// How the approval ended.
        outcome: NotApproved,
        /// For the client.
        message: String,
        /// The policy's reason for needing approval.
        reason: String,
    },
    /// An identity token the job presented did not validate.
    InvalidToken {
        /// Machine-readable validation failure.
        code: &'static str,
        /// For the client.
        message: String,
    },
    /// The gateway could not understand what was sent, and the policy did
    /// not opt the destination out.
    Uninspectable(Uninspectable),
    /// A request host servers could read more than one way (userinfo,
    /// characters no host name has): refused rather than guessed.
    AmbiguousHost {
        /// What is wrong with it.
        detail: String,
    },
    /// A request path that could be read two ways (an encoded `/` or `\`,
    /// an invalid escape): refused rather than guessed.
    AmbiguousPath {
        /// Which rule of normalisation refused it (`encoded_slash`, ...).
        code: &'static str,
        /// What is ambiguous about it.
        detail: String,
    },
    /// The policy has the gateway supply the credential for this
    /// destination (`credential: inject`, or `static_keys: swap` for a key
    /// the job sent) and it has none to supply: refused rather than sent
    /// without one or with the job's own. Boxed: rare, and large.
    CredentialUnavailable(Box<Unavailable>),
    /// A SQL statement the gateway cannot classify, which no policy rule
    /// naming `kind: unknown` allows (PostgreSQL: SQLSTATE 42601 with a
    /// syntax error, else 42501).
    UnclassifiedStatement {
        /// The parser's complaint, when the text does not parse.
        syntax_error: Option<String>,
    },
    /// The policy records this traffic and the session recorder cannot take
    /// records now (`record.on_failure: refuse`): refused rather than sent
    /// unrecorded.
    RecordingUnavailable {
        /// What is wrong with the recorder.
        health: Health,
    },
}

/// A credential the gateway should have supplied and could not.
#[derive(Debug, Clone)]
pub struct Unavailable {
    /// The caller's identity.
    pub identity: String,
    /// The destination host.
    pub host: String,
    /// What is wrong with it.
    pub problem: CredentialProblem,
    /// Why, for people. Never a credential.
    pub detail: String,
    /// Keys the job sent (each a finding), if any.
    pub findings: Vec<BlockedFinding>,
}

/// Why the gateway could not supply a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialProblem {
    /// No `credentials.credentials` entry matches the identity and host.
    NotHeld,
    /// The held value expired and could not be refreshed: never sent.
    Expired,
    /// The entry could not be rendered or applied (a `{jwt}` not minted, a
    /// login where a header is needed).
    Unusable,
}

impl CredentialProblem {
    /// The machine-readable error clients see.
    pub fn code(self) -> &'static str {
        match self {
            CredentialProblem::NotHeld => "no_credential_held",
            CredentialProblem::Expired => "credential_expired",
            CredentialProblem::Unusable => "credential_unusable",
        }
    }
}

/// How a held request ended without approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotApproved {
    /// An approver denied it.
    Denied,
    /// Nobody approved it in time.
    TimedOut,
    /// Approval could not be requested.
    Unavailable,
    /// The caller already has as many requests waiting as it may.
    Limited,
}

impl NotApproved {
    /// The machine-readable error clients see.
    pub fn code(self) -> &'static str {
        match self {
            NotApproved::Denied => "approval_denied",
            NotApproved::TimedOut => "approval_timed_out",
            NotApproved::Unavailable => "approval_unavailable",
            NotApproved::Limited => "approval_limit",
        }
    }
}

/// One finding that blocked a request, as the client and the recording see
/// it: never the key, only its fingerprint and a redacted preview.
#[derive(Debug, Clone, Serialize)]
pub struct BlockedFinding {
    /// The finding's id (`None` when it could not be stored: the request
    /// is blocked all the same).
    pub id: Option<String>,
    /// The rule that found the key.
    pub rule: String,
    /// Where in the request.
    pub location: String,
    /// HMAC fingerprint of the key.
    pub fingerprint: String,
    /// Redacted preview.
    pub preview: String,
}

/// What the gateway could not understand. Not understood is refused unless
/// the policy opts the destination out (`uninspectable: scan_raw | pass`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Uninspectable {
    /// The client's first bytes are no protocol the gateway inspects.
    UnknownProtocol,
    /// The server spoke first (SSH, SMTP, MySQL greetings...).
    ServerSpeaksFirst,
    /// The client said nothing at all.
    Silent {
        /// How long the gateway waited.
        #[serde(with = "humantime_serde")]
        waited: Duration,
    },
    /// TLS whose server name the gateway does not terminate (no name, a
    /// name outside `tls.intercept`, or a `tls.passthrough` name) to a
    /// protected destination.
    TlsNotIntercepted {
        /// The server name the client asked for.
        sni: Option<String>,
    },
    /// A request body the gateway could not decode or scan completely.
    Body {
        /// Why (unknown content coding, broken compression, over the limit).
        detail: String,
    },
    /// An HTTP upgrade to a protocol the gateway does not follow.
    Upgrade {
        /// The `Upgrade` header's value.
        protocol: String,
    },
    /// A WebSocket stream the gateway could not parse.
    WebSocket {
        /// What was wrong.
        detail: String,
    },
    /// A PostgreSQL message the gateway could not parse or does not know.
    Postgres {
        /// What was wrong.
        detail: String,
    },
}

impl Uninspectable {
    /// Short machine-readable name.
    pub fn code(&self) -> &'static str {
        match self {
            Uninspectable::UnknownProtocol => "unknown_protocol",
            Uninspectable::ServerSpeaksFirst => "server_speaks_first",
            Uninspectable::Silent { .. } => "silent_client",
            Uninspectable::TlsNotIntercepted { .. } => "tls_not_intercepted",
            Uninspectable::Body { .. } => "uninspectable_body",
            Uninspectable::Upgrade { .. } => "unsupported_upgrade",
            Uninspectable::WebSocket { .. } => "uninspectable_websocket",
            Uninspectable::Postgres { .. } => "uninspectable_postgres",
        }
    }
}

impl fmt::Display for Uninspectable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uninspectable::UnknownProtocol => f.write_str("the client speaks a protocol the gateway does not inspect"),
            Uninspectable::ServerSpeaksFirst => {
                f.write_str("the server speaks first, a protocol the gateway does not inspect")
            }
            Uninspectable::Silent { waited } => {
                write!(f, "the client sent nothing for {}", humantime::format_duration(*waited))
            }
            Uninspectable::TlsNotIntercepted { sni: Some(sni) } => {
                write!(f, "TLS for `{sni}`, a name the gateway does not terminate, to a protected destination")
            }
            Uninspectable::TlsNotIntercepted { sni: None } => {
                f.write_str("TLS without a server name to a protected destination")
            }
            Uninspectable::Body { detail } => write!(f, "the request body cannot be inspected: {detail}"),
            Uninspectable::Upgrade { protocol } => {
                write!(f, "an upgrade to `{protocol}`, a protocol the gateway does not inspect")
            }
            Uninspectable::WebSocket { detail } => write!(f, "the WebSocket stream cannot be inspected: {detail}"),
            Uninspectable::Postgres { detail } => write!(f, "a PostgreSQL message cannot be inspected: {detail}"),
        }
    }
}

impl Reason {
    /// The machine-readable error clients and recordings see.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::Denied { .. } => "denied_by_policy",
            Reason::StaticCredential { .. } => "static_credential_blocked",
            Reason::NotApproved { outcome, .. } => outcome.code(),
            Reason::InvalidToken { .. } => "invalid_oidc_token",
            Reason::Uninspectable(_) => "uninspectable",
            Reason::AmbiguousPath { .. } => "path_refused",
            Reason::AmbiguousHost { .. } => "host_refused",
            Reason::UnclassifiedStatement { .. } => "unclassified_statement",
            Reason::CredentialUnavailable(u) => u.problem.code(),
            Reason::RecordingUnavailable { .. } => "recording_unavailable",
        }
    }
}

impl Refusal {
    /// What the job shows its user: what happened, and what to do about it.
    pub fn message(&self) -> String {
        match &self.reason {
            Reason::Denied { rule, reason } => {
                format!("The CI gateway's policy denies this request (rule `{rule}`): {reason}")
            }
            Reason::StaticCredential { findings, more } => {
                let rules: Vec<&str> = findings.iter().map(|f| f.rule.as_str()).collect();
                let ids: Vec<&str> = findings.iter().filter_map(|f| f.id.as_deref()).collect();
                let more = if *more > 0 { format!(" and {more} more") } else { String::new() };
                format!(
                    "The CI gateway blocked this request: it carries a hard-coded credential ({}{more}). \
                     Nothing was sent to the server. Remove the key from the job, rotate it, and ask \
                     the security team about finding {} if this is unexpected.",
                    rules.join(", "),
                    if ids.is_empty() { "(not recorded)".to_owned() } else { ids.join(", ") },
                )
            }
            Reason::NotApproved { message, .. } => message.clone(),
            Reason::InvalidToken { message, .. } => message.clone(),
            Reason::Uninspectable(what) => format!(
                "The CI gateway refused this: {what}. Nothing was sent to the server. The gateway only \
                 lets through what it can inspect; ask the operators to opt this destination out \
                 (`uninspectable` in the policy) if it must carry this traffic."
            ),
            Reason::AmbiguousHost { detail } => format!(
                "The CI gateway refused this request: its host is ambiguous ({detail}). Nothing was sent \
                 to the server. Send a plain host name in the URL and `Host` header."
            ),
            Reason::AmbiguousPath { detail, .. } => format!(
                "The CI gateway refused this request: its path is ambiguous ({detail}). Nothing was sent \
                 to the server. Send the path without encoded slashes or backslashes."
            ),
            Reason::CredentialUnavailable(u) => {
                let Unavailable { identity, host, detail, findings, .. } = &**u;
                let ids: Vec<&str> = findings.iter().filter_map(|f| f.id.as_deref()).collect();
                let found = if ids.is_empty() {
                    String::new()
                } else {
                    format!(
                        " The key the job sent is finding {}: remove it from the job and rotate it.",
                        ids.join(", ")
                    )
                };
                format!(
                    "The CI gateway refused this request: {detail} (identity `{identity}`, destination `{host}`). \
                     The policy has the gateway supply the credential for this destination, so nothing was sent \
                     to the server. Ask the operators to add a `credentials` entry for this identity and host.{found}"
                )
            }
            Reason::UnclassifiedStatement { syntax_error: Some(e) } => format!(
                "The CI gateway refused this statement: it does not parse as PostgreSQL SQL ({e}). Nothing \
                 was sent to the server."
            ),
            Reason::UnclassifiedStatement { syntax_error: None } => "The CI gateway refused this statement: it \
                 cannot classify it, and the policy only lets such statements through with a rule naming \
                 `kind: unknown`. Nothing was sent to the server."
                .to_owned(),
            Reason::RecordingUnavailable { health } => format!(
                "The CI gateway refused this: it must record this traffic and its session recorder is not \
                 taking records ({}). Nothing was sent to the server. Retry later; the operators are alerted \
                 (`gateway status` shows the recorder).",
                match health {
                    Health::Backlogged => "too many records are waiting",
                    _ => "its database is failing",
                }
            ),
        }
    }

    /// Details for the recording's `refused` event and the client's JSON.
    pub fn detail(&self) -> serde_json::Value {
        use serde_json::json;
        match &self.reason {
            Reason::Denied { rule, reason } => json!({ "rule": rule, "reason": reason }),
            Reason::StaticCredential { findings, more } => json!({ "findings": findings, "more": more }),
            Reason::NotApproved { approval, reason, .. } => json!({ "approval": approval, "reason": reason }),
            Reason::InvalidToken { code, .. } => json!({ "code": code }),
            Reason::Uninspectable(what) => json!({ "uninspectable": what }),
            Reason::AmbiguousPath { code, detail } => json!({ "code": code, "detail": detail }),
            Reason::AmbiguousHost { detail } => json!({ "detail": detail }),
            Reason::UnclassifiedStatement { syntax_error } => json!({ "syntax_error": syntax_error }),
            Reason::CredentialUnavailable(u) => {
                let Unavailable { identity, host, problem, detail, findings } = &**u;
                json!({ "identity": identity, "host": host, "problem": problem, "detail": detail, "findings": findings })
            }
            Reason::RecordingUnavailable { health } => json!({ "recorder": health }),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason.code(), self.message())
    }
}
