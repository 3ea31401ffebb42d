//! A validated policy, ready to evaluate: globs compiled, host patterns
//! lowercased, header names parsed, and each rule's outcome resolved against
//! `defaults` once, so evaluation only borrows.

use std::path::{Path, PathBuf};

use http::HeaderName;
use ipnet::IpNet;
use sha2::{Digest, Sha256};

use super::decision::{
    Action, Decision, MaskRule, RecordLevel, StaticKeyAction, Uninspectable, DEFAULT_RULE, UNCLASSIFIED_REASON,
};
use super::error::PolicyError;
use super::glob::GlobList;
use super::PolicyContext;
use crate::postgres::sql::Relation;

/// The policy in force when none is configured: allow everything, record
/// in full, leave static keys to `findings.actions`, and refuse what the
/// gateway cannot inspect.
pub const BUILTIN_POLICY: &str = "\
# Built-in policy: used when `policy.file` is not set.
version: 1
rules: []
defaults:
  action: allow
  record: full
  uninspectable: refuse
";

/// Where a policy came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// [`BUILTIN_POLICY`].
    Builtin,
    /// An operator's file.
    File(PathBuf),
}

impl std::fmt::Display for PolicySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicySource::Builtin => f.write_str("<builtin>"),
            PolicySource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A compiled policy file.
#[derive(Debug, Clone)]
pub struct Policy {
    pub(super) source: PolicySource,
    pub(super) digest: String,
    pub(super) rules: Vec<Rule>,
    pub(super) default: Outcome,
    pub(super) masks: Vec<MaskRule>,
    pub(super) warnings: Vec<PolicyError>,
    /// The action of [`UNCLASSIFIED_RULE`] decisions (built once, so
    /// evaluation borrows it).
    pub(super) unclassified: Action,
}

/// One compiled rule.
#[derive(Debug, Clone)]
pub(super) struct Rule {
    pub(super) name: String,
    pub(super) selectors: Selectors,
    pub(super) outcome: Outcome,
}

/// A rule's selectors; absent ones (`0`, empty, `None`) match anything.
#[derive(Debug, Clone, Default)]
pub(super) struct Selectors {
    /// Bits of [`super::Protocol`]s; 0 = any.
    pub(super) protocols: u8,
    pub(super) ports: Vec<u16>,
    /// Destination networks; IPv4-mapped IPv6 networks stored as IPv4.
    pub(super) cidrs: Vec<IpNet>,
    pub(super) unmapped: Option<bool>,
    /// Upper case; compared ignoring case.
    pub(super) methods: Vec<String>,
    /// Lowercase globs, matched ignoring ASCII case.
    pub(super) host: Option<GlobList>,
    pub(super) uri: Option<GlobList>,
    pub(super) labels: Vec<(String, GlobList)>,
    pub(super) claims: Vec<(String, GlobList)>,
    pub(super) path: Option<GlobList>,
    pub(super) rpc: Option<GlobList>,
    pub(super) present: Vec<HeaderName>,
    pub(super) absent: Vec<HeaderName>,
    /// `match.postgres.database` / `user`: case-sensitive name globs.
    pub(super) databases: Option<GlobList>,
    pub(super) users: Option<GlobList>,
    /// Bits of statement kinds ([`crate::postgres::sql::StatementKind::bit`]); 0 = any.
    pub(super) kinds: u32,
    pub(super) relations: Option<RelationGlobs>,
    pub(super) only_relations: Option<RelationGlobs>,
    /// `match.postgres.where`.
    pub(super) has_where: Option<bool>,
}

/// Relation patterns (`billing.*`, `secrets`, `*.audit_log`), each a schema
/// glob (`None`: any schema) and a name glob.
///
/// An unqualified relation in a statement resolves through the session's
/// `search_path`, which the gateway does not know, so it could be in any
/// schema: it *may* be a pattern's relation when its name matches
/// (`relations`), but it is only *surely* one when the pattern admits every
/// schema (`only_relations`).
#[derive(Debug, Clone)]
pub(super) struct RelationGlobs {
    pub(super) sources: Vec<String>,
    pub(super) patterns: Vec<(Option<GlobList>, GlobList)>,
}

