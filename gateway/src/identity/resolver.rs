//! Rule evaluation and the hot-reloadable resolver the proxy queries.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::Serialize;

use super::attest::{Attestation, Attested};
use super::mapping::{MappingError, MappingFile, Rule};
use super::matchset::{Field, Hits, Pattern};
use super::{IdentityConfig, UNATTESTED_SEGMENT, UNMAPPED_SEGMENT};

/// The identity a connection is pinned to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// SPIFFE-style URI.
    pub uri: String,
    /// Labels of the matching rule, rendered.
    pub labels: BTreeMap<String, String>,
    /// Name (or `#index`) of the rule that matched; `None` for the built-in
    /// `unmapped` and `unattested` identities.
    pub rule: Option<String>,
    /// Whether the process was attested (false: `unattested`).
    pub attested: bool,
}

/// What one rule made of a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RuleOutcome {
    /// Every selector matched and the identity rendered.
    Matched {
        /// The URI it would grant.
        uri: String,
    },
    /// A selector did not match.
    SelectorFailed {
        /// Selector name as written in the file.
        selector: String,
        /// Why, with the process's value.
        reason: String,
    },
    /// All selectors matched but none of the trustworthy ones did with
    /// trustworthy evidence, and the rule requires it.
    Untrusted {
        /// Why.
        reason: String,
    },
    /// Selectors matched but a template value was missing or unsafe.
    TemplateFailed {
        /// Why.
        reason: String,
    },
}

/// Per-rule verdict in an [`Explanation`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleExplanation {
    /// Position in the file (0-based).
    pub index: usize,
    /// Name or `#index`.
    pub rule: String,
    /// Verdict.
    pub outcome: RuleOutcome,
}

/// Why a process got its identity: every rule's verdict, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The identity [`IdentityResolver::resolve`] returns.
    pub identity: Identity,
    /// Set when attestation failed (then no rule is evaluated).
    pub unattested_reason: Option<String>,
    /// The mapping file in force, if any.
    pub mappings: Option<String>,
    /// Every rule, also those after the first match (which are shadowed).
    pub rules: Vec<RuleExplanation>,
}

/// Failure of one selector, without allocation (the hot path discards it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Miss {
    Uid,
    ExeSha256,
    Exe,
    Cgroup,
    Container,
    ContainerName,
    ContainerImage,
    ParentExe,
    AncestorExe,
    Comm,
    Env(usize),
    Untrusted,
}

/// Resolves attestations to identities through the mapping file in force,
/// which [`IdentityResolver::reload`] can swap at any time.
pub struct IdentityResolver {
    config: IdentityConfig,
    unmapped: String,
    unattested: String,
    current: RwLock<Option<Arc<MappingFile>>>,
}

impl IdentityResolver {
    /// A resolver with no mappings (everything attested is `unmapped`).
    pub fn new(config: &IdentityConfig) -> IdentityResolver {
        let td = &config.trust_domain;
        IdentityResolver {
            config: config.clone(),
            unmapped: format!("spiffe://{td}/{UNMAPPED_SEGMENT}"),
            unattested: format!("spiffe://{td}/{UNATTESTED_SEGMENT}"),
            current: RwLock::new(None),
        }
    }

    /// A resolver with `config.mappings` loaded (if set).
    pub fn from_config(config: &IdentityConfig) -> Result<IdentityResolver, Vec<MappingError>> {
        let r = IdentityResolver::new(config);
        if let Some(path) = &config.mappings {
            r.reload(path)?;
        }
        Ok(r)
    }

    /// Loads `path` and puts it in force. On any error the mappings in force
    /// stay as they were, so a typo cannot strip every job of its identity.
    pub fn reload(&self, path: &Path) -> Result<(), Vec<MappingError>> {
        let file = MappingFile::load_with(path, &self.config)?;
        self.replace(file);
        Ok(())
    }

