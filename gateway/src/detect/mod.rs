//! Static-key detection: finds hard-coded credentials in traffic and files.
//!
//! Detection runs in two phases. A Hyperscan block-mode database over every
//! rule's `pattern` finds candidates at memory-bandwidth speed; each candidate
//! is then confirmed on a bounded window around it by the rule's anchored Rust
//! regex, a Shannon-entropy threshold, placeholder rejection (`${VAR}`,
//! `<your-key>`, `xxxx…`) and format checks such as GitHub's CRC32 check
//! digits. Rules live in an embedded YAML file (`rules/builtin.yaml`), and
//! custom rules use the same format (see `docs/detection.md`).
//!
//! Entry points: [`Detector`] for byte slices, [`StreamScanner`] for data that
//! arrives in chunks, [`http_scan`] for HTTP heads and bodies (decoded by
//! what they are: compression, JSON, forms, multipart, gRPC / Connect /
//! protobuf, base64), [`WsScanner`] for WebSocket messages, and `gateway
//! scan` (`crate::cli::scan`) for files. Body and WebSocket scanners fail closed: their
//! [`ScanStatus`] says whether everything was understood.

use std::{path::PathBuf, sync::Arc};

use serde::{Deserialize, Serialize};

pub(crate) mod b64;
pub mod body;
pub(crate) mod collect;
pub mod confirm;
mod engine;
mod grpc;
pub mod http_scan;
pub(crate) mod json;
mod multipart;
mod payload;
pub(crate) mod protobuf;
pub mod rules;
pub mod secret;
pub mod short_lived;
pub mod status;
pub mod stream;
pub(crate) mod utf16;
pub mod websocket;

#[cfg(test)]
mod decode_tests;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;

pub use collect::MAX_HITS_PER_MESSAGE;
pub use engine::Detector;
pub use secret::{FingerprintKey, Secret};
pub use status::{ScanStatus, Uninspectable};
pub use stream::StreamScanner;
pub use websocket::{WsConfig, WsScanner};

/// Default cap on decoded body bytes scanned per message (64 MiB).
pub const DEFAULT_MAX_DECODED_BODY: usize = 64 << 20;

/// Detector settings (`detect:` in the configuration file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectConfig {
    /// Whether the built-in rule set is loaded.
    pub builtin_rules: bool,
    /// A YAML file of additional rules, in the built-in rules' format.
    pub custom_rules: Option<PathBuf>,
    /// Rule ids to leave out (built-in or custom); unknown ids are an error.
    pub disabled_rules: Vec<String>,
    /// Decoded (decompressed) bytes scanned per HTTP body or WebSocket
    /// message; a message that decodes to more is uninspectable.
    pub max_decoded_body: usize,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            builtin_rules: true,
            custom_rules: None,
            disabled_rules: Vec::new(),
            max_decoded_body: DEFAULT_MAX_DECODED_BODY,
        }
    }
}

/// Why a detector could not be built or its state loaded.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// A rule file did not parse or did not fit the schema.
    #[error("{source_name}: invalid rule file: {reason}")]
    RuleFile {
        /// The file (or `<builtin rules>`).
        source_name: String,
        /// What is wrong, with the YAML path where known.
        reason: String,
    },
    /// One rule is invalid.
    #[error("{source_name}: rule `{rule}`: {reason}")]
    Rule {
        /// The file (or `<builtin rules>`).
        source_name: String,
        /// The rule id.
        rule: String,
        /// What is wrong.
        reason: String,
    },
    /// `disabled_rules` names a rule that does not exist.
    #[error("detect.disabled_rules: unknown rule id `{0}`")]
    UnknownDisabledRule(String),
    /// The Hyperscan database could not be built.
    #[error("cannot compile the Hyperscan database: {0}")]
    Hyperscan(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The fingerprint key file is malformed.
    #[error("{path}: invalid fingerprint key: {reason}")]
    FingerprintKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// How sure a rule is that a match is a live credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Confidence {
    /// Generic or heuristic match (e.g. `password=…` with enough entropy).
    Low,
    /// Distinctive but not self-verifying format.
    Medium,
    /// Distinctive prefix or check digits.
    High,
}

impl Confidence {
    /// Lowercase name, as in rule files.
    pub fn as_str(self) -> &'static str {
        match self {
            Confidence::Low => "low",
            Confidence::Medium => "medium",
            Confidence::High => "high",
        }
    }
}

impl std::fmt::Display for Confidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A confirmed secret.
#[derive(Debug, Clone)]
pub struct Detection {
    /// Id of the rule that found it.
    pub rule_id: Arc<str>,
    /// The rule's confidence.
    pub confidence: Confidence,
    /// Offset of the secret's first byte (absolute, for streams).
    pub start: u64,
    /// Offset just past the secret's last byte.
    pub end: u64,
    /// The secret.
    pub secret: Secret,
}