impl RelationGlobs {
    /// Whether `r` may be one of the patterns' relations.
    pub(super) fn may_match(&self, r: &Relation) -> bool {
        self.patterns.iter().any(|(schema, name)| {
            name.is_match(&r.name)
                && match (schema, &r.schema) {
                    (None, _) | (Some(_), None) => true,
                    (Some(g), Some(s)) => g.is_match(s),
                }
        })
    }

    /// Whether `r` is surely one of the patterns' relations.
    pub(super) fn must_match(&self, r: &Relation) -> bool {
        self.patterns.iter().any(|(schema, name)| {
            name.is_match(&r.name)
                && match (schema, &r.schema) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(g), Some(s)) => g.is_match(s),
                }
        })
    }

    fn memory_usage(&self) -> usize {
        self.sources.iter().map(String::capacity).sum::<usize>()
            + self
                .patterns
                .iter()
                .map(|(s, n)| s.as_ref().map_or(0, GlobList::memory_usage) + n.memory_usage())
                .sum::<usize>()
    }
}

impl Selectors {
    /// Whether any `match.request` selector is set: such a rule never
    /// matches a `tcp` connection.
    pub(super) fn needs_request(&self) -> bool {
        !self.methods.is_empty()
            || self.path.is_some()
            || self.rpc.is_some()
            || !self.present.is_empty()
            || !self.absent.is_empty()
    }

    /// Whether any `match.postgres` selector judging a statement is set:
    /// such a rule never matches a session judged at startup.
    pub(super) fn needs_statement(&self) -> bool {
        self.kinds != 0 || self.relations.is_some() || self.only_relations.is_some() || self.has_where.is_some()
    }

    /// Whether any `match.postgres` selector is set: such a rule only
    /// matches PostgreSQL sessions and statements.
    pub(super) fn needs_postgres(&self) -> bool {
        self.databases.is_some() || self.users.is_some() || self.needs_statement()
    }

    /// Whether the rule matches everything.
    pub(super) fn is_empty(&self) -> bool {
        self.protocols == 0
            && self.ports.is_empty()
            && self.cidrs.is_empty()
            && self.unmapped.is_none()
            && self.host.is_none()
            && self.uri.is_none()
            && self.labels.is_empty()
            && self.claims.is_empty()
            && !self.needs_request()
            && !self.needs_postgres()
    }

    fn memory_usage(&self) -> usize {
        let globs = [&self.host, &self.uri, &self.path, &self.rpc, &self.databases, &self.users]
            .into_iter()
            .flatten()
            .map(GlobList::memory_usage);
        let relations = [&self.relations, &self.only_relations]
            .into_iter()
            .flatten()
            .map(RelationGlobs::memory_usage)
            .sum::<usize>();
        let maps = self.labels.iter().chain(&self.claims).map(|(k, g)| k.capacity() + g.memory_usage());
        globs.chain(maps).sum::<usize>()
            + self.ports.capacity() * 2
            + self.cidrs.capacity() * std::mem::size_of::<IpNet>()
            + self.methods.iter().map(String::capacity).sum::<usize>()
            + relations
    }
}

/// What a rule decides, with `defaults` already applied.
#[derive(Debug, Clone)]
pub(super) struct Outcome {
    pub(super) action: Action,
    pub(super) static_keys: Option<StaticKeyAction>,
    pub(super) credential: super::decision::CredentialUse,
    pub(super) mask_id: Option<usize>,
    pub(super) record: RecordLevel,
    pub(super) uninspectable: Uninspectable,
}