    /// Puts an already compiled mapping file in force.
    pub fn replace(&self, file: MappingFile) {
        let new = Some(Arc::new(file));
        match self.current.write() {
            Ok(mut g) => *g = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    /// What attestation must collect for the mappings in force.
    pub fn needs(&self) -> super::AttestNeeds {
        let ancestors = self.mappings().is_some_and(|m| m.uses_ancestors());
        super::AttestNeeds { ancestors, cmdline: false }
    }

    /// The mapping file in force.
    pub fn mappings(&self) -> Option<Arc<MappingFile>> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The identity for an attestation: first matching rule, else
    /// `spiffe://<trust_domain>/unmapped`; `spiffe://<trust_domain>/unattested`
    /// when attestation failed.
    pub fn resolve(&self, attestation: &Attestation) -> Identity {
        let a = match attestation {
            Attestation::Attested(a) => a,
            Attestation::Unattested { .. } => return self.builtin(&self.unattested, false),
        };
        if let Some(file) = self.mappings() {
            let hits = file.sets.evaluate(a);
            for rule in &file.rules {
                if eval(rule, a, &hits).is_ok() {
                    if let Ok(id) = render(rule, a) {
                        return id;
                    }
                }
            }
        }
        self.builtin(&self.unmapped, true)
    }

    /// Every rule's verdict for an attestation, and the resulting identity.
    pub fn explain(&self, attestation: &Attestation) -> Explanation {
        let file = self.mappings();
        let mappings = file.as_ref().map(|f| f.path().display().to_string());
        let a = match attestation {
            Attestation::Attested(a) => a,
            Attestation::Unattested { reason } => {
                return Explanation {
                    identity: self.builtin(&self.unattested, false),
                    unattested_reason: Some(reason.clone()),
                    mappings,
                    rules: Vec::new(),
                }
            }
        };
        let mut identity = None;
        let mut rules = Vec::new();
        let hits = file.as_ref().map(|f| f.sets.evaluate(a));
        for (rule, hits) in file.iter().flat_map(|f| f.rules.iter()).filter_map(|r| Some((r, hits.as_ref()?))) {
            let outcome = match eval(rule, a, hits) {
                Err(miss) => describe(rule, miss, a),
                Ok(()) => match render(rule, a) {
                    Ok(id) => {
                        let uri = id.uri.clone();
                        identity.get_or_insert(id);
                        RuleOutcome::Matched { uri }
                    }
                    Err(reason) => RuleOutcome::TemplateFailed { reason },
                },
            };
            rules.push(RuleExplanation { index: rule.index, rule: rule.label.clone(), outcome });
        }
        Explanation {
            identity: identity.unwrap_or_else(|| self.builtin(&self.unmapped, true)),
            unattested_reason: None,
            mappings,
            rules,
        }
    }

    fn builtin(&self, uri: &str, attested: bool) -> Identity {
        Identity { uri: uri.to_owned(), labels: BTreeMap::new(), rule: None, attested }
    }
}

/// Evaluates a rule's selectors, cheapest first. Trusted evidence is a
/// trustworthy selector that matched on a value a job cannot choose.
fn eval(rule: &Rule, a: &Attested, hits: &Hits) -> Result<(), Miss> {
    let mut trusted = false;
    if let Some(uids) = &rule.uid {
        if !uids.contains(&a.uid) {
            return Err(Miss::Uid);
        }
        trusted = true;
    }
    if let Some(hashes) = &rule.exe_sha256 {
        if !hashes.contains(&a.exe.sha256) {
            return Err(Miss::ExeSha256);
        }
        trusted = true;
    }
    // Globs were matched once for all rules (`hits`); here only lookups.
    if let Some(pats) = &rule.container {
        if !hits.any(Field::Container, pats) {
            return Err(Miss::Container);
        }
        trusted = true;
    }
    if let Some(pats) = &rule.comm {
        if !hits.any(Field::Comm, pats) {
            return Err(Miss::Comm);
        }
    }
    // Name and image: only present once the runtime confirmed the
    // container, and chosen by whoever started it, so never trusted.
    if let Some(pats) = &rule.container_name {
        if !hits.any(Field::ContainerName, pats) {
            return Err(Miss::ContainerName);
        }
    }
    if let Some(pats) = &rule.container_image {
        if !hits.any(Field::ContainerImage, pats) {
            return Err(Miss::ContainerImage);
        }
    }
    for (i, (_, set, pats)) in rule.env.iter().enumerate() {
        if !hits.env(*set, pats) {
            return Err(Miss::Env(i));
        }
    }
    if let Some(pats) = &rule.exe {
        if !hits.any(Field::Exe, pats) {
            return Err(Miss::Exe);
        }
        trusted |= a.exe.root_owned;
    }
    if let Some(pats) = &rule.cgroup {
        if !hits.any(Field::Cgroup, pats) {
            return Err(Miss::Cgroup);
        }
        trusted = true;
    }
    if let Some(pats) = &rule.parent_exe {
        if !hits.parent(pats) {
            return Err(Miss::ParentExe);
        }
        trusted |= a.ancestors.first().and_then(|p| p.exe.as_ref()).is_some_and(|e| e.root_owned);
    }
    if let Some(pats) = &rule.ancestor_exe {
        if !hits.any(Field::Ancestor, pats) {
            return Err(Miss::AncestorExe);
        }
        trusted |= hits.ancestor_trusted(pats);
    }
    if rule.require_trusted && !trusted {
        return Err(Miss::Untrusted);
    }
    Ok(())
}

fn render(rule: &Rule, a: &Attested) -> Result<Identity, String> {
    let mut uri = String::with_capacity(96);
    rule.uri.render(a, &mut uri).map_err(|e| format!("identity: {e}"))?;
    let mut labels = BTreeMap::new();
    for (k, t) in &rule.labels {
        let mut v = String::new();
        t.render(a, &mut v).map_err(|e| format!("label {k}: {e}"))?;
        labels.insert(k.clone(), v);
    }
    Ok(Identity { uri, labels, rule: Some(rule.label.clone()), attested: true })
}

fn list(pats: &[Pattern]) -> String {
    let v: Vec<&str> = pats.iter().map(|p| p.source.as_str()).collect();
    v.join(", ")
}

/// The explain-only, allocating description of a [`Miss`].
fn describe(rule: &Rule, miss: Miss, a: &Attested) -> RuleOutcome {
    let none = "<none>".to_owned();
    let (selector, reason) = match miss {
        Miss::Uid => ("uid", format!("uid {} not in {:?}", a.uid, rule.uid.as_deref().unwrap_or_default())),
        Miss::ExeSha256 => ("exe_sha256", format!("exe sha256 {} not listed", a.exe.sha256)),
        Miss::Exe => ("exe", format!("exe {} does not match {}", a.exe.path, list(rule.exe.as_deref().unwrap_or_default()))),
        Miss::Cgroup => (
            "cgroup",
            format!("cgroup {} does not match {}", a.cgroup.as_ref().unwrap_or(&none), list(rule.cgroup.as_deref().unwrap_or_default())),
        ),
        Miss::Container => (
            "container",
            format!(
                "container {} does not match {}",
                a.container.as_ref().map(|c| &c.id).unwrap_or(&none),
                list(rule.container.as_deref().unwrap_or_default())
            ),
        ),
        Miss::ContainerName => (
            "container_name",
            format!(
                "container name {} does not match {}",
                a.container.as_ref().and_then(|c| c.name.as_ref()).unwrap_or(&none),
                list(rule.container_name.as_deref().unwrap_or_default())
            ),
        ),
        Miss::ContainerImage => (
            "container_image",
            format!(
                "container image {} does not match {}",
                a.container.as_ref().and_then(|c| c.image.as_ref()).unwrap_or(&none),
                list(rule.container_image.as_deref().unwrap_or_default())
            ),
        ),
        Miss::ParentExe => (
            "parent_exe",
            format!(
                "parent exe {} does not match {}",
                a.ancestors.first().and_then(|p| p.exe.as_ref()).map(|e| &e.path).unwrap_or(&none),
                list(rule.parent_exe.as_deref().unwrap_or_default())
            ),
        ),
        Miss::AncestorExe => (
            "ancestor_exe",
            format!(
                "no ancestor exe ({}) matches {}",
                a.ancestors.iter().filter_map(|p| p.exe.as_ref().map(|e| e.path.as_str())).collect::<Vec<_>>().join(", "),
                list(rule.ancestor_exe.as_deref().unwrap_or_default())
            ),
        ),
        Miss::Comm => ("comm", format!("comm {} does not match {}", a.comm, list(rule.comm.as_deref().unwrap_or_default()))),
        Miss::Env(i) => {
            let (name, _, pats) = &rule.env[i];
            let reason = match a.env.get(name) {
                Some(v) => format!("{name}={v} does not match {}", list(pats)),
                None => format!("{name} is not set (or set ambiguously)"),
            };
            return RuleOutcome::SelectorFailed { selector: format!("env.{name}"), reason };
        }
        Miss::Untrusted => {
            return RuleOutcome::Untrusted {
                reason: "only job-controlled evidence matched (exe/parent path globs count only for root-owned files outside writable directories); the rule requires trusted evidence".into(),
            }
        }
    };
    RuleOutcome::SelectorFailed { selector: selector.into(), reason }
}
