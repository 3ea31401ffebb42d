//! Why a policy decides what it decides: the deciding rule, and for every
//! earlier rule the first selector that did not match. Uses the very check
//! [`Policy::evaluate`] uses, so the two cannot disagree.

use serde::Serialize;

use super::compiled::{Policy, RelationGlobs, Selectors};
use super::decision::Decision;
use super::eval::{check, Miss};
use super::facts::{Derived, PostgresFacts, Protocol, RequestFacts};
use super::glob::GlobList;
use crate::postgres::sql::{self, SqlError, Statement, StatementKind};

/// The decision for some facts, with the reasons earlier rules lost.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation<'p> {
    /// Where the policy came from.
    pub policy: String,
    /// The policy's digest.
    pub digest: &'p str,
    /// The most specific protocol of the facts.
    pub protocol: Protocol,
    /// The gRPC/Connect method detected, if any.
    pub rpc: Option<String>,
    /// The decision ([`Policy::evaluate`]'s).
    pub decision: Decision<'p>,
    /// Every rule before the deciding one, in order.
    pub skipped: Vec<RuleMiss<'p>>,
}

/// A rule that did not match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleMiss<'p> {
    /// Index in `rules`.
    pub index: usize,
    /// Name (`#<index>` when unnamed).
    pub rule: &'p str,
    /// The first selector that failed, e.g. `destination.host`.
    pub selector: String,
    /// Why, e.g. "`api.example.com` matches none of `*.cursor.sh`".
    pub detail: String,
}

impl Policy {
    /// Explains [`Policy::evaluate`]'s decision for `facts`.
    pub fn explain<'p>(&'p self, facts: &RequestFacts<'_>) -> Explanation<'p> {
        self.explain_with(facts, &Derived::new(facts), None)
    }

    /// Explains [`Policy::evaluate_postgres`]'s decision for a PostgreSQL
    /// session or statement.
    pub fn explain_postgres<'p>(&'p self, facts: &RequestFacts<'_>, pg: &PostgresFacts<'_>) -> Explanation<'p> {
        let facts = RequestFacts { request: None, ..*facts };
        self.explain_with(&facts, &Derived::postgres(&facts), Some(pg))
    }

    fn explain_with<'p>(
        &'p self,
        facts: &RequestFacts<'_>,
        derived: &Derived<'_>,
        pg: Option<&PostgresFacts<'_>>,
    ) -> Explanation<'p> {
        let mut skipped = Vec::new();
        let mut decision = self.default_decision();
        let mut decided = None;
        for (index, rule) in self.rules.iter().enumerate() {
            match check(&rule.selectors, facts, derived, pg) {
                Ok(()) => {
                    decision = self.rule_decision(index, rule);
                    decided = Some(rule);
                    break;
                }
                Err(miss) => {
                    let (selector, detail) = describe(&rule.selectors, miss, facts, derived, pg);
                    skipped.push(RuleMiss { index, rule: &rule.name, selector, detail });
                }
            }
        }
        if let Some(pg) = pg {
            decision = self.unless_unclassified(decision, decided, pg);
        }
        Explanation {
            policy: self.source.to_string(),
            digest: &self.digest,
            protocol: if pg.is_some() { Protocol::Postgres } else { facts.protocol() },
            rpc: derived.rpc.map(str::to_owned),
            decision,
            skipped,
        }
    }

    /// Classifies `query` and explains the decision for every statement of
    /// it, inner statements included, and the verdict for the whole query
    /// (the strictest decision, as the gate takes it).
    pub fn explain_sql<'p>(
        &'p self,
        facts: &RequestFacts<'_>,
        database: &str,
        user: &str,
        query: &str,
    ) -> Result<SqlExplanation<'p>, SqlError> {
        let statements = sql::classify(query)?;
        let mut out = Vec::new();
        for (number, top) in statements.iter().enumerate() {
            let mut parts: Vec<(&Statement, usize)> = Vec::new();
            collect(top, 0, &mut parts);
            for (st, depth) in parts {
                let pg = PostgresFacts { database, user, statement: Some(st) };
                out.push(StatementExplanation {
                    number: number + 1,
                    depth,
                    text: st.text(query).trim().to_owned(),
                    kind: st.kind,
                    relations: st.relations.iter().map(ToString::to_string).collect(),
                    has_where: st.has_where,
                    explanation: self.explain_postgres(facts, &pg),
                });
            }
        }
        let verdict = out
            .iter()
            .enumerate()
            .max_by_key(|(i, s)| (s.explanation.decision.action.strictness(), std::cmp::Reverse(*i)))
            .map(|(i, _)| i);
        Ok(SqlExplanation { database: database.to_owned(), user: user.to_owned(), statements: out, verdict })
    }

    /// What the gate decides for a query its parser rejects: the query is
    /// judged as one statement of kind `unknown`.
    pub fn explain_unclassified<'p>(
        &'p self,
        facts: &RequestFacts<'_>,
        database: &str,
        user: &str,
        query: &str,
    ) -> SqlExplanation<'p> {
        let unknown = Statement {
            kind: StatementKind::Unknown,
            relations: Vec::new(),
            has_where: None,
            span: 0..0,
            inner: vec![],
            columns: Default::default(),
        };
        let pg = PostgresFacts { database, user, statement: Some(&unknown) };
        SqlExplanation {
            database: database.to_owned(),
            user: user.to_owned(),
            statements: vec![StatementExplanation {
                number: 1,
                depth: 0,
                text: query.trim().to_owned(),
                kind: StatementKind::Unknown,
                relations: Vec::new(),
                has_where: None,
                explanation: self.explain_postgres(facts, &pg),
            }],
            verdict: Some(0),
        }
    }
}

