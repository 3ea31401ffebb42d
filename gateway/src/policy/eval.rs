//! Evaluation: the first rule whose selectors all match decides, else the
//! default. Nothing here allocates (see `tests/policy_alloc.rs`).

use super::compiled::{Policy, Rule, Selectors};
use super::decision::{Decision, UNCLASSIFIED_RULE};
use super::facts::{Derived, PostgresFacts, RequestFacts};
use crate::postgres::sql::StatementKind;

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
    /// The rule has `match.postgres` selectors and the facts are not a
    /// PostgreSQL session or statement.
    NoPostgres,
    /// The rule has statement selectors and the session is judged at startup.
    NoStatement,
    Kind,
    Where,
    Database,
    User,
    Relations,
    /// Index into the statement's relations: one not surely in `only_relations`.
    OnlyRelations(usize),
}

impl Policy {
    /// Decides `facts`: the first matching rule, else the default.
    pub fn evaluate(&self, facts: &RequestFacts<'_>) -> Decision<'_> {
        let derived = Derived::new(facts);
        for (index, rule) in self.rules.iter().enumerate() {
            if check(&rule.selectors, facts, &derived, None).is_ok() {
                return self.rule_decision(index, rule);
            }
        }
        self.default_decision()
    }

    /// Decides a PostgreSQL session (`pg.statement` is `None`) or one
    /// statement of it, as protocol `postgres`: the first matching rule,
    /// else the default. `facts` are the connection's (`request` is
    /// ignored). A statement of kind `unknown` is refused
    /// ([`UNCLASSIFIED_RULE`]) unless the deciding rule names `unknown` in
    /// `kind` or denies it anyway. Allocates nothing.
    pub fn evaluate_postgres(&self, facts: &RequestFacts<'_>, pg: &PostgresFacts<'_>) -> Decision<'_> {
        let derived = Derived::postgres(facts);
        let facts = RequestFacts { request: None, ..*facts };
        let decided =
            self.rules.iter().enumerate().find(|(_, rule)| check(&rule.selectors, &facts, &derived, Some(pg)).is_ok());
        let decision = match decided {
            Some((index, rule)) => self.rule_decision(index, rule),
            None => self.default_decision(),
        };
        self.unless_unclassified(decision, decided.map(|(_, r)| r), pg)
    }

    /// `decision`, or the refusal of a statement the gateway cannot
    /// classify that `rule` (`None`: the default) does not explicitly allow.
    pub(super) fn unless_unclassified<'p>(
        &'p self,
        decision: Decision<'p>,
        rule: Option<&Rule>,
        pg: &PostgresFacts<'_>,
    ) -> Decision<'p> {
        let unknown = pg.statement.is_some_and(|s| s.kind == StatementKind::Unknown);
        let named = rule.is_some_and(|r| r.selectors.kinds & StatementKind::Unknown.bit() != 0);
        if !unknown || named || matches!(decision.action, super::Action::Deny { .. }) {
            return decision;
        }
        Decision { rule: UNCLASSIFIED_RULE, index: None, action: &self.unclassified, ..decision }
    }

    pub(super) fn rule_decision<'p>(&'p self, index: usize, rule: &'p Rule) -> Decision<'p> {
        self.decision(&rule.name, Some(index), &rule.outcome)
    }
}

/// Whether every selector of `s` matches.
pub(super) fn check(
    s: &Selectors,
    f: &RequestFacts<'_>,
    d: &Derived<'_>,
    pg: Option<&PostgresFacts<'_>>,
) -> Result<(), Miss> {
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
    let statement = match pg {
        None if s.needs_postgres() => return Err(Miss::NoPostgres),
        None => None,
        Some(pg) => match pg.statement {
            None if s.needs_statement() => return Err(Miss::NoStatement),
            st => st,
        },
    };
    if let Some(st) = statement {
        if s.kinds != 0 && s.kinds & st.kind.bit() == 0 {
            return Err(Miss::Kind);
        }
        if s.has_where.is_some() && st.has_where != s.has_where {
            return Err(Miss::Where);
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
    if let Some(pg) = pg {
        if s.databases.as_ref().is_some_and(|g| !g.is_match(pg.database)) {
            return Err(Miss::Database);
        }
        if s.users.as_ref().is_some_and(|g| !g.is_match(pg.user)) {
            return Err(Miss::User);
        }
    }
    if let Some(st) = statement {
        if s.relations.as_ref().is_some_and(|g| !st.relations.iter().any(|r| g.may_match(r))) {
            return Err(Miss::Relations);
        }
        if let Some(g) = &s.only_relations {
            if let Some(i) = st.relations.iter().position(|r| !g.must_match(r)) {
                return Err(Miss::OnlyRelations(i));
            }
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
