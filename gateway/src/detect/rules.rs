//! Rule files (built-in and custom): schema, validation and compilation.

use std::{fmt, path::Path, sync::Arc};

use regex::bytes::{Regex, RegexBuilder};
use serde::Deserialize;

use super::{confirm::Check, Confidence, DetectError};

/// The built-in rule set, embedded at build time.
pub const BUILTIN_RULES: &str = include_str!("rules/builtin.yaml");

/// Name used for the built-in rule set in error messages.
pub const BUILTIN_SOURCE: &str = "<builtin rules>";

/// How far past the prefilter match a confirm regex may extend by default.
const DEFAULT_WINDOW: usize = 64;
/// Cap on the look-back for prefilter patterns whose width is unbounded: a
/// secret longer than this is not a static key we can handle anyway.
pub(crate) const MAX_LOOKBACK: usize = 1024;
/// Upper bound on any rule's `window`, which bounds memory in streaming.
pub(crate) const MAX_WINDOW: usize = 64 * 1024;
const REGEX_SIZE_LIMIT: usize = 64 << 20;

/// A rule file: `rules:` followed by a list of [`RuleSpec`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// The rules, in priority order.
    pub rules: Vec<RuleSpec>,
}

/// One rule as written in YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique id (lowercase letters, digits and `-`), reported with each detection.
    pub id: String,
    /// Human-readable name; defaults to the id.
    #[serde(default)]
    pub name: Option<String>,
    /// Hyperscan expression for the prefilter (must also compile as a Rust regex).
    pub pattern: String,
    /// Rust regex that extracts the secret; defaults to the pattern itself (no boundaries).
    #[serde(default)]
    pub confirm: Option<String>,
    /// One of these must occur (case-insensitively) in or just before the secret.
    #[serde(default)]
    pub keywords: Vec<String>,
    /// Minimum Shannon entropy of the secret, bits per byte.
    #[serde(default)]
    pub entropy: Option<f64>,
    /// Confidence of a confirmed detection.
    #[serde(default = "default_confidence")]
    pub confidence: Confidence,
    /// Extra validation of the secret.
    #[serde(default)]
    pub check: Option<Check>,
    /// Bytes the confirm match may extend past the prefilter match.
    #[serde(default)]
    pub window: Option<usize>,
    /// Inputs the rule must detect (verified by the test suite).
    #[serde(default)]
    pub examples: Vec<String>,
    /// Inputs no rule may detect (verified by the test suite).
    #[serde(default)]
    pub negatives: Vec<String>,
}

fn default_confidence() -> Confidence {
    Confidence::Medium
}

/// A validated, compiled rule.
pub struct Rule {
    /// The rule id.
    pub id: Arc<str>,
    /// Human-readable name.
    pub name: String,
    /// The Hyperscan prefilter expression.
    pub pattern: String,
    /// The extraction regex.
    pub(crate) confirm: Regex,
    /// Capture group holding the secret (0 = whole match).
    pub(crate) secret_group: usize,
    /// Capture group holding a URL user name, for the `userinfo` check.
    pub(crate) user_group: Option<usize>,
    /// Lowercased keywords.
    pub(crate) keywords: Vec<Vec<u8>>,
    /// Minimum entropy.
    pub entropy: Option<f64>,
    /// Confidence of detections.
    pub confidence: Confidence,
    /// Extra validation.
    pub check: Option<Check>,
    /// Bytes before the prefilter match end that the match can start at.
    pub(crate) lookback: usize,
    /// Bytes after the prefilter match end that the match can reach.
    pub(crate) window: usize,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule").field("id", &self.id).field("confidence", &self.confidence).finish()
    }
}

/// Parses a rule file's text; `source` names it in errors.
pub fn parse_rule_file(source: &str, text: &str) -> Result<Vec<RuleSpec>, DetectError> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let file: RuleFile = serde_path_to_error::deserialize(de).map_err(|e| DetectError::RuleFile {
        source_name: source.to_string(),
        reason: format!("{}: {}", e.path(), e.inner()),
    })?;
    Ok(file.rules)
}

/// Reads and parses a custom rule file.
pub fn load_rule_file(path: &Path) -> Result<Vec<RuleSpec>, DetectError> {
    let text = std::fs::read_to_string(path).map_err(|source| DetectError::Io { path: path.to_path_buf(), source })?;
    parse_rule_file(&path.display().to_string(), &text)
}

/// Parses the embedded built-in rules.
pub fn builtin_specs() -> Result<Vec<RuleSpec>, DetectError> {
    parse_rule_file(BUILTIN_SOURCE, BUILTIN_RULES)
}

impl RuleSpec {
    /// Validates and compiles the rule; `source` names its file in errors.
    /// `prefilter_max_width` is Hyperscan's maximum match width of `pattern`.
    pub(crate) fn compile(&self, source: &str, prefilter_max_width: usize) -> Result<Rule, DetectError> {
        let err = |reason: String| DetectError::Rule { source_name: source.to_string(), rule: self.id.clone(), reason };
        if self.id.is_empty() || !self.id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err(err("id must be non-empty lowercase letters, digits and '-'".into()));
        }
        if self.pattern.is_empty() {
            return Err(err("pattern is empty".into()));
        }
        if let Some(e) = self.entropy {
            if !(0.0..=8.0).contains(&e) {
                return Err(err(format!("entropy {e} is outside 0..=8 bits per byte")));
            }
        }
        let window = self.window.unwrap_or(DEFAULT_WINDOW);
        if window > MAX_WINDOW {
            return Err(err(format!("window {window} exceeds the maximum {MAX_WINDOW}")));
        }
        if self.keywords.iter().any(|k| k.is_empty()) {
            return Err(err("keywords must not be empty strings".into()));
        }
        let confirm_src = match &self.confirm {
            Some(c) => c.clone(),
            // No boundaries: binary framing puts arbitrary bytes right before
            // a key (a protobuf length byte 0x44 is `D`), and `x` + a key is
            // still that key. Formats distinctive enough to be rules need none.
            None => format!("(?:{})", self.pattern),
        };
        let confirm = RegexBuilder::new(&confirm_src)
            .unicode(false)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| err(format!("confirm regex does not compile: {e}")))?;
        let names: Vec<Option<&str>> = confirm.capture_names().collect();
        let secret_group =
            names.iter().position(|n| *n == Some("secret")).unwrap_or(if names.len() > 1 { 1 } else { 0 });
        let user_group = names.iter().position(|n| *n == Some("user"));
        if self.check == Some(Check::Userinfo) && user_group.is_none() {
            return Err(err("check `userinfo` needs a confirm regex with a `user` group".into()));
        }
        let lookback = prefilter_max_width.min(MAX_LOOKBACK);
        Ok(Rule {
            id: Arc::from(self.id.as_str()),
            name: self.name.clone().unwrap_or_else(|| self.id.clone()),
            pattern: self.pattern.clone(),
            confirm,
            secret_group,
            user_group,
            keywords: self.keywords.iter().map(|k| k.to_ascii_lowercase().into_bytes()).collect(),
            entropy: self.entropy,
            confidence: self.confidence,
            check: self.check,
            lookback,
            window,
        })
    }
}