fn collect<'s>(st: &'s Statement, depth: usize, out: &mut Vec<(&'s Statement, usize)>) {
    out.push((st, depth));
    for inner in &st.inner {
        collect(inner, depth + 1, out);
    }
}

/// [`Policy::explain_sql`]'s answer.
#[derive(Debug, Clone, Serialize)]
pub struct SqlExplanation<'p> {
    /// The database judged.
    pub database: String,
    /// The database user judged.
    pub user: String,
    /// Every statement judged, inner ones after the statement carrying them.
    pub statements: Vec<StatementExplanation<'p>>,
    /// Index in `statements` of the one whose decision is the query's (the
    /// strictest: deny, then require_approval, then allow; the first of
    /// equals); `None` for a query without statements.
    pub verdict: Option<usize>,
}

/// One judged statement.
#[derive(Debug, Clone, Serialize)]
pub struct StatementExplanation<'p> {
    /// Which statement of the query (from 1).
    pub number: usize,
    /// 0 for the statement itself, more for statements it carries.
    pub depth: usize,
    /// The top-level statement's text.
    pub text: String,
    /// What it is.
    pub kind: StatementKind,
    /// The relations it names.
    pub relations: Vec<String>,
    /// For update and delete: whether it has a WHERE clause.
    pub has_where: Option<bool>,
    /// Why the policy decides what it decides for it.
    pub explanation: Explanation<'p>,
}

