//! Evaluation: the first rule whose selectors all match decides, else the
//! default. Nothing here allocates (see `tests/policy_alloc.rs`).

use super::compiled::{Policy, Rule, Selectors};
use super::decision::Decision;
use super::facts::{Derived, RequestFacts};

/// The first selector of a rule that did not match, in evaluation order
/// (cheap comparisons before globs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Miss {
    Protocol,
    Port,
    Cidr,
    Unmapped,
    /// The rule has request selectors and the facts are a `tcp` connection.
    NoRequest,
    Method,
    Host,
    Uri,
    /// Index into the rule's `labels`.
    Label(usize),
    /// Index into the rule's `claims`.
    Claim(usize),
    Path,
    Rpc,
    /// Index into the rule's required headers.
    HeaderPresent(usize),
    /// Index into the rule's forbidden headers.
    HeaderAbsent(usize),
}

impl Policy {
    /// Decides `facts`: the first matching rule, else the default.
    pub fn evaluate(&self, facts: &RequestFacts<'_>) -> Decision<'_> {
        let derived = Derived::new(facts);
        for (index, rule) in self.rules.iter().enumerate() {
            if check(&rule.selectors, facts, &derived).is_ok() {
                return self.rule_decision(index, rule);
            }
        }
        self.default_decision()
    }

    pub(super) fn rule_decision<'p>(&'p self, index: usize, rule: &'p Rule) -> Decision<'p> {
        self.decision(&rule.name, Some(index), &rule.outcome)
    }
}

/// Whether every selector of `s` matches.
pub(super) fn check(s: &Selectors, f: &RequestFacts<'_>, d: &Derived<'_>) -> Result<(), Miss> {
    if s.protocols != 0 && s.protocols & d.protocols == 0 {
        return Err(Miss::Protocol);
    }
    if !s.ports.is_empty() && !s.ports.contains(&f.port) {
        return Err(Miss::Port);
    }
    if !s.cidrs.is_empty() && !s.cidrs.iter().any(|net| net.contains(&d.addr)) {
        return Err(Miss::Cidr);
    }
    if s.unmapped.is_some_and(|u| u != f.unmapped) {
        return Err(Miss::Unmapped);
    }
    let request = match &f.request {
        Some(r) => Some(r),
        None if s.needs_request() => return Err(Miss::NoRequest),
        None => None,
    };
    if let Some(r) = request {
        if !s.methods.is_empty() && !s.methods.iter().any(|m| m.eq_ignore_ascii_case(r.method)) {
            return Err(Miss::Method);
        }
    }
    if s.host.as_ref().is_some_and(|g| !g.is_match(d.host)) {
        return Err(Miss::Host);
    }
    if s.uri.as_ref().is_some_and(|g| !g.is_match(f.identity_uri)) {
        return Err(Miss::Uri);
    }
    for (i, (key, globs)) in s.labels.iter().enumerate() {
        if !f.labels.get(key).is_some_and(|v| globs.is_match(v)) {
            return Err(Miss::Label(i));
        }
    }
    for (i, (key, globs)) in s.claims.iter().enumerate() {
        if !f.claims.get(key).is_some_and(|v| globs.is_match(v)) {
            return Err(Miss::Claim(i));
        }
    }
    let Some(r) = request else { return Ok(()) };
    if s.path.as_ref().is_some_and(|g| !g.is_match(d.path)) {
        return Err(Miss::Path);
    }
    if let Some(g) = &s.rpc {
        if !d.rpc.is_some_and(|rpc| g.is_match(rpc)) {
            return Err(Miss::Rpc);
        }
    }
    if let Some(i) = s.present.iter().position(|h| !r.headers.contains_key(h)) {
        return Err(Miss::HeaderPresent(i));
    }
    if let Some(i) = s.absent.iter().position(|h| r.headers.contains_key(h)) {
        return Err(Miss::HeaderAbsent(i));
    }
    Ok(())
}