impl Policy {
    /// [`BUILTIN_POLICY`], built without parsing.
    pub fn builtin() -> Policy {
        Policy {
            source: PolicySource::Builtin,
            digest: digest(BUILTIN_POLICY.as_bytes()),
            rules: Vec::new(),
            default: Outcome {
                action: Action::Allow,
                static_keys: None,
                credential: super::decision::CredentialUse::AsSent,
                mask_id: None,
                record: RecordLevel::Full,
                uninspectable: Uninspectable::Refuse,
            },
            masks: Vec::new(),
            warnings: Vec::new(),
            unclassified: unclassified_action(),
        }
    }

    /// Reads and compiles the policy file at `path`, returning every error
    /// found.
    pub fn load(path: &Path) -> Result<Policy, Vec<PolicyError>> {
        Policy::load_in(path, &PolicyContext::default())
    }

    /// [`Policy::load`], also checking the file against `context`.
    pub fn load_in(path: &Path, context: &PolicyContext) -> Result<Policy, Vec<PolicyError>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![PolicyError::file(path.to_owned(), format!("reading the policy file: {e}"))])?;
        Policy::parse_in(path, &text, context)
    }

    /// Compiles `text`, naming `path` in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Policy, Vec<PolicyError>> {
        Policy::parse_in(path, text, &PolicyContext::default())
    }

    /// [`Policy::parse`], also checking the text against `context`.
    pub fn parse_in(path: &Path, text: &str, context: &PolicyContext) -> Result<Policy, Vec<PolicyError>> {
        super::compile::compile(path, text, context)
    }

    /// Where the policy came from.
    pub fn source(&self) -> &PolicySource {
        &self.source
    }

    /// SHA-256 (hex) of the policy text: names this version of the policy in
    /// logs, recordings and masker caches.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The first 12 hex digits of [`Policy::digest`], for humans.
    pub fn short_digest(&self) -> &str {
        self.digest.get(..12).unwrap_or(&self.digest)
    }

    /// Number of rules (the closing default not counted).
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether only the default rule decides.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Names of the rules, in order.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }

    /// The rules' actions, in order (the closing default not included).
    pub fn rule_actions(&self) -> impl Iterator<Item = &Action> {
        self.rules.iter().map(|r| &r.outcome.action)
    }

    /// Every distinct masking spec, indexed by [`Decision::mask_id`]:
    /// compile maskers for all of them when the policy is loaded.
    pub fn masks(&self) -> &[MaskRule] {
        &self.masks
    }

    /// Likely mistakes that do not make the file invalid (unreachable rules).
    pub fn warnings(&self) -> &[PolicyError] {
        &self.warnings
    }

    /// Whether any rule matches destinations by `cidr` (then facts need the
    /// real destination address).
    pub fn uses_cidr(&self) -> bool {
        self.rules.iter().any(|r| !r.selectors.cidrs.is_empty())
    }

    /// Approximate heap bytes held by the compiled rules.
    pub fn memory_usage(&self) -> usize {
        self.rules.iter().map(|r| r.name.capacity() + r.selectors.memory_usage()).sum()
    }

    pub(super) fn decision<'p>(&'p self, rule: &'p str, index: Option<usize>, o: &'p Outcome) -> Decision<'p> {
        Decision {
            rule,
            index,
            action: &o.action,
            static_keys: o.static_keys,
            credential: o.credential,
            mask: o.mask_id.and_then(|i| self.masks.get(i)),
            mask_id: o.mask_id,
            record: o.record,
            uninspectable: o.uninspectable,
        }
    }

    /// The closing default rule's decision.
    pub fn default_decision(&self) -> Decision<'_> {
        self.decision(DEFAULT_RULE, None, &self.default)
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::builtin()
    }
}

/// The action refusing a statement the gateway cannot classify.
pub(super) fn unclassified_action() -> Action {
    Action::Deny { reason: UNCLASSIFIED_REASON.to_owned() }
}

/// Hex SHA-256 of policy text.
pub(super) fn digest(text: &[u8]) -> String {
    hex::encode(Sha256::digest(text))
}