impl SqlExplanation<'_> {
    /// Human-readable text, as `gateway policy explain --sql` prints it.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        if let Some(first) = self.statements.first() {
            let e = &first.explanation;
            let _ = writeln!(o, "policy       {} (sha256 {})", e.policy, e.digest.get(..12).unwrap_or(e.digest));
        }
        let _ = writeln!(o, "session      postgres database `{}` user `{}`", self.database, self.user);
        for s in &self.statements {
            let indent = "  ".repeat(s.depth);
            if s.depth == 0 {
                let _ = writeln!(o, "statement {:<3}{}", s.number, one_line(&s.text));
            }
            let filter = match s.has_where {
                Some(true) => " (with WHERE)",
                Some(false) => " (without WHERE)",
                None => "",
            };
            let carried = if s.depth > 0 { "carries " } else { "" };
            let _ = writeln!(o, "  {indent}{carried}{}{filter}", s.kind);
            if !s.relations.is_empty() {
                let _ = writeln!(o, "  {indent}  relations  {}", s.relations.join(", "));
            }
            for m in &s.explanation.skipped {
                let _ = writeln!(o, "  {indent}  rule {:<5} {:<24} no: {}: {}", m.index, m.rule, m.selector, m.detail);
            }
            let d = &s.explanation.decision;
            match d.index {
                Some(i) => {
                    let _ = writeln!(o, "  {indent}  rule {i:<5} {:<24} MATCH", d.rule);
                }
                None if d.rule == super::UNCLASSIFIED_RULE => {
                    let _ = writeln!(o, "  {indent}  unclassified: no matching rule names `kind: unknown`");
                }
                None => {
                    let _ = writeln!(o, "  {indent}  default    no rule matched");
                }
            }
            let _ = writeln!(o, "  {indent}  decision   {}{}", d.action.name(), action_detail(d));
            if let Some(m) = d.mask.filter(|m| !m.columns.is_empty()) {
                let _ = writeln!(o, "  {indent}  mask       columns {}", m.columns.join(", "));
            }
            let _ = writeln!(o, "  {indent}  record     {}", d.record.as_str());
        }
        match self.verdict.and_then(|i| self.statements.get(i)) {
            Some(s) => {
                let d = &s.explanation.decision;
                let _ = writeln!(
                    o,
                    "verdict      {} (statement {}, {} `{}`){}",
                    d.action.name(),
                    s.number,
                    if d.index.is_some() { "rule" } else { "by" },
                    d.rule,
                    action_detail(d)
                );
            }
            None => {
                let _ = writeln!(o, "verdict      nothing to judge: the query has no statements");
            }
        }
        o
    }
}

fn one_line(text: &str) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(100) {
        Some((at, _)) => format!("{}...", &flat[..at]),
        None => flat,
    }
}

fn action_detail(d: &Decision<'_>) -> String {
    match d.action {
        super::Action::Allow => String::new(),
        super::Action::Deny { reason } => format!(": {reason}"),
        super::Action::RequireApproval(a) => {
            format!(": {} approval(s) from `{}` ({})", a.min_approvals, a.group, a.reason)
        }
    }
}

fn quoted(items: impl IntoIterator<Item = impl std::fmt::Display>) -> String {
    items.into_iter().map(|i| format!("`{i}`")).collect::<Vec<_>>().join(", ")
}

fn none_of(value: &str, globs: &GlobList) -> String {
    format!("`{value}` matches none of {}", quoted(globs.sources()))
}

fn attribute(kind: &str, key: &str, value: Option<&String>, globs: &GlobList) -> String {
    match value {
        Some(v) => format!("{kind} `{key}` is `{v}`, which matches none of {}", quoted(globs.sources())),
        None => format!("{kind} `{key}` is not set"),
    }
}

fn kind_names(bits: u32) -> String {
    quoted(
        StatementKind::NAMES
            .iter()
            .filter(|n| **n != "copy" && StatementKind::bits_of_name(n).is_some_and(|b| b & bits != 0)),
    )
}

fn relation_list(st: &Statement) -> String {
    if st.relations.is_empty() {
        "the statement names no relation".to_owned()
    } else {
        format!("it names {}", quoted(&st.relations))
    }
}

fn describe(
    s: &Selectors,
    miss: Miss,
    f: &RequestFacts<'_>,
    d: &Derived<'_>,
    pg: Option<&PostgresFacts<'_>>,
) -> (String, String) {
    let protocols = [Protocol::Http, Protocol::Https, Protocol::Grpc, Protocol::Tcp, Protocol::Postgres];
    let statement = pg.and_then(|p| p.statement);
    let globs = |g: &Option<RelationGlobs>| g.as_ref().map_or_else(String::new, |g| quoted(&g.sources));
    let names = |bits: u8, sep: &str| {
        let names: Vec<String> =
            protocols.iter().filter(|p| bits & p.bit() != 0).map(|p| format!("`{}`", p.as_str())).collect();
        names.join(sep)
    };
    let (selector, detail) = match miss {
        Miss::Protocol => (
            "destination.protocol".to_owned(),
            format!("{} is not {}", names(d.protocols, " + "), names(s.protocols, " or ")),
        ),
        Miss::Port => ("destination.port".to_owned(), format!("port {} is not any of {}", f.port, quoted(&s.ports))),
        Miss::Cidr => ("destination.cidr".to_owned(), format!("address {} is in none of {}", d.addr, quoted(&s.cidrs))),
        Miss::Unmapped => (
            "identity.unmapped".to_owned(),
            if f.unmapped { "the identity is unmapped".to_owned() } else { "the identity is mapped".to_owned() },
        ),
        Miss::NoRequest => {
            ("request".to_owned(), "a tcp connection has no HTTP request; request selectors never match it".to_owned())
        }
        Miss::Method => {
            let method = f.request.as_ref().map_or("", |r| r.method);
            ("request.method".to_owned(), format!("`{method}` is not any of {}", quoted(&s.methods)))
        }
        Miss::Host => ("destination.host".to_owned(), s.host.as_ref().map_or_else(String::new, |g| none_of(d.host, g))),
        Miss::Uri => {
            ("identity.uri".to_owned(), s.uri.as_ref().map_or_else(String::new, |g| none_of(f.identity_uri, g)))
        }
        Miss::Label(i) => match s.labels.get(i) {
            Some((k, g)) => (format!("identity.labels.{k}"), attribute("label", k, f.labels.get(k), g)),
            None => ("identity.labels".to_owned(), String::new()),
        },
        Miss::Claim(i) => match s.claims.get(i) {
            Some((k, g)) => (format!("identity.claims.{k}"), attribute("claim", k, f.claims.get(k), g)),
            None => ("identity.claims".to_owned(), String::new()),
        },
        Miss::Path => ("request.path".to_owned(), s.path.as_ref().map_or_else(String::new, |g| none_of(d.path, g))),
        Miss::Rpc => (
            "request.rpc".to_owned(),
            match (d.rpc, &s.rpc) {
                (Some(rpc), Some(g)) => none_of(rpc, g),
                _ => "not a gRPC or Connect request".to_owned(),
            },
        ),
        Miss::HeaderPresent(i) => (
            "request.headers.present".to_owned(),
            format!("header `{}` is absent", s.present.get(i).map_or("", |h| h.as_str())),
        ),
        Miss::HeaderAbsent(i) => (
            "request.headers.absent".to_owned(),
            format!("header `{}` is present", s.absent.get(i).map_or("", |h| h.as_str())),
        ),
        Miss::NoPostgres => {
            ("postgres".to_owned(), "not a PostgreSQL session; `match.postgres` selectors never match it".to_owned())
        }
        Miss::NoStatement => (
            "postgres".to_owned(),
            "the session is judged at startup, before any statement; statement selectors never match it".to_owned(),
        ),
        Miss::Kind => (
            "postgres.kind".to_owned(),
            format!("`{}` is not any of {}", statement.map_or("", |st| st.kind.as_str()), kind_names(s.kinds)),
        ),
        Miss::Where => (
            "postgres.where".to_owned(),
            match statement {
                Some(st) if !st.kind.filters_rows() => format!("a `{}` is not an update or delete", st.kind),
                Some(st) if st.has_where == Some(true) => format!("the {} has a WHERE clause", st.kind),
                Some(st) => format!("the {} has no WHERE clause", st.kind),
                None => String::new(),
            },
        ),
        Miss::Database => (
            "postgres.database".to_owned(),
            match (pg, &s.databases) {
                (Some(pg), Some(g)) => none_of(pg.database, g),
                _ => String::new(),
            },
        ),
        Miss::User => (
            "postgres.user".to_owned(),
            match (pg, &s.users) {
                (Some(pg), Some(g)) => none_of(pg.user, g),
                _ => String::new(),
            },
        ),
        Miss::Relations => (
            "postgres.relations".to_owned(),
            format!(
                "{}, none of which may be any of {}",
                statement.map_or_else(String::new, relation_list),
                globs(&s.relations)
            ),
        ),
        Miss::OnlyRelations(i) => (
            "postgres.only_relations".to_owned(),
            match statement.and_then(|st| st.relations.get(i)) {
                Some(r) if r.schema.is_none() => format!(
                    "`{r}` is unqualified, so it may be in any schema, and is not surely any of {}",
                    globs(&s.only_relations)
                ),
                Some(r) => format!("`{r}` is not any of {}", globs(&s.only_relations)),
                None => String::new(),
            },
        ),
    };
    (selector, detail)
}
